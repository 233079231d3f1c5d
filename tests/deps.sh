#!/bin/sh
# Installs the Debian 12 packages that building and testing imdsd need (as root; apt-get).
# Quick when everything is already there.
set -eu
PKGS="build-essential libuv1-dev node-llhttp libmbedtls-dev libjsmn-dev libcmocka-dev
      python3 openssl curl valgrind ca-certificates clang libclang-rt-14-dev"
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
