//! `fastloop map FILE [--json]`: the file's extents as FIEMAP reports them (like `filefrag -v`),
//! what fastloop would do with each — read and write the device directly, read zeros, or go
//! through the file — and why, plus a summary: backing device, filesystem, eligibility, and how
//! much of the file is on the fast path.

import { SyscallError } from "../../ffi/errno.ts";
import {
  extentFlagNames,
  fiemap,
  FIEMAP_EXTENT_DATA_INLINE,
  type FiemapExtent,
} from "../../ffi/fiemap.ts";
import { filesystemOf } from "../../ffi/blkdev.ts";
import { close, fstat, O_NONBLOCK, O_RDONLY, open, S_IFMT, S_IFREG } from "../../ffi/libc.ts";
import { type Command, parseCommandArgs } from "../cli.ts";
import {
  classifyExtent,
  type Eligibility,
  EXTENT_KIND_NAMES,
  EXTENT_REASON_NAMES,
  EXTENT_REASON_TEXT,
  ExtentKind,
  filesystemEligibility,
} from "../eligibility.ts";
import { ExitCode, UsageError, UserError } from "../errors.ts";
import { DirectPathOff, probeDirectWrite } from "../direct_path.ts";
import { quotePath } from "../registry.ts";
import { notRegularFileKind, osErrorText, pseudoFilesystemName } from "../validate.ts";

const HELP = `Usage: fastloop map FILE [--json]

Shows FILE's extents as the filesystem reports them (FIEMAP, after syncing the file; the same
extents and units as 'filefrag -v'), and for each one whether fastloop reads and writes it
directly on the filesystem's block device, reads it as zeros, or goes through the file, and why.
Ends with a summary: backing device, filesystem, whether it is eligible for the direct path,
whether a read-write attach can open the filesystem's device (it is opened for writing and closed
at once, as attach would; nothing is written) and if not why (a kernel that refuses to open a
mounted filesystem's device for writing: boot with bdev_allow_write_mounted=1 or use one built
with CONFIG_BLK_DEV_WRITE_MOUNTED=y), and the share of the file on the fast path.

Mapping opens FILE read-only: if it is attached, its server gives up direct writes (or its
lease) for that, and takes the lease back after this command exits. A lease holder that does
not let go within 3 s makes this command fail with exit code 4.

Options:
  --json      Print one JSON object instead of the table (field names are stable):
                file, sizeBytes, blockSize (filesystem block: the unit of the *Block fields),
                filesystem, eligible, ineligibleReason (string or null),
                deviceWritable (a read-write attach can open the device: true | false, null
                when not eligible), directPathOff (why a read-write attach would go through
                the file: "filesystem-not-eligible" | "bdev-write-mounted-refused" |
                "device-busy" | "device-permission-denied" | "device-missing" |
                "device-open-failed", or null), directPathOffReason (string or null),
                device: { path, major, minor, partition, sizeBytes, logicalBlockSize,
                          physicalBlockSize } or null,
                extents: [{ index, logicalBytes, physicalBytes, lengthBytes, logicalBlock,
                            physicalBlock, lengthBlocks (in bytes for inline extents, as
                            filefrag counts them), flags (FIEMAP_EXTENT_* bits),
                            flagNames (filefrag's names), kind ("direct" | "unwritten" |
                            "via-file"), read ("direct" | "zeros" | "file"),
                            write ("direct" | "file"), reason (short name or ""),
                            reasonText }],
                holes: [{ logicalBytes, lengthBytes }] (ranges no extent covers, within
                        the file: read as zeros, written through the file),
                summary: { directBytes, unwrittenBytes, holeBytes, viaFileBytes,
                           fastPathBytes (read and written directly), fastPathShare (0..1) }
                (byte counts cover [0, sizeBytes); extents past the end are listed, not counted;
                the extents' and the summary's verdicts hold once the device opens: with
                deviceWritable false a read-write attach serves all of it through the file)
  -h, --help  Show this help

Exit codes: 0 ok, 2 bad flags, 3 FILE missing or not a regular file or has no extent map,
4 FILE leased by a process that did not let go.`;

export interface MapExtent {
  index: number;
  logicalBytes: number;
  physicalBytes: number;
  lengthBytes: number;
  logicalBlock: number;
  physicalBlock: number;
  lengthBlocks: number;
  flags: number;
  flagNames: string[];
  kind: "direct" | "unwritten" | "via-file";
  read: "direct" | "zeros" | "file";
  write: "direct" | "file";
  reason: string;
  reasonText: string;
}

