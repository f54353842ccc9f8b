//! `/run/fastloop/`: what is attached, who serves it, and how to talk to it. One JSON record per
//! device (`ublkbN.json`), one control socket per device (`ublkbN.sock`, unix stream, JSON
//! lines), one lock per attached file (`files/DEV-INO.lock`) and the servers' logs (`log/`).
//! The directory is root-only (0700), so the sockets are a root-only control channel.
//!
//! Records are written atomically (temporary file + rename) so a reader never sees half a
//! record. A record names its server by pid *and* start time, so a recycled pid is not taken for
//! a live server: such a record is "stale" and `detach` cleans it up.

import { ENODEV, SyscallError } from "../ffi/errno.ts";
import { close, fstat, O_PATH, open } from "../ffi/libc.ts";
import { ExitCode, UserError } from "./errors.ts";

/** The state directory; `FASTLOOP_RUN_DIR` moves it (tests). */
export function runDir(): string {
  return Deno.env.get("FASTLOOP_RUN_DIR") ?? "/run/fastloop";
}

export function logDir(): string {
  return `${runDir()}/log`;
}

function filesDir(): string {
  return `${runDir()}/files`;
}

export function recordPath(id: number): string {
  return `${runDir()}/ublkb${id}.json`;
}

export function socketPath(id: number): string {
  return `${runDir()}/ublkb${id}.sock`;
}

/** Where the supervisor publishes `SupervisorStatus` (one writer: the supervisor). */
export function supervisorStatusPath(id: number): string {
  return `${runDir()}/ublkb${id}.supervisor.json`;
}

/**
 * Where a server started by `fastloop restart` says that it is up and waiting for the running
 * server to hand the device over (`lib/handover.ts`).
 */
export function takeoverPath(id: number): string {
  return `${runDir()}/ublkb${id}.takeover.json`;
}

/** What a server writes once its device is live. Every field is plain JSON. */
export interface DeviceRecord {
  version: 1;
  id: number;
  blockPath: string;
  charPath: string;
  file: {
    /** The path given to `attach`, made absolute. */
    path: string;
    /** st_dev and st_ino as decimal strings: a 64-bit inode number does not fit a JS number. */
    dev: string;
    ino: string;
  };
  server: ProcessRef;
  /** The process that restarts the server when it dies (absent for an unsupervised server). */
  supervisor?: ProcessRef;
  startedAt: string;
  logPath: string;
  socketPath: string;
  options: {
    readOnly: boolean;
    queues: number;
    depth: number;
    recoverable: boolean;
    /** The device's region and sector size (`lib/region.ts`); absent in older records: 0, 0, 512. */
    offsetBytes?: number;
    sizeLimitBytes?: number;
    sectorBytes?: number;
    /** Attached with `--partscan`. */
    partscan?: boolean;
  };
}

/**
 * What a device's supervisor says of its servers (`lib/supervisor.ts`): `stat` shows it, above
 * all while no server serves the device and its IO waits.
 */
export interface SupervisorStatus {
  version: 1;
  pid: number;
  /** serving: a server has served for a while; starting: one is starting; waiting: none is. */
  state: "serving" | "starting" | "waiting";
  /** Server deaths since attach. */
  deaths: number;
  /** Servers in a row that died before they were ready or soon after. */
  quickDeaths: number;
  /** Enough quick deaths in a row that the supervisor calls it a crash loop. */
  crashLoop: boolean;
  lastDeath?: { at: string; how: string; cause: string };
  /** When the device's IO began to wait for a server (absent while it is served). */
  waitingSince?: string;
  /** When the next server starts (while waiting). */
  nextTryAt?: string;
  /** Planned hand-overs to a new server (`fastloop restart`) since attach: not deaths. */
  restarts?: number;
  /** The last of them: when, and the server before and after. */
  lastRestart?: { at: string; fromPid: number; toPid: number };
}

/** A process named by pid and start time. */
export interface ProcessRef {
  pid: number;
  /** Field 22 of /proc/PID/stat (clock ticks since boot): tells a live process from a reused pid. */
  startTicks: number;
}

/** A record and whether the processes it names are still running. */
export interface RegistryEntry {
  record: DeviceRecord;
  /** The server is running. */
  alive: boolean;
  /** The supervisor is running (it may be restarting a dead server). */
  supervisorAlive: boolean;
}

function entryOf(record: DeviceRecord): RegistryEntry {
  return {
    record,
    alive: processAlive(record.server),
    supervisorAlive: record.supervisor !== undefined && processAlive(record.supervisor),
  };
}

