#!/usr/bin/env bash
# install.sh [--qemu]: make this Debian 12 machine able to run namespaced
# libvirtd instances (see host.sh). Idempotent; run as root.
#
#   - installs libvirt-daemon, libvirt-clients, iproute2 and iputils-ping (and, with --qemu,
#     qemu-system-x86 and qemu-utils) with --no-install-recommends. It never
#     installs libvirt-daemon-system: that pulls in systemd/polkit/iptables and
#     its postinst starts a default daemon.
#   - creates the libvirt-qemu user and group: without them libvirtd exits at
#     start, even when only the test driver is wanted.
#   - creates the default state dirs that host.sh bind-mounts over.
#
# Fast path: when every needed binary is already present, apt is not touched.
# Research notes: /work/shared/research/libvirt-feasibility.md §1 and §5.
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

want_qemu=0
for arg in "$@"; do
	case "$arg" in
	--qemu) want_qemu=1 ;;
	-h | --help) sed -n '2,13p' "$0"; exit 0 ;;
	*) die "unknown argument '$arg' (usage: install.sh [--qemu])" ;;
	esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (libvirtd needs root for its namespaces)"

packages=(libvirt-daemon libvirt-clients iproute2 iputils-ping)
binaries=(libvirtd virsh ip unshare mount ping)
if [ "$want_qemu" -eq 1 ]; then
	packages+=(qemu-system-x86 qemu-utils)
	binaries+=(qemu-system-x86_64 qemu-img)
fi

missing=()
for bin in "${binaries[@]}"; do
	command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done

if [ "${#missing[@]}" -eq 0 ]; then
	echo "install.sh: packages already present, skipping apt"
else
	command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
	echo "install.sh: missing ${missing[*]}; installing ${packages[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# Another apt may be running (e.g. a provisioning step): wait for its lock
	# instead of failing.
	apt_opts=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
	apt-get "${apt_opts[@]}" update -qq || die "apt-get update failed"
	apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${packages[@]}" >/dev/null ||
		die "apt-get install ${packages[*]} failed"
	for bin in "${binaries[@]}"; do
		command -v "$bin" >/dev/null 2>&1 || die "$bin still missing after installing ${packages[*]}"
	done
fi

if dpkg-query -W -f='${Status}' libvirt-daemon-system 2>/dev/null | grep -q 'ok installed'; then
	echo "install.sh: warning: libvirt-daemon-system is installed; it may start a default daemon on /run/libvirt" >&2
fi

# The QEMU driver refuses to initialise without this user, and libvirtd then
# exits even for test:/// connections.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
	useradd -r -g libvirt-qemu -d /var/lib/libvirt -M -s /usr/sbin/nologin libvirt-qemu

# Mount points for host.sh's per-instance bind mounts.
mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/libvirt

echo "install.sh: ok ($(libvirtd --version))"
