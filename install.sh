#!/bin/sh
# install.sh - install, upgrade or remove ovm_exporter.py as the "coriolis-ovm-exporter" service.
#
# Run as root from the directory holding ovm_exporter.py and exporter.toml.example:
#     sh install.sh [options]          (sh install.sh --help)
# POSIX sh only: runs under dash, busybox sh and bash 4.1 (Oracle Linux 6 / Oracle VM 3.4 dom0).
# No realpath, readlink -f, install -D, mktemp --suffix, openssl -addext, local, arrays, [[ ]].
# shellcheck disable=SC2015,SC2012,SC2317
# (SC2015: "A && B || die" is meant: die when either fails; SC2012: ls -ld only for a mode string;
#  SC2317: cleanup runs from a trap)

NAME=coriolis-ovm-exporter
PROG=install.sh

say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    printf "Try 'sh %s --help'.\n" "$PROG" >&2
    exit 2
}

usage() {
    cat <<EOF
Usage: sh install.sh [options]

Installs ovm_exporter.py (found next to this script) as the $NAME service,
upgrades it in place, or removes it. Run as root.

Options:
  --python PATH      use this Python (2.6+ or 3.6+); default: first usable of
                     python3, python2, python, /usr/bin/python
  --prefix DIR       bin dir prefix: the script goes to DIR/bin/$NAME
                     (default /usr/local, the Go service's path, replaced in place)
  --port N           API port written to a NEW config (default 5544)
  --bind ADDR        API bind address written to a NEW config (default 0.0.0.0)
  --init TYPE        sysv | upstart | systemd | none (default: detect)
  --no-start         do not start or restart the service
  --open-firewall    add an iptables ACCEPT rule for the port when iptables is
                     active (default: only print the rule)
  --root DIR         install everything under the staging root DIR; never touch
                     the real system's services (no start, no chkconfig).
                     config.toml then refers to files under DIR so that the
                     tree can be run in place (tests); it is not a DESTDIR.
  --uninstall        stop and remove the service and the script; keep
                     /etc/$NAME (config, certificates, database)
  --purge            like --uninstall, and also remove /etc/$NAME;
                     snapshots inside the repositories are never removed
  -h, --help         show this help

A second run changes nothing the admin configured: config.toml, the JWT
secret, certificates and database are kept. A new ovm_exporter.py replaces
the installed script and the service is restarted if it was running.
EOF
}

# ------------------------------------------------------------------------------------ options ---
ROOT=
PREFIX=/usr/local
PORT=
BIND=
INIT=auto
PYTHON=
NO_START=0
OPEN_FW=0
ACTION=install
PURGE=0

need_arg() {
    [ "$1" -ge 2 ] || usage_error "option $2 needs a value"
}

while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --no-start) NO_START=1 ;;
        --open-firewall) OPEN_FW=1 ;;
        --uninstall) ACTION=uninstall ;;
        --purge) ACTION=uninstall; PURGE=1 ;;
        --python) need_arg $# "$1"; PYTHON=$2; shift ;;
        --python=*) PYTHON=${1#*=} ;;
        --prefix) need_arg $# "$1"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --port) need_arg $# "$1"; PORT=$2; shift ;;
        --port=*) PORT=${1#*=} ;;
        --bind) need_arg $# "$1"; BIND=$2; shift ;;
        --bind=*) BIND=${1#*=} ;;
        --init) need_arg $# "$1"; INIT=$2; shift ;;
        --init=*) INIT=${1#*=} ;;
        --root) need_arg $# "$1"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#*=} ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done

# Paths end up inside config.toml, the init script and the unit file: keep them to safe characters.
check_path() {
    case $2 in
        /*) ;;
        *) usage_error "$1 must be an absolute path: $2" ;;
    esac
    case $2 in
        *[!A-Za-z0-9_./+-]*) usage_error "$1 contains unsupported characters (allowed: A-Z a-z 0-9 _ . / + -): $2" ;;
    esac
}

if [ -n "$ROOT" ]; then
    check_path --root "$ROOT"
    while :; do
        case $ROOT in
            */) ROOT=${ROOT%/} ;;
            *) break ;;
        esac
    done
fi
check_path --prefix "$PREFIX"
while :; do
    case $PREFIX in
        ?*/) PREFIX=${PREFIX%/} ;;
        *) break ;;
    esac
done
[ "$PREFIX" = / ] && PREFIX=
case $PYTHON in
    *[!A-Za-z0-9_./+-]*) usage_error "--python contains unsupported characters: $PYTHON" ;;
esac

if [ -n "$PORT" ]; then
    case $PORT in
        *[!0-9]*|0*) usage_error "--port must be a number 1-65535: $PORT" ;;
    esac
    { [ "${#PORT}" -le 5 ] && [ "$PORT" -le 65535 ]; } || usage_error "--port must be a number 1-65535: $PORT"
fi
if [ -n "$BIND" ]; then
    case $BIND in
        *[!0-9A-Za-z.:-]*) usage_error "--bind must be an IP address or host name: $BIND" ;;
    esac
fi
case $INIT in
    auto|sysv|upstart|systemd|none) ;;
    *) usage_error "--init must be sysv, upstart, systemd or none: $INIT" ;;
esac

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "must be run as root (or use --root DIR to install into a staging directory)"
fi

# ------------------------------------------------------------------------------------- paths ---
# System paths (as the installed system sees them); files are written at "$ROOT<path>".
BIN_DIR=$PREFIX/bin
BIN=$BIN_DIR/$NAME
CONF_DIR=/etc/$NAME
CONF=$CONF_DIR/config.toml
PIDFILE=/var/run/$NAME.pid
LOCKFILE=/var/lock/subsys/$NAME
LOG_DIR=/var/log
OUTLOG=$LOG_DIR/$NAME.out
SYSV=/etc/init.d/$NAME
UPSTART=/etc/init/$NAME.conf
UNIT=/etc/systemd/system/$NAME.service
SNAPSHOTS_NOTE="snapshots inside the repositories (/OVS/Repositories/*/CoriolisSnapshots) are never removed by install.sh"

# Test hook: in --root mode with --init sysv, let the installer drive the STAGED init script
# (OVM_EXPORTER_ROOT=DIR) to check stop/start/restart-on-upgrade. Never touches real services.
MANAGE_STAGED=0
if [ -n "$ROOT" ] && [ "${OVM_EXPORTER_INSTALL_STAGED_SERVICE:-0}" = 1 ]; then
    MANAGE_STAGED=1
fi

