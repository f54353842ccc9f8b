//! Load, soak and leak checks for fastloop, run inside the test VM (a kernel with ublk).
//!
//! `runLoad` attaches several files at once and runs mixed fio writes with crc32c verify on all of
//! them, sampling each server's and supervisor's resident memory and open file descriptors from
//! /proc meanwhile; `runCycles` attaches and detaches one file over and over; `leakCounts` counts,
//! from the kernel's own views (/sys, /dev, /proc/locks, /proc/PID), what fastloop could leave
//! behind. `test/vm/load.test.ts` runs a short version; `deno task soak` (scripts/soak.sh) runs
//! this file as a program for as long as asked and prints the memory curve as a table.
//!
//! Usage (in the VM): deno run --allow-all bench/soak.ts [--devices 8] [--duration 600]
//!                    [--cycles 200] [--size-mib 64] [--sample-s 10]

import assert from "node:assert/strict";
import { parseArgs } from "node:util";
import * as support from "../test/vm/support.ts";
import { ok, type Run, run } from "../test/vm/support.ts";
import { KEPT_OLD_LOGS } from "../lib/registry.ts";

export const MIB = 1024 * 1024;

export { ok, type Run, run } from "../test/vm/support.ts";

/**
 * Eight servers starting at once in the TCG VM, on a host shared with other VMs, took over
 * attach's default 180 s to come up (measured), so the bound is raised here: these runs are
 * about what happens under load, not about start-up time.
 */
const LOAD_ENV = {
  FASTLOOP_ATTACH_TIMEOUT_MS: Deno.env.get("FASTLOOP_ATTACH_TIMEOUT_MS") ?? "900000",
};

/** Runs the CLI with the raised start-up bound. */
export function fastloop(args: string[]): Promise<Run> {
  return support.fastloop(args, { env: LOAD_ENV });
}

/** Attaches `file` (the kernel's view of the device checked), with the raised start-up bound. */
export function attach(file: string, extra: string[] = []): Promise<string> {
  return support.attach(file, extra, { env: LOAD_ENV });
}

export function detach(ref: string): Promise<void> {
  return support.detach(ref, { env: LOAD_ENV });
}

// ---------------------------------------------------------------------------------------------
// What fastloop could leak, counted from the kernel's views.

function names(dir: string, pattern: RegExp): string[] {
  try {
    return [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => pattern.test(n)).sort();
  } catch {
    return [];
  }
}

/** A fastloop background process: the supervisor (`__server --supervise`) or a server. */
export interface FastloopProcess {
  pid: number;
  role: "server" | "supervisor";
  /** The file it serves (its FILE argument). */
  file: string;
}

/** Every `fastloop __server` process, from /proc/PID/cmdline. */
export function fastloopProcesses(): FastloopProcess[] {
  const found: FastloopProcess[] = [];
  for (const p of Deno.readDirSync("/proc")) {
    if (!/^[0-9]+$/.test(p.name)) continue;
    let argv: string[];
    try {
      argv = Deno.readTextFileSync(`/proc/${p.name}/cmdline`).split("\0");
      if (Deno.readTextFileSync(`/proc/${p.name}/stat`).includes(") Z ")) continue;
    } catch {
      continue; // Exited meanwhile.
    }
    const at = argv.indexOf("__server");
    if (at < 0) continue;
    const rest = argv.slice(at + 1);
    const supervisor = rest.includes("--supervise");
    const file = rest.filter((a) => a !== "--supervise" && a !== "--supervised")[0] ?? "";
    found.push({ pid: Number(p.name), role: supervisor ? "supervisor" : "server", file });
  }
  return found.sort((a, b) => a.pid - b.pid);
}

/** VmRSS in KiB and the number of open fds of `pid`, or null once it is gone. */
export function procUsage(pid: number): { rssKiB: number; fds: number } | null {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const kb = /^VmRSS:\s+([0-9]+) kB$/m.exec(status)?.[1];
    const fds = [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
    return { rssKiB: Number(kb ?? 0), fds };
  } catch {
    return null;
  }
}

export interface LeakCounts {
  /** ublk character devices the kernel has (/sys/class/ublk-char: one per ublk id). */
  ublkIds: number;
  /** ublk block devices (/sys/block/ublkb*). */
  ublkBlocks: number;
  /** Device nodes /dev/ublkc*, /dev/ublkb* (devtmpfs: the kernel makes and removes them). */
  devNodes: number;
  /** fastloop server and supervisor processes. */
  processes: number;
  /** File descriptors those processes hold. */
  fds: number;
  /** Leases in /proc/locks (nothing else in the VM takes leases). */
  leases: number;
  /** flock locks in /proc/locks (fastloop's per-file claims are flocks). */
  flocks: number;
  /** Records, sockets and lock files under /run/fastloop (logs are counted apart). */
  registry: number;
  /** Logs under /run/fastloop/log: one per attach, the newest of gone devices kept on purpose. */
  logs: number;
}

