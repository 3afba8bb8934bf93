#!/usr/bin/env bash
# install.sh: installs the patchd agent on a systemd host (binary, config, certificates, hardened unit), enables
# and starts it; idempotent (run it again to upgrade the binary or rotate certificates). `--uninstall` undoes it.
#
# Usage:
#   install.sh --binary PATH --ca FILE --cert FILE --key FILE [--config FILE] [--force-config]
#              [--deploy-root DIR]... [--listen-interface IFACE] [--no-start] [--root DIR]
#   install.sh --uninstall [--purge] [--no-start] [--root DIR]
#
#   --binary PATH       the patchd executable to install as /usr/bin/patchd
#   --ca FILE           the cluster CA certificate        -> /etc/patchd/tls/ca.crt
#   --cert FILE         this agent's certificate          -> /etc/patchd/tls/agent.crt
#   --key FILE          this agent's private key          -> /etc/patchd/tls/agent.key (mode 0600)
#   --config FILE       agent config to install as /etc/patchd/patchd.toml (default: patchd.toml next to this
#                       script, with deploy_roots set from --deploy-root). An existing config is kept.
#   --force-config      replace an existing /etc/patchd/patchd.toml (the old one is kept as patchd.toml.bak)
#   --deploy-root DIR   a directory the agent may write to (repeatable): created if missing, made writable in the
#                       unit's sandbox (drop-in patchd.service.d/deploy-roots.conf). Without it (an upgrade),
#                       an existing drop-in is kept, else it is written from deploy_roots of the installed config
#   --listen-interface IFACE
#                       the interface whose IPv4 address the default config listens on (port 7480); default: the
#                       interface of the default route. Only used when the default config is installed (no --config).
#   --no-start          install or remove files only; do not call systemctl
#   --root DIR          install under DIR instead of / (packaging tests, images); implies --no-start
#   --uninstall         stop and disable the unit, remove the files this script installs (the config is saved to
#                       the state directory first)
#   --purge             with --uninstall: also remove the state directory (/var/lib/patchd: blobs, backups, journal)

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly UNIT_NAME="patchd.service"

say() { printf 'patchd install: %s\n' "$*"; }
warn() { printf 'patchd install: warning: %s\n' "$*" >&2; }
die() {
    printf 'patchd install: error: %s\n' "$*" >&2
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

binary="" ca="" cert="" key="" config="" root="" listen_interface="" force_config=0 no_start=0 uninstall=0 purge=0
deploy_roots=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
        --ca) ca="${2:?--ca needs a file}"; shift 2 ;;
        --cert) cert="${2:?--cert needs a file}"; shift 2 ;;
        --key) key="${2:?--key needs a file}"; shift 2 ;;
        --config) config="${2:?--config needs a file}"; shift 2 ;;
        --deploy-root) deploy_roots+=("${2:?--deploy-root needs a directory}"); shift 2 ;;
        --listen-interface) listen_interface="${2:?--listen-interface needs an interface name}"; shift 2 ;;
        --force-config) force_config=1; shift ;;
        --no-start) no_start=1; shift ;;
        --root) root="${2:?--root needs a directory}"; no_start=1; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -h | --help) usage 0 ;;
        *) printf 'patchd install: error: unknown argument "%s"\n\n' "$1" >&2; usage 2 ;;
    esac
done

if [[ -n "$root" ]]; then
    [[ -d "$root" ]] || die "--root $root does not exist: create it first"
    root="$(cd "$root" && pwd)"
    [[ "$root" == "/" ]] && root=""
fi

readonly BIN="$root/usr/bin/patchd"
readonly ETC="$root/etc/patchd"
readonly TLS="$ETC/tls"
readonly CONFIG="$ETC/patchd.toml"
readonly UNIT="$root/etc/systemd/system/$UNIT_NAME"
readonly DROPIN_DIR="$root/etc/systemd/system/$UNIT_NAME.d"
readonly DROPIN="$DROPIN_DIR/deploy-roots.conf"
readonly DOC="$root/usr/share/doc/patchd/README.md"
readonly DEFAULT_STATE_DIR="/var/lib/patchd"

if [[ -z "$root" && "$(id -u)" -ne 0 ]]; then
    die "must run as root (it installs into /usr/bin, /etc and starts a system service); try: sudo $0 $*"
fi

