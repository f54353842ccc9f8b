//! `deno task bench`, VM part: fastloop side by side with the raw device region under the file,
//! the kernel loop device (buffered) and the loop device with direct IO, on one ext4 filesystem on
//! the VM's virtio disk, in one boot so the ratios hold on a noisy machine.
//!
//! Run inside the test VM (scripts/bench.sh does that): needs /dev/vda empty, fio, mkfs.ext4,
//! filefrag, losetup. Prints a markdown table and writes it to bench-results/.

import { parseArgs } from "node:util";
import { longestPhysicalRun } from "./filefrag.ts";

const { values: opts } = parseArgs({
  args: Deno.args,
  options: {
    disk: { type: "string", default: "/dev/vda" },
    "file-mib": { type: "string", default: "512" },
    runtime: { type: "string", default: "6" },
    repeats: { type: "string", default: "3" },
    out: { type: "string", default: "bench-results" },
    "copy-mib": { type: "string", default: "2048" },
    /** Seconds of unmeasured IO per contender before its cells (`warmUp`); 0: measure cold. */
    warmup: { type: "string", default: "8" },
    /** Comma-separated substrings: only the contenders whose name contains one of them. */
    only: { type: "string" },
    /** Comma-separated substrings: only the cells whose name contains one of them. */
    cells: { type: "string" },
    /**
     * `sparse`: only the sparse-file copy (and fastloop's counters during it); `memory`: only the
     * server's memory, idle and under load.
     */
    scenario: { type: "string", default: "all" },
  },
});

const disk = opts.disk!;
const fileBytes = Number(opts["file-mib"]) * 1024 * 1024;
const runtimeSec = Number(opts.runtime);
const warmupSec = Number(opts.warmup);
if (!(warmupSec >= 0)) {
  console.error(`bench: --warmup wants seconds (0 or more), not '${opts.warmup}'`);
  Deno.exit(2);
}
if (!["all", "sparse", "memory"].includes(opts.scenario!)) {
  console.error(`bench: --scenario wants all, sparse or memory, not '${opts.scenario}'`);
  Deno.exit(2);
}
const repeats = Number(opts.repeats);
const mnt = "/mnt/bench";
const backingFile = `${mnt}/backing.img`;

interface Cell {
  name: string;
  rw: string;
  bs: string;
  iodepth: number;
}
const ALL_CELLS: Cell[] = [
  { name: "4k randread QD1", rw: "randread", bs: "4k", iodepth: 1 },
  { name: "4k randread QD32", rw: "randread", bs: "4k", iodepth: 32 },
  { name: "1M read QD8", rw: "read", bs: "1M", iodepth: 8 },
  { name: "4k randwrite QD32", rw: "randwrite", bs: "4k", iodepth: 32 },
  { name: "1M write QD8", rw: "write", bs: "1M", iodepth: 8 },
];
const CELLS = ALL_CELLS.filter((c) => matchesAny(c.name, opts.cells));

/** Does `name` contain one of the comma-separated substrings of `list` (no list: yes)? */
function matchesAny(name: string, list: string | undefined): boolean {
  return list === undefined || list.split(",").some((part) => name.includes(part.trim()));
}

interface Sample {
  iops: number;
  bwKiBs: number;
  p50us: number;
  p99us: number;
  cpuUsPerIo: number;
  cacheGrowthKiB: number;
}

async function sh(cmd: string, check = true): Promise<string> {
  const out = await new Deno.Command("sh", { args: ["-c", cmd], stdout: "piped", stderr: "piped" })
    .output();
  const text = new TextDecoder().decode(out.stdout);
  if (check && !out.success) {
    throw new Error(`${cmd}: exit ${out.code}: ${new TextDecoder().decode(out.stderr).trim()}`);
  }
  return text;
}

/** Busy jiffies (user+nice+system+irq+softirq+steal) of the whole VM, all CPUs. */
async function busyJiffies(): Promise<number> {
  const line = (await Deno.readTextFile("/proc/stat")).split("\n")[0]!;
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal
  return f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
}

async function cachedKiB(): Promise<number> {
  const m = (await Deno.readTextFile("/proc/meminfo")).match(/^Cached:\s+(\d+) kB/m);
  return Number(m?.[1] ?? 0);
}

