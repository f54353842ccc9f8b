//! Where the data of a queue's requests lives while the backend moves it, and how backend reads
//! and writes reach it: the seam between the request engine (`lib/event_loop.ts`) and the way
//! ublk hands data over.
//!
//! Copy mode (`CopyBuffers`): each tag has a buffer in the server's memory, given to the kernel
//! at FETCH / COMMIT_AND_FETCH; the driver copies a write's data into it before the request
//! arrives and a read's data out of it at commit. Backend IO reads and writes that buffer, as
//! plain READ/WRITE or, with the buffers registered, READ/WRITE_FIXED.
//!
//! Zero copy (`AutoRegisteredBuffers`, UBLK_F_AUTO_BUF_REG, Linux 6.16+): the server holds no data
//! buffers. At FETCH / COMMIT_AND_FETCH the driver is asked (sqe->addr) to register the next
//! request's own pages as fixed buffer `tag` of the queue's ring, and it takes them out again at
//! commit; backend IO is READ_FIXED / WRITE_FIXED on that index, `addr` being the byte offset in
//! the request (several segments of one request share the index). The device's or the file's
//! driver then moves the data straight between the disk and the request's pages. A hole reads as
//! zeros through a fixed read from /dev/zero: there is no user memory to clear.

import type { IoUring } from "../ffi/io_uring.ts";
import { AlignedBuffer, close, O_RDONLY, open } from "../ffi/libc.ts";
import { autoBufReg } from "../ffi/ublk_cmd.ts";
import { SyscallError } from "../ffi/errno.ts";
import type { Segment } from "./request.ts";

export interface RequestData {
  /** "copy", "copy (registered buffers)" or "zero copy": for `stat`, `doctor` and the log. */
  readonly name: string;
  /** The tags' data as user memory (tests read and fill it); null with zero copy. */
  readonly bytes: Uint8Array | null;
  /** Where zeros are read from when `fillZeros` cannot write them in place (-1: never). */
  readonly zeroFd: number;
  /** `addr` of FETCH_REQ / COMMIT_AND_FETCH_REQ for `tag` (in the command payload). */
  fetchAddress(tag: number): number;
  /** sqe->addr of FETCH_REQ / COMMIT_AND_FETCH_REQ for `tag` (0: none). */
  commandSqeAddr(tag: number): number;
  /** Prepares `sqe` to read `seg` into, or write it from, `tag`'s data. */
  prepTransfer(ring: IoUring, sqe: number, write: boolean, tag: number, seg: Segment): void;
  /**
   * Zeros bytes of `tag`'s data (a read of a hole) in place; false when that takes a backend read
   * from `zeroFd` instead.
   */
  fillZeros(tag: number, dataOffset: number, lengthBytes: number): boolean;
  close(): void;
}

export class CopyBuffers implements RequestData {
  readonly name: string;
  readonly bytes: Uint8Array;
  readonly zeroFd = -1;
  /** The buffers are registered with the ring as fixed buffers 0..depth-1. */
  readonly fixed: boolean;
  readonly #buffers: AlignedBuffer;
  readonly #base: number;
  readonly #bytesPerTag: number;

  /**
   * One buffer of `bytesPerTag` per tag. `register` (the default; FASTLOOP_FIXED_BUFFERS=0 turns
   * it off): as fixed buffer `tag` each, so the kernel pins the pages once instead of pinning
   * (and, for reads, dirtying) them on every backend IO. Measured: the CPU time per 1 MiB IO
   * halves on the host (bench/engine_bench.ts); in the 6.12 VM (bench/vm_profile.ts, 1 MiB at
   * QD8, registered against not, same boot) writes 596 against 548 IOPS and reads 691 against 627
   * (an earlier boot: writes 770 against 550). The cost: the whole area is resident and
   * pinned from the start (depth × largest request, 64 MiB per queue at the default depth),
   * where unregistered buffers become resident only as IO touches them (all of it under 1 MiB
   * IO at QD128 anyway). A refused registration (RLIMIT_MEMLOCK without CAP_IPC_LOCK) falls back
   * to plain READ/WRITE.
   */
  constructor(ring: IoUring, depth: number, bytesPerTag: number, register: boolean) {
    this.#buffers = new AlignedBuffer(depth * bytesPerTag);
    this.bytes = this.#buffers.bytes;
    this.#base = Number(this.#buffers.address);
    this.#bytesPerTag = bytesPerTag;
    this.fixed = register && this.#register(ring, depth);
    this.name = this.fixed ? "copy (registered buffers)" : "copy";
  }

