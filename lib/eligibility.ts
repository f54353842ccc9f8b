//! The safety policy (issue "Only the file's own blocks"): which filesystems may take the direct
//! path at all, and, per FIEMAP extent, whether it may be read and written directly on the
//! filesystem's device, read as zeros, or must go through the file — and why.
//!
//! Only filesystems whose FIEMAP `fe_physical` is a byte offset on the one block device behind
//! `st_dev` are eligible: ext2/3/4, and xfs for files on its data device. Everything else (btrfs
//! logical addresses, zfs pool addresses, xfs realtime files, network and stacked filesystems,
//! anything unknown) is served through the file.

import {
  type BackingDevice,
  backingDeviceOf,
  BlockDeviceError,
  EXT4_SUPER_MAGIC,
  filesystemOf,
  FS_COMPR_FL,
  FS_ENCRYPT_FL,
  FS_JOURNAL_DATA_FL,
  FS_XFLAG_REALTIME,
  fsxattrFlags,
  inodeFlags,
  XFS_SUPER_MAGIC,
} from "../ffi/blkdev.ts";
import {
  FIEMAP_EXTENT_DATA_ENCRYPTED,
  FIEMAP_EXTENT_DATA_INLINE,
  FIEMAP_EXTENT_DATA_TAIL,
  FIEMAP_EXTENT_DELALLOC,
  FIEMAP_EXTENT_ENCODED,
  FIEMAP_EXTENT_NOT_ALIGNED,
  FIEMAP_EXTENT_SHARED,
  FIEMAP_EXTENT_UNKNOWN,
  FIEMAP_EXTENT_UNWRITTEN,
} from "../ffi/fiemap.ts";
import { DirectPathOff, openErrnoCode } from "./direct_path.ts";

/** How a range of the file is served. Small integers: the extent cache stores them in a Uint8Array. */
export const ExtentKind = {
  /** Plain written extent on an eligible filesystem: read and write the device directly. */
  direct: 0,
  /** No blocks: reads return zeros, writes go through the file (the filesystem allocates). */
  hole: 1,
  /** Allocated, never written: reads return zeros, writes go through the file (it converts). */
  unwritten: 2,
  /** Never touched directly: every read and write goes through the file. */
  viaFile: 3,
} as const;
export type ExtentKind = (typeof ExtentKind)[keyof typeof ExtentKind];

export const EXTENT_KIND_NAMES: Record<ExtentKind, string> = {
  [ExtentKind.direct]: "direct",
  [ExtentKind.hole]: "hole",
  [ExtentKind.unwritten]: "unwritten",
  [ExtentKind.viaFile]: "via-file",
};

/** Why an extent is not `direct` (0 = it is). Stored next to the kind in the cache. */
export const ExtentReason = {
  none: 0,
  hole: 1,
  unwritten: 2,
  shared: 3,
  delalloc: 4,
  unknown: 5,
  encoded: 6,
  encrypted: 7,
  inline: 8,
  tailPacked: 9,
  notAligned: 10,
  filesystemNotEligible: 11,
} as const;
export type ExtentReason = (typeof ExtentReason)[keyof typeof ExtentReason];

/** Human text for each reason, as `map` and `stat` print it. */
export const EXTENT_REASON_TEXT: Record<ExtentReason, string> = {
  [ExtentReason.none]: "",
  [ExtentReason.hole]: "hole: reads as zeros, writes allocate through the file",
  [ExtentReason.unwritten]: "unwritten: reads as zeros, writes convert through the file",
  [ExtentReason.shared]: "shared (reflinked): writes must copy on write through the file",
  [ExtentReason.delalloc]: "delayed allocation: no block on disk yet",
  [ExtentReason.unknown]: "location unknown",
  [ExtentReason.encoded]: "encoded (compressed or otherwise transformed) by the filesystem",
  [ExtentReason.encrypted]: "data encrypted by the filesystem",
  [ExtentReason.inline]: "data inline with metadata",
  [ExtentReason.tailPacked]: "tail packed with other files' data",
  [ExtentReason.notAligned]: "not aligned to the device's logical block size",
  [ExtentReason.filesystemNotEligible]: "filesystem not eligible",
};

