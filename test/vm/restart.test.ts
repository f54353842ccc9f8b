// `fastloop restart` inside the test VM: the server (and its supervisor) replaced three times
// while fio runs random reads and writes with crc32c verify on the device itself. On 7.3 the
// device is quiesced (UBLK_F_QUIESCE), on 6.12 the old server holds new requests back for the
// kernel to re-issue. Oracles, none of them fastloop's: fio's verify (every block it wrote is
// read back and checked, during the run and after it) and its exit status (an IO error fails
// it), the kernel log (no IO error for the device, no ublk warning), /proc (a new server and a
// new supervisor each time, the old ones gone), /sys (the same disk all along, with the queues
// and depth it was attached with). FASTLOOP_RESTARTS=N runs N restarts instead of three. Where the
// kernel has UBLK_F_BATCH_IO the same runs once more on a device with batched ublk commands,
// which is made without UBLK_F_QUIESCE and so handed over by holding requests back (lib/device.ts
// `createDevice`: quiesced, 7.3.4 failed its IO after the restart, and this test caught it).

import assert from "node:assert/strict";
import { hasFeature, UBLK_F_BATCH_IO } from "../../ffi/ublk_cmd.ts";
import {
  attach,
  completedIos,
  detach,
  dmesgSince,
  fastloop,
  kernelFeatures,
  ok,
  recordOf,
  registryFiles,
  run,
  running,
  serverProcesses,
  uptime,
  waitFor,
  withHostFs,
} from "./support.ts";

const RESTARTS = Number(Deno.env.get("FASTLOOP_RESTARTS") ?? "3");
/** Completed IOs between two restarts, so that each restart happens under fio's load. */
const IOS_BETWEEN = 2000;

/**
 * fio jobs back to back on `dev` until `stop`: random 4 KiB reads and writes over 16 MiB, each
 * written block checked by crc32c soon after (verify_backlog) and all of them again when the job
 * ends; a new seed per job. `check` throws once a job has failed (bad data, an IO error).
 */
