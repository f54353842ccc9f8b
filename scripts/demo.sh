#!/usr/bin/env bash
# The README's demo command: runs scripts/demo-steps.sh directly when this kernel has ublk, and
# inside the test VM (scripts/vm.sh, a Debian kernel with ublk_drv) when it has not.
# Usage: scripts/demo.sh [--vm] [--kernel 6.12|7.3]   (--vm: use the VM even if the host has ublk)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kernel=6.12
force_vm=0
while [ $# -gt 0 ]; do
  case "$1" in
    --vm) force_vm=1; shift ;;
    --kernel) kernel="${2:?--kernel needs 6.12 or 7.3}"; shift 2 ;;
    *) echo "demo.sh: unknown argument '$1' (usage: demo.sh [--vm] [--kernel 6.12|7.3])" >&2; exit 2 ;;
  esac
done

host_has_ublk() {
  [ -e /dev/ublk-control ] && return 0
  [ "$(id -u)" = 0 ] && modprobe ublk_drv 2>/dev/null && [ -e /dev/ublk-control ]
}

if [ "$force_vm" = 0 ] && host_has_ublk; then
  echo "demo: this kernel has ublk: running on the host" >&2
  bash "$root/scripts/setup.sh" >/dev/null
  export PATH="$root/.tools:$PATH"
  exec bash "$root/scripts/demo-steps.sh"
fi
echo "demo: no ublk on this kernel ($(uname -r)): running in the test VM (kernel $kernel)" >&2
exec bash "$root/scripts/vm.sh" --kernel "$kernel" -- bash scripts/demo-steps.sh
