//! A queue's records of its requests (`lib/event_loop.ts` fills and serves them): one `Request`
//! per tag, preallocated and reused for every request of that tag, holding its `Segment`s, one per
//! backend operation. `user_data` names a segment, so a completion finds its record directly;
//! it is a small integer (no BigInt, no heap number per CQE).

import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from "../ffi/libc.ts";
import {
  IO_DESC_NR_SECTORS,
  IO_DESC_OP_FLAGS,
  IO_DESC_SIZE,
  IO_DESC_START_SECTOR,
  UBLK_IO_F_NOUNMAP,
  UBLK_IO_OP_WRITE_ZEROES,
} from "../ffi/ublk_cmd.ts";
import { ErrorPath } from "./queue_state.ts";

// --- user_data ----------------------------------------------------------------------------------
// The ublk command of a tag: the tag. Backend IO: UD_BACKEND | segment << 12 | tag (depth is at
// most 4096 tags: 12 bits). The doorbell read: UD_DOORBELL. Batched ublk commands: UD_BATCH.

export const UD_BACKEND = 1 << 20;
export const UD_TAG_MASK = 0xfff;
export const UD_SEG_SHIFT = 12;
export const UD_DOORBELL = 1 << 21;
/** The batched ublk commands (lib/ublk_hop.ts `BatchHop`): UD_BATCH | kind << 8 | index. */
export const UD_BATCH = 1 << 22;
/** Backend operations a request may have in flight at once (the segment field is 8 bits). */
export const SEG_MAX = 256;

/** No request in the tag. */
export const OP_NONE = 255;

/** What a segment does (the one switch in the engine's `#submit`). */
export const SegKind = { read: 0, write: 1, fsync: 2, fallocate: 3, zeroWrite: 4 } as const;
export type SegKind = (typeof SegKind)[keyof typeof SegKind];

/** Where a byte range goes (the engine's `#route`). */
export const Route = { device: 0, file: 1, zeros: 2 } as const;
export type Route = (typeof Route)[keyof typeof Route];

/** Why a whole request goes through the file (beyond the kinds of its extents). */
export const Why = { none: 0, fileMode: 1, notEligible: 2, punching: 3, fiemapFailed: 4 } as const;
export type Why = (typeof Why)[keyof typeof Why];

/** `#route`'s answer for the piece at a position (one per queue, reused). */
export interface Placement {
  route: Route;
  /** Offset on the device (Route.device). */
  deviceOffset: number;
  /** Bytes from the position that go the same way. */
  lengthBytes: number;
}

/** One backend operation: everything needed to issue it again. */
export class Segment {
  kind: SegKind = SegKind.read;
  fd = -1;
  /** Offset on `fd` (for fallocate: the start of the range). */
  fdOffset = 0;
  /** Offset in the request's data. */
  dataOffset = 0;
  lengthBytes = 0;
  /** On the filesystem's device: counted for drains and fences. */
  direct = false;
  /** fallocate's mode, or the RWF_* flags of a write. */
  flags = 0;
  constructor(readonly userData: number) {}
}

/** What a queue knows of the request in one tag. */
export class Request {
  op = OP_NONE;
  flags = 0;
  /** Where the request starts in the file (not on the device: see `readDescriptor`). */
  offset = 0;
  length = 0;
  /** Bytes of a read/write already mapped into segments. */
  cursor = 0;
  /** Backend operations in flight, and those of them on the device. */
  pending = 0;
  direct = 0;
  segCount = 0;
  /** The first -errno, and where it happened. */
  error = 0;
  errorPath: number = ErrorPath.server;
  /** Some of it went through the file: the mapping there may have changed. */
  viaFile = false;
  /** Why the whole request goes through the file (Why.none: extent by extent). */
  fileOnly: Why = Why.none;
  /** DISCARD / WRITE_ZEROES: waiting for overlapping direct IO; punching; its fence slot. */
  deferred = false;
  punching = false;
  punchSlot = -1;
  readonly segments: Segment[] = [];
  constructor(readonly tag: number) {}

