//! Everything checked before a device exists: who runs fastloop, what kind of file it was given,
//! and who else is using a file or a device. Each failure is one `UserError` line with the exit
//! code scripts rely on (`lib/errors.ts`). Nothing here opens a file for reading or writing: a
//! file that is already attached holds a lease that such an open would break.

import { SyscallError } from "../ffi/errno.ts";
import { backingDeviceOf, BlockDeviceError } from "../ffi/blkdev.ts";
import {
  close,
  devMajor,
  devMinor,
  fstat,
  fstatfs,
  geteuid,
  O_PATH,
  open,
  S_IFBLK,
  S_IFMT,
  ST_RDONLY,
} from "../ffi/libc.ts";
import { ExitCode, ublkMissingError, UserError } from "./errors.ts";
import { findByFile, quotePath as quote } from "./registry.ts";
import { checkSectorSize, type Layout, regionLength } from "./region.ts";

/** Bounds of `--queues` and `--depth`: one Worker thread per queue; ublk's per-queue maximum. */
export const QUEUES_MIN = 1;
export const QUEUES_MAX = 32;
export const DEPTH_MIN = 1;
export const DEPTH_MAX = 4096; // UBLK_MAX_QUEUE_DEPTH
export const QUEUES_DEFAULT = 1;
export const DEPTH_DEFAULT = 128;

/**
 * In copy mode each queue owns one IO buffer per tag, depth × max IO bytes in all (mmap'd, and
 * registered with its ring, which makes it resident: lib/request_data.ts). ublk's default max IO (512 KiB) at depth 4096 would be 2 GiB per queue, so the max
 * IO shrinks as depth grows to keep a queue's buffers within this budget, down to a floor that
 * still lets large IO through in few pieces (the kernel splits larger requests).
 */
export const QUEUE_BUFFER_BUDGET_BYTES = 64 * 1024 * 1024;
export const MAX_IO_BYTES_CEILING = 512 * 1024;
export const MAX_IO_BYTES_FLOOR = 64 * 1024;

/** The largest request a device of this depth accepts: a power of two, see the budget above. */
export function maxIoBytesForDepth(depth: number): number {
  let bytes = MAX_IO_BYTES_CEILING;
  while (bytes > MAX_IO_BYTES_FLOOR && bytes * depth > QUEUE_BUFFER_BUDGET_BYTES) bytes >>= 1;
  return bytes;
}

/** ublk (and every Linux block device) addresses 512-byte sectors. */
export const SECTOR_BYTES = 512;

// statfs f_type of pseudo filesystems whose "files" have no data blocks (linux/magic.h).
const PSEUDO_FILESYSTEMS: Record<number, string> = {
  0x9fa0: "/proc (procfs)", // PROC_SUPER_MAGIC
  0x62656572: "/sys (sysfs)", // SYSFS_MAGIC
  0x64626720: "debugfs", // DEBUGFS_MAGIC
  0x74726163: "tracefs", // TRACEFS_MAGIC
  0x1cd1: "devpts", // DEVPTS_SUPER_MAGIC
  0x27e0eb: "cgroup", // CGROUP_SUPER_MAGIC
  0x63677270: "cgroup2", // CGROUP2_SUPER_MAGIC
  0x6165676c: "pstore", // PSTOREFS_MAGIC
  0xcafe4a11: "bpf", // BPF_FS_MAGIC
  0x73636673: "securityfs", // SECURITYFS_MAGIC
  0xde5e81e4: "efivarfs", // EFIVARFS_MAGIC
};

/** The pseudo filesystem (procfs, sysfs, …) a statfs `f_type` names, or undefined for any other. */
export function pseudoFilesystemName(type: number): string | undefined {
  return PSEUDO_FILESYSTEMS[type >>> 0];
}

/**
 * The reason in a failed Deno file system call ("File name too long (os error 36)") without the
 * path Deno appends to it: the caller names the path once, quoted (it may hold a newline).
 */
export function osErrorText(e: unknown): string {
  const message = e instanceof Error ? e.message : String(e);
  return /^.*?\(os error [0-9]+\)/.exec(message)?.[0] ?? message.split("\n")[0] ?? "";
}

