#!/bin/sh
# deps.sh - the Debian 12 packages that building and testing imdsd need.
#   tests/deps.sh               installs what is missing (as root; apt-get); quick when all is there
#   tests/deps.sh --check-build prints one line naming the packages compiling imdsd lacks, if any
#   tests/deps.sh --arm64       the arm64 image's cross build (make image): enables dpkg's arm64
#                               architecture, installs ARM64 below
#   tests/deps.sh --arm64-test  the same and qemu-user-static, which runs that binary (make check)
#   tests/deps.sh --check-arm64 one line naming what the arm64 cross build lacks, if any
set -eu
# compiling build/imdsd
BUILD="build-essential libuv1-dev node-llhttp libmbedtls-dev libjsmn-dev"
# testing: cmocka (unit), clang + its runtime (ASan, libFuzzer, profiling), llvm (llvm-profdata and
# llvm-cov for make coverage), valgrind; python3-azure, the real azure-identity that
# test_sdk_python.py runs; iproute2, network namespaces for the SDKs' IMDS probe;
# pytest with -n (xdist) and per-test timeouts for the integration suite; wrk, nginx, util-linux
# (taskset) and strace for make bench / the bench smoke; openssl and curl for make demo.
TEST="libcmocka-dev python3 openssl curl valgrind ca-certificates clang libclang-rt-14-dev llvm python3-azure
      iproute2 python3-pytest python3-pytest-xdist python3-pytest-timeout wrk nginx util-linux strace"
# make image and the pod tests: podman as root with runc (Debian's crun refuses these machines'
# cgroup layout; container/containers.conf selects runc), the pause image's catatonit, pod
# networking (netavark, CNI plugins, iptables), skopeo to read the archive, busybox-static for the
# test pod's application image, python3-yaml to read the manifests.
TEST="$TEST podman runc catatonit netavark aardvark-dns containernetworking-plugins iptables skopeo
      busybox-static python3-yaml"
# /metrics: promtool checks the exposition, and a real Prometheus server scrapes imdsd
TEST="$TEST prometheus"
# make lint: clang-format; the netns tests' sysctl and systemd-analyze verify's /bin/kill: procps
# (all found missing in a debootstrap'd bare Debian 12 root)
TEST="$TEST clang-format procps"
# systemd integration (test_systemd.py): systemd-socket-activate and systemd-analyze (the systemd
# package; no running systemd needed), man-db for `man -l` on the generated imdsd(8)
TEST="$TEST systemd man-db"
# make check-systemd (make check-full): a Debian 12 root from debootstrap, booted by
# systemd-nspawn (systemd-container) under a real systemd
TEST="$TEST debootstrap systemd-container"
# go-autorest's adal, which hard-codes 169.254.169.254 (external-dns, older Terraform providers),
# built offline in GOPATH mode for test_proxy_dropin.py
TEST="$TEST golang-go golang-github-azure-go-autorest-dev"
# The JS SDK tests run the real @azure/identity with node and npm: node-llhttp brings Debian's
# nodejs (18) along, for which tests/compat/node18 pins the newest client that supports it; a newer
# Node.js with its own npm (the machine image's 20) runs the newer pin in tests/compat. Debian's
# nodejs comes without npm: then Debian's npm is needed too.
command -v npm >/dev/null 2>&1 || TEST="$TEST npm"

# The arm64 image's binary (make image, make check; not make deps): Debian's cross compiler and,
# through dpkg multiarch, the arm64 libraries it links statically. libc6-dev:arm64 rather than the
# cross compiler's own libc6-dev-arm64-cross: dpkg keeps it at the amd64 libc6-dev's version, so
# both images carry the same glibc (with its security updates). Installing these leaves the amd64
# packages in place (they are Multi-Arch: same and must match their amd64 versions, which apt may
# upgrade to the current ones).
ARM64="gcc-aarch64-linux-gnu libc6-dev:arm64 libuv1-dev:arm64 libmbedtls-dev:arm64"
# make check runs that binary with Debian's qemu-user-static (qemu-aarch64-static, no binfmt needed)
ARM64_TEST="qemu-user-static"

native=$(dpkg --print-architecture)
missing() {
    # one dpkg-query for all: "name:arch status" per line for those it knows, the native
    # architecture's ":arch" dropped (a foreign package is asked for as name:arch)
    inst=$(dpkg-query -W -f='${binary:Package} ${Status}\n' "$@" 2>/dev/null |
        awk -v n=":$native" '$NF == "installed" {sub(n "$", "", $1); print $1}')
    for p in "$@"; do
        echo "$inst" | grep -qx "$p" || printf ' %s' "$p"
    done
}

mode=${1:-}
case "$mode" in
--check-build)
    # shellcheck disable=SC2086
    m=$(missing $BUILD)
    [ -z "$m" ] && exit 0
    echo "missing Debian packages:$m; run 'make deps' as root (or apt-get install them)"
    exit 1
    ;;
--check-arm64)
    # shellcheck disable=SC2086
    m=$(missing $ARM64)
    [ -z "$m" ] && exit 0
    echo "missing Debian packages for the arm64 image:$m; run 'make deps-arm64' as root" \
        "(or make image IMAGE_ARCHS=amd64)"
    exit 1
    ;;
--arm64) want=$ARM64 ;;
--arm64-test) want="$ARM64 $ARM64_TEST" ;;
"") want="$BUILD $TEST" ;;
*)
    echo "deps.sh: unknown option $mode" >&2
    exit 2
    ;;
esac

# shellcheck disable=SC2086
m=$(missing $want)
[ -z "$m" ] && exit 0
echo "deps: installing$m"
if [ "$(id -u)" != 0 ]; then
    case "$mode" in
    --arm64) target=deps-arm64 ;;
    --arm64-test) target=check ;;
    *) target=deps ;;
    esac
    echo "deps: missing packages:$m; run 'make $target' as root (or apt-get install them)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
case "$mode" in
--arm64*)
    dpkg --print-foreign-architectures | grep -qx arm64 || {
        echo "deps: dpkg --add-architecture arm64"
        dpkg --add-architecture arm64
    }
    ;;
esac
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $m >/dev/null
