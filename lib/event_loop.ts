//! One ublk queue: its io_uring, its extent cache and the request loop. Runs inside a Worker
//! (`lib/queue_worker.ts`); `lib/device.ts` starts one per queue and talks to it only through
//! the `SharedArrayBuffer` laid out here.
//!
//! Threading. ublk requires every command of a queue (FETCH_REQ, COMMIT_AND_FETCH_REQ) to be
//! issued by one task on kernels before UBLK_F_PER_IO_DAEMON (6.16), and Deno's `nonblocking` FFI
//! calls run on pool threads, so a queue cannot live on the main thread's event loop. A Deno
//! Worker is its own OS thread: it makes synchronous `io_uring_enter` calls and sleeps in the
//! kernel until a CQE arrives, which is also the cheapest way to wait. A Worker that is blocked in
//! a syscall cannot receive `postMessage`, so the main thread reaches it through
//!  - a mailbox in the SharedArrayBuffer (sequence, op, arguments; the Worker acknowledges with
//!    `Atomics.store` + `Atomics.notify`, the main thread waits with `Atomics.waitAsync`), and
//!  - an eventfd on which the Worker always keeps an `IORING_OP_READ` posted: writing 8 bytes to
//!    it completes that read and wakes the Worker out of `io_uring_enter`.
//! Counters live in the same SharedArrayBuffer (one writer per queue: its Worker; Float64 so byte
//! counts do not wrap), so `stat` reads them without waking anyone.
//!
//! The loop reads top to bottom: submit and wait once, drain every CQE (the ring copies them out
//! and advances the CQ head once), dispatch each, repeat. `user_data` packs the tag, the segment,
//! the kind of operation and a "backend IO" bit, so ublk commands and the backend IO they cause
//! share one ring and one `io_uring_enter` per turn.
//!
//! A request is mapped through the ExtentCache and split where the file's extents split it:
//! direct extents → read/write the filesystem's block device at the physical offset; holes and
//! unwritten extents on read → zero-filled in place; everything else (and every write that is not
//! to a plain written extent) → the file itself, O_DIRECT, after which the cached range is
//! invalidated (the filesystem may have allocated or converted it). The request completes once,
//! when its last backend IO finishes: the full length, or the first error. Backend errors complete
//! that request with -errno and never stop the queue; EINTR/EAGAIN (reads, writes, fdatasync,
//! fallocate) and short transfers are re-issued. Failed requests are counted by errno kind (EIO,
//! ENOSPC, other) and the last one is kept (errno, op, offset, path, time) for `stat`.

import {
  IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SINGLE_ISSUER,
  IoUring,
  RWF_DSYNC,
} from "../ffi/io_uring.ts";
import {
  AlignedBuffer,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fstat,
  fstatfs,
  libc,
} from "../ffi/libc.ts";
import {
  EAGAIN,
  EINTR,
  EIO,
  ENOSPC,
  EOPNOTSUPP,
  EROFS,
  errnoName,
  SyscallError,
} from "../ffi/errno.ts";
import { fiemap } from "../ffi/fiemap.ts";
import {
  IO_CMD_ADDR,
  IO_CMD_Q_ID,
  IO_CMD_RESULT,
  IO_CMD_TAG,
  IO_DESC_NR_SECTORS,
  IO_DESC_OP_FLAGS,
  IO_DESC_SIZE,
  IO_DESC_START_SECTOR,
  UBLK_IO_F_FUA,
  UBLK_IO_F_NOUNMAP,
  UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_FLUSH,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
  UBLK_IO_OP_WRITE_ZEROES,
  UBLK_IO_RES_ABORT,
  UBLK_IO_RES_OK,
  UBLK_MAX_QUEUE_DEPTH,
  UBLK_U_IO_COMMIT_AND_FETCH_REQ,
  UBLK_U_IO_FETCH_REQ,
} from "../ffi/ublk_cmd.ts";
import { ExtentCache, ExtentKind, type ExtentSource } from "./extent_cache.ts";

// --- modes --------------------------------------------------------------------------------

export const Mode = { fast: 0, readDirect: 1, file: 2 } as const;
export type Mode = (typeof Mode)[keyof typeof Mode];
export const MODE_NAMES = ["fast", "read-direct", "file"] as const;
export type ModeName = (typeof MODE_NAMES)[number];
export function modeOf(name: ModeName): Mode {
  return MODE_NAMES.indexOf(name) as Mode;
}

// --- shared memory layout -------------------------------------------------------------------
// Per queue: CTRL_WORDS Int32 words of mailbox and state, MB_ARGS Float64 arguments and
// COUNTERS Float64 counters; then one invalidation log shared by all queues.

/** Int32 words per queue. */
const CTRL_WORDS = 16;
export const CTRL_MB_SEQ = 0; // mailbox: sequence of the last command posted (main thread)
export const CTRL_MB_ACK = 1; // mailbox: sequence of the last command done (worker)
export const CTRL_MB_OP = 2; // mailbox: MbOp
export const CTRL_MB_MODE = 3; // mailbox: argument of setMode
export const CTRL_STATE = 4; // QueueState, written by the worker
export const CTRL_MODE = 5; // the mode in force (worker)
export const CTRL_ERR_SEQ = 6; // seqlock of the last-error slots: odd while the worker writes them
/** Float64 argument slots per queue. */
const MB_ARGS = 2;
export const ARG_OFFSET = 0;
export const ARG_LENGTH = 1;

export const MbOp = { none: 0, setMode: 1, invalidate: 2, quit: 3 } as const;
export const QueueState = { starting: 0, fetching: 1, exited: 2, failed: 3 } as const;

/** Counter slots per queue (Float64, one writer: the queue's worker). */
export const Counter = {
  reads: 0,
  writes: 1,
  flushes: 2,
  discards: 3,
  writeZeroes: 4,
  bytesReadDirect: 5,
  bytesReadFile: 6,
  bytesReadZero: 7,
  bytesWrittenDirect: 8,
  bytesWrittenFile: 9,
  bytesDiscarded: 10,
  cacheHits: 11,
  cacheMisses: 12,
  fiemapCalls: 13,
  extentsCached: 14,
  extentCacheBytes: 15,
  inflight: 16,
  /** Requests completed with an error, in all (= the three kinds below). */
  errors: 17,
  retries: 18,
  errorsEio: 19,
  errorsEnospc: 20,
  errorsOther: 21,
  /** FIEMAP failures (the request then went through the file; not a request error). */
  fiemapErrors: 22,
  // The last error (guarded by CTRL_ERR_SEQ): errno, ErrorOp, request range, ErrorPath, epoch ms.
  lastErrorErrno: 23,
  lastErrorOp: 24,
  lastErrorOffset: 25,
  lastErrorLength: 26,
  lastErrorPath: 27,
  lastErrorAtMs: 28,
} as const;
const COUNTERS = 32;

/** What failed, for the last error: a ublk op (UBLK_IO_OP_*) or a FIEMAP lookup. */
export const ERROR_OP_FIEMAP = 254;
const ERROR_OP_NAMES: Record<number, string> = {
  [UBLK_IO_OP_READ]: "read",
  [UBLK_IO_OP_WRITE]: "write",
  [UBLK_IO_OP_FLUSH]: "flush",
  [UBLK_IO_OP_DISCARD]: "discard",
  [UBLK_IO_OP_WRITE_ZEROES]: "write-zeroes",
  [ERROR_OP_FIEMAP]: "fiemap",
};
/** Where it failed: refused by the server before any backend IO, the filesystem's device, the file. */
export const ErrorPath = { server: 0, direct: 1, file: 2 } as const;
const ERROR_PATH_NAMES = ["server", "direct", "file"] as const;