export function leakCounts(): LeakCounts {
  const procs = fastloopProcesses();
  const locks = (() => {
    try {
      return Deno.readTextFileSync("/proc/locks").split("\n");
    } catch {
      return [];
    }
  })();
  return {
    ublkIds: names("/sys/class/ublk-char", /^ublkc[0-9]+$/).length,
    ublkBlocks: names("/sys/block", /^ublkb[0-9]+$/).length,
    devNodes: names("/dev", /^ublk[bc][0-9]+$/).length,
    processes: procs.length,
    fds: procs.reduce((n, p) => n + (procUsage(p.pid)?.fds ?? 0), 0),
    leases: locks.filter((l) => / LEASE /.test(l)).length,
    flocks: locks.filter((l) => / FLOCK /.test(l)).length,
    registry: registryNames().length,
    logs: names("/run/fastloop/log", /./).length,
  };
}

/** What `LeakCounts.registry` counts, by name, so that a leak says what was left. */
function registryNames(): string[] {
  return [
    ...names("/run/fastloop", /./).filter((n) => n !== "log" && n !== "files"),
    ...names("/run/fastloop/files", /./).map((n) => `files/${n}`),
  ];
}

export function formatCounts(c: LeakCounts): string {
  return Object.entries(c).map(([k, v]) => `${k}=${v}`).join(" ");
}

/**
 * Asserts that nothing is left against a baseline taken before the run, but logs: attach keeps
 * the newest `KEPT_OLD_LOGS` of gone devices (plus the one it is about to write) and prunes the
 * rest, so their number is bounded, not constant.
 */
export function assertNoLeaks(after: LeakCounts, before: LeakCounts, what: string): void {
  const { logs: _a, ...rest } = after;
  const { logs: _b, ...base } = before;
  assert.deepEqual(
    rest,
    base,
    `${what}: leaked (${formatCounts(after)}; /run/fastloop has ${
      registryNames().join(" ") || "nothing"
    })`,
  );
  assert.ok(
    after.logs <= Math.max(before.logs, KEPT_OLD_LOGS + 1),
    `${what}: ${after.logs} logs left (attach keeps ${KEPT_OLD_LOGS} of gone devices)`,
  );
}

// ---------------------------------------------------------------------------------------------
// Load: N devices, mixed fio with verify on all at once, memory sampled.

/** The fio workloads, one per device in turn: all write with verify read-back as they go. */
const WORKLOADS: string[][] = [
  ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--verify=crc32c"],
  ["--rw=write", "--bs=128k", "--iodepth=4", "--verify=md5"],
  ["--rw=randwrite", "--bssplit=4k/50:64k/30:256k/20", "--iodepth=8", "--verify=crc32c"],
  ["--rw=randwrite", "--bs=16k", "--iodepth=1", "--verify=sha256"],
];

/** How each backing file starts: written, sparse (holes) or preallocated (unwritten extents). */
type Layout = "written" | "sparse" | "prealloc";
const LAYOUTS: Layout[] = ["written", "sparse", "prealloc"];

export interface MemorySample {
  tSec: number;
  /** pid → usage; one entry per fastloop process alive at the time. */
  usage: Map<number, { role: FastloopProcess["role"]; rssKiB: number; fds: number }>;
}

export interface LoadResult {
  devices: string[];
  samples: MemorySample[];
  /** fio's total read and written bytes (reads are the verify read-back). */
  readBytes: number;
  writeBytes: number;
  attachSec: number;
}

/** The part of a job in fio's --output-format=json that is checked here. */
interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

export interface LoadOptions {
  /** A directory on the host filesystem (ext4 on the scratch disk) for the backing files. */
  dir: string;
  /** A directory off that filesystem (tmpfs) for reference copies. */
  tmp: string;
  devices: number;
  sizeMiB: number;
  seconds: number;
  sampleSec: number;
  /** Called with each sample as it is taken (the soak prints its table row by row). */
  onSample?: (s: MemorySample) => void;
}

