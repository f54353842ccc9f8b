#!/usr/bin/env bash
# Runs the path-sensitive parts of the project from a copy of this tree at an awkward path, as a
# fresh clone there would: under /tmp, inside a 0700 directory (like a clone in /root), in a
# directory whose name has a space.
#   host: the host tests that run fastloop as a user without privileges (who cannot read a tree
#         under a 0700 directory) and those that find the tree from their own URL;
#   vm:   one VM boot (kernel 7.3) running test/vm/tree_path.test.ts: the VM's init mounts tmpfs
#         on /tmp and /run, over where vm.sh places the tree, and the Deno cache vm.sh fills on
#         the host is keyed by the tree's path.
# The copy has the working tree's files (tracked and untracked, not ignored ones, as vm.sh ships
# them), a .tools of its own with this tree's Deno (as a clone has; copied with its times, so the
# VM base image stays cached) and this tree's .cache (kernels and VM base images, not rebuilt).
# Usage: scripts/test-any-path.sh host|vm     (as root; exits non-zero when a test failed)
set -euo pipefail

part="${1:-}"
case "$part" in
  host | vm) ;;
  *) echo "usage: scripts/test-any-path.sh host|vm" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deno_bin="$(bash "$root/scripts/setup.sh")"
base="$(mktemp -d /tmp/fastloop-any-path.XXXXXX)" # 0700, as mktemp makes it
trap 'rm -rf "$base"' EXIT
clone="$base/a clone"
mkdir -p "$clone/.tools"
(
  cd "$root"
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done |
    cpio -pdm0 --quiet "$clone"
)
cp -p "$deno_bin" "$clone/.tools/deno"
ln -s "$(readlink -f "$root/.cache")" "$clone/.cache"
cd "$clone"
echo "test-any-path: a copy of the tree at '$clone' (parent mode $(stat -c %a "$base"))" >&2

status=0
if [ "$part" = host ]; then
  .tools/deno test --allow-all --no-check test/host/cli_errors.test.ts \
    test/host/recover_cli.test.ts test/host/main_cli.test.ts test/host/direct_path.test.ts ||
    status=$?
else
  bash scripts/vm.sh --kernel 7.3 --timeout 600 -- \
    deno test --allow-all --no-check test/vm/tree_path.test.ts || status=$?
fi
exit "$status"