/** The last error of a queue (or of a device: the latest of its queues'). */
export interface LastError {
  errno: string;
  op: string;
  offsetBytes: number;
  lengthBytes: number;
  path: (typeof ERROR_PATH_NAMES)[number];
  /** Milliseconds since the epoch. */
  atMs: number;
}

/**
 * Reads a queue's last error without stopping its worker (seqlock: retried while the worker is
 * writing it); null when the queue has had none.
 */
export function readLastError(views: SharedViews): LastError | null {
  const c = views.counters;
  // A worker that died half-way through a write leaves the sequence odd: give up after a while.
  for (let attempt = 0; attempt < 10_000; attempt++) {
    const seq = Atomics.load(views.ctrl, CTRL_ERR_SEQ);
    if (seq === 0) return null;
    if (seq & 1) continue;
    const e: LastError = {
      errno: errnoName(c[Counter.lastErrorErrno]!),
      op: ERROR_OP_NAMES[c[Counter.lastErrorOp]!] ?? `op ${c[Counter.lastErrorOp]}`,
      offsetBytes: c[Counter.lastErrorOffset]!,
      lengthBytes: c[Counter.lastErrorLength]!,
      path: ERROR_PATH_NAMES[c[Counter.lastErrorPath]!] ?? "server",
      atMs: c[Counter.lastErrorAtMs]!,
    };
    if (Atomics.load(views.ctrl, CTRL_ERR_SEQ) === seq) return e;
  }
  return null;
}

// Invalidation log: every queue appends the file ranges it changed through the file (writes
// into holes/unwritten/shared extents, punches); the others apply them to their own caches
// before dispatching new requests. Entry `s` lives in slot s % LOG_SLOTS; its stamp becomes s+1
// once written, so a reader never applies a half-written entry.
const LOG_SLOTS = 1024;

// Punch fence between queues (only used with several queues). A queue about to punch a range
// announces it in a shared slot, then waits until no other queue has a request with direct IO
// over the range; a queue about to issue direct IO first flags its request's range, then looks
// for an announced punch over it and, if there is one, goes through the file instead. Both sides
// store first and load second with sequentially consistent atomics, so at least one of them
// sees the other (Dekker): no direct IO can use a mapping from before a punch on another queue.
const PUNCH_SLOTS = 64;
const PUNCH_FREE = 0;
const PUNCH_RESERVED = 1; // slot taken, range being written
const PUNCH_ACTIVE = 2;
/** Per-queue tag slots for the direct-IO flags (any depth the driver accepts fits). */
const FENCE_TAGS = UBLK_MAX_QUEUE_DEPTH;

export interface SharedLayout {
  sab: SharedArrayBuffer;
  queues: number;
}

function ctrlBytes(queues: number) {
  return queues * CTRL_WORDS * 4;
}
function argsOffset(queues: number) {
  return Math.ceil(ctrlBytes(queues) / 8) * 8;
}
function countersOffset(queues: number) {
  return argsOffset(queues) + queues * MB_ARGS * 8;
}
function logHeaderOffset(queues: number) {
  return countersOffset(queues) + queues * COUNTERS * 8;
}
function logStampsOffset(queues: number) {
  return logHeaderOffset(queues) + 8;
}
function logEntriesOffset(queues: number) {
  return logStampsOffset(queues) + LOG_SLOTS * 4;
}
function punchStateOffset(queues: number) {
  return logEntriesOffset(queues) + LOG_SLOTS * 2 * 8;
}
function punchRangeOffset(queues: number) {
  return punchStateOffset(queues) + (PUNCH_SLOTS + 2) * 4; // + count word, padded to 8
}
function fenceFlagsOffset(queues: number) {
  return punchRangeOffset(queues) + PUNCH_SLOTS * 2 * 8;
}
function fenceRangesOffset(queues: number) {
  return fenceFlagsOffset(queues) + queues * FENCE_TAGS * 4;
}

export function createSharedState(queues: number): SharedArrayBuffer {
  // The punch fence is only needed (and only allocated) with several queues.
  const end = queues > 1
    ? fenceRangesOffset(queues) + queues * FENCE_TAGS * 2 * 8
    : logEntriesOffset(queues) + LOG_SLOTS * 2 * 8;
  return new SharedArrayBuffer(end);
}

/** Typed views of one queue's part of the shared state (and of the shared log). */
export class SharedViews {
  readonly ctrl: Int32Array;
  readonly args: Float64Array;
  readonly counters: Float64Array;
  readonly logHeader: Int32Array;
  readonly logStamps: Int32Array;
  readonly logEntries: Float64Array;
  /** Punch fence (queues > 1): [0] active count, [1 + i] state of slot i. */
  readonly punchState: Int32Array | null = null;
  readonly punchRange: Float64Array | null = null;
  /** Per queue × tag: 1 while the request may do direct IO over fenceRange. */
  readonly fenceFlags: Int32Array | null = null;
  readonly fenceRanges: Float64Array | null = null;

  constructor(sab: SharedArrayBuffer, queues: number, queueId: number) {
    this.ctrl = new Int32Array(sab, queueId * CTRL_WORDS * 4, CTRL_WORDS);
    this.args = new Float64Array(sab, argsOffset(queues) + queueId * MB_ARGS * 8, MB_ARGS);
    this.counters = new Float64Array(
      sab,
      countersOffset(queues) + queueId * COUNTERS * 8,
      COUNTERS,
    );
    this.logHeader = new Int32Array(sab, logHeaderOffset(queues), 2);
    this.logStamps = new Int32Array(sab, logStampsOffset(queues), LOG_SLOTS);
    this.logEntries = new Float64Array(sab, logEntriesOffset(queues), LOG_SLOTS * 2);
    if (queues > 1) {
      this.punchState = new Int32Array(sab, punchStateOffset(queues), PUNCH_SLOTS + 1);
      this.punchRange = new Float64Array(sab, punchRangeOffset(queues), PUNCH_SLOTS * 2);
      this.fenceFlags = new Int32Array(sab, fenceFlagsOffset(queues), queues * FENCE_TAGS);
      this.fenceRanges = new Float64Array(sab, fenceRangesOffset(queues), queues * FENCE_TAGS * 2);
    }
  }

  /** Announces a punch of [offset, offset+length); returns its slot, or -1 when all are taken. */
  announcePunch(offset: number, length: number): number {
    const st = this.punchState!;
    for (let i = 0; i < PUNCH_SLOTS; i++) {
      if (Atomics.compareExchange(st, 1 + i, PUNCH_FREE, PUNCH_RESERVED) !== PUNCH_FREE) continue;
      this.punchRange![i * 2] = offset;
      this.punchRange![i * 2 + 1] = length;
      Atomics.store(st, 1 + i, PUNCH_ACTIVE);
      Atomics.add(st, 0, 1);
      return i;
    }
    return -1;
  }

  withdrawPunch(slot: number): void {
    const st = this.punchState!;
    Atomics.store(st, 1 + slot, PUNCH_FREE);
    Atomics.sub(st, 0, 1);
  }

  /** Is a punch announced over [offset, offset+length) (by any queue)? */
  punchAnnounced(offset: number, length: number): boolean {
    const st = this.punchState!;
    if (Atomics.load(st, 0) === 0) return false;
    const end = offset + length;
    for (let i = 0; i < PUNCH_SLOTS; i++) {
      if (Atomics.load(st, 1 + i) !== PUNCH_ACTIVE) continue;
      const o = this.punchRange![i * 2]!;
      if (o < end && offset < o + this.punchRange![i * 2 + 1]!) return true;
    }
    return false;
  }

