#!/bin/bash
# .ci/ocfs2-guest.sh - run pytest inside a throw-away qemu guest that has real OCFS2 volumes.
#
# The running kernel here has no OCFS2, so this boots Debian's own kernel (the one that
# `linux-image-amd64` depends on, unpacked into a cache, nothing installed into /boot) under qemu
# with a tiny busybox initramfs. The host makes fresh OCFS2 volumes on sparse images (mkfs.ocfs2
# works on plain files); the guest mounts them, mounts the host's "/" read-only over virtio-9p,
# chroots into it and runs the host's own python3 + pytest on the repo at the same path. Output and exit code come back through a second,
# writable 9p share.
#
# Usage:  .ci/ocfs2-guest.sh [pytest args...]      (default: test_ovm_exporter.py -k ocfs2 -v)
#   pytest args are resolved relative to the repo root (or give absolute paths).
#   Exit status: the guest pytest's exit status; 124 on time-out; 125 if the guest could not run
#   the tests; 2 on host-side set-up errors.
#
# Environment (all optional):
#   PYTHON              interpreter to run in the guest (default: python3 on PATH); resolved on the
#                       host to sys.executable (pyenv shims are bash scripts); must import pytest
#   OCFS2_TIMEOUT       seconds before a hanging guest is killed (default 900)
#   OCFS2_MEM / OCFS2_SMP    guest RAM in MiB (default 2048) / vCPUs (default 2)
#   OCFS2_ACCEL         auto (default) | tcg | kvm
#   OCFS2_KERNEL_IMAGE  auto (default: vmlinux via PVH if extractable, else bzImage) | vmlinux | bzimage
#   OCFS2_KERNEL_PKG    kernel package to use (default: what linux-image-amd64 depends on)
#   OCFS2_DISK_SIZE     size of the two big volumes (default 2G); OCFS2_SMALL_SIZE (default 128M)
#   OCFS2_EXTRA_MODULES extra kernel modules for the guest, space separated (e.g. "loop xfs")
#   OCFS2_CACHE_DIR     cache for kernel + initramfs (default /var/cache/ovm-exporter-ci)
#   OCFS2_OUT_DIR       if set, files the guest wrote to $OVM_EXPORTER_GUEST_OUT are copied here
#   OCFS2_QEMU_BIOS     firmware for -bios (default: qemu's SeaBIOS; /usr/share/qemu/qboot.rom works too)
#   OCFS2_KEEP=1        keep the run directory (console log, disk images) for inspection
#   OCFS2_VERBOSE=1     always print the guest console log and the guest set-up log
#   OCFS2_GUEST_PRE     debugging: a bash command run in the guest (chroot, cwd = repo) after the
#                       volumes are mounted and before pytest; output goes to the set-up log
#   OVM_EXPORTER_*, PYTEST_ADDOPTS are passed through to the guest's pytest.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ME=ocfs2-guest
T_BEGIN=$(date +%s.%N)