case $0 in
    */*) SRC_DIR=${0%/*} ;;
    *) SRC_DIR=. ;;
esac
SRC_DIR=$(cd "$SRC_DIR" && pwd) || die "cannot find the directory of $0"
SRC_SCRIPT=$SRC_DIR/ovm_exporter.py
SRC_EXAMPLE=$SRC_DIR/exporter.toml.example

umask 077
TMPD=
cleanup() {
    [ -n "$TMPD" ] && rm -rf "$TMPD"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

make_tmpdir() {
    [ -n "$TMPD" ] && return 0
    TMPD=$(mktemp -d "${TMPDIR:-/tmp}/$NAME.XXXXXX" 2>/dev/null)
    if [ -z "$TMPD" ] || [ ! -d "$TMPD" ]; then
        TMPD=${TMPDIR:-/tmp}/$NAME.$$
        mkdir "$TMPD" || die "cannot create a temporary directory $TMPD"
    fi
}

# Create system directories world-readable even though our umask is 077.
mkdir_sys() {
    [ -d "$1" ] && return 0
    (umask 022 && mkdir -p "$1") || die "cannot create directory $1"
}

# put_file TMPFILE DEST MODE LABEL: move TMPFILE to DEST unless identical; says what happened.
put_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        rm -f "$1"
        say "  kept      $4 (unchanged)"
        return 1
    fi
    chmod "$3" "$1" || die "chmod $3 $1 failed"
    if [ -f "$2" ]; then
        mv -f "$1" "$2" || die "cannot replace $2"
        say "  updated   $4"
    else
        mv -f "$1" "$2" || die "cannot create $2"
        say "  installed $4"
    fi
    return 0
}

# sed replacement text: escape \ | &
sed_esc() {
    printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'
}

# Value of a top-level or [api] key from a TOML config, unquoted: cfg_value FILE SECTION KEY
cfg_value() {
    awk -v want_sec="$2" -v want_key="$3" '
        /^[ \t]*\[/ { sec = $0; sub(/^[ \t]*\[+[ \t]*/, "", sec); sub(/[ \t]*\]+.*$/, "", sec); next }
        sec == want_sec {
            line = $0
            if (line !~ "^[ \t]*" want_key "[ \t]*=") next
            sub(/^[^=]*=[ \t]*/, "", line)
            if (line ~ /^"/) { sub(/^"/, "", line); sub(/".*$/, "", line) }
            else { sub(/[ \t]*#.*$/, "", line); sub(/[ \t]+$/, "", line) }
            print line
            exit
        }' "$1" 2>/dev/null
}

# ------------------------------------------------------------------------------------ python ---
PY_CHECK='import sys
v = sys.version_info
if not ((v[0] == 2 and v[1] >= 6) or (v[0] == 3 and v[1] >= 6) or v[0] > 3):
    sys.stdout.write("BAD version %d.%d.%d is too old (need 2.6+ or 3.6+)\n" % (v[0], v[1], v[2]))
    sys.exit(0)
missing = []
for m in ("ssl", "json", "sqlite3", "socket", "hashlib"):
    try:
        __import__(m)
    except ImportError:
        missing.append(m)
if missing:
    sys.stdout.write("BAD %d.%d.%d lacks module(s) %s\n" % (v[0], v[1], v[2], " ".join(missing)))
    sys.exit(0)
sys.stdout.write("OK %d.%d.%d %s\n" % (v[0], v[1], v[2], sys.executable or ""))'

PY_EXE=
PY_VER=
PY_WHY=
# try_python CMD: sets PY_EXE/PY_VER when usable, PY_WHY otherwise
try_python() {
    PY_WHY=
    tp_out=$("$1" -c "$PY_CHECK" 2>/dev/null) || { PY_WHY="$1: does not run"; return 1; }
    case $tp_out in
        OK\ *) ;;
        BAD\ *) PY_WHY="$1: ${tp_out#BAD }"; return 1 ;;
        *) PY_WHY="$1: unexpected output"; return 1 ;;
    esac
    tp_out=${tp_out#OK }
    PY_VER=${tp_out%% *}
    PY_EXE=${tp_out#* }
    [ "$PY_EXE" = "$tp_out" ] && PY_EXE=
    if [ -z "$PY_EXE" ]; then
        case $1 in
            /*) PY_EXE=$1 ;;
            *) PY_EXE=$(command -v "$1") ;;
        esac
    fi
    case $PY_EXE in
        /*) ;;
        *) PY_WHY="$1: cannot tell its absolute path"; return 1 ;;
    esac
    case $PY_EXE in
        *[!A-Za-z0-9_./+-]*) PY_WHY="$1: path $PY_EXE has characters unsafe for a #! line"; return 1 ;;
    esac
    return 0
}

find_python() {
    if [ -n "$PYTHON" ]; then
        try_python "$PYTHON" || die "--python $PYTHON is not usable: $PY_WHY"
    else
        fp_why=
        for fp_c in python3 python2 python /usr/bin/python; do
            case $fp_c in
                /*) [ -x "$fp_c" ] || continue ;;
                *) command -v "$fp_c" >/dev/null 2>&1 || continue ;;
            esac
            try_python "$fp_c" && break
            fp_why="$fp_why
    $PY_WHY"
            PY_EXE=
        done
        [ -n "$PY_EXE" ] || die "no usable Python (2.6+ or 3.6+ with ssl, json, sqlite3) found; tried python3, python2, python, /usr/bin/python:$fp_why
Use --python PATH."
    fi
    say "Python: $PY_EXE (version $PY_VER)"
}

# ---------------------------------------------------------------------------------- init system ---
upstart_is_pid1() {
    command -v initctl >/dev/null 2>&1 || return 1
    initctl version 2>/dev/null | grep -q upstart
}

detect_init() {
    if [ -d /run/systemd/system ]; then
        INIT=systemd
        INIT_WHY="systemd is running"
    elif upstart_is_pid1 && { [ -d /etc/rc.d/init.d ] || [ -d /etc/init.d ]; } && command -v chkconfig >/dev/null 2>&1; then
        # Oracle Linux 6 / OVM 3.4: Upstart 0.6.5 runs the SysV rc scripts. A SysV script works
        # with "service" and "chkconfig" like ovs-agent itself; --init upstart gives an Upstart job.
        INIT=sysv
        INIT_WHY="Upstart is PID 1 with SysV rc scripts and chkconfig (Oracle Linux 6); --init upstart for an Upstart job"
    elif upstart_is_pid1; then
        INIT=upstart
        INIT_WHY="Upstart is PID 1"
    elif [ -d /etc/init.d ] || [ -d /etc/rc.d/init.d ]; then
        INIT=sysv
        INIT_WHY="found /etc/init.d"
    else
        INIT=none
        INIT_WHY="no known init system found"
    fi
}

# Service control is only ever done on the real system (no --root), or on the staged SysV
# script with the test hook.
can_control() {
    [ -z "$ROOT" ] || [ "$MANAGE_STAGED" = 1 ]
}

sysv_ctl() {
    if [ -n "$ROOT" ]; then
        OVM_EXPORTER_ROOT=$ROOT sh "$ROOT$SYSV" "$@"
    elif command -v service >/dev/null 2>&1; then
        service "$NAME" "$@"
    else
        sh "$SYSV" "$@"
    fi
}

# running_as: prints the init type whose instance is running, if any
running_as() {
    can_control || return 1
    if [ -f "$ROOT$SYSV" ] && sysv_ctl status >/dev/null 2>&1; then
        echo sysv
        return 0
    fi
    [ -n "$ROOT" ] && return 1
    if [ -f "$UPSTART" ] && upstart_is_pid1 && initctl status "$NAME" 2>/dev/null | grep -q 'start/running'; then
        echo upstart
        return 0
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] && systemctl is-active --quiet "$NAME" 2>/dev/null; then
        echo systemd
        return 0
    fi
    return 1
}

svc_stop() {
    case $1 in
        sysv) sysv_ctl stop ;;
        upstart) initctl stop "$NAME" ;;
        systemd) systemctl stop "$NAME" ;;
    esac
}

svc_unregister() {
    [ -n "$ROOT" ] && return 0
    case $1 in
        sysv)
            if command -v chkconfig >/dev/null 2>&1; then
                chkconfig --del "$NAME" >/dev/null 2>&1
            elif command -v update-rc.d >/dev/null 2>&1; then
                update-rc.d -f "$NAME" remove >/dev/null 2>&1
            fi ;;
        systemd)
            systemctl disable "$NAME" >/dev/null 2>&1 ;;
    esac
    return 0
}

svc_file() {
    case $1 in
        sysv) echo "$SYSV" ;;
        upstart) echo "$UPSTART" ;;
        systemd) echo "$UNIT" ;;
    esac
}

# ------------------------------------------------------------------------------- host facts ---
host_name() {
    hn_v=$(hostname 2>/dev/null) || hn_v=
    [ -n "$hn_v" ] || hn_v=$(uname -n 2>/dev/null)
    case $hn_v in
        ''|*[!A-Za-z0-9.-]*|localhost|localhost.*) hn_v= ;;
    esac
    printf '%s\n' "$hn_v"
}

# Every IP address of the host, one per line (no link-local): hostname -I, else ip -o addr, else ifconfig.
host_ips() {
    hi_v=$(hostname -I 2>/dev/null) || hi_v=
    if [ -z "$hi_v" ]; then
        hi_v=$(ip -o addr show 2>/dev/null | awk '
            / scope link/ { next }
            { for (i = 1; i < NF; i++) if ($i == "inet" || $i == "inet6") { a = $(i + 1); sub(/\/.*/, "", a); print a } }')
    fi
    if [ -z "$hi_v" ]; then
        # net-tools: "inet addr:10.0.0.5  Bcast:..." / "inet6 addr: fe80::1/64 Scope:Link" (OL6),
        # "inet 10.0.0.5  netmask ..." / "inet6 fd00::2  prefixlen 64" (newer)
        hi_v=$( (ifconfig -a 2>/dev/null || /sbin/ifconfig -a 2>/dev/null) | awk '
            $1 == "inet" { a = $2; sub(/^addr:/, "", a); print a }
            $1 == "inet6" { a = $2; if (a == "addr:") a = $3; sub(/^addr:/, "", a); sub(/\/.*/, "", a)
                            if (tolower(a) ~ /^fe80/) next; print a }')
    fi
    for hi_a in $hi_v; do
        case $hi_a in
            ''|*%*|*[!0-9A-Fa-f:.]*) continue ;;
            [Ff][Ee]80:*) continue ;;
        esac
        printf '%s\n' "$hi_a"
    done
}

