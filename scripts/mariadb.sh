#!/usr/bin/env bash
# A private MariaDB for tests and demos: its own data directory, socket and loopback port; no system service.
#
#   scripts/mariadb.sh start DIR   install Debian's mariadb-server if missing, initialise DIR/data on first use,
#                                  start mariadbd on 127.0.0.1 at a free port, wait until it answers, print the port
#                                  (the only line on stdout). root@localhost has no password, over TCP too.
#   scripts/mariadb.sh stop DIR    stop the instance started in DIR (by the PID in DIR/mariadb.pid) and wait for it.
#
# Logs: DIR/mariadb.log. The PID file names the process, so only that instance is ever stopped.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
command=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
pid_file=$dir/mariadb.pid

install_if_missing() {
    if command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null \
        && command -v mariadb-dump >/dev/null; then
        return
    fi
    echo "mariadb-server is missing: installing it with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends mariadb-server mariadb-client >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends mariadb-server mariadb-client >&2
    fi
}

alive() { [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

start() {
    install_if_missing
    if alive; then
        echo "a MariaDB started in $dir is already running (PID $(cat "$pid_file")); stop it first" >&2
        exit 1
    fi
    local user
    user=$(id -un)
    # A private tmpdir: mariadbd deletes every `#sql*` file in its tmpdir when it starts, so two instances (tests
    # run in parallel) sharing /tmp delete each other's temporary tables ("Unknown table 'mysql.tmp_…'" from a
    # concurrent mariadb-install-db).
    mkdir -p "$dir/tmp"
    if [[ ! -d $dir/data/mysql ]]; then
        mariadb-install-db --no-defaults --datadir="$dir/data" --tmpdir="$dir/tmp" --user="$user" \
            --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1 \
            || {
                # The cause comes first; mariadb-install-db ends a failure with pages of generic advice.
                echo "mariadb-install-db failed ($dir/install.log); its error lines, then its first 60 lines:" >&2
                grep -n -i -E "error|can't|cannot|fail|denied|no space|abort" "$dir/install.log" | head -n 40 >&2 || true
                head -n 60 "$dir/install.log" >&2
                exit 1
            }
    fi
    local attempt port pid
    for attempt in 1 2 3 4 5; do
        port=$(( 20000 + RANDOM % 20000 ))
        rm -f "$pid_file"
        mariadbd --no-defaults --datadir="$dir/data" --tmpdir="$dir/tmp" --user="$user" --bind-address=127.0.0.1 --port="$port" \
            --socket="$dir/mariadb.sock" --pid-file="$pid_file" --log-error="$dir/mariadb.log" \
            --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 &
        pid=$!
        echo "$pid" >"$pid_file"
        for _ in $(seq 1 300); do
            if ! kill -0 "$pid" 2>/dev/null; then
                break # exited: most likely the port was taken; try another one
            fi
            if mariadb-admin --no-defaults --protocol=tcp -h127.0.0.1 -P"$port" -uroot ping >/dev/null 2>&1; then
                echo "$pid" >"$pid_file"
                echo "$port"
                return
            fi
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            wait "$pid" 2>/dev/null || true
            echo "MariaDB did not answer on port $port within 60 s; see $dir/mariadb.log" >&2
            exit 1
        fi
        echo "MariaDB exited at start (attempt $attempt, port $port); see $dir/mariadb.log" >&2
    done
    exit 1
}

stop() {
    if ! alive; then
        echo "no MariaDB started in $dir is running" >&2
        rm -f "$pid_file"
        return
    fi
    local pid
    pid=$(cat "$pid_file")
    kill "$pid"
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; return; }
        sleep 0.2
    done
    echo "MariaDB (PID $pid) did not stop within 60 s; killing it" >&2
    kill -9 "$pid"
    rm -f "$pid_file"
}

case $command in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
