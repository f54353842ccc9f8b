//! `linux/fiemap.h` (stable UAPI since 2.6.28, unchanged through 7.x): the `FS_IOC_FIEMAP` ioctl
//! that maps a file's logical byte ranges to physical byte offsets on the filesystem's device,
//! paged so files with any number of extents can be mapped, and every `FIEMAP_EXTENT_*` flag
//! decoded by name.

import { ioctl } from "./libc.ts";

/** `_IOWR('f', 11, struct fiemap)`: dir 3 << 30 | sizeof(struct fiemap) 32 << 16 | 'f' << 8 | 11. */
export const FS_IOC_FIEMAP = 0xc020660bn;

// struct fiemap (32 bytes, followed by fm_extent_count struct fiemap_extent).
export const FM_START = 0; // __u64 fm_start: logical offset (inclusive) to start mapping at (in)
export const FM_LENGTH = 8; // __u64 fm_length: logical length to map (in)
export const FM_FLAGS = 16; // __u32 fm_flags: FIEMAP_FLAG_* (in/out)
export const FM_MAPPED_EXTENTS = 20; // __u32 fm_mapped_extents: extents written (out)
export const FM_EXTENT_COUNT = 24; // __u32 fm_extent_count: room in fm_extents (in)
export const FIEMAP_SIZE = 32; // sizeof(struct fiemap); fm_extents[] starts here

// struct fiemap_extent (56 bytes).
export const FE_LOGICAL = 0; // __u64 fe_logical: file offset of the extent's start, bytes
export const FE_PHYSICAL = 8; // __u64 fe_physical: device offset of the extent's start, bytes
export const FE_LENGTH = 16; // __u64 fe_length: bytes
// __u64 fe_reserved64[2] at 24
export const FE_FLAGS = 40; // __u32 fe_flags: FIEMAP_EXTENT_*
// __u32 fe_reserved[3] at 44
export const FIEMAP_EXTENT_SIZE = 56; // sizeof(struct fiemap_extent)

/** `FIEMAP_MAX_OFFSET` (~0ULL): "to the end of the file and beyond". */
export const FIEMAP_MAX_OFFSET = 0xffffffffffffffffn;

export const FIEMAP_FLAG_SYNC = 0x1; // sync file data before mapping
export const FIEMAP_FLAG_XATTR = 0x2; // map the extended attribute tree instead
export const FIEMAP_FLAG_CACHE = 0x4; // request caching of the extents

// LAST: last extent in the file, or (iomap: ext4, xfs) the last one of the requested range.
export const FIEMAP_EXTENT_LAST = 0x1;
export const FIEMAP_EXTENT_UNKNOWN = 0x2; // data location unknown
export const FIEMAP_EXTENT_DELALLOC = 0x4; // location still pending (sets UNKNOWN)
export const FIEMAP_EXTENT_ENCODED = 0x8; // data cannot be read while the fs is unmounted
export const FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80; // data encrypted by the fs
export const FIEMAP_EXTENT_NOT_ALIGNED = 0x100; // offsets may not be block aligned
export const FIEMAP_EXTENT_DATA_INLINE = 0x200; // data mixed with metadata (sets NOT_ALIGNED)
export const FIEMAP_EXTENT_DATA_TAIL = 0x400; // several files in one block (sets NOT_ALIGNED)
export const FIEMAP_EXTENT_UNWRITTEN = 0x800; // space allocated, no data (reads as zeros)
export const FIEMAP_EXTENT_MERGED = 0x1000; // fs has no native extents; result merged
export const FIEMAP_EXTENT_SHARED = 0x2000; // space shared with other files (reflink)

/**
 * Flag → name, in bit order. The names are the ones `filefrag -v` prints, so the two outputs can
 * be compared word for word.
 */
export const FIEMAP_EXTENT_FLAG_NAMES: ReadonlyArray<readonly [number, string]> = [
  [FIEMAP_EXTENT_LAST, "last"],
  [FIEMAP_EXTENT_UNKNOWN, "unknown_loc"],
  [FIEMAP_EXTENT_DELALLOC, "delalloc"],
  [FIEMAP_EXTENT_ENCODED, "encoded"],
  [FIEMAP_EXTENT_DATA_ENCRYPTED, "encrypted"],
  [FIEMAP_EXTENT_NOT_ALIGNED, "not_aligned"],
  [FIEMAP_EXTENT_DATA_INLINE, "inline"],
  [FIEMAP_EXTENT_DATA_TAIL, "tail_packed"],
  [FIEMAP_EXTENT_UNWRITTEN, "unwritten"],
  [FIEMAP_EXTENT_MERGED, "merged"],
  [FIEMAP_EXTENT_SHARED, "shared"],
];

const KNOWN_FLAGS = FIEMAP_EXTENT_FLAG_NAMES.reduce((all, [bit]) => all | bit, 0);

/** Names of the flags set in `flags`; bits this header does not define appear as `0x...`. */
export function extentFlagNames(flags: number): string[] {
  const names: string[] = [];
  for (const [bit, name] of FIEMAP_EXTENT_FLAG_NAMES) if (flags & bit) names.push(name);
  const unknown = (flags & ~KNOWN_FLAGS) >>> 0;
  if (unknown !== 0) names.push(`0x${unknown.toString(16)}`);
  return names;
}

