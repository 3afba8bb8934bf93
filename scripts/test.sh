#!/usr/bin/env bash
#! The README's test command: installs what the tests need, builds every binary, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# tests/tests/signing.rs checks that the minisign tool verifies what `patchctl package sign` writes.
command -v minisign >/dev/null 2>&1 || need_apt+=(minisign)
command -v mariadbd >/dev/null 2>&1 || need_apt+=(mariadb-server mariadb-client)  # scripts/mariadb.sh
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing Debian packages the tests need: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  fi
fi

# The container tests need a Docker Engine. Where none answers, install Debian's docker.io and start dockerd
# ourselves (in the background, logging to target/dockerd.log); if it still does not answer, the container tests
# run anyway and fail, naming the socket: they never skip.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "==> installing Debian's docker.io (no Docker Engine on this machine)"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io
  fi
  if ! docker info >/dev/null 2>&1; then
    mkdir -p target
    echo "==> starting dockerd (log: target/dockerd.log)"
    as_root nohup dockerd >target/dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && break
      sleep 1
    done
    if docker info >/dev/null 2>&1; then
      echo "==> Docker Engine up"
    else
      echo "!! the Docker Engine did not answer within 60 s (see target/dockerd.log); the container tests will fail" >&2
    fi
  fi
fi

FEATURES=(--features patchd-agent/fault-injection,patchctl/fault-injection)
echo "==> import graph (no circles; the executor stays pure)"
bash scripts/check_imports.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> building binaries (with fault-injection points, activated only by PATCHD_FAULT and PATCHCTL_FAULT_*)"
cargo build --workspace --bins "${FEATURES[@]}"
echo "==> cargo test"
cargo test --workspace "${FEATURES[@]}" -- --test-threads 2
echo "==> cargo clippy"
cargo clippy --workspace --all-targets "${FEATURES[@]}" -- -D warnings
