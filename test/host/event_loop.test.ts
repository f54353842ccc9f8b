// The request engine of lib/event_loop.ts without the ublk hop: requests are written into a
// descriptor area by the test (as the ublk driver would), served on a real io_uring against a
// real ext4 on a loop device, and completed into a recorder instead of COMMIT_AND_FETCH.
// Oracles: the file read with O_DIRECT through the filesystem (`dd iflag=direct`), `filefrag`,
// the loop device read at the extent's physical offset, `du` for allocation.

import assert from "node:assert/strict";
import { EAGAIN, EINTR, EIO, ENOSPC } from "../../ffi/errno.ts";
import {
  UBLK_IO_F_FUA,
  UBLK_IO_F_NOUNMAP,
  UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_FLUSH,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
  UBLK_IO_OP_WRITE_ZEROES,
} from "../../ffi/ublk_cmd.ts";
import { Counter } from "../../lib/queue_state.ts";
import { SEG_MAX } from "../../lib/request.ts";
import type { CopyBuffers } from "../../lib/request_data.ts";
import { DEPTH, Harness, MAX_IO } from "./engine_harness.ts";
import {
  filefrag,
  isRoot,
  patternBytes,
  readDirect,
  run,
  withFilesystem,
  writeAt,
} from "./fs_fixtures.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

const root = isRoot();

