#!/usr/bin/env bash
# Installs the Debian packages the test VM and the test suite need, only when some are missing.
# Idempotent and fast when everything is present: one dpkg-query, no apt-get, no network.
# Usage: scripts/install-deps.sh [--check]   (--check: list what is missing, exit 1 if anything is)
set -euo pipefail

# Why each package: qemu-system-x86 boots the VM; busybox-static is the VM's userland; fio, e2fsprogs,
# xfsprogs, util-linux, dmsetup, psmisc, coreutils, diffutils are the real tools copied into the VM
# (and used by host tests); kmod gives depmod/modprobe; cpio, gzip, xz-utils build the initramfs and
# unpack the kernel's modules; debian-archive-keyring verifies the trixie kernel packages; git lists
# the project tree that goes into the VM. gcc, libc6-dev and linux-libc-dev compile the ABI check
# (scripts/abi/*.c, run by test/host/abi.test.ts) against the kernel UAPI headers.
packages=(
  qemu-system-x86 busybox-static fio e2fsprogs xfsprogs util-linux kmod cpio gzip xz-utils
  psmisc dmsetup coreutils diffutils debian-archive-keyring git gcc libc6-dev linux-libc-dev
)

check_only=0
if [ "${1:-}" = "--check" ]; then check_only=1; fi

missing=()
# One query for all packages; a package dpkg never heard of is reported on stderr and has no line.
installed="$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${packages[@]}" 2>/dev/null || true)"
for p in "${packages[@]}"; do
  if ! grep -q "^$p ii" <<<"$installed"; then missing+=("$p"); fi
done

# scripts/setup.sh fetches Deno from the npm registry; it needs npm only when no Deno is at hand.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.tools/deno" ] && ! command -v deno >/dev/null 2>&1 &&
  ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi

if [ "${#missing[@]}" -eq 0 ]; then exit 0; fi
if [ "$check_only" = 1 ]; then
  echo "install-deps: missing: ${missing[*]}" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing packages (${missing[*]}) and not root: run as root or install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
