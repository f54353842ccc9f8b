//! One ublk device serving one file: creation (ADD_DEV, SET_PARAMS, one Worker per queue that
//! fetches every tag, then START_DEV — or, for a device left by a dead server, START/END
//! USER_RECOVERY), mode switches posted to the queues' mailboxes, counters read from shared
//! memory (`lib/queue_state.ts`), and teardown (STOP_DEV, drain, flush, DEL_DEV).
//!
//! Start-up is all or nothing: if any step fails, the Workers are told to quit, a START_DEV still
//! waiting for them is cancelled, /dev/ublkcN is closed and the device deleted, so no half-made
//! device remains.

import { close, fdatasync, O_RDWR, open } from "../ffi/libc.ts";
import { EBUSY, ENOENT, SyscallError } from "../ffi/errno.ts";
import {
  type DevInfo,
  hasFeature,
  SECTOR_SHIFT,
  UBLK_ATTR_FUA,
  UBLK_ATTR_READ_ONLY,
  UBLK_ATTR_VOLATILE_CACHE,
  UBLK_F_AUTO_BUF_REG,
  UBLK_F_BATCH_IO,
  UBLK_F_CMD_IOCTL_ENCODE,
  UBLK_F_NO_AUTO_PART_SCAN,
  UBLK_F_QUIESCE,
  UBLK_F_SUPPORT_ZERO_COPY,
  UBLK_F_USER_RECOVERY,
  UBLK_F_USER_RECOVERY_REISSUE,
  UBLK_IO_BUF_MAX_BYTES,
  UBLK_MAX_QUEUE_DEPTH,
  UBLK_S_DEV_DEAD,
  UBLK_STATE_NAMES,
} from "../ffi/ublk_cmd.ts";
import { UblkControl } from "./ublk_control.ts";
import {
  closeQueues,
  joinQueues,
  latestError,
  postToQueues,
  type Queue,
  startQueues,
} from "./device_queues.ts";
import {
  Counter,
  createSharedState,
  type DataMode,
  type LastError,
  MbOp,
  type Mode,
  type QueueConfig,
} from "./queue_state.ts";
import { UserError } from "./errors.ts";

export interface DeviceOptions {
  filePath: string;
  /** The one fd of the file (O_RDWR|O_DIRECT, or O_RDONLY|O_DIRECT), the lease's fd. */
  fileFd: number;
  /** The device's size: the length of its region of the file. */
  fileSizeBytes: number;
  /** Where the device starts in the file (`attach --offset`). */
  regionOffsetBytes: number;
  /** The filesystem's block device, O_RDWR|O_DIRECT, or -1 when not eligible. */
  backingFd: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  readOnly: boolean;
  queues: number;
  depth: number;
  maxIoBytes: number;
  mode: Mode;
  recoverable: boolean;
  /** Take over this existing device (its server died) instead of adding a new one. */
  recoverDeviceId?: number;
  /** Extents cached per queue (default 1 Mi). */
  maxExtents?: number;
  /** Fault injection (tests): a request covering this byte kills the server; -1 or absent: off. */
  poisonByte?: number;
}

export interface DeviceCounters {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  writeZeroes: number;
  bytesRead: { direct: number; file: number; zero: number };
  bytesWritten: { direct: number; file: number };
  bytesDiscarded: number;
  cacheHits: number;
  cacheMisses: number;
  fiemapCalls: number;
  extentsCached: number;
  extentCacheBytes: number;
  inflight: number;
  /** Requests completed with an error: all, by kind, and the latest (any queue). */
  errors: number;
  errorsByKind: { eio: number; enospc: number; other: number };
  fiemapErrors: number;
  lastError: (Omit<LastError, "atMs"> & { at: string }) | null;
  retries: number;
  /** Turns of the queues' loops and their io_uring_enter calls: wake-ups and syscalls per IO. */
  loopTurns: number;
  ringEnters: number;
}

