// The project tree in the VM (scripts/vm.sh): at its host path, which /fastloop links to, whatever
// that path is (under /tmp or /run, where the VM's init mounts tmpfs; with a space in it), and
// with the Deno cache vm.sh filled on the host for that path in use: a fastloop call transpiles
// nothing. scripts/test-any-path.sh runs this file from a copy of the tree at such a path.

import assert from "node:assert/strict";
import { fastloop } from "./support.ts";

/** Every file under `dir` with its size and modification time. */
function snapshot(dir: string, into = new Map<string, string>()): Map<string, string> {
  for (const e of Deno.readDirSync(dir)) {
    const path = `${dir}/${e.name}`;
    if (e.isDirectory) snapshot(path, into);
    else {
      const st = Deno.statSync(path);
      into.set(path, `${st.size} ${st.mtime?.getTime()}`);
    }
  }
  return into;
}

Deno.test("the tree is at its host path and fastloop runs from the Deno cache filled for it", async () => {
  const tree = Deno.realPathSync("/fastloop");
  const here = decodeURIComponent(new URL("../../", import.meta.url).pathname).slice(0, -1);
  assert.equal(here, tree, "this test runs from the tree /fastloop links to");
  assert.equal(Deno.cwd(), tree, "the command runs in the tree");
  const gen = `${Deno.env.get("DENO_DIR")}/gen`;
  const before = snapshot(gen);
  assert.ok(
    [...before.keys()].some((p) => p.endsWith("/main.ts.js")),
    `the cache vm.sh filled holds main.ts (${before.size} files under ${gen})`,
  );
  const r = await fastloop(["doctor"]);
  assert.equal(r.code, 0, `fastloop doctor: ${r.stderr}${r.stdout}`);
  const after = snapshot(gen);
  const changed = [...after].filter(([p, v]) => before.get(p) !== v).map(([p]) => p);
  assert.deepEqual(changed, [], "no module transpiled again (the cache matches the tree's path)");
});
