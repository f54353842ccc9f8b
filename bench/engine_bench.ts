//! `deno task bench`, host part: fastloop's request engine (lib/event_loop.ts `QueueEngine`: the
//! extent cache, the split of a request along the file's extents, the io_uring backend IO) without
//! the ublk hop, next to fio doing the same IO, in one run on the real CPU (no VM).
//!
//! Setup: an ext4 image on the host's disk, attached to a loop device with `--direct-io=on` (so
//! the host's page cache flatters no one), holding one fully written file. Contenders per cell:
//!  - device: fio (io_uring, direct=1) on the loop device, over the longest physically
//!    contiguous run of the file (what reading the file's blocks can cost at best);
//!  - file:   fio on the file through ext4, O_DIRECT (the path the kernel's loop --direct-io takes);
//!  - engine: `QueueEngine` on the queue's own ring (`setupQueueRing`), fed synthetic requests,
//!    with unregistered buffers (copy mode with FASTLOOP_FIXED_BUFFERS=0);
//!  - engine-fixed: the same with its buffers registered (QueueConfig.fixedBuffers), as copy mode
//!    runs by default.
//! Cells run interleaved (every contender once per round) so load changes hit all of them.
//!
//! The seam: the engine knows nothing of ublk. It reads a request from a descriptor area (here an
//! ArrayBuffer this file writes, as the driver would) and hands the finished request to a
//! `Completer` (in the server, COMMIT_AND_FETCH). Here the completer puts the tag back and the
//! next request is posted in the same turn, as if the ublk round trip cost nothing; the loop is
//! runQueue's turn without the ublk commands, the doorbell and the mailbox. Requests are at most
//! the server's 512 KiB (a 1 MiB IO is two requests, as the block layer splits it for ublk);
//! engine latencies are per request, from the turn that posted it to the turn that saw it done.
//!
//! Profile columns (engine: /proc/self; fio: its own accounting of the job): CPU µs per IO
//! (user+system) and its user part (for the engine: JS, V8 and the FFI calls; CPU time, so a
//! preempted thread does not inflate it; the kernel splits user/system by sampling ticks, so the
//! split is rough where each IO is a short burst after a sleep, e.g. at QD1), context switches
//! per IO (sleeps and wakeups), and for the engine io_uring_enter calls per IO (the ring's
//! count). `--strace` re-runs each engine cell under `strace -c -f` to count io_uring_enter (and
//! all syscalls) from outside the process, Deno's start-up subtracted.
//!
//! Needs root, fio, mkfs.ext4, losetup, filefrag. Usage:
//!   deno run --allow-all bench/engine_bench.ts [--file-mib 512] [--runtime 3] [--repeats 3]
//!     [--only CELL-SUBSTRING] [--contenders device,file,engine,engine-fixed] [--strace]
//!     [--dir /var/tmp] [--out bench-results]

import { parseArgs } from "node:util";
import { close, O_DIRECT, O_RDWR, open } from "../ffi/libc.ts";
import {
  IO_DESC_NR_SECTORS,
  IO_DESC_OP_FLAGS,
  IO_DESC_SIZE,
  IO_DESC_START_SECTOR,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
} from "../ffi/ublk_cmd.ts";
import { QueueEngine } from "../lib/event_loop.ts";
import { setupQueueRing } from "../lib/queue_ring.ts";
import { Counter, createSharedState, type QueueConfig } from "../lib/queue_state.ts";
import type { CopyBuffers } from "../lib/request_data.ts";
import { longestPhysicalRun } from "./filefrag.ts";

const { values: opts } = parseArgs({
  args: Deno.args,
  options: {
    "file-mib": { type: "string", default: "512" },
    runtime: { type: "string", default: "3" },
    repeats: { type: "string", default: "3" },
    only: { type: "string" },
    contenders: { type: "string", default: "device,file,engine,engine-fixed" },
    strace: { type: "boolean", default: false },
    "engine-child": { type: "boolean", default: false },
    dir: { type: "string", default: "/var/tmp" },
    out: { type: "string", default: "bench-results" },
  },
});

