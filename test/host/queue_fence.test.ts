// The punch fence across queues (lib/queue_fence.ts): two engines of one device, each with its own
// ring and extent cache, on one shared buffer, race a DISCARD against a direct write over the same
// range of a real ext4 file. Oracles: `filefrag` (which blocks the file owns at the moment the
// write reaches the kernel), the file read through the filesystem, the loop device read at the
// old physical offset. Without the fence the punch frees the blocks first and the write lands on
// blocks the file no longer owns: these tests fail (tried: with `othersDirectOverlap` and
// `punchAnnounced` returning false, both fail).

import assert from "node:assert/strict";
import { UBLK_IO_OP_DISCARD, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from "../../ffi/ublk_cmd.ts";
import { Counter, createSharedState } from "../../lib/queue_state.ts";
import { Harness } from "./engine_harness.ts";
import {
  filefrag,
  isRoot,
  patternBytes,
  readDirect,
  withFilesystem,
  writeAt,
} from "./fs_fixtures.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const FILE_BYTES = 4 * MiB;
/** The raced range: 256 KiB at 1 MiB, inside one extent of the fully written file. */
const RANGE = { offset: MiB, length: 256 * KiB };

/** Queue 0 and queue 1 of one device on `file`, their caches warm over the range. */
function twoQueues(file: string, device: string): [Harness, Harness] {
  const sab = createSharedState(2);
  const q0 = new Harness(file, device, FILE_BYTES, { queueId: 0, queues: 2, sab });
  const q1 = new Harness(file, device, FILE_BYTES, { queueId: 1, queues: 2, sab });
  for (const q of [q0, q1]) {
    assert.equal(q.serve(0, UBLK_IO_OP_READ, RANGE.offset, RANGE.length), RANGE.length);
  }
  return [q0, q1];
}

/** The device offset of file offset `offset`, from filefrag; null where the file has no block. */
async function physicalOf(file: string, offset: number): Promise<number | null> {
  const f = await filefrag(file);
  for (const e of f.extents) {
    const start = e.logicalBlock * f.blockSize;
    if (offset >= start && offset < start + e.lengthBlocks * f.blockSize) {
      return e.physicalBlock * f.blockSize + (offset - start);
    }
  }
  return null;
}

Deno.test({
  name: "a discard on one queue waits for another queue's direct write over its range; the write " +
    "lands on blocks the file still owns, then the punch frees them",
  ignore: !isRoot(),
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      await writeAt(file, 0, patternBytes(FILE_BYTES, 1));
      const owned = await physicalOf(file, RANGE.offset);
      assert.ok(owned !== null);
      const [q0, q1] = twoQueues(file, fs.device);
      try {
        // Queue 0 maps a direct write over the range; its SQE is prepared, not yet submitted.
        const data = patternBytes(RANGE.length, 2);
        q0.fill(1, data);
        q0.post(1, UBLK_IO_OP_WRITE, RANGE.offset, RANGE.length);
        assert.equal(q0.counter(Counter.bytesWrittenDirect), RANGE.length, "mapped directly");
        // Queue 1 gets a discard of the same range and runs its loop for a while.
        q1.post(1, UBLK_IO_OP_DISCARD, RANGE.offset, RANGE.length);
        for (let i = 0; i < 50; i++) q1.turn(false);
        assert.ok(!q1.done.has(1), "the discard waits while the direct write is in flight");
        // The write reaches the kernel now: the file must still own the blocks it targets.
        assert.equal(
          await physicalOf(file, RANGE.offset),
          owned,
          "the blocks are still the file's",
        );
        while (!q0.done.has(1)) q0.turn(true);
        assert.equal(q0.done.get(1), RANGE.length);
        while (!q1.done.has(1)) q1.turn(true);
        assert.equal(q1.done.get(1), 0);
        // The write landed while the blocks were the file's; the punch came after it.
        assert.deepEqual(await readDirect(fs.device, owned!, RANGE.length), data);
        assert.equal(await physicalOf(file, RANGE.offset), null, "the range is a hole now");
        assert.deepEqual(
          await readDirect(file, RANGE.offset, RANGE.length),
          new Uint8Array(RANGE.length),
        );
      } finally {
        q0.close();
        q1.close();
      }
    });
  },
});

Deno.test({
  name: "a write on one queue over a range another queue is punching goes through the file, " +
    "not to the blocks being freed",
  ignore: !isRoot(),
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      await writeAt(file, 0, patternBytes(FILE_BYTES, 3));
      const [q0, q1] = twoQueues(file, fs.device);
      try {
        // Queue 1's punch starts (announced, its fallocate prepared but not yet submitted).
        q1.post(1, UBLK_IO_OP_DISCARD, RANGE.offset, RANGE.length);
        assert.ok(!q1.done.has(1));
        const direct = q0.counter(Counter.bytesWrittenDirect);
        const data = patternBytes(RANGE.length, 4);
        q0.fill(1, data);
        q0.post(1, UBLK_IO_OP_WRITE, RANGE.offset, RANGE.length);
        assert.equal(q0.counter(Counter.bytesWrittenDirect), direct, "nothing to the device");
        assert.equal(q0.counter(Counter.bytesWrittenFile), RANGE.length, "through the file");
        while (!q1.done.has(1)) q1.turn(true);
        while (!q0.done.has(1)) q0.turn(true);
        assert.equal(q0.done.get(1), RANGE.length);
        assert.equal(q1.done.get(1), 0);
        // Whichever the filesystem ordered first, the range holds the write's data or zeros,
        // never a mix: both went through the file.
        const now = await readDirect(file, RANGE.offset, RANGE.length);
        assert.ok(
          now.every((b, i) => b === data[i]) || now.every((b) => b === 0),
          "the range is the write's data or zeros",
        );
      } finally {
        q0.close();
        q1.close();
      }
    });
  },
});
