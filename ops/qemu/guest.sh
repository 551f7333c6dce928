#!/usr/bin/env bash
# guest.sh OUTDIR: build the tiny guest Loom's QEMU tests boot, into OUTDIR
# (idempotent: what is there already is kept).
#
#   OUTDIR/vmlinuz      Debian's cloud kernel (from linux-image-*-cloud-amd64)
#   OUTDIR/initrd.gz    a busybox initramfs whose init loads virtio-blk,
#                       virtio-net and the ACPI button, runs acpid (power
#                       button -> poweroff -f), configures eth0 from the
#                       kernel command line (below), and prints
#                       "loom-heartbeat N" on the serial console (ttyS0)
#                       every second, N counting from 1
#   OUTDIR/base.qcow2   a 64 MiB qcow2 image to put overlays on
#   OUTDIR/version      the guest version built (GUEST_VERSION below)
#
# Guest networking, from /proc/cmdline:
#   loom.ip=ADDR/PREFIX  eth0 gets this address and comes up, and the init
#                        prints "loom-net eth0 ADDR/PREFIX" on ttyS0 (or
#                        "loom-net failed: ..."); without it eth0 stays down
#   loom.mac=MAC         optional: set eth0's MAC first (libvirt's
#                        <mac address=...> already does that)
# The guest kernel answers ping by itself.
#
# Nothing is installed: the two .debs are downloaded and unpacked in a
# scratch directory. Needs apt (with its lists) and qemu-img.
# Research notes: /work/shared/research/libvirt-feasibility.md §3 and §5.
set -euo pipefail

die() { echo "guest.sh: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: guest.sh OUTDIR"
mkdir -p "$1" || die "cannot create $1"
out=$(cd "$1" && pwd -P)

# GUEST_VERSION names what the init does; a cached guest of another
# version is rebuilt (its base.qcow2, which running guests may have as
# backing file, is kept). Bump it with every change to the initramfs.
GUEST_VERSION=2-net

if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && [ -s "$out/base.qcow2" ] &&
	[ "$(cat "$out/version" 2>/dev/null)" = "$GUEST_VERSION" ]; then
	exit 0
fi
command -v qemu-img >/dev/null || die "qemu-img not found; run ops/libvirt/install.sh --qemu"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

kernel=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kernel" ]; then
	apt-get update -qq
	kernel=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$kernel" ] || die "no linux-image-*-cloud-amd64 package known to apt"
apt-get download -qq "$kernel" busybox-static >/dev/null 2>&1 ||
	{ apt-get update -qq && apt-get download -qq "$kernel" busybox-static >/dev/null; } ||
	die "apt-get download $kernel busybox-static failed"
for deb in ./*.deb; do dpkg-deb -x "$deb" x; done
version=${kernel#linux-image-}

mkdir -p initrd/bin initrd/mod initrd/etc/acpi/PWRF initrd/dev initrd/proc initrd/sys initrd/tmp
cp x/bin/busybox initrd/bin/busybox
# In load order: virtio_net needs net_failover, which needs failover.
modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net evdev button"
for m in $modules; do
	f=$(find "x/lib/modules/$version" -name "$m.ko*" | head -n 1)
	[ -n "$f" ] || die "module $m not found in $kernel"
	case "$f" in
	*.ko.xz) xz -dc "$f" >"initrd/mod/$m.ko" ;;
	*.ko.zst) zstd -qdc "$f" >"initrd/mod/$m.ko" ;;
	*) cp "$f" "initrd/mod/$m.ko" ;;
	esac
done
printf '#!/bin/sh\npoweroff -f\n' >initrd/etc/acpi/PWRF/00000080
chmod +x initrd/etc/acpi/PWRF/00000080
{
	echo '#!/bin/busybox sh'
	echo "modules=\"$modules\""
	cat <<'INIT'
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $modules; do
	insmod /mod/$m.ko 2>/dev/null
done
i=0
while [ ! -e /dev/input/event0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
acpid -c /etc/acpi -l /tmp/acpid.log
# loom.ip=ADDR/PREFIX [loom.mac=MAC] on the kernel command line: eth0 up.
addr= mac=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	loom.ip=*) addr=${arg#loom.ip=} ;;
	loom.mac=*) mac=${arg#loom.mac=} ;;
	esac
done
if [ -n "$addr" ]; then
	i=0
	while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	ip link set lo up
	if { [ -z "$mac" ] || ip link set eth0 address "$mac"; } &&
		ip addr add "$addr" dev eth0 && ip link set eth0 up; then
		echo "loom-net eth0 $addr" >/dev/ttyS0
	else
		echo "loom-net failed: eth0 $addr" >/dev/ttyS0
	fi
fi
n=0
while true; do
	n=$((n + 1))
	echo "loom-heartbeat $n" >/dev/ttyS0
	sleep 1
done
INIT
} >initrd/init
chmod +x initrd/init
(cd initrd && find . | ../x/bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")

cp x/boot/vmlinuz-* "$work/vmlinuz"
qemu-img create -q -f qcow2 "$work/base.qcow2" 64M
echo "$GUEST_VERSION" >"$work/version"
# Each file appears whole (a rename within OUTDIR): other tests may be
# booting guests from it meanwhile. The version comes last.
for f in vmlinuz initrd.gz base.qcow2 version; do
	[ "$f" = base.qcow2 ] && [ -s "$out/base.qcow2" ] && continue
	cp "$work/$f" "$out/.$f.$$"
	mv -f "$out/.$f.$$" "$out/$f"
done
echo "guest.sh: built $out from $kernel" >&2