  /** Flags `tag` of `queueId` as (possibly) doing direct IO over the range; 0 clears. */
  setFence(queueId: number, tag: number, offset: number, length: number): void {
    const k = queueId * FENCE_TAGS + tag;
    this.fenceRanges![k * 2] = offset;
    this.fenceRanges![k * 2 + 1] = length;
    Atomics.store(this.fenceFlags!, k, 1);
  }

  clearFence(queueId: number, tag: number): void {
    Atomics.store(this.fenceFlags!, queueId * FENCE_TAGS + tag, 0);
  }

  /** Does a queue other than `self` have a flagged request over the range? */
  otherDirectOverlaps(self: number, queues: number, offset: number, length: number): boolean {
    const flags = this.fenceFlags!;
    const ranges = this.fenceRanges!;
    const end = offset + length;
    for (let q = 0; q < queues; q++) {
      if (q === self) continue;
      for (let t = 0; t < FENCE_TAGS; t++) {
        const k = q * FENCE_TAGS + t;
        if (Atomics.load(flags, k) === 0) continue;
        const o = ranges[k * 2]!;
        if (o < end && offset < o + ranges[k * 2 + 1]!) return true;
      }
    }
    return false;
  }

  /** Appends a changed file range for the other queues (called by the queue that changed it). */
  publishInvalidation(offsetBytes: number, lengthBytes: number): void {
    const s = Atomics.add(this.logHeader, 0, 1);
    const slot = s % LOG_SLOTS;
    this.logEntries[slot * 2] = offsetBytes;
    this.logEntries[slot * 2 + 1] = lengthBytes;
    // Release: the entry is complete before its stamp says so.
    Atomics.store(this.logStamps, slot, s + 1);
  }
}

// --- user_data ------------------------------------------------------------------------------
// bits 0-15 tag, 16-23 segment, 24-27 kind, 28 backend IO. A small integer: no BigInt per IO.

const UD_TAG_MASK = 0xffff;
const UD_SEG_SHIFT = 16;
const UD_KIND_SHIFT = 24;
const UD_BACKEND = 1 << 28;
const KIND_UBLK = 0; // FETCH / COMMIT_AND_FETCH on /dev/ublkcN
const KIND_RW = 1; // backend read/write segment
const KIND_FSYNC = 2; // backend fdatasync (FLUSH)
const KIND_FALLOC = 3; // backend fallocate (DISCARD / WRITE_ZEROES)
const KIND_EVENTFD = 4; // mailbox doorbell
/** Backend segments a request may have in flight at once (the segment field is 8 bits). */
export const SEG_MAX = 256;

function ud(tag: number, seg: number, kind: number, backend: boolean): number {
  return tag | (seg << UD_SEG_SHIFT) | (kind << UD_KIND_SHIFT) | (backend ? UD_BACKEND : 0);
}

// --- configuration ------------------------------------------------------------------------

export interface QueueConfig {
  devId: number;
  queueId: number;
  queues: number;
  depth: number;
  maxIoBytes: number;
  /** /dev/ublkcN, opened once by the main thread (the driver allows one opener). */
  charFd: number;
  /** The file, opened O_DIRECT by the server (the fd its lease is on). */
  fileFd: number;
  filePath: string;
  /** The filesystem's block device, O_DIRECT, or -1 when the filesystem is not eligible. */
  backingFd: number;
  fileSizeBytes: number;
  logicalBlockSize: number;
  readOnly: boolean;
  mode: Mode;
  /** Upper bound on cached extents for this queue. */
  maxExtents: number;
  /** The doorbell the main thread writes to after posting to the mailbox. */
  eventFd: number;
  /**
   * Fault injection for tests, -1 when off: a request covering this byte kills the server
   * (SIGKILL), as a request that kills every server serving it would (see lib/supervisor.ts).
   */
  poisonByte: number;
  sab: SharedArrayBuffer;
}

/** Where a finished request goes: COMMIT_AND_FETCH in the ublk loop, a recorder in tests. */
export interface Completer {
  complete(tag: number, result: number): void;
}

// Per-tag request state (typed arrays, indexed by tag: nothing allocated per request).
const OP_NONE = 255;

/**
 * The request engine of one queue: maps requests to backend IO on `ring`, collects the
 * completions, and hands each finished request to `completer`. It does not know about ublk's
 * commands, so it can be driven on any kernel (host tests feed it descriptors directly).
 */
export class QueueEngine {
  readonly ring: IoUring;
  readonly cache: ExtentCache | null;
  readonly views: SharedViews;
  readonly buffers: AlignedBuffer;
  readonly #cfg: QueueConfig;
  readonly #desc: DataView;
  readonly #completer: Completer;
  readonly #bufBase: number;
  readonly #zeroBytes: Uint8Array;
  mode: Mode;

  // Per tag.
  readonly #op: Uint8Array;
  readonly #flags: Uint32Array;
  readonly #offset: Float64Array;
  readonly #length: Float64Array;
  readonly #cursor: Float64Array;
  readonly #pending: Int32Array;
  readonly #direct: Int32Array; // backend IOs of this tag on the block device, in flight
  readonly #directWrites: Int32Array;
  readonly #error: Int32Array; // first -errno
  readonly #errorPath: Uint8Array; // ErrorPath of that error
  readonly #viaFile: Uint8Array; // 1 if a write went through the file
  readonly #segCount: Int32Array;
  // Per tag × segment: what to re-issue on EINTR/EAGAIN or a short transfer.
  readonly #segFd: Int32Array;
  readonly #segDev: Float64Array; // offset on segFd
  readonly #segBuf: Float64Array; // offset in the tag's buffer
  readonly #segLen: Float64Array;
  readonly #segDirect: Uint8Array;

  /** Direct (block device) backend IOs in flight on this queue, and the writes among them. */
  directInflight = 0;
  directWritesInflight = 0;
  /** Backend IOs of any kind in flight. */
  backendInflight = 0;
  /**
   * Each tag's buffer is registered with the ring as fixed buffer `tag` (READ/WRITE_FIXED).
   * Opt-in, FASTLOOP_FIXED_BUFFERS=1: it halves the CPU time per 1 MiB IO (bench/engine_bench.ts)
   * but pins depth × maxIoBytes per queue (64 MiB with the defaults) for the device's lifetime.
   */
  readonly fixedBuffers: boolean;
  /** A write or allocation went through the file since the last FLUSH. */
  #fileDirty = false;
  /**
   * The file's size as last seen (at most the device's): IO ending past it fails with EIO
   * instead of re-growing a file someone else truncated. Exact while the lease is held (a
   * truncate breaks it first); looked up again per request in file mode and on leaving it.
   */
  #sizeBytes: number;
  /** The file's filesystem block size: fallocate gets only whole blocks (see `#punch`). */
  readonly #fsBlockBytes: number;
  /** DISCARD / WRITE_ZEROES requests waiting for overlapping direct IO to finish. */
  readonly #deferred: number[] = [];
  /** Ranges being punched right now: [offset, length] pairs, by tag. */
  readonly #punching = new Map<number, [number, number]>();
  #logSeen = 0;
  /** Several queues: direct IO and punches are fenced through shared memory. */
  readonly #multi: boolean;
  /** Per tag: the announced punch slot of a DISCARD / WRITE_ZEROES, or -1. */
  readonly #punchSlot: Int32Array;

