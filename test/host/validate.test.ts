// The per-queue IO buffer bound: depth × largest request, checked over every allowed depth.

import assert from "node:assert/strict";
import {
  DEPTH_DEFAULT,
  DEPTH_MAX,
  DEPTH_MIN,
  MAX_IO_BYTES_CEILING,
  MAX_IO_BYTES_FLOOR,
  maxIoBytesForDepth,
  QUEUE_BUFFER_BUDGET_BYTES,
} from "../../lib/validate.ts";

const KIB = 1024;
const MIB = 1024 * KIB;

Deno.test("the largest request shrinks with depth so that a queue's buffers stay bounded", () => {
  // ublk's default 512 KiB is kept at the default depth, and the worst case is far from 2 GiB.
  assert.equal(maxIoBytesForDepth(DEPTH_DEFAULT), 512 * KIB);
  assert.equal(maxIoBytesForDepth(DEPTH_MAX), 64 * KIB);
  assert.equal(DEPTH_MAX * maxIoBytesForDepth(DEPTH_MAX), 256 * MIB);
  let previous = Infinity;
  for (let depth = DEPTH_MIN; depth <= DEPTH_MAX; depth++) {
    const bytes = maxIoBytesForDepth(depth);
    assert.ok(bytes >= MAX_IO_BYTES_FLOOR && bytes <= MAX_IO_BYTES_CEILING, `depth ${depth}`);
    assert.equal(bytes & (bytes - 1), 0, `depth ${depth}: ${bytes} is a power of two`);
    assert.ok(bytes <= previous, `depth ${depth}: never grows with depth`);
    previous = bytes;
    // Within the budget unless already at the floor; and never smaller than the budget allows.
    if (bytes > MAX_IO_BYTES_FLOOR) assert.ok(depth * bytes <= QUEUE_BUFFER_BUDGET_BYTES);
    if (bytes < MAX_IO_BYTES_CEILING) {
      assert.ok(depth * bytes * 2 > QUEUE_BUFFER_BUDGET_BYTES, `depth ${depth}: not shrunk more`);
    }
  }
});
