//! One ublk queue: the request loop, and the engine that serves its requests with the queue's own
//! extent cache. Each queue's Worker (`lib/device_queues.ts`) runs `runQueue`; the main thread
//! reaches it only through `lib/queue_state.ts`.
//!
//! Threading. ublk requires every command of a queue (FETCH_REQ, COMMIT_AND_FETCH_REQ) to be
//! issued by one task on kernels before UBLK_F_PER_IO_DAEMON (6.16), and Deno's `nonblocking` FFI
//! calls run on pool threads, so a queue cannot live on the main thread's event loop. A Worker is
//! its own OS thread: it makes synchronous `io_uring_enter` calls and sleeps in the kernel until a
//! CQE arrives, which is also the cheapest way to wait. It keeps a read posted on an eventfd, the
//! doorbell the main thread rings after posting to the queue's mailbox.
//!
//! A request's path, top to bottom in this file:
//!  1. `runQueue`: submit and wait once, drain every CQE, dispatch each, then the chores.
//!  2. `handleRequest`: the descriptor is read into the tag's `Request` record and checked.
//!  3. `#admit` and `#route`, the one place that says where a byte goes (the filesystem's device,
//!     the file, or zeros) and why; `#issue` turns consecutive pieces that go to the same place
//!     into one `Segment` each.
//!  4. `#submit` prepares every backend SQE; `onBackendCqe` takes every backend CQE: in-flight
//!     counts, EINTR/EAGAIN re-issued, short transfers continued, the first error kept.
//!  5. `#finish`: counters, the error record, and the result to the `Completer` (in the loop,
//!     the ublk hop: COMMIT_AND_FETCH_REQ, or one COMMIT_IO_CMDS per turn; lib/ublk_hop.ts).
//! FLUSH, DISCARD and WRITE_ZEROES take the same `#submit`/`onBackendCqe` pair. Backend errors
//! complete their request with -errno and never stop the queue. Nothing here allocates per IO:
//! the records (`lib/request.ts`) are preallocated per tag.

import { type IoUring, RWF_DSYNC } from "../ffi/io_uring.ts";
import { AlignedBuffer } from "../ffi/libc.ts";
import { EAGAIN, EINTR, EIO, EOPNOTSUPP, EROFS, SyscallError } from "../ffi/errno.ts";
import {
  UBLK_IO_F_FUA,
  UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_FLUSH,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
  UBLK_IO_OP_WRITE_ZEROES,
} from "../ffi/ublk_cmd.ts";
import { ExtentCache, ExtentKind, fileExtentSource } from "./extent_cache.ts";
import { PunchFence, QueueFence } from "./queue_fence.ts";
import {
  Counter,
  ERROR_OP_FIEMAP,
  ErrorPath,
  fenceRegionOffset,
  MbOp,
  type Mode,
  type QueueConfig,
  QueueShared,
  QueueState,
} from "./queue_state.ts";
import {
  OP_NONE,
  type Placement,
  Request,
  Route,
  SEG_MAX,
  SegKind,
  type Segment,
  UD_BACKEND,
  UD_DOORBELL,
  UD_SEG_SHIFT,
  UD_TAG_MASK,
  Why,
} from "./request.ts";
import { QueueWait, setupQueueRing } from "./queue_ring.ts";
import { filesystemBlockBytes, RegionBounds } from "./region.ts";
import { AutoRegisteredBuffers, CopyBuffers, type RequestData } from "./request_data.ts";
import { BatchHop, type HopContext, PerTagHop, type UblkHop } from "./ublk_hop.ts";

/** Where a finished request goes: COMMIT_AND_FETCH in the ublk loop, a recorder in tests. */
export interface Completer {
  complete(tag: number, result: number): void;
}

/**
 * The request engine of one queue: maps requests to backend IO on `ring`, collects the
 * completions, and hands each finished request to `completer`. It knows nothing of ublk's
 * commands, so it runs on any kernel (host tests and bench/engine_bench.ts feed it descriptors).
 */
export class QueueEngine {
  readonly ring: IoUring;
  readonly shared: QueueShared;
  readonly data: RequestData;
  /** Backend operations in flight, and those on the filesystem's device. */
  backendInflight = 0;
  directInflight = 0;
  mode: Mode;

