#!/usr/bin/env bash
# Boots the fastloop test VM (a Debian kernel with ublk_drv under QEMU TCG) and runs one command
# inside it as root, in /fastloop (a copy of the project tree at its host path), with a scratch
# virtio disk /dev/vda.
# Streams the console to stdout and exits with the command's exit status; stage timings go to
# stderr. A VM that never reports the status (boot failure, panic, timeout) exits 125, loudly.
#
# Usage: scripts/vm.sh [--kernel 6.12|7.3] [--mem MiB] [--cpus N] [--one-host-thread]
#                      [--timeout SECONDS] [--boot-timeout SECONDS] [--disk-size SIZE]
#                      [--keep-disk PATH]
#                      [--append KERNEL-PARAMS] [--with DIR] [--refresh-kernel] [--crash-ok]
#                      [--] CMD ARGS...
#   --timeout S       whole run, boot included (default 2400); --boot-timeout S: boot to the
#                     command (default 300; a boot that does not get there is retried once)
#   --one-host-thread the vCPUs take turns on one host thread (TCG thread=single), for VMs that
#                     run side by side: the guest still has --cpus CPUs
#   --keep-disk PATH  use PATH as /dev/vda (created sparse if missing) and keep it afterwards, e.g.
#                     for a second boot of the same disk
#   --append PARAMS   extra kernel command line (e.g. "loglevel=7" to see the boot)
#   --with DIR        copy DIR (e.g. peers built outside the project for a benchmark) into the VM
#                     at /opt/with, which is put on the command's PATH
#   --refresh-kernel  look for a newer kernel package instead of reusing the cached one
#   --crash-ok        the command cuts the power itself (sysrq): a VM that stops after the command
#                     started, without an exit status, exits 0 instead of 125
# Environment: FASTLOOP_* variables and CI, NO_COLOR are passed into the VM's command;
# FASTLOOP_VM_ONE_HOST_THREAD=1 is --one-host-thread (scripts/test-all.sh sets it for its lanes).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/vm"

kernel=6.12
mem=3072
cpus=2
tcg_thread=multi
if [ "${FASTLOOP_VM_ONE_HOST_THREAD:-}" = 1 ]; then tcg_thread=single; fi
timeout_s=2400
boot_timeout_s=300
append=""
disk_size=8G
keep_disk=""
refresh=""
crash_ok=0
with_dir=""
usage() {
  sed -n '/^# Usage:/,/^# FASTLOOP_VM_ONE_HOST_THREAD/p' "${BASH_SOURCE[0]}" |
    sed 's/^# \{0,1\}//' >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel="${2:?--kernel needs 6.12 or 7.3}"; shift 2 ;;
    --mem) mem="${2:?--mem needs MiB}"; shift 2 ;;
    --cpus) cpus="${2:?--cpus needs a count}"; shift 2 ;;
    --one-host-thread) tcg_thread=single; shift ;;
    --timeout) timeout_s="${2:?--timeout needs seconds}"; shift 2 ;;
    --boot-timeout) boot_timeout_s="${2:?--boot-timeout needs seconds}"; shift 2 ;;
    --append) append="${2:?--append needs kernel parameters}"; shift 2 ;;
    --with) with_dir="${2:?--with needs a directory}"; shift 2 ;;
    --disk-size) disk_size="${2:?--disk-size needs a size}"; shift 2 ;;
    --keep-disk) keep_disk="${2:?--keep-disk needs a path}"; shift 2 ;;
    --refresh-kernel) refresh=--refresh; shift ;;
    --crash-ok) crash_ok=1; shift ;;
    --) shift; break ;;
    -h | --help) usage ;;
    -*) echo "vm.sh: unknown option '$1'" >&2; usage ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "vm.sh: no command given" >&2
  usage
fi
case "$kernel" in
  6.12 | 7.3) ;;
  *) echo "vm.sh: unsupported kernel '$kernel' (expected 6.12 or 7.3)" >&2; exit 2 ;;
esac

now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
stage_log() { echo "vm.sh: [$1] $2" >&2; }

