// Tests of ffi/io_uring.ts against the real kernel of the host (root; io_uring enabled).
// Oracles are things io_uring did not produce: plain pread/pwrite/fallocate through libc,
// Deno's file APIs, stat(2) sizes and block counts, eventfd counters read with read(2), and the
// raw bytes of a kernel loop device under a freshly made ext4 (for fsync, fdatasync, RWF_DSYNC).

import assert from "node:assert/strict";
import process from "node:process";
import { QueueWait, setupQueueRing } from "../../lib/queue_ring.ts";
import {
  errnoOfCqe,
  IORING_CQE_BUFFER_SHIFT,
  IORING_CQE_F_BUF_MORE,
  IORING_CQE_F_BUFFER,
  IORING_FEAT_NODROP,
  IORING_OP_URING_CMD,
  IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_CQE32,
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SINGLE_ISSUER,
  IORING_SETUP_SQE128,
  IORING_SETUP_TASKRUN_FLAG,
  IOSQE_FIXED_FILE,
  IOU_PBUF_RING_INC,
  IoUring,
  ProvidedBufferRing,
  RWF_DSYNC,
} from "../../ffi/io_uring.ts";
import {
  AlignedBuffer,
  close,
  EFD_CLOEXEC,
  eventfd,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  fallocate,
  fstat,
  libc,
  O_CREAT,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  open,
  pread,
  pwrite,
} from "../../ffi/libc.ts";
import { EBADF, EFAULT, EINVAL, ENOBUFS, EOPNOTSUPP, SyscallError } from "../../ffi/errno.ts";

const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Fixtures

