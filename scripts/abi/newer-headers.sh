#!/usr/bin/env bash
# Test tooling for the ABI check: fetches the newest Linux UAPI headers Debian ships
# (linux-libc-dev from trixie-backports) and caches them, so that test/host/abi.test.ts can also
# check the names that the host's older headers lack (ublk's ioctl-encoded opcodes, new feature
# flags, ublk_param_devt …).
# Usage: scripts/abi/newer-headers.sh CACHE_DIR
# Prints the include directories to pass with -I, colon-separated, on stdout. A cached copy is
# reused without network. Uses a private apt configuration (as scripts/vm/fetch-kernel.sh does):
# the host's apt setup is neither read for packages nor modified; the mirror is the host's own.
set -euo pipefail

cache="${1:?usage: newer-headers.sh CACHE_DIR}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
dest="$cache/abi-headers"
print_dirs() { echo "$dest/usr/include:$dest/usr/include/x86_64-linux-gnu"; }

exec 9>"$cache/abi-headers.lock"
flock 9
if [ -f "$dest/version" ]; then
  print_dirs
  exit 0
fi

# shellcheck source=../lib/debian-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/debian-apt.sh"
aptdir="$cache/abi-apt"
private_apt newer-headers "$aptdir" trixie-backports
echo "newer-headers: fetching linux-libc-dev from trixie-backports ($apt_mirror)" >&2
apt-get "${apt_opts[@]}" -qq update >&2

work="$(mktemp -d "$cache/abi-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get "${apt_opts[@]}" -qq download linux-libc-dev/trixie-backports >&2)
deb="$(ls "$work"/linux-libc-dev_*.deb)"
mkdir "$work/root"
dpkg-deb -x "$deb" "$work/root"
dpkg-deb -f "$deb" Version >"$work/root/version"
rm -rf "$dest"
mv "$work/root" "$dest"
rm -rf "$aptdir"
echo "newer-headers: cached linux-libc-dev $(cat "$dest/version") in $dest" >&2
print_dirs