export async function runLoad(o: LoadOptions): Promise<LoadResult> {
  const files: string[] = [];
  for (let i = 0; i < o.devices; i++) {
    const file = `${o.dir}/load-${i}.img`;
    const layout = LAYOUTS[i % LAYOUTS.length]!;
    if (layout === "written") {
      await ok("dd", ["if=/dev/zero", `of=${file}`, "bs=1M", `count=${o.sizeMiB}`, "status=none"]);
    } else if (layout === "sparse") {
      await ok("truncate", ["-s", `${o.sizeMiB}M`, file]);
    } else {
      await ok("fallocate", ["-l", `${o.sizeMiB}M`, file]);
    }
    files.push(file);
  }
  await ok("sync", []);
  const t0 = performance.now();
  // All at once: the CLI must hand out distinct devices to parallel attaches.
  const devices = await Promise.all(
    files.map((f, i) => attach(f, i % 4 === 0 ? ["--queues", "2", "--depth", "32"] : [])),
  );
  const attachSec = (performance.now() - t0) / 1000;
  assert.equal(new Set(devices).size, devices.length, `distinct devices: ${devices.join(" ")}`);

  const args = [
    "--output-format=json",
    "--ioengine=io_uring",
    "--direct=1",
    "--time_based",
    `--runtime=${o.seconds}`,
    // Read back and check every 8 blocks written: even a job that gets few IOs in on a loaded
    // host verifies some (with 64, a job with fewer writes than that verifies nothing; one saw
    // 51 in a loaded run).
    "--verify_backlog=8",
    "--verify_fatal=1",
    "--do_verify=1",
    `--size=${o.sizeMiB}M`,
  ];
  devices.forEach((dev, i) => {
    args.push(`--name=dev${i}`, `--filename=${dev}`, ...WORKLOADS[i % WORKLOADS.length]!);
  });
  const samples: MemorySample[] = [];
  const start = performance.now();
  const sample = () => {
    const s: MemorySample = { tSec: (performance.now() - start) / 1000, usage: new Map() };
    for (const p of fastloopProcesses()) {
      const u = procUsage(p.pid);
      if (u) s.usage.set(p.pid, { role: p.role, ...u });
    }
    samples.push(s);
    o.onSample?.(s);
  };
  sample();
  const timer = setInterval(sample, o.sampleSec * 1000);
  let fio: Run;
  try {
    fio = await run("fio", args);
  } finally {
    clearInterval(timer);
  }
  sample();
  if (fio.code !== 0) {
    // Shown at once (a test's assertion message only comes at the end of the whole file).
    console.log(`fio failed (${fio.code}): ${fio.stderr}\n${fio.stdout.slice(-6000)}`);
  }
  assert.equal(fio.code, 0, `fio failed (${fio.code}): ${fio.stderr}${fio.stdout.slice(-4000)}`);
  const report = JSON.parse(fio.stdout.slice(fio.stdout.indexOf("{")));
  let readBytes = 0;
  let writeBytes = 0;
  for (const job of report.jobs as FioJob[]) {
    assert.equal(job.error, 0, `fio job ${job.jobname}: error ${job.error}`);
    assert.ok(job.write.io_bytes > 0, `fio job ${job.jobname} wrote nothing`);
    assert.ok(job.read.io_bytes > 0, `fio job ${job.jobname} verified nothing`);
    readBytes += job.read.io_bytes;
    writeBytes += job.write.io_bytes;
  }

  // The bytes reach the files: a known image on each device, then detach, then the files (read
  // through the host filesystem, not through fastloop) must hold exactly it.
  const refMiB = Math.min(16, o.sizeMiB);
  await ok("dd", ["if=/dev/urandom", `of=${o.tmp}/ref`, "bs=1M", `count=${refMiB}`, "status=none"]);
  await Promise.all(
    devices.map((dev) =>
      ok("dd", [`if=${o.tmp}/ref`, `of=${dev}`, "bs=1M", "oflag=direct", "status=none"])
    ),
  );
  // Detached all at once too: one server's exit must not disturb the others.
  await Promise.all(devices.map((dev) => detach(dev)));
  Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
  for (const file of files) {
    await ok("cmp", ["-n", String(refMiB * MIB), file, `${o.tmp}/ref`]);
  }
  return { devices, samples, readBytes, writeBytes, attachSec };
}

