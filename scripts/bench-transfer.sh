#!/usr/bin/env bash
# Transfer benchmark (BENCHMARKS.md, "Transfer"): builds the release binaries, starts a throwaway sshd on a
# loopback port for the scp comparison (installing openssh-server if missing), runs bench_transfer, stops sshd.
# Usage: scripts/bench-transfer.sh            (BENCH_SIZE_MIB=1024 by default; BENCH_DIR=/var/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p patchd-agent -p patchctl -p patchd-bench --bin patchd --bin patchctl --bin bench_transfer

if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
    echo "installing openssh-server (for the scp comparison)" >&2
    apt-get install -y -qq openssh-server >/dev/null || { apt-get update -qq && apt-get install -y -qq openssh-server >/dev/null; }
fi
SSHD=$(command -v sshd || echo /usr/sbin/sshd)

work=$(mktemp -d /tmp/patchd-bench-ssh.XXXXXX)
sshd_pid=""
cleanup() {
    if [ -n "$sshd_pid" ]; then kill "$sshd_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/client_key"
cat "$work/client_key.pub" > "$work/authorized_keys"
chmod 600 "$work/authorized_keys"
port=$((20000 + RANDOM % 20000))
mkdir -p /run/sshd
cat > "$work/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
PidFile $work/sshd.pid
UsePAM no
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
"$SSHD" -D -f "$work/sshd_config" -E "$work/sshd.log" &
sshd_pid=$!
for _ in $(seq 1 100); do
    if ssh -i "$work/client_key" -p "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o BatchMode=yes -o LogLevel=ERROR root@127.0.0.1 true 2>/dev/null; then break; fi
    sleep 0.1
done

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" >&2
PATCHD_BIN_DIR="$PWD/target/release" BENCH_SSH_PORT="$port" BENCH_SSH_KEY="$work/client_key" \
    ./target/release/bench_transfer