# ------------------------------------------------------------------------------ certificates ---
rand_hex() {
    od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

# make_certs DIR: CA (if absent) + server certificate signed by it
make_certs() {
    mc_dir=$1
    command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the TLS certificates (or put srv-pub.pem, srv-key.pem and ca-pub.pem into $ROOT$CONF_DIR first)"
    make_tmpdir
    mc_t=$TMPD/certs
    mkdir "$mc_t" || die "cannot create $mc_t"
    mc_host=$(host_name)
    mc_cn=${mc_host:-localhost}
    mc_short=
    case $mc_host in
        *.*) mc_short=${mc_host%%.*} ;;
    esac
    {
        echo "[ req ]"
        echo "distinguished_name = dn"
        echo "prompt = no"
        echo "[ dn ]"
        echo "O = Coriolis OVM exporter"
        printf 'CN = %s\n' "$(printf '%s' "$mc_cn" | cut -c1-64)"
        echo "[ v3_srv ]"
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature, keyEncipherment"
        echo "extendedKeyUsage = serverAuth"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid, issuer"
        echo "subjectAltName = @alt"
        echo "[ alt ]"
        mc_n=1
        for mc_d in "$mc_host" "$mc_short" localhost; do
            [ -n "$mc_d" ] || continue
            printf 'DNS.%d = %s\n' "$mc_n" "$mc_d"
            mc_n=$((mc_n + 1))
        done
        mc_n=1
        for mc_ip in $( (host_ips; echo 127.0.0.1; echo ::1) | awk '!seen[$0]++'); do
            printf 'IP.%d = %s\n' "$mc_n" "$mc_ip"
            mc_n=$((mc_n + 1))
        done
    } > "$mc_t/srv.cnf"
    {
        echo "[ req ]"
        echo "distinguished_name = dn"
        echo "prompt = no"
        echo "[ dn ]"
        echo "O = Coriolis OVM exporter"
        printf 'CN = %s\n' "$(printf 'coriolis-ovm-exporter CA %s' "$mc_host" | cut -c1-64)"
        echo "[ v3_ca ]"
        echo "basicConstraints = critical, CA:TRUE"
        echo "keyUsage = critical, keyCertSign, cRLSign"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid:always, issuer"
    } > "$mc_t/ca.cnf"

    if [ -f "$mc_dir/ca-pub.pem" ]; then
        cp "$mc_dir/ca-pub.pem" "$mc_t/ca-pub.pem" && cp "$mc_dir/ca-key.pem" "$mc_t/ca-key.pem" \
            || die "cannot read the existing CA in $mc_dir"
        mc_newca=0
    else
        openssl genrsa -out "$mc_t/ca-key.pem" 2048 >"$mc_t/log" 2>&1 \
            && openssl req -new -x509 -sha256 -days 7300 -config "$mc_t/ca.cnf" -extensions v3_ca \
                -set_serial "0x$(rand_hex 8)" -key "$mc_t/ca-key.pem" -out "$mc_t/ca-pub.pem" >>"$mc_t/log" 2>&1 \
            || die "openssl failed to make the CA certificate:
$(cat "$mc_t/log")"
        mc_newca=1
    fi
    openssl genrsa -out "$mc_t/srv-key.pem" 2048 >"$mc_t/log" 2>&1 \
        && openssl req -new -sha256 -config "$mc_t/srv.cnf" -key "$mc_t/srv-key.pem" -out "$mc_t/srv.csr" >>"$mc_t/log" 2>&1 \
        && openssl x509 -req -sha256 -days 3650 -in "$mc_t/srv.csr" -CA "$mc_t/ca-pub.pem" -CAkey "$mc_t/ca-key.pem" \
            -set_serial "0x$(rand_hex 8)" -extfile "$mc_t/srv.cnf" -extensions v3_srv -out "$mc_t/srv-pub.pem" >>"$mc_t/log" 2>&1 \
        || die "openssl failed to make the server certificate:
$(cat "$mc_t/log")"
    openssl verify -CAfile "$mc_t/ca-pub.pem" "$mc_t/srv-pub.pem" >"$mc_t/log" 2>&1 \
        || die "the new server certificate does not verify:
$(cat "$mc_t/log")"
    chmod 600 "$mc_t/ca-key.pem" "$mc_t/srv-key.pem"
    chmod 644 "$mc_t/ca-pub.pem" "$mc_t/srv-pub.pem"
    if [ "$mc_newca" = 1 ]; then
        mv -f "$mc_t/ca-key.pem" "$mc_dir/ca-key.pem" && mv -f "$mc_t/ca-pub.pem" "$mc_dir/ca-pub.pem" \
            || die "cannot write the CA into $mc_dir"
        say "  created   $CONF_DIR/ca-pub.pem, ca-key.pem (self-signed CA, 20 years)"
    fi
    mv -f "$mc_t/srv-key.pem" "$mc_dir/srv-key.pem" && mv -f "$mc_t/srv-pub.pem" "$mc_dir/srv-pub.pem" \
        || die "cannot write the server certificate into $mc_dir"
    mc_sans=$(grep -E '^(DNS|IP)\.' "$mc_t/srv.cnf" | sed 's/^[^=]*= //' | tr '\n' ' ')
    say "  created   $CONF_DIR/srv-pub.pem, srv-key.pem (10 years; names: $mc_sans)"
    rm -rf "$mc_t"
}