  /**
   * Starts the tag's next request from its descriptor (`desc`: the queue's descriptor area). The
   * device is the file's region from `regionOffsetBytes` on (`attach --offset`): this is the one
   * place a device offset becomes a file offset, so every bound, fence, extent lookup and punch
   * after it works in file offsets. Sectors are 512 bytes whatever the device's sector size.
   */
  readDescriptor(desc: DataView, regionOffsetBytes: number): void {
    const at = this.tag * IO_DESC_SIZE;
    const opFlags = desc.getUint32(at + IO_DESC_OP_FLAGS, true);
    // u64 as two halves: no BigInt on the request path.
    const sector = desc.getUint32(at + IO_DESC_START_SECTOR, true) +
      desc.getUint32(at + IO_DESC_START_SECTOR + 4, true) * 0x1_0000_0000;
    this.op = opFlags & 0xff;
    this.flags = opFlags;
    this.offset = regionOffsetBytes + sector * 512;
    this.length = desc.getUint32(at + IO_DESC_NR_SECTORS, true) * 512;
    this.cursor = 0;
    this.pending = 0;
    this.direct = 0;
    this.segCount = 0;
    this.error = 0;
    this.errorPath = ErrorPath.server;
    this.viaFile = false;
  }

  /**
   * The request's next segment, filled in. The records are grown on first use and kept: only the
   * first requests that need that many allocate.
   */
  addSegment(
    kind: SegKind,
    fd: number,
    fdOffset: number,
    dataOffset: number,
    lengthBytes: number,
    direct: boolean,
    flags: number,
  ): Segment {
    const i = this.segCount++;
    while (this.segments.length <= i) {
      const n = this.segments.length;
      this.segments.push(new Segment(UD_BACKEND | (n << UD_SEG_SHIFT) | this.tag));
    }
    const seg = this.segments[i]!;
    seg.kind = kind;
    seg.fd = fd;
    seg.fdOffset = fdOffset;
    seg.dataOffset = dataOffset;
    seg.lengthBytes = lengthBytes;
    seg.direct = direct;
    seg.flags = flags;
    return seg;
  }

  /**
   * The segments of a DISCARD or WRITE_ZEROES on the file `fd`: the range is punched (or zeroed)
   * in the file, which keeps its size. Only whole filesystem blocks (`blockBytes`) go to
   * fallocate: for a partial block, ext4 and xfs zero the rest through the page cache, and that
   * dirty page, written back later, would overwrite whatever was written directly to the block
   * meanwhile. So a discard skips its partial blocks (discard is advisory), and write-zeroes
   * writes zeros there through the file with O_DIRECT: under two blocks at either end.
   */
  addPunchSegments(fd: number, blockBytes: number): void {
    const end = this.offset + this.length;
    const alignedStart = Math.ceil(this.offset / blockBytes) * blockBytes;
    const alignedEnd = Math.floor(end / blockBytes) * blockBytes;
    const whole = alignedStart < alignedEnd;
    const zeroes = this.op === UBLK_IO_OP_WRITE_ZEROES;
    if (whole) {
      const keepBlocks = zeroes && (this.flags & UBLK_IO_F_NOUNMAP) !== 0;
      const mode = FALLOC_FL_KEEP_SIZE | (keepBlocks ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE);
      this.addSegment(
        SegKind.fallocate,
        fd,
        alignedStart,
        0,
        alignedEnd - alignedStart,
        false,
        mode,
      );
    }
    if (!zeroes) return;
    // The partial blocks at either end, or the whole range when it holds no whole block.
    const head = (whole ? alignedStart : end) - this.offset;
    const tail = whole ? end - alignedEnd : 0;
    if (head > 0) this.addSegment(SegKind.zeroWrite, fd, this.offset, 0, head, false, 0);
    if (tail > 0) this.addSegment(SegKind.zeroWrite, fd, alignedEnd, 0, tail, false, 0);
  }

  /** Does the request cover any byte of [offset, offset + length)? */
  overlaps(offset: number, length: number): boolean {
    return this.offset < offset + length && offset < this.offset + this.length;
  }
}
