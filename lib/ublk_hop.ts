//! The ublk hop of one queue: how its requests come from the driver, and how each finished one
//! goes back. `runQueue` (lib/event_loop.ts) drives one of the two, chosen by the device's flags.
//!
//! Per tag (`PerTagHop`, every kernel): one FETCH_REQ per tag at start; a finished request goes
//! back with COMMIT_AND_FETCH_REQ, which also asks for the tag's next request. One SQE and one CQE
//! per request.
//!
//! Batched (`BatchHop`, UBLK_F_BATCH_IO, Linux 7.0+): PREP_IO_CMDS readies every tag at start;
//! two multishot FETCH_IO_CMDS deliver the tags of new requests into provided buffers, as many
//! per CQE as arrived since the last one; the requests a turn finishes go back together in one
//! COMMIT_IO_CMDS, which readies their tags again. The driver ties no tag to a task then.

import {
  IORING_CQE_F_BUF_MORE,
  IORING_CQE_F_BUFFER,
  IORING_CQE_F_MORE,
  IOU_PBUF_RING_INC,
  type IoUring,
  ProvidedBufferRing,
} from "../ffi/io_uring.ts";
import { AlignedBuffer } from "../ffi/libc.ts";
import { ENOBUFS, errnoName } from "../ffi/errno.ts";
import {
  ELEM_BUF_ADDR,
  ELEM_BUF_INDEX,
  ELEM_HEADER_SIZE,
  ELEM_RESULT,
  ELEM_TAG,
  FETCH_ELEM_BYTES,
  prepBatchCommand,
  prepIoCommand,
  UBLK_BATCH_F_HAS_BUF_ADDR,
  UBLK_IO_RES_ABORT,
  UBLK_IO_RES_OK,
  UBLK_U_IO_COMMIT_AND_FETCH_REQ,
  UBLK_U_IO_COMMIT_IO_CMDS,
  UBLK_U_IO_FETCH_IO_CMDS,
  UBLK_U_IO_FETCH_REQ,
  UBLK_U_IO_PREP_IO_CMDS,
} from "../ffi/ublk_cmd.ts";
import { UD_BATCH } from "./request.ts";
import type { RequestData } from "./request_data.ts";

/** The registered file index of /dev/ublkcN (the engine registers it first). */
export const FILE_CHAR = 0;

/** A queue's side of the hop, as `runQueue` drives it. */
export interface UblkHop {
  /** Asks for the queue's first requests (before START_DEV / END_USER_RECOVERY waits on them). */
  start(): void;
  /** A CQE of one of the hop's commands: calls `onRequest(tag)` for each new request. */
  onCqe(userData: number, res: number, flags: number): void;
  /** Gives a finished request back (`Completer` of the engine). */
  complete(tag: number, result: number): void;
  /** The end of a loop turn: what the turn gave back goes out with the next submit. */
  endTurn(): void;
  /** The driver has begun ending the queue's fetches (STOP_DEV, QUIESCE_DEV). */
  aborting(): boolean;
  /** Every fetch has ended and every commit gone out: the queue is done with the driver. */
  ended(): boolean;
  close(): void;
}

/** The fixed parts of a hop: whose queue, on which ring, where request data lives. */
export interface HopContext {
  ring: IoUring;
  charFd: number;
  queueId: number;
  depth: number;
  data: RequestData;
  onRequest: (tag: number) => void;
}

/** FETCH_REQ per tag, COMMIT_AND_FETCH_REQ per request (user_data: the tag). */
export class PerTagHop implements UblkHop {
  readonly #cx: HopContext;
  /** Tags whose fetch ended with ABORT: the device is stopping or quiescing. */
  #aborted = 0;

  constructor(cx: HopContext) {
    this.#cx = cx;
  }

  start(): void {
    for (let tag = 0; tag < this.#cx.depth; tag++) this.#command(UBLK_U_IO_FETCH_REQ, tag, 0);
  }

  complete(tag: number, result: number): void {
    this.#command(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
  }

  onCqe(tag: number, res: number): void {
    if (res === UBLK_IO_RES_OK) return this.#cx.onRequest(tag);
    if (res === UBLK_IO_RES_ABORT) {
      this.#aborted++;
      return;
    }
    // Any other result means the command itself was refused: the queue cannot go on.
    throw new Error(
      `queue ${this.#cx.queueId} tag ${tag}: ublk command failed with ${res} (${errnoName(-res)})`,
    );
  }

  endTurn(): void {}

  aborting(): boolean {
    return this.#aborted > 0;
  }

  ended(): boolean {
    return this.#aborted === this.#cx.depth;
  }

  close(): void {}

  #command(op: number, tag: number, result: number): void {
    const { ring, data } = this.#cx;
    const sqe = ring.sqe();
    const addr = data.fetchAddress(tag);
    prepIoCommand(
      ring,
      sqe,
      this.#cx.charFd,
      op,
      this.#cx.queueId,
      tag,
      result,
      addr,
      data.commandSqeAddr(tag),
      tag,
    );
    ring.useFixedFile(sqe, FILE_CHAR);
  }
}