export interface MapReport {
  file: string;
  sizeBytes: number;
  blockSize: number;
  filesystem: string;
  eligible: boolean;
  ineligibleReason: string | null;
  /** Whether a read-write attach can open the device (O_RDWR | O_DIRECT); null: not eligible. */
  deviceWritable: boolean | null;
  /** Why a read-write attach would serve everything through the file (a `DirectPathOff`). */
  directPathOff: DirectPathOff | null;
  directPathOffReason: string | null;
  device: {
    path: string;
    major: number;
    minor: number;
    partition: boolean;
    sizeBytes: number;
    logicalBlockSize: number;
    physicalBlockSize: number;
  } | null;
  extents: MapExtent[];
  /** Ranges of the file no extent covers: read as zeros, written through the file. */
  holes: { logicalBytes: number; lengthBytes: number }[];
  summary: {
    directBytes: number;
    unwrittenBytes: number;
    holeBytes: number;
    viaFileBytes: number;
    fastPathBytes: number;
    fastPathShare: number;
  };
}

/** How long `map` waits for a lease holder (an attached device's server) to let it open. */
const LEASE_WAIT_MS = 3000;

/**
 * open(O_RDONLY | O_NONBLOCK). If another process holds a write lease (an attached device), the
 * kernel starts breaking it and fails the open with EWOULDBLOCK instead of blocking; the holder
 * downgrades or releases within milliseconds, so retry briefly — but never wait out a stuck
 * holder's whole lease-break time (45 s by default).
 */
function openPastLease(path: string): number {
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  for (let waitedMs = 0;; waitedMs += 10) {
    try {
      return open(path, O_RDONLY | O_NONBLOCK);
    } catch (e) {
      if (!(e instanceof SyscallError && e.code === "EAGAIN")) throw e;
      if (waitedMs >= LEASE_WAIT_MS) {
        throw new UserError(
          `${quotePath(path)} is leased by another process that did not let go within ` +
            `${LEASE_WAIT_MS / 1000} s; try again`,
          ExitCode.busy,
        );
      }
      Atomics.wait(sleeper, 0, 0, 10); // a synchronous 10 ms sleep
    }
  }
}

/** Opens `path` for mapping, turning every kind of bad input into a one-line `UserError`. */
function openRegularFile(path: string): number {
  // Messages name the path quoted: it may hold a newline, which would split the one-line error.
  const name = quotePath(path);
  if (path === "") throw new UserError("The file name is empty");
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`No such file: ${name}`);
    if (e instanceof Deno.errors.PermissionDenied) {
      throw new UserError(`Permission denied: ${name}`, ExitCode.permission);
    }
    throw new UserError(`Cannot stat ${name}: ${osErrorText(e)}`);
  }
  const what = notRegularFileKind(info);
  if (what !== null) throw new UserError(`${name} is ${what}, not a regular file`);
  let fd: number;
  try {
    fd = openPastLease(path);
  } catch (e) {
    if (e instanceof SyscallError) throw new UserError(`Cannot open ${name}: ${e.code}`);
    throw e;
  }
  // The path may have changed between stat and open: the fd is the truth.
  if ((fstat(fd, name).mode & S_IFMT) !== S_IFREG) {
    close(fd);
    throw new UserError(`${name} is not a regular file`);
  }
  return fd;
}

/** Builds the report for `path` (exported for tests). */
export async function mapFile(path: string): Promise<MapReport> {
  const fd = openRegularFile(path);
  const name = quotePath(path);
  try {
    const sizeBytes = fstat(fd, name).size;
    const fs = filesystemOf(fd, name);
    const pseudo = pseudoFilesystemName(fs.magic);
    if (pseudo) {
      throw new UserError(`${name} is a ${pseudo} file, not a regular file with data blocks`);
    }
    const eligibility: Eligibility = filesystemEligibility(fd, name);
    let extents: FiemapExtent[];
    try {
      extents = fiemap(fd, 0, Infinity, { sync: true, path: name });
    } catch (e) {
      if (e instanceof SyscallError && (e.code === "EOPNOTSUPP" || e.code === "ENOTTY")) {
        throw new UserError(`${fs.name} has no extent map: ${e.message}`);
      }
      throw e;
    }
    const report = buildReport(path, sizeBytes, fs.blockSize, eligibility, extents);
    if (eligibility.eligible) {
      const probe = await probeDirectWrite(eligibility);
      report.deviceWritable = probe.writable;
      if (!probe.writable) {
        report.directPathOff = probe.code;
        report.directPathOffReason = probe.reason;
      }
    }
    return report;
  } finally {
    close(fd);
  }
}

