// Servers that keep dying, with the supervisor's default settings (lib/supervisor.ts): the device
// is never given up. Its IO waits in the kernel (ublk user recovery) while the supervisor keeps
// starting servers with growing pauses, `stat` and the kernel log say what is happening, and once
// the cause is gone the waiting IO completes and nothing acknowledged is lost.
// Two kinds of crash loop: servers that die before they are ready (the backing file is gone),
// and a request that kills every server that serves it (fault injection:
// FASTLOOP_FAULT_POISON_FILE). Oracles: cmp against references on tmpfs, fio's crc32c verify,
// /sys/block (the device stays), dmesg (no IO error for the device).

import assert from "node:assert/strict";
import { CRASH_LOOP_DEATHS } from "../../lib/supervisor.ts";
import {
  attach,
  completedIos,
  detach,
  dmesgSince,
  fastloop,
  ok,
  recordOf,
  registryFiles,
  running,
  serverProcesses,
  uptime,
  waitFor,
  withHostFs,
} from "./support.ts";

const MIB = 1024 * 1024;
/** More than the 5 deaths in 60 s after which the old supervisor deleted the device. */
const DEATHS = 6;

interface Supervision {
  state: string;
  deaths: number;
  quickDeaths: number;
  crashLoop: boolean;
  lastDeath?: { how: string; cause: string };
  nextTryAt?: string;
}

interface Row {
  server: { pid: number; state: string };
  supervisor?: Supervision;
  note?: string;
  mode?: string;
}

async function statRow(dev: string): Promise<Row> {
  const r = await fastloop(["stat", "--json", dev]);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as Row[])[0]!;
}

function deviceExists(dev: string): boolean {
  try {
    Deno.statSync(`/sys/block/${dev.slice(5)}`);
    return true;
  } catch {
    return false;
  }
}

/**
 * Polls `stat` while the device's servers keep dying, until `deaths` deaths; checks on the way
 * that the device stays and `stillWaiting` holds (the IO has not failed). Returns the last row.
 */
async function watchDeaths(dev: string, deaths: number, stillWaiting: () => boolean) {
  let row = await statRow(dev);
  await waitFor(`${deaths} server deaths`, async () => {
    row = await statRow(dev);
    assert.ok(deviceExists(dev), `${dev} stays while its servers die: ${JSON.stringify(row)}`);
    assert.ok(stillWaiting(), `the IO waits instead of failing: ${JSON.stringify(row)}`);
    return (row.supervisor?.deaths ?? 0) >= deaths && row.server.state === "crash-loop";
  }, 300_000);
  return row;
}

