#!/usr/bin/env bash
# Fetches a Debian kernel that ships ublk_drv and caches its vmlinuz and module tree.
# Usage: scripts/vm/fetch-kernel.sh SERIES CACHE_DIR [--refresh]
#   SERIES: 6.12 (Debian trixie, linux-image-6.12.*-amd64) or 7.3 (trixie-backports, split into
#   linux-binary-7.3.*-amd64 + linux-modules-7.3.*-amd64).
# Result: CACHE_DIR/kernel-SERIES/{version,vmlinuz,modules/} with modules.dep from depmod; its path is
# printed on stdout. A cached kernel is reused as is (no network) unless --refresh is given, so warm
# runs cost nothing and stay on the kernel the cache was built with.
set -euo pipefail

series="${1:?usage: fetch-kernel.sh SERIES CACHE_DIR [--refresh]}"
cache="${2:?usage: fetch-kernel.sh SERIES CACHE_DIR [--refresh]}"
refresh="${3:-}"
case "$series" in
  6.12) suite=trixie ;;
  7.3) suite=trixie-backports ;;
  *)
    echo "fetch-kernel: unsupported kernel series '$series' (expected 6.12 or 7.3)" >&2
    exit 2
    ;;
esac

# apt resolves relative Dir:: paths against /etc/apt, so everything below uses absolute paths.
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
dest="$cache/kernel-$series"
if [ -f "$dest/version" ] && [ -f "$dest/vmlinuz" ] && [ "$refresh" != "--refresh" ]; then
  echo "$dest"
  exit 0
fi

# A private apt configuration: its own source list, lists and cache, so the host's apt setup is
# neither read for packages nor modified. The mirror is the host's own (read at run time), never a
# host name written here.
# FASTLOOP_DEBIAN_MIRROR overrides it on hosts whose apt points elsewhere (e.g. not Debian).
# shellcheck source=../lib/debian-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/debian-apt.sh"
aptdir="$cache/apt"
private_apt fetch-kernel "$aptdir" trixie trixie-backports
echo "fetch-kernel: updating package lists (trixie, trixie-backports) from $apt_mirror" >&2
apt-get "${apt_opts[@]}" -qq update >&2

# Newest version of the series in the suite: compare with dpkg's own ordering.
newest=""
for name in $(apt-cache "${apt_opts[@]}" pkgnames "linux-" |
  grep -E "^linux-(image|binary)-${series//./\\.}\.[0-9]+\+deb[0-9]+-amd64$"); do
  ver="${name#linux-image-}"
  ver="${ver#linux-binary-}"
  if [ -z "$newest" ] || dpkg --compare-versions "$ver" gt "$newest"; then newest="$ver"; fi
done
if [ -z "$newest" ]; then
  echo "fetch-kernel: no linux-image/linux-binary $series.*-amd64 package in $suite" >&2
  exit 1
fi
if [ "$series" = 6.12 ]; then
  pkgs=("linux-image-$newest")
else
  pkgs=("linux-binary-$newest" "linux-modules-$newest")
fi

work="$(mktemp -d "$cache/fetch-$series.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "fetch-kernel: downloading ${pkgs[*]}" >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download "${pkgs[@]}" >&2)
mkdir "$work/root"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
rm -f "$work"/*.deb

moddir="$work/root/usr/lib/modules/$newest"
if [ -f "$moddir/vmlinuz" ]; then
  vmlinuz="$moddir/vmlinuz"
else
  vmlinuz="$work/root/boot/vmlinuz-$newest"
fi
if [ ! -f "$vmlinuz" ] || [ ! -d "$moddir/kernel" ]; then
  echo "fetch-kernel: unexpected package layout: no vmlinuz or modules for $newest" >&2
  exit 1
fi
if [ -z "$(find "$moddir/kernel" -name 'ublk_drv.ko*' -print -quit)" ]; then
  echo "fetch-kernel: $newest has no ublk_drv module" >&2
  exit 1
fi
depmod -b "$work/root/usr" "$newest" 2>/dev/null

mkdir "$work/out"
mv "$vmlinuz" "$work/out/vmlinuz"
mv "$moddir" "$work/out/modules"
echo "$newest" >"$work/out/version"
rm -rf "$dest"
mv "$work/out" "$dest"
echo "fetch-kernel: cached $newest in $dest" >&2
echo "$dest"
