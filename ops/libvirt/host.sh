#!/usr/bin/env bash
# host.sh start DIR INDEX | host.sh stop DIR
#
# start: run one independent root libvirtd (a simulated "host") in its own
#   mount and network namespace. Per-instance dirs under DIR/st are
#   bind-mounted over /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
#   /var/log/libvirt and /etc/libvirt, so several daemons never share state.
#   The socket lives outside those mounts, at DIR/run/libvirt-sock, so the host
#   sees it. INDEX (0-255) picks a distinct host_uuid and migration port range.
#   Waits for a real RPC round trip, then prints the socket path.
#   Files: DIR/libvirtd.conf, DIR/libvirtd.log, DIR/libvirtd.pid.
# stop: kill the daemon named by DIR/libvirtd.pid and wait for it to exit.
#   Stopping a daemon that is not running succeeds.
#
# Environment (all optional):
#   LOOM_LIBVIRTD_START_TIMEOUT  seconds to wait for the first RPC (default 15)
#   LOOM_LIBVIRTD_IDLE_EXIT      libvirtd -t: exit after this many idle seconds
#                                with no clients (a safety net against leaked
#                                test daemons; default: never)
#   LOOM_LIBVIRT_CAPCACHE        dir holding a warm QEMU capabilities cache to
#                                seed the daemon with (skips a ~4 s probe)
#
# Needs root and ops/libvirt/install.sh. Recipe and rationale:
# /work/shared/research/libvirt-feasibility.md §5.
set -euo pipefail

die() { echo "host.sh: $*" >&2; exit 1; }
usage() { die "usage: host.sh start DIR INDEX | host.sh stop DIR"; }

# is_alive PID: true while PID is a live (non-zombie) libvirtd. PID 1 here may
# not reap orphans, so a dead daemon can linger as a zombie; kill -0 alone
# would call it alive. Checking comm also guards against a recycled PID.
is_alive() {
	local pid=$1 stat comm
	[ -r "/proc/$pid/stat" ] || return 1
	comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
	[ "$comm" = libvirtd ] || return 1
	stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[ "${stat%% *}" != Z ]
}

read_pid() { # read_pid PIDFILE: print the pid, or nothing
	local pid
	[ -f "$1" ] || return 0
	pid=$(tr -d '[:space:]' <"$1")
	case "$pid" in '' | *[!0-9]*) return 0 ;; esac
	echo "$pid"
}

# stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL and wait up to 5 s.
stop_pid() {
	local pid=$1 i
	is_alive "$pid" || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for i in $(seq 100); do is_alive "$pid" || return 0; sleep 0.1; done
	echo "host.sh: libvirtd $pid ignored SIGTERM for 10s; sending SIGKILL" >&2
	kill -KILL "$pid" 2>/dev/null || true
	for i in $(seq 50); do is_alive "$pid" || return 0; sleep 0.1; done
	die "libvirtd $pid did not exit after SIGKILL"
}

log_tail() { # log_tail DIR: show the end of the daemon log on stderr
	if [ -s "$1/libvirtd.log" ]; then
		echo "--- last lines of $1/libvirtd.log:" >&2
		tail -n 20 "$1/libvirtd.log" >&2
	else
		echo "--- $1/libvirtd.log is empty or missing" >&2
	fi
}

abs_dir() { # abs_dir DIR: create DIR and print its absolute path
	mkdir -p "$1" || die "cannot create $1"
	(cd "$1" && pwd -P)
}

