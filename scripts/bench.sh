#!/usr/bin/env bash
# deno task bench: the benchmarks, side by side in one run.
#  1. host: Deno.bench of the extent cache and the io_uring ring (real CPU, no VM), then
#     bench/engine_bench.ts: the request engine without ublk next to fio on a loop-mounted ext4
#     image (needs root; skipped with a note otherwise);
#  2. VM: fio against the raw device region, loop, loop --direct-io and fastloop, plus the
#     sparse-file copy, in one boot per kernel (scripts/vm.sh). Tables go to bench-results/.
# Usage: scripts/bench.sh [--kernel 6.12|7.3|all] [--host-only|--vm-only] [--engine-args "ARGS"]
#                         [-- VM_BENCH_ARGS...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kernels="6.12 7.3"
host=1
vm=1
engine_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) [ "${2:-}" = all ] && kernels="6.12 7.3" || kernels="${2:?--kernel needs a value}"; shift 2 ;;
    --host-only) vm=0; shift ;;
    --vm-only) host=0; shift ;;
    --engine-args) engine_args="${2?--engine-args needs a value}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench: unknown argument '$1' (see scripts/bench.sh --help)" >&2; exit 2 ;;
  esac
done
deno="$("$root/scripts/setup.sh")"
mkdir -p bench-results
if [ "$host" = 1 ]; then
  benches=$(ls bench/*.bench.ts test/host/*.bench.ts 2>/dev/null || true)
  if [ -n "$benches" ]; then
    # shellcheck disable=SC2086
    "$deno" bench --allow-all --no-check $benches | tee bench-results/host.txt
  fi
  if [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    "$deno" run --allow-all --no-check bench/engine_bench.ts $engine_args \
      | tee bench-results/engine.md
  else
    echo "bench: skipping bench/engine_bench.ts (needs root for losetup and mount)" >&2
  fi
fi
if [ "$vm" = 1 ]; then
  for k in $kernels; do
    bash scripts/vm.sh --kernel "$k" -- deno run --allow-all --no-check bench/vm_bench.ts "$@" \
      | tee "bench-results/vm-$k.log"
  done
fi
