#!/usr/bin/env bash
# Installs what snowflock needs on a Debian host (idempotent; run as root):
# QEMU (and qemu-img), busybox-static, iproute2, build tools, debootstrap
# and e2fsprogs for Debian disk images, Slurm with munge and MariaDB for
# the local cluster's scheduler (`cluster up --slurm`), and the Debian cloud kernel,
# downloaded and extracted into the cache (never installed on the host).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (VMs need taps, bridges and namespaces)" >&2
    exit 1
fi

need=()
check() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || need+=("$1"); }
for p in qemu-system-x86 qemu-utils busybox-static fuse3 iproute2 lz4 cpio gcc libc6-dev binutils kmod iputils-ping nftables python3 file debootstrap e2fsprogs \
    slurmctld slurmd slurm-client slurmdbd munge mariadb-server util-linux; do
    check "$p"
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Slurm, munge and MariaDB are run by `cluster up --slurm` with their
    # own files; their packages must not start system-wide services.
    guard=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        guard=1
    fi
    apt-get install -y -q --no-install-recommends "${need[@]}" || { [ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d; exit 1; }
    [ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d
fi

# Memory on demand (memtap) is a FUSE file system.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
for dev in /dev/net/tun /dev/fuse; do
    [ -e "$dev" ] || { echo "setup: $dev is missing; taps cannot be created" >&2; exit 1; }
done

bash scripts/fetch-kernel.sh >/dev/null
echo "setup: ok (kernel: $(readlink -f "${SNOWFLOCK_CACHE:-/var/cache/snowflock}/kernel/current"))"
