#!/bin/sh
# Installs the Debian 12 packages that building and testing imdsd need (as root; apt-get).
# Quick when everything is already there.
set -eu
# python3-azure: the real azure-identity that tests/integration/test_sdk_python.py runs;
# iproute2: network namespaces for the SDKs' IMDS probe on 169.254.169.254 (test_sdk_*.py);
# wrk, nginx (the reference server), util-linux (taskset) and strace (system calls per request):
# make bench / bench-smoke (tests/bench/).
PKGS="build-essential libuv1-dev node-llhttp libmbedtls-dev libjsmn-dev libcmocka-dev
      python3 openssl curl valgrind ca-certificates clang libclang-rt-14-dev python3-azure iproute2
      wrk nginx util-linux strace"
# The JS SDK tests need Node.js >= 20 with npm (@azure/identity 4.13.1 says engines node >= 20); the
# machine image ships Node.js 20. Debian 12's nodejs is 18, too old, so it is not a fallback here.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "deps: node/npm not found: the JS SDK tests (tests/integration/test_sdk_js.py) need Node.js >= 20 and npm" >&2
fi
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps: installing$missing"
if [ "$(id -u)" != 0 ]; then
    echo "deps: missing packages:$missing; run 'make deps' as root (or apt-get install them)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