/** One mapped extent, in bytes. File and device offsets stay below 2^53 on any real device. */
export interface FiemapExtent {
  logical: number;
  physical: number;
  length: number;
  flags: number;
}

export interface FiemapOptions {
  /** `FIEMAP_FLAG_SYNC`: write back dirty data first, so delalloc extents get real addresses. */
  sync?: boolean;
  /** Stop once this many extents have been collected (the last one may end before the range). */
  maxExtents?: number;
  /** Extents asked for per ioctl (the page size of the paging loop). */
  extentsPerCall?: number;
  /** Names the file in errors (`FIEMAP /data/img: EOPNOTSUPP`); defaults to `fd N`. */
  path?: string;
}

const DEFAULT_EXTENTS_PER_CALL = 512;

/**
 * The ioctl buffer, reused: module state is per isolate, so each queue thread has its own. A
 * fresh buffer per call was a 28 KiB calloc on every extent-cache miss, freed only at the next GC,
 * and glibc's per-thread arenas kept the high-water mark of that churn (measured: +44 MiB per
 * queue thread within 5 minutes of random 4 KiB writes into a sparse file).
 */
let scratch = new Uint8Array(0);
function scratchBuffer(bytes: number): Uint8Array<ArrayBuffer> {
  if (scratch.byteLength < bytes) scratch = new Uint8Array(bytes);
  scratch.fill(0, 0, FIEMAP_SIZE);
  return scratch;
}

/**
 * The extents of `fd` that overlap `[startBytes, startBytes + lengthBytes)`, in logical order.
 * `lengthBytes` may be `Infinity` (to the end of the file). The first and last extents may reach
 * outside the range: FIEMAP reports whole extents. Throws `SyscallError("FIEMAP", errno, path)`.
 */
export function fiemap(
  fd: number,
  startBytes: number,
  lengthBytes: number,
  opts: FiemapOptions = {},
): FiemapExtent[] {
  const perCall = Math.max(1, opts.extentsPerCall ?? DEFAULT_EXTENTS_PER_CALL);
  const maxExtents = opts.maxExtents ?? Infinity;
  const object = opts.path ?? `fd ${fd}`;
  const buf = scratchBuffer(FIEMAP_SIZE + perCall * FIEMAP_EXTENT_SIZE);
  const view = new DataView(buf.buffer);
  const ptr = Deno.UnsafePointer.of(buf);
  const end = startBytes + lengthBytes; // may be Infinity
  const extents: FiemapExtent[] = [];
  let next = startBytes;
  // Only the first call needs to sync: later pages map the same, now clean, file.
  let flags = opts.sync ? FIEMAP_FLAG_SYNC : 0;

  while (next < end && extents.length < maxExtents) {
    view.setBigUint64(FM_START, BigInt(next), true);
    view.setBigUint64(
      FM_LENGTH,
      Number.isFinite(end) ? BigInt(end - next) : FIEMAP_MAX_OFFSET - BigInt(next),
      true,
    );
    view.setUint32(FM_FLAGS, flags, true);
    view.setUint32(FM_MAPPED_EXTENTS, 0, true);
    view.setUint32(FM_EXTENT_COUNT, perCall, true);
    ioctl(fd, FS_IOC_FIEMAP, ptr, "FIEMAP", object);
    flags = 0;

    const mapped = view.getUint32(FM_MAPPED_EXTENTS, true);
    if (mapped === 0) break; // nothing (more) in the range: the rest is a hole
    let last = false;
    for (let i = 0; i < mapped && extents.length < maxExtents; i++) {
      const at = FIEMAP_SIZE + i * FIEMAP_EXTENT_SIZE;
      const extent: FiemapExtent = {
        logical: Number(view.getBigUint64(at + FE_LOGICAL, true)),
        physical: Number(view.getBigUint64(at + FE_PHYSICAL, true)),
        length: Number(view.getBigUint64(at + FE_LENGTH, true)),
        flags: view.getUint32(at + FE_FLAGS, true),
      };
      extents.push(extent);
      next = extent.logical + extent.length;
      if (extent.flags & FIEMAP_EXTENT_LAST) last = true;
    }
    // A short page means the kernel had nothing more to say about the range.
    if (last || mapped < perCall) break;
  }
  return extents;
}

/**
 * An extent source for `lib/extent_cache.ts` backed by FIEMAP on `fd`. `sync` adds
 * `FIEMAP_FLAG_SYNC` to every call (writes back the whole file first on ext4 and xfs: costly; a
 * server that holds a write lease and writes only with O_DIRECT has nothing dirty to sync).
 */
export function fiemapSource(
  fd: number,
  opts: { path?: string; sync?: boolean } = {},
): { map(offsetBytes: number, lengthBytes: number, maxExtents?: number): FiemapExtent[] } {
  return {
    map: (offsetBytes, lengthBytes, maxExtents) =>
      fiemap(fd, offsetBytes, lengthBytes, { path: opts.path, sync: opts.sync, maxExtents }),
  };
}