function buildReport(
  path: string,
  sizeBytes: number,
  blockSize: number,
  eligibility: Eligibility,
  fiemapExtents: FiemapExtent[],
): MapReport {
  const dev = eligibility.device;
  const alignment = dev?.logicalBlockSize ?? 512;
  const summary = {
    directBytes: 0,
    unwrittenBytes: 0,
    holeBytes: 0,
    viaFileBytes: 0,
    fastPathBytes: 0,
    fastPathShare: 0,
  };
  let mappedBytes = 0;
  const extents = fiemapExtents.map((e, index): MapExtent => {
    const c = classifyExtent(e.flags, alignment, e, eligibility.eligible);
    // Only the part inside the file counts (xfs may report preallocation past the end).
    const inFile = Math.max(0, Math.min(e.logical + e.length, sizeBytes) - e.logical);
    mappedBytes += inFile;
    let read: MapExtent["read"] = "file";
    let write: MapExtent["write"] = "file";
    if (c.kind === ExtentKind.direct) {
      read = write = "direct";
      summary.directBytes += inFile;
    } else if (c.kind === ExtentKind.unwritten) {
      read = "zeros";
      summary.unwrittenBytes += inFile;
    } else {
      summary.viaFileBytes += inFile;
    }
    const reasonText = c.reason === 0
      ? ""
      : eligibility.eligible
      ? EXTENT_REASON_TEXT[c.reason]
      : `${EXTENT_REASON_TEXT[c.reason]}: ${eligibility.reason ?? eligibility.filesystem}`;
    // Inline data is not block-addressed: filefrag counts it in bytes, and so do we.
    const unit = e.flags & FIEMAP_EXTENT_DATA_INLINE ? 1 : blockSize;
    return {
      index,
      logicalBytes: e.logical,
      physicalBytes: e.physical,
      lengthBytes: e.length,
      logicalBlock: Math.floor(e.logical / unit),
      physicalBlock: Math.floor(e.physical / unit),
      lengthBlocks: Math.floor(e.length / unit),
      flags: e.flags,
      flagNames: extentFlagNames(e.flags),
      kind: EXTENT_KIND_NAMES[c.kind] as MapExtent["kind"],
      read,
      write,
      reason: EXTENT_REASON_NAMES[c.reason],
      reasonText,
    };
  });
  summary.holeBytes = Math.max(0, sizeBytes - mappedBytes);
  const holes: MapReport["holes"] = [];
  let cursor = 0;
  for (const e of fiemapExtents) {
    if (e.logical > cursor && cursor < sizeBytes) {
      holes.push({ logicalBytes: cursor, lengthBytes: Math.min(e.logical, sizeBytes) - cursor });
    }
    cursor = Math.max(cursor, e.logical + e.length);
  }
  if (cursor < sizeBytes) holes.push({ logicalBytes: cursor, lengthBytes: sizeBytes - cursor });
  summary.fastPathBytes = summary.directBytes;
  summary.fastPathShare = sizeBytes > 0 ? summary.directBytes / sizeBytes : 0;
  return {
    file: path,
    sizeBytes,
    blockSize,
    filesystem: eligibility.filesystem,
    eligible: eligibility.eligible,
    ineligibleReason: eligibility.eligible ? null : eligibility.reason ?? null,
    deviceWritable: null,
    directPathOff: eligibility.eligible
      ? null
      : eligibility.directPathOff ?? DirectPathOff.filesystemNotEligible,
    directPathOffReason: eligibility.eligible ? null : eligibility.reason ?? null,
    device: dev
      ? {
        path: dev.devicePath,
        major: dev.major,
        minor: dev.minor,
        partition: dev.partition,
        sizeBytes: dev.sizeBytes,
        logicalBlockSize: dev.logicalBlockSize,
        physicalBlockSize: dev.physicalBlockSize,
      }
      : null,
    extents,
    holes,
    summary,
  };
}