log() { printf '%s: %s\n' "$ME" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "must run as root (qemu, apt-get, cache in /var/cache)"

TIMEOUT=${OCFS2_TIMEOUT:-900}
MEM=${OCFS2_MEM:-2048}
SMP=${OCFS2_SMP:-2}
ACCEL=${OCFS2_ACCEL:-auto}
KIMAGE=${OCFS2_KERNEL_IMAGE:-auto}
DISK_SIZE=${OCFS2_DISK_SIZE:-2G}
SMALL_SIZE=${OCFS2_SMALL_SIZE:-128M}
CACHE=${OCFS2_CACHE_DIR:-/var/cache/ovm-exporter-ci}
# Bump when the initramfs layout or /init changes in a way the hash below would not notice.
BUILD_VERSION=3

if [ $# -eq 0 ]; then
    set -- test_ovm_exporter.py -k ocfs2 -v
fi
PYTEST_ARGS=("$@")

# ----------------------------------------------------------------------------- host packages ---
apt_install() {
    log "installing: $*"
    local i
    for i in 1 2; do
        if DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 install -y \
                --no-install-recommends "$@" >/dev/null; then
            return 0
        fi
        [ $i = 1 ] && apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null || true
    done
    die "apt-get install $* failed"
}

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mkfs.ocfs2 >/dev/null || need+=(ocfs2-tools)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v gzip >/dev/null || need+=(gzip)
command -v flock >/dev/null || need+=(util-linux)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing after installing busybox-static"
# busybox-static's binary must not need a dynamic loader (it runs before anything is mounted)
if head -c 4096 "$BUSYBOX" | grep -aq 'ld-linux'; then die "$BUSYBOX is not static"; fi

# ------------------------------------------------------------------------------- interpreter ---
PYTHON=${PYTHON:-python3}
PY=$("$PYTHON" -c 'import sys; print(sys.executable)' 2>/dev/null) ||
    die "cannot run PYTHON=$PYTHON"
case "$PY" in /*) ;; *) die "interpreter path not absolute: '$PY'";; esac
if ! PYTEST_VERSION=$("$PY" -m pytest --version 2>&1); then
    die "pytest is not importable by $PY ($PYTEST_VERSION); install it or set PYTHON to a venv's python"
fi
# These places are covered by fresh tmpfs/devtmpfs/proc in the guest, so anything there is hidden.
for p in "$REPO" "$PY"; do
    case "$p/" in
        /tmp/*|/var/tmp/*|/run/*|/mnt/*|/dev/*|/proc/*|/sys/*)
            die "$p is under a directory the guest replaces (/tmp /var/tmp /run /mnt /dev /proc /sys)";;
    esac
done

# ---------------------------------------------------------------------------- cache: kernel ---
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
T_PREP=$(date +%s.%N)

kernel_pkg_from_apt() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
KPKG=${OCFS2_KERNEL_PKG:-}
if [ -z "$KPKG" ]; then
    KPKG=$(kernel_pkg_from_apt)
    if [ -z "$KPKG" ]; then
        apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null 2>&1 || true
        KPKG=$(kernel_pkg_from_apt)
    fi
fi
KVERSION=
if [ -n "$KPKG" ]; then
    KVERSION=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
fi
if [ -z "$KPKG" ] || [ -z "$KVERSION" ]; then
    # Offline and nothing known to apt: fall back to the newest kernel already in the cache.
    KDIR=$(ls -d "$CACHE"/kernel/*/ 2>/dev/null | sort -V | tail -n 1)
    [ -n "$KDIR" ] || die "cannot find the kernel package linux-image-amd64 depends on (apt-cache)"
    KDIR=${KDIR%/}
    log "apt does not know the kernel package; using cached $(basename "$KDIR")"
else
    KDIR="$CACHE/kernel/${KPKG}_${KVERSION}"
fi
if [ ! -e "$KDIR/.complete" ]; then
    log "downloading $KPKG $KVERSION"
    rm -rf "$KDIR" "$KDIR.tmp" "$CACHE/dl"
    mkdir -p "$CACHE/dl" "$KDIR.tmp"
    (cd "$CACHE/dl" && apt-get -q -o APT::Sandbox::User=root download "$KPKG=$KVERSION" >/dev/null) ||
        die "apt-get download $KPKG=$KVERSION failed"
    dpkg-deb -x "$CACHE"/dl/*.deb "$KDIR.tmp"
    rm -rf "$CACHE/dl"
    # keep only the newest kernel in the cache
    for old in "$CACHE"/kernel/*; do
        case "$old" in "$KDIR"|"$KDIR.tmp") ;; *) rm -rf "$old";; esac
    done
    mv "$KDIR.tmp" "$KDIR"
    touch "$KDIR/.complete"
fi
KREL=$(ls "$KDIR/lib/modules" | head -n 1)
MODDIR="$KDIR/lib/modules/$KREL"
VMLINUZ="$KDIR/boot/vmlinuz-$KREL"
[ -f "$VMLINUZ" ] && [ -d "$MODDIR" ] || die "unexpected layout in $KDIR"

# Uncompressed vmlinux boots through PVH (qemu loads the ELF and jumps in directly), which skips
# the in-guest decompression: noticeably faster under software emulation.
extract_vmlinux() {
    local z=$1 out=$2 ss off len pm
    ss=$(od -An -tu1 -j $((0x1f1)) -N1 "$z" | tr -d ' ')
    [ "$ss" = 0 ] && ss=4
    read -r off len < <(od -An -tu4 -j $((0x248)) -N8 "$z")
    pm=$(( (ss + 1) * 512 ))
    local cat
    case "$(tail -c +$((pm + off + 1)) "$z" | head -c 4 | od -An -tx1 | tr -d ' \n')" in
        fd377a58) cat="xz -dc --single-stream";;
        1f8b08*)  cat="gzip -dc";;
        28b52ffd) command -v zstd >/dev/null || apt_install zstd; cat="zstd -dcq";;
        *) return 1;;
    esac
    tail -c +$((pm + off + 1)) "$z" | head -c "$len" | $cat > "$out.tmp" 2>/dev/null || true
    [ "$(head -c 4 "$out.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] || { rm -f "$out.tmp"; return 1; }
    # qemu boots an ELF kernel only through PVH: needs the XEN_ELFNOTE_PHYS32_ENTRY (18) note
    LC_ALL=C grep -q -aP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$out.tmp" ||
        { rm -f "$out.tmp"; return 1; }
    mv "$out.tmp" "$out"
}
KERNEL=$VMLINUZ
if [ "$KIMAGE" != bzimage ]; then
    if [ ! -e "$KDIR/vmlinux" ] && [ ! -e "$KDIR/.no-vmlinux" ]; then
        extract_vmlinux "$VMLINUZ" "$KDIR/vmlinux" || touch "$KDIR/.no-vmlinux"
    fi
    if [ -e "$KDIR/vmlinux" ]; then
        KERNEL="$KDIR/vmlinux"
    elif [ "$KIMAGE" = vmlinux ]; then
        die "could not extract vmlinux from $VMLINUZ"
    fi
fi

# ------------------------------------------------------------------------- cache: initramfs ---
# /init runs under busybox; it sets up the guest, then runs /run/ovm-ci/inner.sh (written per run
# into the results share, see below) with the host's bash inside the chroot.
read -r -d '' INIT_SCRIPT <<'INIT_EOF' || true
#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /host /results
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() { echo "ovm-ci-init: $*" > /dev/console; }
die() {
    say "FATAL: $*"
    [ -d /results/ok ] && echo "$*" >> /results/guest-error
    sync
    reboot -f
    sleep 5
    echo b > /proc/sysrq-trigger
}
T_INIT=$(cut -d' ' -f1 /proc/uptime)
say "init started at uptime $T_INIT"
while read -r m; do
    insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done < /lib/modules/load-order
ip link set lo up || ifconfig lo 127.0.0.1 up || die "cannot bring up lo"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /results || die "cannot mount results share"
mkdir -p /results/ok
echo "$T_INIT $(cut -d' ' -f1 /proc/uptime)" > /results/booted
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /host ||
    die "cannot mount host root"
R=/host
mount -t proc proc $R/proc || die "proc in chroot"
mount -t sysfs sysfs $R/sys || die "sys in chroot"
mount -o bind /dev $R/dev || die "dev in chroot"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts || die "devpts in chroot"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || die "shm in chroot"
for d in tmp var/tmp; do
    mount -t tmpfs -o mode=1777,size=50% tmpfs $R/$d || die "tmpfs on /$d"
done
for d in run mnt; do
    mount -t tmpfs -o mode=0755,size=64m tmpfs $R/$d || die "tmpfs on /$d"
done
mkdir -p $R/run/ovm-ci $R/run/lock
mount -o bind /results $R/run/ovm-ci || die "bind results"
say "chroot at uptime $(cut -d' ' -f1 /proc/uptime)"
chroot $R /bin/bash /run/ovm-ci/inner.sh > /results/inner.log 2>&1
echo $? > /results/inner.rc
say "inner script ended with $(cat /results/inner.rc) at uptime $(cut -d' ' -f1 /proc/uptime)"
sync
umount $R/run/ovm-ci /results 2>/dev/null
sync
reboot -f
sleep 5
echo b > /proc/sysrq-trigger
INIT_EOF

MODULES="virtio_pci virtio_blk virtio_rng 9p 9pnet_virtio configfs jbd2 quota_tree \
ocfs2_stackglue ocfs2_nodemanager ocfs2 crc32c_generic ${OCFS2_EXTRA_MODULES:-}"

is_builtin() {
    grep -q -E "/${1//_/[-_]}\.ko$" "$MODDIR/modules.builtin" 2>/dev/null
}

IRD_HASH=$( { echo "$BUILD_VERSION $KDIR $KREL $MODULES"; echo "$INIT_SCRIPT";
              sha256sum "$BUSYBOX"; } | sha256sum | cut -c1-16)
INITRD="$CACHE/initramfs-$IRD_HASH.cpio.gz"
if [ ! -e "$INITRD" ]; then
    log "building initramfs for $KREL"
    declare -A MODPATH=()
    while IFS= read -r f; do
        b=${f##*/}; b=${b%%.ko*}; b=${b//-/_}
        MODPATH[$b]=$f
    done < <(find "$MODDIR" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
    rm -rf "$CACHE"/initramfs-build.*
    B=$(mktemp -d "$CACHE/initramfs-build.XXXXXX")
    mkdir -p "$B"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,host,results,lib/modules}
    cp "$BUSYBOX" "$B/bin/busybox"
    mknod -m 600 "$B/dev/console" c 5 1
    mknod -m 666 "$B/dev/null" c 1 3
    printf '%s\n' "$INIT_SCRIPT" > "$B/init"
    chmod 755 "$B/init"
    declare -A SEEN=()
    ORDER=()
    add_module() {   # depth-first: dependencies first
        local m=${1//-/_} f deps d
        [ -n "${SEEN[$m]:-}" ] && return 0
        SEEN[$m]=1
        f=${MODPATH[$m]:-}
        if [ -z "$f" ]; then
            is_builtin "$m" && return 0
            die "kernel module $m not found in $MODDIR"
        fi
        case "$f" in
            *.ko)     cp "$f" "$B/lib/modules/$m.ko";;
            *.ko.xz)  xz -dc "$f" > "$B/lib/modules/$m.ko";;
            *.ko.gz)  gzip -dc "$f" > "$B/lib/modules/$m.ko";;
            *.ko.zst) command -v zstd >/dev/null || apt_install zstd
                      zstd -dcq "$f" > "$B/lib/modules/$m.ko";;
        esac
        # .modinfo is a run of NUL-separated key=value strings; depends= lists module names
        deps=$(tr '\0' '\n' < "$B/lib/modules/$m.ko" | sed -n 's/^depends=//p' | head -n 1)
        for d in ${deps//,/ }; do add_module "$d"; done
        ORDER+=("$m")
    }
    for m in $MODULES; do add_module "$m"; done
    printf '%s\n' "${ORDER[@]}" > "$B/lib/modules/load-order"
    (cd "$B" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"
    rm -rf "$B"
    rm -f "$CACHE"/initramfs-*.cpio.gz
    mv "$INITRD.tmp" "$INITRD"
    log "modules: ${ORDER[*]}"
fi
exec 9>&-   # release the cache lock
T_PREP_END=$(date +%s.%N)

# ---------------------------------------------------------------------------------- run dir ---
RUN=$(mktemp -d /var/tmp/ocfs2-guest.XXXXXX)
OUT="$RUN/share"
mkdir -p "$OUT/out"
QPID=
cleanup() {
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then kill -9 "$QPID" 2>/dev/null || true; fi
    if [ "${OCFS2_KEEP:-0}" = 1 ]; then log "kept $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mkfs.ocfs2 is plain user space and works on an image file: run it here at native speed
# (in the emulated guest the three mkfs runs take ~6 s). The guest only mounts the volumes.
make_image() {   # file size label features journal-size
    truncate -s "$2" "$1"
    mkfs.ocfs2 -q -M local -N 1 -b 4K -C 4K -J size="$5" -L "$3" --fs-features="$4" "$1" \
        > "$1.mkfs.log" 2>&1 || { cat "$1.mkfs.log" >&2; die "mkfs.ocfs2 $4 on $1 failed"; }
}
make_image "$RUN/refcount.img" "$DISK_SIZE" ovmref refcount 16M
make_image "$RUN/norefcount.img" "$DISK_SIZE" ovmnoref norefcount 16M
make_image "$RUN/small.img" "$SMALL_SIZE" ovmsmall refcount 4M

# Per-run configuration for the guest; read by inner.sh with the host's own bash.
PASS_ENV=()
while IFS= read -r v; do
    case "$v" in
        OVM_EXPORTER_OCFS2_DIR|OVM_EXPORTER_OCFS2_NOREFCOUNT_DIR|OVM_EXPORTER_OCFS2_SMALL_DIR) ;;
        OVM_EXPORTER_IN_GUEST|OVM_EXPORTER_GUEST_OUT) ;;
        OVM_EXPORTER_*|PYTEST_ADDOPTS) PASS_ENV+=("$v=${!v}");;
    esac
