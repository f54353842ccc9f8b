//! The punch fence: no DISCARD / WRITE_ZEROES frees blocks under direct IO in flight, and no
//! direct IO uses a mapping from before a punch (`PunchFence`, one per queue). Across the queues
//! of a device, each with its own extent cache, that takes shared memory (`QueueFence`): the file
//! ranges one queue changed through the file (an invalidation log), and the punches one queue is
//! about to make. With a single queue there is nothing to share: no region is allocated and
//! `QueueFence.create` gives null.
//!
//! Invalidation log. A queue that wrote into a hole, an unwritten or shared extent, or punched a
//! range appends the range; the others apply new entries to their caches before they map new
//! requests. Entry `s` lives in slot s % LOG_SLOTS; its stamp becomes s+1 once written, so a
//! reader never applies a half-written entry. A reader lapped by more than LOG_SLOTS entries
//! drops its whole cache instead.
//!
//! Punch fence. A queue about to punch a range announces it in a shared slot, then waits until no
//! other queue has a request with direct IO over the range; a queue about to issue direct IO first
//! flags its request's range, then looks for an announced punch over it and, if there is one,
//! goes through the file instead. Both sides store first and load second with sequentially
//! consistent atomics, so at least one of them sees the other (Dekker): no direct IO can use a
//! mapping from before a punch on another queue, and no punch frees blocks under another queue's
//! direct IO. A punch is withdrawn only after its invalidation was published, so a queue that
//! finds it gone finds the invalidation in the log.

import { UBLK_MAX_QUEUE_DEPTH } from "../ffi/ublk_cmd.ts";
import type { Request } from "./request.ts";

const LOG_SLOTS = 1024;
const PUNCH_SLOTS = 64;
const PUNCH_FREE = 0;
const PUNCH_RESERVED = 1; // slot taken, range being written
const PUNCH_ACTIVE = 2;
/** Per-queue tag slots for the direct-IO flags (any depth the driver accepts fits). */
const FENCE_TAGS = UBLK_MAX_QUEUE_DEPTH;

// Region layout (byte offsets from its start), each part 8-byte aligned.
const LOG_HEADER = 0; // Int32 [published count, pad]
const LOG_STAMPS = 8; // Int32 × LOG_SLOTS
const LOG_ENTRIES = LOG_STAMPS + LOG_SLOTS * 4; // Float64 × 2 × LOG_SLOTS: offset, length
const PUNCH_STATE = LOG_ENTRIES + LOG_SLOTS * 16; // Int32: [active count, state of slot i...]
const PUNCH_RANGES = PUNCH_STATE + (PUNCH_SLOTS + 2) * 4; // Float64 × 2 × PUNCH_SLOTS
const FENCE_FLAGS = PUNCH_RANGES + PUNCH_SLOTS * 16; // Int32 × queues × FENCE_TAGS

function fenceRangesOffset(queues: number): number {
  return FENCE_FLAGS + queues * FENCE_TAGS * 4;
}

/** Bytes of the region for `queues` queues (none for one queue). */
export function fenceRegionBytes(queues: number): number {
  return queues > 1 ? fenceRangesOffset(queues) + queues * FENCE_TAGS * 16 : 0;
}

/** One queue's view of the region. */
export class QueueFence {
  readonly #queueId: number;
  readonly #queues: number;
  readonly #logHeader: Int32Array;
  readonly #logStamps: Int32Array;
  readonly #logEntries: Float64Array;
  readonly #punchState: Int32Array;
  readonly #punchRanges: Float64Array;
  readonly #flags: Int32Array;
  readonly #ranges: Float64Array;
  /** Log entries this queue has applied. */
  #logSeen: number;

  private constructor(sab: SharedArrayBuffer, at: number, queues: number, queueId: number) {
    this.#queueId = queueId;
    this.#queues = queues;
    this.#logHeader = new Int32Array(sab, at + LOG_HEADER, 2);
    this.#logStamps = new Int32Array(sab, at + LOG_STAMPS, LOG_SLOTS);
    this.#logEntries = new Float64Array(sab, at + LOG_ENTRIES, LOG_SLOTS * 2);
    this.#punchState = new Int32Array(sab, at + PUNCH_STATE, PUNCH_SLOTS + 1);
    this.#punchRanges = new Float64Array(sab, at + PUNCH_RANGES, PUNCH_SLOTS * 2);
    this.#flags = new Int32Array(sab, at + FENCE_FLAGS, queues * FENCE_TAGS);
    this.#ranges = new Float64Array(sab, at + fenceRangesOffset(queues), queues * FENCE_TAGS * 2);
    this.#logSeen = Atomics.load(this.#logHeader, 0);
  }