const MiB = 1024 * 1024;
/** The server's largest request (lib/commands/server.ts MAX_IO_BYTES_DEFAULT). */
const MAX_REQUEST_BYTES = 512 * 1024;
const fileBytes = Number(opts["file-mib"]) * MiB;
const runtimeMs = Number(opts.runtime) * 1000;
const repeats = Number(opts.repeats);
const contenders = opts.contenders!.split(",");

interface Cell {
  name: string;
  rw: "randread" | "read" | "randwrite" | "write";
  bs: number;
  iodepth: number;
}
const CELLS: Cell[] = [
  { name: "4k randread QD1", rw: "randread", bs: 4096, iodepth: 1 },
  { name: "4k randread QD32", rw: "randread", bs: 4096, iodepth: 32 },
  { name: "1M read QD8", rw: "read", bs: MiB, iodepth: 8 },
  { name: "4k randwrite QD32", rw: "randwrite", bs: 4096, iodepth: 32 },
  { name: "1M write QD8", rw: "write", bs: MiB, iodepth: 8 },
].filter((c) => !opts.only || c.name.includes(opts.only)) as Cell[];

interface Sample {
  iops: number;
  mibs: number;
  p50us: number;
  p99us: number;
  cpuUsPerIo: number;
  /** User-space part of cpuUsPerIo: JS, V8 and the FFI calls (for fio: its C code). */
  userUsPerIo: number;
  ctxPerIo: number;
  /** Engine only. */
  entersPerIo?: number;
}