done < <(compgen -e)
{
    printf 'REPO=%q\n' "$REPO"
    printf 'PY=%q\n' "$PY"
    printf 'GUEST_PRE=%q\n' "${OCFS2_GUEST_PRE:-}"
    declare -p PYTEST_ARGS PASS_ENV
} > "$OUT/config.sh"

cat > "$OUT/inner.sh" <<'INNER_EOF'
# Runs inside the guest, chrooted into the host's root, with the host's bash.
set -u
. /run/ovm-ci/config.sh
S=/run/ovm-ci
say() { echo "ovm-ci-guest: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8

disk_by_serial() {
    local d
    for d in /sys/block/vd*; do
        if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${d##*/}"; return 0; fi
    done
    return 1
}
mount_volume() {   # serial mountpoint (the host made the filesystems)
    local dev
    dev=$(disk_by_serial "$1") || { say "no disk with serial $1"; return 1; }
    mkdir -p "$2"
    mount -t ocfs2 "$dev" "$2" || { say "mount $dev on $2 failed"; return 1; }
    chmod 1777 "$2"
    say "mounted $dev ($1) on $2 at uptime $(uptime_s)"
}
say "chroot entered at uptime $(uptime_s)"
mount_volume ovmref /mnt/ocfs2 || exit 3
mount_volume ovmnoref /mnt/ocfs2-norefcount || exit 3
mount_volume ovmsmall /mnt/ocfs2-small || exit 3
grep ' ocfs2 ' /proc/mounts
say "volumes ready at uptime $(uptime_s)"
if [ -n "$GUEST_PRE" ]; then
    say "running OCFS2_GUEST_PRE: $GUEST_PRE"
    (cd "$REPO" && eval "$GUEST_PRE")
    say "OCFS2_GUEST_PRE ended with $? at uptime $(uptime_s)"
fi
mkdir -p /tmp/home
uptime_s > $S/started
cd "$REPO" || exit 3
env -i \
    HOME=/tmp/home USER=root LOGNAME=root TMPDIR=/tmp LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb \
    PATH="${PY%/*}:$PATH" PYTHON="$PY" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis \
    "${PASS_ENV[@]}" \
    OVM_EXPORTER_IN_GUEST=1 \
    OVM_EXPORTER_OCFS2_DIR=/mnt/ocfs2 \
    OVM_EXPORTER_OCFS2_NOREFCOUNT_DIR=/mnt/ocfs2-norefcount \
    OVM_EXPORTER_OCFS2_SMALL_DIR=/mnt/ocfs2-small \
    OVM_EXPORTER_GUEST_OUT=$S/out \
    "$PY" -m pytest -p no:cacheprovider "${PYTEST_ARGS[@]}" > $S/pytest.log 2>&1 < /dev/null
rc=$?
uptime_s > $S/finished
say "pytest ended with $rc at uptime $(uptime_s)"
cd /
sync
for m in /mnt/ocfs2 /mnt/ocfs2-norefcount /mnt/ocfs2-small; do
    umount "$m" || say "umount $m failed (a test left something open?)"
done
say "volumes unmounted at uptime $(uptime_s)"
echo $rc > $S/pytest.rc
sync
exit 0
INNER_EOF

# ------------------------------------------------------------------------------------- qemu ---
ACCEL_WHY=
if [ "$ACCEL" = auto ]; then
    if [ -d /sys/module/kvm_pvm ]; then
        ACCEL=tcg; ACCEL_WHY="/dev/kvm is kvm_pvm (runs only PVM guests)"
    elif [ -r /dev/kvm ] && [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
        ACCEL=kvm; ACCEL_WHY="/dev/kvm usable"
    else
        ACCEL=tcg; ACCEL_WHY="no usable /dev/kvm"
    fi
fi
case "$ACCEL" in
    tcg) ACCEL_OPTS=(-accel tcg,thread=multi -cpu max);;
    kvm) ACCEL_OPTS=(-accel kvm -cpu host);;
    *) die "OCFS2_ACCEL must be auto, tcg or kvm";;