# certificates, when the config is new or refers to the default paths
setup_certs() {
    sc_d=$ROOT$CONF_DIR
    if [ -f "$ROOT$CONF" ] && ! grep -qF "\"$ROOT$CONF_DIR/srv-pub.pem\"" "$ROOT$CONF"; then
        say "  kept      TLS certificate paths of the existing config"
        return 0
    fi
    if [ -f "$sc_d/srv-pub.pem" ] && [ -f "$sc_d/srv-key.pem" ]; then
        say "  kept      $CONF_DIR/srv-pub.pem, srv-key.pem"
        [ -f "$sc_d/ca-pub.pem" ] && say "  kept      $CONF_DIR/ca-pub.pem"
        return 0
    fi
    if [ -f "$sc_d/srv-pub.pem" ] || [ -f "$sc_d/srv-key.pem" ]; then
        die "only one of $sc_d/srv-pub.pem and srv-key.pem exists; add the other or remove it to have a new pair made"
    fi
    if [ -f "$sc_d/ca-pub.pem" ] && [ ! -f "$sc_d/ca-key.pem" ]; then
        die "$sc_d/ca-pub.pem exists without ca-key.pem: cannot issue a server certificate; put srv-pub.pem and srv-key.pem signed by that CA into $sc_d"
    fi
    make_certs "$sc_d"
}

# ------------------------------------------------------------------------------------ config ---
# The secret printed in the Go service's README: a config that still has it is open to anyone.
PUBLISHED_SECRET=yoidthOcBauphFeykCotdidNorjAnAtGhonsabShegAtfexbavlyakPak4SletEd

# Rewrite the existing config with a sed expression; the old file is kept as CONF.SUFFIX.
migrate_config() {
    make_tmpdir
    sed -e "$1" "$ROOT$CONF" > "$TMPD/config.toml" || die "cannot write $TMPD/config.toml"
    cp -p "$ROOT$CONF" "$ROOT$CONF.$2" && chmod 600 "$ROOT$CONF.$2" \
        || die "cannot back up $ROOT$CONF"
    chmod 600 "$TMPD/config.toml" && mv -f "$TMPD/config.toml" "$ROOT$CONF" \
        || die "cannot write $ROOT$CONF"
}

# A config the Go service used: its published secret, and its BoltDB file where db_file points.
migrate_go_config() {
    [ -f "$ROOT$CONF" ] || return 0
    if grep -q "$PUBLISHED_SECRET" "$ROOT$CONF"; then
        mg_secret=$(rand_hex 48)
        [ "${#mg_secret}" -ge 96 ] || die "could not read random bytes from /dev/urandom"
        migrate_config "s|$PUBLISHED_SECRET|$mg_secret|g" published-secret
        warn "$CONF had the JWT secret published in the Go service README (anybody could forge tokens): replaced it with a random one; tokens issued before no longer work. The old file is $CONF.published-secret"
    fi
    mg_db=$(cfg_value "$ROOT$CONF" "" db_file)
    if [ -n "$mg_db" ] && [ -s "$mg_db" ] \
            && [ "$(dd if="$mg_db" bs=15 count=1 2>/dev/null)" != "SQLite format 3" ]; then
        mg_new="${mg_db%/*}/ovm_exporter.db"
        migrate_config "s|^\\([[:blank:]]*db_file[[:blank:]]*=[[:blank:]]*\\)\"$(sed_esc "$mg_db")\"|\\1\"$(sed_esc "$mg_new")\"|" go-db-file
        warn "$CONF: db_file $mg_db is not an SQLite database (the Go service's BoltDB): ovm_exporter keeps its state in $mg_new and leaves $mg_db untouched. Snapshots the Go service made stay in the repositories' CoriolisSnapshots folders; delete them through the Go service's API before switching, or by hand. The old config is $CONF.go-db-file"
    fi
}