/** Creates the state directories, root-only, and tightens them if they already existed. */
export function ensureRunDir(): void {
  for (const dir of [runDir(), logDir(), filesDir()]) {
    Deno.mkdirSync(dir, { recursive: true, mode: 0o700 });
    Deno.chmodSync(dir, 0o700);
  }
}

/** How many logs of devices that are gone `pruneLogs` keeps (the newest). */
export const KEPT_OLD_LOGS = 50;

/**
 * Deletes the oldest logs of devices that are gone, keeping the newest `keep` of them and every
 * log a record still names, so a host that attaches all day does not fill /run. Best effort: a
 * log that cannot be listed or deleted stays.
 */
export function pruneLogs(keep = KEPT_OLD_LOGS): number {
  const inUse = new Set(listRecords().map((e) => e.record.logPath));
  const old: Array<{ path: string; mtimeMs: number }> = [];
  try {
    for (const entry of Deno.readDirSync(logDir())) {
      const path = `${logDir()}/${entry.name}`;
      if (!entry.isFile || !entry.name.endsWith(".log") || inUse.has(path)) continue;
      old.push({ path, mtimeMs: Deno.statSync(path).mtime?.getTime() ?? 0 });
    }
  } catch {
    return 0;
  }
  old.sort((a, b) => b.mtimeMs - a.mtimeMs);
  let removed = 0;
  for (const { path } of old.slice(keep)) {
    try {
      Deno.removeSync(path);
      removed++;
    } catch {
      // Gone already, or not ours to remove: leave it.
    }
  }
  return removed;
}

/** Writes `record` atomically (tmp + rename), mode 0600. */
export function writeRecord(record: DeviceRecord): void {
  writeJsonAtomically(recordPath(record.id), record);
}

export function writeSupervisorStatus(id: number, status: SupervisorStatus): void {
  writeJsonAtomically(supervisorStatusPath(id), status);
}

/** The supervisor's status of device `id`, or null when it has published none. */
export function readSupervisorStatus(id: number): SupervisorStatus | null {
  try {
    const s = JSON.parse(Deno.readTextFileSync(supervisorStatusPath(id))) as SupervisorStatus;
    return s.version === 1 && typeof s.deaths === "number" ? s : null;
  } catch {
    return null;
  }
}

/** Writes a JSON file of the state directory atomically (tmp + rename), mode 0600. */
export function writeJsonAtomically(path: string, value: unknown): void {
  ensureRunDir();
  const tmp = `${path}.tmp-${Deno.pid}`;
  Deno.writeTextFileSync(tmp, JSON.stringify(value, null, 2) + "\n", { mode: 0o600 });
  Deno.renameSync(tmp, path);
}

/**
 * Removes a device's record, socket and supervisor status, and the half-written copies that a
 * writer killed between write and rename left; missing files are fine (cleanup is idempotent).
 */
export function removeRecord(id: number): void {
  for (const path of [recordPath(id), socketPath(id), supervisorStatusPath(id)]) {
    removeIfThere(path);
  }
  removeOrphanedTemporaries(id);
}

/**
 * Removes `ublkb{id}.*.tmp-PID` files (from `writeJsonAtomically`) whose writer is gone: a server
 * or supervisor killed by SIGKILL between the write and the rename. A live writer's file stays, so
 * its rename cannot fail.
 */
function removeOrphanedTemporaries(id: number): void {
  const temporary = new RegExp(`^ublkb${id}\\..*\\.tmp-([0-9]+)$`);
  for (const entry of runDirEntries()) {
    const m = temporary.exec(entry.name);
    if (!m || !entry.isFile) continue;
    const writer = Number(m[1]);
    if (writer !== Deno.pid && processStartTicks(writer) !== null) continue;
    removeIfThere(`${runDir()}/${entry.name}`);
  }
}

/**
 * Removes a supervisor's status alone, and its dead writers' half-written copies (its device was
 * detached: the server removed the rest).
 */
export function removeSupervisorStatus(id: number): void {
  removeIfThere(supervisorStatusPath(id));
  removeOrphanedTemporaries(id);
}