export interface Device {
  id: number;
  blockPath: string;
  charPath: string;
  /** What the kernel granted: queues (may be fewer than asked), depth, UBLK_F_* flags. */
  queues: number;
  depth: number;
  maxIoBytes: number;
  flags: bigint;
  features: bigint;
  /** How request data reaches the backend: zero copy (UBLK_F_AUTO_BUF_REG) or copy. */
  dataMode: DataMode;
  /** How requests come and go: per tag, or batched (UBLK_F_BATCH_IO; lib/ublk_hop.ts). */
  ublkCommands: UblkCommands;
  setMode(mode: Mode): Promise<void>;
  /**
   * Grows the device to `sizeBytes` (`fastloop resize`; UBLK_F_UPDATE_SIZE): the queues first,
   * then the kernel, so no request past the size the queues serve can arrive.
   */
  resize(sizeBytes: number): Promise<void>;
  /** The queues' counters, the extent cache's figures fresh (each queue is asked for them). */
  counters(): Promise<DeviceCounters>;
  stop(): Promise<void>;
  delete(): Promise<void>;
  /**
   * Lets the device go without stopping it, as a dying server would: the queues quit and
   * /dev/ublkcN closes, and with user recovery its IO waits for the next server.
   */
  abandon(): Promise<void>;
  /**
   * Hands the device to the next server (`fastloop restart`, lib/handover.ts): like `abandon`,
   * but nothing in service is cut off and nothing is failed. Resolves with how, for the log.
   */
  handOver(): Promise<string>;
}

const DEFAULT_MAX_EXTENTS = 1 << 20;
/** Largest discard / write-zeroes request: one fallocate each, no buffer involved. */
const MAX_DISCARD_BYTES = 1 << 30;
/** The largest request with zero copy: fio's and the page cache's 1 MiB IO in one piece. */
const ZERO_COPY_MAX_IO_BYTES = 1 << 20;
/** How long a stopped queue may take to see its last ABORT before it is told to quit. */
const QUEUE_EXIT_TIMEOUT_MS = 10_000;
/** How long QUIESCE_DEV may wait for each queue to have an idle tag (backend IO to finish). */
const QUIESCE_TIMEOUT_MS = 10_000;

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Opens /dev/ublkcN, waiting briefly for devtmpfs (new device) or the old server (recovery). */
async function openChar(path: string): Promise<number> {
  for (let attempt = 0;; attempt++) {
    try {
      return open(path, O_RDWR);
    } catch (e) {
      const retry = e instanceof SyscallError && (e.errno === ENOENT || e.errno === EBUSY);
      if (!retry || attempt >= 100) throw e;
      await sleep(20);
    }
  }
}

async function waitForNode(path: string): Promise<void> {
  for (let attempt = 0; attempt < 250; attempt++) {
    try {
      Deno.statSync(path);
      return;
    } catch {
      await sleep(20);
    }
  }
  throw new UserError(`${path} did not appear after the device started`);
}

class UblkDevice implements Device {
  readonly id: number;
  readonly blockPath: string;
  readonly charPath: string;
  readonly queues: number;
  readonly depth: number;
  readonly maxIoBytes: number;
  readonly flags: bigint;
  readonly features: bigint;
  readonly dataMode: DataMode;
  readonly ublkCommands: UblkCommands;
  readonly #ctl: UblkControl;
  readonly #opts: DeviceOptions;
  readonly #q: Queue[];
  #charFd: number;
  #mailbox: Promise<void> = Promise.resolve();
  #stopped = false;
  #deleted = false;

  constructor(
    ctl: UblkControl,
    opts: DeviceOptions,
    info: DevInfo,
    features: bigint,
    charFd: number,
    queues: Queue[],
  ) {
    this.#ctl = ctl;
    this.#opts = opts;
    this.id = info.devId;
    this.blockPath = `/dev/ublkb${info.devId}`;
    this.charPath = `/dev/ublkc${info.devId}`;
    this.queues = info.nrHwQueues;
    this.depth = info.queueDepth;
    this.maxIoBytes = info.maxIoBufBytes;
    this.flags = info.flags;
    this.features = features;
    this.dataMode = dataModeOf(info.flags);
    this.ublkCommands = ublkCommandsOf(info.flags);
    this.#charFd = charFd;
    this.#q = queues;
  }