// user_data of the batched commands: UD_BATCH | kind << 8 | index (the fetch, the commit buffer).
const KIND_SHIFT = 8;
const KIND_PREP = 1;
const KIND_FETCH = 2;
const KIND_COMMIT = 3;
/** Fetches kept posted: while one is being re-armed the other delivers (the driver serves them
 * in order, one at a time), and a stop always finds one that is not delivering to cancel. */
const FETCHES = 2;

/** One posted multishot fetch: its provided-buffer group and what it has read of its buffer. */
interface Fetch {
  readonly ring: ProvidedBufferRing;
  readonly buffer: AlignedBuffer;
  readonly view: DataView;
  /** Bytes of the buffer already delivered (the driver fills it front to back). */
  readOffset: number;
  /** Tags were delivered since the fetch was last posted. */
  delivered: boolean;
}

/** A buffer of COMMIT_IO_CMDS elements. */
interface CommitBuffer {
  readonly index: number;
  readonly buffer: AlignedBuffer;
  /** Its native address as a number (no BigInt per turn). */
  readonly address: number;
  readonly view: DataView;
  count: number;
}

/** PREP_IO_CMDS, multishot FETCH_IO_CMDS, one COMMIT_IO_CMDS per turn (UBLK_F_BATCH_IO). */
export class BatchHop implements UblkHop {
  readonly #cx: HopContext;
  /** Copy mode: each element carries the tag's buffer address. */
  readonly #withAddr: boolean;
  readonly #elemBytes: number;
  readonly #fetches: Fetch[] = [];
  readonly #commits: CommitBuffer[] = [];
  readonly #freeCommits: CommitBuffer[] = [];
  /** The elements of this turn's commit (null: nothing finished yet this turn). */
  #open: CommitBuffer | null = null;
  #commitsInFlight = 0;
  #prep: AlignedBuffer | null = null;
  #aborted = 0;

  constructor(cx: HopContext) {
    this.#cx = cx;
    // Copy mode gives the driver each tag's buffer address; zero copy has none (0).
    this.#withAddr = cx.data.fetchAddress(0) !== 0;
    this.#elemBytes = ELEM_HEADER_SIZE + (this.#withAddr ? 8 : 0);
    // A page at least (2048 tags), and every tag of the queue: the driver fills it over many
    // deliveries, and a used-up buffer is offered again at once.
    const bytes = Math.ceil((cx.depth * FETCH_ELEM_BYTES) / 4096) * 4096;
    for (let i = 0; i < FETCHES; i++) {
      const buffer = new AlignedBuffer(bytes);
      const f = {
        ring: new ProvidedBufferRing(cx.ring, i, 1, IOU_PBUF_RING_INC),
        buffer,
        view: new DataView(buffer.bytes.buffer),
        readOffset: 0,
        delivered: false,
      };
      this.#offer(f);
      this.#fetches.push(f);
    }
  }