esac

QEMU=(qemu-system-x86_64 -M pc "${ACCEL_OPTS[@]}" -m "$MEM" -smp "$SMP"
    -nodefaults -no-user-config -nographic -vga none -no-reboot
    -monitor none -serial "file:$RUN/console.log"
    ${OCFS2_QEMU_BIOS:+-bios "$OCFS2_QEMU_BIOS"}
    -kernel "$KERNEL" -initrd "$INITRD"
    -append "console=ttyS0 quiet panic=-1 mitigations=off 8250.nr_uarts=1 tsc=reliable random.trust_cpu=on"
    -device virtio-rng-pci
    -fsdev "local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap"
    -device virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot
    -fsdev "local,id=fsres,path=$OUT,security_model=none"
    -device virtio-9p-pci,fsdev=fsres,mount_tag=results)
i=0
for d in refcount:ovmref norefcount:ovmnoref small:ovmsmall; do
    QEMU+=(-drive "file=$RUN/${d%%:*}.img,format=raw,if=none,id=disk$i,cache=unsafe,aio=threads"
           -device "virtio-blk-pci,drive=disk$i,serial=${d#*:}")
    i=$((i + 1))
done

log "repo $REPO; python $PY ($PYTEST_VERSION)"
log "kernel $KREL ($(basename "$KERNEL")), accel $ACCEL${ACCEL_WHY:+: $ACCEL_WHY}, ${MEM} MiB, $SMP vCPU"
log "pytest args: ${PYTEST_ARGS[*]}"
log "prepare (packages, kernel, initramfs) took $(elapsed "$T_PREP" "$T_PREP_END") s"