function removeIfThere(path: string): void {
  try {
    Deno.removeSync(path);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}

function parseRecord(text: string): DeviceRecord | null {
  try {
    const r = JSON.parse(text) as Partial<DeviceRecord>;
    if (
      r.version !== 1 || typeof r.id !== "number" || typeof r.blockPath !== "string" ||
      typeof r.file?.path !== "string" || typeof r.server?.pid !== "number"
    ) {
      return null;
    }
    return r as DeviceRecord;
  } catch {
    return null;
  }
}

export function readRecord(id: number): DeviceRecord | null {
  try {
    return parseRecord(Deno.readTextFileSync(recordPath(id)));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

/** The state directory's entries; none before the first attach created it. */
function runDirEntries(): Deno.DirEntry[] {
  try {
    return [...Deno.readDirSync(runDir())];
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
}

/** Every record, sorted by device id, each with whether its server is alive. */
export function listRecords(): RegistryEntry[] {
  const entries: RegistryEntry[] = [];
  for (const entry of runDirEntries()) {
    const m = /^ublkb([0-9]+)\.json$/.exec(entry.name);
    if (!m || !entry.isFile) continue;
    const record = readRecord(Number(m[1]));
    if (record) entries.push(entryOf(record));
  }
  return entries.sort((a, b) => a.record.id - b.record.id);
}

/** Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or null if gone. */
export function processStartTicks(pid: number): number | null {
  let stat: string;
  try {
    stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch {
    return null;
  }
  // The command name (field 2) may hold spaces and parentheses: fields restart after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // rest[0] is field 3 (state), so field 22 is rest[19].
  const ticks = Number(rest[19]);
  if (rest[0] === "Z" || !Number.isFinite(ticks)) return null;
  return ticks;
}

/** True when the process is running and is the same one (not a reused pid). */
export function processAlive(server: ProcessRef): boolean {
  return server.pid > 0 && processStartTicks(server.pid) === server.startTicks;
}

/** st_dev/st_ino of a path, without opening the file for reading or writing. */
export function fileIdentity(path: string): { dev: string; ino: string } {
  // O_PATH does not count as an open for leases (no break), works on FIFOs and device nodes
  // without side effects, and needs no permission on the file itself.
  const fd = open(path, O_PATH);
  try {
    const st = fstat(fd, path);
    return { dev: st.dev.toString(), ino: st.ino.toString() };
  } finally {
    close(fd);
  }
}

/** The record of the device serving the file at `path` (any path to the same inode). */
export function findByFile(path: string): RegistryEntry | null {
  let id: { dev: string; ino: string };
  try {
    id = fileIdentity(path);
  } catch (e) {
    if (e instanceof SyscallError) return null;
    throw e;
  }
  return listRecords().find((e) => e.record.file.dev === id.dev && e.record.file.ino === id.ino) ??
    null;
}

/**
 * Parses `/dev/ublkbN`, `ublkbN` or `N` to a device id; null when it is none of those. N is
 * written as the kernel names devices: no leading zeros, so `ublkb00` is not taken for `ublkb0`.
 */
export function parseDeviceRef(ref: string): number | null {
  const m = /^(?:\/dev\/ublkb|ublkb)?(0|[1-9][0-9]{0,6})$/.exec(ref);
  return m ? Number(m[1]) : null;
}

/** Longer than PATH_MAX: no system call takes such a name, so messages show only its start. */
const QUOTE_MAX_CHARS = 4096;

/**
 * A path as messages show it: bare when plain, JSON-quoted when empty or unusual (newlines), and
 * cut short when longer than any path can be (a 100 kB argument must not become a 100 kB line).
 */
export function quotePath(path: string): string {
  if (path.length > QUOTE_MAX_CHARS) {
    return `${JSON.stringify(path.slice(0, 64) + "...")} (${path.length} characters)`;
  }
  return /^[\w./+@:,=-]+$/.test(path) ? path : JSON.stringify(path);
}

/**
 * Resolves what the user named (`/dev/ublkbN`, `ublkbN`, `N`, or the backing file) to a record.
 * Throws `UserError` exit 7 when it is not attached.
 */
export function resolve(ref: string): RegistryEntry {
  const id = parseDeviceRef(ref);
  if (id !== null) {
    const record = readRecord(id);
    if (record) return entryOf(record);
    // `N` could also be a file named N in the current directory.
    if (ref.startsWith("/dev/") || ref.startsWith("ublkb") || !exists(ref)) {
      throw new UserError(`${quotePath(ref)} is not attached by fastloop`, ExitCode.notAttached);
    }
  }
  if (!exists(ref)) {
    throw new UserError(
      `${quotePath(ref)} is not attached (no such device or file)`,
      ExitCode.notAttached,
    );
  }
  const entry = findByFile(ref);
  if (!entry) throw new UserError(`${quotePath(ref)} is not attached`, ExitCode.notAttached);
  return entry;
}

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * An exclusive claim on one file (by dev+ino), held by the server for its whole life: two
 * `attach` of the same file racing each other cannot both get past it, and the loser never opens
 * the file (opening it would break the winner's lease). It is a `flock`, so a server that dies
 * releases it with no stale state to clean.
 */
export class FileClaim {
  private constructor(private readonly file: Deno.FsFile, readonly path: string) {}

  /** Takes the claim; null when another live process holds it. */
  static tryTake(identity: { dev: string; ino: string }): FileClaim | null {
    ensureRunDir();
    const path = `${filesDir()}/${identity.dev}-${identity.ino}.lock`;
    for (;;) {
      const file = Deno.openSync(path, { read: true, write: true, create: true, mode: 0o600 });
      if (!file.tryLockSync(true)) {
        file.close();
        return null;
      }
      // The previous holder may have unlinked the lock file between our open and our lock; a
      // lock on an unlinked inode would not exclude the next claimant, so start over.
      try {
        const onDisk = Deno.statSync(path);
        const held = file.statSync();
        if (onDisk.ino === held.ino && onDisk.dev === held.dev) return new FileClaim(file, path);
      } catch (e) {
        if (!(e instanceof Deno.errors.NotFound)) {
          file.close();
          throw e;
        }
      }
      file.close();
    }
  }

  /** Unlinks then unlocks, in that order (see `tryTake`). */
  release(): void {
    try {
      Deno.removeSync(this.path);
    } catch {
      // Already gone: nothing to release but the lock.
    }
    this.file.close();
  }
}

/** The server's reply to a control request. */
export interface ControlReply {
  ok: boolean;
  error?: string;
  exitCode?: number;
  [key: string]: unknown;
}

/**
 * Sends one JSON request on a device's control socket and returns the one-line JSON reply.
 * Throws `UserError` if the server does not answer within `timeoutMs`.
 */
export async function controlRequest(
  path: string,
  request: Record<string, unknown>,
  timeoutMs = 10_000,
): Promise<ControlReply> {
  const conn = await Deno.connect({ transport: "unix", path });
  const timer = setTimeout(() => {
    try {
      conn.close();
    } catch {
      // Closed by the reply already.
    }
  }, timeoutMs);
  try {
    await conn.write(new TextEncoder().encode(JSON.stringify(request) + "\n"));
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(65536);
    for (;;) {
      let n: number | null;
      try {
        n = await conn.read(buf);
      } catch {
        n = null;
      }
      if (n === null) break;
      chunks.push(buf.slice(0, n));
      if (buf.subarray(0, n).includes(0x0a)) break;
    }
    const text = new TextDecoder().decode(concat(chunks));
    const line = text.split("\n")[0] ?? "";
    if (line === "") {
      throw new UserError(
        `The server behind ${path} did not answer ${JSON.stringify(request["cmd"])}`,
        ExitCode.failure,
      );
    }
    return JSON.parse(line) as ControlReply;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch {
      // Already closed by the timeout.
    }
  }
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/**
 * Removes what a dead server left: its ublk device (stopped and deleted, unless the id now
 * belongs to another live server) and its record. Its file lock and lease died with it.
 */
export async function cleanupDeadDevice(record: DeviceRecord): Promise<void> {
  // Loaded only here: stat and most of detach never need the ublk control code.
  const { UblkControl } = await import("./ublk_control.ts");
  let ctrl;
  try {
    ctrl = UblkControl.open();
  } catch (e) {
    // No ublk here: there can be no device left either.
    if (e instanceof UserError && e.exitCode === ExitCode.unsupported) {
      removeRecord(record.id);
      removeStaleClaim(record.file);
      return;
    }
    throw e;
  }
  try {
    await deleteDevice(ctrl, record);
  } finally {
    ctrl.close();
  }
  removeRecord(record.id);
  removeStaleClaim(record.file);
}

/** A killed server's lock file stays behind (its flock does not): remove it if nobody holds it. */
function removeStaleClaim(identity: { dev: string; ino: string }): void {
  FileClaim.tryTake(identity)?.release();
}

/** STOP_DEV + DEL_DEV of a record's device, unless absent or now served by another process. */
export async function deleteDevice(
  ctrl: {
    getDeviceInfo(id: number): Promise<{ ublksrvPid: number }>;
    stopDevice(id: number): Promise<void>;
    deleteDevice(id: number): Promise<void>;
  },
  record: DeviceRecord,
): Promise<void> {
  let info;
  try {
    info = await ctrl.getDeviceInfo(record.id);
  } catch (e) {
    if (e instanceof SyscallError && e.errno === ENODEV) return;
    throw e;
  }
  const ownedByOther = info.ublksrvPid > 0 && info.ublksrvPid !== record.server.pid &&
    info.ublksrvPid !== record.supervisor?.pid && pidRunning(info.ublksrvPid);
  if (ownedByOther) return;
  try {
    await ctrl.stopDevice(record.id);
  } catch {
    // Already stopped (a dead, non-recoverable server's device is); DEL_DEV still works.
  }
  await ctrl.deleteDevice(record.id);
}

function pidRunning(pid: number): boolean {
  try {
    Deno.statSync(`/proc/${pid}`);
    return true;
  } catch {
    return false;
  }
}