async function sh(cmd: string): Promise<string> {
  const out = await new Deno.Command("sh", { args: ["-c", cmd], stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`${cmd}: exit ${out.code}: ${new TextDecoder().decode(out.stderr).trim()}`);
  }
  return new TextDecoder().decode(out.stdout);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

// --- fio --------------------------------------------------------------------------------------

async function runFio(
  cell: Cell,
  filename: string,
  offset: number,
  size: number,
): Promise<Sample> {
  const json = await sh(
    [
      "fio --output-format=json --name=cell --ioengine=io_uring --direct=1",
      `--filename=${filename} --offset=${offset} --size=${size}`,
      `--rw=${cell.rw} --bs=${cell.bs} --iodepth=${cell.iodepth} --numjobs=1`,
      `--time_based --runtime=${runtimeMs}ms --randrepeat=0 --norandommap`,
      // The device contender writes the blocks under the mounted file (scratch data).
      "--allow_mounted_write=1",
    ].join(" "),
  );
  const job = JSON.parse(json.slice(json.indexOf("{"))).jobs[0];
  if (job.error) throw new Error(`fio on ${filename} (${cell.name}): error ${job.error}`);
  const side = cell.rw.includes("write") ? job.write : job.read;
  const pct = side.clat_ns.percentile ?? {};
  const ios = side.total_ios;
  // fio's own accounting of its job process: usr/sys as percentages of the job's run time, and
  // its context switches. No ramp (the engine has none either), so every IO is counted.
  return {
    iops: side.iops,
    mibs: side.bw / 1024,
    p50us: (pct["50.000000"] ?? 0) / 1000,
    p99us: (pct["99.000000"] ?? 0) / 1000,
    cpuUsPerIo: ((job.usr_cpu + job.sys_cpu) / 100) * job.job_runtime * 1000 / ios,
    userUsPerIo: (job.usr_cpu / 100) * job.job_runtime * 1000 / ios,
    ctxPerIo: job.ctx / ios,
  };
}

// --- the engine -------------------------------------------------------------------------------

/** User and system CPU time of this process (all threads: the engine's and Deno's), in µs. */
function processCpuUs(): { user: number; sys: number } {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  // Field 3 of stat(5) is f[0]: utime is field 14, stime field 15, in USER_HZ (100) ticks.
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return { user: Number(f[11]) * 1e4, sys: Number(f[12]) * 1e4 };
}

/** Context switches of the calling thread (voluntary: it slept; involuntary: preempted). */
function threadContextSwitches(): number {
  const s = Deno.readTextFileSync("/proc/thread-self/status");
  const v = Number(/^voluntary_ctxt_switches:\s+(\d+)/m.exec(s)?.[1] ?? NaN);
  const n = Number(/^nonvoluntary_ctxt_switches:\s+(\d+)/m.exec(s)?.[1] ?? NaN);
  return v + n;
}

/** An engine run: the sample, and the whole run's io_uring_enter calls and requests. */
interface EngineRun {
  sample: Sample;
  enters: number;
  requests: number;
}

interface EngineTarget {
  file: string;
  device: string;
  logicalBlockSize: number;
}

/**
 * Serves `cell` with a fresh QueueEngine for the run time: every tag holds one request; when
 * it completes, the next one is posted in its descriptor. Throws if a request fails or if any
 * byte went another way than straight to the device (the file is fully written, so every
 * request must map to direct extents).
 */
function runEngine(cell: Cell, t: EngineTarget, fixedBuffers: boolean): EngineRun {
  const requestBytes = Math.min(cell.bs, MAX_REQUEST_BYTES);
  const piecesPerIo = cell.bs / requestBytes;
  const depth = cell.iodepth * piecesPerIo;
  const isWrite = cell.rw.includes("write");
  const random = cell.rw.startsWith("rand");
  const fileFd = open(t.file, O_RDWR | O_DIRECT);
  const backingFd = open(t.device, O_RDWR | O_DIRECT);
  const ring = setupQueueRing(depth);
  const desc = new DataView(new ArrayBuffer(depth * IO_DESC_SIZE));
  const finished = new Int32Array(depth);
  let nFinished = 0;
  let failure = "";
  const cfg: QueueConfig = {
    devId: 0,
    queueId: 0,
    queues: 1,
    depth,
    maxIoBytes: requestBytes,
    charFd: -1,
    fileFd,
    filePath: t.file,
    backingFd,
    fileSizeBytes: fileBytes,
    regionOffsetBytes: 0,
    logicalBlockSize: t.logicalBlockSize,
    readOnly: false,
    mode: "fast",
    maxExtents: 1 << 20,
    eventFd: -1,
    poisonByte: -1,
    dataMode: "copy",
    batchIo: false,
    fixedBuffers,
    ringMode: "defer",
    spinUs: 0,
    spinMaxInService: 0,
    queueCpu: -1,
    sab: createSharedState(1),
  };

  const engine = new QueueEngine(cfg, ring, desc, {
    complete(tag, result) {
      if (result !== requestBytes && !failure) failure = `tag ${tag}: result ${result}`;
      finished[nFinished++] = tag;
    },
  });
  if ((engine.data as CopyBuffers).fixed !== fixedBuffers) {
    throw new Error(`engine: fixed buffers ${fixedBuffers ? "not registered" : "registered"}`);
  }
  const onCqe = (userData: number, res: number) => engine.onBackendCqe(userData, res);
  const slots = fileBytes / requestBytes;
  let seqSlot = 0;
  let posted = 0;
  const op = isWrite ? UBLK_IO_OP_WRITE : UBLK_IO_OP_READ;
  const issuedAt = new Float64Array(depth);
  const post = (tag: number, now: number) => {
    const slot = random ? Math.floor(Math.random() * slots) : seqSlot++ % slots;
    const sector = slot * (requestBytes / 512);
    const base = tag * IO_DESC_SIZE;
    desc.setUint32(base + IO_DESC_OP_FLAGS, op, true);
    desc.setUint32(base + IO_DESC_NR_SECTORS, requestBytes / 512, true);
    desc.setUint32(base + IO_DESC_START_SECTOR, sector % 0x1_0000_0000, true);
    desc.setUint32(base + IO_DESC_START_SECTOR + 4, Math.floor(sector / 0x1_0000_0000), true);
    issuedAt[tag] = now;
    posted++;
    engine.handleRequest(tag);
  };

  const latencies = new Float64Array(4 << 20);
  let nLat = 0;
  let requests = 0;
  let outstanding = depth;
  try {
    const cpu0 = processCpuUs();
    const ctx0 = threadContextSwitches();
    const tStart = performance.now();
    const endAt = tStart + runtimeMs;
    let tLast = tStart;
    for (let tag = 0; tag < depth; tag++) post(tag, tStart);
    while (outstanding > 0) {
      // runQueue's turn: submit and wait once, drain every CQE, then the engine's chores.
      if (ring.cqReady() === 0) ring.submitAndWait(1);
      else ring.submit();
      const t1 = performance.now();
      ring.reapCqes(onCqe);
      engine.afterTurn();
      if (failure) throw new Error(`engine (${cell.name}): request failed: ${failure}`);
      // The finished requests, replaced by new ones. A request's latency counts from the turn
      // that posted it, so the engine's JS work for it is inside.
      const n = nFinished;
      nFinished = 0;
      for (let i = 0; i < n; i++) {
        const tag = finished[i]!;
        requests++;
        if (nLat < latencies.length) latencies[nLat++] = t1 - issuedAt[tag]!;
        if (t1 < endAt) post(tag, t1);
        else outstanding--;
      }
      tLast = t1;
    }
    const cpu1 = processCpuUs();
    const ctx = threadContextSwitches() - ctx0;
    // The file is fully written: every byte of every request must have gone to the device.
    const c = engine.shared.counters;
    const moved = c[isWrite ? Counter.bytesWrittenDirect : Counter.bytesReadDirect]!;
    if (moved !== posted * requestBytes) {
      throw new Error(
        `engine (${cell.name}): ${moved} bytes went to the device, not ${posted * requestBytes}`,
      );
    }
    const seconds = (tLast - tStart) / 1000;
    const ios = requests / piecesPerIo;
    const lat = latencies.subarray(0, nLat).sort();
    const sample = {
      iops: ios / seconds,
      mibs: ios * cell.bs / MiB / seconds,
      p50us: (lat[Math.floor(nLat * 0.5)] ?? 0) * 1000,
      p99us: (lat[Math.floor(nLat * 0.99)] ?? 0) * 1000,
      cpuUsPerIo: (cpu1.user + cpu1.sys - cpu0.user - cpu0.sys) / ios,
      userUsPerIo: (cpu1.user - cpu0.user) / ios,
      ctxPerIo: ctx / ios,
      entersPerIo: ring.enterCalls / ios,
    };
    return { sample, enters: ring.enterCalls, requests: posted };
  } finally {
    engine.close();
    ring.close();
    close(fileFd);
    close(backingFd);
  }
}

/** One engine run of `cell` in a child process under `strace -c -f`: its summary and counts. */
async function straceRun(t: EngineTarget, cell: Cell, runtime: string) {
  const self = decodeURIComponent(new URL(import.meta.url).pathname);
  const out = await new Deno.Command("strace", {
    args: [
      ...["-f", "-c", Deno.execPath(), "run", "--allow-all", "--no-check", self],
      ...["--engine-child", "--file-mib", opts["file-mib"]!, "--runtime", runtime],
    ],
    env: { ENGINE_BENCH_CHILD: JSON.stringify({ cell, t }) },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const summary = new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`strace run failed: ${summary.trim()}`);
  const run = JSON.parse(new TextDecoder().decode(out.stdout)) as EngineRun;
  // "% time  seconds  usecs/call  calls  [errors]  syscall": calls is the fourth column.
  const calls = (name: string) => {
    const line = summary.split("\n").find((l) => l.trimEnd().endsWith(` ${name}`));
    return Number(line?.trim().split(/\s+/)[3] ?? 0);
  };
  return { summary, run, enters: calls("io_uring_enter"), total: calls("total") };
}

/**
 * Each engine cell again in a child process under `strace -c -f`, counted from outside: once for
 * the run time and once for no time (Deno's start-up, the setup, one request per tag), and the
 * difference divided by the difference in requests. The summaries go to the output directory.
 */
async function straceCrossCheck(t: EngineTarget, outDir: string): Promise<string> {
  const lines = [
    "strace -c -f, engine, per request (a 1 MiB IO is two), start-up subtracted:",
    "",
    "| cell | requests | io_uring_enter (strace) | (ring's count) | per request | " +
    "all syscalls per request |",
    "|---|---|---|---|---|---|",
  ];
  for (const cell of CELLS) {
    const full = await straceRun(t, cell, opts.runtime!);
    const idle = await straceRun(t, cell, "0");
    const requests = full.run.requests - idle.run.requests;
    const name = cell.name.replaceAll(" ", "-");
    await Deno.writeTextFile(`${outDir}/strace-${name}.txt`, full.summary);
    lines.push(
      `| ${cell.name} | ${requests} | ${full.enters - idle.enters} | ${
        full.run.enters - idle.run.enters
      } | ${((full.enters - idle.enters) / requests).toFixed(3)} | ${
        ((full.total - idle.total) / requests).toFixed(3)
      } |`,
    );
  }
  return lines.join("\n") + "\n";
}

// --- setup and table --------------------------------------------------------------------------

interface Setup {
  image: string;
  mnt: string;
  device: string;
  file: string;
  region: { offset: number; size: number };
  logicalBlockSize: number;
}

/** Builds the setup, recording in `s` what exists so far (tearDown undoes exactly that). */
async function setUp(work: string, s: Partial<Setup>): Promise<Setup> {
  const image = `${work}/fs.img`;
  const mnt = `${work}/mnt`;
  await Deno.mkdir(mnt);
  await sh(`truncate -s ${fileBytes + 256 * MiB} ${image}`);
  const device = (await sh(`losetup --find --show --direct-io=on ${image}`)).trim();
  s.device = device;
  const dio = (await Deno.readTextFile(`/sys/block/${device.slice(5)}/loop/dio`)).trim();
  if (dio !== "1") throw new Error(`${device}: the loop device did not get direct IO`);
  // Initialise inode tables and journal now: ext4lazyinit must not write during the cells.
  await sh(`mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 ${device}`);
  await sh(`mount ${device} ${mnt}`);
  s.mnt = mnt;
  const file = `${mnt}/backing.img`;
  await sh(
    `fio --name=fill --filename=${file} --size=${fileBytes} --rw=write --bs=1M ` +
      `--ioengine=io_uring --direct=1 --iodepth=8 --end_fsync=1 --output=/dev/null`,
  );
  const run = await longestPhysicalRunOf(file);
  const logicalBlockSize = Number((await sh(`blockdev --getss ${device}`)).trim());
  return {
    image,
    mnt,
    device,
    file,
    region: { offset: run.offset, size: Math.min(run.size, fileBytes) },
    logicalBlockSize,
  };
}

async function tearDown(work: string, s: Partial<Setup>): Promise<void> {
  if (s.mnt) await sh(`umount ${s.mnt}`).catch(() => {});
  if (s.device) await sh(`losetup -d ${s.device}`).catch(() => {});
  await Deno.remove(work, { recursive: true }).catch(() => {});
}

function render(
  kernel: string,
  s: Setup,
  results: Map<string, Map<string, Sample[]>>,
): string {
  const f = (n: number | undefined, digits = 0) => n === undefined ? "" : n.toFixed(digits);
  const lines = [
    `# fastloop engine without ublk (host) — kernel ${kernel}, ${
      Math.round(fileBytes / MiB)
    } MiB file on ext4 on loop --direct-io (device region ${Math.round(s.region.size / MiB)} MiB)`,
    "",
    `${repeats} runs × ${opts.runtime} s per cell, interleaved; IOPS as median [min–max]; ` +
    `ratios of medians; other columns are medians.`,
    "",
    "| cell | contender | IOPS | ÷ device | ÷ file | MiB/s | p50 µs | p99 µs | CPU µs/IO | " +
    "user µs/IO | ctx sw/IO | enters/IO |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ];
  for (const [cell, by] of results) {
    const ref = (name: string) => {
      const xs = by.get(name);
      return xs ? median(xs.map((x) => x.iops)) : undefined;
    };
    const ratio = (iops: number, name: string) => {
      const r = ref(name);
      return r === undefined ? "" : (iops / r).toFixed(2);
    };
    for (const name of contenders) {
      const xs = by.get(name);
      if (!xs) continue;
      const m = (k: keyof Sample) =>
        xs[0]![k] === undefined ? undefined : median(xs.map((x) => x[k]!));
      const iops = xs.map((x) => x.iops);
      lines.push(
        `| ${cell} | ${name} | ${f(m("iops"))} [${f(Math.min(...iops))}–${
          f(Math.max(...iops))
        }] | ${ratio(m("iops")!, "device")} | ${ratio(m("iops")!, "file")} | ${f(m("mibs"), 1)} | ${
          f(m("p50us"))
        } | ${f(m("p99us"))} | ${f(m("cpuUsPerIo"), 1)} | ${f(m("userUsPerIo"), 1)} | ${
          f(m("ctxPerIo"), 2)
        } | ${f(m("entersPerIo"), 3)} |`,
      );
    }
  }
  return lines.join("\n") + "\n";
}

async function main(): Promise<void> {
  if (Deno.uid() !== 0) throw new Error("engine bench: needs root (losetup, mount)");
  const kernel = (await sh("uname -r")).trim();
  const work = await Deno.makeTempDir({ dir: opts.dir, prefix: "fastloop-engine-bench-" });
  const s: Partial<Setup> = {};
  try {
    const setup = await setUp(work, s);
    const t: EngineTarget = {
      file: setup.file,
      device: setup.device,
      logicalBlockSize: setup.logicalBlockSize,
    };
    const results = new Map<string, Map<string, Sample[]>>();
    for (let r = 0; r < repeats; r++) {
      for (const cell of CELLS) {
        if (!results.has(cell.name)) results.set(cell.name, new Map());
        const by = results.get(cell.name)!;
        for (const name of contenders) {
          const sample = name === "device"
            ? await runFio(
              cell,
              setup.device,
              setup.region.offset,
              setup.region.size,
            )
            : name === "file"
            ? await runFio(cell, setup.file, 0, fileBytes)
            : runEngine(cell, t, name === "engine-fixed").sample;
          by.set(name, [...(by.get(name) ?? []), sample]);
          console.error(
            `engine bench: run ${r + 1}/${repeats} ${cell.name} ${name}: ${
              sample.iops.toFixed(0)
            } IOPS`,
          );
        }
      }
    }
    let table = render(kernel, setup, results);
    await Deno.mkdir(opts.out!, { recursive: true });
    if (opts.strace) table += "\n" + await straceCrossCheck(t, opts.out!);
    console.log(table);
    const out = `${opts.out}/engine-${kernel}-${new Date().toISOString().slice(0, 19)}.md`;
    await Deno.writeTextFile(out, table);
    console.error(`engine bench: table written to ${out}`);
  } finally {
    await tearDown(work, s);
  }
}

/** `--engine-child` (under strace): one engine run, its counts as JSON on stdout. */
function child(): void {
  const a = JSON.parse(Deno.env.get("ENGINE_BENCH_CHILD")!);
  console.log(JSON.stringify(runEngine(a.cell, a.t, false)));
}

if (opts["engine-child"]) child();
else await main();

/** The longest physically contiguous run of `path` (filefrag, an independent view). */
async function longestPhysicalRunOf(path: string): Promise<{ offset: number; size: number }> {
  return longestPhysicalRun(await sh(`filefrag -v -b4096 ${path}`));
}