  /**
   * PREP for every tag, in one command that the driver serves as it is submitted; the fetches go
   * out once its CQE says it succeeded: while a recovered device's queue is not fully prepared,
   * the driver refuses a fetch with -ENODEV, which would read as the device stopping.
   */
  start(): void {
    const { depth } = this.#cx;
    this.#prep = new AlignedBuffer(depth * this.#elemBytes);
    const view = new DataView(this.#prep.bytes.buffer);
    for (let tag = 0; tag < depth; tag++) this.#writeElement(view, tag, tag, 0);
    this.#command(UBLK_U_IO_PREP_IO_CMDS, depth, Number(this.#prep.address), KIND_PREP, 0);
  }

  complete(tag: number, result: number): void {
    let open = this.#open;
    if (open === null) {
      open = this.#freeCommits.pop() ?? this.#newCommitBuffer();
      this.#open = open;
    }
    this.#writeElement(open.view, open.count, tag, result);
    open.count++;
  }

  endTurn(): void {
    const open = this.#open;
    if (open === null) return;
    this.#open = null;
    this.#commitsInFlight++;
    this.#command(UBLK_U_IO_COMMIT_IO_CMDS, open.count, open.address, KIND_COMMIT, open.index);
  }

  onCqe(userData: number, res: number, flags: number): void {
    const kind = (userData & ~UD_BATCH) >>> KIND_SHIFT;
    const index = userData & 0xff;
    if (kind === KIND_FETCH) return this.#onFetchCqe(this.#fetches[index]!, res, flags);
    if (kind === KIND_COMMIT) {
      const commit = this.#commits[index]!;
      const wanted = commit.count * this.#elemBytes;
      // A short commit means the driver refused an element (a tag it did not hand us): a bug.
      if (res !== wanted) this.#fail("COMMIT_IO_CMDS", res, `${wanted} bytes of elements`);
      this.#commitsInFlight--;
      commit.count = 0;
      this.#freeCommits.push(commit);
      return;
    }
    if (kind === KIND_PREP) {
      if (res !== 0) this.#fail("PREP_IO_CMDS", res, `${this.#cx.depth} tags`);
      this.#prep?.free();
      this.#prep = null;
      for (const f of this.#fetches) this.#postFetch(f);
      return;
    }
    throw new Error(`queue ${this.#cx.queueId}: unknown batched command user_data ${userData}`);
  }

  aborting(): boolean {
    return this.#aborted > 0;
  }

  /**
   * After STOP_DEV every request is committed before the driver cancels the fetches, but it
   * cancels only those not delivering: the last one stays posted until the ring closes. So one
   * ABORT is the end, once the commits are out.
   */
  ended(): boolean {
    return this.#aborted > 0 && this.#open === null && this.#commitsInFlight === 0;
  }

  close(): void {
    for (const f of this.#fetches) {
      f.ring.free();
      f.buffer.free();
    }
    for (const c of this.#commits) c.buffer.free();
    this.#prep?.free();
  }

  #onFetchCqe(f: Fetch, res: number, flags: number): void {
    if (res > 0 && (flags & IORING_CQE_F_BUFFER) !== 0) {
      // `res` bytes of tags, at where the last delivery into this buffer ended.
      const end = f.readOffset + res;
      for (let at = f.readOffset; at < end; at += FETCH_ELEM_BYTES) {
        this.#cx.onRequest(f.view.getUint16(at, true));
      }
      f.readOffset = end;
      f.delivered = true;
      // Used up, it left the ring: offer it again at once (the tags are read), so the driver
      // rarely has to end the fetch for lack of a buffer.
      if ((flags & IORING_CQE_F_BUF_MORE) === 0) this.#offer(f);
    }
    if ((flags & IORING_CQE_F_MORE) !== 0) return;
    if (res === UBLK_IO_RES_ABORT) {
      this.#aborted++;
      return;
    }
    if (res === -ENOBUFS) {
      // The driver found the ring empty between using the buffer up and our offering it again,
      // which the CQE before this one did: post the fetch again, do not offer twice (a second
      // entry would hand the driver the same memory while it still fills it). A fetch that ends
      // so with nothing delivered since it was posted had a buffer it did not see: a bug.
      if (!f.delivered) this.#fail("FETCH_IO_CMDS", res, "a fetch with a buffer offered");
    } else if (res < 0) {
      this.#fail("FETCH_IO_CMDS", res, "a multishot fetch");
    }
    if (this.#aborted === 0) this.#postFetch(f);
  }

  #postFetch(f: Fetch): void {
    f.delivered = false;
    const index = this.#fetches.indexOf(f);
    const sqe = this.#command(UBLK_U_IO_FETCH_IO_CMDS, 0, 0, KIND_FETCH, index);
    this.#cx.ring.useMultishotBuffers(sqe, f.ring.bgid);
  }

  #offer(f: Fetch): void {
    f.readOffset = 0;
    f.ring.add(Number(f.buffer.address), f.buffer.lengthBytes, 0);
  }

  #newCommitBuffer(): CommitBuffer {
    // One per turn whose commit is still in flight: a handful. user_data has 8 bits for it.
    if (this.#commits.length > 0xff) {
      throw new Error(`queue ${this.#cx.queueId}: 256 COMMIT_IO_CMDS in flight, none completed`);
    }
    const buffer = new AlignedBuffer(this.#cx.depth * this.#elemBytes);
    const commit = {
      index: this.#commits.length,
      buffer,
      address: Number(buffer.address),
      view: new DataView(buffer.bytes.buffer),
      count: 0,
    };
    this.#commits.push(commit);
    return commit;
  }

  /** Element `i`: the tag, its fixed-buffer slot (zero copy; the tag), the result, the address. */
  #writeElement(view: DataView, i: number, tag: number, result: number): void {
    const at = i * this.#elemBytes;
    view.setUint16(at + ELEM_TAG, tag, true);
    view.setUint16(at + ELEM_BUF_INDEX, tag, true);
    view.setInt32(at + ELEM_RESULT, result, true);
    if (this.#withAddr) {
      const addr = this.#cx.data.fetchAddress(tag);
      view.setUint32(at + ELEM_BUF_ADDR, addr % 0x1_0000_0000, true);
      view.setUint32(at + ELEM_BUF_ADDR + 4, Math.floor(addr / 0x1_0000_0000), true);
    }
  }

  #command(op: number, nrElem: number, elems: number, kind: number, index: number): number {
    const { ring } = this.#cx;
    const sqe = ring.sqe();
    const fetch = op === UBLK_U_IO_FETCH_IO_CMDS;
    prepBatchCommand(
      ring,
      sqe,
      this.#cx.charFd,
      op,
      this.#cx.queueId,
      this.#withAddr && !fetch ? UBLK_BATCH_F_HAS_BUF_ADDR : 0,
      nrElem,
      fetch ? FETCH_ELEM_BYTES : this.#elemBytes,
      elems,
      UD_BATCH | (kind << KIND_SHIFT) | index,
    );
    ring.useFixedFile(sqe, FILE_CHAR);
    return sqe;
  }

  #fail(command: string, res: number, what: string): never {
    throw new Error(
      `queue ${this.#cx.queueId}: ${command} for ${what} failed with ${res}` +
        (res < 0 ? ` (${errnoName(-res)})` : " bytes"),
    );
  }
}
