//! The extent cache: file offset → (physical offset, length, kind) or hole, for one queue.
//!
//! Pure TypeScript over an `ExtentSource` (FIEMAP in production, a plain list in tests). The
//! cache holds sorted, non-overlapping segments of the file in one Float64Array and finds
//! the one covering an offset by binary search; a hit allocates nothing. A miss maps a window
//! around the offset (default 64 MiB, at most `maxExtentsPerFill` extents) and records what it
//! learned explicitly, holes included, so the next lookup anywhere in that window is a hit.
//! Memory is bounded by `maxExtents` segments: when full, the least recently filled windows are
//! evicted. Invalidation drops every segment touching a range; the next lookup refills it.
//!
//! Offsets are JS numbers (exact below 2^53: 8 PiB). A segment is four consecutive doubles —
//! start, end, physical, kind | reason << 8 — so a lookup and the caller's reads of the found
//! segment touch one cache line (two segments per 64-byte line).

import { fiemap, type FiemapExtent } from "../ffi/fiemap.ts";
import { classifyExtent, ExtentKind, ExtentReason } from "./eligibility.ts";

export { ExtentKind, ExtentReason };

/** Where the cache learns a file's mapping. */
export interface ExtentSource {
  /**
   * The extents overlapping `[offsetBytes, offsetBytes + lengthBytes)` in logical order. When
   * `maxExtents` is given, the source may stop after that many (the cache then asks again).
   */
  map(offsetBytes: number, lengthBytes: number, maxExtents?: number): FiemapExtent[];
}

/**
 * The mapping of the open file `fd`, by FIEMAP. Without FIEMAP_FLAG_SYNC: the server writes only
 * with O_DIRECT and holds the lease, so nothing of the file is dirty in the page cache, and
 * delalloc extents are classified via-file anyway.
 */
export function fileExtentSource(fd: number, path: string): ExtentSource {
  return {
    map: (offset, length, maxExtents) => fiemap(fd, offset, length, { path, maxExtents }),
  };
}

export interface ExtentCacheOptions {
  /** File size: lookups at or past it are holes without asking the source. */
  fileSizeBytes: number;
  /** Upper bound on cached segments (extents and holes). */
  maxExtents: number;
  /** Bytes mapped around a miss (aligned window). Default 64 MiB. */
  windowBytes?: number;
  /** Extents asked of the source per call. Default min(4096, maxExtents / 2). */
  maxExtentsPerFill?: number;
  /** Backing device logical block size, for the alignment rule. Default 512. */
  blockSize?: number;
}

export interface ExtentCacheStats {
  extents: number;
  memoryBytes: number;
  hits: number;
  misses: number;
  fiemapCalls: number;
}

/** End of the last segment when it runs to "forever" (past EOF). */
const MAX_END = Number.MAX_SAFE_INTEGER;
const DEFAULT_WINDOW_BYTES = 64 * 1024 * 1024;
// Segment layout in #seg: STRIDE doubles per segment.
const STRIDE = 4;
const S_START = 0; // file offset where the segment starts
const S_END = 1; // file offset where it ends (exclusive)
const S_PHYSICAL = 2; // device offset of S_START (-1 for holes)
const S_KIND = 3; // kind | reason << 8
// 4 doubles + a Uint32 fill id (eviction age).
const BYTES_PER_SEGMENT = STRIDE * 8 + 4;
const INITIAL_CAPACITY = 1024;
/**
 * Below this many segments a plain binary search stays in the CPU caches; above it, the bucket
 * directory cuts a random lookup from ~20 dependent cache misses to about two.
 */
const DIRECTORY_MIN_SEGMENTS = 4096;

/** A segment while a fill is being assembled (slow path only). */
interface Pending {
  start: number;
  end: number;
  physical: number;
  kind: ExtentKind;
  reason: ExtentReason;
}

export class ExtentCache {
  readonly #source: ExtentSource;
  readonly #maxExtents: number;
  readonly #windowBytes: number;
  readonly #perFill: number;
  readonly #blockSize: number;

  #fileSizeBytes: number;

  /** `#count` segments of STRIDE doubles, sorted by start, non-overlapping. */
  #seg: Float64Array;
  /** Fill number of each segment: eviction drops the oldest fills first. */
  #fill: Uint32Array;
  #count = 0;
  /** Index of the last hit: sequential IO usually hits it or the next one. */
  #last = 0;
  #fillSeq = 0;

