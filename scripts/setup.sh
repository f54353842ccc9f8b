#!/usr/bin/env bash
# Installs the project's Deno into .tools/ (git-ignored) from the npm registry, unless a
# `deno` 2.x is already on PATH. Idempotent: a second run only checks the version.
# Prints the path of the deno binary to use on stdout.
set -euo pipefail
DENO_VERSION="${FASTLOOP_DENO_VERSION:-2.9.6}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
local_deno="$tools/deno"

if [ -x "$local_deno" ] && "$local_deno" --version 2>/dev/null | grep -q "^deno $DENO_VERSION "; then
  echo "$local_deno"
  exit 0
fi
if command -v deno >/dev/null 2>&1 && deno --version 2>/dev/null | grep -q '^deno 2\.'; then
  command -v deno
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: Deno is not installed and npm is missing to fetch it (install nodejs/npm, or put deno 2.x on PATH)" >&2
  exit 1
fi
mkdir -p "$tools"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "setup: installing Deno $DENO_VERSION from the npm registry into .tools/" >&2
(cd "$work" && npm pack --silent "@deno/linux-x64-glibc@$DENO_VERSION" >/dev/null)
tar -xzf "$work"/deno-linux-x64-glibc-*.tgz -C "$work" package/deno
install -m 0755 "$work/package/deno" "$local_deno.tmp"
mv -f "$local_deno.tmp" "$local_deno"
"$local_deno" --version >&2
echo "$local_deno"