function run(cmd: string, ...args: string[]): string {
  const out = new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).outputSync();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr).trim()}`);
  }
  return new TextDecoder().decode(out.stdout);
}

interface Ext4 {
  /** Mount point of a fresh ext4 (supports O_DIRECT, unlike tmpfs). */
  dir: string;
  /** The kernel loop device under it: an oracle for what reached the "disk". */
  loopDev: string;
}

/**
 * A 64 MiB ext4 image on a kernel loop device (buffered, so the image's page cache holds what
 * the filesystem sent down), mounted in a temp dir; everything is undone in `finally`.
 */
async function withExt4(fn: (fs: Ext4) => Promise<void> | void): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "fastloop-uring-" });
  let loopDev = "";
  let mounted = false;
  const dir = `${root}/mnt`;
  try {
    const image = `${root}/ext4.img`;
    const f = await Deno.open(image, { create: true, write: true });
    await f.truncate(64 * MiB);
    f.close();
    run("mkfs.ext4", "-q", "-F", "-b", "4096", image);
    loopDev = run("losetup", "--find", "--show", image).trim();
    await Deno.mkdir(dir);
    run("mount", "-t", "ext4", loopDev, dir);
    mounted = true;
    await fn({ dir, loopDev });
  } finally {
    if (mounted) await umountPatiently(dir);
    if (loopDev) run("losetup", "-d", loopDev);
    await Deno.remove(root, { recursive: true });
  }
}

/** umount; a closed ring drops its file references from a kernel work item a moment later. */
async function umountPatiently(dir: string): Promise<void> {
  for (let attempt = 0;; attempt++) {
    try {
      run("umount", dir);
      return;
    } catch (e) {
      if (attempt >= 50) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** Physical byte offset of a file's first extent, from `filefrag -v` (not from fastloop). */
function firstExtentPhysicalBytes(path: string): number {
  const out = run("filefrag", "-v", path);
  const blockSize = Number(/blocks? of (\d+) bytes/.exec(out)?.[1]);
  const row = /^\s*0:\s+\d+\.\.\s*\d+:\s+(\d+)\.\./m.exec(out);
  assert.ok(row && blockSize > 0, `filefrag output not understood:\n${out}`);
  return Number(row[1]) * blockSize;
}

/** `length` bytes at `offset` of a block device, read with O_DIRECT (no page cache of ours). */
function readDeviceDirect(dev: string, offset: number, length: number): Uint8Array {
  const fd = open(dev, O_RDONLY | O_DIRECT);
  const buf = new AlignedBuffer(length);
  try {
    assert.equal(pread(fd, buf.pointer, length, offset), length);
    return buf.bytes.slice(0, length);
  } finally {
    buf.free();
    close(fd);
  }
}

function randomBytes(n: number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(b.subarray(i, Math.min(n, i + 65536)));
  return b;
}

/**
 * Byte-for-byte equality with a short message (node's deepEqual would render a diff of every
 * byte, which for megabytes takes minutes and gigabytes).
 */
function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      assert.fail(`${what}: first difference at byte ${i}: ${actual[i]} != ${expected[i]}`);
    }
  }
}

interface Cqe {
  userData: number;
  res: number;
  flags: number;
}

/** Sleeps the calling thread for `ms` (synchronously: the test helpers below are sync). */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * Submits what is prepared, waits for `n` completions and returns them (test helper). Polls
 * with getEvents() (which also runs deferred task work) instead of blocking in the kernel, and
 * gives up after 10 s without progress, so a broken ring fails the test instead of hanging it.
 */
function waitCqes(ring: IoUring, n: number): Cqe[] {
  const cqes: Cqe[] = [];
  let lastProgress = performance.now();
  for (let polls = 0; cqes.length < n; polls++) {
    ring.getEvents();
    const got = ring.reapCqes((userData, res, flags) => cqes.push({ userData, res, flags }));
    if (got > 0) {
      lastProgress = performance.now();
      polls = 0;
    } else if (performance.now() - lastProgress > 10_000) {
      assert.fail(`no completion within 10 s (${cqes.length} of ${n} arrived)`);
    } else if (polls > 1000) {
      sleepSync(1); // a slow completion (fsync on the loop device): stop spinning
    }
  }
  return cqes;
}

function withRing(
  entries: number,
  opts: Parameters<typeof IoUring.setup>[1],
  fn: (ring: IoUring) => Promise<void> | void,
): () => Promise<void> {
  return async () => {
    const ring = IoUring.setup(entries, opts);
    try {
      await fn(ring);
    } finally {
      ring.close();
    }
  };
}

// ---------------------------------------------------------------------------------------------
// Setup and the ring mechanics

Deno.test(
  "IoUring.setup() with SQE128|CQE32 gives 128-byte SQEs and 32-byte CQEs that round-trip",
  withRing(8, { sqe128: true, cqe32: true }, (ring) => {
    assert.equal(ring.sqeSize, 128);
    assert.equal(ring.cqeSize, 32);
    assert.equal(
      ring.setupFlags & (IORING_SETUP_SQE128 | IORING_SETUP_CQE32),
      IORING_SETUP_SQE128 | IORING_SETUP_CQE32,
    );
    // Every slot: with a wrong stride the kernel would read a garbage opcode from slot 1 on, and
    // the user_data read back at a wrong CQE stride would not match.
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 8; i++) ring.prepNop(ring.sqe(), 1000 * round + i);
      const cqes = waitCqes(ring, 8);
      assert.deepEqual(
        cqes.map((c) => [c.userData, c.res]),
        Array.from({ length: 8 }, (_, i) => [1000 * round + i, 0]),
      );
    }
  }),
);

Deno.test(
  "IoUring with SINGLE_ISSUER|DEFER_TASKRUN (the queue rings' setup) completes through submitAndWait",
  withRing(
    8,
    { sqe128: true, cqe32: true, flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN },
    (ring) => {
      const efd = eventfd(0, EFD_CLOEXEC);
      const buf = new AlignedBuffer(4096);
      try {
        ring.prepReadEventfd(ring.sqe(), efd, buf.address, 1);
        ring.prepNop(ring.sqe(), 2);
        assert.equal(ring.submit(), 2);
        libc.write(efd, new Uint8Array(new BigUint64Array([7n]).buffer), 8n);
        // Written before the wait, so submitAndWait(2) cannot block for ever; with DEFER_TASKRUN
        // the read's completion is task work that only such a GETEVENTS enter runs.
        const cqes: Cqe[] = [];
        for (let i = 0; cqes.length < 2; i++) {
          assert.ok(i < 100, `submitAndWait(2) keeps returning with ${cqes.length} completions`);
          assert.equal(ring.submitAndWait(2 - cqes.length), 0); // nothing left to submit
          ring.reapCqes((userData, res, flags) => cqes.push({ userData, res, flags }));
        }
        cqes.sort((a, b) => a.userData - b.userData);
        assert.deepEqual(cqes.map((c) => [c.userData, c.res]), [[1, 8], [2, 0]]);
        assert.equal(new DataView(buf.bytes.buffer).getBigUint64(0, true), 7n);
      } finally {
        buf.free();
        close(efd);
      }
    },
  ),
);

Deno.test(
  "IoUring NOP returns user_data unchanged up to 2^53-1",
  withRing(16, {}, (ring) => {
    const values = [
      0,
      1,
      0xffffffff,
      2 ** 32,
      2 ** 32 + 1,
      2 ** 40 + 12345,
      2 ** 52 + 7,
      2 ** 53 - 2,
      2 ** 53 - 1,
      Math.floor(Math.random() * 2 ** 53),
    ];
    for (const v of values) ring.prepNop(ring.sqe(), v);
    const got = waitCqes(ring, values.length).map((c) => c.userData);
    assert.deepEqual(got.sort((a, b) => a - b), [...values].sort((a, b) => a - b));
  }),
);

Deno.test(
  "IoUring.sqe() on a full SQ submits the prepared SQEs to make room; every NOP completes once",
  withRing(4, {}, (ring) => {
    assert.equal(ring.sqEntries, 4);
    const enters = ring.enterCalls;
    const slots = new Set<number>();
    for (let i = 0; i < 4; i++) {
      const sqe = ring.sqe();
      slots.add(sqe);
      ring.prepNop(sqe, 50 + i);
    }
    // Four distinct slots, and nothing sent to the kernel yet.
    assert.equal(slots.size, 4);
    assert.equal(ring.enterCalls, enters);
    assert.equal(ring.cqReady(), 0);
    // The SQ is full: the fifth sqe() first hands the four to the kernel, in one enter.
    const fifth = ring.sqe();
    assert.equal(ring.enterCalls, enters + 1);
    assert.ok(slots.has(fifth)); // a slot the kernel has consumed, reused
    ring.prepNop(fifth, 54);
    // Only the fifth is left to submit: the four were consumed, not kept pending or sent again.
    assert.equal(ring.submit(), 1);
    assert.deepEqual(
      waitCqes(ring, 5).map((c) => c.userData).sort((a, b) => a - b),
      [50, 51, 52, 53, 54],
    );
    // All four slots free again after the submit: four sqe() calls without an enter.
    const before = ring.enterCalls;
    for (let i = 0; i < 4; i++) ring.prepNop(ring.sqe(), 60 + i);
    assert.equal(ring.enterCalls, before);
    assert.equal(ring.submit(), 4);
    assert.deepEqual(waitCqes(ring, 4).map((c) => c.userData).sort(), [60, 61, 62, 63]);
    // Many laps of the 4-slot ring, submitted only by sqe() making room: the masks wrap
    // correctly, and every NOP completes exactly once.
    const seen = new Map<number, number>();
    let total = 0;
    const count = (u: number) => {
      seen.set(u, (seen.get(u) ?? 0) + 1);
      total++;
    };
    const lapEnters = ring.enterCalls;
    for (let i = 0; i < 1000; i++) {
      ring.prepNop(ring.sqe(), i);
      ring.reapCqes(count);
    }
    // One enter per full SQ: at the 5th, 9th, … 997th sqe().
    assert.equal(ring.enterCalls - lapEnters, 249);
    for (const c of waitCqes(ring, 1000 - total)) count(c.userData);
    assert.equal(total, 1000);
    assert.equal(seen.size, 1000);
    for (let i = 0; i < 1000; i++) assert.equal(seen.get(i), 1, `NOP ${i}`);
  }),
);

Deno.test(
  "IoUring.sqe() flush on a full SQ delivers the earlier SQEs: CQEs in order, none lost or doubled",
  withRing(2, {}, (ring) => {
    assert.equal(ring.sqEntries, 2);
    const got: number[] = [];
    const push = (u: number, res: number) => {
      assert.equal(res, 0);
      got.push(u);
    };
    for (let i = 0; i < 100; i++) {
      const enters = ring.enterCalls;
      const sqe = ring.sqe();
      if (i >= 2 && i % 2 === 0) {
        // The SQ held NOPs i-2 and i-1: this sqe() sent exactly those two, in one enter, and
        // the kernel completed them (a NOP completes inline).
        assert.equal(ring.enterCalls - enters, 1, `sqe() #${i} did not flush`);
        assert.equal(ring.reapCqes(push), 2);
        assert.deepEqual(got.slice(-2), [i - 2, i - 1]);
      } else {
        assert.equal(ring.enterCalls, enters, `sqe() #${i} entered with room left`);
        assert.equal(ring.cqReady(), 0);
      }
      ring.prepNop(sqe, i);
    }
    for (const c of waitCqes(ring, 2)) push(c.userData, c.res);
    assert.deepEqual(got, Array.from({ length: 100 }, (_, i) => i));
    ring.getEvents();
    assert.equal(ring.cqReady(), 0); // nothing submitted twice
  }),
);

Deno.test(
  "IoUring.sqe() flush on a full SQ: writes prepared past the SQ size all reach the file",
  withRing(4, {}, async (ring) => {
    const dir = await Deno.makeTempDir({ prefix: "fastloop-uring-" });
    const data = randomBytes(12 * 4096);
    const buf = new AlignedBuffer(data.length);
    try {
      const fd = open(`${dir}/f`, O_RDWR | O_CREAT);
      try {
        buf.bytes.set(data);
        const enters = ring.enterCalls;
        for (let i = 0; i < 12; i++) {
          ring.prepWrite(ring.sqe(), fd, buf.address + BigInt(i * 4096), 4096, i * 4096, i);
        }
        // Two flushes made room (at the 5th and the 9th sqe()); the last four are still ours.
        assert.equal(ring.enterCalls - enters, 2);
        assert.equal(ring.submit(), 4);
        const cqes = waitCqes(ring, 12);
        assert.deepEqual(
          cqes.map((c) => [c.userData, c.res]).sort((a, b) => a[0]! - b[0]!),
          Array.from({ length: 12 }, (_, i) => [i, 4096]),
        );
        ring.getEvents();
        assert.equal(ring.cqReady(), 0);
        // The oracle is the file itself, read back without io_uring.
        assertSameBytes(await Deno.readFile(`${dir}/f`), data, "file written by flushed SQEs");
      } finally {
        close(fd);
      }
    } finally {
      buf.free();
      await Deno.remove(dir, { recursive: true });
    }
  }),
);

