//! Where an IO's CPU goes, inside the test VM: one fio cell (default 4k randread QD1) on a fully
//! written file on ext4, served by fastloop (each data mode the kernel offers) and, when a `ublk`
//! binary is on PATH (scripts/vm.sh --with DIR), by ublksrv's loop target; the raw device region
//! under the file as the reference. Per contender: IOPS, p50/p99, and CPU per IO split by thread
//! of the server (utime/stime from /proc/PID/task/TID/stat: the queue Worker, the main thread,
//! V8's helper threads) and of the supervisor, plus the queue loop's turns and io_uring_enter calls
//! per IO (fastloop's own counters). Not part of the test suite: a measuring tool.
//! Usage (in the VM): deno run -A bench/vm_profile.ts [--rw randread] [--bs 4k] [--iodepth 1]
//!   [--runtime 8] [--file-mib 512] [--disk /dev/vda] [--variants "K=V K=V;K=V"]

import { parseArgs } from "node:util";
import { longestPhysicalRun } from "./filefrag.ts";

const { values: opts } = parseArgs({
  args: Deno.args,
  options: {
    rw: { type: "string", default: "randread" },
    bs: { type: "string", default: "4k" },
    iodepth: { type: "string", default: "1" },
    runtime: { type: "string", default: "8" },
    /** Seconds of IO before the measurement (the server's JIT warms up meanwhile). */
    ramp: { type: "string", default: "0" },
    "file-mib": { type: "string", default: "512" },
    disk: { type: "string", default: "/dev/vda" },
    /**
     * fastloop variants to compare in the same boot, `;`-separated, each a space-separated list
     * of environment settings and `--name=value` attach options (e.g.
     * "FASTLOOP_SPIN_US=50;--queues=2;DENO_V8_FLAGS=--foo");
     * the default configuration always runs first.
     */
    variants: { type: "string", default: "" },
  },
});

const mnt = "/mnt/profile";
const file = `${mnt}/backing.img`;

async function sh(cmd: string, check = true): Promise<string> {
  const out = await new Deno.Command("sh", { args: ["-c", cmd], stdout: "piped", stderr: "piped" })
    .output();
  if (check && !out.success) {
    throw new Error(`${cmd}: exit ${out.code}: ${new TextDecoder().decode(out.stderr).trim()}`);
  }
  return new TextDecoder().decode(out.stdout);
}

/** utime and stime ticks of every thread of `pid`, by thread name (comm). */
function threadTicks(pid: number): Map<string, [number, number, number]> {
  const ticks = new Map<string, [number, number, number]>();
  for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/stat`);
      const comm = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      const [u, s, m] = ticks.get(comm) ?? [0, 0, 0];
      // utime, stime, and context switches (voluntary: it slept; involuntary: preempted).
      const status = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/status`);
      const ctx = Number(/^voluntary_ctxt_switches:\s+(\d+)/m.exec(status)?.[1] ?? 0) +
        Number(/^nonvoluntary_ctxt_switches:\s+(\d+)/m.exec(status)?.[1] ?? 0);
      ticks.set(comm, [u + Number(f[11]), s + Number(f[12]), m + ctx]);
    } catch {
      // Thread gone.
    }
  }
  return ticks;
}

interface Contender {
  name: string;
  device: string;
  offset: number;
  size: number;
  pids: Record<string, number>;
  cleanup: () => Promise<void>;
  counters?: () => Promise<{ turns: number; enters: number } | undefined>;
}

async function fastloopContender(name: string, variant: string, size: number): Promise<Contender> {
  // A variant's `--` words are attach options, the rest its environment.
  const words = variant.split(/\s+/).filter((w) => w);
  const env = words.filter((w) => !w.startsWith("--")).join(" ");
  const args = words.filter((w) => w.startsWith("--")).join(" ");
  const dev = (await sh(`${env} fastloop attach ${args} ${file}`)).trim();
  const record = JSON.parse(Deno.readTextFileSync(`/run/fastloop/${dev.slice(5)}.json`));
  const counters = async () => {
    const [row] = JSON.parse(await sh(`fastloop stat --json ${dev}`, false) || "[{}]");
    const c = row?.counters;
    return c ? { turns: c.loopTurns as number, enters: c.ringEnters as number } : undefined;
  };
  return {
    name,
    device: dev,
    offset: 0,
    size,
    pids: { server: record.server.pid, supervisor: record.supervisor.pid },
    cleanup: async () => void await sh(`fastloop detach ${dev}`),
    counters,
  };
}

/** The kernel's loop device with direct IO over the file: the in-kernel peer. */
async function loopContender(size: number): Promise<Contender> {
  const dev = (await sh(`losetup --direct-io=on -f --show ${file}`)).trim();
  return {
    name: "loop direct-io",
    device: dev,
    offset: 0,
    size,
    pids: {},
    cleanup: async () => void await sh(`losetup -d ${dev}`),
  };
}

