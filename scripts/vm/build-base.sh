#!/usr/bin/env bash
# Builds the test VM's base initramfs: busybox, the real tools of tools.list with their libraries,
# the project's Deno, the kernel modules of modules.list with their dependencies (decompressed, with
# a modules.dep of their own so the VM's modprobe works), and scripts/vm/init as /init.
# Usage: scripts/vm/build-base.sh KERNEL_CACHE_DIR DENO_BINARY OUT.cpio
# The project tree is not in here: vm.sh appends it per run as a second (overlay) archive.
# The archive is left uncompressed: under TCG the guest kernel took seconds to gunzip ~200 MB at
# every boot (uptime at the command ~20 s uncompressed vs ~40 s gzip'd, measured on a busy host),
# while the host only pays ~200 MB of disk in the cache and a page-cache copy per run.
set -euo pipefail

kdir="${1:?usage: build-base.sh KERNEL_CACHE_DIR DENO_BINARY OUT.cpio}"
deno_bin="${2:?usage: build-base.sh KERNEL_CACHE_DIR DENO_BINARY OUT.cpio}"
out="${3:?usage: build-base.sh KERNEL_CACHE_DIR DENO_BINARY OUT.cpio}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kver="$(cat "$kdir/version")"
hostpath=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

stage="$(mktemp -d "$(dirname "$out")/base-stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

# Merged-/usr layout like Debian's: /bin, /sbin, /lib, /lib64 point into /usr, so a tool is found
# under every path a test might spell it with (/sbin/losetup, /usr/sbin/losetup, /bin/...).
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc/fastloop,proc,sys,dev}
mkdir -p "$stage"/{tmp,run,root,mnt}
ln -s usr/bin "$stage/bin"
ln -s usr/sbin "$stage/sbin"
ln -s usr/lib "$stage/lib"
ln -s usr/lib64 "$stage/lib64"

elfs=()

# busybox first: every applet becomes a link, then real tools replace the links they cover.
busybox_bin="$(PATH=$hostpath command -v busybox)"
if ! "$busybox_bin" --list | grep -x ash >/dev/null; then
  echo "build-base: $busybox_bin is not a full busybox (install busybox-static)" >&2
  exit 1
fi
cp "$busybox_bin" "$stage/usr/bin/busybox"
for applet in $("$busybox_bin" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$stage/usr/bin/$applet"
done

# Real tools: the binary goes to its own resolved path; the name it is called by becomes a
# symlink to it in both /usr/bin and /usr/sbin, replacing any busybox applet link.
while read -r entry; do
  case "$entry" in '' | '#'*) continue ;; esac
  optional=0
  if [ "${entry#\?}" != "$entry" ]; then optional=1; entry="${entry#\?}"; fi
  src="$(PATH=$hostpath command -v "$entry" || true)"
  if [ -z "$src" ]; then
    if [ "$optional" = 1 ]; then continue; fi
    echo "build-base: tool '$entry' not found on the host (run scripts/install-deps.sh)" >&2
    exit 1
  fi
  real="$(readlink -f "$src")"
  if [ ! -e "$stage/$real" ] || [ -L "$stage/$real" ]; then
    mkdir -p "$stage/$(dirname "$real")"
    rm -f "$stage/$real"
    cp "$real" "$stage/$real"
    elfs+=("$real")
  fi
  for dir in usr/bin usr/sbin; do
    if [ "/$dir/$entry" != "$real" ]; then ln -sfn "$real" "$stage/$dir/$entry"; fi
  done
done <"$here/tools.list"
# /bin/sh is bash: busybox ash prefers its own applets over PATH, which would shadow real tools.
ln -sfn bash "$stage/usr/bin/sh"

cp "$deno_bin" "$stage/usr/local/bin/deno"
elfs+=("$deno_bin")

# Shared libraries of every copied binary, at their host paths; the dynamic loader's cache lists
# each directory they came from (some sit in subdirectories found through RUNPATH on the host).
libs="$(for bin in "${elfs[@]}"; do
  ldd "$bin" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u)"
for lib in $libs; do
  mkdir -p "$stage/$(dirname "$lib")"
  cp -L "$lib" "$stage/$lib"
done
for lib in $libs; do dirname "$lib"; done | sort -u >"$stage/etc/ld.so.conf"
ldconfig -r "$stage"

# Kernel modules: the closure of modules.list over modules.dep, decompressed (busybox insmod and
# older kmod cannot read .ko.xz), then depmod over that subset so modprobe resolves by name.
moddep="$kdir/modules/modules.dep"
declare -A path_of
while IFS= read -r line; do
  p="${line%%:*}"
  base="${p##*/}"
  base="${base%%.ko*}"
  path_of["${base//-/_}"]="$line"
done <"$moddep"
declare -A wanted
: >"$stage/etc/fastloop/modules"
while read -r entry; do
  case "$entry" in '' | '#'*) continue ;; esac
  kind=required
  case "$entry" in
    \?*) kind=optional; entry="${entry#\?}" ;;
    \~*) kind=copy; entry="${entry#\~}" ;;
  esac
  key="${entry//-/_}"
  line="${path_of[$key]:-}"
  if [ -z "$line" ]; then
    if grep -qE "/${entry//[-_]/[-_]}\.ko" "$kdir/modules/modules.builtin" 2>/dev/null; then
      continue
    fi
    if [ "$kind" = required ]; then
      echo "build-base: module '$entry' is neither in modules.dep nor built into $kver" >&2
      exit 1
    fi
    continue
  fi
  for p in ${line/:/ }; do wanted["$p"]=1; done
  if [ "$kind" != copy ]; then echo "$kind $entry" >>"$stage/etc/fastloop/modules"; fi
done <"$here/modules.list"
mdest="$stage/usr/lib/modules/$kver"
for p in "${!wanted[@]}"; do
  mkdir -p "$mdest/$(dirname "$p")"
  case "$p" in
    *.ko.xz) xz -dc "$kdir/modules/$p" >"$mdest/${p%.xz}" ;;
    *.ko.zst) zstd -qdc "$kdir/modules/$p" >"$mdest/${p%.zst}" ;;
    *.ko.gz) gzip -dc "$kdir/modules/$p" >"$mdest/${p%.gz}" ;;
    *) cp "$kdir/modules/$p" "$mdest/$p" ;;
  esac
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
  if [ -f "$kdir/modules/$f" ]; then cp "$kdir/modules/$f" "$mdest/$f"; fi
done
depmod -b "$stage" "$kver"

# Small /etc: root's identity for tools that look it up, mke2fs defaults as on the host.
echo 'root:x:0:0:root:/root:/bin/sh' >"$stage/etc/passwd"
echo 'root:x:0:' >"$stage/etc/group"
ln -s /proc/self/mounts "$stage/etc/mtab"
: >"$stage/etc/fstab"
if [ -f /etc/mke2fs.conf ]; then cp /etc/mke2fs.conf "$stage/etc/mke2fs.conf"; fi
echo "$kver" >"$stage/etc/fastloop/kernel"

# The kernel opens /dev/console for init before devtmpfs is mounted: give it a node (root only;
# init also redirects to the console once devtmpfs is up).
if [ "$(id -u)" = 0 ]; then
  mknod -m 600 "$stage/dev/console" c 5 1
  mknod -m 666 "$stage/dev/null" c 1 3
fi
install -m 0755 "$here/init" "$stage/init"

(cd "$stage" && find . -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --quiet --owner=0:0) >"$out.tmp.$$"
mv -f "$out.tmp.$$" "$out"
