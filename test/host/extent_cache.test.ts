// The extent cache against a synthetic source whose model is a plain list of extents: every
// answer is checked against a linear scan of that list, never against the cache's own state.
// Then over real FIEMAP on ext4 and xfs, checked against the bytes on the loop device.

import assert from "node:assert/strict";
import { ExtentCache, type ExtentCacheOptions, ExtentKind } from "../../lib/extent_cache.ts";
import type { FiemapExtent } from "../../ffi/fiemap.ts";
import { FIEMAP_EXTENT_SHARED, FIEMAP_EXTENT_UNWRITTEN, fiemapSource } from "../../ffi/fiemap.ts";
import { close, O_RDONLY, open } from "../../ffi/libc.ts";
import { patternBytes, readDirect, run, withFilesystem, writeAt } from "./fs_fixtures.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** A file model: sorted, non-overlapping extents; everything else is a hole. */
class ModelSource {
  calls = 0;
  constructor(public extents: FiemapExtent[]) {}
  /** Like FIEMAP: every extent overlapping the range, whole, in order, at most `max`. */
  map(offset: number, length: number, max = Infinity): FiemapExtent[] {
    this.calls++;
    return this.extents
      .filter((e) => e.logical < offset + length && e.logical + e.length > offset)
      .slice(0, max)
      .map((e) => ({ ...e }));
  }
}

/** The oracle: what the model says about `offset`, by linear scan. */
function expected(model: FiemapExtent[], offset: number): { kind: ExtentKind; physical: number } {
  for (const e of model) {
    if (offset >= e.logical && offset < e.logical + e.length) {
      const physical = e.physical + (offset - e.logical);
      if (e.flags & FIEMAP_EXTENT_SHARED) return { kind: ExtentKind.viaFile, physical };
      if (e.flags & FIEMAP_EXTENT_UNWRITTEN) return { kind: ExtentKind.unwritten, physical };
      return { kind: ExtentKind.direct, physical };
    }
  }
  return { kind: ExtentKind.hole, physical: -1 };
}

function check(cache: ExtentCache, model: FiemapExtent[], offset: number): void {
  const i = cache.lookup(offset);
  const want = expected(model, offset);
  assert.equal(cache.kindAt(i), want.kind, `kind at ${offset}`);
  assert.ok(cache.startAt(i) <= offset && offset < cache.endAt(i), `segment covers ${offset}`);
  if (want.kind !== ExtentKind.hole) {
    assert.equal(cache.physicalOf(i, offset), want.physical, `physical at ${offset}`);
  }
}

/** A deterministic fragmented file: 4 KiB-aligned extents of mixed kinds with holes between. */
function fragmentedModel(count: number, seed = 7): FiemapExtent[] {
  let x = seed;
  const rnd = (n: number) => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return x % n;
  };
  const out: FiemapExtent[] = [];
  let logical = 0;
  let physical = 10 * MiB;
  for (let i = 0; i < count; i++) {
    logical += rnd(3) * 4 * KiB; // sometimes a hole before
    const length = (1 + rnd(8)) * 4 * KiB;
    physical += (rnd(2) + 1) * 4 * KiB * (rnd(4) === 0 ? 0 : 1); // sometimes contiguous
    const kind = rnd(6);
    const flags = kind === 0 ? FIEMAP_EXTENT_UNWRITTEN : kind === 1 ? FIEMAP_EXTENT_SHARED : 0;
    out.push({ logical, physical, length, flags });
    logical += length;
    physical += length;
  }
  return out;
}

function fileEnd(model: FiemapExtent[]): number {
  const last = model[model.length - 1]!;
  return last.logical + last.length;
}

function newCache(source: ModelSource, opts: Partial<ExtentCacheOptions> = {}): ExtentCache {
  return new ExtentCache(source, {
    fileSizeBytes: fileEnd(source.extents) + 64 * KiB,
    maxExtents: 100_000,
    windowBytes: 256 * KiB,
    ...opts,
  });
}

Deno.test("extentCache.lookup() agrees with a plain list at every 512-byte offset", () => {
  const model = fragmentedModel(400);
  const cache = newCache(new ModelSource(model), { maxExtentsPerFill: 5 });
  const end = fileEnd(model) + 64 * KiB;
  for (let off = 0; off < end; off += 512) check(cache, model, off);
  // And again backwards, now mostly from the cache.
  for (let off = end - 512; off >= 0; off -= 4096) check(cache, model, off);
});

Deno.test("extentCache.lookup() agrees with a plain list at random offsets", () => {
  const model = fragmentedModel(2000, 99);
  const cache = newCache(new ModelSource(model), { windowBytes: 64 * KiB });
  const end = fileEnd(model);
  for (let n = 0; n < 20_000; n++) check(cache, model, Math.floor(Math.random() * end));
});