/** fastloop drives /dev/ublk-control and takes leases on files it may not own: root only. */
export function requireRoot(command: string): void {
  if (geteuid() !== 0) {
    throw new UserError(
      `${command} must run as root (it controls block devices through /dev/ublk-control)`,
      ExitCode.permission,
    );
  }
}

/** What `attach` learned about the file before starting a server for it. */
export interface AttachTarget {
  /** Absolute path as given (symlinks kept: the user's name for the file). */
  path: string;
  sizeBytes: number;
  dev: string;
  ino: string;
}

/** What `info` is when it is not a regular file ("a directory", "a FIFO", …); null for one. */
export function notRegularFileKind(info: Deno.FileInfo): string | null {
  return info.isDirectory
    ? "a directory"
    : info.isBlockDevice
    ? "a block device"
    : info.isCharDevice
    ? "a character device"
    : info.isFifo
    ? "a FIFO"
    : info.isSocket
    ? "a socket"
    : info.isFile
    ? null
    : "not a regular file";
}

/** Checks that `path` names a file fastloop can attach (`readOnly`: only read access needed). */
export function validateAttachFile(path: string, readOnly: boolean): AttachTarget {
  if (path === "") throw new UserError("The file name is empty");
  if (path.includes("\0")) throw new UserError(`${quote(path)}: a file name cannot contain NUL`);
  const name = quote(path);
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${name} does not exist`);
    if (e instanceof Deno.errors.PermissionDenied) {
      throw new UserError(`${name} cannot be reached: permission denied`);
    }
    if (e instanceof Deno.errors.NotADirectory) {
      throw new UserError(`${name} does not exist (a path component is not a directory)`);
    }
    throw new UserError(`${name} cannot be used: ${osErrorText(e)}`);
  }
  const kind = notRegularFileKind(info);
  if (kind) throw new UserError(`${name} is ${kind}, not a regular file`);

  let fd: number;
  try {
    fd = open(path, O_PATH);
  } catch (e) {
    const reason = e instanceof SyscallError ? e.code : osErrorText(e);
    throw new UserError(`${name} cannot be opened: ${reason}`);
  }
  let st, fs;
  try {
    st = fstat(fd, name);
    fs = fstatfs(fd, name);
  } finally {
    close(fd);
  }
  const pseudo = pseudoFilesystemName(fs.type);
  if (pseudo) {
    throw new UserError(`${name} is a ${pseudo} file, not a regular file with data blocks`);
  }
  if (st.size === 0) {
    throw new UserError(`${name} is empty: a device needs a size that is a multiple of 512 bytes`);
  }
  if (!readOnly && (fs.flags & ST_RDONLY) !== 0) {
    throw new UserError(`${name} is on a read-only filesystem (attach it with --read-only)`);
  }
  const absolute = path.startsWith("/") ? path : `${Deno.cwd()}/${path}`;
  const target = {
    path: absolute,
    sizeBytes: st.size,
    dev: st.dev.toString(),
    ino: st.ino.toString(),
  };
  const attached = findByFile(path);
  if (attached) {
    const state = attached.alive ? "" : " (its server is dead: run 'fastloop detach' to clean up)";
    throw new UserError(
      `${name} is already attached as ${attached.record.blockPath}${state}`,
      ExitCode.busy,
    );
  }
  return target;
}

/** What `attach` asked of the device's place in the file (`lib/region.ts`). */
export interface LayoutRequest {
  offsetBytes?: number;
  sizeLimitBytes?: number;
  /** Absent: the logical block size of the filesystem's device (512 when it has none). */
  sectorBytes?: number;
}

/**
 * The device's layout in `target` and its size, checked before any server starts: the sector
 * size against the filesystem's device, the region against the file (`lib/region.ts`).
 */
export function validateLayout(
  target: AttachTarget,
  asked: LayoutRequest,
): Layout & { sizeBytes: number } {
  const device = filesystemDevice(target.path);
  const sectorBytes = asked.sectorBytes ?? device?.logicalBlockSize ?? SECTOR_BYTES;
  checkSectorSize(sectorBytes, device);
  const layout: Layout = {
    offsetBytes: asked.offsetBytes ?? 0,
    sizeLimitBytes: asked.sizeLimitBytes ?? 0,
    sectorBytes,
  };
  return { ...layout, sizeBytes: regionLength(quote(target.path), target.sizeBytes, layout) };
}

/** The block device under the file's filesystem (its path and sector size), or null if none. */
function filesystemDevice(path: string): { devicePath: string; logicalBlockSize: number } | null {
  const fd = open(path, O_PATH);
  try {
    return backingDeviceOf(fd, path);
  } catch (e) {
    if (e instanceof BlockDeviceError) return null; // tmpfs, btrfs, NFS, …: no alignment known
    throw e;
  } finally {
    close(fd);
  }
}

/**
 * Processes (other than this one) that have the inode `dev`/`ino` open, as "PID (comm)".
 * Reads /proc/PID/fd; cheap enough for an error message, never on a hot path.
 */
export function processesUsing(
  identity: { dev: number; ino: number | null },
  limit = 8,
): string[] {
  const found: string[] = [];
  let procs: Deno.DirEntry[];
  try {
    procs = [...Deno.readDirSync("/proc")];
  } catch {
    return found;
  }
  for (const p of procs) {
    if (!/^[0-9]+$/.test(p.name) || Number(p.name) === Deno.pid) continue;
    let fds: Deno.DirEntry[];
    try {
      fds = [...Deno.readDirSync(`/proc/${p.name}/fd`)];
    } catch {
      continue; // Exited meanwhile, or a kernel thread.
    }
    for (const f of fds) {
      try {
        // stat follows the magic link to the open file itself: no open, no lease break.
        const s = Deno.statSync(`/proc/${p.name}/fd/${f.name}`);
        if (s.ino === identity.ino && (s.dev === identity.dev || s.rdev === identity.dev)) {
          found.push(`${p.name} (${comm(p.name)})`);
          break;
        }
      } catch {
        // The fd was closed meanwhile.
      }
    }
    if (found.length >= limit) break;
  }
  return found;
}

function comm(pid: string): string {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
  } catch {
    return "?";
  }
}

/** "FILE is in use by another process (pids …)": the message for a refused lease. */
export function fileInUseError(path: string): UserError {
  let holders: string[] = [];
  try {
    const s = Deno.statSync(path);
    holders = processesUsing({ dev: s.dev, ino: s.ino });
  } catch {
    // The message without PIDs is still right.
  }
  const who = holders.length > 0 ? `: ${holders.join(", ")}` : "";
  return new UserError(`${quote(path)} is in use by another process${who}`, ExitCode.busy);
}

/** Mount points of the block device `major:minor`, from /proc/self/mountinfo. */
export function mountPointsOf(major: number, minor: number): string[] {
  let text: string;
  try {
    text = Deno.readTextFileSync("/proc/self/mountinfo");
  } catch {
    return [];
  }
  const key = `${major}:${minor}`;
  const points: string[] = [];
  for (const line of text.split("\n")) {
    // mountinfo: ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ... (proc(5)); spaces are \040-escaped.
    const fields = line.split(" ");
    if (fields[2] === key && fields[4] !== undefined) {
      points.push(
        fields[4].replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8))),
      );
    }
  }
  return points;
}

/** Identity of a device node: its rdev split into major/minor, or null if it is not a device. */
export function blockDeviceNumbers(path: string): { major: number; minor: number } | null {
  try {
    const fd = open(path, O_PATH);
    try {
      const st = fstat(fd, path);
      if ((st.mode & S_IFMT) !== S_IFBLK) return null;
      return { major: devMajor(st.rdev), minor: devMinor(st.rdev) };
    } finally {
      close(fd);
    }
  } catch (e) {
    if (e instanceof SyscallError) return null;
    throw e;
  }
}

/** Fails fast and clearly on a kernel without ublk, before anything about the file is decided. */
export function requireUblk(): void {
  try {
    Deno.statSync("/dev/ublk-control");
  } catch {
    throw ublkMissingError();
  }
}