cmd_start() {
	[ $# -eq 2 ] || usage
	local dir index sock pid uuid timeout deadline port_min
	local admin_sock_suffix=/run/libvirt-admin-sock
	case "$2" in '' | *[!0-9]*) die "INDEX must be an integer 0-255, got '$2'" ;; esac
	index=$((10#$2))
	[ "$index" -le 255 ] || die "INDEX must be an integer 0-255, got '$2'"
	[ "$(id -u)" -eq 0 ] || die "must run as root (namespaces and a root libvirtd)"
	for bin in libvirtd virsh unshare ip mount; do
		command -v "$bin" >/dev/null 2>&1 || die "$bin not found; run ops/libvirt/install.sh"
	done
	getent passwd libvirt-qemu >/dev/null ||
		die "user libvirt-qemu missing (libvirtd would exit at start); run ops/libvirt/install.sh"

	# The socket path goes into a libvirt URI query and a config string.
	case "$1" in *[!A-Za-z0-9._/-]*) die "DIR '$1' may only contain [A-Za-z0-9._/-]" ;; esac
	dir=$(abs_dir "$1")
	case "$dir" in *[!A-Za-z0-9._/-]*) die "DIR '$dir' may only contain [A-Za-z0-9._/-]" ;; esac
	sock=$dir/run/libvirt-sock
	# sun_path holds 107 bytes; libvirt-admin-sock is the longest name in run/.
	[ $((${#dir} + ${#admin_sock_suffix})) -le 107 ] || die "DIR '$dir' is too long for a unix socket path"

	pid=$(read_pid "$dir/libvirtd.pid")
	if [ -n "$pid" ] && is_alive "$pid"; then
		die "libvirtd already running for $dir (pid $pid); run: host.sh stop $dir"
	fi
	rm -f "$dir/libvirtd.pid" "$dir"/run/libvirt-sock* "$dir"/run/libvirt-admin-sock

	mkdir -p "$dir/run" "$dir/st/run" "$dir/st/lib" "$dir/st/cache" "$dir/st/log" "$dir/st/etc"
	cp -a /etc/libvirt/. "$dir/st/etc/"
	if [ -n "${LOOM_LIBVIRT_CAPCACHE:-}" ] && [ -d "$LOOM_LIBVIRT_CAPCACHE" ]; then
		cp -a "$LOOM_LIBVIRT_CAPCACHE/." "$dir/st/cache/"
	fi
	# stdio_handler=file: no virtlogd. remember_owner=0: two daemons on one
	# machine may label the same files (migration).
	port_min=$((49152 + index * 64))
	printf 'stdio_handler = "file"\nremember_owner = 0\nmigration_port_min = %d\nmigration_port_max = %d\n' \
		"$port_min" $((port_min + 63)) >"$dir/st/etc/qemu.conf"

	uuid=$(printf '%08x-0000-4000-8000-%012x' "$index" "$index")
	# No polkit or dbus here, so auth none; the socket stays root-only (0770).
	cat >"$dir/libvirtd.conf" <<CONF
unix_sock_dir = "$dir/run"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
listen_tls = 0
host_uuid = "$uuid"
log_outputs = "3:file:$dir/libvirtd.log"
CONF
	: >"$dir/libvirtd.log"

	local daemon_args=(-d -f "$dir/libvirtd.conf" -p "$dir/libvirtd.pid")
	if [ -n "${LOOM_LIBVIRTD_IDLE_EXIT:-}" ]; then
		case "$LOOM_LIBVIRTD_IDLE_EXIT" in *[!0-9]*) die "LOOM_LIBVIRTD_IDLE_EXIT must be seconds" ;; esac
		daemon_args+=(-t "$LOOM_LIBVIRTD_IDLE_EXIT")
	fi

	# Paths reach the inner shell as arguments, never spliced into its script.
	# shellcheck disable=SC2016
	unshare -m -n --propagation private sh -c '
		set -e
		st=$1; shift
		ip link set lo up
		for p in run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt etc:/etc/libvirt; do
			mount --bind "$st/${p%%:*}" "${p#*:}"
		done
		exec libvirtd "$@"' sh "$dir/st" "${daemon_args[@]}" >>"$dir/libvirtd.log" 2>&1 ||
		{ log_tail "$dir"; die "libvirtd failed to start for $dir"; }

	timeout=${LOOM_LIBVIRTD_START_TIMEOUT:-15}
	case "$timeout" in '' | *[!0-9]*) die "LOOM_LIBVIRTD_START_TIMEOUT must be seconds" ;; esac
	deadline=$((SECONDS + timeout))
	# A socket file is not enough: wait until the daemon answers an RPC.
	# test+unix goes through the daemon; plain test:/// would run in-process.
	while :; do
		if virsh -q -c "test+unix:///default?socket=$sock" uri >/dev/null 2>&1; then
			# Its network namespace, for stop: the QEMU guests it starts live
			# there, and outlive the daemon when it is killed.
			pid=$(read_pid "$dir/libvirtd.pid")
			[ -n "$pid" ] && readlink "/proc/$pid/ns/net" >"$dir/netns" 2>/dev/null || true
			echo "$sock"
			return 0
		fi
		pid=$(read_pid "$dir/libvirtd.pid")
		if [ -n "$pid" ] && ! is_alive "$pid"; then
			log_tail "$dir"
			die "libvirtd (pid $pid) exited during start-up; see $dir/libvirtd.log"
		fi
		if [ "$SECONDS" -ge "$deadline" ]; then
			[ -n "$pid" ] && stop_pid "$pid"
			log_tail "$dir"
			die "libvirtd at $sock did not answer an RPC within ${timeout}s; see $dir/libvirtd.log"
		fi
		sleep 0.1
	done
}

cmd_stop() {
	[ $# -eq 1 ] || usage
	local dir=$1 pid
	[ -d "$dir" ] || { echo "host.sh: $dir does not exist; nothing to stop" >&2; return 0; }
	pid=$(read_pid "$dir/libvirtd.pid")
	if [ -n "$pid" ]; then
		stop_pid "$pid"
		rm -f "$dir/libvirtd.pid"
	else
		echo "host.sh: no pid file in $dir; no daemon to stop" >&2
	fi
	stop_guests "$dir"
}

# stop_guests kills the QEMU guests still running in the daemon's network
# namespace, which a killed (or stopped) libvirtd leaves behind. Only QEMU:
# a test's own process may have a thread in that namespace (a pinger).
stop_guests() {
	local dir=$1 ns p comm
	[ -s "$dir/netns" ] || return 0
	ns=$(cat "$dir/netns")
	[ "$ns" = "$(readlink /proc/self/ns/net)" ] && return 0 # never the caller's own
	for p in /proc/[0-9]*; do
		comm=$(cat "$p/comm" 2>/dev/null) || continue
		case "$comm" in qemu-*) ;; *) continue ;; esac
		if [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$ns" ]; then
			kill -KILL "${p#/proc/}" 2>/dev/null || true
		fi
	done
	rm -f "$dir/netns"
}

[ $# -ge 1 ] || usage
cmd=$1
shift
case "$cmd" in
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
*) usage ;;
esac
