#!/usr/bin/env bash
# deno task build: compiles fastloop into one executable ./fastloop with `deno compile`.
# `deno compile` needs the `denort` runtime matching this Deno. It downloads it unless
# DENORT_BIN names a local copy; where neither works, say so in one line and fail.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deno="$("$root/scripts/setup.sh")" || exit 1
out="${1:-$root/fastloop}"
cd "$root"

if [ -n "${DENORT_BIN:-}" ] && [ ! -x "$DENORT_BIN" ]; then
  echo "build: DENORT_BIN=$DENORT_BIN is not an executable file" >&2
  exit 1
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# The queue Worker is loaded by URL at run time, so it must be named to be embedded.
if "$deno" compile --quiet --allow-all --include lib/device_queues.ts --output "$out" main.ts \
  >"$log" 2>&1; then
  echo "build: wrote $out ($(du -h "$out" | cut -f1))"
  exit 0
fi
if grep -qiE 'denort|dl\.deno\.land|dns error|download|lookup address|connect' "$log"; then
  echo "build: deno compile could not obtain its denort runtime (no network to download it);" \
    "set DENORT_BIN to a denort $("$deno" --version | head -1 | cut -d' ' -f2) binary and rerun" >&2
else
  echo "build: deno compile failed:" >&2
  sed 's/^/  /' "$log" >&2
fi
exit 1