T_QEMU=$(date +%s.%N)
"${QEMU[@]}" < /dev/null > "$RUN/qemu.out" 2>&1 &
QPID=$!

printed=0
print_new_output() {
    local f="$OUT/pytest.log" size
    [ -f "$f" ] || return 0
    size=$(stat -c %s "$f")
    if [ "$size" -gt "$printed" ]; then
        tail -c +$((printed + 1)) "$f" | head -c $((size - printed))
        printed=$size
    fi
}
T_STARTED= T_DONE= TIMED_OUT=0
while kill -0 "$QPID" 2>/dev/null; do
    now=$(date +%s.%N)
    if [ -z "$T_STARTED" ] && [ -e "$OUT/started" ]; then
        T_STARTED=$now
        log "guest up, OCFS2 volumes ready after $(elapsed "$T_QEMU" "$now") s; running pytest"
    fi
    print_new_output
    if [ -z "$T_DONE" ] && [ -e "$OUT/pytest.rc" ]; then T_DONE=$now; fi
    if [ -n "$T_DONE" ] && [ "$(elapsed "$T_DONE" "$now" | cut -d. -f1)" -ge 30 ]; then
        log "guest did not power off 30 s after the tests; killing it"
        kill -9 "$QPID" 2>/dev/null || true
        break
    fi
    if [ "$(elapsed "$T_QEMU" "$now" | cut -d. -f1)" -ge "$TIMEOUT" ]; then
        TIMED_OUT=1
        kill -9 "$QPID" 2>/dev/null || true
        break
    fi
    sleep 0.25