  /** The fence of queue `queueId` in the region at byte `at` of `sab`; null for one queue. */
  static create(
    sab: SharedArrayBuffer,
    at: number,
    queues: number,
    queueId: number,
  ): QueueFence | null {
    return queues > 1 ? new QueueFence(sab, at, queues, queueId) : null;
  }

  // --- the direct-IO side: flag (store), then look for punches (load) -----------------------

  /** Flags `tag` as (possibly) doing direct IO over the range, until `unflagDirect`. */
  flagDirect(tag: number, offset: number, length: number): void {
    const k = this.#queueId * FENCE_TAGS + tag;
    this.#ranges[k * 2] = offset;
    this.#ranges[k * 2 + 1] = length;
    Atomics.store(this.#flags, k, 1);
  }

  unflagDirect(tag: number): void {
    Atomics.store(this.#flags, this.#queueId * FENCE_TAGS + tag, 0);
  }

  /** Is a punch announced over [offset, offset+length) (by any queue)? */
  punchAnnounced(offset: number, length: number): boolean {
    const st = this.#punchState;
    if (Atomics.load(st, 0) === 0) return false;
    const end = offset + length;
    for (let i = 0; i < PUNCH_SLOTS; i++) {
      if (Atomics.load(st, 1 + i) !== PUNCH_ACTIVE) continue;
      const o = this.#punchRanges[i * 2]!;
      if (o < end && offset < o + this.#punchRanges[i * 2 + 1]!) return true;
    }
    return false;
  }

  // --- the punch side: announce (store), then look for direct IO (load) ----------------------

  /** Announces a punch of [offset, offset+length); returns its slot, or -1 when all are taken. */
  announcePunch(offset: number, length: number): number {
    const st = this.#punchState;
    for (let i = 0; i < PUNCH_SLOTS; i++) {
      if (Atomics.compareExchange(st, 1 + i, PUNCH_FREE, PUNCH_RESERVED) !== PUNCH_FREE) continue;
      this.#punchRanges[i * 2] = offset;
      this.#punchRanges[i * 2 + 1] = length;
      Atomics.store(st, 1 + i, PUNCH_ACTIVE);
      Atomics.add(st, 0, 1);
      return i;
    }
    return -1;
  }

  /** Ends an announced punch; call after its invalidation was published. */
  withdrawPunch(slot: number): void {
    Atomics.store(this.#punchState, 1 + slot, PUNCH_FREE);
    Atomics.sub(this.#punchState, 0, 1);
  }

  /** Does another queue have a request flagged for direct IO over the range? */
  othersDirectOverlap(offset: number, length: number): boolean {
    const flags = this.#flags;
    const ranges = this.#ranges;
    const end = offset + length;
    for (let q = 0; q < this.#queues; q++) {
      if (q === this.#queueId) continue;
      for (let t = 0; t < FENCE_TAGS; t++) {
        const k = q * FENCE_TAGS + t;
        if (Atomics.load(flags, k) === 0) continue;
        const o = ranges[k * 2]!;
        if (o < end && offset < o + ranges[k * 2 + 1]!) return true;
      }
    }
    return false;
  }

  // --- the invalidation log -------------------------------------------------------------------

  /** Appends a file range this queue changed, for the other queues. */
  publish(offsetBytes: number, lengthBytes: number): void {
    const s = Atomics.add(this.#logHeader, 0, 1);
    const slot = s % LOG_SLOTS;
    this.#logEntries[slot * 2] = offsetBytes;
    this.#logEntries[slot * 2 + 1] = lengthBytes;
    // Release: the entry is complete before its stamp says so.
    Atomics.store(this.#logStamps, slot, s + 1);
  }

  /**
   * Hands every entry published since the last call (ours included: harmless) to `invalidate`,
   * or calls `forgetAll` when too many came to replay.
   */
  apply(invalidate: (offset: number, length: number) => void, forgetAll: () => void): void {
    const published = Atomics.load(this.#logHeader, 0);
    if (published === this.#logSeen) return;
    if (published - this.#logSeen > LOG_SLOTS) {
      forgetAll();
      this.#logSeen = published;
      return;
    }
    while (this.#logSeen !== published) {
      const slot = this.#logSeen % LOG_SLOTS;
      // Not written yet: its writer has not completed the request either; look again later.
      if (Atomics.load(this.#logStamps, slot) !== this.#logSeen + 1) break;
      invalidate(this.#logEntries[slot * 2]!, this.#logEntries[slot * 2 + 1]!);
      this.#logSeen++;
    }
  }
}

/**
 * The punch fence of one queue, within the queue and (through `QueueFence`, with several queues)
 * across queues: a DISCARD / WRITE_ZEROES waits until no direct IO overlaps it, and while it runs
 * no read or write over its range goes to the device.
 */
export class PunchFence {
  readonly #requests: readonly Request[];
  readonly #shared: QueueFence | null;
  readonly #invalidate: (offset: number, length: number) => void;
  readonly #forgetAll: () => void;
  #deferred = 0;
  #punching = 0;

  /**
   * Over the queue's per-tag `requests`; `invalidate` and `forgetAll` apply other queues'
   * changes to this queue's extent cache.
   */
  constructor(
    requests: readonly Request[],
    shared: QueueFence | null,
    invalidate: (offset: number, length: number) => void,
    forgetAll: () => void,
  ) {
    this.#requests = requests;
    this.#shared = shared;
    this.#invalidate = invalidate;
    this.#forgetAll = forgetAll;
  }

  /**
   * A read/write is about to be mapped: true when a punch over it runs here or is announced by
   * another queue (it must then go through the file). Otherwise brings the cache up to date with
   * the other queues' changes first.
   */
  punchOver(req: Request): boolean {
    if (this.#punching > 0) {
      for (const r of this.#requests) {
        if (r.punching && r.overlaps(req.offset, req.length)) return true;
      }
    }
    const shared = this.#shared;
    if (shared === null) return false;
    // Flag first (store), then look for announced punches (load): see the header.
    shared.flagDirect(req.tag, req.offset, req.length);
    if (shared.punchAnnounced(req.offset, req.length)) return true;
    shared.apply(this.#invalidate, this.#forgetAll);
    return false;
  }

  /** Queues a DISCARD / WRITE_ZEROES until `startReady` finds it unblocked. */
  defer(req: Request): void {
    req.deferred = true;
    this.#deferred++;
  }

  /** Calls `start` for each waiting punch that no direct IO overlaps any more. */
  startReady(start: (req: Request) => void): void {
    if (this.#deferred === 0) return;
    const shared = this.#shared;
    for (const req of this.#requests) {
      if (!req.deferred) continue;
      // Announce first (store), then look at the other queues' flags (load).
      if (shared !== null && req.punchSlot < 0) {
        req.punchSlot = shared.announcePunch(req.offset, req.length);
      }
      if (shared !== null && req.punchSlot < 0) continue; // every slot taken: later
      if (this.#directOverlaps(req)) continue;
      if (shared !== null && shared.othersDirectOverlap(req.offset, req.length)) continue;
      req.deferred = false;
      this.#deferred--;
      req.punching = true;
      this.#punching++;
      start(req);
    }
  }

  /** A punch finished; call after its range's invalidation was published (`changed`). */
  punchDone(req: Request): void {
    req.punching = false;
    this.#punching--;
    if (req.punchSlot >= 0) {
      this.#shared!.withdrawPunch(req.punchSlot);
      req.punchSlot = -1;
    }
  }

  /** A request finished: it no longer holds off other queues' punches. */
  requestDone(req: Request): void {
    this.#shared?.unflagDirect(req.tag);
  }

  /** The file's mapping changed over a range: tell the other queues. */
  changed(offset: number, length: number): void {
    this.#shared?.publish(offset, length);
  }

  /** Between turns: the other queues' changes. */
  applyChanges(): void {
    this.#shared?.apply(this.#invalidate, this.#forgetAll);
  }

  #directOverlaps(req: Request): boolean {
    for (const r of this.#requests) {
      if (r.direct > 0 && r.overlaps(req.offset, req.length)) return true;
    }
    return false;
  }
}