  constructor(cfg: QueueConfig, ring: IoUring, desc: DataView, completer: Completer) {
    this.#cfg = cfg;
    this.ring = ring;
    this.#desc = desc;
    this.#completer = completer;
    this.mode = cfg.mode;
    this.#sizeBytes = cfg.fileSizeBytes;
    this.#fsBlockBytes = filesystemBlockBytes(cfg);
    this.views = new SharedViews(cfg.sab, cfg.queues, cfg.queueId);
    this.#logSeen = Atomics.load(this.views.logHeader, 0);
    this.buffers = new AlignedBuffer(cfg.depth * cfg.maxIoBytes);
    this.#bufBase = Number(this.buffers.address);
    this.#zeroBytes = this.buffers.bytes;
    this.fixedBuffers = Deno.env.get("FASTLOOP_FIXED_BUFFERS") === "1" &&
      registerTagBuffers(ring, this.#bufBase, cfg.depth, cfg.maxIoBytes);
    const n = cfg.depth;
    this.#op = new Uint8Array(n).fill(OP_NONE);
    this.#flags = new Uint32Array(n);
    this.#offset = new Float64Array(n);
    this.#length = new Float64Array(n);
    this.#cursor = new Float64Array(n);
    this.#pending = new Int32Array(n);
    this.#direct = new Int32Array(n);
    this.#directWrites = new Int32Array(n);
    this.#error = new Int32Array(n);
    this.#errorPath = new Uint8Array(n);
    this.#viaFile = new Uint8Array(n);
    this.#segCount = new Int32Array(n);
    this.#segFd = new Int32Array(n * SEG_MAX);
    this.#segDev = new Float64Array(n * SEG_MAX);
    this.#segBuf = new Float64Array(n * SEG_MAX);
    this.#segLen = new Float64Array(n * SEG_MAX);
    this.#segDirect = new Uint8Array(n * SEG_MAX);
    this.#multi = cfg.queues > 1;
    this.#punchSlot = new Int32Array(n).fill(-1);
    const eligible = cfg.backingFd >= 0;
    const source: ExtentSource = {
      map: (offsetBytes, lengthBytes, maxExtents) =>
        fiemapExtents(cfg.fileFd, offsetBytes, lengthBytes, cfg.filePath, maxExtents),
    };
    this.cache = eligible
      ? new ExtentCache(source, {
        fileSizeBytes: cfg.fileSizeBytes,
        maxExtents: cfg.maxExtents,
        blockSize: cfg.logicalBlockSize,
        eligible,
      })
      : null;
    Atomics.store(this.views.ctrl, CTRL_MODE, this.mode);
  }

  /** Address (a number) of `tag`'s buffer. */
  bufferAddress(tag: number): number {
    return this.#bufBase + tag * this.#cfg.maxIoBytes;
  }

  /** An SQE slot; when the SQ is full, hands what is prepared to the kernel to make room. */
  #sqe(): number {
    let sqe = this.ring.getSqe();
    if (sqe < 0) {
      this.ring.submit();
      sqe = this.ring.getSqe();
      if (sqe < 0) throw new Error(`queue ${this.#cfg.queueId}: submission queue stuck full`);
    }
    return sqe;
  }

  // --- requests -----------------------------------------------------------------------------

