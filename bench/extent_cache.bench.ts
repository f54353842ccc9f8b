// Lookup cost of the extent cache at one million cached extents (target: <= 200 ns each).
// Run: deno bench --allow-all bench/extent_cache.bench.ts

import { ExtentCache, type ExtentSource } from "../lib/extent_cache.ts";
import type { FiemapExtent } from "../ffi/fiemap.ts";

const EXTENTS = 1_000_000;
const EXTENT_BYTES = 4096;
const FILE_BYTES = EXTENTS * EXTENT_BYTES;

/** A file of 1 M one-block extents whose physical blocks are not contiguous (nothing merges). */
const source: ExtentSource = {
  map(offsetBytes: number, lengthBytes: number, maxExtents = Infinity): FiemapExtent[] {
    const out: FiemapExtent[] = [];
    const first = Math.floor(offsetBytes / EXTENT_BYTES);
    const end = Math.min(EXTENTS, Math.ceil((offsetBytes + lengthBytes) / EXTENT_BYTES));
    for (let i = first; i < end && out.length < maxExtents; i++) {
      out.push({
        logical: i * EXTENT_BYTES,
        physical: (2 * i + 1) * EXTENT_BYTES,
        length: EXTENT_BYTES,
        flags: i === EXTENTS - 1 ? 1 : 0,
      });
    }
    return out;
  },
};

function filledCache(): ExtentCache {
  const cache = new ExtentCache(source, {
    fileSizeBytes: FILE_BYTES,
    maxExtents: EXTENTS + 16,
    maxExtentsPerFill: 16384,
  });
  for (let off = 0; off < FILE_BYTES; off += 64 * 1024 * 1024) cache.lookup(off);
  const s = cache.stats();
  if (s.extents !== EXTENTS) throw new Error(`Cache holds ${s.extents} extents, want ${EXTENTS}`);
  return cache;
}

const cache = filledCache();
const small = new ExtentCache(source, { fileSizeBytes: 1000 * EXTENT_BYTES, maxExtents: 2000 });
small.lookup(0);
const LOOKUPS = 1 << 16;
const randomOffsets = new Float64Array(LOOKUPS);
const smallOffsets = new Float64Array(LOOKUPS);
for (let i = 0; i < LOOKUPS; i++) {
  randomOffsets[i] = Math.floor(Math.random() * FILE_BYTES);
  smallOffsets[i] = Math.floor(Math.random() * 1000 * EXTENT_BYTES);
}
let sink = 0;

// Deno.bench times each iteration, and a timer read costs more than a lookup: every benchmark
// below times a batch of LOOKUPS lookups, and the per-lookup figure is printed by `report`.
// Each lookup also reads what the event loop reads: the kind, the device offset, the end.
function randomBatch(c: ExtentCache, offsets: Float64Array): void {
  for (let i = 0; i < LOOKUPS; i++) {
    const off = offsets[i]!;
    const s = c.lookup(off);
    sink += c.kindAt(s) + c.physicalOf(s, off) + c.endAt(s);
  }
}
let next = 0;
function sequentialBatch(): void {
  for (let i = 0; i < LOOKUPS; i++) {
    const s = cache.lookup(next);
    sink += cache.kindAt(s) + cache.physicalOf(s, next) + cache.endAt(s);
    next += 4096;
    if (next >= FILE_BYTES) next = 0;
  }
}

/** Prints ns per lookup for a batch function (best of 20 batches, after warm-up). */
function report(name: string, batch: () => void): void {
  for (let i = 0; i < 5; i++) batch();
  let best = Infinity;
  for (let i = 0; i < 20; i++) {
    const t0 = performance.now();
    batch();
    best = Math.min(best, performance.now() - t0);
  }
  console.log(`${name}: ${((best * 1e6) / LOOKUPS).toFixed(1)} ns per lookup`);
}

report(
  `random lookup (+ kind, physical, end), ${EXTENTS} extents cached`,
  () => randomBatch(cache, randomOffsets),
);
report(
  `sequential 4 KiB lookups (+ kind, physical, end), ${EXTENTS} extents cached`,
  sequentialBatch,
);
report(
  `random lookup (+ kind, physical, end), 1000 extents cached`,
  () => randomBatch(small, smallOffsets),
);

Deno.bench(`random lookup x${LOOKUPS}, ${EXTENTS} extents cached`, () => {
  randomBatch(cache, randomOffsets);
});

Deno.bench(`sequential 4 KiB lookup x${LOOKUPS}, ${EXTENTS} extents cached`, sequentialBatch);

Deno.bench(`random lookup x${LOOKUPS}, 1000 extents cached`, () => {
  randomBatch(small, smallOffsets);
});

const MIB = 1024 * 1024;
Deno.bench(`miss: invalidate 1 MiB then look it up (synthetic source, ${EXTENTS} cached)`, () => {
  const off = Math.floor(Math.random() * (FILE_BYTES / MIB)) * MIB;
  cache.invalidate(off, MIB);
  sink += cache.lookup(off);
});

Deno.bench("sink", () => {
  if (sink < 0) throw new Error("unreachable");
});