mkdir -p "$cache"
run_tmp="$(mktemp -d "$cache/run.XXXXXX")"
disk=""
qemu_pid=""
cleanup() {
  if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
  rm -rf "$run_tmp"
  if [ -z "$keep_disk" ] && [ -n "$disk" ]; then rm -f "$disk"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. Host packages and Deno.
t0="$(now)"
bash "$root/scripts/install-deps.sh"
deno_bin="$(bash "$root/scripts/setup.sh")"
t1="$(now)"
stage_log deps "$(elapsed "$t0" "$t1") s"

# 2. Kernel (cached after the first fetch). Steps 2 and 3 write the shared cache (apt lists, kernel,
# base): one vm.sh at a time there, as several test runs may start together; the lock is released
# once this run has its own copy of the initrd.
exec 4>"$cache/lock"
flock 4
kdir="$(bash "$root/scripts/vm/fetch-kernel.sh" "$kernel" "$cache" $refresh)"
kver="$(cat "$kdir/version")"
t2="$(now)"
stage_log kernel "$(elapsed "$t1" "$t2") s ($kver)"

# 3. Base initramfs, rebuilt only when one of its inputs changed: the kernel, Deno, the host's
# packages the tools come from, and the scripts that define it.
base="$cache/base-$kernel.cpio"
key="$(
  {
    echo "$kver"
    "$deno_bin" --version | sed -n 1p
    stat -c '%s %Y' "$deno_bin"
    dpkg-query -W -f='${Package} ${Version}\n' busybox-static fio e2fsprogs xfsprogs util-linux \
      kmod coreutils diffutils psmisc dmsetup bash libc6 2>/dev/null || true
    cat "$root/scripts/vm/init" "$root/scripts/vm/tools.list" "$root/scripts/vm/modules.list" \
      "$root/scripts/vm/build-base.sh"
  } | sha256sum | cut -d' ' -f1
)"
if [ -f "$base" ] && [ "$(cat "$base.key" 2>/dev/null)" = "$key" ]; then
  base_note="cached"
else
  stage_log initramfs "building $base"
  bash "$root/scripts/vm/build-base.sh" "$kdir" "$deno_bin" "$base"
  echo "$key" >"$base.key"
  rm -f "$base.gz" "$base.gz.key" # gzip'd bases of earlier versions of this script
  base_note="rebuilt"
fi

# Per-run overlay: the project tree (tracked plus untracked non-ignored files, as the working tree
# has them) at the same absolute path as on the host, with /fastloop pointing at it; a Deno cache
# filled on the host for that tree; the command as /run-cmd; and a per-run nonce in the markers so
# that nothing the command prints (a test echoing a marker, an old log) is taken for them.
ov="$run_tmp/overlay"
vm_tree="$ov$root"
mkdir -p "$vm_tree" "$ov/etc/fastloop"
if [ -n "$with_dir" ]; then
  mkdir -p "$ov/opt/with"
  cp -a "$with_dir/." "$ov/opt/with/"