function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** The table, laid out like `filefrag -v` with fastloop's columns on the right. */
export function formatReport(r: MapReport): string {
  const lines: string[] = [];
  const d = r.device;
  lines.push(
    `File: ${r.file}: ${r.sizeBytes} bytes (${bytes(r.sizeBytes)}), ` +
      `${Math.ceil(r.sizeBytes / r.blockSize)} blocks of ${r.blockSize} bytes`,
  );
  lines.push(
    `Filesystem: ${r.filesystem}` +
      (d
        ? ` on ${d.path} (${d.major}:${d.minor}${d.partition ? ", partition" : ""}, ` +
          `${bytes(d.sizeBytes)}, logical block ${d.logicalBlockSize}, physical block ` +
          `${d.physicalBlockSize})`
        : " (no usable block device)"),
  );
  lines.push(directPathLine(r));
  lines.push(
    ` ext:     logical_offset:        physical_offset: length:        bytes: flags:` +
      `                 read:  write:  why not`,
  );
  for (const e of r.extents) {
    const lastLogical = e.logicalBlock + Math.max(e.lengthBlocks, 1) - 1;
    const lastPhysical = e.physicalBlock + Math.max(e.lengthBlocks, 1) - 1;
    lines.push(
      `${String(e.index).padStart(4)}: ${String(e.logicalBlock).padStart(10)}..` +
        `${String(lastLogical).padStart(10)}: ${String(e.physicalBlock).padStart(10)}..` +
        `${String(lastPhysical).padStart(10)}: ${String(e.lengthBlocks).padStart(6)}: ` +
        `${String(e.lengthBytes).padStart(12)}: ${e.flagNames.join(",").padEnd(21)} ` +
        `${e.read.padEnd(6)} ${e.write.padEnd(7)} ${e.reasonText}`.trimEnd(),
    );
  }
  const s = r.summary;
  const pct = (n: number) => r.sizeBytes > 0 ? `${((100 * n) / r.sizeBytes).toFixed(1)}%` : "0%";
  lines.push(
    `${r.extents.length} extent${r.extents.length === 1 ? "" : "s"}, ${r.holes.length} ` +
      `hole${r.holes.length === 1 ? "" : "s"}.`,
  );
  if (r.deviceWritable === false) {
    // The extents say what a device that opens would get; a read-write attach gets none of it.
    // Reading stays allowed: a read-only attach opens the device O_RDONLY and goes direct.
    lines.push(
      `Fast path: none for a read-write attach (the device does not open for writing)` +
        (r.directPathOff === DirectPathOff.bdevWriteMountedRefused
          ? `; a --read-only attach reads ${pct(s.fastPathBytes)} of the file ` +
            `(${s.fastPathBytes} bytes) directly`
          : ""),
    );
  } else {
    lines.push(
      `Fast path: ${pct(s.fastPathBytes)} of the file (${s.fastPathBytes} bytes read and ` +
        `written directly)`,
    );
  }
  lines.push(
    `Zeros: ${s.holeBytes} bytes of holes and ${s.unwrittenBytes} unwritten (read as zeros, ` +
      `written through the file); through the file: ${s.viaFileBytes} bytes`,
  );
  return lines.join("\n");
}

/** "Direct path: …": eligible or not, and whether a read-write attach can open the device. */
function directPathLine(r: MapReport): string {
  if (!r.eligible) {
    return `Direct path: not eligible (${r.directPathOff ?? "?"}): ${
      r.ineligibleReason ?? "unknown"
    }`;
  }
  if (r.deviceWritable === false) {
    return `Direct path: eligible, but off for a read-write attach (${r.directPathOff}): ` +
      `${r.directPathOffReason}`;
  }
  return `Direct path: eligible (${r.device?.path} opens for writing)`;
}

export const command: Command = {
  summary: "Show a file's extents and which of them fastloop can serve directly",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("map", args, {
      json: { type: "boolean" },
    });
    if (positionals.length !== 1) {
      throw new UsageError(
        `map: expected exactly one FILE, got ${positionals.length} (see 'fastloop map --help')`,
      );
    }
    const report = await mapFile(positionals[0]!);
    console.log(values.json ? JSON.stringify(report, null, 2) : formatReport(report));
    return ExitCode.ok;
  },
};