  /**
   * Bucket directory over `[0, #dirBuckets * #bucketBytes)`: `#dir[b]` is the index of the last
   * segment starting at or before `b * #bucketBytes` (-1 if none), so the segment for an offset
   * in bucket `b` lies in `[#dir[b], #dir[b + 1]]`. Rebuilt lazily after any change.
   */
  #dir = new Int32Array(0);
  #dirBuckets = 0;
  #bucketBytes = 1;
  #dirDirty = true;
  /** Lookups served by plain binary search since the directory went stale. */
  #staleLookups = 0;

  #hits = 0;
  #misses = 0;
  #fiemapCalls = 0;

  constructor(source: ExtentSource, opts: ExtentCacheOptions) {
    if (!(opts.maxExtents >= 1)) throw new RangeError(`maxExtents must be >= 1`);
    this.#source = source;
    this.#maxExtents = Math.floor(opts.maxExtents);
    this.#windowBytes = opts.windowBytes ?? DEFAULT_WINDOW_BYTES;
    this.#perFill = Math.max(
      1,
      Math.floor(opts.maxExtentsPerFill ?? Math.min(4096, this.#maxExtents / 2)),
    );
    this.#blockSize = opts.blockSize ?? 512;

    this.#fileSizeBytes = opts.fileSizeBytes;
    const capacity = Math.min(INITIAL_CAPACITY, this.#maxExtents);
    this.#seg = new Float64Array(capacity * STRIDE);
    this.#fill = new Uint32Array(capacity);
  }

  /**
   * Index of the cached segment covering `offsetBytes`, mapping it first on a miss. The index
   * is valid until the next `lookup` that misses, `invalidate` or `clear`; read the segment
   * with the `*At(i)` accessors.
   */
  lookup(offsetBytes: number): number {
    const seg = this.#seg;
    const count = this.#count;
    let i = this.#last;
    if (i < count && seg[i * STRIDE + S_START]! <= offsetBytes) {
      if (offsetBytes < seg[i * STRIDE + S_END]!) {
        this.#hits++;
        return i;
      }
      // Sequential IO crossing into the next segment.
      i++;
      if (
        i < count && seg[i * STRIDE + S_START]! <= offsetBytes &&
        offsetBytes < seg[i * STRIDE + S_END]!
      ) {
        this.#last = i;
        this.#hits++;
        return i;
      }
    }
    i = this.#find(offsetBytes);
    if (i >= 0 && offsetBytes < seg[i * STRIDE + S_END]!) {
      this.#last = i;
      this.#hits++;
      return i;
    }
    return this.#miss(offsetBytes);
  }

  /** File offset where segment `i` starts. */
  startAt(i: number): number {
    return this.#seg[i * STRIDE + S_START]!;
  }
  /** File offset where segment `i` ends (exclusive). */
  endAt(i: number): number {
    return this.#seg[i * STRIDE + S_END]!;
  }
  /** Device offset of file offset `offsetBytes`, which must lie in segment `i`. */
  physicalOf(i: number, offsetBytes: number): number {
    const at = i * STRIDE;
    return this.#seg[at + S_PHYSICAL]! + (offsetBytes - this.#seg[at + S_START]!);
  }
  kindAt(i: number): ExtentKind {
    return (this.#seg[i * STRIDE + S_KIND]! & 0xff) as ExtentKind;
  }

  /**
   * Forgets what may have changed in `[offsetBytes, offsetBytes + lengthBytes)`: every segment
   * that touches it, whole, so nothing from before the change is used for any byte of the range;
   * except that a hole or an unwritten extent only changes where the range covers it: outside it
   * still reads as zeros and still takes writes through the file, so that part stays cached (the
   * first writes into a sparse file would otherwise cost a FIEMAP each). Allocates nothing.
   */
  invalidate(offsetBytes: number, lengthBytes: number): void {
    if (lengthBytes <= 0 || this.#count === 0) return;
    const endBytes = offsetBytes + lengthBytes;
    let first = this.#search(offsetBytes);
    if (first < 0 || this.endAt(first) <= offsetBytes) first++;
    let last = first;
    while (last < this.#count && this.startAt(last) < endBytes) last++;
    if (first >= last) return;
    const keepHead = this.startAt(first) < offsetBytes && this.#readsZeros(first);
    const keepTail = this.endAt(last - 1) > endBytes && this.#readsZeros(last - 1);
    this.#dirDirty = true;
    if (keepHead && keepTail && last - first === 1) {
      // The range lies inside one such segment: split it, the part after the range a new one.
      this.#reserve(this.#count + 1);
      const seg = this.#seg;
      seg.copyWithin((first + 2) * STRIDE, (first + 1) * STRIDE, this.#count * STRIDE);
      this.#fill.copyWithin(first + 2, first + 1, this.#count);
      seg.copyWithin((first + 1) * STRIDE, first * STRIDE, (first + 1) * STRIDE);
      this.#fill[first + 1] = this.#fill[first]!;
      this.#count++;
      this.#trimStart(first + 1, endBytes);
      seg[first * STRIDE + S_END] = offsetBytes;
      this.#last = 0;
      return;
    }
    if (keepHead) this.#seg[first++ * STRIDE + S_END] = offsetBytes;
    if (keepTail) this.#trimStart(--last, endBytes);
    this.#remove(first, last);
  }

  /** Is segment `i` one that reads as zeros (a hole or an unwritten extent)? */
  #readsZeros(i: number): boolean {
    const kind = this.kindAt(i);
    return kind === ExtentKind.hole || kind === ExtentKind.unwritten;
  }

  /** Moves the start of segment `i` to `start` (inside it), its physical offset along. */
  #trimStart(i: number, start: number): void {
    const at = i * STRIDE;
    const seg = this.#seg;
    if (seg[at + S_PHYSICAL]! >= 0) {
      seg[at + S_PHYSICAL] = seg[at + S_PHYSICAL]! + (start - seg[at + S_START]!);
    }
    seg[at + S_START] = start;
  }

  /** The file changed size: adopt it and forget everything from the smaller size on. */
  resize(fileSizeBytes: number): void {
    const from = Math.min(fileSizeBytes, this.#fileSizeBytes);
    this.#fileSizeBytes = fileSizeBytes;
    this.#dirDirty = true;
    this.invalidate(from, MAX_END - from);
  }

  /** Forgets everything (e.g. after losing the lease). Keeps the allocated arrays. */
  clear(): void {
    this.#count = 0;
    this.#last = 0;
    this.#dirDirty = true;
  }

  stats(): ExtentCacheStats {
    return {
      extents: this.#count,
      memoryBytes: this.#fill.length * BYTES_PER_SEGMENT + this.#dir.byteLength,
      hits: this.#hits,
      misses: this.#misses,
      fiemapCalls: this.#fiemapCalls,
    };
  }

  /** `#search` through the bucket directory (the hit path). */
  #find(offset: number): number {
    if (this.#count < DIRECTORY_MIN_SEGMENTS) return this.#search(offset);
    if (this.#dirDirty) {
      // A rebuild costs O(count); a stale lookup a few hundred ns more than a fresh one. Rebuild
      // only once enough lookups have come to pay for it, so a burst of misses and invalidations
      // (writes into holes) does not rebuild after every one (ski rental).
      if (++this.#staleLookups < this.#count >>> 5) return this.#search(offset);
      this.#rebuildDirectory();
    }
    const b = Math.floor(offset / this.#bucketBytes);
    if (!(b < this.#dirBuckets)) return this.#search(offset);
    const dir = this.#dir;
    const seg = this.#seg;
    // Known: start(dir[b]) <= offset (when dir[b] >= 0), and the answer is at most dir[b + 1].
    let lo = dir[b]! + 1;
    let hi = dir[b + 1]!;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (seg[mid * STRIDE + S_START]! <= offset) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi;
  }

  #rebuildDirectory(): void {
    this.#dirDirty = false;
    this.#staleLookups = 0;
    const count = this.#count;
    const seg = this.#seg;
    const covered = Math.max(
      this.#fileSizeBytes,
      count > 0 ? seg[(count - 1) * STRIDE + S_START]! : 0,
    );
    // About one bucket per segment, a power of two bytes wide (at least 4 KiB).
    let bucketBytes = 4096;
    while (covered / bucketBytes > count) bucketBytes *= 2;
    const buckets = Math.ceil(covered / bucketBytes);
    if (this.#dir.length < buckets + 1) this.#dir = new Int32Array(buckets + 1);
    const dir = this.#dir;
    let i = -1;
    for (let b = 0; b <= buckets; b++) {
      const at = b * bucketBytes;
      while (i + 1 < count && seg[(i + 1) * STRIDE + S_START]! <= at) i++;
      dir[b] = i;
    }
    this.#bucketBytes = bucketBytes;
    this.#dirBuckets = buckets;
  }

  /** Index of the last segment starting at or before `offset`, or -1. */
  #search(offset: number): number {
    const seg = this.#seg;
    let lo = 0;
    let hi = this.#count - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (seg[mid * STRIDE + S_START]! <= offset) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi;
  }

  #miss(offset: number): number {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new RangeError(`Extent cache lookup at ${offset}: not a byte offset`);
    }
    this.#misses++;
    const left = this.#search(offset);
    const gapStart = left >= 0 ? this.endAt(left) : 0;
    const gapEnd = left + 1 < this.#count ? this.startAt(left + 1) : MAX_END;

    let pending: Pending[];
    if (offset >= this.#fileSizeBytes) {
      // Past EOF nothing is allocated that a read may return: one hole to the end of the gap.
      pending = [{
        start: Math.max(gapStart, this.#fileSizeBytes),
        end: gapEnd,
        physical: -1,
        kind: ExtentKind.hole,
        reason: ExtentReason.hole,
      }];
    } else {
      const windowStart = offset - (offset % this.#windowBytes);
      const from = Math.max(gapStart, windowStart);
      const to = Math.min(gapEnd, windowStart + this.#windowBytes, this.#fileSizeBytes);
      pending = this.#fetch(from, to, offset);
    }
    if (pending.length > this.#maxExtents) pending = keepAround(pending, offset, this.#maxExtents);
    const room = this.#maxExtents - this.#count;
    if (pending.length > room) this.#evict(pending.length - room);
    this.#insert(pending);
    const i = this.#search(offset);
    this.#last = i;
    return i;
  }

  /** Segments covering `[from, knownEnd)`, `from <= offset < knownEnd <= to`, holes included. */
  #fetch(from: number, to: number, offset: number): Pending[] {
    const out: Pending[] = [];
    let cursor = from;
    let known = from;
    // Repeat while a truncated answer has not reached `offset` yet (very fragmented files).
    while (known <= offset) {
      const extents = this.#source.map(known, to - known, this.#perFill);
      this.#fiemapCalls++;
      for (const e of extents) {
        const a = Math.max(e.logical, cursor);
        const b = Math.min(e.logical + e.length, to);
        if (b <= a) continue;
        if (a > cursor) push(out, cursor, a, -1, ExtentKind.hole, ExtentReason.hole);
        const c = classifyExtent(e.flags, this.#blockSize, e, true);
        push(out, a, b, e.physical + (a - e.logical), c.kind, c.reason);
        cursor = b;
      }
      if (extents.length >= this.#perFill && cursor < to) {
        known = cursor; // what lies after the last extent is not known yet
      } else {
        if (cursor < to) push(out, cursor, to, -1, ExtentKind.hole, ExtentReason.hole);
        known = to;
      }
    }
    return out;
  }

  /** Frees at least `needed` slots by dropping the least recently filled windows. */
  #evict(needed: number): void {
    // Free a quarter of the bound more than needed, so a run of misses does not evict each time.
    const target = Math.min(this.#count, needed + Math.floor(this.#maxExtents / 4));
    const perFill = new Map<number, number>();
    for (let i = 0; i < this.#count; i++) {
      const id = this.#fill[i]!;
      perFill.set(id, (perFill.get(id) ?? 0) + 1);
    }
    const ids = [...perFill.keys()].sort((a, b) => a - b);
    let freed = 0;
    let cutoff = -1;
    for (const id of ids) {
      if (freed >= target) break;
      freed += perFill.get(id)!;
      cutoff = id;
    }
    let j = 0;
    for (let i = 0; i < this.#count; i++) {
      if (this.#fill[i]! <= cutoff) continue;
      if (i !== j) {
        this.#seg.copyWithin(j * STRIDE, i * STRIDE, (i + 1) * STRIDE);
        this.#fill[j] = this.#fill[i]!;
      }
      j++;
    }
    this.#count = j;
    this.#last = 0;
    this.#dirDirty = true;
  }

  /** Inserts `pending` (sorted, inside one gap) and merges it with contiguous neighbours. */
  #insert(pending: Pending[]): void {
    const k = pending.length;
    if (k === 0) return;
    this.#reserve(this.#count + k);
    const at = this.#search(pending[0]!.start) + 1;
    const n = this.#count;
    this.#seg.copyWithin((at + k) * STRIDE, at * STRIDE, n * STRIDE);
    this.#fill.copyWithin(at + k, at, n);
    const id = ++this.#fillSeq;
    const seg = this.#seg;
    for (let i = 0; i < k; i++) {
      const p = pending[i]!;
      const o = (at + i) * STRIDE;
      seg[o + S_START] = p.start;
      seg[o + S_END] = p.end;
      seg[o + S_PHYSICAL] = p.physical;
      seg[o + S_KIND] = p.kind | (p.reason << 8);
      this.#fill[at + i] = id;
    }
    this.#count = n + k;
    this.#dirDirty = true;
    // Right boundary first so the left merge does not shift it.
    this.#mergeWithNext(at + k - 1);
    if (at > 0) this.#mergeWithNext(at - 1);
  }

  /** Merges segments `i` and `i + 1` when the second continues the first exactly. */
  #mergeWithNext(i: number): void {
    const j = i + 1;
    if (i < 0 || j >= this.#count) return;
    const seg = this.#seg;
    const a = i * STRIDE;
    const b = j * STRIDE;
    if (seg[a + S_END] !== seg[b + S_START] || seg[a + S_KIND] !== seg[b + S_KIND]) return;
    const isHole = (seg[a + S_KIND]! & 0xff) === ExtentKind.hole;
    const contiguous = seg[a + S_PHYSICAL]! + (seg[a + S_END]! - seg[a + S_START]!) ===
      seg[b + S_PHYSICAL];
    if (!isHole && !contiguous) return;
    seg[a + S_END] = seg[b + S_END]!;
    this.#fill[i] = Math.max(this.#fill[i]!, this.#fill[j]!);
    this.#remove(j, j + 1);
  }

  /** Removes segments `[first, last)`. */
  #remove(first: number, last: number): void {
    if (last <= first) return;
    const n = this.#count;
    this.#seg.copyWithin(first * STRIDE, last * STRIDE, n * STRIDE);
    this.#fill.copyWithin(first, last, n);
    this.#count = n - (last - first);
    this.#last = 0;
    this.#dirDirty = true;
  }

  /** Grows the arrays (doubling, capped at `maxExtents`) to hold `n` segments. */
  #reserve(n: number): void {
    if (n <= this.#fill.length) return;
    const capacity = Math.min(this.#maxExtents, Math.max(n, this.#fill.length * 2));
    const seg = new Float64Array(capacity * STRIDE);
    seg.set(this.#seg.subarray(0, this.#count * STRIDE));
    const fill = new Uint32Array(capacity);
    fill.set(this.#fill.subarray(0, this.#count));
    this.#seg = seg;
    this.#fill = fill;
  }
}

/** Appends a segment, extending the previous one when it continues it exactly. */
function push(
  out: Pending[],
  start: number,
  end: number,
  physical: number,
  kind: ExtentKind,
  reason: ExtentReason,
): void {
  const prev = out[out.length - 1];
  if (
    prev !== undefined && prev.end === start && prev.kind === kind && prev.reason === reason &&
    (kind === ExtentKind.hole || prev.physical + (prev.end - prev.start) === physical)
  ) {
    prev.end = end;
    return;
  }
  out.push({ start, end, physical, kind, reason });
}

/** The `max` segments of `pending` nearest to the one covering `offset`. */
function keepAround(pending: Pending[], offset: number, max: number): Pending[] {
  const at = pending.findIndex((p) => p.start <= offset && offset < p.end);
  const first = Math.max(0, Math.min(at - Math.floor(max / 2), pending.length - max));
  return pending.slice(first, first + max);
}
