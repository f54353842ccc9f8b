// `fastloop restart` refusals, on any host (no ublk needed): each device that cannot be
// restarted is one line on stderr with its documented exit code, decided from the registry
// record, /proc and the server's answer before the kernel is asked, and nothing is started.
// Records are written by the test into a private state directory (FASTLOOP_RUN_DIR); the
// processes they name are real ones (this test, a reaped child), and the "server" that answers
// on a control socket is this test too.

import assert from "node:assert/strict";
import { assertOneLineError, fastloop, filesUnder, HAS_UBLK, type Run } from "./cli_support.ts";

function restart(args: string[], runDir: string, asUser?: number): Promise<Run> {
  return fastloop(["restart", ...args], { runDir, asUser });
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

/** Answers every request on `path` with `reply` (a running server, as far as restart can tell). */
function fakeServer(path: string, reply: Record<string, unknown>): Deno.Listener {
  const listener = Deno.listen({ transport: "unix", path });
  (async () => {
    for await (const conn of listener) {
      (async () => {
        try {
          await conn.read(new Uint8Array(4096));
          await conn.write(new TextEncoder().encode(JSON.stringify(reply) + "\n"));
        } catch {
          // The client went away.
        } finally {
          conn.close();
        }
      })();
    }
  })().catch(() => {});
  return listener;
}

/** __server processes started from this test's state directory: restart must start none. */
function serversFor(runDir: string): number[] {
  const pids: number[] = [];
  for (const p of Deno.readDirSync("/proc")) {
    if (!/^[0-9]+$/.test(p.name)) continue;
    try {
      const argv = Deno.readTextFileSync(`/proc/${p.name}/cmdline`);
      if (argv.includes("__server") && argv.includes(runDir)) pids.push(Number(p.name));
    } catch {
      // Exited meanwhile.
    }
  }
  return pids;
}

const isRoot = Deno.uid() === 0;

Deno.test({
  name: "restart refuses what it cannot restart, with one line and a stable exit code",
  ignore: !isRoot,
  async fn() {
    const dir = Deno.makeTempDirSync({ prefix: "fastloop-restart-" });
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
          server: me,
          startedAt: new Date().toISOString(),
          logPath: `${runDir}/none.log`,
          socketPath: `${runDir}/ublkb${id}.sock`,
          options: { readOnly: false, queues: 1, depth: 128, recoverable: true },
          ...extra,
        }),
      );
    const listeners: Deno.Listener[] = [];
    try {
      write(1, { server: { pid: dead, startTicks: 1 } }); // server and supervisor gone
      write(2, { server: { pid: dead, startTicks: 1 }, supervisor: me }); // being recovered
      write(3, { options: { readOnly: false, queues: 1, depth: 128, recoverable: false } });
      write(4, {}); // its server runs (this process) but nothing answers on its socket
      write(5, {}); // an older server: its ping does not offer a hand-over
      listeners.push(fakeServer(`${runDir}/ublkb5.sock`, { ok: true, pid: Deno.pid }));
      write(6, {}); // a server being taken over already
      Deno.writeTextFileSync(
        `${runDir}/ublkb6.takeover.json`,
        JSON.stringify({ ...me, supervisorPid: Deno.pid, program: "fastloop test" }),
      );
      // A setting this fastloop cannot pass on (one a newer attach recorded).
      write(7, {
        options: { readOnly: false, queues: 1, depth: 128, recoverable: true, region: "0:1M" },
      });
      write(8, {}); // a current server: the kernel comes next, and this host has no ublk
      listeners.push(
        fakeServer(`${runDir}/ublkb8.sock`, { ok: true, pid: Deno.pid, handOver: true }),
      );
      const cases: Array<[string[], number, RegExp]> = [
        [[], 2, /restart: expected DEV, FILE or --all/],
        [["--all", "1"], 2, /give devices or --all, not both/],
        [["--bogus", "1"], 2, /Unknown option '--bogus'/],
        [["--json=1", "1"], 2, /does not take an argument/],
        [["/dev/ublkb9"], 7, /\/dev\/ublkb9 is not attached/],
        [["/dev/null"], 7, /\/dev\/null is not attached/],
        [
          ["ublkb1"],
          3,
          /cannot be restarted: its server \(pid [0-9]+\) is not running; 'fastloop recover/,
        ],
        [["2"], 4, /has no running server: its supervisor \(pid [0-9]+\) is bringing one back/],
        [["/dev/ublkb3"], 3, /cannot be restarted: it was attached with --no-recover/],
        [["4"], 1, /its server \(pid [0-9]+\) does not answer on/],
        [["5"], 3, /runs an older fastloop that cannot hand a device over/],
        [["6"], 4, /is being restarted already: server [0-9]+ is taking it over/],
        [["7"], 3, /attached with setting\(s\) this fastloop cannot pass on: region/],
      ];
      if (!HAS_UBLK) cases.push([["8"], 5, /ublk is not available/]);
      for (const [args, code, pattern] of cases) {
        assertOneLineError(await restart(args, runDir), code, pattern, args.join(" "));
      }
      assertOneLineError(await restart(["1"], runDir, 65534), 6, /must run as root/);
      // Several at once: one line per device that fails, the first failure's exit code.
      const some = await restart(["1", "ublkb3", "9"], runDir);
      assert.equal(some.code, 3, some.stderr);
      assert.equal(some.stderr.trim().split("\n").length, 3, some.stderr);
      assert.equal(some.stdout, "");
      const help = await restart(["--help"], runDir);
      assert.equal(help.code, 0);
      assert.match(help.stdout, /^Usage: fastloop restart DEV\|FILE\.\.\./);
      assert.deepEqual(serversFor(runDir), [], "no server or supervisor was started");
      // Nothing was added to the state directory (no takeover marker, log or lock).
      const left = filesUnder(runDir).filter((f) => !/^ublkb[0-9]\.(json|sock)$/.test(f));
      assert.deepEqual(left, ["ublkb6.takeover.json"]);
    } finally {
      for (const l of listeners) l.close();
      Deno.removeSync(dir, { recursive: true });
    }
  },
});