  readonly #cfg: QueueConfig;
  readonly #desc: DataView;
  readonly #completer: Completer;
  readonly #cache: ExtentCache | null;
  readonly #fence: PunchFence;
  readonly #requests: Request[] = [];
  readonly #place: Placement = { route: Route.file, deviceOffset: 0, lengthBytes: 0 };
  /** The ring's registered files (index = position; -1 slots are empty). */
  readonly #files: number[];
  /** Zeros for the partial blocks of WRITE_ZEROES (two filesystem blocks at most). */
  readonly #zeros: AlignedBuffer;
  /** The file's filesystem block size: fallocate gets only whole blocks (see `#punch`). */
  readonly #fsBlockBytes: number;
  /** How far IO may reach in the file: the device's end, and the file's size as last seen. */
  readonly #bounds: RegionBounds;
  /**
   * A write or allocation went through the file since the last FLUSH. True at first: a server
   * that took the device over (recovery, restart) cannot know what its predecessor wrote through
   * the file, so its first FLUSH syncs the file too.
   */
  #fileDirty = true;

  readonly #startPunch = (req: Request) => this.#punch(req);

  constructor(cfg: QueueConfig, ring: IoUring, desc: DataView, completer: Completer) {
    this.#cfg = cfg;
    this.ring = ring;
    this.#desc = desc;
    this.#completer = completer;
    this.mode = cfg.mode;
    this.#bounds = new RegionBounds(
      cfg.fileFd,
      cfg.filePath,
      cfg.regionOffsetBytes,
      cfg.fileSizeBytes,
    );
    this.#fsBlockBytes = filesystemBlockBytes(cfg.fileFd, cfg.filePath, cfg.logicalBlockSize);
    this.shared = new QueueShared(cfg.sab, cfg.queues, cfg.queueId);
    for (let tag = 0; tag < cfg.depth; tag++) this.#requests.push(new Request(tag));
    this.#fence = new PunchFence(
      this.#requests,
      QueueFence.create(cfg.sab, fenceRegionOffset(cfg.queues), cfg.queues, cfg.queueId),
      (offset, length) => this.#cache?.invalidate(offset, length),
      () => this.#cache?.clear(),
    );
    this.data = cfg.dataMode === "zero-copy"
      ? new AutoRegisteredBuffers(ring, cfg.depth)
      : new CopyBuffers(ring, cfg.depth, cfg.maxIoBytes, cfg.fixedBuffers);
    // Registered files: the kernel skips the fd lookup and reference per operation. /dev/ublkcN
    // first: the hop's commands name it as FILE_CHAR.
    this.#files = [cfg.charFd, cfg.backingFd, cfg.fileFd, this.data.zeroFd];
    ring.registerFiles(this.#files);
    this.#zeros = new AlignedBuffer(Math.max(2 * this.#fsBlockBytes, 4096));
    const source = fileExtentSource(cfg.fileFd, cfg.filePath);
    this.#cache = cfg.backingFd < 0 ? null : new ExtentCache(source, {
      fileSizeBytes: this.#bounds.sizeBytes,
      maxExtents: cfg.maxExtents,
      blockSize: cfg.logicalBlockSize,
    });
    this.shared.setMode(this.mode);
  }

  // --- 2. a request arrives -------------------------------------------------------------------

  handleRequest(tag: number): void {
    const req = this.#requests[tag]!;
    req.readDescriptor(this.#desc, this.#cfg.regionOffsetBytes);
    const c = this.shared.counters;
    c[Counter.inflight]!++;
    const end = req.offset + req.length;
    const poison = this.#cfg.poisonByte;
    if (poison >= 0 && req.offset <= poison && poison < end) Deno.kill(Deno.pid, "SIGKILL");
    switch (req.op) {
      case UBLK_IO_OP_READ:
      case UBLK_IO_OP_WRITE:
        c[req.op === UBLK_IO_OP_READ ? Counter.reads : Counter.writes]!++;
        if (end > this.#bounds.regionEnd || req.length > this.#cfg.maxIoBytes) {
          return this.#finish(req, -EIO);
        }
        if (req.op === UBLK_IO_OP_WRITE && this.#cfg.readOnly) return this.#finish(req, -EROFS);
        // Past the file's end (someone truncated it): no hole to read as zeros, no regrowing.
        if (end > this.#currentSize()) return this.#finish(req, -EIO);
        this.#admit(req);
        return this.#issue(req);
      case UBLK_IO_OP_FLUSH:
        c[Counter.flushes]!++;
        return this.#flush(req);
      case UBLK_IO_OP_DISCARD:
      case UBLK_IO_OP_WRITE_ZEROES:
        c[req.op === UBLK_IO_OP_DISCARD ? Counter.discards : Counter.writeZeroes]!++;
        if (this.#cfg.readOnly) return this.#finish(req, -EROFS);
        if (end > this.#bounds.regionEnd || end > this.#currentSize()) {
          return this.#finish(req, -EIO);
        }
        this.#fence.defer(req);
        return this.#fence.startReady(this.#startPunch);
      default:
        return this.#finish(req, -EOPNOTSUPP);
    }
  }

  // --- 3. where a byte range goes: the safety policy, in one place ---------------------------

  /**
   * What holds for the whole of a read/write: whether the device may be used at all. The file
   * path is always safe, so it is taken without the lease (file mode), on a filesystem that is
   * not eligible, and over a range being punched, by this queue or another (lib/queue_fence.ts).
   */
  #admit(req: Request): void {
    const punched = this.#fence.punchOver(req);
    req.fileOnly = this.#cache === null
      ? Why.notEligible
      : this.mode === "file"
      ? Why.fileMode
      : punched
      ? Why.punching
      : Why.none;
  }

  /**
   * Where the bytes of `req` from file offset `pos` go: the device at the mapped offset for a
   * plain written extent; zeros for a read of a hole or an unwritten extent (a write there must
   * allocate or convert: the file); the file for every other extent (shared, delalloc, encoded,
   * inline, unaligned: see lib/eligibility.ts) and whenever `#admit` ruled the device out.
   */
  #route(req: Request, pos: number): Placement {
    const p = this.#place;
    const rest = req.offset + req.length - pos;
    let i = -1;
    if (req.fileOnly === Why.none) {
      try {
        i = this.#cache!.lookup(pos);
      } catch (e) {
        // FIEMAP failed (e.g. EIO from the filesystem): the file path is always safe.
        req.fileOnly = Why.fiemapFailed;
        this.shared.counters[Counter.fiemapErrors]!++;
        const errno = e instanceof SyscallError ? e.errno : EIO;
        this.shared.recordError(errno, ERROR_OP_FIEMAP, pos, rest, ErrorPath.file);
      }
    }
    if (i < 0) {
      p.route = Route.file;
      p.lengthBytes = rest;
      return p;
    }
    const cache = this.#cache!;
    p.lengthBytes = Math.min(rest, cache.endAt(i) - pos);
    const kind = cache.kindAt(i);
    if (kind === ExtentKind.direct) {
      p.route = Route.device;
      p.deviceOffset = cache.physicalOf(i, pos);
    } else if (
      req.op === UBLK_IO_OP_READ && (kind === ExtentKind.hole || kind === ExtentKind.unwritten)
    ) {
      p.route = Route.zeros;
    } else {
      p.route = Route.file;
    }
    return p;
  }

  // --- read / write ---------------------------------------------------------------------------

  /**
   * Maps `req` from its cursor on into segments, one per run of pieces that go to the same fd at
   * consecutive offsets, until it is covered or SEG_MAX are in flight (the rest follows when they
   * complete).
   */
  #issue(req: Request): void {
    const write = req.op === UBLK_IO_OP_WRITE;
    const c = this.shared.counters;
    const cfg = this.#cfg;
    let run: Segment | null = null;
    while (req.cursor < req.length && req.segCount < SEG_MAX) {
      const pos = req.offset + req.cursor;
      const p = this.#route(req, pos);
      const len = p.lengthBytes;
      if (p.route === Route.zeros) c[Counter.bytesReadZero]! += len;
      if (p.route === Route.zeros && this.data.fillZeros(req.tag, req.cursor, len)) {
        if (run !== null) this.#submit(req, run);
        run = null;
      } else {
        // Zeros not written in place are read from /dev/zero (its offsets mean nothing: the
        // request's own keep runs together).
        const direct = p.route === Route.device;
        const fd = direct ? cfg.backingFd : p.route === Route.zeros ? this.data.zeroFd : cfg.fileFd;
        const fdOffset = direct ? p.deviceOffset : p.route === Route.zeros ? req.cursor : pos;
        if (run !== null && run.fd === fd && run.fdOffset + run.lengthBytes === fdOffset) {
          run.lengthBytes += len;
        } else {
          if (run !== null) this.#submit(req, run);
          const kind = write ? SegKind.write : SegKind.read;
          const flags = write && (req.flags & UBLK_IO_F_FUA) !== 0 ? RWF_DSYNC : 0;
          run = req.addSegment(kind, fd, fdOffset, req.cursor, len, direct, flags);
        }
        if (p.route !== Route.zeros) {
          c[
            direct
              ? (write ? Counter.bytesWrittenDirect : Counter.bytesReadDirect)
              : (write ? Counter.bytesWrittenFile : Counter.bytesReadFile)
          ]! += len;
        }
        if (!direct && write) {
          req.viaFile = true;
          this.#fileDirty = true;
        }
      }
      req.cursor += len;
    }
    if (run !== null) this.#submit(req, run);
    if (req.pending === 0) this.#readWriteDone(req);
  }

  /** Every backend IO of a read/write finished (or none was needed). */
  #readWriteDone(req: Request): void {
    // Through the file, the filesystem may have allocated or converted blocks: map it afresh.
    // Only now, after the write completed, or a concurrent lookup could cache the old state.
    if (req.viaFile) this.#changed(req.offset, req.length);
    this.#finish(req, req.error < 0 ? req.error : req.length);
  }

  // --- flush ----------------------------------------------------------------------------------

  /** fdatasync of the device, and of the file when something went through it (or no device). */
  #flush(req: Request): void {
    const cfg = this.#cfg;
    req.viaFile = this.#fileDirty || cfg.backingFd < 0;
    this.#fileDirty = false;
    if (cfg.backingFd >= 0) {
      this.#submit(req, req.addSegment(SegKind.fsync, cfg.backingFd, 0, 0, 0, false, 0));
    }
    if (req.viaFile) {
      this.#submit(req, req.addSegment(SegKind.fsync, cfg.fileFd, 0, 0, 0, false, 0));
    }
  }

  // --- discard / write-zeroes -----------------------------------------------------------------

  /** Punches (or zeroes) the range in the file, keeping its size (`Request.addPunchSegments`). */
  #punch(req: Request): void {
    // No direct IO may use a mapping from before the punch: forget it now, steer overlapping
    // requests to the file while the punch runs, and forget it again when it is done.
    this.#cache?.invalidate(req.offset, req.length);
    this.#fileDirty = true;
    req.addPunchSegments(this.#cfg.fileFd, this.#fsBlockBytes);
    for (let i = 0; i < req.segCount; i++) this.#submit(req, req.segments[i]!);
    // A discard within one block: nothing to do.
    if (req.pending === 0) this.#punchDone(req);
  }

  #punchDone(req: Request): void {
    this.#changed(req.offset, req.length);
    this.#fence.punchDone(req);
    if (req.error === 0) this.shared.counters[Counter.bytesDiscarded]! += req.length;
    this.#finish(req, req.error < 0 ? req.error : 0);
  }

  // --- 4. the backend: one submit, one complete -----------------------------------------------

  /** Prepares the SQE of `seg` (again, for a retry) and counts it in flight. */
  #submit(req: Request, seg: Segment): void {
    const ring = this.ring;
    const sqe = ring.sqe();
    switch (seg.kind) {
      case SegKind.read:
      case SegKind.write:
        this.data.prepTransfer(ring, sqe, seg.kind === SegKind.write, req.tag, seg);
        break;
      case SegKind.zeroWrite:
        ring.prepWrite(
          sqe,
          seg.fd,
          this.#zeros.address,
          seg.lengthBytes,
          seg.fdOffset,
          seg.userData,
        );
        break;
      case SegKind.fsync:
        ring.prepFsync(sqe, seg.fd, true, seg.userData);
        break;
      case SegKind.fallocate:
        ring.prepFallocate(sqe, seg.fd, seg.flags, seg.fdOffset, seg.lengthBytes, seg.userData);
        break;
    }
    ring.useFixedFile(sqe, this.#files.indexOf(seg.fd));
    req.pending++;
    this.backendInflight++;
    if (seg.direct) {
      req.direct++;
      this.directInflight++;
    }
  }

  /** A backend CQE (user_data with UD_BACKEND). */
  onBackendCqe(userData: number, res: number): void {
    const req = this.#requests[userData & UD_TAG_MASK]!;
    const seg = req.segments[(userData >>> UD_SEG_SHIFT) & 0xff]!;
    req.pending--;
    this.backendInflight--;
    if (seg.direct) {
      req.direct--;
      this.directInflight--;
    }
    const transfer = seg.kind === SegKind.read || seg.kind === SegKind.write ||
      seg.kind === SegKind.zeroWrite;
    if (res === -EINTR || res === -EAGAIN || (transfer && res > 0 && res < seg.lengthBytes)) {
      if (res > 0) {
        // Short transfer: issue the rest of the segment.
        seg.fdOffset += res;
        seg.dataOffset += res;
        seg.lengthBytes -= res;
      }
      this.shared.counters[Counter.retries]!++;
      return this.#submit(req, seg);
    }
    // 0 bytes for a non-empty transfer: the file ended under us (truncated): an IO error.
    const error = res < 0 ? res : transfer && res === 0 ? -EIO : 0;
    if (error !== 0 && req.error === 0) {
      req.error = error;
      req.errorPath = seg.fd === this.#cfg.backingFd ? ErrorPath.direct : ErrorPath.file;
    }
    if (req.pending !== 0) return;
    switch (req.op) {
      case UBLK_IO_OP_READ:
      case UBLK_IO_OP_WRITE:
        if (req.error === 0 && req.cursor < req.length) {
          req.segCount = 0;
          return this.#issue(req);
        }
        return this.#readWriteDone(req);
      case UBLK_IO_OP_FLUSH:
        // The file's metadata may still be unsynced: flush it again next time.
        if (req.error !== 0 && req.viaFile) this.#fileDirty = true;
        return this.#finish(req, req.error);
      default:
        return this.#punchDone(req);
    }
  }

  // --- 5. the end of a request ----------------------------------------------------------------

  #finish(req: Request, result: number): void {
    if (result < 0) {
      this.shared.recordRequestError(-result, req.op, req.offset, req.length, req.errorPath);
    }
    req.op = OP_NONE;
    this.#fence.requestDone(req);
    this.shared.counters[Counter.inflight]!--;
    this.#completer.complete(req.tag, result);
  }

  // --- between turns --------------------------------------------------------------------------

  /** The chores of a turn: other queues' invalidations, waiting punches. */
  afterTurn(): void {
    this.#fence.applyChanges();
    this.#fence.startReady(this.#startPunch);
  }

  /** Switches mode: new requests follow it at once; direct IO in flight drains (`drained`). */
  setMode(mode: Mode): void {
    this.mode = mode;
    if (mode === "file") this.#cache?.clear();
    else this.#refreshSize(); // the lease is held again: the size is stable until it breaks
    this.shared.setMode(mode);
  }

  /**
   * The device's new size (`fastloop resize`, which grows the file first): requests up to it are
   * served from now on. Posted before the kernel learns the size, so it never sends one past it.
   */
  setDeviceSize(sizeBytes: number): void {
    this.#bounds.setDeviceSize(sizeBytes);
    this.#refreshSize();
  }

  /** Has the IO that the current mode forbids drained? (file: no direct IO in flight) */
  drained(): boolean {
    return this.mode !== "file" || this.directInflight === 0;
  }

  /** The cache statistics to the shared counters (for `stat`: never per IO). */
  publishStats(): void {
    if (this.#cache !== null) this.shared.publishCacheStats(this.#cache.stats());
  }

  close(): void {
    this.data.close();
    this.#zeros.free();
  }

  /**
   * The size IO may reach: in file mode the lease may be gone and anyone may truncate, so the
   * file is asked (a truncate racing with the write itself can still let it extend the file,
   * through the filesystem, which allocates: no foreign block is written either way).
   */
  #currentSize(): number {
    if (this.mode === "file") this.#refreshSize();
    return this.#bounds.sizeBytes;
  }

  #refreshSize(): void {
    if (this.#bounds.refresh()) this.#cache?.resize(this.#bounds.sizeBytes);
  }

  /** The file's mapping changed in a range: forget it here and tell the other queues. */
  #changed(offset: number, length: number): void {
    this.#cache?.invalidate(offset, length);
    this.#fence.changed(offset, length);
  }
}