  /** A request arrived in `tag`'s descriptor: start serving it. */
  handleRequest(tag: number): void {
    const d = this.#desc;
    const base = tag * IO_DESC_SIZE;
    const opFlags = d.getUint32(base + IO_DESC_OP_FLAGS, true);
    const sectors = d.getUint32(base + IO_DESC_NR_SECTORS, true);
    // u64 as two halves: no BigInt on the request path.
    const startSector = d.getUint32(base + IO_DESC_START_SECTOR, true) +
      d.getUint32(base + IO_DESC_START_SECTOR + 4, true) * 0x1_0000_0000;
    const op = opFlags & 0xff;
    const c = this.views.counters;
    c[Counter.inflight]!++;
    this.#op[tag] = op;
    this.#flags[tag] = opFlags;
    this.#offset[tag] = startSector * 512;
    this.#length[tag] = sectors * 512;
    this.#cursor[tag] = 0;
    this.#pending[tag] = 0;
    this.#direct[tag] = 0;
    this.#directWrites[tag] = 0;
    this.#error[tag] = 0;
    this.#errorPath[tag] = ErrorPath.server;
    this.#viaFile[tag] = 0;
    this.#segCount[tag] = 0;
    const end = this.#offset[tag]! + this.#length[tag]!;
    const poison = this.#cfg.poisonByte;
    if (poison >= 0 && this.#offset[tag]! <= poison && poison < end) Deno.kill(Deno.pid, "SIGKILL");
    switch (op) {
      case UBLK_IO_OP_READ:
      case UBLK_IO_OP_WRITE:
        if (op === UBLK_IO_OP_READ) c[Counter.reads]!++;
        else c[Counter.writes]!++;
        if (end > this.#cfg.fileSizeBytes || this.#length[tag]! > this.#cfg.maxIoBytes) {
          return this.#finish(tag, -EIO);
        }
        if (op === UBLK_IO_OP_WRITE && this.#cfg.readOnly) return this.#finish(tag, -EROFS);
        // Past the file's end (someone truncated it): no hole to read as zeros, no regrowing.
        if (end > this.#currentSize()) return this.#finish(tag, -EIO);
        // Flag before looking for punches (see the punch fence): store, then load.
        if (this.#multi) {
          this.views.setFence(this.#cfg.queueId, tag, this.#offset[tag]!, this.#length[tag]!);
        }
        this.#issueSegments(tag);
        return;
      case UBLK_IO_OP_FLUSH:
        c[Counter.flushes]!++;
        this.#flush(tag);
        return;
      case UBLK_IO_OP_DISCARD:
      case UBLK_IO_OP_WRITE_ZEROES:
        if (op === UBLK_IO_OP_DISCARD) c[Counter.discards]!++;
        else c[Counter.writeZeroes]!++;
        if (this.#cfg.readOnly) return this.#finish(tag, -EROFS);
        if (end > this.#cfg.fileSizeBytes || end > this.#currentSize()) {
          return this.#finish(tag, -EIO);
        }
        this.#deferred.push(tag);
        this.runDeferred();
        return;
      default:
        return this.#finish(tag, -EOPNOTSUPP);
    }
  }

  /**
   * Issues backend IO for `tag` from its cursor on, one segment per run of the file that maps
   * the same way, until the request is covered or SEG_MAX segments are in flight (then the rest
   * follows when they complete).
   */
  #issueSegments(tag: number): void {
    const isWrite = this.#op[tag] === UBLK_IO_OP_WRITE;
    const fua = isWrite && (this.#flags[tag]! & UBLK_IO_F_FUA) !== 0;
    const rwFlags = fua ? RWF_DSYNC : 0;
    const offset = this.#offset[tag]!;
    const length = this.#length[tag]!;
    const cache = this.cache;
    const c = this.views.counters;
    const fileFd = this.#cfg.fileFd;
    const backingFd = this.#cfg.backingFd;
    const mode = this.mode;
    let useFile = cache === null || mode === Mode.file ||
      (isWrite && mode === Mode.readDirect) ||
      (this.#punching.size > 0 && this.#punchOverlaps(offset, length));
    if (!useFile && this.#multi) {
      // First the announced punches, then the invalidations: a punch is withdrawn only after
      // its invalidation was published, so seeing it gone means the log holds it.
      if (this.views.punchAnnounced(offset, length)) useFile = true;
      else this.applyInvalidations();
    }
    let cursor = this.#cursor[tag]!;
    // A run being gathered: consecutive pieces on the same fd at consecutive offsets.
    let runFd = -1;
    let runDev = 0;
    let runBuf = 0;
    let runLen = 0;
    let runDirect = false;
    while (cursor < length && this.#segCount[tag]! < SEG_MAX) {
      const pos = offset + cursor;
      let fd: number;
      let dev: number;
      let chunk: number;
      let direct = false;
      let i = -1;
      if (!useFile) {
        try {
          i = cache!.lookup(pos);
        } catch (e) {
          // FIEMAP failed (e.g. EIO from the filesystem): the file path is always safe.
          useFile = true;
          c[Counter.fiemapErrors]!++;
          this.#recordError(
            e instanceof SyscallError ? e.errno : EIO,
            ERROR_OP_FIEMAP,
            pos,
            length - cursor,
            ErrorPath.file,
          );
        }
      }
      if (useFile) {
        fd = fileFd;
        dev = pos;
        chunk = length - cursor;
      } else {
        chunk = Math.min(length - cursor, cache!.endAt(i) - pos);
        const kind = cache!.kindAt(i);
        if (kind === ExtentKind.direct) {
          fd = backingFd;
          dev = cache!.physicalOf(i, pos);
          direct = true;
        } else if (!isWrite && (kind === ExtentKind.hole || kind === ExtentKind.unwritten)) {
          // Reads as zeros: fill the request's buffer in place, no backend IO.
          const at = tag * this.#cfg.maxIoBytes + cursor;
          this.#zeroBytes.fill(0, at, at + chunk);
          c[Counter.bytesReadZero]! += chunk;
          cursor += chunk;
          continue;
        } else {
          fd = fileFd;
          dev = pos;
        }
      }
      if (runLen > 0 && fd === runFd && dev === runDev + runLen) {
        runLen += chunk;
      } else {
        if (runLen > 0) this.#emit(tag, runFd, runDev, runBuf, runLen, runDirect, rwFlags);
        runFd = fd;
        runDev = dev;
        runBuf = cursor;
        runLen = chunk;
        runDirect = direct;
      }
      cursor += chunk;
      // Keep room for the run in the segment table.
      if (this.#segCount[tag]! >= SEG_MAX - 1) break;
    }
    if (runLen > 0) this.#emit(tag, runFd, runDev, runBuf, runLen, runDirect, rwFlags);
    this.#cursor[tag] = cursor;
    if (this.#pending[tag] === 0) this.#requestDone(tag);
  }

  /** Records segment `segCount[tag]` and submits it. */
  #emit(
    tag: number,
    fd: number,
    dev: number,
    bufOffset: number,
    len: number,
    direct: boolean,
    rwFlags: number,
  ): void {
    const seg = this.#segCount[tag]!++;
    const k = tag * SEG_MAX + seg;
    this.#segFd[k] = fd;
    this.#segDev[k] = dev;
    this.#segBuf[k] = bufOffset;
    this.#segLen[k] = len;
    this.#segDirect[k] = direct ? 1 : 0;
    const isWrite = this.#op[tag] === UBLK_IO_OP_WRITE;
    const c = this.views.counters;
    if (direct) {
      this.#direct[tag]!++;
      this.directInflight++;
      if (isWrite) {
        this.#directWrites[tag]!++;
        this.directWritesInflight++;
        c[Counter.bytesWrittenDirect]! += len;
      } else {
        c[Counter.bytesReadDirect]! += len;
      }
    } else if (isWrite) {
      this.#viaFile[tag] = 1;
      this.#fileDirty = true;
      c[Counter.bytesWrittenFile]! += len;
    } else {
      c[Counter.bytesReadFile]! += len;
    }
    this.#submitSegment(tag, seg, rwFlags);
  }

  #submitSegment(tag: number, seg: number, rwFlags: number): void {
    const k = tag * SEG_MAX + seg;
    const sqe = this.#sqe();
    const addr = this.bufferAddress(tag) + this.#segBuf[k]!;
    const userData = ud(tag, seg, KIND_RW, true);
    const fd = this.#segFd[k]!;
    const len = this.#segLen[k]!;
    const dev = this.#segDev[k]!;
    if (this.fixedBuffers) {
      if (this.#op[tag] === UBLK_IO_OP_WRITE) {
        this.ring.prepWriteFixed(sqe, fd, addr, len, dev, tag, userData, rwFlags);
      } else {
        this.ring.prepReadFixed(sqe, fd, addr, len, dev, tag, userData);
      }
    } else if (this.#op[tag] === UBLK_IO_OP_WRITE) {
      this.ring.prepWrite(sqe, fd, addr, len, dev, userData, rwFlags);
    } else {
      this.ring.prepRead(sqe, fd, addr, len, dev, userData);
    }
    this.#pending[tag]!++;
    this.backendInflight++;
  }

  /** A backend read/write segment completed. */
  #segmentDone(tag: number, seg: number, res: number): void {
    const k = tag * SEG_MAX + seg;
    this.#pending[tag]!--;
    this.backendInflight--;
    const expected = this.#segLen[k]!;
    const rwFlags = this.#op[tag] === UBLK_IO_OP_WRITE && (this.#flags[tag]! & UBLK_IO_F_FUA)
      ? RWF_DSYNC
      : 0;
    if (res === -EINTR || res === -EAGAIN) {
      this.views.counters[Counter.retries]!++;
      this.#submitSegment(tag, seg, rwFlags);
      return;
    }
    if (res > 0 && res < expected) {
      // Short transfer: issue the rest of the segment.
      this.#segDev[k] = this.#segDev[k]! + res;
      this.#segBuf[k] = this.#segBuf[k]! + res;
      this.#segLen[k] = expected - res;
      this.views.counters[Counter.retries]!++;
      this.#submitSegment(tag, seg, rwFlags);
      return;
    }
    if (this.#segDirect[k]) {
      this.#direct[tag]!--;
      this.directInflight--;
      if (this.#op[tag] === UBLK_IO_OP_WRITE) {
        this.#directWrites[tag]!--;
        this.directWritesInflight--;
      }
    }
    if (res <= 0 && this.#error[tag] === 0) {
      // 0 bytes for a non-empty segment: the file ended under us (truncated): an IO error.
      this.#error[tag] = res < 0 ? res : -EIO;
      this.#errorPath[tag] = this.#segDirect[k] ? ErrorPath.direct : ErrorPath.file;
    }
    if (this.#pending[tag] !== 0) return;
    if (this.#error[tag] === 0 && this.#cursor[tag]! < this.#length[tag]!) {
      this.#segCount[tag] = 0;
      this.#issueSegments(tag);
      return;
    }
    this.#requestDone(tag);
  }

  /** Every backend IO of a read/write finished (or none was needed). */
  #requestDone(tag: number): void {
    const err = this.#error[tag]!;
    if (this.#viaFile[tag]) {
      // The filesystem may have allocated or converted blocks: map the range afresh. Only
      // now, after the write completed, or a concurrent lookup could re-cache the old state.
      this.#changed(this.#offset[tag]!, this.#length[tag]!);
    }
    this.#finish(tag, err < 0 ? err : this.#length[tag]!);
  }

  #flush(tag: number): void {
    const fileToo = this.#fileDirty || this.#cfg.backingFd < 0;
    this.#fileDirty = false;
    this.#viaFile[tag] = fileToo ? 1 : 0;
    if (this.#cfg.backingFd >= 0) this.#submitFsync(tag, 0);
    if (fileToo) this.#submitFsync(tag, 1);
  }

  /** fdatasync of the filesystem's device (segment 0) or of the file (segment 1). */
  #submitFsync(tag: number, seg: number): void {
    const fd = seg === 0 ? this.#cfg.backingFd : this.#cfg.fileFd;
    this.ring.prepFsync(this.#sqe(), fd, true, ud(tag, seg, KIND_FSYNC, true));
    this.#pending[tag]!++;
    this.backendInflight++;
  }

  #fsyncDone(tag: number, seg: number, res: number): void {
    this.#pending[tag]!--;
    this.backendInflight--;
    if (res === -EINTR || res === -EAGAIN) {
      this.views.counters[Counter.retries]!++;
      this.#submitFsync(tag, seg);
      return;
    }
    if (res < 0 && this.#error[tag] === 0) {
      this.#error[tag] = res;
      this.#errorPath[tag] = seg === 0 ? ErrorPath.direct : ErrorPath.file;
      // The file's metadata may still be unsynced: flush it again next time.
      if (this.#viaFile[tag]) this.#fileDirty = true;
    }
    if (this.#pending[tag] === 0) {
      this.#finish(tag, this.#error[tag]! < 0 ? this.#error[tag]! : 0);
    }
  }

  /**
   * DISCARD / WRITE_ZEROES: punch (or zero) the range in the file, keeping its size. Only whole
   * filesystem blocks are handed to fallocate: for a partial block, ext4 and xfs zero the rest
   * through the page cache, and that dirty page, written back later, would overwrite whatever
   * was written directly to the block meanwhile. So a discard skips its partial blocks (discard
   * is advisory), and write-zeroes writes zeros there through the file with O_DIRECT.
   */
  #punch(tag: number): void {
    const offset = this.#offset[tag]!;
    const length = this.#length[tag]!;
    // No direct IO may use a mapping from before the punch: forget it now, steer overlapping
    // requests to the file while the punch runs, and forget it again when it is done.
    this.cache?.invalidate(offset, length);
    this.#punching.set(tag, [offset, length]);
    this.#fileDirty = true;
    const end = offset + length;
    const writeZeroes = this.#op[tag] === UBLK_IO_OP_WRITE_ZEROES;
    const block = this.#fsBlockBytes;
    const alignedStart = Math.ceil(offset / block) * block;
    const alignedEnd = Math.floor(end / block) * block;
    if (alignedStart < alignedEnd) this.#submitPunchFallocate(tag);
    if (writeZeroes) {
      // The partial blocks at either end (or the whole range when it holds no whole block).
      const head = alignedStart < alignedEnd ? [offset, alignedStart] : [offset, end];
      const tail = alignedStart < alignedEnd ? [alignedEnd, end] : [end, end];
      const base = tag * this.#cfg.maxIoBytes;
      this.#zeroBytes.fill(0, base, base + Math.min(this.#cfg.maxIoBytes, length));
      let seg = 1;
      for (const [from, to] of [head, tail] as const) {
        // Each piece is under two blocks; the tag's buffer (>= 4 KiB) holds it in chunks.
        for (let at = from!; at < to!; seg++) {
          const len = Math.min(to! - at, this.#cfg.maxIoBytes);
          const k = tag * SEG_MAX + seg;
          this.#segLen[k] = len;
          this.ring.prepWrite(
            this.#sqe(),
            this.#cfg.fileFd,
            this.bufferAddress(tag),
            len,
            at,
            ud(tag, seg, KIND_FALLOC, true),
            0,
          );
          this.#pending[tag]!++;
          this.backendInflight++;
          at += len;
        }
      }
    }
    // A discard within one block: nothing to do.
    if (this.#pending[tag] === 0) this.#punchDone(tag, -1, 0);
  }

  /** The fallocate of a punch (segment 0): the whole filesystem blocks of the range. */
  #submitPunchFallocate(tag: number): void {
    const offset = this.#offset[tag]!;
    const end = offset + this.#length[tag]!;
    const block = this.#fsBlockBytes;
    const alignedStart = Math.ceil(offset / block) * block;
    const alignedEnd = Math.floor(end / block) * block;
    const zero = this.#op[tag] === UBLK_IO_OP_WRITE_ZEROES &&
      (this.#flags[tag]! & UBLK_IO_F_NOUNMAP) !== 0;
    const mode = FALLOC_FL_KEEP_SIZE | (zero ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE);
    this.ring.prepFallocate(
      this.#sqe(),
      this.#cfg.fileFd,
      mode,
      alignedStart,
      alignedEnd - alignedStart,
      ud(tag, 0, KIND_FALLOC, true),
    );
    this.#pending[tag]!++;
    this.backendInflight++;
  }

  /** One backend operation of a punch finished (`seg` 0: the fallocate; else a zero write). */
  #punchDone(tag: number, seg: number, res: number): void {
    if (seg >= 0) {
      this.#pending[tag]!--;
      this.backendInflight--;
      if (seg === 0 && (res === -EINTR || res === -EAGAIN)) {
        this.views.counters[Counter.retries]!++;
        this.#submitPunchFallocate(tag);
        return;
      }
      // A zero write that came back short (the file shrank under it) is an IO error.
      if (seg > 0 && res >= 0 && res < this.#segLen[tag * SEG_MAX + seg]!) res = -EIO;
      if (res < 0 && this.#error[tag] === 0) {
        this.#error[tag] = res;
        this.#errorPath[tag] = ErrorPath.file;
      }
      if (this.#pending[tag]! > 0) return;
    }
    this.#punching.delete(tag);
    this.#changed(this.#offset[tag]!, this.#length[tag]!);
    if (this.#punchSlot[tag]! >= 0) {
      this.views.withdrawPunch(this.#punchSlot[tag]!);
      this.#punchSlot[tag] = -1;
    }
    const err = this.#error[tag]!;
    if (err === 0) this.views.counters[Counter.bytesDiscarded]! += this.#length[tag]!;
    this.#finish(tag, err < 0 ? err : 0);
  }

  #directOverlaps(offset: number, length: number): boolean {
    if (this.directInflight === 0) return false;
    const end = offset + length;
    for (let t = 0; t < this.#cfg.depth; t++) {
      if (
        this.#direct[t]! > 0 && this.#offset[t]! < end &&
        offset < this.#offset[t]! + this.#length[t]!
      ) {
        return true;
      }
    }
    return false;
  }

  #punchOverlaps(offset: number, length: number): boolean {
    const end = offset + length;
    for (const [o, l] of this.#punching.values()) if (o < end && offset < o + l) return true;
    return false;
  }

  /** The file's mapping changed in a range: forget it here and tell the other queues. */
  #changed(offset: number, length: number): void {
    this.cache?.invalidate(offset, length);
    if (this.#cfg.queues > 1) this.views.publishInvalidation(offset, length);
  }

  #finish(tag: number, result: number): void {
    const c = this.views.counters;
    if (result < 0) {
      c[Counter.errors]!++;
      c[
        result === -EIO
          ? Counter.errorsEio
          : result === -ENOSPC
          ? Counter.errorsEnospc
          : Counter.errorsOther
      ]!++;
      this.#recordError(
        -result,
        this.#op[tag]!,
        this.#offset[tag]!,
        this.#length[tag]!,
        this.#errorPath[tag]!,
      );
    }
    this.#op[tag] = OP_NONE;
    if (this.#multi) this.views.clearFence(this.#cfg.queueId, tag);
    c[Counter.inflight]!--;
    this.#completer.complete(tag, result);
  }

  /** Keeps the last error for `stat` (numbers only: nothing allocated on the IO path). */
  #recordError(errno: number, op: number, offset: number, length: number, path: number): void {
    const c = this.views.counters;
    const ctrl = this.views.ctrl;
    // Seqlock: odd while the slots are being written, so a reader never mixes two errors.
    Atomics.add(ctrl, CTRL_ERR_SEQ, 1);
    c[Counter.lastErrorErrno] = errno;
    c[Counter.lastErrorOp] = op;
    c[Counter.lastErrorOffset] = offset;
    c[Counter.lastErrorLength] = length;
    c[Counter.lastErrorPath] = path;
    c[Counter.lastErrorAtMs] = Date.now();
    Atomics.add(ctrl, CTRL_ERR_SEQ, 1);
  }

  // --- dispatch -------------------------------------------------------------------------------

  /** A backend CQE (user_data with the backend bit). */
  onBackendCqe(userData: number, res: number): void {
    const tag = userData & UD_TAG_MASK;
    const seg = (userData >>> UD_SEG_SHIFT) & 0xff;
    switch ((userData >>> UD_KIND_SHIFT) & 0xf) {
      case KIND_RW:
        return this.#segmentDone(tag, seg, res);
      case KIND_FSYNC:
        return this.#fsyncDone(tag, seg, res);
      case KIND_FALLOC:
        return this.#punchDone(tag, seg, res);
    }
  }

  /** Applies the other queues' invalidations; call before dispatching new requests. */
  applyInvalidations(): void {
    const h = this.views.logHeader;
    const published = Atomics.load(h, 0);
    if (published === this.#logSeen) return;
    if (published - this.#logSeen > LOG_SLOTS) {
      // Lapped: too much changed to replay; start from an empty map.
      this.cache?.clear();
      this.#logSeen = published;
      return;
    }
    const stamps = this.views.logStamps;
    const entries = this.views.logEntries;
    while (this.#logSeen !== published) {
      const slot = this.#logSeen % LOG_SLOTS;
      // Not written yet: its writer has not completed the request either; look again later.
      if (Atomics.load(stamps, slot) !== this.#logSeen + 1) break;
      this.cache?.invalidate(entries[slot * 2]!, entries[slot * 2 + 1]!);
      this.#logSeen++;
    }
  }

  /** Start deferred punches whose overlapping direct IO has drained. */
  runDeferred(): void {
    for (let i = 0; i < this.#deferred.length;) {
      const tag = this.#deferred[i]!;
      const offset = this.#offset[tag]!;
      const length = this.#length[tag]!;
      if (this.#multi && this.#punchSlot[tag]! < 0) {
        // Announce first (store), then look at the other queues' flags (load).
        this.#punchSlot[tag] = this.views.announcePunch(offset, length);
      }
      const blocked = (this.#multi && this.#punchSlot[tag]! < 0) ||
        this.#directOverlaps(offset, length) ||
        (this.#multi &&
          this.views.otherDirectOverlaps(this.#cfg.queueId, this.#cfg.queues, offset, length));
      if (blocked) {
        i++;
        continue;
      }
      this.#deferred.splice(i, 1);
      this.#punch(tag);
    }
  }

  /** Switches mode: new requests follow it at once; in-flight IO drains (see `drainedFor`). */
  setMode(mode: Mode): void {
    this.mode = mode;
    if (mode === Mode.file) this.cache?.clear();
    else this.#refreshSize(); // the lease is held again: the size is stable until it breaks
    Atomics.store(this.views.ctrl, CTRL_MODE, mode);
  }

  /**
   * The size IO may reach: in file mode the lease may be gone and anyone may truncate, so
   * the file is asked (a truncate racing with the write itself can still let it extend the
   * file, through the filesystem, which allocates: no foreign block is written either way).
   */
  #currentSize(): number {
    if (this.mode === Mode.file) this.#refreshSize();
    return this.#sizeBytes;
  }

  #refreshSize(): void {
    let size: number;
    try {
      size = fstat(this.#cfg.fileFd, this.#cfg.filePath).size;
    } catch {
      return; // fstat on an open fd does not fail in practice; keep the last size
    }
    const next = Math.min(this.#cfg.fileSizeBytes, size);
    if (next !== this.#sizeBytes) {
      this.#sizeBytes = next;
      this.cache?.resize(next);
    }
  }

  /** Has the IO that `mode` forbids drained? (file: no direct IO; read-direct: no direct write) */
  drainedFor(mode: Mode): boolean {
    if (mode === Mode.file) return this.directInflight === 0;
    if (mode === Mode.readDirect) return this.directWritesInflight === 0;
    return true;
  }

  invalidate(offset: number, length: number): void {
    this.cache?.invalidate(offset, length);
  }

  /** Copies the cache statistics into the shared counters. */
  publishStats(): void {
    const c = this.views.counters;
    if (this.cache === null) return;
    const s = this.cache.stats();
    c[Counter.cacheHits] = s.hits;
    c[Counter.cacheMisses] = s.misses;
    c[Counter.fiemapCalls] = s.fiemapCalls;
    c[Counter.extentsCached] = s.extents;
    c[Counter.extentCacheBytes] = s.memoryBytes;
  }

  close(): void {
    this.buffers.free();
  }
}

/** The filesystem block size of the file (at least the device's logical block). */
function filesystemBlockBytes(cfg: QueueConfig): number {
  let block = cfg.logicalBlockSize;
  try {
    block = Math.max(block, fstatfs(cfg.fileFd, cfg.filePath).blockSize);
  } catch {
    // Not expected on an open fd; then the page size is the safe assumption for ext4/xfs.
    block = Math.max(block, 4096);
  }
  return block;
}

/**
 * Registers each tag's buffer as fixed buffer `tag`: the kernel pins the pages once, instead of
 * pinning (and, for reads, dirtying) every page on every backend IO. Pinning makes the whole
 * area resident and counts against RLIMIT_MEMLOCK without CAP_IPC_LOCK: on failure the queue
 * goes on with plain READ/WRITE.
 */
function registerTagBuffers(ring: IoUring, base: number, depth: number, bytes: number): boolean {
  const regions = [];
  for (let tag = 0; tag < depth; tag++) {
    regions.push({ address: BigInt(base + tag * bytes), lengthBytes: bytes });
  }
  try {
    ring.registerBuffers(regions);
    return true;
  } catch (e) {
    if (!(e instanceof SyscallError)) throw e;
    // Asked for explicitly, so say why it is not in force (ENOMEM/EPERM: RLIMIT_MEMLOCK).
    console.error(`FASTLOOP_FIXED_BUFFERS=1 ignored: ${e.message}`);
    return false;
  }
}

function fiemapExtents(
  fd: number,
  offsetBytes: number,
  lengthBytes: number,
  path: string,
  maxExtents?: number,
) {
  // No FIEMAP_FLAG_SYNC: the server writes only with O_DIRECT and holds the lease, so nothing
  // of the file is dirty in the page cache; delalloc extents, if any, are classified via-file.
  return fiemap(fd, offsetBytes, lengthBytes, { path, maxExtents });
}

// --- the ublk queue loop --------------------------------------------------------------------

/** Maps /dev/ublkcN's descriptor area of one queue (read-only: the driver refuses writable maps). */
export interface QueueResources {
  desc: DataView;
  unmap(): void;
}

/**
 * Runs queue `cfg.queueId` until the device stops (every tag's fetch ends with ABORT) or the
 * main thread posts `quit`. Calls `onFetching` once every FETCH_REQ is submitted (START_DEV and
 * END_USER_RECOVERY wait for that).
 */
export function runQueue(
  cfg: QueueConfig,
  resources: QueueResources,
  onFetching: () => void,
): void {
  const ring = setupQueueRing(cfg.depth);
  const commits = new CommitPort(cfg, ring);
  const engine = new QueueEngine(cfg, ring, resources.desc, commits);
  commits.engine = engine;
  const views = engine.views;
  const doorbell = new AlignedBuffer(8);
  const ctrl = views.ctrl;
  let aborted = 0;
  let quit = false;
  let modeAckSeq = 0;
  let modeWanted: Mode = engine.mode;
  let handledSeq = Atomics.load(ctrl, CTRL_MB_SEQ);

  const postDoorbell = () => {
    ring.prepReadEventfd(
      ring.getSqe(),
      cfg.eventFd,
      doorbell.address,
      ud(0, 0, KIND_EVENTFD, false),
    );
  };

  const mailbox = () => {
    const seq = Atomics.load(ctrl, CTRL_MB_SEQ);
    if (seq === handledSeq) return;
    handledSeq = seq;
    switch (Atomics.load(ctrl, CTRL_MB_OP)) {
      case MbOp.setMode: {
        modeWanted = Atomics.load(ctrl, CTRL_MB_MODE) as Mode;
        engine.setMode(modeWanted);
        modeAckSeq = seq; // acknowledged once drained (below)
        return;
      }
      case MbOp.invalidate:
        engine.invalidate(views.args[ARG_OFFSET]!, views.args[ARG_LENGTH]!);
        break;
      case MbOp.quit:
        quit = true;
        break;
    }
    ack(seq);
  };
  const ack = (seq: number) => {
    Atomics.store(ctrl, CTRL_MB_ACK, seq);
    Atomics.notify(ctrl, CTRL_MB_ACK);
  };

  const onCqe = (userData: number, res: number) => {
    if (userData & UD_BACKEND) return engine.onBackendCqe(userData, res);
    const kind = (userData >>> UD_KIND_SHIFT) & 0xf;
    if (kind === KIND_EVENTFD) {
      mailbox();
      if (!quit) postDoorbell();
      return;
    }
    const tag = userData & UD_TAG_MASK;
    if (res === UBLK_IO_RES_OK) return engine.handleRequest(tag);
    if (res === UBLK_IO_RES_ABORT) {
      aborted++;
      return;
    }
    // Any other result means the command itself was refused: the queue cannot go on.
    throw new Error(
      `queue ${cfg.queueId} tag ${tag}: ublk command failed with ${res} (${errnoName(-res)})`,
    );
  };

  try {
    postDoorbell();
    for (let tag = 0; tag < cfg.depth; tag++) commits.fetch(tag);
    ring.submit();
    Atomics.store(ctrl, CTRL_STATE, QueueState.fetching);
    onFetching();
    const profile = Deno.env.get("FASTLOOP_LOOP_STATS") === "1";
    let statTurn = 0;
    let turns = 0, cqes = 0, enterMs = 0, jsMs = 0, restMs = 0, t0 = 0, t1 = 0;
    // Optional busy poll before sleeping (FASTLOOP_POLL_US): under a VM, waking a sleeping
    // thread costs an IPI to another vCPU; peeking for a while with a non-blocking GETEVENTS
    // (which also runs deferred task work, i.e. delivers ublk requests) can avoid it.
    const pollMs = Number(Deno.env.get("FASTLOOP_POLL_US") ?? "0") / 1000;
    for (;;) {
      if (profile) t0 = performance.now();
      if (pollMs > 0 && ring.cqReady() === 0) {
        ring.submit();
        const until = performance.now() + pollMs;
        while (ring.cqReady() === 0 && performance.now() < until) peek(ring);
      }
      if (ring.cqReady() === 0) ring.submitAndWait(1);
      else ring.submit();
      if (profile) t1 = performance.now();
      const n = ring.reapCqes(onCqe);
      if (profile) {
        const t2 = performance.now();
        turns++;
        cqes += n;
        enterMs += t1 - t0;
        jsMs += t2 - t1;
        t0 = t2;
      }
      engine.applyInvalidations();
      engine.runDeferred();
      if (modeAckSeq !== 0 && engine.drainedFor(modeWanted)) {
        ack(modeAckSeq);
        modeAckSeq = 0;
      }
      // Cache statistics for `stat`: every 64 turns under load, and whenever the queue goes idle
      // (so a quiet device shows final figures), keeps busy turns lean.
      if ((++statTurn & 63) === 0 || views.counters[Counter.inflight] === 0) {
        engine.publishStats();
      }
      if (profile) restMs += performance.now() - t0;
      if (quit) break;
      if (aborted === cfg.depth && engine.backendInflight === 0) break;
    }
    engine.publishStats();
    Atomics.store(ctrl, CTRL_STATE, QueueState.exited);
    if (profile) {
      console.error(
        `queue ${cfg.queueId}: ${turns} turns, ${cqes} CQEs, ${enterMs.toFixed(0)} ms in ` +
          `io_uring_enter, ${jsMs.toFixed(0)} ms dispatching, ${restMs.toFixed(0)} ms after`,
      );
    }
  } catch (e) {
    Atomics.store(ctrl, CTRL_STATE, QueueState.failed);
    throw e;
  } finally {
    // Closing the ring cancels whatever is still posted (fetches, the doorbell read).
    ring.close();
    engine.close();
    doorbell.free();
    resources.unmap();
    if (modeAckSeq !== 0) ack(modeAckSeq);
  }
}

/** Issues FETCH_REQ and COMMIT_AND_FETCH_REQ for one queue's tags. */
class CommitPort implements Completer {
  engine: QueueEngine | null = null;
  readonly #cfg: QueueConfig;
  readonly #ring: IoUring;
  constructor(cfg: QueueConfig, ring: IoUring) {
    this.#cfg = cfg;
    this.#ring = ring;
  }

  #cmd(op: number, tag: number, result: number): void {
    let sqe = this.#ring.getSqe();
    if (sqe < 0) {
      this.#ring.submit();
      sqe = this.#ring.getSqe();
    }
    const p = this.#ring.prepUringCmd(sqe, this.#cfg.charFd, op, ud(tag, 0, KIND_UBLK, false));
    const v = this.#ring.sqeView;
    const addr = this.engine!.bufferAddress(tag);
    v.setUint16(p + IO_CMD_Q_ID, this.#cfg.queueId, true);
    v.setUint16(p + IO_CMD_TAG, tag, true);
    v.setInt32(p + IO_CMD_RESULT, result, true);
    v.setUint32(p + IO_CMD_ADDR, addr % 0x1_0000_0000, true);
    v.setUint32(p + IO_CMD_ADDR + 4, Math.floor(addr / 0x1_0000_0000), true);
  }

  fetch(tag: number): void {
    this.#cmd(UBLK_U_IO_FETCH_REQ, tag, 0);
  }

  complete(tag: number, result: number): void {
    this.#cmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
  }
}

/**
 * The ring of a queue of `depth` tags. Only this Worker ever enters it, so by default it is
 * SINGLE_ISSUER with DEFER_TASKRUN: ublk delivers requests as task work, which then runs inside
 * our own io_uring_enter instead of interrupting the thread (fewer wake-ups per batch). Kernels
 * without those flags get COOP_TASKRUN, then a plain ring. FASTLOOP_QUEUE_RING=coop|plain forces
 * one (for benchmarks). Exported for bench/engine_bench.ts, which drives the engine on it.
 */
export function setupQueueRing(depth: number): IoUring {
  const entries = nextPow2(Math.min(4096, Math.max(64, depth * 2 + 8)));
  const opts = { sqe128: true, cqe32: true, cqEntries: entries * 4 };
  const wanted = Deno.env.get("FASTLOOP_QUEUE_RING") ?? "defer";
  const choices = [
    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
    IORING_SETUP_COOP_TASKRUN,
    0,
  ].slice(wanted === "plain" ? 2 : wanted === "coop" ? 1 : 0);
  for (let i = 0;; i++) {
    try {
      return IoUring.setup(entries, { ...opts, flags: choices[i]! });
    } catch (e) {
      if (i === choices.length - 1) throw e;
    }
  }
}

const SYS_IO_URING_ENTER = 426n;
const IORING_ENTER_GETEVENTS = 1;

/** io_uring_enter(0, 0, GETEVENTS): runs pending task work, posts what is ready, never sleeps. */
function peek(ring: IoUring): void {
  libc.io_uring_enter(SYS_IO_URING_ENTER, ring.fd, 0, 0, IORING_ENTER_GETEVENTS, null, 0n);
}

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p <<= 1;
  return p;
}