setup_config() {
    migrate_go_config
    if [ -f "$ROOT$CONF" ]; then
        say "  kept      $CONF (config, JWT secret)"
        sc_port=$(cfg_value "$ROOT$CONF" api port)
        if [ -n "$PORT" ] && [ "$PORT" != "${sc_port:-5544}" ]; then
            warn "--port $PORT ignored: the existing $CONF uses port ${sc_port:-5544}; edit it to change"
        fi
        if [ -n "$BIND" ]; then
            sc_bind=$(cfg_value "$ROOT$CONF" api bind)
            [ "$BIND" = "${sc_bind:-0.0.0.0}" ] || warn "--bind $BIND ignored: the existing $CONF binds ${sc_bind:-0.0.0.0}; edit it to change"
        fi
        return 0
    fi
    [ -f "$SRC_EXAMPLE" ] || die "missing $SRC_EXAMPLE (it must be next to install.sh)"
    make_tmpdir
    sc_secret=$(rand_hex 48)
    [ "${#sc_secret}" -ge 96 ] || die "could not read random bytes from /dev/urandom"
    sed -e "s|@CONF_DIR@|$(sed_esc "$ROOT$CONF_DIR")|g" \
        -e "s|@LOG_DIR@|$(sed_esc "$ROOT$LOG_DIR")|g" \
        -e "s|@JWT_SECRET@|$sc_secret|g" \
        -e "s|@API_PORT@|${PORT:-5544}|g" \
        -e "s|@API_BIND@|$(sed_esc "${BIND:-0.0.0.0}")|g" \
        "$SRC_EXAMPLE" > "$TMPD/config.toml" || die "cannot write $TMPD/config.toml"
    if grep -q '@[A-Z_]*@' "$TMPD/config.toml"; then
        die "unfilled placeholder in $SRC_EXAMPLE: $(grep '@[A-Z_]*@' "$TMPD/config.toml" | head -n 1)"
    fi
    chmod 600 "$TMPD/config.toml"
    mv -f "$TMPD/config.toml" "$ROOT$CONF" || die "cannot write $ROOT$CONF"
    say "  created   $CONF (mode 0600, random JWT secret, port ${PORT:-5544})"
    CONFIG_NEW=1
}

# --------------------------------------------------------------------------- service files ---
sysv_script() {
    cat <<'EOF'
#!/bin/sh
#
# coriolis-ovm-exporter  Coriolis OVM exporter (ovm_exporter.py)
#
# chkconfig: 2345 99 01
# description: Coriolis OVM exporter: HTTPS API for snapshots and incremental \
#              exports of Oracle VM virtual machine disks.
# processname: coriolis-ovm-exporter
# pidfile: /var/run/coriolis-ovm-exporter.pid
# config: @CONF@
#
### BEGIN INIT INFO
# Provides:          coriolis-ovm-exporter
# Required-Start:    $local_fs $remote_fs $network
# Required-Stop:     $local_fs $remote_fs $network
# Should-Start:      ovs-agent
# Should-Stop:       ovs-agent
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Coriolis OVM exporter
# Description:       HTTPS API for snapshots and incremental exports of
#                    Oracle VM virtual machine disks (ovm_exporter.py).
### END INIT INFO
#
# Generated by install.sh. POSIX sh. Every path can be overridden from the environment or from
# /etc/sysconfig/coriolis-ovm-exporter:
#   OVM_EXPORTER_ROOT        prefix of every default path below (a staging root; tests)
#   OVM_EXPORTER_PYTHON      interpreter            (@PY@)
#   OVM_EXPORTER_SCRIPT      exporter script        (@BIN@)
#   OVM_EXPORTER_CONFIG      config file            (@CONF@)
#   OVM_EXPORTER_PIDFILE     pid file               (/var/run/coriolis-ovm-exporter.pid)
#   OVM_EXPORTER_OUTLOG      stdout/stderr log      (/var/log/coriolis-ovm-exporter.out)
#   OVM_EXPORTER_LOCKFILE    subsys lock file       (/var/lock/subsys/coriolis-ovm-exporter)
#   OVM_EXPORTER_START_WAIT  seconds start waits for the pid file (15)
#   OVM_EXPORTER_STOP_WAIT   seconds stop waits after TERM before KILL (30)

NAME=coriolis-ovm-exporter
ROOT=${OVM_EXPORTER_ROOT:-}
# shellcheck disable=SC1090
[ -r "$ROOT/etc/sysconfig/$NAME" ] && . "$ROOT/etc/sysconfig/$NAME"
PY=${OVM_EXPORTER_PYTHON:-@PY@}
SCRIPT=${OVM_EXPORTER_SCRIPT:-$ROOT@BIN@}
CONF=${OVM_EXPORTER_CONFIG:-$ROOT@CONF@}
PIDFILE=${OVM_EXPORTER_PIDFILE:-$ROOT/var/run/$NAME.pid}
OUTLOG=${OVM_EXPORTER_OUTLOG:-$ROOT/var/log/$NAME.out}
LOCKFILE=${OVM_EXPORTER_LOCKFILE:-$ROOT/var/lock/subsys/$NAME}
START_WAIT=${OVM_EXPORTER_START_WAIT:-15}
STOP_WAIT=${OVM_EXPORTER_STOP_WAIT:-30}

# fractional sleep where available (coreutils, busybox), whole seconds otherwise
if sleep 0.1 2>/dev/null; then
    TICK=0.2
    TPS=5
else
    TICK=1
    TPS=1
fi

pid=
read_pid() {
    pid=
    [ -f "$PIDFILE" ] || return 1
    pid=$(tr -cd '0-9' < "$PIDFILE" 2>/dev/null)
    [ -n "$pid" ]
}

# alive PID: the process exists and is an exporter "serve" (not a zombie, not a reused pid)
alive() {
    kill -s 0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/cmdline" ]; then
        tr '\000' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q ' serve ' || return 1
    fi
    return 0
}

lock_subsys() {
    [ -d "${LOCKFILE%/*}" ] && : > "$LOCKFILE"
    return 0
}

start() {
    if read_pid && alive "$pid"; then
        echo "$NAME is already running (pid $pid)"
        return 0
    fi
    if [ ! -f "$SCRIPT" ]; then
        echo "$NAME: $SCRIPT is missing" >&2
        return 5
    fi
    if [ ! -r "$CONF" ]; then
        echo "$NAME: cannot read $CONF" >&2
        return 6
    fi
    if ! out=$("$PY" "$SCRIPT" check-config --config "$CONF" 2>&1); then
        echo "$NAME: configuration check failed:" >&2
        printf '%s\n' "$out" >&2
        return 6
    fi
    rm -f "$PIDFILE"
    mkdir -p "${PIDFILE%/*}" "${OUTLOG%/*}" 2>/dev/null
    echo "$(date '+%Y-%m-%d %H:%M:%S') $NAME: starting $PY $SCRIPT serve --config $CONF" >> "$OUTLOG"
    nohup "$PY" "$SCRIPT" serve --config "$CONF" --pid-file "$PIDFILE" >>"$OUTLOG" 2>&1 </dev/null &
    child=$!
    i=0
    limit=$((START_WAIT * TPS))
    while [ "$i" -lt "$limit" ]; do
        if read_pid && alive "$pid"; then
            # still up a moment later?
            sleep "$TICK"
            if alive "$pid"; then
                lock_subsys
                echo "Starting $NAME: OK (pid $pid)"
                return 0
            fi
            break
        fi
        kill -s 0 "$child" 2>/dev/null || break
        sleep "$TICK"
        i=$((i + 1))
    done
    if kill -s 0 "$child" 2>/dev/null && ! read_pid; then
        echo "$NAME: no pid file $PIDFILE after ${START_WAIT}s; stopping it" >&2
        kill -s TERM "$child" 2>/dev/null
    fi
    echo "Starting $NAME: FAILED; last lines of $OUTLOG:" >&2
    tail -n 15 "$OUTLOG" >&2
    return 1
}

stop() {
    if ! read_pid; then
        rm -f "$LOCKFILE"
        echo "$NAME is not running"
        return 0
    fi
    if ! alive "$pid"; then
        rm -f "$PIDFILE" "$LOCKFILE"
        echo "$NAME is not running (removed stale pid file)"
        return 0
    fi
    kill -s TERM "$pid" 2>/dev/null
    i=0
    limit=$((STOP_WAIT * TPS))
    while alive "$pid" && [ "$i" -lt "$limit" ]; do
        sleep "$TICK"
        i=$((i + 1))
    done
    if alive "$pid"; then
        echo "$NAME (pid $pid) did not stop within ${STOP_WAIT}s of TERM; sending KILL" >&2
        kill -s KILL "$pid" 2>/dev/null
        i=0
        while alive "$pid" && [ "$i" -lt $((5 * TPS)) ]; do
            sleep "$TICK"
            i=$((i + 1))
        done
        if alive "$pid"; then
            echo "Stopping $NAME: FAILED (pid $pid still there)" >&2
            return 1
        fi
    fi
    rm -f "$PIDFILE" "$LOCKFILE"
    echo "Stopping $NAME: OK"
    return 0
}

# LSB: 0 running, 1 dead with pid file, 2 dead with lock file, 3 stopped
status() {
    if [ -f "$PIDFILE" ]; then
        if read_pid && alive "$pid"; then
            echo "$NAME (pid $pid) is running..."
            return 0
        fi
        echo "$NAME is dead but pid file $PIDFILE exists"
        return 1
    fi
    if [ -f "$LOCKFILE" ]; then
        echo "$NAME is dead but subsys locked"
        return 2
    fi
    echo "$NAME is stopped"
    return 3
}

case $1 in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart|force-reload)
        stop
        start ;;
    condrestart|try-restart)
        if status >/dev/null 2>&1; then
            stop
            start
        fi ;;
    reload)
        echo "$NAME: reload is not supported; use restart" >&2
        exit 3 ;;
    *)
        echo "Usage: $0 {start|stop|status|restart|condrestart|try-restart|force-reload}" >&2
        exit 2 ;;