Deno.test("extentCache.lookup() returns a hole past EOF without asking the source", () => {
  const source = new ModelSource([{ logical: 0, physical: 4096, length: 8192, flags: 1 }]);
  const cache = new ExtentCache(source, { fileSizeBytes: 8192, maxExtents: 16 });
  const i = cache.lookup(1 * MiB);
  assert.equal(cache.kindAt(i), ExtentKind.hole);
  assert.equal(source.calls, 0);
  assert.ok(cache.startAt(i) >= 8192);
  // The whole tail is one hole now: another offset past EOF is a hit.
  const before = cache.stats();
  assert.equal(cache.kindAt(cache.lookup(5 * MiB)), ExtentKind.hole);
  assert.equal(cache.stats().misses, before.misses);
  assert.equal(cache.stats().hits, before.hits + 1);
});

Deno.test("extentCache.lookup() records holes so a second lookup in a hole is a hit", () => {
  const model = [
    { logical: 0, physical: 1 * MiB, length: 64 * KiB, flags: 0 },
    { logical: 512 * KiB, physical: 3 * MiB, length: 64 * KiB, flags: 1 },
  ];
  const source = new ModelSource(model);
  const cache = new ExtentCache(source, { fileSizeBytes: 576 * KiB, maxExtents: 16 });
  assert.equal(cache.kindAt(cache.lookup(100 * KiB)), ExtentKind.hole);
  const calls = source.calls;
  const misses = cache.stats().misses;
  assert.equal(cache.kindAt(cache.lookup(300 * KiB)), ExtentKind.hole);
  assert.equal(cache.kindAt(cache.lookup(0)), ExtentKind.direct);
  assert.equal(source.calls, calls);
  assert.equal(cache.stats().misses, misses);
});

Deno.test("extentCache.invalidate() makes the next lookup refill from the source", () => {
  const model: FiemapExtent[] = [{ logical: 0, physical: 1 * MiB, length: 1 * MiB, flags: 1 }];
  const source = new ModelSource(model);
  const cache = new ExtentCache(source, { fileSizeBytes: 1 * MiB, maxExtents: 64 });
  check(cache, model, 4096);
  // The file changes behind the cache: a punched hole and a new extent.
  source.extents = [
    { logical: 0, physical: 1 * MiB, length: 256 * KiB, flags: 0 },
    { logical: 512 * KiB, physical: 7 * MiB, length: 512 * KiB, flags: 1 },
  ];
  // Not invalidated yet: the cache still answers from what it knew (the reason invalidation exists).
  assert.equal(cache.physicalOf(cache.lookup(600 * KiB), 600 * KiB), 1 * MiB + 600 * KiB);
  const calls = source.calls;
  cache.invalidate(256 * KiB, 4096);
  check(cache, source.extents, 300 * KiB);
  check(cache, source.extents, 600 * KiB);
  check(cache, source.extents, 4096);
  assert.ok(source.calls > calls, "the source was asked again");
});

Deno.test("extentCache.invalidate() keeps the parts of a hole or an unwritten extent outside the range: writes into a sparse file cost no FIEMAP", () => {
  // [0, 1M) data, [1M, 9M) hole, [9M, 13M) unwritten, 13M..16M hole.
  const model: FiemapExtent[] = [
    { logical: 0, physical: 40 * MiB, length: 1 * MiB, flags: 0 },
    { logical: 9 * MiB, physical: 60 * MiB, length: 4 * MiB, flags: FIEMAP_EXTENT_UNWRITTEN },
  ];
  const source = new ModelSource(model);
  const cache = new ExtentCache(source, { fileSizeBytes: 16 * MiB, maxExtents: 64 });
  for (let off = 0; off < 16 * MiB; off += 64 * KiB) check(cache, model, off);
  // Writes through the file into the middle of the hole and of the unwritten extent allocate
  // (or convert) exactly their ranges.
  const written: FiemapExtent[] = [
    { logical: 0, physical: 40 * MiB, length: 1 * MiB, flags: 0 },
    { logical: 4 * MiB, physical: 80 * MiB, length: 256 * KiB, flags: 0 },
    { logical: 9 * MiB, physical: 60 * MiB, length: 1 * MiB, flags: FIEMAP_EXTENT_UNWRITTEN },
    { logical: 10 * MiB, physical: 61 * MiB, length: 512 * KiB, flags: 0 },
    {
      logical: 10 * MiB + 512 * KiB,
      physical: 61 * MiB + 512 * KiB,
      length: 2.5 * MiB,
      flags: FIEMAP_EXTENT_UNWRITTEN,
    },
  ];
  source.extents = written;
  cache.invalidate(4 * MiB, 256 * KiB);
  cache.invalidate(10 * MiB, 512 * KiB);
  // Outside the written ranges every answer is still right, and from the cache.
  const calls = source.calls;
  for (
    const off of [1 * MiB, 3 * MiB + 60 * KiB, 4 * MiB + 256 * KiB, 8 * MiB, 9 * MiB + 4 * KiB]
  ) {
    check(cache, written, off);
  }
  for (const off of [10 * MiB + 512 * KiB, 12 * MiB, 13 * MiB - 4 * KiB]) {
    check(cache, written, off);
  }
  assert.equal(source.calls, calls, "no FIEMAP outside what was written");
  // Inside them the cache asks again and learns the new extents.
  check(cache, written, 4 * MiB + 8 * KiB);
  check(cache, written, 10 * MiB + 100 * KiB);
  assert.ok(source.calls > calls, "the written ranges were mapped again");
  for (let off = 0; off < 16 * MiB; off += 32 * KiB) check(cache, written, off);
  // A direct extent touching a range is still forgotten whole.
  cache.invalidate(512 * KiB, 4096);
  const before = source.calls;
  check(cache, written, 0);
  assert.ok(source.calls > before, "the data extent was mapped again");
});

