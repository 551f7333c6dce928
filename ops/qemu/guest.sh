#!/usr/bin/env bash
# guest.sh OUTDIR: build the tiny guest Loom's QEMU tests boot, into OUTDIR
# (idempotent: what is there already is kept).
#
#   OUTDIR/vmlinuz      Debian's cloud kernel (from linux-image-*-cloud-amd64)
#   OUTDIR/initrd.gz    a busybox initramfs whose init loads virtio-blk and the
#                       ACPI button, runs acpid (power button -> poweroff -f),
#                       and prints "loom-heartbeat N" on the serial console
#                       (ttyS0) every second, N counting from 1
#   OUTDIR/base.qcow2   a 64 MiB qcow2 image to put overlays on
#
# Nothing is installed: the two .debs are downloaded and unpacked in a
# scratch directory. Needs apt (with its lists) and qemu-img.
# Research notes: /work/shared/research/libvirt-feasibility.md §3 and §5.
set -euo pipefail

die() { echo "guest.sh: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: guest.sh OUTDIR"
mkdir -p "$1" || die "cannot create $1"
out=$(cd "$1" && pwd -P)

if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && [ -s "$out/base.qcow2" ]; then
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
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk evdev button; do
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
cat >initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk evdev button; do
	insmod /mod/$m.ko 2>/dev/null
done
i=0
while [ ! -e /dev/input/event0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
acpid -c /etc/acpi -l /tmp/acpid.log
n=0
while true; do
	n=$((n + 1))
	echo "loom-heartbeat $n" >/dev/ttyS0
	sleep 1
done
INIT
chmod +x initrd/init
(cd initrd && find . | ../x/bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")

cp x/boot/vmlinuz-* "$work/vmlinuz"
qemu-img create -q -f qcow2 "$work/base.qcow2" 64M
mv "$work/vmlinuz" "$work/initrd.gz" "$work/base.qcow2" "$out/"
echo "guest.sh: built $out from $kernel" >&2