esac
EOF
}

upstart_job() {
    cat <<'EOF'
# coriolis-ovm-exporter - Coriolis OVM exporter (ovm_exporter.py)
#
# Generated by install.sh. Upstart 0.6.5 (Oracle Linux 6) stanzas only.
# initctl start|stop|status coriolis-ovm-exporter
description "Coriolis OVM exporter"
start on runlevel [2345]
stop on runlevel [016]
respawn
respawn limit 10 60
kill timeout 30
exec @PY@ @BIN@ serve --config @CONF@ >>@OUTLOG@ 2>&1
EOF
}

systemd_unit() {
    cat <<'EOF'
# Generated by install.sh
[Unit]
Description=Coriolis OVM exporter (ovm_exporter.py)
After=network-online.target remote-fs.target ovs-agent.service
Wants=network-online.target

[Service]
Type=simple
ExecStart=@PY@ @BIN@ serve --config @CONF@
Restart=on-failure
RestartSec=5s
TimeoutStopSec=30s
UMask=0077

[Install]
WantedBy=multi-user.target
EOF
}

fill_template() {
    sed -e "s|@PY@|$(sed_esc "$PY_EXE")|g" \
        -e "s|@BIN@|$(sed_esc "$BIN")|g" \
        -e "s|@CONF@|$(sed_esc "$CONF")|g" \
        -e "s|@OUTLOG@|$(sed_esc "$OUTLOG")|g"
}

# Move a service file of another init type (e.g. the Go service's Upstart job) out of the way.
retire_other_services() {
    for ro_t in sysv upstart systemd; do
        [ "$ro_t" = "$INIT" ] && continue
        ro_f=$(svc_file "$ro_t")
        [ -f "$ROOT$ro_f" ] || continue
        if [ -z "$ROOT" ] && [ "$WAS_RUNNING" = "$ro_t" ]; then
            svc_stop "$ro_t" >/dev/null 2>&1 || warn "could not stop the $ro_t service"
        fi
        svc_unregister "$ro_t"
        ro_save=$ROOT$CONF_DIR/retired-$ro_t-${ro_f##*/}
        mv -f "$ROOT$ro_f" "$ro_save" || die "cannot move $ROOT$ro_f away"
        say "  retired   $ro_f (other init system; saved as $CONF_DIR/${ro_save##*/})"
    done
}

install_service() {
    SERVICE_CHANGED=0
    [ "$INIT" = none ] && return 0
    make_tmpdir
    case $INIT in
        sysv) sysv_script | fill_template > "$TMPD/svc"; is_mode=755 ;;
        upstart) upstart_job | fill_template > "$TMPD/svc"; is_mode=644 ;;
        systemd) systemd_unit | fill_template > "$TMPD/svc"; is_mode=644 ;;
    esac
    is_f=$(svc_file "$INIT")
    mkdir_sys "$ROOT${is_f%/*}"
    put_file "$TMPD/svc" "$ROOT$is_f" "$is_mode" "$is_f" && SERVICE_CHANGED=1
    [ -n "$ROOT" ] && return 0
    case $INIT in
        sysv)
            if command -v chkconfig >/dev/null 2>&1; then
                chkconfig --add "$NAME" && chkconfig "$NAME" on || die "chkconfig --add $NAME failed"
                say "  enabled   chkconfig $NAME on (runlevels 2345)"
            elif command -v update-rc.d >/dev/null 2>&1; then
                update-rc.d "$NAME" defaults >/dev/null || die "update-rc.d $NAME defaults failed"
                say "  enabled   update-rc.d $NAME defaults"
            else
                warn "neither chkconfig nor update-rc.d found: link $SYSV into your rc?.d directories to start it at boot"
            fi ;;
        upstart)
            initctl reload-configuration >/dev/null 2>&1
            say "  enabled   Upstart job (start on runlevel [2345])" ;;
        systemd)
            systemctl daemon-reload || die "systemctl daemon-reload failed"
            systemctl enable "$NAME" >/dev/null 2>&1 || die "systemctl enable $NAME failed"
            say "  enabled   systemctl enable $NAME" ;;
    esac
}

