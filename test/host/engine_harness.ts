// What the engine's host tests share: a QueueEngine on a real file and device, without the ublk
// hop: requests are written into a descriptor area by the test (as the ublk driver would),
// served on a real io_uring, and completed into a recorder instead of COMMIT_AND_FETCH.

import { IoUring } from "../../ffi/io_uring.ts";
import { close, O_DIRECT, O_RDWR, open } from "../../ffi/libc.ts";
import {
  IO_DESC_NR_SECTORS,
  IO_DESC_OP_FLAGS,
  IO_DESC_SIZE,
  IO_DESC_START_SECTOR,
} from "../../ffi/ublk_cmd.ts";
import { QueueEngine } from "../../lib/event_loop.ts";
import { createSharedState, type Mode, type QueueConfig } from "../../lib/queue_state.ts";

const MiB = 1024 * 1024;
export const DEPTH = 4;
export const MAX_IO = 1 * MiB;

export interface HarnessOptions {
  mode?: Mode;
  fixedBuffers?: boolean;
  /** Several queues of one device: this one's id, their count and their shared state. */
  queueId?: number;
  queues?: number;
  sab?: SharedArrayBuffer;
  /** No filesystem device (a filesystem that is not eligible): everything through the file. */
  withoutDevice?: boolean;
  /** The device is the file's region from here on (`attach --offset`). */
  regionOffsetBytes?: number;
}

/** An engine on `file` with a descriptor area the test fills, and a completion recorder. */
export class Harness {
  readonly ring = IoUring.setup(64, { sqe128: true, cqe32: true });
  readonly descBytes = new ArrayBuffer(DEPTH * IO_DESC_SIZE);
  readonly desc = new DataView(this.descBytes);
  readonly done = new Map<number, number>();
  readonly engine: QueueEngine;
  readonly fileFd: number;
  readonly backingFd: number;
  /**
   * Fault injection: rewrites a backend completion's result before the engine sees it (the IO
   * itself really happened), as a kernel returning EINTR or a short count would.
   */
  rewrite: ((userData: number, res: number) => number) | null = null;

  constructor(
    file: string,
    device: string,
    /** The device's size (the region's length). */
    fileSizeBytes: number,
    opts: HarnessOptions = {},
  ) {
    this.fileFd = open(file, O_RDWR | O_DIRECT);
    this.backingFd = opts.withoutDevice ? -1 : open(device, O_RDWR | O_DIRECT);
    const cfg: QueueConfig = {
      devId: 0,
      queueId: opts.queueId ?? 0,
      queues: opts.queues ?? 1,
      depth: DEPTH,
      maxIoBytes: MAX_IO,
      charFd: -1,
      fileFd: this.fileFd,
      filePath: file,
      backingFd: this.backingFd,
      fileSizeBytes,
      regionOffsetBytes: opts.regionOffsetBytes ?? 0,
      logicalBlockSize: 512,
      readOnly: false,
      mode: opts.mode ?? "fast",
      maxExtents: 1024,
      eventFd: -1,
      poisonByte: -1,
      dataMode: "copy",
      batchIo: false,
      fixedBuffers: opts.fixedBuffers ?? false,
      ringMode: "defer",
      spinUs: 0,
      spinMaxInService: 0,
      queueCpu: -1,
      sab: opts.sab ?? createSharedState(1),
    };
    this.engine = new QueueEngine(cfg, this.ring, this.desc, {
      complete: (tag, result) => this.done.set(tag, result),
    });
  }

  /** Posts a request in `tag`'s descriptor and runs the loop until it completes. */
  serve(tag: number, op: number, offset: number, length: number, flags = 0): number {
    this.post(tag, op, offset, length, flags);
    while (!this.done.has(tag)) this.turn(true);
    return this.done.get(tag)!;
  }

  /**
   * Posts a request in `tag`'s descriptor and hands it to the engine; its backend SQEs are only
   * prepared (they reach the kernel with the next `turn`).
   */
  post(tag: number, op: number, offset: number, length: number, flags = 0): void {
    const base = tag * IO_DESC_SIZE;
    this.desc.setUint32(base + IO_DESC_OP_FLAGS, op | flags, true);
    this.desc.setUint32(base + IO_DESC_NR_SECTORS, length / 512, true);
    this.desc.setBigUint64(base + IO_DESC_START_SECTOR, BigInt(offset / 512), true);
    this.done.delete(tag);
    this.engine.handleRequest(tag);
  }

  /**
   * One turn of the loop: submit, wait for a completion (or only look; nothing to wait for when
   * no backend IO is in flight), dispatch, chores.
   */
  turn(wait: boolean): void {
    if (wait && this.engine.backendInflight > 0) this.ring.submitAndWait(1);
    else this.ring.getEvents();
    this.ring.reapCqes((ud, res) =>
      this.engine.onBackendCqe(ud, this.rewrite ? this.rewrite(ud, res) : res)
    );
    this.engine.afterTurn();
  }

  /** The bytes of `tag`'s buffer. */
  buffer(tag: number, length: number): Uint8Array {
    return this.engine.data.bytes!.slice(tag * MAX_IO, tag * MAX_IO + length);
  }

  fill(tag: number, data: Uint8Array): void {
    this.engine.data.bytes!.set(data, tag * MAX_IO);
  }

  counter(k: number): number {
    return this.engine.shared.counters[k]!;
  }

  close(): void {
    this.engine.close();
    this.ring.close();
    close(this.fileFd);
    if (this.backingFd >= 0) close(this.backingFd);
  }
}