Deno.test(
  "IoUring.sqe() on a full SQ throws the flush's io_uring_enter failure, handing out no slot",
  withRing(2, {}, (ring) => {
    ring.prepNop(ring.sqe(), 1);
    ring.prepNop(ring.sqe(), 2);
    // The ring fd now names an eventfd: the flush's io_uring_enter fails with EOPNOTSUPP.
    const efd = eventfd(0, EFD_CLOEXEC);
    try {
      assert.equal(libc.dup2(efd, ring.fd), ring.fd);
    } finally {
      close(efd);
    }
    for (let attempt = 0; attempt < 2; attempt++) {
      // Had sqe() returned a slot anyway, it would overwrite a prepared, unsubmitted SQE.
      assert.throws(() => ring.sqe(), { name: "SyscallError", errno: EOPNOTSUPP });
    }
  }),
);

Deno.test("IoUring.sqe() hands out a zeroed slot: no flag leaks into the next SQE", () =>
  withExt4((fs) =>
    ringFor(1, async (ring) => {
      assert.equal(ring.sqEntries, 1); // every SQE reuses slot 0
      const content = randomBytes(8192);
      await Deno.writeFile(`${fs.dir}/a`, content.subarray(0, 4096));
      await Deno.writeFile(`${fs.dir}/b`, content.subarray(4096));
      const a = open(`${fs.dir}/a`, O_RDONLY);
      const b = open(`${fs.dir}/b`, O_RDONLY);
      const buf = new AlignedBuffer(8192);
      try {
        ring.registerFiles([a]);
        let sqe = ring.sqe();
        ring.prepRead(sqe, 0, buf.address, 4096, 0, 1, RWF_DSYNC);
        ring.setSqeFlags(sqe, IOSQE_FIXED_FILE);
        ring.sqeView.setUint16(sqe + 40, 3, true); // a stray buf_index, too
        assert.equal(waitCqes(ring, 1)[0]?.res, 4096);
        // The same slot, a plain fd: a leftover FIXED_FILE flag would make the kernel take fd b
        // as an index into the one-entry file table and fail.
        sqe = ring.sqe();
        assert.equal(sqe, 0);
        ring.prepRead(sqe, b, buf.address + 4096n, 4096, 0, 2);
        assert.equal(waitCqes(ring, 1)[0]?.res, 4096);
        assertSameBytes(buf.bytes.subarray(0, 8192), content, "both reads");
      } finally {
        close(a);
        close(b);
        buf.free();
      }
    })
  ));

Deno.test(
  "IoUring submits a batch of 32 SQEs in one io_uring_enter",
  withRing(32, {}, (ring) => {
    const enters = ring.enterCalls;
    for (let i = 0; i < 32; i++) ring.prepNop(ring.sqe(), i);
    // All 32 are still local: preparing them entered the kernel zero times.
    assert.equal(ring.enterCalls, enters);
    assert.equal(ring.cqReady(), 0);
    // One call: the return value is what that single io_uring_enter consumed.
    assert.equal(ring.submitAndWait(32), 32);
    assert.equal(ring.enterCalls - enters, 1);
    assert.equal(ring.cqReady(), 32);
    const got: number[] = [];
    assert.equal(ring.reapCqes((u) => got.push(u)), 32);
    assert.deepEqual(got.sort((a, b) => a - b), Array.from({ length: 32 }, (_, i) => i));
  }),
);

Deno.test(
  "IoUring loses no completion when more CQEs are posted than the CQ holds",
  withRing(8, { cqEntries: 16 }, (ring) => {
    assert.equal(ring.cqEntries, 16);
    assert.notEqual(ring.features & IORING_FEAT_NODROP, 0);
    // Exactly a full CQ: no overflow.
    for (let lap = 0; lap < 2; lap++) {
      for (let i = 0; i < 8; i++) ring.prepNop(ring.sqe(), lap * 8 + i);
      ring.submit();
    }
    assert.equal(ring.cqReady(), 16);
    // submit() with nothing prepared enters (with GETEVENTS) only when the kernel has flagged
    // IORING_SQ_CQ_OVERFLOW: here it does not, so the flag is clear.
    let enters = ring.enterCalls;
    assert.equal(ring.submit(), 0);
    assert.equal(ring.enterCalls, enters);
    // Eight more than fit: the kernel (IORING_FEAT_NODROP) parks them and flags the overflow.
    for (let i = 0; i < 8; i++) ring.prepNop(ring.sqe(), 16 + i);
    assert.equal(ring.submit(), 8);
    const got: number[] = [];
    assert.equal(ring.reapCqes((u) => got.push(u)), 16);
    assert.equal(ring.cqReady(), 0); // the parked eight are not in the ring yet
    enters = ring.enterCalls;
    ring.submitAndWait(0); // flushes the parked CQEs (GETEVENTS because the flag is set)
    assert.equal(ring.enterCalls, enters + 1);
    assert.equal(ring.reapCqes((u) => got.push(u)), 8);
    assert.deepEqual([...got].sort((a, b) => a - b), Array.from({ length: 24 }, (_, i) => i));
    // The flag is clear again: submit() is back to not entering.
    enters = ring.enterCalls;
    assert.equal(ring.submit(), 0);
    assert.equal(ring.enterCalls, enters);
  }),
);

Deno.test(
  "IoUring.reapCqes() advances past every CQE before callbacks run and forbids re-entry",
  withRing(8, {}, (ring) => {
    for (let i = 0; i < 3; i++) ring.prepNop(ring.sqe(), i);
    ring.submitAndWait(3);
    const order: number[] = [];
    assert.throws(
      () =>
        ring.reapCqes((u) => {
          order.push(u);
          // The head has already moved: nothing is left to reap, and re-entry is refused.
          assert.equal(ring.cqReady(), 0);
          if (u === 1) ring.reapCqes(() => {});
        }),
      /own callbacks/,
    );
    // The throwing callback did not cost the third completion.
    assert.deepEqual(order, [0, 1, 2]);
    // A callback may submit: its completion is reaped by the next call, not this one.
    ring.prepNop(ring.sqe(), 7);
    ring.submitAndWait(1);
    let inner = 0;
    assert.equal(
      ring.reapCqes(() => {
        ring.prepNop(ring.sqe(), 8);
        ring.submitAndWait(1);
        inner = ring.cqReady();
      }),
      1,
    );
    assert.equal(inner, 1);
    assert.deepEqual(waitCqes(ring, 1).map((c) => c.userData), [8]);
  }),
);

Deno.test("IoUring.setup() failure is a SyscallError naming io_uring_setup and the errno", () => {
  // The kernel rejects 0 entries with EINVAL.
  assert.throws(() => IoUring.setup(0), (err: unknown) => {
    assert.ok(err instanceof SyscallError);
    assert.equal(err.syscall, "io_uring_setup");
    assert.equal(err.errno, EINVAL);
    assert.match(err.message, /^io_uring_setup .*EINVAL/);
    return true;
  });
});

/** No IORING_SETUP_* flag has these bits: the kernel refuses them with EINVAL. */
const BOGUS_SETUP_FLAG = 1 << 31;
const OTHER_BOGUS_SETUP_FLAG = 1 << 30;

function openFdCount(): number {
  return [...Deno.readDirSync("/proc/self/fd")].length;
}