Deno.test({
  name: "engine reads data, holes and unwritten ranges in one request exactly as the file reads",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/mixed`;
      // [0,256K) data, [256K,512K) hole, [512K,768K) unwritten, [768K,1M) data.
      await run("truncate", ["-s", "1M", file]);
      await writeAt(file, 0, patternBytes(256 * KiB, 1));
      await run("fallocate", ["-o", String(512 * KiB), "-l", String(256 * KiB), file]);
      await writeAt(file, 768 * KiB, patternBytes(256 * KiB, 2));
      const h = new Harness(file, fs.device, MiB);
      try {
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 0, MiB), MiB);
        assert.deepEqual(h.buffer(0, MiB), await readDirect(file, 0, MiB));
        // The two data runs came from the device, the hole and the unwritten range are zeros.
        assert.equal(h.counter(Counter.bytesReadDirect), 512 * KiB);
        assert.equal(h.counter(Counter.bytesReadZero), 512 * KiB);
        assert.equal(h.counter(Counter.bytesReadFile), 0);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine writes into a hole through the file and over data on the device",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      await run("truncate", ["-s", "2M", file]);
      await writeAt(file, 0, patternBytes(MiB, 3));
      const before = await filefrag(file);
      const h = new Harness(file, fs.device, 2 * MiB);
      try {
        // Over written data: straight to the device at the extent's physical offset.
        const a = patternBytes(128 * KiB, 4);
        h.fill(1, a);
        assert.equal(h.serve(1, UBLK_IO_OP_WRITE, 64 * KiB, a.length), a.length);
        assert.equal(h.counter(Counter.bytesWrittenDirect), a.length);
        // Into the hole: through the file, which allocates.
        const b = patternBytes(256 * KiB, 5);
        h.fill(2, b);
        assert.equal(h.serve(2, UBLK_IO_OP_WRITE, 1536 * KiB, b.length, UBLK_IO_F_FUA), b.length);
        assert.equal(h.counter(Counter.bytesWrittenFile), b.length);
        assert.equal(h.serve(3, UBLK_IO_OP_FLUSH, 0, 0), 0);

        assert.deepEqual(await readDirect(file, 64 * KiB, a.length), a);
        assert.deepEqual(await readDirect(file, 1536 * KiB, b.length), b);
        // The block under the direct write is the one FIEMAP reported before it.
        const ext = before.extents[0]!;
        const phys = ext.physicalBlock * before.blockSize + 64 * KiB;
        assert.deepEqual(await readDirect(fs.device, phys, a.length), a);
        const after = await filefrag(file);
        assert.ok(after.extents.length > before.extents.length, "the hole got blocks");
        // A read of the new range is served from the fresh mapping: the data, not zeros.
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 1536 * KiB, b.length), b.length);
        assert.deepEqual(h.buffer(0, b.length), b);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine without the filesystem's device (not eligible) serves everything through the file",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      await run("truncate", ["-s", "1M", file]);
      await writeAt(file, 0, patternBytes(256 * KiB, 11));
      const h = new Harness(file, fs.device, MiB, { withoutDevice: true });
      try {
        // Data and hole alike are read through the file (no extent map to read zeros from).
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 0, 512 * KiB), 512 * KiB);
        const want = new Uint8Array(512 * KiB);
        want.set(patternBytes(256 * KiB, 11));
        assert.deepEqual(h.buffer(0, 512 * KiB), want);
        const b = patternBytes(128 * KiB, 12);
        h.fill(1, b);
        assert.equal(h.serve(1, UBLK_IO_OP_WRITE, 64 * KiB, b.length), b.length);
        assert.equal(h.serve(2, UBLK_IO_OP_FLUSH, 0, 0), 0);
        assert.deepEqual(await readDirect(file, 64 * KiB, b.length), b);
        assert.equal(h.counter(Counter.bytesReadFile), 512 * KiB);
        assert.equal(h.counter(Counter.bytesWrittenFile), b.length);
        assert.equal(h.counter(Counter.bytesReadDirect) + h.counter(Counter.bytesWrittenDirect), 0);
        assert.equal(h.counter(Counter.bytesReadZero), 0);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine fails a request past the end of the file with EIO and keeps serving",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/small`;
      await writeAt(file, 0, patternBytes(64 * KiB, 6));
      const h = new Harness(file, fs.device, 64 * KiB);
      try {
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 60 * KiB, 8 * KiB), -EIO);
        assert.equal(h.counter(Counter.errors), 1);
        assert.equal(h.counter(Counter.errorsEio), 1);
        const last = h.engine.shared.lastError();
        assert.equal(last?.errno, "EIO");
        assert.equal(last?.op, "read");
        assert.equal(last?.offsetBytes, 60 * KiB);
        assert.equal(last?.path, "server", "refused before any backend IO");
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 0, 64 * KiB), 64 * KiB);
        assert.deepEqual(h.buffer(0, 64 * KiB), patternBytes(64 * KiB, 6));
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine fails a write the filesystem cannot allocate with ENOSPC, counts it, keeps serving",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", { sizeMiB: 32 }, async (fs) => {
      // A sparse file twice the size of the filesystem: writes into its holes allocate.
      const file = `${fs.dir}/sparse`;
      const size = 64 * MiB;
      await run("truncate", ["-s", String(size), file]);
      const h = new Harness(file, fs.device, size);
      try {
        let failedAt = -1;
        for (let off = 0; off < size; off += MiB) {
          h.fill(0, patternBytes(MiB, off / MiB));
          const res = h.serve(0, UBLK_IO_OP_WRITE, off, MiB);
          if (res < 0) {
            assert.equal(res, -ENOSPC, `write at ${off}`);
            failedAt = off;
            break;
          }
          assert.equal(res, MiB);
        }
        assert.ok(failedAt > 0, "the filesystem ran out of space before the file was full");
        assert.equal(h.counter(Counter.errors), 1);
        assert.equal(h.counter(Counter.errorsEnospc), 1);
        assert.equal(h.counter(Counter.errorsEio), 0);
        const last = h.engine.shared.lastError();
        assert.equal(last?.errno, "ENOSPC");
        assert.equal(last?.op, "write");
        assert.equal(last?.offsetBytes, failedAt);
        assert.equal(last?.path, "file");
        // Still serving: what was acknowledged reads back, through the filesystem too.
        assert.equal(h.serve(1, UBLK_IO_OP_READ, 0, MiB), MiB);
        assert.deepEqual(h.buffer(1, MiB), patternBytes(MiB, 0));
        assert.deepEqual(
          await readDirect(file, failedAt - MiB, MiB),
          patternBytes(MiB, failedAt / MiB - 1),
        );
        assert.equal(h.serve(2, UBLK_IO_OP_FLUSH, 0, 0), 0);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine discard punches the range in the file: it reads as zeros and frees its blocks",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      await writeAt(file, 0, patternBytes(MiB, 7));
      const h = new Harness(file, fs.device, MiB);
      try {
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 0, MiB), MiB); // caches the mapping
        assert.equal(h.serve(1, UBLK_IO_OP_DISCARD, 256 * KiB, 512 * KiB), 0);
        const after = await readDirect(file, 0, MiB);
        assert.deepEqual(after.subarray(256 * KiB, 768 * KiB), new Uint8Array(512 * KiB));
        assert.deepEqual(after.subarray(0, 256 * KiB), patternBytes(MiB, 7).subarray(0, 256 * KiB));
        const du = Number((await run("du", ["-k", file])).stdout.split(/\s/)[0]);
        assert.equal(du, 512, "512 KiB stay allocated");
        // The engine's own view follows: the punched range reads as zeros, not the old blocks.
        assert.equal(h.serve(2, UBLK_IO_OP_READ, 0, MiB), MiB);
        assert.deepEqual(h.buffer(2, MiB), after);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine zeroes and discards partial filesystem blocks without leaving page-cache " +
    "writeback that would overwrite later direct writes",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      const old = patternBytes(MiB, 9);
      // Written through the page cache, which keeps the (clean) pages.
      await writeAt(file, 0, old);
      const h = new Harness(file, fs.device, MiB);
      try {
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 0, MiB), MiB); // caches the mapping
        // Direct writes over [4K, 16K): the file's cached pages there are now stale.
        const fresh = patternBytes(12 * KiB, 10);
        h.fill(1, fresh);
        assert.equal(h.serve(1, UBLK_IO_OP_WRITE, 4 * KiB, 12 * KiB), 12 * KiB);
        assert.equal(h.counter(Counter.bytesWrittenDirect), 12 * KiB, "written directly");
        // Write-zeroes over [5K, 13K) and a discard over [21K, 27K): for a partial 4 KiB block
        // ext4 zeroes the rest of the cached page and writes the page back, stale parts too.
        assert.equal(h.serve(2, UBLK_IO_OP_WRITE_ZEROES, 5 * KiB, 8 * KiB, UBLK_IO_F_NOUNMAP), 0);
        assert.equal(h.serve(2, UBLK_IO_OP_DISCARD, 21 * KiB, 6 * KiB), 0);
        await run("sh", ["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"]);
        const want = old.slice(0, 32 * KiB);
        want.set(fresh, 4 * KiB);
        want.fill(0, 5 * KiB, 13 * KiB); // the discard's partial blocks are left alone
        assert.deepEqual(await readDirect(file, 0, 32 * KiB), want);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine splits a read over more extents than one batch of segments",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/frag`;
      const other = `${fs.dir}/other`;
      // Interleave two files 4 KiB at a time, so `frag` has one extent per 4 KiB block.
      const blocks = SEG_MAX + 44;
      const data = patternBytes(blocks * 4 * KiB, 8);
      for (let i = 0; i < blocks; i++) {
        await writeAt(file, i * 4 * KiB, data.subarray(i * 4 * KiB, (i + 1) * 4 * KiB));
        await writeAt(other, i * 4 * KiB, patternBytes(4 * KiB, i));
      }
      const frag = await filefrag(file);
      assert.ok(frag.extents.length > SEG_MAX, `${frag.extents.length} extents`);
      const size = Math.min(MAX_IO, blocks * 4 * KiB);
      const h = new Harness(file, fs.device, blocks * 4 * KiB);
      try {
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 0, size), size);
        assert.deepEqual(h.buffer(0, size), data.subarray(0, size));
        assert.equal(h.counter(Counter.bytesReadDirect), size);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine with registered buffers (fixedBuffers) reads and writes every tag's bytes",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      const data = patternBytes(2 * MiB, 9);
      await writeAt(file, 0, data);
      const h = new Harness(file, fs.device, 2 * MiB, { fixedBuffers: true });
      try {
        assert.ok((h.engine.data as CopyBuffers).fixed, "the buffers were registered");
        // Every tag, so a wrong buffer index shows (READ_FIXED outside its buffer is EFAULT).
        for (let tag = 0; tag < DEPTH; tag++) {
          const at = tag * 256 * KiB;
          assert.equal(h.serve(tag, UBLK_IO_OP_READ, at, 256 * KiB), 256 * KiB);
          assert.deepEqual(h.buffer(tag, 256 * KiB), data.subarray(at, at + 256 * KiB));
          const b = patternBytes(64 * KiB, 10 + tag);
          h.fill(tag, b);
          assert.equal(h.serve(tag, UBLK_IO_OP_WRITE, MiB + at, b.length), b.length);
          assert.deepEqual(await readDirect(file, MiB + at, b.length), b);
        }
        assert.equal(h.counter(Counter.bytesReadFile) + h.counter(Counter.bytesWrittenFile), 0);
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "EINTR, EAGAIN and short transfers from the backend are retried, not failed",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      await run("truncate", ["-s", "2M", file]);
      await writeAt(file, 0, patternBytes(MiB, 6));
      const h = new Harness(file, fs.device, 2 * MiB);
      try {
        // The first completion of each request is turned into `fault`; every later one is real.
        const faultFirst = (fault: (res: number) => number) => {
          let fired = 0;
          h.rewrite = (_ud, res) => fired++ === 0 ? fault(res) : res;
          return () => fired;
        };
        const cases: Array<[string, (res: number) => number]> = [
          ["EINTR", () => -EINTR],
          ["EAGAIN", () => -EAGAIN],
          // Half of the bytes "transferred": the engine must issue the rest itself.
          ["short", (res) => res > 4096 ? Math.floor(res / 2 / 512) * 512 : res],
        ];
        let retries = h.counter(Counter.retries);
        for (const [what, fault] of cases) {
          // A direct write over data, a write into the hole (through the file), a direct read.
          const data = patternBytes(64 * KiB, what.length);
          h.fill(1, data);
          let fired = faultFirst(fault);
          assert.equal(h.serve(1, UBLK_IO_OP_WRITE, 128 * KiB, data.length), data.length, what);
          assert.ok(fired() >= 2, `${what}: the write was re-issued`);
          h.fill(2, data);
          fired = faultFirst(fault);
          assert.equal(h.serve(2, UBLK_IO_OP_WRITE, 1536 * KiB, data.length), data.length, what);
          assert.ok(fired() >= 2, `${what}: the hole write was re-issued`);
          fired = faultFirst(fault);
          assert.equal(h.serve(0, UBLK_IO_OP_READ, 128 * KiB, data.length), data.length, what);
          assert.ok(fired() >= 2, `${what}: the read was re-issued`);
          assert.deepEqual(h.buffer(0, data.length), data, `${what}: the read's bytes`);
          // Flush: fdatasync of the device and of the file; only EINTR/EAGAIN apply.
          if (what !== "short") {
            fired = faultFirst(fault);
            assert.equal(h.serve(3, UBLK_IO_OP_FLUSH, 0, 0), 0, `${what}: flush`);
            assert.ok(fired() >= 2, `${what}: the flush was re-issued`);
          }
          h.rewrite = null;
          assert.deepEqual(await readDirect(file, 128 * KiB, data.length), data, what);
          assert.deepEqual(await readDirect(file, 1536 * KiB, data.length), data, what);
          const now = h.counter(Counter.retries);
          assert.ok(now >= retries + 3, `${what}: retries counted (${retries} -> ${now})`);
          retries = now;
        }
        assert.equal(h.counter(Counter.errorsOther) + h.counter(Counter.errorsEio), 0, "no errors");
      } finally {
        h.close();
      }
    });
  },
});
