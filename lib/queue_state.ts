//! What the queues of a device share with its main thread: one `SharedArrayBuffer` holding, per
//! queue, a mailbox (the main thread's commands: set the mode, set the size, quit, hand over), the
//! queue's state and mode, its counters (one writer: the queue's Worker; Float64, so byte counts do
//! not wrap) and its last error behind a seqlock; then the cross-queue region of
//! `lib/queue_fence.ts`. `lib/device.ts` posts to the mailboxes and reads the counters; `stat`
//! gets them from there without waking a queue.
//!
//! A queue's Worker sleeps in io_uring_enter and cannot receive `postMessage`, so a command is
//! posted by writing the mailbox, then the queue's eventfd (the doorbell: the Worker keeps a read
//! posted on it, which wakes it); the Worker acknowledges with `Atomics.store` + `notify`.

import { EIO, ENOSPC, errnoName } from "../ffi/errno.ts";
import { libc } from "../ffi/libc.ts";
import {
  UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_FLUSH,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
  UBLK_IO_OP_WRITE_ZEROES,
} from "../ffi/ublk_cmd.ts";
import type { ExtentCacheStats } from "./extent_cache.ts";
import { fenceRegionBytes } from "./queue_fence.ts";

/** What a queue's Worker is given (posted by lib/device_queues.ts, served by `runQueue`). */
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
  /** The device's size at start: the length of its region of the file (`regionOffsetBytes` on). */
  fileSizeBytes: number;
  /**
   * Where the device starts in the file (`attach --offset`): device offset + this = file offset,
   * added once per request (`Request.readDescriptor`); everything after works in file offsets.
   */
  regionOffsetBytes: number;
  /** The device's logical block size (`attach --sector-size`; at least the filesystem device's). */
  logicalBlockSize: number;
  readOnly: boolean;
  mode: Mode;
  /** Upper bound on cached extents for this queue. */
  maxExtents: number;
  /** The doorbell the main thread writes to after posting to the mailbox. */
  eventFd: number;
  sab: SharedArrayBuffer;
  /**
   * How request data reaches the backend (lib/request_data.ts): `zero-copy` when the device was
   * created with UBLK_F_AUTO_BUF_REG, else `copy` through per-tag buffers.
   */
  dataMode: DataMode;
  /**
   * The device has UBLK_F_BATCH_IO: requests come and go with the batched commands (multishot
   * FETCH_IO_CMDS, COMMIT_IO_CMDS per turn) instead of one FETCH/COMMIT per request.
   */
  batchIo: boolean;
  /** Copy mode: register the tags' buffers (less CPU per IO, pinned memory). */
  fixedBuffers: boolean;
  /** The queue ring's task-work mode: `defer` (the default), `coop` or `plain` (benchmarks). */
  ringMode: "defer" | "coop" | "plain";
  /** Spin this long at most for completions before sleeping (0: sleep at once). */
  spinUs: number;
  /** Spin only while at most this many requests are in service (`QueueWait`). */
  spinMaxInService: number;
  /** The CPU the queue's thread runs on (-1: wherever the scheduler puts it). */
  queueCpu: number;
  /**
   * Fault injection for tests, -1 when off: a request covering this byte kills the server
   * (SIGKILL), as a request that kills every server serving it would (see lib/supervisor.ts).
   */
  poisonByte: number;
}

export type DataMode = "copy" | "zero-copy";

/** Messages of a queue's Worker to the main thread. */
export type WorkerMessage =
  | { type: "fetching"; queueId: number }
  | { type: "exit"; queueId: number }
  | { type: "error"; queueId: number; message: string };

/**
 * Where a queue sends IO: `fast`, directly to the filesystem's device where the file's extents
 * allow it (the lease is held); `file`, everything through the file.
 */
export type Mode = "fast" | "file";
const MODES: readonly Mode[] = ["fast", "file"];

// --- layout: per queue CTRL_WORDS Int32 words, then COUNTERS Float64 counters ------------------