async function dropCaches(): Promise<void> {
  await sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

interface Target {
  name: string;
  device: string;
  /** fio offset/size of the region used on `device`. */
  offset: number;
  size: number;
}

/** fio's options for direct IO on a contender's region, shared by the cells and the warm-up. */
function fioOnRegion(target: Target): string {
  return [
    "--ioengine=io_uring --direct=1 --randrepeat=0 --norandommap",
    `--filename=${target.device} --offset=${target.offset} --size=${target.size}`,
    // The raw contender writes the region under the file while ext4 is mounted: fio refuses
    // that unless told. Only the file's own blocks are written (the file is scratch data).
    "--allow_mounted_write=1",
  ].join(" ");
}

async function runCell(target: Target, cell: Cell): Promise<Sample> {
  await dropCaches();
  const cpu0 = await busyJiffies();
  const cache0 = await cachedKiB();
  const json = await sh(
    [
      `fio --output-format=json --name=cell ${fioOnRegion(target)}`,
      `--rw=${cell.rw} --bs=${cell.bs} --iodepth=${cell.iodepth} --numjobs=1`,
      `--time_based --runtime=${runtimeSec} --ramp_time=1`,
    ].join(" "),
  );
  const cpu1 = await busyJiffies();
  const cache1 = await cachedKiB();
  const job = JSON.parse(json.slice(json.indexOf("{"))).jobs[0];
  const side = cell.rw.includes("write") ? job.write : job.read;
  if (job.error) throw new Error(`fio on ${target.device} (${cell.name}): error ${job.error}`);
  const pct = side.clat_ns.percentile ?? {};
  const ios = job.read.total_ios + job.write.total_ios;
  const hz = 100; // USER_HZ
  return {
    iops: side.iops,
    bwKiBs: side.bw,
    p50us: (pct["50.000000"] ?? 0) / 1000,
    p99us: (pct["99.000000"] ?? 0) / 1000,
    // ramp_time IOs are not in total_ios, so this slightly overstates CPU per IO for everyone.
    cpuUsPerIo: ios > 0 ? ((cpu1 - cpu0) / hz) * 1e6 / ios : 0,
    cacheGrowthKiB: Math.max(0, cache1 - cache0),
  };
}

/**
 * Brings a contender to its steady state before its cells, with the same unmeasured IO for
 * every contender: 4k random reads and writes at QD32, then 1 MiB sequential. For fastloop it
 * is the time V8's optimizing compiler takes to reach the queue's hot functions: seconds of IO
 * under TCG (4k randread QD32 in 2 s slices after attach, one 7.3 boot: 4615, 6163, 9534,
 * 10643, 10441 IOPS), milliseconds on a real CPU. The cold start shows in the sparse copy.
 */
async function warmUp(target: Target): Promise<void> {
  if (warmupSec <= 0) return;
  const jobs: Array<[string, string, number, number]> = [
    ["randrw", "4k", 32, Math.ceil(warmupSec * 2 / 3)],
    ["rw", "1M", 8, Math.ceil(warmupSec / 3)],
  ];
  for (const [rw, bs, iodepth, seconds] of jobs) {
    await sh(
      `fio --name=warm --output=/dev/null ${fioOnRegion(target)} ` +
        `--rw=${rw} --bs=${bs} --iodepth=${iodepth} --time_based --runtime=${seconds}`,
    );
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** The ublk device id the peer server gets (fastloop's own devices take the lowest free ids). */
const PEER_ID = 9;

async function waitForNode(path: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    try {
      Deno.statSync(path);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  throw new Error(`${path} did not appear`);
}

/** Does this kernel's ublk offer feature bit `bit` of GET_FEATURES (from `fastloop doctor`)? */
async function ublkFeatureOffered(bit: bigint): Promise<boolean> {
  const out = await sh("fastloop doctor --json", false);
  try {
    const features = JSON.parse(out).ublk.features as string | null;
    return features !== null && (BigInt(features) & (1n << bit)) !== 0n;
  } catch {
    return false;
  }
}
/** Zero copy: UBLK_F_AUTO_BUF_REG (6.16+). */
const zeroCopyOffered = () => ublkFeatureOffered(11n);
/** UBLK_F_BATCH_IO (7.0+): multishot fetch and batched commits. */
const batchIoOffered = () => ublkFeatureOffered(15n);

async function fastloopAvailable(): Promise<boolean> {
  const r = await new Deno.Command("fastloop", { args: ["doctor"], stdout: "null", stderr: "null" })
    .output().catch(() => null);
  return r?.success ?? false;
}

async function main() {
  const kernel = (await sh("uname -r")).trim();
  await sh(`mkfs.ext4 -q -F ${disk} && mkdir -p ${mnt} && mount ${disk} ${mnt}`);
  try {
    // Fully written backing file: every block allocated and written, same for every contender.
    await sh(
      `fio --name=fill --filename=${backingFile} --size=${fileBytes} --rw=write --bs=1M ` +
        `--ioengine=io_uring --direct=1 --iodepth=8 --end_fsync=1 --output=/dev/null`,
    );
    const raw = await longestPhysicalRunOf(backingFile);
    const region = Math.min(raw.size, fileBytes);
    const targets: Array<() => Promise<{ target: Target; cleanup: () => Promise<void> }>> = [
      () =>
        Promise.resolve({
          target: { name: "raw device", device: disk, offset: raw.offset, size: region },
          cleanup: () => Promise.resolve(),
        }),
      async () => {
        const dev = (await sh(`losetup -f --show ${backingFile}`)).trim();
        return {
          target: { name: "loop buffered", device: dev, offset: 0, size: region },
          cleanup: async () => void await sh(`losetup -d ${dev}`),
        };
      },
      async () => {
        const dev = (await sh(`losetup -f --show --direct-io=on ${backingFile}`)).trim();
        return {
          target: { name: "loop direct-io", device: dev, offset: 0, size: region },
          cleanup: async () => void await sh(`losetup -d ${dev}`),
        };
      },
    ];
    const zeroCopy = await zeroCopyOffered();
    if (await fastloopAvailable()) {
      // Each data mode the kernel offers, named (lib/request_data.ts), and where the kernel has
      // UBLK_F_BATCH_IO the batched ublk commands too (lib/ublk_hop.ts; opt-in).
      const modes = [{ label: "copy", zeroCopy: false, batched: false }];
      if (zeroCopy) modes.unshift({ label: "zero copy", zeroCopy: true, batched: false });
      if (await batchIoOffered()) {
        modes.push({ label: `${modes[0]!.label}, batched`, zeroCopy, batched: true });
      }
      for (const { label: mode, zeroCopy: zc, batched } of modes) {
        const env = `FASTLOOP_ZERO_COPY=${zc ? 1 : 0} FASTLOOP_BATCH_IO=${batched ? 1 : 0}`;
        targets.push(async () => {
          const dev = (await sh(`${env} fastloop attach ${backingFile}`)).trim();
          return {
            target: { name: `fastloop (${mode})`, device: dev, offset: 0, size: region },
            cleanup: async () => void await sh(`fastloop detach ${dev}`),
          };
        });
      }
    } else {
      console.error("bench: fastloop cannot attach on this kernel (fastloop doctor failed)");
    }
    // ublksrv, the C reference server, when one was built outside the project and handed in
    // (scripts/vm.sh --with DIR): its loop target, and with zero copy where the kernel has it.
    // Where the kernel has UBLK_F_BATCH_IO, also with batched fetch and commit (`-b`).
    if ((await sh("command -v ublk", false)).trim() !== "") {
      const variants: Array<[string, string]> = [["", ""]];
      if (zeroCopy) variants.push([" (zero copy)", "-z"]);
      if (await batchIoOffered()) {
        variants.push([" (batch IO)", "-b"]);
        if (zeroCopy) variants.push([" (zero copy, batch IO)", "-z -b"]);
      }
      for (const [label, flags] of variants) {
        targets.push(async () => {
          await sh(`ublk add -t loop -f ${backingFile} -n ${PEER_ID} ${flags}`);
          const dev = `/dev/ublkb${PEER_ID}`;
          await waitForNode(dev);
          return {
            target: {
              name: `ublksrv loop${label}`,
              device: dev,
              offset: 0,
              size: region,
            },
            cleanup: async () => void await sh(`ublk del -n ${PEER_ID}`),
          };
        });
      }
    }

    const results = new Map<string, Map<string, Sample[]>>();
    const names: string[] = [];
    if (opts.scenario === "sparse") {
      const table = await sparseCopyScenario(await fastloopAvailable());
      console.log(table);
      return;
    }
    if (opts.scenario === "memory") {
      console.log(await memoryScenario(zeroCopy, region));
      return;
    }
    for (const make of targets) {
      const { target, cleanup } = await make();
      if (!matchesAny(target.name, opts.only)) {
        await cleanup();
        continue;
      }
      names.push(target.name);
      try {
        await warmUp(target);
        for (const cell of CELLS) {
          const samples: Sample[] = [];
          for (let i = 0; i < repeats; i++) samples.push(await runCell(target, cell));
          if (!results.has(cell.name)) results.set(cell.name, new Map());
          results.get(cell.name)!.set(target.name, samples);
          const m = median(samples.map((s) => s.iops));
          console.error(`bench: ${target.name} ${cell.name}: median ${m.toFixed(0)} IOPS`);
        }
      } finally {
        await cleanup();
      }
    }
    let table = render(kernel, region, names, results);
    if (!opts.only && !opts.cells) {
      table += "\n" + await sparseCopyScenario(names.some((n) => n.startsWith("fastloop")));
      table += "\n" + await memoryScenario(zeroCopy, region);
    }
    console.log(table);
    await Deno.mkdir(opts.out!, { recursive: true });
    const file = `${opts.out}/bench-${kernel}-${new Date().toISOString().slice(0, 19)}.md`;
    await Deno.writeTextFile(file, table);
    console.error(`bench: table written to ${file}`);
  } finally {
    await sh(`umount ${mnt}`, false);
  }
}

/**
 * A process's resident memory in KiB, from /proc: all of it (VmRSS), and the part that is its own
 * anonymous memory (RssAnon: heaps, JIT code, buffers). The rest is file and shmem pages, mostly
 * the executable's own code; in the VM its root is an initramfs, so those count as shmem.
 */
function rssKiB(pid: number): { total: number; anon: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const field = (name: string) =>
    Number(new RegExp(`^${name}:\\s+(\\d+) kB$`, "m").exec(status)?.[1] ?? NaN);
  return { total: field("VmRSS"), anon: field("RssAnon") };
}

/**
 * A server's memory, idle after attach and under 1 MiB IO at QD128 (reads, then writes), per data
 * mode: with zero copy it holds no data buffers, so the load should not grow it.
 */
async function memoryScenario(zeroCopy: boolean, region: number): Promise<string> {
  const lines = [
    "## Server memory: VmRSS idle after attach, and its peak under 1 MiB IO at QD128",
    "",
    "Growth is split into the server's anonymous memory (V8 heaps and code, buffers) and the rest",
    "(file and shmem pages: the executable's code, paged in as it first runs).",
    "",
    "| data mode | idle MiB | peak under load MiB | growth MiB | of it anonymous | of it file/shmem |",
    "|---|---|---|---|---|---|",
  ];
  for (const [mode, env] of zeroCopy ? [["zero copy", "1"], ["copy", "0"]] : [["copy", "0"]]) {
    const dev = (await sh(`FASTLOOP_ZERO_COPY=${env} fastloop attach ${backingFile}`)).trim();
    try {
      const pid = JSON.parse(Deno.readTextFileSync(`/run/fastloop/${dev.slice(5)}.json`)).server
        .pid as number;
      await new Promise((r) => setTimeout(r, 2000));
      const idle = rssKiB(pid);
      let peak = idle;
      const sampler = setInterval(() => {
        const now = rssKiB(pid);
        if (now.total > peak.total) peak = now;
      }, 200);
      try {
        for (const rw of ["read", "write"]) {
          await sh(
            `fio --name=mem --filename=${dev} --size=${region} --rw=${rw} --bs=1M ` +
              `--iodepth=128 --ioengine=io_uring --direct=1 --time_based --runtime=${runtimeSec} ` +
              `--output=/dev/null`,
          );
        }
      } finally {
        clearInterval(sampler);
      }
      const mib = (k: number) => (k / 1024).toFixed(1);
      const growth = peak.total - idle.total;
      const anonGrowth = peak.anon - idle.anon;
      lines.push(
        `| ${mode} | ${mib(idle.total)} | ${mib(peak.total)} | ${mib(growth)} | ` +
          `${mib(anonGrowth)} | ${mib(growth - anonGrowth)} |`,
      );
      console.error(
        `bench: memory ${mode}: idle ${mib(idle.total)} MiB, peak ${mib(peak.total)} MiB ` +
          `(anonymous ${mib(idle.anon)} → ${mib(peak.anon)} MiB)`,
      );
    } finally {
      await sh(`fastloop detach ${dev}`);
    }
  }
  return lines.join("\n") + "\n";
}

/**
 * The RFC thread's report: a big copy onto ext4 that lives on a *sparse* backing file, so every
 * write allocates. Buffered writes through the inner filesystem, 1 MiB at a time; a "stall" is
 * the longest single write() plus the final fsync.
 */
async function sparseCopyScenario(withFastloop: boolean): Promise<string> {
  const copyBytes = Number(opts["copy-mib"]) * 1024 * 1024;
  const sparse = `${mnt}/sparse.img`;
  const inner = "/mnt/inner";
  const contenders: Array<[string, () => Promise<string>, (dev: string) => Promise<unknown>]> = [
    ["loop buffered", () => sh(`losetup -f --show ${sparse}`), (d) => sh(`losetup -d ${d}`)],
    [
      "loop direct-io",
      () => sh(`losetup -f --show --direct-io=on ${sparse}`),
      (d) => sh(`losetup -d ${d}`),
    ],
  ];
  if (withFastloop) {
    contenders.push([
      "fastloop",
      () => sh(`fastloop attach ${sparse}`),
      (d) => sh(`fastloop detach ${d}`),
    ]);
  }
  const lines = [
    `## Sparse-file copy: ${
      Math.round(copyBytes / 1048576)
    } MiB written through ext4 on a sparse backing file`,
    "",
    "| contender | total s | MiB/s | slowest second MiB/s | longest write() ms | final fsync ms | backing file MiB allocated at start |",
    "|---|---|---|---|---|---|---|",
  ];
  const chunk = new Uint8Array(1 << 20);
  const work: string[] = [];
  // Each contender twice: cold, as a user copies right after attach, and warm (`warmRun`).
  const runs = contenders.flatMap(([name, attach, detach]) =>
    [false, true].map((warm) => ({ name, attach, detach, warm }))
  );
  for (const { name, attach, detach, warm } of runs) {
    const label = warm ? `${name}, warm` : name;
    await sh(`rm -f ${sparse} && truncate -s ${2 * copyBytes + (1 << 30)} ${sparse}`);
    const dev = (await attach()).trim();
    try {
      await sh(`mkfs.ext4 -q -F ${dev} && mkdir -p ${inner} && mount ${dev} ${inner}`);
      if (warm) await warmRun(inner);
      await dropCaches();
      // What the backing file holds when the copy starts: the same, cold or warm.
      const allocatedMiB = (await sh(`du -m ${sparse}`)).split(/\s/)[0];
      const before = name === "fastloop" ? await fastloopWork(dev) : null;
      const f = await Deno.open(`${inner}/copy.bin`, { write: true, create: true });
      const t0 = performance.now();
      let longest = 0;
      const perSecond: number[] = [];
      for (let done = 0; done < copyBytes; done += chunk.length) {
        chunk[0] = done & 0xff; // not all-zero pages, in case anything below dedups
        const w0 = performance.now();
        await f.write(chunk);
        const w1 = performance.now();
        longest = Math.max(longest, w1 - w0);
        const second = Math.floor((w1 - t0) / 1000);
        perSecond[second] = (perSecond[second] ?? 0) + chunk.length;
      }
      const s0 = performance.now();
      await f.sync();
      const fsyncMs = performance.now() - s0;
      f.close();
      const totalS = (performance.now() - t0) / 1000;
      const seconds = Array.from(perSecond, (b) => (b ?? 0) / 1048576);
      // The last partial second is not a stall.
      const slowest = seconds.length > 1 ? Math.min(...seconds.slice(0, -1)) : seconds[0] ?? 0;
      lines.push(
        `| ${label} | ${totalS.toFixed(1)} | ${(copyBytes / 1048576 / totalS).toFixed(0)} | ${
          slowest.toFixed(0)
        } | ${longest.toFixed(0)} | ${fsyncMs.toFixed(0)} | ${allocatedMiB} |`,
      );
      console.error(
        `bench: sparse copy ${label}: ${totalS.toFixed(1)} s, longest write ${
          longest.toFixed(0)
        } ms`,
      );
      if (before !== null) {
        const after = await fastloopWork(dev);
        const d = (k: keyof FastloopWork) => after[k] - before[k];
        const mib = (k: keyof FastloopWork) => (d(k) / 1048576).toFixed(0);
        work.push(
          `| ${label} | ${d("writes")} | ${(d("bytesWritten") / d("writes") / 1024).toFixed(0)} | ${
            mib("writtenFile")
          } | ${mib("writtenDirect")} | ${d("flushes")} | ${d("fiemapCalls")} | ${
            d("cacheMisses")
          } | ${d("transitions")} |`,
        );
      }
    } finally {
      await sh(`umount ${inner}`, false);
      await detach(dev);
      await sh(`rm -f ${sparse}`, false);
    }
  }
  if (work.length > 0) {
    lines.push(
      "",
      "What fastloop did during its copy (from `fastloop stat --json`, after mkfs, mount and any warm-up):",
      "",
      "| run | writes | KiB per write | MiB through the file | MiB direct | flushes | FIEMAP calls | cache misses | mode switches |",
      "|---|---|---|---|---|---|---|---|---|",
      ...work,
    );
  }
  return lines.join("\n") + "\n";
}

/**
 * What makes a sparse copy's run warm: 512 MiB written and synced through the inner filesystem
 * first, then deleted, committed (ext4 frees blocks at the commit) and trimmed. Every discard
 * punches its range, so the backing file is as sparse as before, and the server has served writes
 * for seconds (see `warmUp`). The table shows what the file held when the copy started.
 */
async function warmRun(inner: string): Promise<void> {
  await sh(
    `dd if=/dev/zero of=${inner}/warm.bin bs=1M count=512 conv=fsync status=none && ` +
      `rm ${inner}/warm.bin && sync && fstrim ${inner}`,
  );
}

interface FastloopWork {
  writes: number;
  bytesWritten: number;
  writtenFile: number;
  writtenDirect: number;
  flushes: number;
  fiemapCalls: number;
  cacheMisses: number;
  transitions: number;
}

/** fastloop's own counters for a device: what it did, to be compared before and after. */
async function fastloopWork(dev: string): Promise<FastloopWork> {
  const [row] = JSON.parse(await sh(`fastloop stat --json ${dev}`));
  const c = row.counters;
  return {
    writes: c.writes,
    bytesWritten: c.bytesWritten.file + c.bytesWritten.direct,
    writtenFile: c.bytesWritten.file,
    writtenDirect: c.bytesWritten.direct,
    flushes: c.flushes,
    fiemapCalls: c.fiemapCalls,
    cacheMisses: c.cacheMisses,
    transitions: row.transitions ?? 0,
  };
}

function render(
  kernel: string,
  regionBytes: number,
  names: string[],
  results: Map<string, Map<string, Sample[]>>,
): string {
  const fmt = (n: number, digits = 0) => n.toFixed(digits);
  const lines = [
    `# fastloop benchmark — kernel ${kernel}, ${Math.round(regionBytes / 1048576)} MiB region, ` +
    `${repeats} runs × ${runtimeSec}s per cell (median [min–max]); ratio = median / raw median`,
    "",
    "| cell | contender | IOPS | ratio | MiB/s | p50 µs | p99 µs | p99 ratio | CPU µs/IO | page cache +KiB |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ];
  for (const [cell, byTarget] of results) {
    const raw = byTarget.get("raw device");
    const rawIops = raw ? median(raw.map((s) => s.iops)) : NaN;
    const rawP99 = raw ? median(raw.map((s) => s.p99us)) : NaN;
    for (const name of names) {
      const s = byTarget.get(name);
      if (!s) continue;
      const iops = s.map((x) => x.iops);
      const p99 = median(s.map((x) => x.p99us));
      lines.push(
        `| ${cell} | ${name} | ${fmt(median(iops))} [${fmt(Math.min(...iops))}–${
          fmt(Math.max(...iops))
        }] | ${fmt(median(iops) / rawIops, 2)} | ${
          fmt(median(s.map((x) => x.bwKiBs)) / 1024, 1)
        } | ${fmt(median(s.map((x) => x.p50us)))} | ${fmt(p99)} | ${fmt(p99 / rawP99, 2)} | ${
          fmt(median(s.map((x) => x.cpuUsPerIo)), 1)
        } | ${fmt(Math.max(...s.map((x) => x.cacheGrowthKiB)))} |`,
      );
    }
  }
  return lines.join("\n") + "\n";
}

await main();

/** The longest physically contiguous run of `path` (filefrag, an independent view). */
async function longestPhysicalRunOf(path: string): Promise<{ offset: number; size: number }> {
  return longestPhysicalRun(await sh(`filefrag -v -b4096 ${path}`));
}