done
QRC=0
wait "$QPID" 2>/dev/null || QRC=$?
QPID=
T_END=$(date +%s.%N)
print_new_output
if [ "$printed" -gt 0 ] && [ -n "$(tail -c 1 "$OUT/pytest.log")" ]; then echo; fi
[ -n "$T_DONE" ] || { [ -e "$OUT/pytest.rc" ] && T_DONE=$T_END; }

show_console() {
    log "---- guest console (last 60 lines) ----"
    tail -n 60 "$RUN/console.log" >&2 2>/dev/null || true
    if [ -s "$RUN/qemu.out" ]; then log "---- qemu ----"; cat "$RUN/qemu.out" >&2; fi
    if [ -s "$OUT/inner.log" ]; then log "---- guest set-up log ----"; tail -n 40 "$OUT/inner.log" >&2; fi
    if [ -s "$OUT/guest-error" ]; then log "guest error: $(cat "$OUT/guest-error")"; fi
}
if [ "${OCFS2_VERBOSE:-0}" = 1 ]; then show_console; fi

if [ -n "${OCFS2_OUT_DIR:-}" ] && [ -n "$(ls -A "$OUT/out" 2>/dev/null)" ]; then
    mkdir -p "$OCFS2_OUT_DIR"
    cp -a "$OUT/out/." "$OCFS2_OUT_DIR/"