/** Per sample: count, sum, min and max of server and supervisor RSS (MiB) and fds. */
export function memoryTable(samples: MemorySample[]): string {
  const rows = [
    "   t(s)  servers  rss MiB min/max/sum    fds  supervisors  rss MiB min/max/sum    fds",
  ];
  const mib = (k: number) => (k / 1024).toFixed(1);
  for (const s of samples) {
    const cells: string[] = [];
    for (const role of ["server", "supervisor"] as const) {
      const us = [...s.usage.values()].filter((u) => u.role === role);
      const rss = us.map((u) => u.rssKiB);
      const fds = us.reduce((n, u) => n + u.fds, 0);
      const range = rss.length === 0
        ? "-"
        : `${mib(Math.min(...rss))}/${mib(Math.max(...rss))}/${mib(rss.reduce((a, b) => a + b))}`;
      cells.push(
        `${String(us.length).padStart(role === "server" ? 8 : 12)}  ${range.padStart(20)} ${
          String(fds).padStart(6)
        }`,
      );
    }
    rows.push(`${s.tSec.toFixed(0).padStart(7)} ${cells.join(" ")}`);
  }
  return rows.join("\n");
}

/**
 * Memory growth of each process between the first and the second half of the run: the largest
 * RSS seen in the second half minus the largest in the first (warm-up, JIT and the first GC
 * cycles fall in the first half). Only processes seen in both halves count.
 */
export function memoryGrowth(
  samples: MemorySample[],
): Array<
  {
    pid: number;
    role: string;
    firstKiB: number;
    secondKiB: number;
    fdsFirst: number;
    fdsLast: number;
  }
> {
  const half = samples.length >> 1;
  const maxOf = (part: MemorySample[], pid: number) =>
    Math.max(0, ...part.map((s) => s.usage.get(pid)?.rssKiB ?? 0));
  const first = samples.slice(0, half);
  const second = samples.slice(half);
  const pids = new Set(samples.flatMap((s) => [...s.usage.keys()]));
  const out = [];
  for (const pid of pids) {
    const inFirst = first.filter((s) => s.usage.has(pid));
    const inSecond = second.filter((s) => s.usage.has(pid));
    if (inFirst.length === 0 || inSecond.length === 0) continue;
    out.push({
      pid,
      role: inFirst[0]!.usage.get(pid)!.role,
      firstKiB: maxOf(first, pid),
      secondKiB: maxOf(second, pid),
      fdsFirst: inFirst[0]!.usage.get(pid)!.fds,
      fdsLast: inSecond[inSecond.length - 1]!.usage.get(pid)!.fds,
    });
  }
  return out.sort((a, b) => a.pid - b.pid);
}

/**
 * RSS may wobble with GC; more than this between the halves counts as growth. Measured on both
 * kernels (10 min, 8 devices): at most +3.8 MiB per server, supervisors +0; before the THP and
 * FIEMAP-buffer fixes servers grew 9-29 MiB, which this bound catches.
 */
export function allowedGrowthKiB(firstKiB: number): number {
  return Math.max(8 * 1024, firstKiB * 0.1);
}

export function assertFlat(
  samples: MemorySample[],
  allowedKiB: (firstKiB: number) => number = allowedGrowthKiB,
): void {
  const growth = memoryGrowth(samples);
  assert.ok(growth.length > 0, "memory was sampled in both halves of the run");
  for (const g of growth) {
    assert.ok(
      g.secondKiB - g.firstKiB <= allowedKiB(g.firstKiB),
      `${g.role} ${g.pid}: RSS grew from ${g.firstKiB} KiB to ${g.secondKiB} KiB`,
    );
    assert.equal(
      g.fdsLast,
      g.fdsFirst,
      `${g.role} ${g.pid}: open fds ${g.fdsFirst} → ${g.fdsLast}`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Cycles: attach / IO / detach of one file, over and over.

export interface CyclesResult {
  cycles: number;
  /** Every device id handed out, in order. */
  ids: number[];
  /** Seconds per attach and per detach. */
  attachSec: number[];
  detachSec: number[];
}

export async function runCycles(
  file: string,
  refPath: string,
  cycles: number,
  progress?: (i: number, r: CyclesResult) => void,
): Promise<CyclesResult> {
  const r: CyclesResult = { cycles, ids: [], attachSec: [], detachSec: [] };
  const refBytes = Deno.statSync(refPath).size;
  for (let i = 0; i < cycles; i++) {
    let t = performance.now();
    const dev = await attach(file);
    r.attachSec.push((performance.now() - t) / 1000);
    r.ids.push(Number(dev.slice("/dev/ublkb".length)));
    // Some IO each time: the device serves the file's bytes (compared with a copy on tmpfs).
    await ok("cmp", ["-n", String(refBytes), dev, refPath]);
    t = performance.now();
    await detach(dev);
    r.detachSec.push((performance.now() - t) / 1000);
    progress?.(i + 1, r);
  }
  return r;
}

export function summary(xs: number[]): string {
  if (xs.length === 0) return "-";
  const s = [...xs].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))]!.toFixed(2);
  return `median ${at(0.5)} s, p90 ${at(0.9)} s, max ${s[s.length - 1]!.toFixed(2)} s`;
}