Deno.test("extentCache keeps at most maxExtents segments and stays correct", () => {
  const model = fragmentedModel(3000, 3);
  const cache = newCache(new ModelSource(model), { maxExtents: 64, windowBytes: 32 * KiB });
  const end = fileEnd(model);
  for (let n = 0; n < 5000; n++) {
    check(cache, model, Math.floor(Math.random() * end));
    assert.ok(cache.stats().extents <= 64, `${cache.stats().extents} segments cached`);
  }
  assert.ok(cache.stats().memoryBytes <= 64 * 64, "arrays sized by the bound");
});

Deno.test("extentCache merges one extent filled through several windows into one segment", () => {
  // One contiguous 1 MiB extent, seen through 64 KiB windows in a scattered order.
  const model = [{ logical: 0, physical: 5 * MiB, length: 1 * MiB, flags: 1 }];
  const source = new ModelSource(model);
  const cache = new ExtentCache(source, {
    fileSizeBytes: 1 * MiB,
    maxExtents: 64,
    windowBytes: 64 * KiB,
  });
  // Scattered first, so the merge has to happen on both sides of later fills.
  for (const w of [3, 7, 5, 0, 15, 1, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14]) {
    check(cache, model, w * 64 * KiB + 512);
  }
  assert.equal(cache.stats().extents, 1);
  // The one segment is the whole extent: where it starts and ends, its physical start, its kind.
  const i = cache.lookup(777 * KiB);
  assert.deepEqual(
    [cache.startAt(i), cache.endAt(i), cache.physicalOf(i, 0), cache.kindAt(i)],
    [0, 1 * MiB, 5 * MiB, ExtentKind.direct],
  );
});

Deno.test("extentCache does not merge neighbours that are not physically contiguous", () => {
  const model = [
    { logical: 0, physical: 1 * MiB, length: 64 * KiB, flags: 0 },
    { logical: 64 * KiB, physical: 9 * MiB, length: 64 * KiB, flags: 1 },
  ];
  const cache = new ExtentCache(new ModelSource(model), {
    fileSizeBytes: 128 * KiB,
    maxExtents: 16,
    windowBytes: 64 * KiB,
  });
  check(cache, model, 70 * KiB);
  check(cache, model, 10 * KiB);
  assert.equal(cache.stats().extents, 2);
});

Deno.test("extentCache classifies extents not aligned to the device block as via-file", () => {
  const model = [{ logical: 0, physical: 1 * MiB + 512, length: 8 * KiB, flags: 1 }];
  const cache = new ExtentCache(new ModelSource(model), {
    fileSizeBytes: 8 * KiB,
    maxExtents: 16,
    blockSize: 4096,
  });
  assert.equal(cache.kindAt(cache.lookup(0)), ExtentKind.viaFile);
});

Deno.test("extentCache.resize() forgets the tail and maps the grown file", () => {
  const source = new ModelSource([{ logical: 0, physical: 1 * MiB, length: 64 * KiB, flags: 1 }]);
  const cache = new ExtentCache(source, { fileSizeBytes: 64 * KiB, maxExtents: 16 });
  assert.equal(cache.kindAt(cache.lookup(100 * KiB)), ExtentKind.hole);
  source.extents.push({ logical: 64 * KiB, physical: 2 * MiB, length: 64 * KiB, flags: 1 });
  cache.resize(128 * KiB);
  check(cache, source.extents, 100 * KiB);
});