function fioLoop(dev: string) {
  let stopping = false;
  let current: Deno.ChildProcess | null = null;
  let failure: string | null = null;
  const jobs: string[] = [];
  const done = (async () => {
    for (let job = 0; !stopping && failure === null; job++) {
      current = new Deno.Command("fio", {
        args: [
          `--name=restart${job}`,
          `--filename=${dev}`,
          "--rw=randrw",
          "--bs=4k",
          "--size=16M",
          "--ioengine=io_uring",
          "--direct=1",
          "--iodepth=16",
          `--randseed=${1717 + job}`,
          "--verify=crc32c",
          "--verify_backlog=512",
          "--verify_fatal=1",
          "--do_verify=1",
        ],
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      const out = await current.output();
      current = null;
      const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      if (out.code !== 0 || /verify: bad|verify failed|err= *[1-9]/.test(text)) {
        failure = `fio job ${job} failed (exit ${out.code}): ${text}`;
      }
      jobs.push(text);
    }
  })();
  return {
    running: () => current !== null,
    kill(): void {
      stopping = true;
      try {
        current?.kill("SIGKILL");
      } catch {
        // Ended already.
      }
    },
    check(): void {
      assert.equal(failure, null, failure ?? "");
    },
    async stop(): Promise<string[]> {
      stopping = true;
      await done;
      return jobs;
    },
  };
}

/** The longest time the device completed no IO (its /sys stat), sampled until `stop`. */
function longestStall(dev: string) {
  let last = completedIos(dev);
  let since = performance.now();
  let longest = 0;
  const timer = setInterval(() => {
    const now = completedIos(dev);
    const t = performance.now();
    if (now !== last) {
      last = now;
      since = t;
    }
    longest = Math.max(longest, t - since);
  }, 20);
  return { stop: () => clearInterval(timer), ms: () => Math.round(longest) };
}

/** Tasks stuck in the kernel (D state), with their kernel stacks: what a hang is waiting for. */
async function printBlockedTasks(): Promise<void> {
  for (const p of Deno.readDirSync("/proc")) {
    if (!/^[0-9]+$/.test(p.name)) continue;
    try {
      for (const t of Deno.readDirSync(`/proc/${p.name}/task`)) {
        const base = `/proc/${p.name}/task/${t.name}`;
        const stat = Deno.readTextFileSync(`${base}/stat`);
        if (stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "D") continue;
        const stack = Deno.readTextFileSync(`${base}/stack`).trimEnd().replaceAll("\n", "\n    ");
        console.log(`blocked: ${stat.slice(0, stat.lastIndexOf(")") + 1)}\n    ${stack}`);
      }
    } catch {
      // Gone meanwhile.
    }
  }
  const kworkers = await run("sh", ["-c", "echo w > /proc/sysrq-trigger; dmesg | tail -80"]);
  console.log(`sysrq w:\n${kworkers.stdout}`);
}

interface Row {
  server: { pid: number; state: string };
  supervisor?: { pid: number; deaths: number; restarts?: number; state: string };
  queues: number;
  depth: number;
  mode: string;
  ublkCommands: string;
}

async function statRow(dev: string): Promise<Row> {
  const r = await fastloop(["stat", "--json", dev]);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as Row[])[0]!;
}

function sysfs(path: string): string {
  return Deno.readTextFileSync(path).trim();
}

const batchOffered = hasFeature(await kernelFeatures(), UBLK_F_BATCH_IO);

for (const commands of ["per-tag", "batched"] as const) {
  Deno.test({
    name: `fastloop restart ${RESTARTS} times under fio randrw verify on the device ` +
      `(${commands} ublk commands): fio verifies, no IO error, a new server each time` +
      (commands === "batched" && !batchOffered ? " (SKIPPED: this kernel lacks BATCH_IO)" : ""),
    ignore: commands === "batched" && !batchOffered,
    fn: () => restartUnderIo(commands),
  });
}

async function restartUnderIo(commands: "per-tag" | "batched") {
  await withHostFs(async (mnt) => {
    const file = `${mnt}/restart.img`;
    await ok("truncate", ["-s", "128M", file]);
    const dev = await attach(file, ["--queues", "2", "--depth", "64"], {
      env: { FASTLOOP_BATCH_IO: commands === "batched" ? "1" : "0" },
    });
    const name = dev.slice(5);
    const devt = sysfs(`/sys/block/${name}/dev`);
    const shape = () => ({
      queues: [...Deno.readDirSync(`/sys/block/${name}/mq`)].length,
      depth: Number(sysfs(`/sys/block/${name}/mq/0/nr_tags`)),
    });
    assert.deepEqual(shape(), { queues: 2, depth: 64 }, "the kernel's view of the new device");
    const dmesgFrom = uptime();
    const fio = fioLoop(dev);
    const log = recordOf(dev).logPath;
    const seen: number[] = [recordOf(dev).server.pid];
    let passed = false;
    try {
      for (let i = 1; i <= RESTARTS; i++) {
        const before = completedIos(dev);
        await waitFor(`fio under way before restart ${i}`, () => {
          fio.check();
          return fio.running() && completedIos(dev) >= before + IOS_BETWEEN;
        }, 120_000);
        const old = recordOf(dev);
        const startedAt = performance.now();
        const waited = longestStall(dev);
        const r = await fastloop(["restart", "--json", dev], {
          env: { FASTLOOP_ATTACH_TIMEOUT_MS: "90000" },
        }).finally(waited.stop);
        assert.equal(r.code, 0, `restart ${i}: ${r.stderr}`);
        const reply = JSON.parse(r.stdout);
        console.log(
          `restart ${i}: ${Math.round(performance.now() - startedAt)} ms; server ` +
            `${old.server.pid} -> ${reply.pid}; ${reply.handOver?.how} (${reply.handOver?.ms} ms); ` +
            `longest time without a completed IO ${waited.ms()} ms`,
        );
        assert.equal(reply.device, dev);
        const now = recordOf(dev);
        assert.equal(now.server.pid, reply.pid, "the record names the new server");
        assert.ok(!seen.includes(now.server.pid), `a new server pid each time: ${seen}`);
        seen.push(now.server.pid);
        assert.ok(running(now.server.pid), "the new server runs");
        await waitFor("the old server gone", () => !running(old.server.pid), 30_000);
        assert.ok(now.supervisor && running(now.supervisor.pid), "a new supervisor runs");
        assert.notEqual(now.supervisor.pid, old.supervisor?.pid, "the supervisor is replaced");
        await waitFor("the old supervisor gone", () => !running(old.supervisor!.pid), 30_000);
        assert.equal(sysfs(`/sys/block/${name}/dev`), devt, "the same disk all along");
        assert.deepEqual(shape(), { queues: 2, depth: 64 }, "queues and depth carried over");
      }
      // IO goes on after the last restart too.
      const after = completedIos(dev);
      await waitFor("IO after the last restart", () => {
        fio.check();
        return completedIos(dev) >= after + IOS_BETWEEN;
      }, 120_000);
      passed = true;
    } catch (e) {
      await printBlockedTasks();
      throw e;
    } finally {
      // The job under way ends by itself, with its verify pass; after a failure its IO may hang
      // until the cleanup deletes the device.
      if (passed) console.log(`fio: ${(await fio.stop()).length} job(s), each verified`);
      else fio.kill();
    }
    fio.check();
    const kernel = await dmesgSince(dmesgFrom);
    assert.doesNotMatch(kernel, new RegExp(`I/O error, dev ${name}\\b`), kernel);
    assert.doesNotMatch(kernel, /WARNING: .*ublk|Buffer I\/O error/, kernel);

    // stat shows the device as any other: served, no death counted, the restarts counted.
    const row = await statRow(dev);
    assert.equal(row.server.state, "running");
    assert.equal(row.mode, "fast", "the new server took the lease: the direct path again");
    assert.equal(row.server.pid, seen[seen.length - 1]);
    assert.equal(row.supervisor?.deaths, 0, "a planned restart is not a death");
    assert.equal(row.supervisor?.restarts, RESTARTS);
    assert.equal(row.queues, 2);
    assert.equal(row.depth, 64);
    assert.equal(row.ublkCommands, commands, "the device keeps its ublk commands");
    // The device's log names every server, with its fastloop, and each hand-over.
    const logText = Deno.readTextFileSync(log);
    for (const pid of seen) {
      assert.match(
        logText,
        new RegExp(`server ${pid} \\(fastloop [0-9.]+ at /`),
        `${pid} in the log`,
      );
    }
    assert.equal(
      logText.match(/handed \/dev\/ublkb[0-9]+ over to server [0-9]+/g)?.length,
      RESTARTS,
    );
    await detach(dev);
    assert.deepEqual(serverProcesses(), [], "no server process left");
    assert.deepEqual(registryFiles(), [], "no record, lock or takeover marker left");
    // Since this test began only: other tests in the same boot fail IO on purpose.
    assert.doesNotMatch(await dmesgSince(dmesgFrom), new RegExp(`I/O error, dev ${name}\\b`));
  });
}