systemctl_do() {
    if [[ "$no_start" -eq 1 ]]; then
        say "skipped: systemctl $* (--no-start)"
        return 0
    fi
    command -v systemctl >/dev/null || die "systemctl not found: this host does not run systemd (use --no-start and the process backend)"
    systemctl "$@"
}

# The state_dir the config names (the default if it cannot be read).
state_dir_of() {
    local file="$1" value=""
    if [[ -f "$file" ]]; then
        value="$(sed -n 's/^[[:space:]]*state_dir[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$file" | head -n 1)"
    fi
    printf '%s\n' "${value:-$DEFAULT_STATE_DIR}"
}

uninstall_all() {
    local state_dir
    state_dir="$(state_dir_of "$CONFIG")"
    if [[ -f "$UNIT" ]]; then
        systemctl_do disable --now "$UNIT_NAME" || warn "could not stop/disable $UNIT_NAME (continuing)"
    fi
    if [[ -f "$CONFIG" ]]; then
        mkdir -p "$root$state_dir"
        cp -p "$CONFIG" "$root$state_dir/patchd.toml.uninstalled"
        say "saved the config as $root$state_dir/patchd.toml.uninstalled"
    fi
    rm -f "$UNIT" "$DROPIN" "$BIN" "$DOC" "$TLS/ca.crt" "$TLS/agent.crt" "$TLS/agent.key" "$CONFIG" "$CONFIG.bak"
    rmdir "$DROPIN_DIR" "$TLS" "$ETC" "$(dirname "$DOC")" 2>/dev/null || true
    systemctl_do daemon-reload
    if [[ "$purge" -eq 1 ]]; then
        case "$state_dir" in
            /*/*)
                rm -rf -- "$root$state_dir"
                say "purged the state directory $root$state_dir"
                ;;
            *) warn "not purging state_dir \`$state_dir\`: it does not look like a dedicated directory; remove it by hand" ;;
        esac
    else
        say "kept the state directory $root$state_dir (blobs, backups, journal); --purge removes it"
    fi
    say "patchd uninstalled"
}

if [[ "$uninstall" -eq 1 ]]; then
    uninstall_all
    exit 0
fi
[[ "$purge" -eq 1 ]] && die "--purge only goes with --uninstall"

# --- checks before touching anything -------------------------------------------------------------------------
[[ -n "$binary" && -n "$ca" && -n "$cert" && -n "$key" ]] || {
    printf 'patchd install: error: --binary, --ca, --cert and --key are required\n\n' >&2
    usage 2
}
[[ -f "$binary" && -x "$binary" ]] || die "--binary $binary is not an executable file"
for pair in "ca:$ca" "cert:$cert" "key:$key"; do
    name="${pair%%:*}" file="${pair#*:}"
    [[ -f "$file" && -r "$file" ]] || die "--$name $file is not a readable file"
done
grep -q 'BEGIN CERTIFICATE' "$ca" || die "--ca $ca is not a PEM certificate (expected the cluster ca.crt)"
grep -q 'BEGIN CERTIFICATE' "$cert" || die "--cert $cert is not a PEM certificate (expected <host>.crt from patchctl cert issue)"
grep -q 'PRIVATE KEY' "$key" || die "--key $key is not a PEM private key (expected <host>.key from patchctl cert issue)"
if [[ -n "$config" ]]; then
    [[ -f "$config" ]] || die "--config $config does not exist"
    [[ ${#deploy_roots[@]} -gt 0 ]] || warn "--config given without --deploy-root: no directory is made writable in the sandbox"
elif [[ ! -f "$SCRIPT_DIR/patchd.toml" ]]; then
    die "no --config given and no default patchd.toml next to this script ($SCRIPT_DIR)"
fi
[[ -f "$SCRIPT_DIR/patchd.service" ]] || die "patchd.service is missing next to this script ($SCRIPT_DIR)"
# Dies unless $1 is a deploy root the sandbox can safely make writable; $2 says where it came from.
check_deploy_root() {
    local dir="$1" from="$2"
    [[ "$dir" == /* ]] || die "$from $dir must be an absolute path"
    [[ "$dir" != *[[:space:]\"\\]* ]] || die "$from \`$dir\`: paths with spaces, quotes or backslashes are not supported"
    [[ "$dir" != */../* && "$dir" != */.. && "$dir" != */./* ]] || die "$from $dir must not contain . or .. components"
    case "$dir" in
        / | /usr | /usr/* | /etc | /etc/* | /var/lib/patchd | /var/lib/patchd/*) die "$from $dir is a system directory: use the directory your services are deployed under" ;;
    esac
}
for dir in "${deploy_roots[@]}"; do
    check_deploy_root "$dir" "--deploy-root"
done

# The IPv4 address the default config listens on: that of --listen-interface, else of the default route's
# interface. Never a wildcard: the agent serves on the cluster-facing interface only.
listen_address=""
if [[ -z "$config" ]]; then
    command -v ip >/dev/null || die "ip (iproute2) not found: it is needed to read the address of the listen interface; install it, or pass --config with listen set"
    if [[ -z "$listen_interface" ]]; then
        listen_interface="$(ip -4 route show default 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)"
        [[ -n "$listen_interface" ]] || die "this host has no IPv4 default route: name the cluster-facing interface with --listen-interface IFACE"
    fi
    [[ "$listen_interface" =~ ^[A-Za-z0-9._@:-]+$ ]] || die "--listen-interface \`$listen_interface\` is not an interface name"
    ip link show dev "$listen_interface" >/dev/null 2>&1 || die "--listen-interface $listen_interface: no such interface on this host (see \`ip -br link\`)"
    listen_address="$(ip -4 -o addr show dev "$listen_interface" 2>/dev/null | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n 1)"
    [[ -n "$listen_address" ]] || die "interface $listen_interface has no IPv4 address: name another with --listen-interface, or pass --config with listen set"
fi

# --- files ----------------------------------------------------------------------------------------------------
owner_args=()
[[ "$(id -u)" -eq 0 ]] && owner_args=(-o root -g root)

install -d -m 0755 "$root/usr/bin" "$ETC" "$root/etc/systemd/system"
install -d -m 0700 "${owner_args[@]}" "$TLS"
# install(1) unlinks the old file before writing the new one, so a running agent keeps its executable.
install -m 0755 "${owner_args[@]}" "$binary" "$BIN"
say "installed $BIN"
install -m 0644 "${owner_args[@]}" "$ca" "$TLS/ca.crt"
install -m 0644 "${owner_args[@]}" "$cert" "$TLS/agent.crt"
install -m 0600 "${owner_args[@]}" "$key" "$TLS/agent.key"
say "installed $TLS/{ca.crt,agent.crt,agent.key} (key mode 0600)"

# The default config with deploy_roots filled in from --deploy-root and listen from the listen interface.
render_default_config() {
    local list="" dir
    for dir in "${deploy_roots[@]}"; do
        list+="${list:+, }\"$dir\""
    done
    sed -e "s|^deploy_roots = \[\]\$|deploy_roots = [$list]|" \
        -e "s|^listen = \"127\.0\.0\.1:7480\"\$|listen = \"$listen_address:7480\"|" "$SCRIPT_DIR/patchd.toml"
}

new_config="$(mktemp)"
trap 'rm -f "$new_config"' EXIT
if [[ -n "$config" ]]; then
    cp "$config" "$new_config"
else
    render_default_config >"$new_config"
fi
if [[ ! -f "$CONFIG" ]]; then
    install -m 0644 "${owner_args[@]}" "$new_config" "$CONFIG"
    say "installed $CONFIG"
elif cmp -s "$new_config" "$CONFIG"; then
    say "kept $CONFIG (unchanged)"
elif [[ "$force_config" -eq 1 ]]; then
    cp -p "$CONFIG" "$CONFIG.bak"
    install -m 0644 "${owner_args[@]}" "$new_config" "$CONFIG"
    say "replaced $CONFIG (previous one saved as $CONFIG.bak)"
else
    say "kept the existing $CONFIG (it differs from the new one: --force-config replaces it)"
fi
# Agents before the listen check accepted a wildcard; this one refuses to start on it.
if grep -Eq '^[[:space:]]*listen[[:space:]]*=[[:space:]]*"(0\.0\.0\.0|\[::\]):' "$CONFIG" &&
    ! grep -Eq '^[[:space:]]*allow_wildcard_listen[[:space:]]*=[[:space:]]*true' "$CONFIG"; then
    warn "$CONFIG listens on every interface, which patchd now refuses: set listen to the cluster-facing address (or allow_wildcard_listen = true)"
fi

# Prints the entries of a one-line `deploy_roots = ["/a", "/b"]` in the config; fails on any other shape (a
# multi-line array, escapes, single quotes), which this script does not try to parse.
deploy_roots_of() {
    local file="$1" line inner rest
    local pattern='^[[:space:]]*deploy_roots[[:space:]]*=[[:space:]]*\[([^]#]*)\][[:space:]]*(#.*)?$'
    line="$(grep -E '^[[:space:]]*deploy_roots[[:space:]]*=' "$file" | head -n 1)" || return 1
    [[ "$line" =~ $pattern ]] || return 1
    inner="${BASH_REMATCH[1]}"
    rest="$(printf '%s' "$inner" | sed 's/"[^"\\]*"//g; s/[[:space:],]//g')"
    [[ -z "$rest" ]] || return 1
    printf '%s' "$inner" | grep -o '"[^"]*"' | tr -d '"' || true
}

# Without --deploy-root (the upgrade path) the sandbox keeps the deploy roots it had: keep an existing drop-in,
# else take them from the installed config.
write_dropin=1
if [[ ${#deploy_roots[@]} -eq 0 ]]; then
    if [[ -f "$DROPIN" ]]; then
        write_dropin=0
    elif config_roots="$(deploy_roots_of "$CONFIG")"; then
        while IFS= read -r dir; do
            [[ -n "$dir" ]] || continue
            check_deploy_root "$dir" "deploy_roots entry in $CONFIG:"
            deploy_roots+=("$dir")
        done <<<"$config_roots"
    else
        warn "cannot read deploy_roots from $CONFIG (only a one-line list of \"quoted\" paths is understood): no directory is made writable in the sandbox; run again with --deploy-root DIR for each deploy root"
    fi
fi

for dir in "${deploy_roots[@]}"; do
    if [[ ! -d "$root$dir" ]]; then
        install -d -m 0755 "$root$dir"
        say "created deploy root $root$dir"
    fi
    grep -qF "\"$dir\"" "$CONFIG" || warn "deploy root $dir is not listed in deploy_roots of $CONFIG: add it there too"
done

install -m 0644 "$SCRIPT_DIR/patchd.service" "$UNIT"
if [[ -f "$SCRIPT_DIR/README.md" ]]; then
    install -D -m 0644 "$SCRIPT_DIR/README.md" "$DOC"
fi
if [[ "$write_dropin" -eq 1 ]]; then
    install -d -m 0755 "$DROPIN_DIR"
    {
        echo "# Written by install.sh: the deploy roots patchd may write to (must match deploy_roots in /etc/patchd/patchd.toml)."
        echo "[Service]"
        if [[ ${#deploy_roots[@]} -gt 0 ]]; then
            echo "ReadWritePaths=${deploy_roots[*]}"
        fi
    } >"$DROPIN.tmp"
    mv -f "$DROPIN.tmp" "$DROPIN"
    chmod 0644 "$DROPIN"
    say "installed $UNIT and $DROPIN (ReadWritePaths=${deploy_roots[*]:-none})"
else
    say "installed $UNIT; kept $DROPIN (no --deploy-root given: $(grep '^ReadWritePaths=' "$DROPIN" || echo 'no ReadWritePaths'))"
fi

# --- service --------------------------------------------------------------------------------------------------
if [[ "$no_start" -eq 1 ]]; then
    say "files installed; not starting (--no-start). Start with: systemctl daemon-reload && systemctl enable --now $UNIT_NAME"
    exit 0
fi
if ! "$BIN" validate --config "$CONFIG"; then
    die "$CONFIG does not validate (see above): fix it, then run this script again"
fi
systemctl_do daemon-reload
systemctl_do enable "$UNIT_NAME"
# restart, not start: a second run must pick up a new binary, certificates or config.
systemctl_do restart "$UNIT_NAME" || die "$UNIT_NAME failed to start: see journalctl -u $UNIT_NAME"
if systemctl is-active --quiet "$UNIT_NAME"; then
    say "$UNIT_NAME is running (journalctl -u $UNIT_NAME for its log)"
else
    die "$UNIT_NAME is not active after start: see systemctl status $UNIT_NAME and journalctl -u $UNIT_NAME"
fi