  /** New requests follow `mode` at once; resolves once every queue has drained for it. */
  setMode(mode: Mode): Promise<void> {
    // One command at a time: each queue's mailbox has one slot.
    const next = this.#mailbox.then(() => postToQueues(this.#q, MbOp.setMode, mode));
    this.#mailbox = next.catch(() => {});
    return next;
  }

  resize(sizeBytes: number): Promise<void> {
    const next = this.#mailbox.then(async () => {
      await postToQueues(this.#q, MbOp.setSize, undefined, sizeBytes);
      await this.#ctl.updateSize(this.id, sizeBytes / 512);
    });
    this.#mailbox = next.catch(() => {});
    return next;
  }

  async counters(): Promise<DeviceCounters> {
    // One command at a time per mailbox, as for setMode.
    const asked = this.#mailbox.then(() => postToQueues(this.#q, MbOp.stats));
    this.#mailbox = asked.catch(() => {});
    await asked;
    const sum = (k: number) => this.#q.reduce((s, q) => s + q.shared.counters[k]!, 0);
    return {
      reads: sum(Counter.reads),
      writes: sum(Counter.writes),
      flushes: sum(Counter.flushes),
      discards: sum(Counter.discards),
      writeZeroes: sum(Counter.writeZeroes),
      bytesRead: {
        direct: sum(Counter.bytesReadDirect),
        file: sum(Counter.bytesReadFile),
        zero: sum(Counter.bytesReadZero),
      },
      bytesWritten: {
        direct: sum(Counter.bytesWrittenDirect),
        file: sum(Counter.bytesWrittenFile),
      },
      bytesDiscarded: sum(Counter.bytesDiscarded),
      cacheHits: sum(Counter.cacheHits),
      cacheMisses: sum(Counter.cacheMisses),
      fiemapCalls: sum(Counter.fiemapCalls),
      extentsCached: sum(Counter.extentsCached),
      extentCacheBytes: sum(Counter.extentCacheBytes),
      inflight: sum(Counter.inflight),
      errors: sum(Counter.errors),
      errorsByKind: {
        eio: sum(Counter.errorsEio),
        enospc: sum(Counter.errorsEnospc),
        other: sum(Counter.errorsOther),
      },
      fiemapErrors: sum(Counter.fiemapErrors),
      lastError: latestError(this.#q.map((q) => q.shared)),
      retries: sum(Counter.retries),
      loopTurns: sum(Counter.turns),
      ringEnters: sum(Counter.enters),
    };
  }

  /** STOP_DEV (the kernel drains the block device through the queues), join, flush. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    try {
      await this.#ctl.stopDevice(this.id);
    } finally {
      await joinQueues(this.#q, QUEUE_EXIT_TIMEOUT_MS);
      // Everything acknowledged is on the devices' media, not only in their caches.
      try {
        if (this.#opts.backingFd >= 0) fdatasync(this.#opts.backingFd, "backing device");
        fdatasync(this.#opts.fileFd, this.#opts.filePath);
      } finally {
        closeQueues(this.#q);
        if (this.#charFd >= 0) close(this.#charFd);
        this.#charFd = -1;
      }
    }
  }

  async abandon(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#deleted = true;
    try {
      void postToQueues(this.#q, MbOp.quit);
      await joinQueues(this.#q, QUEUE_EXIT_TIMEOUT_MS);
    } finally {
      closeQueues(this.#q);
      if (this.#charFd >= 0) close(this.#charFd);
      this.#charFd = -1;
      this.#ctl.close();
    }
  }

  /**
   * With UBLK_F_QUIESCE (6.16+), QUIESCE_DEV: the kernel sends no new request and cancels the
   * queues' fetches, the queues finish what they serve. Without it (6.12), each queue holds back
   * what arrives from now on and ends once it serves nothing; closing its ring makes the kernel
   * re-issue what it held to the next server (USER_RECOVERY_REISSUE). Then everything is flushed
   * (the next server's first FLUSH cannot know what went through the file before it) and
   * /dev/ublkcN closes; the device stays, its IO waiting.
   * (A device with batched ublk commands is made without UBLK_F_QUIESCE: see `createDevice`.)
   */
  async handOver(): Promise<string> {
    if (this.#stopped) throw new Error(`${this.blockPath} is stopping already`);
    this.#stopped = true;
    this.#deleted = true;
    await this.#mailbox;
    try {
      let how = "new requests held back for the next server (USER_RECOVERY_REISSUE)";
      if (hasFeature(this.flags, UBLK_F_QUIESCE)) {
        await postToQueues(this.#q, MbOp.handOverQuiesce);
        try {
          await this.#ctl.quiesceDevice(this.id, QUIESCE_TIMEOUT_MS);
          how = "quiesced (UBLK_U_CMD_QUIESCE_DEV)";
        } catch (e) {
          // EBUSY: a queue served every tag for that long. New requests wait in the kernel
          // already; what the queues still serve, they finish (or the kernel re-issues it).
          await postToQueues(this.#q, MbOp.handOverHold);
          how = `QUIESCE_DEV failed (${e instanceof Error ? e.message : e}); held back instead`;
        }
      } else {
        await postToQueues(this.#q, MbOp.handOverHold);
      }
      await joinQueues(this.#q, QUEUE_EXIT_TIMEOUT_MS);
      try {
        if (this.#opts.backingFd >= 0) fdatasync(this.#opts.backingFd, "backing device");
        fdatasync(this.#opts.fileFd, this.#opts.filePath);
      } catch (e) {
        how += `; flush failed: ${e instanceof Error ? e.message : e}`;
      }
      return how;
    } finally {
      closeQueues(this.#q);
      if (this.#charFd >= 0) close(this.#charFd);
      this.#charFd = -1;
      this.#ctl.close();
    }
  }

  /** DEL_DEV (after stop; stops first if needed), then closes the control device. */
  async delete(): Promise<void> {
    if (this.#deleted) return;
    if (!this.#stopped) await this.stop();
    this.#deleted = true;
    try {
      await this.#ctl.deleteDevice(this.id);
    } finally {
      this.#ctl.close();
    }
  }
}

/**
 * Creates (or, with `recoverDeviceId`, takes over) a ublk device serving `opts.filePath` and
 * resolves once /dev/ublkbN is live.
 */
export async function createDevice(opts: DeviceOptions): Promise<Device> {
  validateOptions(opts);
  const ctl = UblkControl.open();
  let features = 0n;
  let info: DevInfo | undefined;
  let added = false;
  let charFd = -1;
  let queues: Queue[] = [];
  let startCmd: Promise<void> | undefined;
  try {
    features = ctl.getFeatures();
    const recovering = opts.recoverDeviceId !== undefined;
    if (recovering) {
      info = await ctl.getDeviceInfo(opts.recoverDeviceId!);
      if (info.state === UBLK_S_DEV_DEAD) {
        throw new UserError(
          `ublk device ${info.devId} cannot be recovered: it is ${UBLK_STATE_NAMES[info.state]}`,
        );
      }
      // EBUSY until the dead server's /dev/ublkcN is released (its rings are torn down
      // asynchronously after it exits): give it a few seconds.
      for (let attempt = 0;; attempt++) {
        try {
          await ctl.startUserRecovery(info.devId);
          break;
        } catch (e) {
          if (!(e instanceof SyscallError && e.errno === EBUSY) || attempt >= 100) throw e;
          await sleep(100);
        }
      }
    } else {
      let flags = 0n;
      const batchIo = batchIoWanted(features);
      if (hasFeature(features, UBLK_F_CMD_IOCTL_ENCODE)) flags |= BigInt(UBLK_F_CMD_IOCTL_ENCODE);
      // No partition scan inside START_DEV (7.0+): `attach --partscan` scans once the device is
      // live (lib/partitions.ts). Older kernels scan there whatever we ask.
      if (hasFeature(features, UBLK_F_NO_AUTO_PART_SCAN)) flags |= BigInt(UBLK_F_NO_AUTO_PART_SCAN);
      if (opts.recoverable && hasFeature(features, UBLK_F_USER_RECOVERY)) {
        flags |= BigInt(UBLK_F_USER_RECOVERY);
        if (hasFeature(features, UBLK_F_USER_RECOVERY_REISSUE)) {
          flags |= BigInt(UBLK_F_USER_RECOVERY_REISSUE);
        }
        // `fastloop restart` hands the device over with QUIESCE_DEV where the kernel has it. Not
        // a device with batched ublk commands: quiesced, the 7.3.4 driver kept failing every
        // request once the next server had taken over (fio saw EIO right after the first
        // restart; it leaves the queues' force_abort set, fixed upstream by "ublk: clear
        // force_abort in ublk_queue_reset_io_flags()"). Such a device is handed over by holding
        // requests back, as on 6.12: the path of a crash, without the crash.
        if (hasFeature(features, UBLK_F_QUIESCE) && !batchIo) flags |= BigInt(UBLK_F_QUIESCE);
      }
      // Zero copy where the kernel offers it: no data buffers in the server, so buffer memory
      // no longer bounds the largest request either.
      const zeroCopy = zeroCopyWanted(features);
      if (zeroCopy) flags |= BigInt(UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_AUTO_BUF_REG);
      if (batchIo) flags |= BigInt(UBLK_F_BATCH_IO);
      info = await ctl.addDevice({
        queues: opts.queues,
        depth: opts.depth,
        maxIoBytes: zeroCopy ? ZERO_COPY_MAX_IO_BYTES : opts.maxIoBytes,
        flags,
      });
      added = true;
      await ctl.setParams(
        info.devId,
        {
          attrs: UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA |
            (opts.readOnly ? UBLK_ATTR_READ_ONLY : 0),
          logicalBsShift: log2(opts.logicalBlockSize),
          physicalBsShift: log2(Math.max(opts.physicalBlockSize, opts.logicalBlockSize)),
          ioOptShift: log2(Math.max(opts.physicalBlockSize, opts.logicalBlockSize)),
          ioMinShift: log2(Math.max(opts.physicalBlockSize, opts.logicalBlockSize)),
          maxSectors: info.maxIoBufBytes >> SECTOR_SHIFT,
          chunkSectors: 0,
          devSectors: Math.floor(opts.fileSizeBytes / 512),
        },
        opts.readOnly ? undefined : {
          alignment: 0,
          // A punch frees whole filesystem blocks; 4 KiB is the block of ext4 and xfs here.
          granularity: Math.max(4096, opts.logicalBlockSize),
          maxDiscardSectors: MAX_DISCARD_BYTES >> SECTOR_SHIFT,
          maxWriteZeroesSectors: MAX_DISCARD_BYTES >> SECTOR_SHIFT,
          maxSegments: 1,
        },
      );
    }
    charFd = await openChar(`/dev/ublkc${info.devId}`);
    const sab = createSharedState(info.nrHwQueues);
    let failure: ((m: string) => void) | undefined;
    const failed = new Promise<never>((_, reject) => {
      failure = (m) => reject(new Error(m));
    });
    failed.catch(() => {});
    const started = startQueues({
      devId: info.devId,
      queues: info.nrHwQueues,
      depth: info.queueDepth,
      maxIoBytes: info.maxIoBufBytes,
      charFd,
      fileFd: opts.fileFd,
      filePath: opts.filePath,
      backingFd: opts.backingFd,
      fileSizeBytes: opts.fileSizeBytes,
      regionOffsetBytes: opts.regionOffsetBytes,
      logicalBlockSize: opts.logicalBlockSize,
      readOnly: opts.readOnly,
      mode: opts.mode,
      maxExtents: opts.maxExtents ?? DEFAULT_MAX_EXTENTS,
      // A recovered device keeps the data mode it was created with.
      dataMode: dataModeOf(info.flags),
      batchIo: ublkCommandsOf(info.flags) === "batched",
      poisonByte: opts.poisonByte ?? -1,
      ...benchmarkSwitches(),
      sab,
    }, (m) => failure!(m));
    queues = started.queues;
    await Promise.race([started.fetching, failed]);
    // START_DEV (END_USER_RECOVERY) returns once every tag is fetched; a queue failing while
    // it waits must not leave us waiting forever.
    startCmd = recovering
      ? ctl.endUserRecovery(info.devId, Deno.pid)
      : ctl.startDevice(info.devId, Deno.pid);
    await Promise.race([startCmd, failed]);
    startCmd = undefined;
    const device = new UblkDevice(ctl, opts, info, features, charFd, queues);
    await waitForNode(device.blockPath);
    return device;
  } catch (e) {
    await teardown(ctl, info, added, charFd, queues, startCmd);
    throw e;
  }
}

/** Undoes a partial start: quit the queues, cancel a waiting START_DEV, close, delete. */
async function teardown(
  ctl: UblkControl,
  info: DevInfo | undefined,
  added: boolean,
  charFd: number,
  queues: Queue[],
  startCmd: Promise<void> | undefined,
): Promise<void> {
  try {
    if (startCmd) {
      ctl.cancelPending();
      await startCmd.catch(() => {});
    }
    void postToQueues(queues, MbOp.quit);
    await joinQueues(queues, 2000);
    closeQueues(queues);
    if (charFd >= 0) close(charFd);
    if (added && info) {
      await ctl.stopDevice(info.devId).catch(() => {});
      await ctl.deleteDevice(info.devId).catch(() => {});
    }
  } finally {
    ctl.close();
  }
}

export type UblkCommands = "per-tag" | "batched";

/** The ublk commands of a device created with `flags`: per tag, or batched (UBLK_F_BATCH_IO). */
function ublkCommandsOf(flags: bigint): UblkCommands {
  return hasFeature(flags, UBLK_F_BATCH_IO) ? "batched" : "per-tag";
}

/** The data mode of a device created with `flags` (dev_info.flags). */
export function dataModeOf(flags: bigint): DataMode {
  return hasFeature(flags, UBLK_F_AUTO_BUF_REG) ? "zero-copy" : "copy";
}

/**
 * Zero copy for a new device when the kernel has UBLK_F_AUTO_BUF_REG (6.16+);
 * FASTLOOP_ZERO_COPY=0 keeps the copy mode (tests and benchmarks compare the two).
 */
function zeroCopyWanted(features: bigint): boolean {
  return hasFeature(features, UBLK_F_AUTO_BUF_REG | UBLK_F_SUPPORT_ZERO_COPY) &&
    Deno.env.get("FASTLOOP_ZERO_COPY") !== "0";
}

/**
 * Batched ublk commands (UBLK_F_BATCH_IO, 7.0+) for a new device: FASTLOOP_BATCH_IO=1 asks for
 * them where the kernel has them (lib/ublk_hop.ts).
 */
function batchIoWanted(features: bigint): boolean {
  return hasFeature(features, UBLK_F_BATCH_IO) && Deno.env.get("FASTLOOP_BATCH_IO") === "1";
}

/**
 * The queue engine's switches, read here on the main thread (the Workers read no environment):
 * FASTLOOP_SPIN_US, the longest a queue spins for completions before it sleeps (default
 * `SPIN_US_DEFAULT`, 0: never spin), and FASTLOOP_SPIN_MAX_IN_SERVICE, above how many requests in
 * service it sleeps at once (default `SPIN_MAX_IN_SERVICE_DEFAULT`); FASTLOOP_FIXED_BUFFERS=0
 * leaves the copy mode's buffers unregistered (lib/request_data.ts says what registering costs
 * and buys); for benchmarks
 * FASTLOOP_QUEUE_RING=coop|plain picks a simpler ring, FASTLOOP_QUEUE_CPU=N pins each queue's
 * thread to CPU N.
 */
function benchmarkSwitches(): Pick<
  QueueConfig,
  "fixedBuffers" | "ringMode" | "spinUs" | "spinMaxInService" | "queueCpu"
> {
  const ring = Deno.env.get("FASTLOOP_QUEUE_RING");
  const cpu = Deno.env.get("FASTLOOP_QUEUE_CPU");
  return {
    queueCpu: cpu === undefined || cpu === "" ? -1 : Number(cpu),
    fixedBuffers: Deno.env.get("FASTLOOP_FIXED_BUFFERS") !== "0",
    ringMode: ring === "coop" || ring === "plain" ? ring : "defer",
    spinUs: spinUsOf(Deno.env.get("FASTLOOP_SPIN_US")),
    spinMaxInService: spinMaxInServiceOf(Deno.env.get("FASTLOOP_SPIN_MAX_IN_SERVICE")),
  };
}

/**
 * How long a queue spins for completions before sleeping, at most (`QueueWait` in
 * lib/queue_ring.ts: only while completions keep coming back within it). Measured in the TCG VM
 * at 4k QD1 (bench/vm_profile.ts, 7.3, zero copy, one boot): no spin 916 IOPS (p50 807 µs),
 * 200 µs 1044, 500 µs 1889 (313 µs), 1 ms 2183 (276 µs), against the raw disk's 2835 (226 µs)
 * and ublksrv's 1295 (528 µs). Fast disks on real CPUs complete well within it; slow ones turn
 * the spin off.
 */
export const SPIN_US_DEFAULT = 1000;

function spinUsOf(value: string | undefined): number {
  const n = Number(value);
  return value === undefined || value === "" || !Number.isFinite(n) || n < 0
    ? SPIN_US_DEFAULT
    : Math.min(n, 100_000);
}

/**
 * A queue with more requests than this in service sleeps instead of spinning: completions then
 * come often enough that a sleep collects several, while a spin wakes the loop for each one (two
 * io_uring_enter calls per turn). Measured in the 7.3 TCG VM (zero copy, bench/vm_profile.ts,
 * this limit against spinning always, same boot): 4k randread QD32 1.57 -> 0.61 enters per IO,
 * 141 -> 127 µs of VM CPU per IO (another boot: 161 -> 107), IOPS within the noise; 1 MiB writes
 * at QD8 1544 -> 1791 IOPS, 872 -> 708 µs per IO. QD1 to QD4 keep the spin, unchanged.
 */
export const SPIN_MAX_IN_SERVICE_DEFAULT = 4;

function spinMaxInServiceOf(value: string | undefined): number {
  const n = Number(value);
  return value === undefined || value === "" || !Number.isInteger(n) || n < 0
    ? SPIN_MAX_IN_SERVICE_DEFAULT
    : n;
}

function validateOptions(opts: DeviceOptions): void {
  const bad = (what: string) => {
    throw new UserError(`Invalid device option: ${what}`);
  };
  if (!(opts.queues >= 1 && opts.queues <= 64)) bad(`queues ${opts.queues} (1..64)`);
  // Offsets reach the SQEs as numbers: one that is not an exact byte count must never get there.
  if (!(Number.isSafeInteger(opts.regionOffsetBytes) && opts.regionOffsetBytes >= 0)) {
    bad(`region offset ${opts.regionOffsetBytes} (a byte count)`);
  }
  if (!(opts.depth >= 1 && opts.depth <= UBLK_MAX_QUEUE_DEPTH)) {
    bad(`depth ${opts.depth} (1..${UBLK_MAX_QUEUE_DEPTH})`);
  }
  if (
    !(opts.maxIoBytes >= 4096 && opts.maxIoBytes <= UBLK_IO_BUF_MAX_BYTES &&
      opts.maxIoBytes % 4096 === 0)
  ) {
    bad(`maxIoBytes ${opts.maxIoBytes} (a multiple of 4096 up to ${UBLK_IO_BUF_MAX_BYTES})`);
  }
  for (const bs of [opts.logicalBlockSize, opts.physicalBlockSize]) {
    if (!(bs >= 512 && bs <= 4096 && (bs & (bs - 1)) === 0)) bad(`block size ${bs}`);
  }
  if (opts.fileSizeBytes <= 0 || opts.fileSizeBytes % opts.logicalBlockSize !== 0) {
    bad(`file size ${opts.fileSizeBytes} (a multiple of ${opts.logicalBlockSize})`);
  }
}
