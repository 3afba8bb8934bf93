#!/usr/bin/env bash
#! The README's run command: builds patchd, brings up the demo cluster on loopback (agents on 127.0.1.1..N),
#! builds a hotfix package of demo-worker, patches the cluster with it worker by worker, and shows `display`
#! before and after. Needs only the Rust toolchain. The demo stays up afterwards (`patchctl demo down` stops it).
#!
#! usage: scripts/demo.sh [--nodes N] [--containers] [--down]
#!   --nodes N      hosts in the demo cluster (default 4: 1 master, 3 workers; 6 or more: 3 masters)
#!   --containers   workers run as Docker containers; the hotfix is an image package (needs a Docker Engine)
#!   --down         stop the demo at the end
#! Files go to $PATCHCTL_HOME (default ~/.patchctl): tls/, the store, and demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=4
down=0
containers=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="${2:?--nodes needs a number}"; shift 2 ;;
    --down) down=1; shift ;;
    --containers) containers=1; shift ;;
    -h|--help) sed -n '2,10s/^#! \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see $0 --help)" >&2; exit 2 ;;
  esac
done

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install the Rust toolchain (https://rustup.rs) and run this again" >&2
  exit 1
fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "building release binaries (cargo build --release --bins)"
cargo build --release --bins
bin="$PWD/target/release"
patchctl="$bin/patchctl"
export PATCHCTL_HOME="${PATCHCTL_HOME:-$HOME/.patchctl}"
demo_dir="$PATCHCTL_HOME/demo"

if "$patchctl" demo status >/dev/null 2>&1; then
  step "a demo is already up: stopping it to start fresh"
  "$patchctl" demo down
fi

up_flags=(--nodes "$nodes")
[ "$containers" = 1 ] && up_flags+=(--containers)
step "patchctl demo up ${up_flags[*]}"
"$patchctl" demo up "${up_flags[@]}"

step "patchctl display demo (before)"
"$patchctl" display demo

if [ "$containers" = 1 ]; then
  step "building a hotfix image of demo-worker: demo-worker:v1.0.1-hotfix"
  "$bin/demo-worker" stamp --version v1.0.1-hotfix -o "$demo_dir/image/rootfs/demo-worker"
  docker build -q -t demo-worker:v1.0.1-hotfix "$demo_dir/image"
  hotfix="$demo_dir/packages/demo-worker-v1.0.1-hotfix-image.tar.gz"
  "$patchctl" package build --image demo-worker:v1.0.1-hotfix -o "$hotfix"
else
  step "building a hotfix of demo-worker: v1.0.1-hotfix"
  mkdir -p "$demo_dir/hotfix"
  "$bin/demo-worker" stamp --version v1.0.1-hotfix -o "$demo_dir/hotfix/demo-worker"
  base=$(ls "$demo_dir"/packages/demo-worker-v1.0.0-*.tar.gz)
  hotfix="$demo_dir/packages/demo-worker-v1.0.1-hotfix.tar.gz"
  "$patchctl" package build --base "$base" \
    --replace "demo-worker/demo-worker=$demo_dir/hotfix/demo-worker" \
    --version v1.0.1-hotfix -o "$hotfix"
fi

step "patchctl patch demo $(basename "$hotfix") -R demo-worker -y"
"$patchctl" patch demo "$hotfix" -R demo-worker -y

step "patchctl display demo (after)"
"$patchctl" display demo

if [ "$down" = 1 ]; then
  step "patchctl demo down"
  "$patchctl" demo down
else
  echo
  echo "The demo is still running. Try:"
  echo "  $patchctl demo status              # agents, services, leader, members"
  echo "  $patchctl demo down                # stop everything the demo started"
fi