Deno.test("extentCache stays correct with >4096 segments cached (bucket directory)", () => {
  const model = fragmentedModel(12_000, 11);
  const source = new ModelSource(model);
  const cache = newCache(source, { windowBytes: 1 * MiB, maxExtentsPerFill: 10_000 });
  const end = fileEnd(model);
  for (let off = 0; off < end; off += 16 * KiB) cache.lookup(off); // fill everything
  assert.ok(cache.stats().extents > 4096, `${cache.stats().extents} segments cached`);
  const { misses, fiemapCalls } = cache.stats();
  for (let n = 0; n < 20_000; n++) check(cache, model, Math.floor(Math.random() * end));
  assert.equal(cache.stats().misses, misses, "every lookup in a filled file is a hit");
  assert.equal(cache.stats().fiemapCalls, fiemapCalls);
  for (let n = 0; n < 20_000; n++) {
    const off = Math.floor(Math.random() * end);
    check(cache, model, off);
    // Invalidate now and then, so the directory must follow inserts and removals.
    if (n % 1000 === 0) cache.invalidate(off, 200 * KiB);
  }
});

// --- the cache over real FIEMAP, on real ext4 and xfs -------------------------------------------

const root = Deno.uid() === 0;

for (const kind of ["ext4", "xfs"] as const) {
  Deno.test({
    name: `extentCache over FIEMAP on ${kind}: every mapped block holds the file's bytes on the ` +
      `device, and a punched or rewritten range is re-mapped after invalidate()`,
    ignore: !root,
    async fn() {
      await withFilesystem(kind, {}, async (fs) => {
        const path = `${fs.dir}/frag`;
        // Fragmented and sparse: 64 KiB chunks, every third one left a hole, fsync in between.
        for (let i = 0; i < 48; i++) {
          if (i % 3 === 2) continue;
          await writeAt(path, i * 64 * KiB, patternBytes(64 * KiB, 500 + i));
          await writeAt(`${fs.dir}/other`, i * 64 * KiB, patternBytes(64 * KiB, 900 + i));
        }
        await run("truncate", ["-s", `${48 * 64}K`, path]);
        const size = 48 * 64 * KiB;
        const fd = open(path, O_RDONLY);
        try {
          const cache = new ExtentCache(fiemapSource(fd, { path, sync: true }), {
            fileSizeBytes: size,
            maxExtents: 1024,
            windowBytes: 256 * KiB, // several windows over the file
          });
          const file = await Deno.readFile(path);
          // Every 4 KiB block: direct → the device holds the bytes; hole → the file reads zeros.
          for (let off = 0; off < size; off += 4 * KiB) {
            const i = cache.lookup(off);
            const want = file.subarray(off, off + 4 * KiB);
            if (cache.kindAt(i) === ExtentKind.direct) {
              const raw = await readDirect(fs.device, cache.physicalOf(i, off), 4 * KiB);
              assert.deepEqual(raw, want, `device bytes for file offset ${off}`);
            } else {
              // xfs may preallocate into the holes between appends: unwritten, also zeros.
              const k = cache.kindAt(i);
              assert.ok(k === ExtentKind.hole || k === ExtentKind.unwritten, `kind ${k} at ${off}`);
              assert.ok(want.every((b) => b === 0), `hole at ${off} reads zeros`);
            }
          }
          // Punch a written chunk and fill a hole, through the filesystem, then invalidate.
          await run("fallocate", [
            "--punch-hole",
            "-o",
            `${3 * 64 * KiB}`,
            "-l",
            `${64 * KiB}`,
            path,
          ]);
          await writeAt(path, 2 * 64 * KiB, patternBytes(64 * KiB, 77));
          cache.invalidate(2 * 64 * KiB, 2 * 64 * KiB);
          const after = await Deno.readFile(path);
          for (let off = 2 * 64 * KiB; off < 4 * 64 * KiB; off += 4 * KiB) {
            const i = cache.lookup(off);
            const want = after.subarray(off, off + 4 * KiB);
            if (off < 3 * 64 * KiB) {
              assert.equal(cache.kindAt(i), ExtentKind.direct, `rewritten at ${off}`);
              const raw = await readDirect(fs.device, cache.physicalOf(i, off), 4 * KiB);
              assert.deepEqual(raw, want, `device bytes for rewritten offset ${off}`);
            } else {
              assert.equal(cache.kindAt(i), ExtentKind.hole, `punched at ${off}`);
            }
          }
        } finally {
          close(fd);
        }
      });
    },
  });
}
