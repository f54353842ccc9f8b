// `fastloop recover` refusals, on any host (no ublk needed): each case that cannot be recovered
// is one line on stderr with its documented exit code, decided from the registry record and
// /proc before the kernel is asked. Records are written by the test into a private state
// directory (FASTLOOP_RUN_DIR); the processes they name are real ones (this test, a reaped child).

import assert from "node:assert/strict";
import { assertOneLineError, fastloop, type Run } from "./cli_support.ts";

function recover(args: string[], runDir: string, asUser?: number): Promise<Run> {
  return fastloop(["recover", ...args], { runDir, asUser });
}

function startTicks(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19]);
}

/** A pid that is certainly dead: a child that has exited and been reaped. */
async function deadPid(): Promise<number> {
  const child = new Deno.Command("true").spawn();
  await child.status;
  return child.pid;
}

const isRoot = Deno.uid() === 0;

Deno.test({
  name: "recover refuses what it cannot recover, with one line and a stable exit code",
  ignore: !isRoot,
  async fn() {
    const dir = Deno.makeTempDirSync({ prefix: "fastloop-recover-" });
    const runDir = `${dir}/run`;
    Deno.mkdirSync(runDir, { mode: 0o700 });
    const file = `${dir}/f.img`;
    Deno.writeFileSync(file, new Uint8Array(1 << 20));
    const st = Deno.statSync(file);
    const dead = await deadPid();
    const me = { pid: Deno.pid, startTicks: startTicks(Deno.pid) };
    const write = (id: number, extra: Record<string, unknown>) =>
      Deno.writeTextFileSync(
        `${runDir}/ublkb${id}.json`,
        JSON.stringify({
          version: 1,
          id,
          blockPath: `/dev/ublkb${id}`,
          charPath: `/dev/ublkc${id}`,
          file: { path: file, dev: String(st.dev), ino: String(st.ino) },
          server: { pid: dead, startTicks: 1 },
          startedAt: new Date().toISOString(),
          logPath: `${runDir}/none.log`,
          socketPath: `${runDir}/ublkb${id}.sock`,
          options: { readOnly: false, queues: 1, depth: 128, recoverable: true },
          ...extra,
        }),
      );
    try {
      write(1, { server: me }); // its server runs (this process)
      write(2, { supervisor: me }); // server dead, supervisor alive: recovering already
      write(3, { options: { readOnly: false, queues: 1, depth: 128, recoverable: false } });
      const cases: Array<[string[], number, RegExp]> = [
        [[], 2, /expected exactly one DEV, got 0/],
        [["1", "2"], 2, /expected exactly one DEV, got 2/],
        [["--bogus", "1"], 2, /Unknown option '--bogus'/],
        [["/dev/ublkb9"], 7, /\/dev\/ublkb9 is not a fastloop device/],
        [["/dev/null"], 7, /\/dev\/null is not a fastloop device/],
        [["ublkb1"], 4, /\/dev\/ublkb1 is healthy: its server \(pid [0-9]+\) is running/],
        [["2"], 4, /\/dev\/ublkb2 is being recovered already by its supervisor/],
        [["/dev/ublkb3"], 3, /cannot be recovered: it was attached with --no-recover/],
      ];
      for (const [args, code, pattern] of cases) {
        assertOneLineError(await recover(args, runDir), code, pattern);
      }
      assertOneLineError(await recover(["1"], runDir, 65534), 6, /must run as root/);
      const help = await recover(["--help"], runDir);
      assert.equal(help.code, 0);
      assert.match(help.stdout, /^Usage: fastloop recover DEV/);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});
