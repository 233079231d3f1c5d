#!/bin/sh
# bare-debian.sh - the README's two commands as a newcomer's first run: a fresh clone of this
# checkout's HEAD in a debootstrap'd bare Debian 12 root (--variant=minbase), then `make demo` and
# `make check` inside it, exactly as written. Not part of make check: it downloads the root and
# every package the project needs (a few hundred MB) and takes about 15 minutes.
#
#   tests/bare-debian.sh [ROOT]     as root; ROOT defaults to /var/tmp/imdsd-bare (made anew)
#
# What a bare root lacks that a machine has, and is given here: /proc, /sys and /dev (recursive
# bind mounts: the cgroup file systems podman needs come along), the host's /etc/resolv.conf, an
# /etc/hosts naming localhost and the machine's local certificate authorities. git and make are
# installed first, as on a minimal server image (the clone needs git, the two commands make);
# nothing the project installs for itself is copied in.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-/var/tmp/imdsd-bare}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "bare-debian: $*"; }

command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
# every mount under the root, deepest first: ours, and those podman made inside (its storage)
unmount_all() {
    awk -v r="$root" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
cleanup() {
    unmount_all
}
trap cleanup EXIT INT TERM

if [ -e "$root" ]; then
    log "removing the previous $root"
    unmount_all
    rm -rf --one-file-system "$root"
fi
t0=$(date +%s)
log "debootstrap --variant=minbase bookworm $root $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 ||
    { tail -n 20 "$root.debootstrap.log"; exit 1; }
log "root made in $(($(date +%s) - t0)) s"

# the root a mount point of its own: pivot_root needs one, and so does podman, which remounts /
# (in a plain directory, its layer extraction fails with "remount /: invalid argument")
mount --bind "$root" "$root"
for d in proc sys dev; do
    mkdir -p "$root/$d"
    mount --rbind "/$d" "$root/$d"
    mount --make-rslave "$root/$d"
done
cp /etc/resolv.conf "$root/etc/resolv.conf"
# the machine's own certificate authorities (a corporate or sandbox proxy that re-signs TLS): the
# ca-certificates package adds them to the system store when it is installed
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# the sources debootstrap wrote, plus the updates and security suites a machine has
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF

# a command in the root as on a machine of its own: a private mount namespace whose root mount is
# the root (pivot_root, not chroot: in a chroot, `podman exec` finds nothing, since runc's exec
# enters the namespace's real root and not the container's)
inside() {
    unshare --mount --propagation private sh -c '
        cd "$1" && mkdir -p .host && pivot_root . .host && cd / && umount -l /.host && rmdir /.host &&
        exec env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            TERM=dumb sh -c "$2"' sh "$root" "$1"
}

# the clone: git is the one tool a newcomer needs before the README's commands
inside 'apt-get update -q >/dev/null && apt-get install -y -q git make >/dev/null'
git -C "$here" bundle create "$root/root/imdsd.bundle" HEAD >/dev/null 2>&1
inside 'cd /root && git -c advice.detachedHead=false clone -q imdsd.bundle imdsd'

status=0
for cmd in demo check; do
    t=$(date +%s)
    log "make $cmd"
    if inside "cd /root/imdsd && make $cmd" >"$root.make-$cmd.log" 2>&1; then
        log "make $cmd passed in $(($(date +%s) - t)) s; last line: $(tail -n 1 "$root.make-$cmd.log")"
    else
        status=1
        log "make $cmd FAILED in $(($(date +%s) - t)) s (log: $root.make-$cmd.log):"
        tail -n 30 "$root.make-$cmd.log"
    fi
done
log "done in $(($(date +%s) - t0)) s"
[ "$status" -eq 0 ] && echo "bare-debian: 2 passed, 0 failed" || echo "bare-debian: failed"
exit "$status"