  fetchAddress(tag: number): number {
    return this.#base + tag * this.#bytesPerTag;
  }

  commandSqeAddr(): number {
    return 0;
  }

  prepTransfer(ring: IoUring, sqe: number, write: boolean, tag: number, seg: Segment): void {
    const addr = this.#base + tag * this.#bytesPerTag + seg.dataOffset;
    if (this.fixed) {
      if (write) {
        ring.prepWriteFixed(
          sqe,
          seg.fd,
          addr,
          seg.lengthBytes,
          seg.fdOffset,
          tag,
          seg.userData,
          seg.flags,
        );
      } else {
        ring.prepReadFixed(sqe, seg.fd, addr, seg.lengthBytes, seg.fdOffset, tag, seg.userData);
      }
    } else if (write) {
      ring.prepWrite(sqe, seg.fd, addr, seg.lengthBytes, seg.fdOffset, seg.userData, seg.flags);
    } else {
      ring.prepRead(sqe, seg.fd, addr, seg.lengthBytes, seg.fdOffset, seg.userData);
    }
  }

  fillZeros(tag: number, dataOffset: number, lengthBytes: number): boolean {
    const at = tag * this.#bytesPerTag + dataOffset;
    this.bytes.fill(0, at, at + lengthBytes);
    return true;
  }

  close(): void {
    this.#buffers.free();
  }

  #register(ring: IoUring, depth: number): boolean {
    const regions = [];
    for (let tag = 0; tag < depth; tag++) {
      regions.push({ address: BigInt(this.fetchAddress(tag)), lengthBytes: this.#bytesPerTag });
    }
    try {
      ring.registerBuffers(regions);
      return true;
    } catch (e) {
      if (!(e instanceof SyscallError)) throw e;
      // Say why it is not in force (ENOMEM/EPERM: RLIMIT_MEMLOCK); the queue works without it.
      console.error(`fixed buffers not registered: ${e.message}`);
      return false;
    }
  }
}

export class AutoRegisteredBuffers implements RequestData {
  readonly name = "zero copy";
  readonly bytes = null;
  readonly zeroFd: number;

  /** A sparse fixed-buffer table of `depth` slots on `ring`: the driver fills slot `tag`. */
  constructor(ring: IoUring, depth: number) {
    ring.registerSparseBuffers(depth);
    this.zeroFd = open("/dev/zero", O_RDONLY);
  }

  fetchAddress(): number {
    return 0;
  }

  commandSqeAddr(tag: number): number {
    return autoBufReg(tag);
  }

  prepTransfer(ring: IoUring, sqe: number, write: boolean, tag: number, seg: Segment): void {
    // A kernel-registered buffer takes the byte offset into the request as `addr`.
    if (write) {
      ring.prepWriteFixed(
        sqe,
        seg.fd,
        seg.dataOffset,
        seg.lengthBytes,
        seg.fdOffset,
        tag,
        seg.userData,
        seg.flags,
      );
    } else {
      ring.prepReadFixed(
        sqe,
        seg.fd,
        seg.dataOffset,
        seg.lengthBytes,
        seg.fdOffset,
        tag,
        seg.userData,
      );
    }
  }

  fillZeros(): boolean {
    return false;
  }

  close(): void {
    close(this.zeroFd);
  }
}
