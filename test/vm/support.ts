// What the VM tests share: running tools and the CLI, attach/detach with the kernel's view checked,
// and counting what fastloop could leave behind (from /sys and /proc, not from fastloop).

import assert from "node:assert/strict";

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  /** Added to the inherited environment. */
  env?: Record<string, string>;
  /** Run as this uid (and the same gid), e.g. 65534 for "nobody". */
  uid?: number;
  /** Bytes for the program's stdin (otherwise /dev/null). */
  stdin?: Uint8Array;
}

export async function run(program: string, args: string[], opts: RunOptions = {}): Promise<Run> {
  const child = new Deno.Command(program, {
    args,
    stdin: opts.stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
    ...(opts.uid !== undefined ? { uid: opts.uid, gid: opts.uid } : {}),
    ...(opts.env ? { env: opts.env } : {}),
  }).spawn();
  if (opts.stdin) {
    const w = child.stdin.getWriter();
    await w.write(opts.stdin);
    await w.close();
  }
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Runs a tool that must succeed; returns its stdout. */
export async function ok(program: string, args: string[]): Promise<string> {
  const r = await run(program, args);
  assert.equal(
    r.code,
    0,
    `${program} ${args.join(" ")} failed (${r.code}): ${r.stderr}${r.stdout}`,
  );
  return r.stdout;
}

/** The CLI from the tree (`bin/fastloop`, on the VM's PATH). */
export function fastloop(args: string[], opts: RunOptions = {}): Promise<Run> {
  return run("fastloop", args, opts);
}

/** The kernel's ublk features, from `fastloop doctor --json` (GET_FEATURES). */
export async function kernelFeatures(): Promise<bigint> {
  const r = await fastloop(["doctor", "--json"]);
  const features = JSON.parse(r.stdout).ublk.features as string | null;
  assert.ok(features, `doctor reports the ublk features: ${r.stdout}`);
  return BigInt(features);
}

/** Attaches `file`; checks the kernel's view of the new device: it exists with the file's size. */
export async function attach(
  file: string,
  extra: string[] = [],
  opts: RunOptions = {},
): Promise<string> {
  const r = await fastloop(["attach", ...extra, file], opts);
  assert.equal(r.code, 0, `attach ${file}: ${r.stderr}`);
  const dev = r.stdout.trim();
  assert.match(dev, /^\/dev\/ublkb[0-9]+$/);
  const sectors = Number(Deno.readTextFileSync(`/sys/block/${dev.slice(5)}/size`).trim());
  assert.equal(sectors * 512, Deno.statSync(file).size, `${dev}: device size = file size`);
  return dev;
}

export async function detach(ref: string, opts: RunOptions = {}): Promise<void> {
  const r = await fastloop(["detach", ref], opts);
  assert.equal(r.code, 0, `detach ${ref}: ${r.stderr}`);
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until `cond` holds, polling; fails with `what` after `timeoutMs`. */
export async function waitFor(
  what: string,
  cond: () => boolean | Promise<boolean>,
  timeoutMs: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    assert.ok(Date.now() < deadline, `${what}: not within ${timeoutMs / 1000} s`);
    await sleep(20);
  }
}

/** The registry record of a device (what its server wrote). */
export function recordOf(
  dev: string,
): { server: { pid: number }; supervisor?: { pid: number }; logPath: string } {
  return JSON.parse(Deno.readTextFileSync(`/run/fastloop/${dev.slice(5)}.json`));
}

/** Is `pid` running (not gone, not a zombie)? */
export function running(pid: number): boolean {
  try {
    return !Deno.readTextFileSync(`/proc/${pid}/stat`).includes(") Z ");
  } catch {
    return false;
  }
}

/** Completed reads + writes of a block device, from the kernel's own accounting. */
export function completedIos(dev: string): number {
  const f = Deno.readTextFileSync(`/sys/block/${dev.slice(5)}/stat`).trim().split(/\s+/);
  return Number(f[0]) + Number(f[4]);
}

/** Seconds since boot: the clock of the kernel log's timestamps. */
export function uptime(): number {
  return Number(Deno.readTextFileSync("/proc/uptime").split(" ")[0]);
}

/** The kernel log's lines stamped `from` seconds after boot or later (one test's own lines). */
export async function dmesgSince(from: number): Promise<string> {
  return (await ok("dmesg", [])).split("\n")
    .filter((line) => Number(/^\[\s*([0-9.]+)\]/.exec(line)?.[1] ?? -1) >= from)
    .join("\n");
}

/** ublk devices the kernel has, from /sys (independent of the registry). */
export function ublkDevices(): string[] {
  try {
    return [...Deno.readDirSync("/sys/class/ublk-char")].map((e) => e.name);
  } catch {
    return [];
  }
}

/** Pids of fastloop's background processes (servers and supervisors: `__server` in argv). */
export function serverProcesses(): number[] {
  const pids: number[] = [];
  for (const p of Deno.readDirSync("/proc")) {
    if (!/^[0-9]+$/.test(p.name)) continue;
    try {
      if (Deno.readTextFileSync(`/proc/${p.name}/cmdline`).split("\0").includes("__server")) {
        pids.push(Number(p.name));
      }
    } catch {
      // Exited meanwhile.
    }
  }
  return pids;
}

/** Files left in the registry (records, sockets, locks; not the log directory). */
export function registryFiles(): string[] {
  const left: string[] = [];
  for (const dir of ["/run/fastloop", "/run/fastloop/files"]) {
    try {
      for (const e of Deno.readDirSync(dir)) if (!e.isDirectory) left.push(`${dir}/${e.name}`);
    } catch {
      // Never created.
    }
  }
  return left;
}

/**
 * What a failed scenario leaves, printed before its cleanup erases it: `fastloop stat`, the last
 * lines of the `logs` newest server logs and the kernel's recent messages. deno test shows a
 * failure's message only after the whole file ran, and CI keeps nothing else of the VM.
 */
export async function printFailureDiagnostics(error: unknown, logs = 4): Promise<void> {
  const lines = (text: string, n: number) => text.trimEnd().split("\n").slice(-n).join("\n  ");
  console.log(`failed: ${error instanceof Error ? error.message.slice(0, 2000) : error}`);
  const st = await fastloop(["stat"]);
  console.log(
    `diagnostics: fastloop stat (exit ${st.code}):\n  ${lines(st.stdout + st.stderr, 20)}`,
  );
  const logDir = "/run/fastloop/log";
  try {
    const recent = [...Deno.readDirSync(logDir)]
      .filter((e) => e.isFile && e.name.endsWith(".log"))
      .map((e) => ({ name: e.name, mtime: Deno.statSync(`${logDir}/${e.name}`).mtime!.getTime() }))
      .sort((a, b) => b.mtime - a.mtime)
      .slice(0, logs);
    for (const { name } of recent) {
      const text = Deno.readTextFileSync(`${logDir}/${name}`);
      console.log(`diagnostics: ${logDir}/${name} (last lines):\n  ${lines(text, 25)}`);
    }
  } catch (e) {
    console.log(`diagnostics: no server logs: ${e}`);
  }
  const dmesg = await run("dmesg", []);
  console.log(`diagnostics: dmesg (last lines):\n  ${lines(dmesg.stdout, 30)}`);
}

/** The VM's scratch disk (scripts/vm.sh): the host filesystem of a test is made on it. */
export const SCRATCH_DISK = "/dev/vda";

export interface HostFsOptions {
  /** The device to make the filesystem on (default the scratch disk). */
  disk?: string;
  /** Extra mkfs.ext4 options, before the device (e.g. ["-b", "4096"]). */
  mkfsArgs?: string[];
  /** The filesystem's size, after the device (e.g. "128M"; default the whole device). */
  fsSize?: string;
  /**
   * Called before the cleanup when `fn` failed, while what it left is still there (default:
   * `printFailureDiagnostics`).
   */
  onFailure?: (error: unknown) => Promise<void>;
  /** Called after the filesystem checked clean (e.g. "nothing left" assertions). */
  afterwards?: () => void;
}

/**
 * Fresh ext4, mounted for `fn` with a scratch directory on tmpfs for references. Afterwards it is
 * unmounted even if `fn` failed (then everything attached is force-detached first), and must be
 * e2fsck clean: the simplest form of issue 5's sentinel.
 */
export async function withHostFs(
  fn: (mnt: string, tmp: string) => Promise<void>,
  opts: HostFsOptions = {},
): Promise<void> {
  const disk = opts.disk ?? SCRATCH_DISK;
  const mnt = Deno.makeTempDirSync({ prefix: "fl-host-" });
  const tmp = Deno.makeTempDirSync({ prefix: "fl-ref-" });
  await ok("mkfs.ext4", [
    "-F",
    "-q",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1",
    ...(opts.mkfsArgs ?? []),
    disk,
    ...(opts.fsSize ? [opts.fsSize] : []),
  ]);
  await ok("mount", [disk, mnt]);
  let failed = true;
  try {
    await fn(mnt, tmp);
    failed = false;
  } catch (e) {
    await (opts.onFailure ?? printFailureDiagnostics)(e);
    throw e;
  } finally {
    if (failed) await fastloop(["detach", "--all", "--force"]);
    await run("umount", [mnt]);
    Deno.removeSync(mnt, { recursive: true });
    Deno.removeSync(tmp, { recursive: true });
  }
  const fsck = await run("e2fsck", ["-fn", disk]);
  assert.equal(fsck.code, 0, `host filesystem clean: ${fsck.stdout}${fsck.stderr}`);
  opts.afterwards?.();
}