Deno.test("IoUring.setupFirst() falls back past refused flag sets; the first accepted wins", () => {
  // The oracle that the kernel refuses these: plain setup() with them fails.
  for (const flags of [BOGUS_SETUP_FLAG, IORING_SETUP_DEFER_TASKRUN]) {
    assert.throws(() => IoUring.setup(4, { flags }), { name: "SyscallError", errno: EINVAL });
  }
  const deferred = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  let ring = IoUring.setupFirst(4, { sqe128: true }, [BOGUS_SETUP_FLAG, deferred, 0]);
  try {
    assert.equal(ring.setupFlags & BOGUS_SETUP_FLAG, 0);
    assert.equal(ring.setupFlags & deferred, deferred); // the second choice, not the third
    assert.equal(ring.sqeSize, 128); // opts apply to every choice
    ring.prepNop(ring.sqe(), 3);
    assert.deepEqual(waitCqes(ring, 1).map((c) => [c.userData, c.res]), [[3, 0]]);
  } finally {
    ring.close();
  }
  // DEFER_TASKRUN alone is refused (it needs SINGLE_ISSUER): the next choice is taken…
  ring = IoUring.setupFirst(4, {}, [IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_COOP_TASKRUN]);
  try {
    assert.equal(ring.setupFlags & IORING_SETUP_DEFER_TASKRUN, 0);
    assert.equal(ring.setupFlags & IORING_SETUP_COOP_TASKRUN, IORING_SETUP_COOP_TASKRUN);
  } finally {
    ring.close();
  }
  // …but with SINGLE_ISSUER in opts.flags, which every choice is combined with, it is accepted.
  ring = IoUring.setupFirst(4, { flags: IORING_SETUP_SINGLE_ISSUER }, [
    IORING_SETUP_DEFER_TASKRUN,
    0,
  ]);
  try {
    assert.equal(ring.setupFlags & deferred, deferred);
  } finally {
    ring.close();
  }
});

Deno.test("IoUring.setupFirst() throws the last refusal when every flag set is refused", () => {
  const fds = openFdCount();
  assert.throws(
    () =>
      IoUring.setupFirst(4, {}, [
        BOGUS_SETUP_FLAG,
        IORING_SETUP_DEFER_TASKRUN,
        OTHER_BOGUS_SETUP_FLAG,
      ]),
    (err: unknown) => {
      assert.ok(err instanceof SyscallError);
      assert.equal(err.syscall, "io_uring_setup");
      assert.equal(err.errno, EINVAL);
      // The last choice's error, not the first's or the second's.
      assert.match(err.message, /flags 0x40000000/);
      return true;
    },
  );
  assert.equal(openFdCount(), fds, "a refused setup left an fd open");
});

Deno.test(
  "IoUring CQE results carry -errno: errnoOfCqe() of a read on a bad fd is EBADF",
  withRing(4, {}, (ring) => {
    const buf = new AlignedBuffer(4096);
    try {
      ring.prepRead(ring.sqe(), 987654, buf.address, 4096, 0, 1);
      const [c] = waitCqes(ring, 1);
      assert.equal(c?.res, -EBADF);
      assert.equal(errnoOfCqe(c!.res), EBADF);
      assert.equal(errnoOfCqe(4096), 0);
    } finally {
      buf.free();
    }
  }),
);