/** Server logs a failure prints the tails of, newest first: one per device of the default run. */
const FAILURE_LOG_TAILS = 8;

/**
 * Fresh ext4 on `disk` for `fn` (support's `withHostFs`); a failure is printed at once with the
 * diagnostics (deno test shows a failure's message only after the whole file ran): the leak
 * counts and fastloop's processes, then support's stat, log tails (one per device) and dmesg.
 */
export function withHostFs(
  disk: string,
  fn: (mnt: string, tmp: string) => Promise<void>,
): Promise<void> {
  return support.withHostFs(fn, {
    disk,
    onFailure: async (e) => {
      console.log(`diagnostics: ${formatCounts(leakCounts())}`);
      console.log(`diagnostics: processes ${JSON.stringify(fastloopProcesses())}`);
      await support.printFailureDiagnostics(e, FAILURE_LOG_TAILS);
    },
  });
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      devices: { type: "string", default: "8" },
      duration: { type: "string", default: "600" },
      cycles: { type: "string", default: "200" },
      "size-mib": { type: "string", default: "64" },
      "sample-s": { type: "string", default: "10" },
      disk: { type: "string", default: "/dev/vda" },
    },
    strict: true,
  });
  const num = (name: string, v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a whole number`);
    return n;
  };
  const devices = num("devices", values.devices);
  const seconds = num("duration", values.duration);
  const cycles = num("cycles", values.cycles);
  const sizeMiB = num("size-mib", values["size-mib"]);
  const sampleSec = Math.max(1, num("sample-s", values["sample-s"]));
  const before = leakCounts();
  console.log(`soak: before: ${formatCounts(before)}`);
  await withHostFs(values.disk, async (mnt, tmp) => {
    if (devices > 0 && seconds > 0) {
      console.log(`soak: ${devices} devices x ${sizeMiB} MiB, mixed fio verify for ${seconds} s`);
      const header = memoryTable([]);
      console.log(header);
      const load = await runLoad({
        dir: mnt,
        tmp,
        devices,
        sizeMiB,
        seconds,
        sampleSec,
        onSample: (s) => console.log(memoryTable([s]).split("\n")[1]),
      });
      console.log(
        `soak: attach of ${devices} at once took ${load.attachSec.toFixed(1)} s; fio wrote ${
          (load.writeBytes / MIB).toFixed(0)
        } MiB and verified ${(load.readBytes / MIB).toFixed(0)} MiB, no errors`,
      );
      console.log("soak: RSS per process, max of first half vs second half (KiB):");
      for (const g of memoryGrowth(load.samples)) {
        console.log(
          `  ${g.role.padEnd(10)} ${String(g.pid).padStart(6)} ${String(g.firstKiB).padStart(8)} ${
            String(g.secondKiB).padStart(8)
          }  ${g.secondKiB - g.firstKiB >= 0 ? "+" : ""}${
            g.secondKiB - g.firstKiB
          }  fds ${g.fdsFirst} -> ${g.fdsLast}`,
        );
      }
      assertFlat(load.samples);
      assertNoLeaks(leakCounts(), before, "after the load");
    }
    if (cycles > 0) {
      const file = `${mnt}/cycle.img`;
      await ok("dd", ["if=/dev/urandom", `of=${tmp}/cycle-ref`, "bs=1M", "count=4", "status=none"]);
      await ok("dd", [`if=${tmp}/cycle-ref`, `of=${file}`, "bs=1M", "status=none"]);
      await ok("truncate", ["-s", "64M", file]);
      console.log(`soak: ${cycles} attach/detach cycles`);
      const r = await runCycles(file, `${tmp}/cycle-ref`, cycles, (i, r) => {
        if (i % 20 === 0 || i === cycles) {
          console.log(
            `  cycle ${i}: ${formatCounts(leakCounts())}; ids so far ${Math.min(...r.ids)}..${
              Math.max(...r.ids)
            }`,
          );
        }
      });
      console.log(`soak: attach ${summary(r.attachSec)}; detach ${summary(r.detachSec)}`);
      assert.ok(Math.max(...r.ids) < 1 + before.ublkIds, `ublk ids reused: ${r.ids.join(",")}`);
    }
  });
  const after = leakCounts();
  console.log(`soak: after: ${formatCounts(after)}`);
  assertNoLeaks(after, before, "after the soak");
  console.log("soak: passed");
  return 0;
}

if (import.meta.main) Deno.exit(await main());