// --- 1. the ublk queue loop ---------------------------------------------------------------------

/**
 * Runs queue `cfg.queueId` until the device stops (the driver ends the queue's fetches: `UblkHop`
 * `ended`), the main thread posts `quit`, or a hand-over is done: nothing left in service after
 * QUIESCE_DEV's first ABORT (`handOverQuiesce`), or at all (`handOverHold`). Calls `onFetching`
 * once the hop has asked for the first requests (START_DEV and END_USER_RECOVERY wait for that).
 * The hop is per tag, or batched where the device has UBLK_F_BATCH_IO (lib/ublk_hop.ts).
 */
export function runQueue(cfg: QueueConfig, desc: DataView, onFetching: () => void): void {
  const ring = setupQueueRing(cfg.depth, cfg.ringMode);
  const engine: QueueEngine = new QueueEngine(cfg, ring, desc, {
    complete: (tag, result) => hop.complete(tag, result),
  });
  const cx: HopContext = {
    ring,
    charFd: cfg.charFd,
    queueId: cfg.queueId,
    depth: cfg.depth,
    data: engine.data,
    onRequest,
  };
  const hop: UblkHop = cfg.batchIo ? new BatchHop(cx) : new PerTagHop(cx);
  const shared = engine.shared;
  const c = shared.counters;
  const doorbell = new AlignedBuffer(8);
  const postDoorbell = () =>
    ring.prepReadEventfd(ring.sqe(), cfg.eventFd, doorbell.address, UD_DOORBELL);
  let quit = false;
  let handledSeq = shared.postedSeq();
  /** A setMode waiting to be acknowledged until the IO the new mode forbids has drained. */
  let modeSeq = 0;
  /** A hand-over to the next server (`MbOp.handOverQuiesce` or `handOverHold`), or 0. */
  let handOver = 0;
  /** Requests held back for the next server during a `handOverHold`. */
  let held = 0;
  /**
   * The hand-over is done here once nothing is in service (every commit prepared) and, with
   * QUIESCE_DEV, the kernel has begun cancelling: it sends no new request after its ABORTs.
   */
  const handedOver = () =>
    handOver !== 0 && c[Counter.inflight] === 0 && engine.backendInflight === 0 &&
    (handOver === MbOp.handOverHold || hop.aborting());

  const mailbox = () => {
    const seq = shared.postedSeq();
    if (seq === handledSeq) return;
    handledSeq = seq;
    const op = shared.postedOp();
    if (op === MbOp.setMode) {
      engine.setMode(shared.postedMode());
      modeSeq = seq;
      return;
    }
    if (op === MbOp.stats) engine.publishStats();
    if (op === MbOp.setSize) engine.setDeviceSize(shared.postedSizeBytes());
    if (op === MbOp.quit) quit = true;
    else if (op === MbOp.handOverQuiesce || op === MbOp.handOverHold) handOver = op;
    shared.acknowledge(seq);
  };

  function onRequest(tag: number): void {
    // Handing over without QUIESCE: a request not begun is left to the kernel, which re-issues
    // it to the next server (USER_RECOVERY_REISSUE) once this ring closes. One tag is always
    // served, so the queue keeps a posted fetch: cancelling it is how a 6.12 kernel notices.
    if (handOver === MbOp.handOverHold && held < cfg.depth - 1) {
      held++;
      return;
    }
    engine.handleRequest(tag);
  }

  const onCqe = (userData: number, res: number, flags: number) => {
    if (userData & UD_BACKEND) return engine.onBackendCqe(userData, res);
    if (userData === UD_DOORBELL) {
      mailbox();
      if (!quit) postDoorbell();
      return;
    }
    hop.onCqe(userData, res, flags);
  };

  try {
    postDoorbell();
    hop.start();
    ring.submit();
    shared.setState(QueueState.fetching);
    onFetching();
    const wait = new QueueWait(ring, cfg.spinUs, cfg.spinMaxInService);
    for (;;) {
      wait.submitAndWait(c[Counter.inflight]!);
      ring.reapCqes(onCqe);
      engine.afterTurn();
      hop.endTurn();
      c[Counter.turns]!++;
      c[Counter.enters] = ring.enterCalls;
      if (modeSeq !== 0 && engine.drained()) {
        shared.acknowledge(modeSeq);
        modeSeq = 0;
      }
      if (quit || (hop.ended() && engine.backendInflight === 0)) break;
      if (handedOver()) {
        // The last commits go out before the ring closes, or their requests would be re-issued.
        ring.submitOnly();
        break;
      }
    }
    engine.publishStats();
    shared.setState(QueueState.exited);
  } catch (e) {
    shared.setState(QueueState.failed);
    throw e;
  } finally {
    if (handOver === 0) {
      // Closing the ring cancels whatever is still posted (fetches, the doorbell read).
      ring.close();
      engine.close();
      hop.close();
      doorbell.free();
    }
    // Handed over, the ring stays open, with the memory it may still touch, until the process
    // exits. Closed while this thread lives, a 6.12 kernel moves the task work of a request sent
    // to a posted fetch onto this thread, which then takes the request as served by us; nobody
    // gives it back, and the device's quiesce waits for it forever (seen: the next server's
    // START_USER_RECOVERY hung). Closed by the exit, such a request is re-issued, as after a crash.
    if (modeSeq !== 0) shared.acknowledge(modeSeq);
  }
}