/** Short stable names for `--json` and logs. */
export const EXTENT_REASON_NAMES: Record<ExtentReason, string> = {
  [ExtentReason.none]: "",
  [ExtentReason.hole]: "hole",
  [ExtentReason.unwritten]: "unwritten",
  [ExtentReason.shared]: "shared",
  [ExtentReason.delalloc]: "delalloc",
  [ExtentReason.unknown]: "unknown",
  [ExtentReason.encoded]: "encoded",
  [ExtentReason.encrypted]: "encrypted",
  [ExtentReason.inline]: "inline",
  [ExtentReason.tailPacked]: "tail-packed",
  [ExtentReason.notAligned]: "not-aligned",
  [ExtentReason.filesystemNotEligible]: "filesystem-not-eligible",
};

export interface Classification {
  kind: ExtentKind;
  reason: ExtentReason;
}

// Interned results: classification runs on every cache fill and must not allocate per extent.
const DIRECT: Classification = { kind: ExtentKind.direct, reason: ExtentReason.none };
const UNWRITTEN: Classification = { kind: ExtentKind.unwritten, reason: ExtentReason.unwritten };
const VIA_FILE = new Map<ExtentReason, Classification>(
  Object.values(ExtentReason).map((r) => [r, { kind: ExtentKind.viaFile, reason: r }]),
);
function viaFile(reason: ExtentReason): Classification {
  return VIA_FILE.get(reason)!;
}

/**
 * Classifies one FIEMAP extent. `blockSize` is the backing device's logical block size: a direct
 * O_DIRECT access must start and end on it. Order matters: a flag that says "the address is not
 * the data" wins over one that says "the data reads as zeros". Pass `eligible = false` when the
 * filesystem is not eligible: then nothing is direct, and only the policy reason is given.
 */
export function classifyExtent(
  flags: number,
  blockSize: number,
  extent?: { logical: number; physical: number; length: number },
  eligible = true,
): Classification {
  if (!eligible) return viaFile(ExtentReason.filesystemNotEligible);
  if (flags & FIEMAP_EXTENT_DELALLOC) return viaFile(ExtentReason.delalloc);
  if (flags & FIEMAP_EXTENT_UNKNOWN) return viaFile(ExtentReason.unknown);
  if (flags & FIEMAP_EXTENT_ENCODED) return viaFile(ExtentReason.encoded);
  if (flags & FIEMAP_EXTENT_DATA_ENCRYPTED) return viaFile(ExtentReason.encrypted);
  if (flags & FIEMAP_EXTENT_DATA_INLINE) return viaFile(ExtentReason.inline);
  if (flags & FIEMAP_EXTENT_DATA_TAIL) return viaFile(ExtentReason.tailPacked);
  if (flags & FIEMAP_EXTENT_NOT_ALIGNED) return viaFile(ExtentReason.notAligned);
  if (
    extent !== undefined &&
    (extent.logical % blockSize !== 0 || extent.physical % blockSize !== 0 ||
      extent.length % blockSize !== 0)
  ) {
    return viaFile(ExtentReason.notAligned);
  }
  // Shared before unwritten: a shared unwritten extent still must not be written in place.
  if (flags & FIEMAP_EXTENT_SHARED) return viaFile(ExtentReason.shared);
  if (flags & FIEMAP_EXTENT_UNWRITTEN) return UNWRITTEN;
  return DIRECT;
}

export interface Eligibility {
  eligible: boolean;
  /** Filesystem name (`ext4`, `xfs`, `btrfs`, `tmpfs`, …). */
  filesystem: string;
  /** Why not, when not eligible. */
  reason?: string;
  /** The same as a stable code, when not eligible (`lib/direct_path.ts`). */
  directPathOff?: DirectPathOff;
  /** The filesystem's block device, when it has one (also for some ineligible ones). */
  device?: BackingDevice;
}