fi
if [ "$root" != /fastloop ]; then ln -s "$root" "$ov/fastloop"; fi
(
  cd "$root"
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard
  else
    find . -path ./.git -prune -o -type f -printf '%P\0'
  fi
) | (
  cd "$root"
  while IFS= read -r -d '' f; do
    case "$f" in .tools/* | .cache/* | .git/*) continue ;; esac
    if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
  done
) | (cd "$root" && cpio -pdm0 --quiet "$vm_tree")
# Deno keys its transpile and V8 code caches by module URL and source hash: filled here, on a real
# CPU, for the tree at the path it has in the VM, they spare every Deno process under TCG seconds of
# transpiling (a cold 'fastloop' call costs 5-7 s there). A failure here only costs that time.
deno_dir_vm=/var/cache/fastloop-deno
mkdir -p "$ov$deno_dir_vm"
(
  cd "$root" &&
    shopt -s nullglob &&
    DENO_DIR="$ov$deno_dir_vm" "$deno_bin" cache --quiet main.ts lib/device_queues.ts \
      test/vm/*.ts bench/*.ts &&
    for command in attach detach stat map doctor; do
      DENO_DIR="$ov$deno_dir_vm" "$deno_bin" run --allow-all --no-check --quiet main.ts \
        "$command" --help >/dev/null || exit
    done
) || stage_log initramfs "warning: could not pre-fill the Deno cache (Deno calls will be slower)"
nonce="$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
echo "$nonce" >"$ov/etc/fastloop/nonce"
{
  echo '#!/bin/bash'
  echo '# Written by scripts/vm.sh for one run.'
  for name in $(compgen -e); do
    case "$name" in
      FASTLOOP_* | CI | NO_COLOR) printf 'export %s=%q\n' "$name" "${!name}" ;;
    esac
  done
  # Colours in the console stream make logs and deno's summary lines hard to parse.
  if [ ! -t 1 ]; then echo 'export NO_COLOR=1'; fi
  echo "export DENO_DIR=$deno_dir_vm"
  if [ -n "$with_dir" ]; then echo 'export PATH="/opt/with:$PATH"'; fi
  # init mounts tmpfs on /tmp and /run, which hides a tree placed under them (a clone in /tmp):
  # show it again, at the same path, from a view of the initramfs without those mounts.
  printf 'tree=%q\n' "$root"
  echo 'if [ ! -e "$tree/main.ts" ]; then'
  echo '  { mkdir -p /.initramfs "$tree" && mount --bind / /.initramfs &&'
  echo '    mount --bind "/.initramfs$tree" "$tree"; } ||'
  echo '    { echo "vm: cannot show the tree at $tree again" >&2; exit 127; }'
  echo 'fi'
  echo 'cd /fastloop'
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$ov/run-cmd"
chmod 0755 "$ov/run-cmd"
initrd="$run_tmp/initrd.img"
(cd "$ov" && find . -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --quiet --owner=0:0) | gzip -1 >"$run_tmp/overlay.cpio.gz"
# Concatenated newc cpio archives (the base uncompressed, the overlay gzip'd): the kernel unpacks
# them in order, so the overlay's files land on top of the base.
cat "$base" "$run_tmp/overlay.cpio.gz" >"$initrd"
exec 4>&-
t3="$(now)"
stage_log initramfs "$(elapsed "$t2" "$t3") s (base $base_note, $(du -m "$base" | cut -f1) MiB;\
 overlay $(du -k "$run_tmp/overlay.cpio.gz" | cut -f1) KiB)"

# 4. Scratch disk: sparse, fresh per run unless --keep-disk names one to reuse.
if [ -n "$keep_disk" ]; then
  disk="$keep_disk"
  if [ ! -e "$disk" ]; then truncate -s "$disk_size" "$disk"; fi
else
  disk="$cache/scratch-$$.img"
  rm -f "$disk"
  truncate -s "$disk_size" "$disk"
fi
# cache=none needs O_DIRECT on the file's filesystem (tmpfs has none): probe with a read.
if dd if="$disk" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
  drive_cache="cache=none,aio=native"
else
  drive_cache="cache=writeback,aio=threads"
fi

# 5. Boot. stdin is /dev/null: CI has none, and QEMU must not read the terminal.
# request-merging=off: QEMU before 8.1 fails (EINVAL, an I/O error in the guest) a merged write of
# exactly 1024 iovecs that is not aligned to its request alignment, because padding it adds an
# iovec past IOV_MAX (fixed upstream by "block: Collapse padded I/O vecs exceeding IOV_MAX"). On a
# fresh sparse image QEMU cannot probe the alignment (O_DIRECT reads of a hole succeed at any
# size) and assumes 4 KiB. Eight adjacent 512 KiB writes at a 1 KiB offset (an ext4 with 1 KiB
# blocks on a fastloop device) are exactly that: the fstrim test failed 2 runs in 39 on Debian 12's
# QEMU 7.2, and 0 in 30 with this. The guest's block layer merges anyway.
qemu=(
  qemu-system-x86_64 -accel "tcg,thread=$tcg_thread" -cpu max -m "$mem" -smp "$cpus"
  -nographic -no-reboot -nic none
  -kernel "$kdir/vmlinuz" -initrd "$initrd"
  -append "console=ttyS0 quiet panic=-1${append:+ $append}"
  -drive "file=$disk,if=none,id=scratch,format=raw,$drive_cache"
  -device virtio-blk-pci,drive=scratch,request-merging=off
)
shopt -s extglob

# One boot: streams the console, sets t_start when the command starts, status when it reports,
# boot_stuck when it did not start within boot_timeout_s (QEMU is then killed).
boot_once() {
  status=""
  t_start=""
  boot_stuck=0
  local t_boot line left rc
  t_boot="$(now)"
  exec 3< <(exec timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1)
  qemu_pid=$!
  while :; do
    line=""
    if [ -z "$t_start" ] && [ "$boot_stuck" = 0 ]; then
      left="$(awk -v a="$t_boot" -v b="$(now)" -v t="$boot_timeout_s" \
        'BEGIN { l = t - (b - a); print (l > 0.1 ? l : 0.1) }')"
      rc=0
      IFS= read -r -t "$left" line <&3 || rc=$?
      if [ "$rc" -gt 128 ]; then
        if [ "$(elapsed "$t_boot" "$(now)" | cut -d. -f1)" -ge "$boot_timeout_s" ]; then
          boot_stuck=1
          kill "$qemu_pid" 2>/dev/null || true
        fi
        [ -n "$line" ] || continue
      elif [ "$rc" != 0 ] && [ -z "$line" ]; then
        break
      fi
    else
      IFS= read -r line <&3 || [ -n "$line" ] || break
    fi
    # The serial line ends lines with CR LF; a CR inside a line is a program redrawing it (deno
    # test on a tty does): keep what a terminal would show, the text after the last CR.
    line="${line%$'\r'}"
    line="${line##*$'\r'}"
    if [ -z "$t_start" ]; then
      # Before the command: firmware and kernel text, where SeaBIOS clears the screen with escapes.
      line="${line//$'\e'c/}"
      line="${line//$'\e'\[*([0-9;?])[a-zA-Z]/}"
    fi
    case "$line" in
      *"FASTLOOP-VM-START $nonce"*)
        t_start="$(now)"
        stage_log boot "$(elapsed "$t_boot" "$t_start") s to the command (guest${line##*"$nonce"})"
        continue
        ;;
      *"FASTLOOP-VM-EXIT $nonce "*)
        status="${line##*"FASTLOOP-VM-EXIT $nonce "}"
        status="${status%% *}"
        ;;
    esac
    printf '%s\n' "$line"
  done
  exec 3<&-
  qemu_rc=0
  wait "$qemu_pid" || qemu_rc=$?
  qemu_pid=""
}

# A boot that never reaches the command is retried once: nothing of the command has run yet, and
# under TCG on a loaded host a rare boot has been seen to hang (7.3, once in ~30 boots).
attempt=1
while :; do
  boot_once
  if [ -n "$t_start" ] || [ "$attempt" -ge 2 ]; then break; fi
  if [ "$boot_stuck" = 1 ]; then
    echo "vm.sh: the VM did not reach the command within $boot_timeout_s s: booting again" >&2
  else
    echo "vm.sh: the VM stopped before the command (QEMU exit status $qemu_rc): booting again" >&2
  fi
  attempt=$((attempt + 1))
done
t4="$(now)"

if [ -n "$t_start" ]; then
  stage_log command "$(elapsed "$t_start" "$t4") s (exit status ${status:-none})"
fi
if ! [[ "$status" =~ ^[0-9]+$ ]] && [ "$crash_ok" = 1 ] && [ -n "$t_start" ] &&
  [ "$qemu_rc" != 124 ]; then
  # QEMU exits on the guest's reset (-no-reboot): the power cut the command asked for.
  echo "vm.sh: the VM stopped without an exit status, as --crash-ok expects (QEMU exit status $qemu_rc)" >&2
  stage_log total "$(elapsed "$t0" "$t4") s"
  exit 0
fi
if ! [[ "$status" =~ ^[0-9]+$ ]]; then
  if [ "$boot_stuck" = 1 ]; then
    why="the command did not start within $boot_timeout_s s of boot, twice"
  elif [ "$qemu_rc" = 124 ]; then
    why="timed out after $timeout_s s"
  elif [ -z "$t_start" ]; then
    why="the command never started (boot failure or kernel panic; QEMU exit status $qemu_rc)"
  else
    why="the command started but no exit status came back (QEMU exit status $qemu_rc)"
  fi
  echo "vm.sh: FAILED: the VM ($kver) did not report an exit status: $why" >&2
  exit 125
fi
stage_log total "$(elapsed "$t0" "$t4") s"
exit "$status"