async function main() {
  const disk = opts.disk!;
  const fileBytes = Number(opts["file-mib"]) * 1048576;
  await sh(`mkfs.ext4 -q -F ${disk} && mkdir -p ${mnt} && mount ${disk} ${mnt}`);
  try {
    await sh(
      `fio --name=fill --filename=${file} --size=${fileBytes} --rw=write --bs=1M ` +
        `--ioengine=io_uring --direct=1 --iodepth=8 --end_fsync=1 --output=/dev/null`,
    );
    const run = longestPhysicalRun(await sh(`filefrag -v -b4096 ${file}`));
    const size = Math.min(run.size, fileBytes);
    const doctor = JSON.parse(await sh("fastloop doctor --json", false) || "{}");
    const zc = (BigInt(doctor?.ublk?.features ?? "0") & (1n << 11n)) !== 0n;
    const variants = opts.variants!.split(";").map((v) => v.trim()).filter((v) => v);
    const makers: Array<() => Promise<Contender>> = [
      () =>
        Promise.resolve({
          name: "raw device",
          device: disk,
          offset: run.offset,
          size,
          pids: {},
          cleanup: () => Promise.resolve(),
        }),
      () => loopContender(size),
      () => fastloopContender(`fastloop (${zc ? "zero copy" : "copy"})`, "", size),
    ];
    if (zc) makers.push(() => fastloopContender("fastloop (copy)", "FASTLOOP_ZERO_COPY=0", size));
    for (const v of variants) makers.push(() => fastloopContender(`fastloop ${v}`, v, size));
    if ((await sh("command -v ublk", false)).trim()) {
      for (const z of zc ? ["", "-z"] : [""]) {
        makers.push(async (): Promise<Contender> => {
          await sh(`ublk add -t loop -f ${file} -n 9 ${z}`);
          for (let i = 0; i < 500 && !exists("/dev/ublkb9"); i++) await sleep(20);
          // `ublk list` names the daemon's pid.
          const pid = Number(
            /daemon pid (\d+)/.exec(await sh("ublk list -n 9", false))?.[1] ?? 0,
          );
          return {
            name: `ublksrv loop${z ? " (zero copy)" : ""}`,
            device: "/dev/ublkb9",
            offset: 0,
            size,
            pids: (pid ? { server: pid } : {}) as Record<string, number>,
            cleanup: async () => void await sh("ublk del -n 9"),
          };
        });
      }
    }
    const lines = [
      `# CPU per IO, ${opts.rw} ${opts.bs} QD${opts.iodepth}, ${opts.runtime} s — ${
        (await sh("uname -r")).trim()
      }`,
      "",
      "| contender | IOPS | p50 µs | p99 µs | VM CPU µs/IO | server threads µs/IO | supervisor µs/IO | turns/IO | enters/IO |",
      "|---|---|---|---|---|---|---|---|---|",
    ];
    for (const make of makers) {
      const c = await make();
      try {
        await sh("sync; echo 3 > /proc/sys/vm/drop_caches");
        if (Number(opts.ramp) > 0) {
          // Warm-up, not measured: a new server compiles its hot code meanwhile.
          await sh(
            `fio --name=w --ioengine=io_uring --direct=1 --filename=${c.device} ` +
              `--offset=${c.offset} --size=${c.size} --rw=${opts.rw} --bs=${opts.bs} ` +
              `--iodepth=${opts.iodepth} --time_based --runtime=${opts.ramp} --output=/dev/null ` +
              `--allow_mounted_write=1`,
          );
        }
        const before = Object.fromEntries(
          Object.entries(c.pids).map(([k, pid]) => [k, threadTicks(pid)]),
        );
        const c0 = await c.counters?.();
        const cpu0 = busyJiffies();
        const json = await sh(
          `fio --output-format=json --name=p --ioengine=io_uring --direct=1 ` +
            `--filename=${c.device} --offset=${c.offset} --size=${c.size} --rw=${opts.rw} ` +
            `--bs=${opts.bs} --iodepth=${opts.iodepth} --time_based --runtime=${opts.runtime} ` +
            `--randrepeat=0 --norandommap --allow_mounted_write=1`,
        );
        const cpu1 = busyJiffies();
        const c1 = await c.counters?.();
        const job = JSON.parse(json.slice(json.indexOf("{"))).jobs[0];
        const side = opts.rw!.includes("write") ? job.write : job.read;
        const ios = job.read.total_ios + job.write.total_ios;
        const perIo = (ticks: number) => (ticks * 1e4 / ios).toFixed(1);
        const threads: string[] = [];
        let supervisor = "";
        for (const [who, pid] of Object.entries(c.pids)) {
          const after = threadTicks(pid);
          const split = [...after].map(([name, [u, s, m]]) => {
            const [u0, s0, m0] = before[who]!.get(name) ?? [0, 0, 0];
            return { name, user: u - u0, sys: s - s0, faults: m - m0 };
          })
            .filter((t) => t.user + t.sys > 0)
            .sort((a, b) => b.user + b.sys - a.user - a.sys)
            .map((t) =>
              `${t.name} ${perIo(t.user)}u+${perIo(t.sys)}s ${(t.faults / ios).toFixed(2)}cs`
            );
          if (who === "supervisor") supervisor = split.join(", ") || "0";
          else threads.push(split.join(", ") || "0");
        }
        const pct = side.clat_ns.percentile ?? {};
        lines.push(
          `| ${c.name} | ${side.iops.toFixed(0)} | ${
            ((pct["50.000000"] ?? 0) / 1000).toFixed(0)
          } | ${((pct["99.000000"] ?? 0) / 1000).toFixed(0)} | ${perIo(cpu1 - cpu0)} | ${
            threads.join("; ") || "-"
          } | ${supervisor || "-"} | ${
            c0 && c1 ? ((c1.turns - c0.turns) / ios).toFixed(2) : "-"
          } | ${c0 && c1 ? ((c1.enters - c0.enters) / ios).toFixed(2) : "-"} |`,
        );
        console.error(`profile: ${lines[lines.length - 1]}`);
      } finally {
        await c.cleanup();
      }
    }
    console.log(lines.join("\n"));
  } finally {
    await sh(`umount ${mnt}`, false);
  }
}

function busyJiffies(): number {
  const f = Deno.readTextFileSync("/proc/stat").split("\n")[0]!.trim().split(/\s+/).slice(1)
    .map(Number);
  return f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

await main();