/** A stat table that shows the crash loop with the cause and the next try, as a person sees it. */
async function assertTableShowsCrashLoop(dev: string, cause: RegExp): Promise<void> {
  // A server that the poison kills is alive for a moment: catch the table between two servers.
  let table = await fastloop(["stat", dev]);
  await waitFor("the table shows the crash loop", async () => {
    table = await fastloop(["stat", dev]);
    assert.equal(table.code, 0, table.stderr);
    return /crash-loop\(/.test(table.stdout);
  }, 120_000);
  const note = table.stdout.split("\n").find((l) => l.startsWith(`${dev.slice(5)}: server died`));
  assert.ok(note, `a note line under the table: ${table.stdout}`);
  assert.match(note, /crash loop/);
  assert.match(note, cause);
  assert.match(note, /IO waits since/);
  assert.match(note, /next server in [0-9]+ s|a new server is starting/);
  assert.match(note, /detach --force/);
}

/** No IO error on the device in the kernel log since `from` (uptime), and the crash-loop line. */
async function assertNoIoErrors(dev: string, from: number): Promise<void> {
  const dmesg = await dmesgSince(from);
  const name = dev.slice(5);
  assert.doesNotMatch(dmesg, new RegExp(`I/O error, dev ${name}\\b`), "no IO error on the device");
  assert.match(dmesg, new RegExp(`fastloop: ${name}: crash loop`), "the kernel log says why");
}

Deno.test(`servers that die before they are ready (the file is gone) ${DEATHS} times: IO waits, stat shows the crash loop, and once the file is back fio verifies and nothing acknowledged is lost`, async () => {
  await withHostFs(async (mnt, tmp) => {
    const file = `${mnt}/gone.img`;
    await ok("truncate", ["-s", "64M", file]);
    await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref`, "bs=1M", "count=16", "status=none"]);
    const from = uptime();
    const dev = await attach(file);
    await ok("dd", [`if=${tmp}/ref`, `of=${dev}`, "bs=1M", "oflag=direct", "conv=fsync"]);
    const fio = new Deno.Command("fio", {
      args: [
        "--name=waits",
        `--filename=${dev}`,
        "--offset=32M",
        "--size=16M",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_backlog=256",
        "--do_verify=1",
        "--verify_fatal=1",
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let fioDone = false;
    const fioOut = fio.output().finally(() => (fioDone = true));
    try {
      const before = completedIos(dev);
      await waitFor("fio under way", () => completedIos(dev) >= before + 200, 120_000);
      // Every new server fails at start-up: the file it must serve is not there.
      Deno.renameSync(file, `${file}.away`);
      const victim = recordOf(dev).server.pid;
      Deno.kill(victim, "SIGKILL");
      const row = await watchDeaths(dev, DEATHS, () => !fioDone);
      assert.ok(row.supervisor!.quickDeaths >= CRASH_LOOP_DEATHS, JSON.stringify(row));
      assert.match(row.supervisor!.lastDeath!.cause, /could not start: .*gone\.img/);
      assert.match(String(row.note), /IO waits/);
      await assertTableShowsCrashLoop(dev, /could not start/);
      Deno.renameSync(`${file}.away`, file);
      await waitFor("a server serves again", async () => {
        const r = await statRow(dev);
        return r.server.state === "running" && r.supervisor?.state === "serving";
      }, 120_000);
    } finally {
      const out = await fioOut;
      const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      assert.equal(out.code, 0, `fio verify across the outage: ${text}`);
    }
    await ok("cmp", ["-n", String(16 * MIB), dev, `${tmp}/ref`]);
    await assertNoIoErrors(dev, from);
    await detach(dev);
    await ok("cmp", ["-n", String(16 * MIB), file, `${tmp}/ref`]);
    assert.deepEqual(registryFiles(), [], "no record, half-written record or socket left");
  });
});

Deno.test("a request that kills every server that serves it: IO waits, stat shows the crash loop, and once the cause is gone the request completes and nothing acknowledged is lost", async () => {
  await withHostFs(async (mnt, tmp) => {
    const file = `${mnt}/poison.img`;
    const poison = `${tmp}/poison`;
    await ok("truncate", ["-s", "64M", file]);
    await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref`, "bs=1M", "count=8", "status=none"]);
    await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref2`, "bs=1M", "count=1", "status=none"]);
    const env = { FASTLOOP_FAULT_POISON_FILE: poison };
    const from = uptime();
    const dev = await attach(file, [], { env });
    await ok("dd", [`if=${tmp}/ref`, `of=${dev}`, "bs=1M", "oflag=direct", "conv=fsync"]);
    // Servers read the poison at start-up: arm it, then replace the server once.
    Deno.writeTextFileSync(poison, String(40 * MIB + 4096));
    const first = recordOf(dev).server.pid;
    Deno.kill(first, "SIGKILL");
    await waitFor("a server with the poison", () => {
      const pid = recordOf(dev).server.pid;
      return pid !== first && running(pid);
    }, 120_000);
    const write = new Deno.Command("dd", {
      args: [`if=${tmp}/ref2`, `of=${dev}`, "bs=1M", "seek=40", "oflag=direct", "conv=fsync"],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let writeDone = false;
    const writeOut = write.output().finally(() => (writeDone = true));
    try {
      const row = await watchDeaths(dev, DEATHS, () => !writeDone);
      assert.match(row.supervisor!.lastDeath!.how, /signal SIGKILL|signal 9/);
      // The reissued request reaches a new server as soon as its recovery ends, which can be
      // before or after it says ready; never does a server fail to start or time out.
      assert.match(
        row.supervisor!.lastDeath!.cause,
        /died [0-9.]+ s after it was ready|died before it was ready/,
      );
      await assertTableShowsCrashLoop(dev, /after it was ready|before it was ready/);
    } finally {
      // However the checks above ended, the cause goes, and the write gets a bounded time to
      // complete: a write still waiting fails the test (with the diagnostics) instead of hanging.
      try {
        Deno.removeSync(poison);
      } catch { /* removed already */ }
      let timer: ReturnType<typeof setTimeout> | undefined;
      const waited = await Promise.race([
        writeOut.then(() => true),
        new Promise<boolean>((r) => (timer = setTimeout(() => r(false), 180_000))),
      ]);
      clearTimeout(timer);
      if (!waited) {
        write.kill("SIGKILL");
        assert.fail(`the waiting write did not complete within 180 s of the cause going away`);
      }
      const out = await writeOut;
      assert.equal(
        out.code,
        0,
        `the waiting write completes: ${new TextDecoder().decode(out.stderr)}`,
      );
    }
    await ok("cmp", ["-n", String(8 * MIB), dev, `${tmp}/ref`]);
    await ok("cmp", ["-i", `${40 * MIB}:0`, "-n", String(MIB), dev, `${tmp}/ref2`]);
    await assertNoIoErrors(dev, from);
    await waitFor("the supervisor sees the device served", async () => {
      return (await statRow(dev)).supervisor?.state === "serving";
    }, 60_000);
    const log = Deno.readTextFileSync(recordOf(dev).logPath);
    assert.match(log, /fault injection: a request covering byte/);
    assert.match(log, /server died \(signal SIGKILL\): it died [0-9.]+ s after it was ready/);
    assert.doesNotMatch(log, /did not report ready in time|could not start/);
    assert.match(log, /is served again/);
    await detach(dev);
    await ok("cmp", ["-n", String(8 * MIB), file, `${tmp}/ref`]);
    await ok("cmp", ["-i", `${40 * MIB}:0`, "-n", String(MIB), file, `${tmp}/ref2`]);
    assert.deepEqual(serverProcesses(), [], "no server or supervisor left");
    // A server the poison kills while it writes its record leaves a half-written copy: detach
    // removes that too.
    assert.deepEqual(registryFiles(), [], "no record, half-written record or socket left");
  });
});