svc_start_or_restart() {
    case $INIT in
        sysv)
            if [ -n "$WAS_RUNNING" ]; then sysv_ctl restart; else sysv_ctl start; fi ;;
        upstart)
            [ -n "$WAS_RUNNING" ] && initctl stop "$NAME" >/dev/null 2>&1
            initctl start "$NAME" || return 1
            sleep 2
            initctl status "$NAME" | grep -q 'start/running' ;;
        systemd)
            systemctl restart "$NAME" || return 1
            sleep 2
            systemctl is-active --quiet "$NAME" ;;
    esac
}

# status_cmd [VERB]: the command an admin types for this init system (VERB default: status)
status_cmd() {
    sc_verb=${1:-status}
    case $INIT in
        sysv) echo "service $NAME $sc_verb" ;;
        upstart) echo "initctl $sc_verb $NAME" ;;
        systemd) echo "systemctl $sc_verb $NAME" ;;
        *) echo "" ;;
    esac
}

# ----------------------------------------------------------------------------------- firewall ---
firewall() {
    fw_port=$1
    [ -n "$ROOT" ] && return 0
    if command -v iptables >/dev/null 2>&1 && command -v service >/dev/null 2>&1 \
        && [ -f /etc/init.d/iptables ] && service iptables status >/dev/null 2>&1; then
        if iptables -n -L INPUT 2>/dev/null | grep -Eq "dpt:$fw_port( |\$)"; then
            say "Firewall: iptables is active and already has a rule for port $fw_port."
        elif [ "$OPEN_FW" = 1 ]; then
            if iptables -I INPUT -p tcp -m state --state NEW -m tcp --dport "$fw_port" -j ACCEPT \
                && service iptables save >/dev/null; then
                say "Firewall: added iptables rule ACCEPT tcp dport $fw_port and saved it (service iptables save)."
            else
                warn "could not add the iptables rule for port $fw_port"
            fi
        else
            say "Firewall: iptables is active. To let clients reach port $fw_port:"
            say "    iptables -I INPUT -p tcp -m state --state NEW -m tcp --dport $fw_port -j ACCEPT && service iptables save"
            say "  (or re-run with --open-firewall)"
        fi
    elif command -v firewall-cmd >/dev/null 2>&1 && firewall-cmd --state >/dev/null 2>&1; then
        if [ "$OPEN_FW" = 1 ]; then
            firewall-cmd --permanent --add-port="$fw_port/tcp" >/dev/null && firewall-cmd --reload >/dev/null \
                && say "Firewall: opened $fw_port/tcp in firewalld." || warn "could not open $fw_port/tcp in firewalld"
        else
            say "Firewall: firewalld is running. To let clients reach port $fw_port:"
            say "    firewall-cmd --permanent --add-port=$fw_port/tcp && firewall-cmd --reload"
            say "  (or re-run with --open-firewall)"
        fi
    fi
}

