#!/usr/bin/env bash
#! The README's test command: installs what the tests need, builds every binary, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v mariadbd >/dev/null 2>&1 || need_apt+=(mariadb-server mariadb-client)  # scripts/mariadb.sh
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing Debian packages the tests need: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  fi
fi

FEATURES=(--features patchd-agent/fault-injection)
echo "==> import graph (no circles; the executor stays pure)"
bash scripts/check_imports.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> building binaries (with fault-injection points, activated only by PATCHD_FAULT)"
cargo build --workspace --bins "${FEATURES[@]}"
echo "==> cargo test"
cargo test --workspace "${FEATURES[@]}" -- --test-threads 2
echo "==> cargo clippy"
cargo clippy --workspace --all-targets "${FEATURES[@]}" -- -D warnings
