#!/usr/bin/env bash
# deno task soak: the long load and leak run (bench/soak.ts) in the test VM, on one or both
# kernels: DEVICES files attached at once under mixed fio verify for DURATION seconds with each
# server's and supervisor's memory sampled (printed as a table, asserted flat), then CYCLES
# attach/detach cycles with the leak counts (devices, ublk ids, processes, leases, fds, registry)
# printed as they go and asserted unchanged. Exits non-zero when anything failed.
# Usage: scripts/soak.sh [--kernel 6.12|7.3|all] [--devices N] [--duration S] [--cycles N]
#                        [--size-mib N] [--sample-s S]
# Defaults: --kernel 6.12, 8 devices x 64 MiB, 600 s, 200 cycles, a sample every 10 s.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kernels=6.12
soak_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) [ "${2:-}" = all ] && kernels="6.12 7.3" || kernels="${2:?--kernel needs a value}"; shift 2 ;;
    --devices | --duration | --cycles | --size-mib | --sample-s)
      soak_args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak: unknown argument '$1' (see scripts/soak.sh --help)" >&2; exit 2 ;;
  esac
done
status=0
for k in $kernels; do
  echo "=== soak: kernel $k" >&2
  # The run's own bound: the soak plus generous room for attaches and cycles under TCG.
  bash scripts/vm.sh --kernel "$k" --timeout 14400 -- \
    deno run --allow-all --no-check bench/soak.ts "${soak_args[@]}" || status=$?
done
exit "$status"