# ---------------------------------------------------------------------------------- uninstall ---
do_uninstall() {
    if [ "$PURGE" = 1 ]; then say "Purging $NAME${ROOT:+ under $ROOT}"; else say "Uninstalling $NAME${ROOT:+ under $ROOT}"; fi
    if can_control; then
        for un_t in sysv upstart systemd; do
            if [ "$(running_as)" = "$un_t" ]; then
                svc_stop "$un_t" >/dev/null 2>&1 || warn "could not stop the $un_t service"
                say "  stopped   $un_t service"
            fi
        done
    else
        say "  (--root: no service stopped)"
    fi
    for un_t in sysv upstart systemd; do
        un_f=$(svc_file "$un_t")
        [ -f "$ROOT$un_f" ] || continue
        svc_unregister "$un_t"
        rm -f "$ROOT$un_f" || die "cannot remove $ROOT$un_f"
        say "  removed   $un_f"
    done
    if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1
    fi
    if [ -f "$ROOT$BIN" ]; then
        rm -f "$ROOT$BIN" || die "cannot remove $ROOT$BIN"
        say "  removed   $BIN"
    fi
    rm -f "$ROOT$PIDFILE" "$ROOT$LOCKFILE"
    un_db=
    [ -f "$ROOT$CONF" ] && un_db=$(cfg_value "$ROOT$CONF" "" db_file)
    if [ "$PURGE" = 1 ]; then
        if [ -d "$ROOT$CONF_DIR" ]; then
            rm -rf "$ROOT$CONF_DIR" || die "cannot remove $ROOT$CONF_DIR"
            say "  removed   $CONF_DIR (config, certificates, database)"
        fi
        for un_l in "$ROOT$OUTLOG" "$ROOT$LOG_DIR/$NAME.log"*; do
            [ -f "$un_l" ] && rm -f "$un_l" && say "  removed   ${un_l#"$ROOT"}"
        done
        case $un_db in
            ''|"$ROOT$CONF_DIR"/*) ;;
            *) [ -f "$un_db" ] && say "  kept      $un_db (database outside $CONF_DIR; remove it by hand)" ;;
        esac
    else
        [ -d "$ROOT$CONF_DIR" ] && say "  kept      $CONF_DIR (config, certificates${un_db:+, database $un_db}); --purge removes it"
    fi
    say "  note: $SNAPSHOTS_NOTE"
    say "Done."
}

# ------------------------------------------------------------------------------------ install ---
do_install() {
    [ -f "$SRC_SCRIPT" ] || die "missing $SRC_SCRIPT (run install.sh from the directory holding ovm_exporter.py)"
    [ -f "$SRC_EXAMPLE" ] || die "missing $SRC_EXAMPLE (it must be next to install.sh)"
    say "Installing $NAME${ROOT:+ under staging root $ROOT}"
    find_python
    if [ "$INIT" = auto ]; then
        detect_init
        say "Init system: $INIT ($INIT_WHY)"
    else
        say "Init system: $INIT (--init)"
    fi
    [ -n "$ROOT" ] && mkdir_sys "$ROOT"

    # build the new script first and make sure it runs with the chosen Python
    make_tmpdir
    { printf '#!%s\n' "$PY_EXE"; awk 'NR == 1 && /^#!/ { next } { print }' "$SRC_SCRIPT"; } > "$TMPD/script" \
        || die "cannot prepare the script"
    chmod 755 "$TMPD/script"
    NEW_VERSION=$("$PY_EXE" "$TMPD/script" --version 2>&1) \
        || die "ovm_exporter.py does not run with $PY_EXE:
$NEW_VERSION"
    say "New script: $NEW_VERSION"

    WAS_RUNNING=$(running_as)
    [ -n "$WAS_RUNNING" ] && say "Service is running ($WAS_RUNNING)"

    # configuration directory, certificates, config
    CONFIG_NEW=0
    if [ -d "$ROOT$CONF_DIR" ]; then
        cd_mode=$(ls -ld "$ROOT$CONF_DIR" | cut -c5-10)
        [ "$cd_mode" = "------" ] || warn "$CONF_DIR is readable by others (ls -ld: $(ls -ld "$ROOT$CONF_DIR" | cut -c1-10)); consider chmod 700 $CONF_DIR"
        say "  kept      $CONF_DIR/"
    else
        [ -n "$ROOT" ] && mkdir_sys "$ROOT/etc"
        mkdir -p "$ROOT$CONF_DIR" && chmod 700 "$ROOT$CONF_DIR" || die "cannot create $ROOT$CONF_DIR"
        say "  created   $CONF_DIR/ (mode 0700)"
    fi
    mkdir_sys "$ROOT$LOG_DIR"
    [ -n "$ROOT" ] && mkdir_sys "$ROOT${PIDFILE%/*}"
    setup_certs
    setup_config
    [ -f "$ROOT$CONF_DIR/exporter.db" ] && say "  kept      $CONF_DIR/exporter.db (database)"

    ck_out=$("$PY_EXE" "$TMPD/script" check-config --config "$ROOT$CONF" 2>&1) \
        || die "the new script rejects $ROOT$CONF (nothing was replaced):
$ck_out"
    say "  checked   $CONF (check-config OK)"

    # the script: replaced in place (also the Go binary of the same name)
    mkdir_sys "$ROOT$BIN_DIR"
    SCRIPT_CHANGED=0
    if [ -f "$ROOT$BIN" ] && ! cmp -s "$TMPD/script" "$ROOT$BIN"; then
        if [ "$(dd if="$ROOT$BIN" bs=2 count=1 2>/dev/null)" != "#!" ]; then
            cp -p "$ROOT$BIN" "$ROOT$CONF_DIR/$NAME.previous-binary" \
                && say "  saved     previous $BIN (not a script; the Go service?) as $CONF_DIR/$NAME.previous-binary"
            OLD_VERSION="previous binary"
        else
            OLD_VERSION=$("$PY_EXE" "$ROOT$BIN" --version 2>/dev/null) || OLD_VERSION="unknown version"
        fi
        cp "$TMPD/script" "$ROOT$BIN.new.$$" && chmod 755 "$ROOT$BIN.new.$$" && mv -f "$ROOT$BIN.new.$$" "$ROOT$BIN" \
            || die "cannot replace $ROOT$BIN"
        say "  upgraded  $BIN ($OLD_VERSION -> $NEW_VERSION)"
        SCRIPT_CHANGED=1
    elif [ -f "$ROOT$BIN" ]; then
        say "  kept      $BIN (unchanged, $NEW_VERSION)"
    else
        cp "$TMPD/script" "$ROOT$BIN.new.$$" && chmod 755 "$ROOT$BIN.new.$$" && mv -f "$ROOT$BIN.new.$$" "$ROOT$BIN" \
            || die "cannot write $ROOT$BIN"
        say "  installed $BIN (#!$PY_EXE)"
        SCRIPT_CHANGED=1
    fi

    # service
    if [ "$INIT" != none ]; then
        retire_other_services
    fi
    install_service

    STARTED=0
    if [ "$INIT" = none ]; then
        say "Service: none installed (--init none / no init system)."
    elif [ "$NO_START" = 1 ]; then
        if [ -n "$WAS_RUNNING" ] && [ "$SCRIPT_CHANGED" = 1 ]; then
            say "Service: --no-start; it still runs the old code; restart it: $(status_cmd restart)"
        else
            say "Service: not started (--no-start)."
        fi
    elif ! can_control; then
        say "Service: not started (--root)."
    elif [ "$INIT" != sysv ] && [ -n "$ROOT" ]; then
        say "Service: not started (--root)."
    elif [ -n "$WAS_RUNNING" ] && [ "$WAS_RUNNING" = "$INIT" ] && [ "$SCRIPT_CHANGED" = 0 ] && [ "$SERVICE_CHANGED" = 0 ]; then
        say "Service: running, nothing changed: left alone."
        STARTED=1
    else
        if svc_start_or_restart; then
            if [ -n "$WAS_RUNNING" ]; then say "Service: restarted."; else say "Service: started."; fi
            STARTED=1
        else
            die "the service did not start; see $(status_cmd), $OUTLOG and the log_file in $CONF"
        fi
    fi

    eff_port=$(cfg_value "$ROOT$CONF" api port)
    eff_port=${eff_port:-5544}
    eff_bind=$(cfg_value "$ROOT$CONF" api bind)
    case $eff_bind in
        ''|0.0.0.0|::|'[::]') eff_host=$(host_ips | grep -v -e '^127\.' -e ':' | head -n 1)
            [ -n "$eff_host" ] || eff_host=$(host_name)
            [ -n "$eff_host" ] || eff_host=localhost ;;
        *) eff_host=$eff_bind ;;
    esac
    firewall "$eff_port"

    say ""
    say "Done. Next steps:"
    [ "$CONFIG_NEW" = 1 ] && say "  - Review $CONF (optional: ovm_endpoint, ovm_ca_certificate, repositories)."
    if [ -n "$ROOT" ]; then
        say "  - Staging tree under $ROOT; run its init script in place with:"
        say "      OVM_EXPORTER_ROOT=$ROOT sh $ROOT$SYSV start|status|stop"
    elif [ "$INIT" = none ]; then
        say "  - Run it: $PY_EXE $BIN serve --config $CONF"
    elif [ "$STARTED" = 0 ]; then
        case $INIT in
            sysv) say "  - Start it: service $NAME start" ;;
            upstart) say "  - Start it: initctl start $NAME" ;;
            systemd) say "  - Start it: systemctl start $NAME" ;;
        esac
    else
        say "  - Status: $(status_cmd)"
    fi
    say "  - Check the config: $PY_EXE $ROOT$BIN check-config --config $ROOT$CONF"
    say "  - Log in with OVM Manager credentials (clients that verify TLS need $CONF_DIR/ca-pub.pem):"
    say "      curl -sk -X POST -d '{\"username\": \"admin\", \"password\": \"...\"}' https://$eff_host:$eff_port/api/v1/auth/login"
    say "  - Uninstall: sh install.sh --uninstall (keeps $CONF_DIR); --purge also removes it."
}

if [ "$ACTION" = uninstall ]; then
    do_uninstall
else
    do_install
fi
exit 0