fi

span() { if [ -n "$1" ] && [ -n "$2" ]; then elapsed "$1" "$2"; else echo n/a; fi; }
read -r G_INIT G_MODS 2>/dev/null < "$OUT/booted" || { G_INIT=n/a; G_MODS=n/a; }
log "timings: prepare $(span "$T_PREP" "$T_PREP_END") s;" \
    "guest clock: /init started at $G_INIT s, modules loaded at $G_MODS s;" \
    "qemu start to pytest start (boot + mounts) $(span "$T_QEMU" "$T_STARTED") s;" \
    "pytest $(span "$T_STARTED" "$T_DONE") s; whole run $(elapsed "$T_BEGIN" "$T_END") s"

if [ "$TIMED_OUT" = 1 ]; then
    [ "${OCFS2_VERBOSE:-0}" = 1 ] || show_console
    log "FAILED: guest timed out after $TIMEOUT s (OCFS2_TIMEOUT) and was killed"
    exit 124
fi
if [ ! -s "$OUT/pytest.rc" ]; then
    [ "${OCFS2_VERBOSE:-0}" = 1 ] || show_console
    log "FAILED: the guest did not run the tests (qemu exit status $QRC)"
    exit 125
fi
RC=$(cat "$OUT/pytest.rc")
log "guest pytest exit status $RC"
exit "$RC"