const CTRL_WORDS = 10;
const CTRL_MB_SEQ = 0; // mailbox: sequence of the last command posted (main thread)
const CTRL_MB_ACK = 1; // mailbox: sequence of the last command done (worker)
const CTRL_MB_OP = 2; // mailbox: MbOp
const CTRL_MB_MODE = 3; // mailbox: the mode setMode asks for
const CTRL_STATE = 4; // QueueState, written by the worker
const CTRL_MODE = 5; // the mode in force (worker)
const CTRL_ERR_SEQ = 6; // seqlock of the last-error slots: odd while the worker writes them
const CTRL_MB_ARG_LO = 7; // mailbox: setSize's size in 512-byte sectors, low and high 32 bits
const CTRL_MB_ARG_HI = 8;

/**
 * The mailbox's commands: set the mode (and drain), copy the extent cache's figures into the
 * counters (`stat`), quit, set the device's size (`fastloop resize`), and the two hand-overs
 * (`fastloop restart`, `Device.handOver`), which make the queue end once it serves nothing:
 * `handOverQuiesce` after QUIESCE_DEV's ABORTs (the kernel sends no new request), `handOverHold`
 * at once, holding back new requests for the kernel to re-issue to the next server.
 */
export const MbOp = {
  none: 0,
  setMode: 1,
  stats: 2,
  quit: 3,
  setSize: 4,
  handOverQuiesce: 5,
  handOverHold: 6,
} as const;
export type MbOp = (typeof MbOp)[keyof typeof MbOp];
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
  // The last error (guarded by CTRL_ERR_SEQ): errno, op, request range, ErrorPath, epoch ms.
  lastErrorErrno: 23,
  lastErrorOp: 24,
  lastErrorOffset: 25,
  lastErrorLength: 26,
  lastErrorPath: 27,
  lastErrorAtMs: 28,
  /** Turns of the queue's loop and io_uring_enter calls: syscalls and wake-ups per IO. */
  turns: 29,
  enters: 30,
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

function queueBytes(queues: number): number {
  return queues * (CTRL_WORDS * 4 + COUNTERS * 8);
}

/** The shared state of a device with `queues` queues. */
export function createSharedState(queues: number): SharedArrayBuffer {
  return new SharedArrayBuffer(queueBytes(queues) + fenceRegionBytes(queues));
}

/** Where `lib/queue_fence.ts` lays out its region in the shared state. */
export function fenceRegionOffset(queues: number): number {
  return queueBytes(queues);
}

/** One queue's part of the shared state: typed views, and the operations both sides use. */
export class QueueShared {
  readonly #ctrl: Int32Array;
  readonly counters: Float64Array;

  constructor(sab: SharedArrayBuffer, queues: number, queueId: number) {
    this.#ctrl = new Int32Array(sab, queueId * CTRL_WORDS * 4, CTRL_WORDS);
    this.counters = new Float64Array(
      sab,
      queues * CTRL_WORDS * 4 + queueId * COUNTERS * 8,
      COUNTERS,
    );
  }

  // --- the main thread's side ---------------------------------------------------------------