/** Why each known-but-ineligible filesystem cannot take the direct path. */
const NOT_ELIGIBLE: Record<string, string> = {
  btrfs: "btrfs: FIEMAP reports btrfs logical addresses, which are not offsets on one device " +
    "(multiple devices, RAID, compression)",
  tmpfs: "tmpfs keeps file data in memory: there is no block device and no extent map",
  ramfs: "ramfs keeps file data in memory: there is no block device and no extent map",
  overlay: "overlayfs: the data lives on an underlying filesystem; attach the file there",
  nfs: "nfs is a network filesystem: there is no local block device",
  cifs: "cifs is a network filesystem: there is no local block device",
  smb2: "smb is a network filesystem: there is no local block device",
  "9p": "9p is a network filesystem: there is no local block device",
  ceph: "ceph is a network filesystem: there is no local block device",
  fuse: "fuse: the data's location is up to a user-space daemon",
  zfs: "zfs: block addresses are pool addresses, not offsets on one device",
  f2fs: "f2fs is not verified for direct access (its garbage collector moves blocks)",
  bcachefs: "bcachefs: extents may be checksummed, compressed or on several devices",
};

/**
 * Why the bytes at the file's FIEMAP addresses are not simply the file's data, or could be
 * rewritten behind our back — cases FIEMAP itself does not flag (ext4 reports fscrypt files and
 * journaled data as plain extents).
 */
export function dataLayoutProblem(
  filesystem: string,
  mountOptions: string[],
  flags: number,
): string | undefined {
  if (flags & FS_ENCRYPT_FL) {
    return `${filesystem}: the file is encrypted (fscrypt): its blocks hold ciphertext`;
  }
  if (flags & FS_COMPR_FL) {
    return `${filesystem}: the file is compressed: its blocks do not hold the data as is`;
  }
  // Journaled data is written twice, the journal copy first; a later checkpoint of an older
  // transaction would overwrite a newer direct write. ext4 also ignores O_DIRECT for it.
  if (mountOptions.includes("data=journal")) {
    return `${filesystem} is mounted with data=journal: data goes through the journal, whose ` +
      `checkpoints could overwrite direct writes`;
  }
  if (flags & FS_JOURNAL_DATA_FL) {
    return `${filesystem}: the file has data journaling on (chattr +j): data goes through the ` +
      `journal, whose checkpoints could overwrite direct writes`;
  }
  return undefined;
}

/**
 * May IO for the file `fd` (at `path`) go directly to its filesystem's block device? Only
 * ext2/3/4 and xfs (data device) files are eligible, and not when their data is encrypted,
 * compressed or journaled; the answer carries the device when found.
 */
export function filesystemEligibility(fd: number, path: string): Eligibility {
  const fs = filesystemOf(fd, path);
  const known = fs.magic === EXT4_SUPER_MAGIC || fs.magic === XFS_SUPER_MAGIC;
  let device: BackingDevice | undefined;
  let deviceProblem: BlockDeviceError | undefined;
  try {
    device = backingDeviceOf(fd, path);
  } catch (e) {
    if (!(e instanceof BlockDeviceError)) throw e;
    deviceProblem = e;
  }
  const notEligible = DirectPathOff.filesystemNotEligible;
  if (!known) {
    const reason = NOT_ELIGIBLE[fs.name] ??
      `${fs.name}: not known to report FIEMAP offsets on one block device`;
    return { eligible: false, filesystem: fs.name, reason, directPathOff: notEligible, device };
  }
  if (fs.magic === XFS_SUPER_MAGIC && (fsxattrFlags(fd, path) & FS_XFLAG_REALTIME)) {
    return {
      eligible: false,
      filesystem: fs.name,
      reason: "xfs realtime file: its extents are on the realtime device, not the data device",
      directPathOff: notEligible,
      device,
    };
  }
  const fileProblem = dataLayoutProblem(fs.name, fs.options, inodeFlags(fd, path));
  if (fileProblem !== undefined) {
    return {
      eligible: false,
      filesystem: fs.name,
      reason: fileProblem,
      directPathOff: notEligible,
      device,
    };
  }
  if (device === undefined) {
    return {
      eligible: false,
      filesystem: fs.name,
      reason: deviceProblem?.message,
      directPathOff: deviceProblemCode(deviceProblem),
    };
  }
  return { eligible: true, filesystem: fs.name, device };
}

/** The code for a device that could not even be looked up or opened for reading. */
function deviceProblemCode(e: BlockDeviceError | undefined): DirectPathOff {
  const errno = e?.errno ?? null;
  return errno === null ? DirectPathOff.deviceMissing : openErrnoCode(errno);
}
