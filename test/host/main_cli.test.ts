import assert from "node:assert/strict";

const root = decodeURIComponent(new URL("../../", import.meta.url).pathname);

async function run(cmd: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(cmd[0]!, {
    args: cmd.slice(1),
    cwd: root,
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
}

const fastloop = (...args: string[]) =>
  run([Deno.execPath(), "run", "--allow-all", "--no-check", "main.ts", ...args]);

Deno.test("fastloop --help lists every command and exits 0", async () => {
  const r = await fastloop("--help");
  assert.equal(r.code, 0);
  for (const name of ["attach", "detach", "stat", "restart", "recover", "map", "doctor"]) {
    assert.match(r.stdout, new RegExp(`^  ${name} `, "m"));
  }
});

Deno.test("fastloop with no command prints usage and exits 2", async () => {
  const r = await fastloop();
  assert.equal(r.code, 2);
  assert.match(r.stdout, /^Usage: fastloop COMMAND/);
});

Deno.test("an unknown command is one line on stderr with exit 2", async () => {
  const r = await fastloop("frobnicate");
  assert.equal(r.code, 2);
  assert.equal(r.stderr.trim().split("\n").length, 1);
  assert.match(r.stderr, /Unknown command "frobnicate"/);
  assert.doesNotMatch(r.stderr, /at .*\.ts:\d+/);
});

Deno.test("deno task build fails in one line naming DENORT_BIN when denort cannot be had", async () => {
  // This machine has no network for deno compile's denort download; where a DENORT_BIN is
  // given (or the download works) the build must instead produce a runnable binary.
  const out = `${await Deno.makeTempDir()}/fastloop`;
  try {
    const r = await run(["bash", "scripts/build.sh", out]);
    if (r.code === 0) {
      const v = await run([out, "--version"]);
      assert.equal(v.code, 0);
      assert.match(v.stdout, /^fastloop \d+\.\d+\.\d+/);
    } else {
      assert.equal(r.code, 1);
      const lines = r.stderr.trim().split("\n");
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0]!, /DENORT_BIN/);
    }
  } finally {
    await Deno.remove(out.replace(/\/fastloop$/, ""), { recursive: true });
  }
});

Deno.test("deno task build rejects a DENORT_BIN that is not an executable", async () => {
  const r = await run(["bash", "scripts/build.sh", "/nonexistent/out"], {
    DENORT_BIN: "/nonexistent/denort",
  });
  assert.equal(r.code, 1);
  assert.match(r.stderr, /DENORT_BIN=\/nonexistent\/denort is not an executable file/);
});