  /**
   * Posts `op` (with `mode` for setMode, `sizeBytes` for setSize: a multiple of 512) and rings
   * the queue's doorbell; returns the sequence number `acknowledged` waits for. One command at a
   * time per queue (the caller serialises).
   */
  post(op: MbOp, eventFd: number, mode: Mode = "file", sizeBytes = 0): number {
    Atomics.store(this.#ctrl, CTRL_MB_MODE, MODES.indexOf(mode));
    const sectors = Math.floor(sizeBytes / 512);
    Atomics.store(this.#ctrl, CTRL_MB_ARG_LO, sectors % 0x1_0000_0000);
    Atomics.store(this.#ctrl, CTRL_MB_ARG_HI, Math.floor(sectors / 0x1_0000_0000));
    Atomics.store(this.#ctrl, CTRL_MB_OP, op);
    const seq = Atomics.add(this.#ctrl, CTRL_MB_SEQ, 1) + 1;
    ringDoorbell(eventFd);
    return seq;
  }

  /** Resolves once the queue acknowledged `seq`, or has ended. */
  async acknowledged(seq: number, ended: () => boolean): Promise<void> {
    for (;;) {
      const ack = Atomics.load(this.#ctrl, CTRL_MB_ACK);
      if (ack - seq >= 0 || ended() || this.ended()) return;
      const w = Atomics.waitAsync(this.#ctrl, CTRL_MB_ACK, ack, 1000);
      if (w.async) await w.value;
    }
  }

  /** The queue's Worker has left its loop (cleanly or not). */
  ended(): boolean {
    const state = Atomics.load(this.#ctrl, CTRL_STATE);
    return state === QueueState.exited || state === QueueState.failed;
  }

  /**
   * The queue's last error, read without stopping it (seqlock: retried while the worker is
   * writing it); null when the queue has had none.
   */
  lastError(): LastError | null {
    const c = this.counters;
    // A worker that died half-way through a write leaves the sequence odd: give up after a while.
    for (let attempt = 0; attempt < 10_000; attempt++) {
      const seq = Atomics.load(this.#ctrl, CTRL_ERR_SEQ);
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
      if (Atomics.load(this.#ctrl, CTRL_ERR_SEQ) === seq) return e;
    }
    return null;
  }

  // --- the queue's side ---------------------------------------------------------------------

  /** The mailbox's sequence number (a new command when it changed). */
  postedSeq(): number {
    return Atomics.load(this.#ctrl, CTRL_MB_SEQ);
  }

  postedOp(): MbOp {
    return Atomics.load(this.#ctrl, CTRL_MB_OP) as MbOp;
  }

  postedMode(): Mode {
    return MODES[Atomics.load(this.#ctrl, CTRL_MB_MODE)] ?? "file";
  }

  /** setSize's size in bytes. */
  postedSizeBytes(): number {
    const lo = Atomics.load(this.#ctrl, CTRL_MB_ARG_LO) >>> 0;
    const hi = Atomics.load(this.#ctrl, CTRL_MB_ARG_HI) >>> 0;
    return (hi * 0x1_0000_0000 + lo) * 512;
  }

  acknowledge(seq: number): void {
    Atomics.store(this.#ctrl, CTRL_MB_ACK, seq);
    Atomics.notify(this.#ctrl, CTRL_MB_ACK);
  }

  setState(state: number): void {
    Atomics.store(this.#ctrl, CTRL_STATE, state);
  }

  setMode(mode: Mode): void {
    Atomics.store(this.#ctrl, CTRL_MODE, MODES.indexOf(mode));
  }

  /** A request failed with `errno`: counted, by kind, and kept as the last error. */
  recordRequestError(
    errno: number,
    op: number,
    offset: number,
    length: number,
    path: number,
  ): void {
    const c = this.counters;
    c[Counter.errors]!++;
    const kind = errno === EIO
      ? Counter.errorsEio
      : errno === ENOSPC
      ? Counter.errorsEnospc
      : Counter.errorsOther;
    c[kind]!++;
    this.recordError(errno, op, offset, length, path);
  }

  /** The extent cache's statistics, for `stat`: when it asks (MbOp.stats) and at the end. */
  publishCacheStats(s: ExtentCacheStats): void {
    const c = this.counters;
    c[Counter.cacheHits] = s.hits;
    c[Counter.cacheMisses] = s.misses;
    c[Counter.fiemapCalls] = s.fiemapCalls;
    c[Counter.extentsCached] = s.extents;
    c[Counter.extentCacheBytes] = s.memoryBytes;
  }

  /** Keeps the last error for `stat` (numbers only: nothing allocated on the IO path). */
  recordError(errno: number, op: number, offset: number, length: number, path: number): void {
    const c = this.counters;
    // Seqlock: odd while the slots are being written, so a reader never mixes two errors.
    Atomics.add(this.#ctrl, CTRL_ERR_SEQ, 1);
    c[Counter.lastErrorErrno] = errno;
    c[Counter.lastErrorOp] = op;
    c[Counter.lastErrorOffset] = offset;
    c[Counter.lastErrorLength] = length;
    c[Counter.lastErrorPath] = path;
    c[Counter.lastErrorAtMs] = Date.now();
    Atomics.add(this.#ctrl, CTRL_ERR_SEQ, 1);
  }
}

const doorbellBytes = new Uint8Array([1, 0, 0, 0, 0, 0, 0, 0]);

function ringDoorbell(eventFd: number): void {
  // An eventfd write of 8 bytes cannot be short; EAGAIN only at a counter of 2^64-2.
  libc.write(eventFd, doorbellBytes, 8n);
}