Deno.test(
  "IoUring uring_cmd is recognised: a regular file answers EOPNOTSUPP, payload at byte 48",
  withRing(4, { sqe128: true, cqe32: true }, async (ring) => {
    const dir = await Deno.makeTempDir();
    try {
      const fd = open(`${dir}/f`, O_RDWR | O_CREAT);
      try {
        const sqe = ring.sqe();
        const payload = ring.prepUringCmd(sqe, fd, 0x1234, 5);
        assert.equal(payload - sqe, 48);
        assert.equal(ring.sqeView.getUint32(sqe + 8, true), 0x1234);
        assert.equal(ring.sqeView.getUint8(sqe), IORING_OP_URING_CMD);
        const [c] = waitCqes(ring, 1);
        assert.deepEqual([c?.userData, c?.res], [5, -EOPNOTSUPP]);
        // The contrast: an opcode the kernel does not know fails the SQE itself with EINVAL.
        const unknown = ring.sqe();
        ring.prepNop(unknown, 6);
        ring.sqeView.setUint8(unknown, 250);
        assert.deepEqual(waitCqes(ring, 1).map((c) => [c.userData, c.res]), [[6, -EINVAL]]);
      } finally {
        close(fd);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }),
);

// ---------------------------------------------------------------------------------------------
// Eventfd: reads, getEvents() and waitAsync()

/**
 * A Worker that writes 1 to eventfd `efd` `delayMs` after each message `{ shared, written, seq,
 * delayMs }`, storing `seq` in `written[0]` (and the write time, timeOrigin + now in µs, in
 * `shared[1]`) right before the write: seeing `seq` after a completion proves the completion
 * came from that write (a causal check, no timing threshold).
 */
async function eventfdWriter(efd: number): Promise<Worker> {
  const libcTs = import.meta.resolve("../../ffi/libc.ts");
  const source = `
    import { libc } from "${libcTs}";
    const one = new Uint8Array(new BigUint64Array([1n]).buffer);
    self.postMessage("ready");
    self.onmessage = (e) => {
      const { shared, written, seq } = e.data;
      setTimeout(() => {
        shared[1] = (performance.timeOrigin + performance.now()) * 1000;
        Atomics.store(written, 0, seq);
        libc.write(${efd}, one, 8n);
      }, e.data.delayMs);
    };
  `;
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  const worker = new Worker(url, { type: "module" });
  URL.revokeObjectURL(url);
  // Loading the worker needs this thread's event loop, which a synchronous wait would block.
  await new Promise((resolve) => worker.onmessage = resolve);
  return worker;
}

function writeEventfd(efd: number, value: bigint): void {
  assert.equal(libc.write(efd, new Uint8Array(new BigUint64Array([value]).buffer), 8n), 8n);
}

Deno.test(
  "IoUring eventfd read completes only once the eventfd is written",
  withRing(8, {}, async (ring) => {
    const efd = eventfd(0, EFD_CLOEXEC);
    const buf = new AlignedBuffer(4096);
    try {
      ring.prepReadEventfd(ring.sqe(), efd, buf.address, 2);
      assert.equal(ring.submit(), 1); // consumed, but nothing to read yet
      await new Promise((r) => setTimeout(r, 30));
      ring.getEvents();
      assert.equal(ring.cqReady(), 0);
      writeEventfd(efd, 41n);
      assert.deepEqual(waitCqes(ring, 1).map((c) => [c.userData, c.res]), [[2, 8]]);
      assert.equal(new DataView(buf.bytes.buffer).getBigUint64(0, true), 41n);
    } finally {
      buf.free();
      close(efd);
    }
  }),
);

Deno.test(
  "IoUring.getEvents() posts a deferred completion without blocking (SINGLE_ISSUER|DEFER_TASKRUN)",
  withRing(
    8,
    { flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN },
    async (ring) => {
      const efd = eventfd(0, EFD_CLOEXEC);
      const buf = new AlignedBuffer(4096);
      const shared = new Float64Array(new SharedArrayBuffer(16));
      const written = new Int32Array(new SharedArrayBuffer(4));
      const worker = await eventfdWriter(efd);
      try {
        // getEvents() enters even with nothing to submit; submit() then does not.
        let enters = ring.enterCalls;
        assert.equal(ring.submit(), 0);
        assert.equal(ring.enterCalls, enters);
        assert.equal(ring.getEvents(), 0);
        assert.equal(ring.enterCalls, enters + 1);

        ring.prepReadEventfd(ring.sqe(), efd, buf.address, 1);
        // A watchdog: were getEvents() to wait for a CQE, this write 2 s on would end the wait
        // and the time check below would fail (instead of the test hanging).
        worker.postMessage({ shared, written, seq: 1, delayMs: 2000 });
        const t0 = performance.now();
        assert.equal(ring.getEvents(), 1); // submitted, and returned with nothing to post
        const ms = performance.now() - t0;
        assert.ok(ms < 1000, `getEvents() took ${ms} ms with nothing complete`);
        assert.equal(ring.cqReady(), 0);

        // Written from this thread: the read completes as task work, which DEFER_TASKRUN keeps
        // until this thread enters with GETEVENTS.
        writeEventfd(efd, 5n);
        await new Promise((r) => setTimeout(r, 20));
        assert.equal(ring.cqReady(), 0, "posted before any GETEVENTS enter");
        enters = ring.enterCalls;
        assert.equal(ring.getEvents(), 0);
        assert.equal(ring.enterCalls, enters + 1);
        assert.equal(ring.cqReady(), 1);
        const got: number[][] = [];
        ring.reapCqes((u, res) => got.push([u, res]));
        assert.deepEqual(got, [[1, 8]]);
        assert.equal(new DataView(buf.bytes.buffer).getBigUint64(0, true), 5n);
        assert.equal(Atomics.load(written, 0), 0); // the watchdog never had to write
      } finally {
        worker.terminate();
        buf.free();
        close(efd);
      }
    },
  ),
);

Deno.test(
  "IoUring.spinForWork() sees a deferred completion by the ring's TASKRUN flag before any CQE, and gives up at its deadline",
  withRing(
    8,
    {
      flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
    },
    async (ring) => {
      const efd = eventfd(0, EFD_CLOEXEC);
      const buf = new AlignedBuffer(4096);
      const shared = new Float64Array(new SharedArrayBuffer(16));
      const written = new Int32Array(new SharedArrayBuffer(4));
      const worker = await eventfdWriter(efd);
      try {
        ring.prepReadEventfd(ring.sqe(), efd, buf.address, 1);
        assert.equal(ring.submit(), 1);
        // Nothing pending: the spin ends at its deadline, with nothing to get.
        let t0 = performance.now();
        assert.equal(ring.spinForWork(t0 + 50), false);
        const waited = performance.now() - t0;
        assert.ok(waited >= 50 && waited < 1000, `spun ${waited} ms for a 50 ms deadline`);
        // Written from another thread while this one spins: the flag announces it, no CQE yet.
        worker.postMessage({ shared, written, seq: 7, delayMs: 30 });
        t0 = performance.now();
        assert.equal(ring.spinForWork(t0 + 5000), true);
        assert.ok(performance.now() - t0 < 4000, "found long before the deadline");
        assert.equal(Atomics.load(written, 0), 7, "after the write (causal)");
        assert.equal(ring.cqReady(), 0, "the CQE is posted only on the next GETEVENTS");
        ring.getEvents();
        const got: number[][] = [];
        ring.reapCqes((u, res) => got.push([u, res]));
        assert.deepEqual(got, [[1, 8]]);
      } finally {
        worker.terminate();
        buf.free();
        close(efd);
      }
    },
  ),
);

Deno.test(
  "QueueWait spins for a completion only while few requests are in service, and sleeps above that",
  async () => {
    const ring = setupQueueRing(8);
    const efd = eventfd(0, EFD_CLOEXEC);
    const buf = new AlignedBuffer(4096);
    const shared = new Float64Array(new SharedArrayBuffer(16));
    const written = new Int32Array(new SharedArrayBuffer(4));
    const worker = await eventfdWriter(efd);
    // A spin of up to 5 s, but only with at most 4 requests in service.
    const wait = new QueueWait(ring, 5_000_000, 4);
    /** CPU ms this process used while waiting for an eventfd write `delayMs` away. */
    const cpuMsOfWait = (inService: number, seq: number, delayMs: number) => {
      ring.prepReadEventfd(ring.sqe(), efd, buf.address, seq);
      const cpu0 = process.cpuUsage();
      const t0 = performance.now();
      worker.postMessage({ shared, written, seq, delayMs });
      wait.submitAndWait(inService);
      while (ring.cqReady() === 0) wait.submitAndWait(inService);
      const waitedMs = performance.now() - t0;
      const cpu = process.cpuUsage(cpu0);
      const got: number[] = [];
      ring.reapCqes((u) => got.push(u));
      assert.deepEqual(got, [seq]);
      assert.ok(waitedMs >= delayMs * 0.8, `waited ${waitedMs} ms for a ${delayMs} ms write`);
      return (cpu.user + cpu.system) / 1000;
    };
    try {
      const slept = cpuMsOfWait(5, 1, 400);
      assert.ok(slept < 200, `5 in service: slept, but used ${slept} ms of CPU in a 400 ms wait`);
      const spun = cpuMsOfWait(4, 2, 400);
      assert.ok(spun >= 250, `4 in service: spun, but used only ${spun} ms of CPU in 400 ms`);
    } finally {
      worker.terminate();
      buf.free();
      close(efd);
      ring.close();
    }
  },
);

Deno.test(
  "IoUring.waitAsync() waits on a helper thread for a CQE while JS keeps running; submits nothing",
  withRing(4, {}, async (ring) => {
    const efd = eventfd(0, EFD_CLOEXEC);
    const buf = new AlignedBuffer(4096);
    const shared = new Float64Array(new SharedArrayBuffer(16));
    const written = new Int32Array(new SharedArrayBuffer(4));
    const worker = await eventfdWriter(efd);
    let waiting: Promise<void> | undefined;
    let settled = false;
    try {
      ring.prepReadEventfd(ring.sqe(), efd, buf.address, 9);
      assert.equal(ring.submit(), 1);
      // Prepared, not submitted: waitAsync() must leave it (this NOP would complete at once).
      ring.prepNop(ring.sqe(), 10);
      const enters = ring.enterCalls;
      // The Worker writes the eventfd 500 ms on. Were waitAsync() to block this thread, the
      // write would release it, the promise would be settled by the first check below, and
      // the timer would not have ticked.
      worker.postMessage({ shared, written, seq: 1, delayMs: 500 });
      waiting = ring.waitAsync().then(() => {
        settled = true;
      });
      let ticks = 0;
      const timer = setInterval(() => ticks++, 5);
      await new Promise((r) => setTimeout(r, 60));
      clearInterval(timer);
      assert.equal(settled, false); // still blocked in the kernel…
      assert.ok(ticks >= 3, `${ticks} timer ticks in 60 ms of waiting`); // …yet timers ran
      assert.equal(ring.cqReady(), 0);
      await waiting;
      assert.equal(Atomics.load(written, 0), 1, "woke before the eventfd was written");
      assert.equal(ring.enterCalls, enters + 1);
      const got: number[][] = [];
      ring.reapCqes((u, res) => got.push([u, res]));
      assert.deepEqual(got, [[9, 8]]); // the read only: the NOP was not submitted
      assert.equal(new DataView(buf.bytes.buffer).getBigUint64(0, true), 1n);
      // Now submitted: with its CQE already ready, waitAsync() returns at once.
      assert.equal(ring.submit(), 1);
      assert.equal(ring.cqReady(), 1);
      await ring.waitAsync();
      got.length = 0;
      ring.reapCqes((u, res) => got.push([u, res]));
      assert.deepEqual(got, [[10, 0]]);
    } finally {
      // Never close the ring under a pending wait: release it first.
      if (waiting && !settled) {
        writeEventfd(efd, 1n);
        await waiting;
      }
      worker.terminate();
      buf.free();
      close(efd);
    }
  }),
);

// ---------------------------------------------------------------------------------------------
// File IO against plain syscalls, on a real ext4

/** A ring of `entries` for the duration of `fn`. */
async function ringFor(entries: number, fn: (ring: IoUring) => Promise<void> | void) {
  await withRing(entries, {}, fn)();
}

Deno.test("IoUring O_DIRECT writes and reads agree with Deno's file APIs and pread", () =>
  withExt4((fs) =>
    ringFor(16, async (ring) => {
      const path = `${fs.dir}/direct.bin`;
      const size = 4 * MiB;
      const expected = randomBytes(size);
      const buf = new AlignedBuffer(size);
      const fd = open(path, O_RDWR | O_CREAT | O_DIRECT);
      try {
        // Write 1 MiB chunks out of order, in one batch, through io_uring.
        buf.bytes.set(expected);
        const order = [2, 0, 3, 1];
        order.forEach((chunk) =>
          ring.prepWrite(
            ring.sqe(),
            fd,
            buf.address + BigInt(chunk * MiB),
            MiB,
            chunk * MiB,
            chunk,
          )
        );
        const writes = waitCqes(ring, 4);
        assert.deepEqual(writes.map((c) => c.res), [MiB, MiB, MiB, MiB]);
        assertSameBytes(await Deno.readFile(path), expected, "file after io_uring writes");

        // Overwrite a 4 KiB block with pwrite (plain syscall), read it back through io_uring.
        const patch = randomBytes(4096);
        const plain = new AlignedBuffer(4096);
        try {
          plain.bytes.set(patch);
          assert.equal(pwrite(fd, plain.pointer, 4096, 3 * MiB + 8192), 4096);
        } finally {
          plain.free();
        }
        expected.set(patch, 3 * MiB + 8192);
        buf.bytes.fill(0);
        for (let i = 0; i < 4; i++) {
          ring.prepRead(ring.sqe(), fd, buf.address + BigInt(i * MiB), MiB, i * MiB, 10 + i);
        }
        const reads = waitCqes(ring, 4);
        assert.ok(reads.every((c) => c.res === MiB));
        assertSameBytes(buf.bytes.subarray(0, size), expected, "io_uring reads");
        // A read past EOF returns 0 bytes, as pread does.
        ring.prepRead(ring.sqe(), fd, buf.address, 4096, size, 20);
        assert.equal(waitCqes(ring, 1)[0]?.res, pread(fd, buf.pointer, 4096, size));
        // O_DIRECT rejects a misaligned offset with EINVAL, on both paths.
        ring.prepRead(ring.sqe(), fd, buf.address, 4096, 100, 21);
        assert.equal(waitCqes(ring, 1)[0]?.res, -EINVAL);
        assert.throws(() => pread(fd, buf.pointer, 4096, 100), { errno: EINVAL });
      } finally {
        close(fd);
        buf.free();
      }
    })
  ));

Deno.test("IoUring buffered writes and reads at odd offsets agree with pread and readFile", () =>
  withExt4((fs) =>
    ringFor(8, async (ring) => {
      const path = `${fs.dir}/buffered.bin`;
      const data = randomBytes(100_000);
      const buf = new AlignedBuffer(200_000);
      const fd = open(path, O_RDWR | O_CREAT);
      try {
        buf.bytes.set(data);
        ring.prepWrite(ring.sqe(), fd, buf.address, data.length, 777, 1);
        assert.equal(waitCqes(ring, 1)[0]?.res, data.length);
        const onDisk = await Deno.readFile(path);
        assert.equal(onDisk.length, 777 + data.length);
        assertSameBytes(onDisk.subarray(777), data, "file after io_uring write");
        assert.ok(onDisk.subarray(0, 777).every((b) => b === 0));
        // Read 5000 bytes at 1234 through io_uring into the second half, and with pread.
        ring.prepRead(ring.sqe(), fd, buf.address + 100_000n, 5000, 1234, 2);
        assert.equal(waitCqes(ring, 1)[0]?.res, 5000);
        const viaPread = new AlignedBuffer(5000);
        try {
          assert.equal(pread(fd, viaPread.pointer, 5000, 1234), 5000);
          assertSameBytes(
            buf.bytes.subarray(100_000, 105_000),
            viaPread.bytes.subarray(0, 5000),
            "io_uring read vs pread",
          );
        } finally {
          viaPread.free();
        }
      } finally {
        close(fd);
        buf.free();
      }
    })
  ));

Deno.test("IoUring fallocate matches fallocate(2): sizes and blocks, incl. PUNCH_HOLE|KEEP_SIZE", () =>
  withExt4((fs) =>
    ringFor(4, async (ring) => {
      const a = open(`${fs.dir}/via-uring`, O_RDWR | O_CREAT);
      const b = open(`${fs.dir}/via-syscall`, O_RDWR | O_CREAT);
      try {
        // Allocate 2 MiB, extending the size.
        ring.prepFallocate(ring.sqe(), a, 0, 0, 2 * MiB, 1);
        assert.equal(waitCqes(ring, 1)[0]?.res, 0);
        fallocate(b, 0, 0, 2 * MiB);
        let sa = fstat(a), sb = fstat(b);
        assert.equal(sa.size, 2 * MiB);
        assert.equal(sa.blocks, sb.blocks);
        assert.ok(sa.blocks >= (2 * MiB) / 512);
        // Fill both with data, then punch 1 MiB out of the middle keeping the size.
        const data = new Uint8Array(2 * MiB).fill(0xab);
        await Deno.writeFile(`${fs.dir}/via-uring`, data);
        await Deno.writeFile(`${fs.dir}/via-syscall`, data);
        const before = fstat(a).blocks;
        const mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        ring.prepFallocate(ring.sqe(), a, mode, 512 * 1024, MiB, 2);
        assert.equal(waitCqes(ring, 1)[0]?.res, 0);
        fallocate(b, mode, 512 * 1024, MiB);
        sa = fstat(a);
        sb = fstat(b);
        assert.equal(sa.size, 2 * MiB);
        assert.equal(sa.blocks, sb.blocks);
        assert.equal(before - sa.blocks, MiB / 512);
        const after = await Deno.readFile(`${fs.dir}/via-uring`);
        assertSameBytes(after, await Deno.readFile(`${fs.dir}/via-syscall`), "punched files");
        assert.ok(after.subarray(512 * 1024, 512 * 1024 + MiB).every((x) => x === 0));
        assert.equal(after[512 * 1024 - 1], 0xab);
        assert.equal(after[512 * 1024 + MiB], 0xab);
        // Invalid mode: the CQE carries the same errno the syscall throws.
        ring.prepFallocate(ring.sqe(), a, FALLOC_FL_PUNCH_HOLE, 0, 4096, 3);
        const res = waitCqes(ring, 1)[0]!.res;
        assert.throws(() => fallocate(b, FALLOC_FL_PUNCH_HOLE, 0, 4096), { errno: -res });
      } finally {
        close(a);
        close(b);
      }
    })
  ));

/**
 * Makes a 64 KiB file whose blocks are allocated and on disk (zeros), then overwrites it with
 * `pattern` through the page cache only. Returns the fd and the file's physical byte offset.
 */
async function dirtyOverwrite(fs: Ext4, name: string, pattern: Uint8Array) {
  const path = `${fs.dir}/${name}`;
  await Deno.writeFile(path, new Uint8Array(pattern.length));
  run("sync", path);
  const physical = firstExtentPhysicalBytes(path);
  const fd = open(path, O_RDWR);
  return { fd, physical };
}

for (const datasync of [false, true]) {
  const name = datasync ? "fdatasync" : "fsync";
  Deno.test(
    `IoUring ${name} puts page-cache writes on the device (read back from the loop device)`,
    () =>
      withExt4((fs) =>
        ringFor(4, async (ring) => {
          const pattern = randomBytes(65536);
          const { fd, physical } = await dirtyOverwrite(fs, name, pattern);
          const buf = new AlignedBuffer(pattern.length);
          try {
            buf.bytes.set(pattern);
            assert.equal(pwrite(fd, buf.pointer, pattern.length, 0), pattern.length);
            // The oracle can tell: before the sync, the device still holds the zeros.
            assert.ok(readDeviceDirect(fs.loopDev, physical, pattern.length).every((x) => x === 0));
            const sqe = ring.sqe();
            ring.prepFsync(sqe, fd, datasync, 1);
            // fsync and fdatasync both reach the device here; the flag is what tells them apart.
            assert.equal(ring.sqeView.getUint32(sqe + 28, true), datasync ? 1 : 0);
            assert.equal(waitCqes(ring, 1)[0]?.res, 0);
            assertSameBytes(
              readDeviceDirect(fs.loopDev, physical, pattern.length),
              pattern,
              "device after sync",
            );
          } finally {
            buf.free();
            close(fd);
          }
        })
      ),
  );
}

Deno.test("IoUring RWF_DSYNC write is on the device at completion; a plain write is not", () =>
  withExt4((fs) =>
    ringFor(4, async (ring) => {
      const plain = randomBytes(65536);
      const dsync = randomBytes(65536);
      const p = await dirtyOverwrite(fs, "plain", plain);
      const d = await dirtyOverwrite(fs, "dsync", dsync);
      const buf = new AlignedBuffer(2 * 65536);
      try {
        buf.bytes.set(plain, 0);
        buf.bytes.set(dsync, 65536);
        ring.prepWrite(ring.sqe(), p.fd, buf.address, 65536, 0, 1);
        ring.prepWrite(ring.sqe(), d.fd, buf.address + 65536n, 65536, 0, 2, RWF_DSYNC);
        assert.deepEqual(waitCqes(ring, 2).map((c) => c.res), [65536, 65536]);
        assertSameBytes(
          readDeviceDirect(fs.loopDev, d.physical, 65536),
          dsync,
          "device after RWF_DSYNC write",
        );
        assert.ok(readDeviceDirect(fs.loopDev, p.physical, 65536).every((x) => x === 0));
      } finally {
        buf.free();
        close(p.fd);
        close(d.fd);
      }
    })
  ));

Deno.test("IoUring read_fixed/write_fixed with registered buffers and a registered file", () =>
  withExt4((fs) =>
    ringFor(8, async (ring) => {
      const path = `${fs.dir}/fixed.bin`;
      const content = randomBytes(256 * 1024);
      await Deno.writeFile(path, content);
      const bufs = [new AlignedBuffer(128 * 1024), new AlignedBuffer(128 * 1024)];
      const fd = open(path, O_RDWR | O_DIRECT);
      try {
        ring.registerBuffers(bufs);
        ring.registerFiles([fd]);
        // Read the file's two halves into buffer 1 then buffer 0, via the fixed file index 0.
        let sqe = ring.sqe();
        ring.prepReadFixed(sqe, 0, bufs[1]!.address, 128 * 1024, 0, 1, 1);
        ring.setSqeFlags(sqe, IOSQE_FIXED_FILE);
        sqe = ring.sqe();
        ring.prepReadFixed(sqe, 0, bufs[0]!.address, 128 * 1024, 128 * 1024, 0, 2);
        ring.setSqeFlags(sqe, IOSQE_FIXED_FILE);
        assert.deepEqual(waitCqes(ring, 2).map((c) => c.res), [128 * 1024, 128 * 1024]);
        assertSameBytes(bufs[1]!.bytes, content.subarray(0, 128 * 1024), "fixed buffer 1");
        assertSameBytes(bufs[0]!.bytes, content.subarray(128 * 1024), "fixed buffer 0");
        // Write buffer 1 (the first half) over the second half with write_fixed, by real fd.
        ring.prepWriteFixed(ring.sqe(), fd, bufs[1]!.address, 128 * 1024, 128 * 1024, 1, 3);
        assert.equal(waitCqes(ring, 1)[0]?.res, 128 * 1024);
        const after = await Deno.readFile(path);
        assertSameBytes(
          after.subarray(128 * 1024),
          content.subarray(0, 128 * 1024),
          "file after write_fixed",
        );
        // An address outside the registered buffer is refused by the kernel.
        ring.prepReadFixed(ring.sqe(), fd, bufs[0]!.address, 128 * 1024, 0, 1, 4);
        assert.equal(waitCqes(ring, 1)[0]?.res, -EFAULT);
      } finally {
        close(fd);
        for (const b of bufs) b.free();
      }
    })
  ));

Deno.test(
  "ProvidedBufferRing (IOU_PBUF_RING_INC): reads fill one buffer front to back, BUF_MORE while " +
    "room is left, ENOBUFS once it is used up, and add() offers it again",
  () =>
    ringFor(8, async (ring) => {
      const dir = await Deno.makeTempDir({ prefix: "fastloop-pbuf-" });
      const content = randomBytes(1024);
      await Deno.writeFile(`${dir}/f`, content);
      const fd = open(`${dir}/f`, O_RDONLY);
      const bgid = 7;
      const pbuf = new ProvidedBufferRing(ring, bgid, 1, IOU_PBUF_RING_INC);
      const buffer = new AlignedBuffer(4096);
      // 256 of its bytes are offered, as bid 3.
      const offer = () => pbuf.add(Number(buffer.address), 256, 3);
      const readInto = (offset: number, len: number, userData: number) => {
        const sqe = ring.sqe();
        ring.prepRead(sqe, fd, 0, len, offset, userData);
        ring.selectBuffer(sqe, bgid);
        return waitCqes(ring, 1)[0]!;
      };
      try {
        offer();
        const bid = (c: Cqe) => c.flags >>> IORING_CQE_BUFFER_SHIFT;
        const a = readInto(0, 100, 1);
        assert.equal(a.res, 100);
        assert.ok(a.flags & IORING_CQE_F_BUFFER, "the CQE names its buffer");
        assert.equal(bid(a), 3);
        assert.ok(a.flags & IORING_CQE_F_BUF_MORE, "room is left after 100 of 256 bytes");
        const b = readInto(100, 100, 2);
        assert.equal(b.res, 100);
        assert.ok(b.flags & IORING_CQE_F_BUF_MORE);
        // The rest of the buffer: 56 bytes, and no BUF_MORE: it has left the ring.
        const c = readInto(200, 100, 3);
        assert.equal(c.res, 56);
        assert.equal(c.flags & IORING_CQE_F_BUF_MORE, 0);
        assertSameBytes(buffer.bytes.subarray(0, 256), content.subarray(0, 256), "the buffer");
        assert.equal(readInto(256, 100, 4).res, -ENOBUFS);
        offer();
        const d = readInto(512, 100, 5);
        assert.equal(d.res, 100);
        assert.equal(bid(d), 3);
        assertSameBytes(buffer.bytes.subarray(0, 100), content.subarray(512, 612), "offered again");
      } finally {
        close(fd);
        ring.close();
        pbuf.free();
        buffer.free();
        await Deno.remove(dir, { recursive: true });
      }
    }),
);

Deno.test("IoUring.registerBuffers() failure is a SyscallError naming io_uring_register", () =>
  ringFor(4, (ring) => {
    assert.throws(
      () => ring.registerBuffers([{ address: 0n, lengthBytes: 4096 }]),
      (err: unknown) => {
        assert.ok(err instanceof SyscallError);
        assert.equal(err.syscall, "io_uring_register");
        assert.match(err.message, /REGISTER_BUFFERS/);
        return true;
      },
    );
  }));

/**
 * Makes `ring.fd` refer to an eventfd (dup2 over it), so the next io_uring_enter fails with
 * EOPNOTSUPP, then checks that the SyscallError carries that errno. Returns the error's message.
 */
function enterFailureMessage(ring: IoUring): string {
  const efd = eventfd(0, EFD_CLOEXEC);
  try {
    assert.equal(libc.dup2(efd, ring.fd), ring.fd);
  } finally {
    close(efd);
  }
  ring.prepNop(ring.sqe(), 1);
  try {
    ring.submitAndWait(1);
  } catch (e) {
    assert.ok(e instanceof SyscallError);
    assert.equal(e.syscall, "io_uring_enter");
    assert.equal(e.errno, EOPNOTSUPP);
    return e.message;
  }
  throw new Error("io_uring_enter on an eventfd did not fail");
}

Deno.test("IoUring io_uring_enter failure is a SyscallError with the errno of the failed call", () =>
  ringFor(4, (ring) => {
    assert.match(enterFailureMessage(ring), /^io_uring_enter ring fd \d+: EOPNOTSUPP/);
  }));

Deno.test("IoUring in a Worker (as the queues run) reads errno on the Worker's own thread", async () => {
  const ffi = import.meta.resolve("../../ffi/io_uring.ts");
  const errnoTs = import.meta.resolve("../../ffi/errno.ts");
  const libcTs = import.meta.resolve("../../ffi/libc.ts");
  // The worker repeats the main-thread check above; errno is thread-local, and libc.ts takes its
  // address when the module loads, which a Worker does on its own thread.
  const source = `
    import { IoUring } from "${ffi}";
    import { SyscallError } from "${errnoTs}";
    import { close, eventfd, libc } from "${libcTs}";
    const ring = IoUring.setup(4, { sqe128: true, cqe32: true });
    let result;
    try {
      ring.prepNop(ring.sqe(), 77);
      ring.submitAndWait(1);
      const got = [];
      ring.reapCqes((u, r) => got.push([u, r]));
      const efd = eventfd(0);
      libc.dup2(efd, ring.fd);
      close(efd);
      ring.prepNop(ring.sqe(), 1);
      try {
        ring.submitAndWait(1);
        result = { got, error: null };
      } catch (e) {
        result = { got, error: e instanceof SyscallError ? [e.syscall, e.errno] : String(e) };
      }
    } finally {
      ring.close();
    }
    self.postMessage(result);
  `;
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  const worker = new Worker(url, { type: "module" });
  try {
    const result = await new Promise<{ got: number[][]; error: unknown }>((resolve, reject) => {
      worker.onmessage = (e) => resolve(e.data);
      worker.onerror = (e) => reject(new Error(e.message));
    });
    assert.deepEqual(result.got, [[77, 0]]);
    assert.deepEqual(result.error, ["io_uring_enter", EOPNOTSUPP]);
  } finally {
    worker.terminate();
    URL.revokeObjectURL(url);
  }
});

Deno.test("IoUring.close() releases the ring fd; every later call throws EBADF", async () => {
  // In a child process: a call that touched the unmapped rings would die of SIGSEGV, which
  // must fail this test rather than end the whole test run. The child prints one JSON line
  // per check as it goes, so a crash names the call that caused it.
  const ffi = import.meta.resolve("../../ffi/io_uring.ts");
  const libcTs = import.meta.resolve("../../ffi/libc.ts");
  const calls = [
    "sqe",
    "submit",
    "submitAndWait",
    "getEvents",
    "cqReady",
    "reapCqes",
    "registerFiles",
    "waitAsync",
  ];
  const source = `
    import { IoUring } from "${ffi}";
    import { AlignedBuffer, close, eventfd } from "${libcTs}";
    const report = (what, outcome) => console.log(JSON.stringify([what, outcome]));
    const ring = IoUring.setup(4);
    const efd = eventfd(0);
    const buf = new AlignedBuffer(4096);
    const fdPath = "/proc/self/fd/" + ring.fd;
    ring.prepReadEventfd(ring.sqe(), efd, buf.address, 1); // never written: in flight at close
    report("submitted", ring.submit());
    report("fd before", Deno.readLinkSync(fdPath));
    ring.close();
    try {
      Deno.statSync(fdPath);
      report("fd after", "still open");
    } catch (e) {
      report("fd after", e.name);
    }
    const calls = {
      sqe: () => ring.sqe(),
      submit: () => ring.submit(),
      submitAndWait: () => ring.submitAndWait(1),
      getEvents: () => ring.getEvents(),
      cqReady: () => ring.cqReady(),
      reapCqes: () => ring.reapCqes(() => {}),
      registerFiles: () => ring.registerFiles([efd]),
      waitAsync: () => ring.waitAsync(),
    };
    for (const [name, call] of Object.entries(calls)) {
      try {
        await call();
        report(name, "returned");
      } catch (e) {
        report(name, e.name === "SyscallError" ? "errno " + e.errno : String(e));
      }
    }
    ring.close(); // a second close is a no-op
    report("second close", "ok");
    buf.free();
    close(efd);
  `;
  const dir = await Deno.makeTempDir({ prefix: "fastloop-uring-" });
  try {
    const script = `${dir}/after_close.ts`;
    await Deno.writeTextFile(script, source);
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", script],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const lines = new TextDecoder().decode(out.stdout).split("\n").filter((l) => l.length > 0);
    const reported = new Map(lines.map((l) => JSON.parse(l) as [string, unknown]));
    const died = calls.find((c) => !reported.has(c)) ?? "the end";
    assert.ok(
      out.success,
      `child ${out.signal ? `killed by ${out.signal}` : `exited ${out.code}`} at ${died}: ` +
        new TextDecoder().decode(out.stderr).trim(),
    );
    assert.equal(reported.get("submitted"), 1);
    assert.match(String(reported.get("fd before")), /io_uring/);
    assert.equal(reported.get("fd after"), "NotFound");
    for (const c of calls) assert.equal(reported.get(c), `errno ${EBADF}`, `${c}() after close()`);
    assert.equal(reported.get("second close"), "ok");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
