#!/usr/bin/env bash
# Fetch Debian's cloud kernel and prepare it for QEMU microvm (PVH boot).
#
# Result (idempotent):
#   $CACHE/kernel/<kver>/root/            unpacked linux-image-<kver> .deb
#   $CACHE/kernel/<kver>/vmlinux          uncompressed ELF kernel
#   $CACHE/kernel/<kver>/modules       -> root/lib/modules/<kver>
#   $CACHE/kernel/current              -> <kver>
# CACHE is ${SNOWFLOCK_CACHE:-/var/cache/snowflock}. Prints the vmlinux path.
# Needs: apt-get, apt-cache, dpkg-deb, lz4, grep (with -P). Run as root.
set -euo pipefail

CACHE="${SNOWFLOCK_CACHE:-/var/cache/snowflock}"
META="linux-image-cloud-amd64"

die() {
    echo "fetch-kernel: error: $*" >&2
    exit 1
}
log() {
    echo "fetch-kernel: $*" >&2
}
# Anything not handled with an explicit message above still says what failed.
trap 'echo "fetch-kernel: error: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR

if [[ -e "$CACHE/kernel/current/vmlinux" ]]; then
    echo "$CACHE/kernel/current/vmlinux"
    exit 0
fi

for tool in apt-cache apt-get dpkg-deb lz4 grep tail head od; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' is not installed"
done

mkdir -p "$CACHE/kernel" || die "cannot create cache directory $CACHE/kernel"

# --- Resolve the versioned kernel package ------------------------------------
resolve_pkg() {
    apt-cache depends "$META" 2>/dev/null \
        | sed -n 's/^[[:space:]]*Depends:[[:space:]]*\(linux-image-[0-9][^[:space:]]*-cloud-amd64\)[[:space:]]*$/\1/p' \
        | head -n 1
}

PKG="$(resolve_pkg || true)"
if [[ -z "$PKG" ]]; then
    log "apt-cache knows no $META; running apt-get update"
    apt-get update >&2 || die "apt-get update failed"
    PKG="$(resolve_pkg || true)"
fi
[[ -n "$PKG" ]] || die "cannot resolve the kernel package: 'apt-cache depends $META' lists no 'Depends: linux-image-<ver>-cloud-amd64'"
KVER="${PKG#linux-image-}"
log "kernel package $PKG (kernel version $KVER)"

# --- Download the .deb unless it is already cached ---------------------------
find_deb() {
    local f
    for f in "$CACHE/${PKG}"_*_amd64.deb; do
        if [[ -s "$f" ]]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}

DEB="$(find_deb || true)"
if [[ -z "$DEB" ]]; then
    log "downloading $PKG into $CACHE"
    (cd "$CACHE" && apt-get download "$PKG" >&2) || die "apt-get download $PKG failed"
    DEB="$(find_deb || true)"
    [[ -n "$DEB" ]] || die "apt-get download $PKG left no ${PKG}_*_amd64.deb in $CACHE"
else
    log "using cached $DEB"
fi

# --- Unpack -----------------------------------------------------------------
KDIR="$CACHE/kernel/$KVER"
ROOT="$KDIR/root"
if [[ ! -e "$ROOT/boot/vmlinuz-$KVER" ]]; then
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    log "unpacking $DEB into $ROOT"
    dpkg-deb -x "$DEB" "$ROOT" || die "dpkg-deb -x $DEB failed"
fi
BZ="$ROOT/boot/vmlinuz-$KVER"
[[ -s "$BZ" ]] || die "the package has no boot/vmlinuz-$KVER"
[[ -d "$ROOT/lib/modules/$KVER" ]] || die "the package has no lib/modules/$KVER"

# --- Extract vmlinux from the bzImage (extract-vmlinux approach, lz4 legacy) ---
is_elf() {
    [[ -s "$1" ]] && [[ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" == "7f454c46" ]]
}

TMP="$KDIR/vmlinux.tmp"
rm -f "$TMP"
found=""
# Byte offsets (0-based) of every lz4 legacy frame magic 02 21 4c 18.
offsets="$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$BZ" | cut -d: -f1 || true)"
[[ -n "$offsets" ]] || die "$BZ contains no lz4 legacy payload (magic 02 21 4c 18); is this kernel not lz4-compressed?"
for off in $offsets; do
    # lz4 complains about the bytes after the payload; judge by the output.
    tail -c "+$((off + 1))" "$BZ" | lz4 -dc >"$TMP" 2>/dev/null || true
    if is_elf "$TMP"; then
        found="$off"
        break
    fi
done
if [[ -z "$found" ]]; then
    rm -f "$TMP"
    die "no lz4 payload in $BZ decompressed to an ELF kernel"
fi
mv -f "$TMP" "$KDIR/vmlinux"
log "extracted vmlinux ($(stat -c %s "$KDIR/vmlinux") bytes) from offset $found"

ln -sfn "root/lib/modules/$KVER" "$KDIR/modules"
ln -sfn "$KVER" "$CACHE/kernel/current"

[[ -e "$CACHE/kernel/current/vmlinux" ]] || die "$CACHE/kernel/current/vmlinux is missing after extraction"
echo "$CACHE/kernel/current/vmlinux"
