//! io_uring from Deno FFI, following `linux/io_uring.h` (UAPI of Linux 6.1; every field used
//! here is unchanged through 7.x): ring setup (SQE128 / CQE32), the ring mmaps placed from the
//! offsets the kernel returns, SQE preparation, submission, CQE reaping and registration.
//!
//! The model is liburing's `src/setup.c` and `src/queue.c`: the SQ array is mapped 1:1 onto the
//! SQE slots once, `sqe()` hands out slots between the kernel's head and our local tail, and
//! `submit()` publishes the local tail with one release store. Reaping copies every ready CQE out,
//! advances the CQ head once, and only then runs the callbacks (TigerBeetle's rule), so a callback
//! may prepare and submit new SQEs without touching a ring that is still being drained.
//!
//! Memory ordering. The ring headers are native memory seen through `Uint32Array`s, and the
//! head/tail words are accessed with `Atomics.load`/`Atomics.store`. On a non-shared buffer those
//! are still real atomic accesses in V8 (sequentially consistent: a plain `mov` for loads, an
//! `xchg` for stores on x86-64), which is at least the acquire/release the kernel pairs with its
//! `smp_load_acquire`/`smp_store_release`; and V8 does not move ordinary memory accesses across
//! them. On x86-64 (the only target: the syscall numbers below are x86-64's) TSO alone already
//! keeps stores in order and loads in order, so the atomics mainly pin the JIT's ordering.
//!
//! Not supported: SQPOLL (no NEED_WAKEUP handling). With IORING_SETUP_DEFER_TASKRUN the kernel
//! posts completions only inside io_uring_enter with GETEVENTS: `submitAndWait(n > 0)` or
//! `getEvents()`. Every enter goes through one private path (`#enter`).
//!
//! IO path rules: no allocation per IO. user_data is a JS number written as two u32 halves, no
//! BigInt; keep hot-path values below 2^30 (V8's small-integer range): larger ones, up to
//! 2^53-1, round-trip exactly but box one heap number per completion (measured: zero scavenges
//! over 1.6 M NOPs with small values, ~17 B per CQE with values above 2^30). Buffers are native
//! memory (`AlignedBuffer`) given to the kernel by address, never copied through JS. A negative
//! CQE result is -errno for the caller to inspect (`errnoOfCqe`); only the io_uring syscalls
//! themselves throw, as `SyscallError`.

import { EBADF, EBUSY, EINTR, SyscallError } from "./errno.ts";
import {
  AlignedBuffer,
  close as closeFd,
  errno,
  libc,
  MAP_POPULATE,
  MAP_SHARED,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
  rawSyscall,
} from "./libc.ts";

// x86-64 syscall numbers (asm/unistd_64.h).
export const SYS_io_uring_setup = 425;
export const SYS_io_uring_enter = 426;
export const SYS_io_uring_register = 427;
const SYS_ENTER_BIG = BigInt(SYS_io_uring_enter);

// ---- io_uring_setup(2) flags ----
export const IORING_SETUP_IOPOLL = 1 << 0;
export const IORING_SETUP_SQPOLL = 1 << 1;
export const IORING_SETUP_SQ_AFF = 1 << 2;
export const IORING_SETUP_CQSIZE = 1 << 3;
export const IORING_SETUP_CLAMP = 1 << 4;
export const IORING_SETUP_ATTACH_WQ = 1 << 5;
export const IORING_SETUP_R_DISABLED = 1 << 6;
export const IORING_SETUP_SUBMIT_ALL = 1 << 7;
export const IORING_SETUP_COOP_TASKRUN = 1 << 8;
export const IORING_SETUP_TASKRUN_FLAG = 1 << 9;
export const IORING_SETUP_SQE128 = 1 << 10;
export const IORING_SETUP_CQE32 = 1 << 11;
export const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
export const IORING_SETUP_DEFER_TASKRUN = 1 << 13;

// ---- opcodes (enum io_uring_op) ----
export const IORING_OP_NOP = 0;
export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_READ_FIXED = 4;
export const IORING_OP_WRITE_FIXED = 5;
export const IORING_OP_POLL_ADD = 6;
export const IORING_OP_POLL_REMOVE = 7;
export const IORING_OP_SYNC_FILE_RANGE = 8;
export const IORING_OP_TIMEOUT = 11;
export const IORING_OP_ASYNC_CANCEL = 14;
export const IORING_OP_LINK_TIMEOUT = 15;
export const IORING_OP_FALLOCATE = 17;
export const IORING_OP_CLOSE = 19;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
export const IORING_OP_URING_CMD = 46;

// ---- sqe->flags ----
export const IOSQE_FIXED_FILE = 1 << 0;
export const IOSQE_IO_DRAIN = 1 << 1;
export const IOSQE_IO_LINK = 1 << 2;
export const IOSQE_IO_HARDLINK = 1 << 3;
export const IOSQE_ASYNC = 1 << 4;
export const IOSQE_BUFFER_SELECT = 1 << 5;
export const IOSQE_CQE_SKIP_SUCCESS = 1 << 6;

// ---- per-op flags ----
/** sqe->fsync_flags: fdatasync instead of fsync. */
export const IORING_FSYNC_DATASYNC = 1 << 0;
/** sqe->uring_cmd_flags: the command uses a registered buffer (sqe->buf_index). */
export const IORING_URING_CMD_FIXED = 1 << 0;
/** sqe->uring_cmd_flags: a multishot command, one CQE per event, each in a selected buffer (6.18+). */
export const IORING_URING_CMD_MULTISHOT = 1 << 1;
/** POLL_ADD flags, stored in sqe->len. */
export const IORING_POLL_ADD_MULTI = 1 << 0;
/** ASYNC_CANCEL flags (sqe->cancel_flags). */
export const IORING_ASYNC_CANCEL_ALL = 1 << 0;
export const IORING_ASYNC_CANCEL_FD = 1 << 1;
export const IORING_ASYNC_CANCEL_ANY = 1 << 2;
/** rw_flags (linux/fs.h RWF_*): per-IO O_DSYNC / O_SYNC semantics, e.g. for FUA writes. */
export const RWF_HIPRI = 0x1;
export const RWF_DSYNC = 0x2;
export const RWF_SYNC = 0x4;
export const RWF_NOWAIT = 0x8;
/** poll(2) event bits (asm-generic/poll.h) for POLL_ADD. */
export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;

// ---- cqe->flags ----
export const IORING_CQE_F_BUFFER = 1 << 0;
export const IORING_CQE_F_MORE = 1 << 1;
export const IORING_CQE_F_SOCK_NONEMPTY = 1 << 2;
export const IORING_CQE_F_NOTIF = 1 << 3;
/** The selected buffer (IOU_PBUF_RING_INC) has room left: it stays in its ring for the next CQE. */
export const IORING_CQE_F_BUF_MORE = 1 << 4;
/** cqe->flags >> IORING_CQE_BUFFER_SHIFT: the id of the selected buffer (with F_BUFFER). */
export const IORING_CQE_BUFFER_SHIFT = 16;

// ---- mmap offsets ----
export const IORING_OFF_SQ_RING = 0;
export const IORING_OFF_CQ_RING = 0x8000000;
export const IORING_OFF_SQES = 0x10000000;

// ---- sq_ring->flags ----
export const IORING_SQ_NEED_WAKEUP = 1 << 0;
export const IORING_SQ_CQ_OVERFLOW = 1 << 1;
export const IORING_SQ_TASKRUN = 1 << 2;

// ---- io_uring_enter(2) flags ----
export const IORING_ENTER_GETEVENTS = 1 << 0;
export const IORING_ENTER_SQ_WAKEUP = 1 << 1;
export const IORING_ENTER_SQ_WAIT = 1 << 2;
export const IORING_ENTER_EXT_ARG = 1 << 3;
export const IORING_ENTER_REGISTERED_RING = 1 << 4;

// ---- io_uring_params->features ----
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
export const IORING_FEAT_NODROP = 1 << 1;
export const IORING_FEAT_SUBMIT_STABLE = 1 << 2;
export const IORING_FEAT_RW_CUR_POS = 1 << 3;
export const IORING_FEAT_CUR_PERSONALITY = 1 << 4;
export const IORING_FEAT_FAST_POLL = 1 << 5;
export const IORING_FEAT_POLL_32BITS = 1 << 6;
export const IORING_FEAT_SQPOLL_NONFIXED = 1 << 7;
export const IORING_FEAT_EXT_ARG = 1 << 8;
export const IORING_FEAT_NATIVE_WORKERS = 1 << 9;
export const IORING_FEAT_RSRC_TAGS = 1 << 10;
export const IORING_FEAT_CQE_SKIP = 1 << 11;
export const IORING_FEAT_LINKED_FILE = 1 << 12;

// ---- io_uring_register(2) opcodes ----
export const IORING_REGISTER_BUFFERS = 0;
export const IORING_UNREGISTER_BUFFERS = 1;
export const IORING_REGISTER_FILES = 2;
export const IORING_UNREGISTER_FILES = 3;
export const IORING_REGISTER_EVENTFD = 4;
export const IORING_UNREGISTER_EVENTFD = 5;
export const IORING_REGISTER_FILES_UPDATE = 6;
export const IORING_REGISTER_EVENTFD_ASYNC = 7;
export const IORING_REGISTER_PROBE = 8;
export const IORING_REGISTER_BUFFERS2 = 15;
export const IORING_REGISTER_PBUF_RING = 22;
export const IORING_UNREGISTER_PBUF_RING = 23;
/** io_uring_buf_reg.flags: buffers are consumed in pieces, not whole per CQE (6.12+). */
export const IOU_PBUF_RING_INC = 2;
/** io_uring_rsrc_register.flags: a table of `nr` empty slots (filled later, e.g. by ublk). */
export const IORING_RSRC_REGISTER_SPARSE = 1 << 0;
export const IO_URING_OP_SUPPORTED = 1 << 0;

// ---- struct io_sqring_offsets (40 bytes), inside io_uring_params at 40 ----
export const SQOFF_HEAD = 0; // __u32 head
export const SQOFF_TAIL = 4; // __u32 tail
export const SQOFF_RING_MASK = 8; // __u32 ring_mask
export const SQOFF_RING_ENTRIES = 12; // __u32 ring_entries
export const SQOFF_FLAGS = 16; // __u32 flags
export const SQOFF_DROPPED = 20; // __u32 dropped
export const SQOFF_ARRAY = 24; // __u32 array
export const SQRING_OFFSETS_SIZE = 40; // sizeof(struct io_sqring_offsets)

// ---- struct io_cqring_offsets (40 bytes), inside io_uring_params at 80 ----
export const CQOFF_HEAD = 0; // __u32 head
export const CQOFF_TAIL = 4; // __u32 tail
export const CQOFF_RING_MASK = 8; // __u32 ring_mask
export const CQOFF_RING_ENTRIES = 12; // __u32 ring_entries
export const CQOFF_OVERFLOW = 16; // __u32 overflow
export const CQOFF_CQES = 20; // __u32 cqes
export const CQOFF_FLAGS = 24; // __u32 flags
export const CQRING_OFFSETS_SIZE = 40; // sizeof(struct io_cqring_offsets)

// ---- struct io_uring_params (120 bytes) ----
export const PARAMS_SQ_ENTRIES = 0; // __u32 sq_entries
export const PARAMS_CQ_ENTRIES = 4; // __u32 cq_entries
export const PARAMS_FLAGS = 8; // __u32 flags
export const PARAMS_SQ_THREAD_CPU = 12; // __u32 sq_thread_cpu
export const PARAMS_SQ_THREAD_IDLE = 16; // __u32 sq_thread_idle
export const PARAMS_FEATURES = 20; // __u32 features
export const PARAMS_WQ_FD = 24; // __u32 wq_fd
export const PARAMS_SQ_OFF = 40; // struct io_sqring_offsets sq_off
export const PARAMS_CQ_OFF = 80; // struct io_cqring_offsets cq_off
export const PARAMS_SIZE = 120; // sizeof(struct io_uring_params)

// ---- struct io_uring_sqe (64 bytes; 128 with IORING_SETUP_SQE128) ----
export const SQE_OPCODE = 0; // __u8 opcode
export const SQE_FLAGS = 1; // __u8 flags (IOSQE_*)
export const SQE_IOPRIO = 2; // __u16 ioprio
export const SQE_FD = 4; // __s32 fd
export const SQE_OFF = 8; // __u64 off (union: addr2; struct { __u32 cmd_op; __u32 __pad1; })
export const SQE_CMD_OP = 8; // __u32 cmd_op
export const SQE_ADDR = 16; // __u64 addr (union: splice_off_in)
export const SQE_LEN = 24; // __u32 len
export const SQE_OP_FLAGS = 28; // __u32 rw_flags / fsync_flags / poll32_events / uring_cmd_flags …
export const SQE_USER_DATA = 32; // __u64 user_data
export const SQE_BUF_INDEX = 40; // __u16 buf_index (packed union with buf_group)
export const SQE_PERSONALITY = 42; // __u16 personality
export const SQE_FILE_INDEX = 44; // __s32 splice_fd_in / __u32 file_index
export const SQE_ADDR3 = 48; // __u64 addr3
export const SQE_CMD = 48; // __u8 cmd[] — 80 bytes of command data with SQE128
export const SQE_SIZE = 64; // sizeof(struct io_uring_sqe)
export const SQE128_SIZE = 128;
export const SQE128_CMD_BYTES = 80;

// ---- struct io_uring_cqe (16 bytes; 32 with IORING_SETUP_CQE32) ----
export const CQE_USER_DATA = 0; // __u64 user_data
export const CQE_RES = 8; // __s32 res
export const CQE_FLAGS = 12; // __u32 flags
export const CQE_BIG = 16; // __u64 big_cqe[] (16 more bytes with CQE32)
export const CQE_SIZE = 16; // sizeof(struct io_uring_cqe)
export const CQE32_SIZE = 32;

// ---- struct io_uring_rsrc_register (for IORING_REGISTER_BUFFERS2, 32 bytes) ----
export const RSRC_REGISTER_NR = 0; // __u32 nr
export const RSRC_REGISTER_FLAGS = 4; // __u32 flags
export const RSRC_REGISTER_DATA = 16; // __aligned_u64 data
export const RSRC_REGISTER_TAGS = 24; // __aligned_u64 tags
export const RSRC_REGISTER_SIZE = 32; // sizeof(struct io_uring_rsrc_register)

// ---- struct io_uring_buf_reg (for IORING_REGISTER_PBUF_RING, 40 bytes) ----
export const BUF_REG_RING_ADDR = 0; // __u64 ring_addr (page-aligned)
export const BUF_REG_RING_ENTRIES = 8; // __u32 ring_entries (a power of two)
export const BUF_REG_BGID = 12; // __u16 bgid
export const BUF_REG_FLAGS = 14; // __u16 flags (IOU_PBUF_RING_*)
export const BUF_REG_SIZE = 40; // sizeof(struct io_uring_buf_reg)

// ---- struct io_uring_buf (16 bytes): one slot of a provided-buffer ring ----
export const BUF_ADDR = 0; // __u64 addr
export const BUF_LEN = 8; // __u32 len
export const BUF_BID = 12; // __u16 bid
export const BUF_SIZE = 16; // sizeof(struct io_uring_buf)
/** struct io_uring_buf_ring: the ring's tail (__u16) overlays slot 0's resv field. */
export const BUF_RING_TAIL = 14;

// ---- struct iovec (for IORING_REGISTER_BUFFERS) ----
const IOVEC_BASE = 0; // void *iov_base
const IOVEC_LEN = 8; // size_t iov_len
const IOVEC_SIZE = 16;

// ---- struct io_uring_getevents_arg (IORING_ENTER_EXT_ARG) ----
export const GETEVENTS_ARG_SIGMASK = 0; // __u64 sigmask
export const GETEVENTS_ARG_SIGMASK_SZ = 8; // __u32 sigmask_sz
export const GETEVENTS_ARG_TS = 16; // __u64 ts (pointer to struct __kernel_timespec)
export const GETEVENTS_ARG_SIZE = 24; // sizeof(struct io_uring_getevents_arg)
// ---- struct io_uring_probe (16 bytes) + struct io_uring_probe_op ops[] (8 bytes each) ----
export const PROBE_LAST_OP = 0; // __u8 last_op
export const PROBE_OPS_LEN = 1; // __u8 ops_len
export const PROBE_OPS = 16; // struct io_uring_probe_op ops[]
export const PROBE_OP_SIZE = 8; // sizeof(struct io_uring_probe_op)
export const PROBE_OP_FLAGS = 2; // __u16 flags (IO_URING_OP_SUPPORTED)

const TWO_POW_32 = 0x1_0000_0000;

/** -errno of a CQE result → errno (0 when the result is not an error). */
export function errnoOfCqe(res: number): number {
  return res < 0 ? -res : 0;
}

export interface IoUringOptions {
  /** 128-byte SQEs: room for the 80-byte payload of IORING_OP_URING_CMD (ublk needs it). */
  sqe128?: boolean;
  /** 32-byte CQEs (ublk's rings use them). */
  cqe32?: boolean;
  /** Further IORING_SETUP_* flags (e.g. SINGLE_ISSUER, COOP_TASKRUN). */
  flags?: number;
  /** CQ size; the kernel's default is twice the SQ size. */
  cqEntries?: number;
}

/** Called once per completion by `reapCqes`, after the CQ head has moved past it. */
export type CqeCallback = (userData: number, res: number, flags: number) => void;

/** Anything with a native address and a length: an `AlignedBuffer` qualifies. */
export interface NativeRegion {
  readonly address: bigint;
  readonly lengthBytes: number;
}

/** One io_uring instance: its fd, the three mmapped regions and the local SQ/CQ bookkeeping. */
export class IoUring {
  readonly fd: number;
  /** SQ and CQ sizes as granted by the kernel (powers of two). */
  readonly sqEntries: number;
  readonly cqEntries: number;
  /** IORING_SETUP_* flags the ring was created with, and the kernel's IORING_FEAT_* bits. */
  readonly setupFlags: number;
  readonly features: number;
  /** Bytes per SQE (64 or 128) and per CQE (16 or 32). */
  readonly sqeSize: number;
  readonly cqeSize: number;
  /** The SQE array (native memory). `sqe()` returns byte offsets into it. */
  readonly sqeView: DataView;
  readonly sqeBytes: Uint8Array;
  /** io_uring_enter calls made so far: syscalls per IO for stats and benchmarks. */
  enterCalls = 0;

  readonly #sqRing: Uint32Array;
  readonly #sqeWords: Uint32Array;
  readonly #cqRing: Uint32Array;
  readonly #cqView: DataView;
  // Word indexes (byte offset / 4) of the ring header fields, from the kernel's sq_off / cq_off.
  readonly #sqHead: number;
  readonly #sqTail: number;
  readonly #sqFlags: number;
  readonly #sqDropped: number;
  readonly #sqMask: number;
  readonly #cqHead: number;
  readonly #cqTail: number;
  readonly #cqOverflow: number;
  readonly #cqMask: number;
  readonly #cqesByte: number;
  readonly #sqeShift: number;
  readonly #cqeShift: number;
  // SQEs in [#sqeHead, #sqeTail) are prepared but not yet published to the kernel's tail.
  #sqeHead = 0;
  #sqeTail = 0;
  // Our copy of the CQ head: only this side writes it, so there is nothing to load.
  #cqHeadLocal = 0;
  #reaping = false;
  // Completions copied out of the ring before their callbacks run (no allocation per reap).
  readonly #reapUserData: Float64Array;
  readonly #reapRes: Int32Array;
  readonly #reapFlags: Uint32Array;
  readonly #maps: Array<[Deno.PointerObject, number]>;
  // The native page io_uring_setup read its params from (kept for the ring's life, then freed).
  readonly #scratch: AlignedBuffer;
  #closed = false;

  private constructor(
    fd: number,
    params: DataView,
    maps: Array<[Deno.PointerObject, number]>,
    sqRing: ArrayBuffer,
    cqRing: ArrayBuffer,
    sqes: ArrayBuffer,
    scratch: AlignedBuffer,
  ) {
    this.fd = fd;
    this.#maps = maps;
    this.#scratch = scratch;
    this.sqEntries = params.getUint32(PARAMS_SQ_ENTRIES, true);
    this.cqEntries = params.getUint32(PARAMS_CQ_ENTRIES, true);
    this.setupFlags = params.getUint32(PARAMS_FLAGS, true);
    this.features = params.getUint32(PARAMS_FEATURES, true);
    this.sqeSize = (this.setupFlags & IORING_SETUP_SQE128) ? SQE128_SIZE : SQE_SIZE;
    this.cqeSize = (this.setupFlags & IORING_SETUP_CQE32) ? CQE32_SIZE : CQE_SIZE;
    this.#sqeShift = this.sqeSize === SQE128_SIZE ? 7 : 6;
    this.#cqeShift = this.cqeSize === CQE32_SIZE ? 5 : 4;

    const sq = (field: number) => params.getUint32(PARAMS_SQ_OFF + field, true);
    const cq = (field: number) => params.getUint32(PARAMS_CQ_OFF + field, true);
    this.#sqRing = new Uint32Array(sqRing);
    this.#cqRing = new Uint32Array(cqRing);
    this.#cqView = new DataView(cqRing);
    this.#sqHead = sq(SQOFF_HEAD) >> 2;
    this.#sqTail = sq(SQOFF_TAIL) >> 2;
    this.#sqFlags = sq(SQOFF_FLAGS) >> 2;
    this.#sqDropped = sq(SQOFF_DROPPED) >> 2;
    this.#sqMask = this.#sqRing[sq(SQOFF_RING_MASK) >> 2]!;
    this.#cqHead = cq(CQOFF_HEAD) >> 2;
    this.#cqTail = cq(CQOFF_TAIL) >> 2;
    this.#cqOverflow = cq(CQOFF_OVERFLOW) >> 2;
    this.#cqMask = this.#cqRing[cq(CQOFF_RING_MASK) >> 2]!;
    this.#cqesByte = cq(CQOFF_CQES);
    this.sqeView = new DataView(sqes);
    this.sqeBytes = new Uint8Array(sqes);
    this.#sqeWords = new Uint32Array(sqes);

    // Map SQ array slot i to SQE i once (liburing does the same): the SQE index is then the
    // tail position itself and the array never needs touching on the IO path.
    const array = sq(SQOFF_ARRAY) >> 2;
    for (let i = 0; i < this.sqEntries; i++) this.#sqRing[array + i] = i;
    this.#sqeHead = this.#sqeTail = Atomics.load(this.#sqRing, this.#sqTail);
    this.#cqHeadLocal = Atomics.load(this.#cqRing, this.#cqHead);

    this.#reapUserData = new Float64Array(this.cqEntries);
    this.#reapRes = new Int32Array(this.cqEntries);
    this.#reapFlags = new Uint32Array(this.cqEntries);
  }

  /**
   * io_uring_setup(2) and the ring mmaps. `entries` is the SQ size (rounded up to a power of two
   * by the kernel). Throws `SyscallError("io_uring_setup", …)`: EPERM when io_uring is disabled
   * by sysctl, ENOSYS without io_uring, EINVAL for flags this kernel does not know.
   */
  static setup(entries: number, opts: IoUringOptions = {}): IoUring {
    let flags = opts.flags ?? 0;
    if (opts.sqe128) flags |= IORING_SETUP_SQE128;
    if (opts.cqe32) flags |= IORING_SETUP_CQE32;
    const scratch = new AlignedBuffer(4096);
    const params = new DataView(scratch.bytes.buffer, 0, PARAMS_SIZE);
    if (opts.cqEntries !== undefined) {
      flags |= IORING_SETUP_CQSIZE;
      params.setUint32(PARAMS_CQ_ENTRIES, opts.cqEntries, true);
    }
    params.setUint32(PARAMS_FLAGS, flags, true);
    const fd = rawSyscall(SYS_io_uring_setup, BigInt(entries), scratch.address);
    if (fd < 0) {
      scratch.free();
      throw new SyscallError(
        "io_uring_setup",
        -fd,
        `${entries} entries, flags 0x${flags.toString(16)}`,
      );
    }

    const maps: Array<[Deno.PointerObject, number]> = [];
    try {
      const sqOff = (f: number) => params.getUint32(PARAMS_SQ_OFF + f, true);
      const cqOff = (f: number) => params.getUint32(PARAMS_CQ_OFF + f, true);
      const sqEntries = params.getUint32(PARAMS_SQ_ENTRIES, true);
      const cqEntries = params.getUint32(PARAMS_CQ_ENTRIES, true);
      const features = params.getUint32(PARAMS_FEATURES, true);
      const sqeSize = (flags & IORING_SETUP_SQE128) ? SQE128_SIZE : SQE_SIZE;
      const cqeSize = (flags & IORING_SETUP_CQE32) ? CQE32_SIZE : CQE_SIZE;
      let sqRingBytes = sqOff(SQOFF_ARRAY) + sqEntries * 4;
      let cqRingBytes = cqOff(CQOFF_CQES) + cqEntries * cqeSize;
      const single = (features & IORING_FEAT_SINGLE_MMAP) !== 0;
      // With SINGLE_MMAP both rings live in one mapping large enough for either.
      if (single) sqRingBytes = cqRingBytes = Math.max(sqRingBytes, cqRingBytes);
      const map = (bytes: number, offset: number, what: string) => {
        const p = mmap(
          bytes,
          PROT_READ | PROT_WRITE,
          MAP_SHARED | MAP_POPULATE,
          fd,
          offset,
          `io_uring ${what} (fd ${fd})`,
        );
        maps.push([p, bytes]);
        return Deno.UnsafePointerView.getArrayBuffer(p, bytes);
      };
      const sqRing = map(sqRingBytes, IORING_OFF_SQ_RING, "SQ ring");
      const cqRing = single ? sqRing : map(cqRingBytes, IORING_OFF_CQ_RING, "CQ ring");
      const sqes = map(sqEntries * sqeSize, IORING_OFF_SQES, "SQEs");
      return new IoUring(fd, params, maps, sqRing, cqRing, sqes, scratch);
    } catch (e) {
      for (const [p, bytes] of maps) munmap(p, bytes);
      closeFd(fd);
      scratch.free();
      throw e;
    }
  }

  /**
   * `setup` with each of `flagChoices` in turn (IORING_SETUP_* beyond `opts.flags`), best first:
   * the first set this kernel accepts wins; the last refusal is thrown.
   */
  static setupFirst(entries: number, opts: IoUringOptions, flagChoices: number[]): IoUring {
    for (let i = 0;; i++) {
      try {
        return IoUring.setup(entries, { ...opts, flags: (opts.flags ?? 0) | flagChoices[i]! });
      } catch (e) {
        if (i >= flagChoices.length - 1) throw e;
      }
    }
  }

  /**
   * Byte offset in `sqeView` of a zeroed free SQE. When the SQ is full, what is prepared goes to
   * the kernel first to make room (the one place that happens). The SQE reaches the kernel with
   * the next submit call.
   */
  sqe(): number {
    let sqe = this.#nextSqe();
    if (sqe < 0) {
      this.submit();
      sqe = this.#nextSqe();
      // The kernel consumes every SQE it is handed (or fails the enter): only a bug lands here.
      if (sqe < 0) throw new SyscallError("io_uring_enter", EBUSY, `ring fd ${this.fd}: SQ full`);
    }
    return sqe;
  }

  /** A zeroed free SQE, or -1 when the SQ is full. */
  #nextSqe(): number {
    if (this.#closed) this.#throwClosed("io_uring_get_sqe");
    // Without SQPOLL the kernel moves the SQ head only inside our own io_uring_enter; the
    // atomic load is for the SQPOLL case, where a kernel thread consumes concurrently.
    const head = Atomics.load(this.#sqRing, this.#sqHead);
    const next = (this.#sqeTail + 1) >>> 0;
    if (((next - head) >>> 0) > this.sqEntries) return -1;
    const sqe = (this.#sqeTail & this.#sqMask) << this.#sqeShift;
    this.#sqeTail = next;
    // A word loop: TypedArray.fill on 64–128 bytes costs ~110 ns here, this ~12 ns (measured).
    const words = this.#sqeWords;
    for (let i = sqe >> 2, end = (sqe + this.sqeSize) >> 2; i < end; i++) words[i] = 0;
    return sqe;
  }

  /**
   * Spins in user space, without a syscall, until a CQE is ready or the kernel has task work for
   * this ring (IORING_SQ_TASKRUN, set with IORING_SETUP_TASKRUN_FLAG: with DEFER_TASKRUN that is
   * how a completion announces itself before any CQE is posted), or until `untilMs`
   * (performance.now()) has passed. True when there is something to get. For latency: it skips
   * the sleep and wake-up of `submitAndWait`, at the price of a busy CPU meanwhile.
   */
  spinForWork(untilMs: number): boolean {
    if (this.#closed) this.#throwClosed("spinForWork");
    for (;;) {
      // The clock only every so often: reading it costs more than the two loads.
      for (let i = 0; i < 64; i++) {
        if (Atomics.load(this.#cqRing, this.#cqTail) !== this.#cqHeadLocal) return true;
        if (Atomics.load(this.#sqRing, this.#sqFlags) & IORING_SQ_TASKRUN) return true;
      }
      if (performance.now() >= untilMs) return false;
    }
  }

  /** CQEs ready to reap. */
  cqReady(): number {
    if (this.#closed) this.#throwClosed("cqReady");
    return (Atomics.load(this.#cqRing, this.#cqTail) - this.#cqHeadLocal) >>> 0;
  }

  /** The kernel's sq_ring->flags (IORING_SQ_*). */
  #sqFlagsNow(): number {
    return Atomics.load(this.#sqRing, this.#sqFlags);
  }

  // ---- SQE preparation. `sqe` is a byte offset from sqe(); the slot is already zeroed. ----

  #setU64(at: number, value: number): void {
    const v = this.sqeView;
    if (value < 0) {
      // -1: "use the file position" for read/write; all ones as a u64.
      v.setUint32(at, 0xffffffff, true);
      v.setUint32(at + 4, 0xffffffff, true);
    } else {
      v.setUint32(at, value >>> 0, true);
      v.setUint32(at + 4, Math.floor(value / TWO_POW_32), true);
    }
  }

  #setAddr(at: number, addr: bigint | number): void {
    if (typeof addr === "bigint") this.sqeView.setBigUint64(at, addr, true);
    else this.#setU64(at, addr);
  }

  #prepRw(
    op: number,
    sqe: number,
    fd: number,
    addr: bigint | number,
    len: number,
    offset: number,
    userData: number,
  ): void {
    const v = this.sqeView;
    v.setUint8(sqe + SQE_OPCODE, op);
    v.setInt32(sqe + SQE_FD, fd, true);
    this.#setU64(sqe + SQE_OFF, offset);
    this.#setAddr(sqe + SQE_ADDR, addr);
    v.setUint32(sqe + SQE_LEN, len, true);
    this.#setU64(sqe + SQE_USER_DATA, userData);
  }

  /** read(2) of `len` bytes at `offset` (-1: the file position) into native memory at `addr`. */
  prepRead(
    sqe: number,
    fd: number,
    addr: bigint | number,
    len: number,
    offset: number,
    userData: number,
    rwFlags = 0,
  ): void {
    this.#prepRw(IORING_OP_READ, sqe, fd, addr, len, offset, userData);
    if (rwFlags) this.sqeView.setUint32(sqe + SQE_OP_FLAGS, rwFlags, true);
  }

  /** write(2); `rwFlags` e.g. RWF_DSYNC makes this one write durable on completion (FUA). */
  prepWrite(
    sqe: number,
    fd: number,
    addr: bigint | number,
    len: number,
    offset: number,
    userData: number,
    rwFlags = 0,
  ): void {
    this.#prepRw(IORING_OP_WRITE, sqe, fd, addr, len, offset, userData);
    if (rwFlags) this.sqeView.setUint32(sqe + SQE_OP_FLAGS, rwFlags, true);
  }

  /** Read into registered buffer `bufIndex`; [addr, addr+len) must lie inside that buffer. */
  prepReadFixed(
    sqe: number,
    fd: number,
    addr: bigint | number,
    len: number,
    offset: number,
    bufIndex: number,
    userData: number,
    rwFlags = 0,
  ): void {
    this.#prepRw(IORING_OP_READ_FIXED, sqe, fd, addr, len, offset, userData);
    this.sqeView.setUint16(sqe + SQE_BUF_INDEX, bufIndex, true);
    if (rwFlags) this.sqeView.setUint32(sqe + SQE_OP_FLAGS, rwFlags, true);
  }

  /** Write from registered buffer `bufIndex`. */
  prepWriteFixed(
    sqe: number,
    fd: number,
    addr: bigint | number,
    len: number,
    offset: number,
    bufIndex: number,
    userData: number,
    rwFlags = 0,
  ): void {
    this.#prepRw(IORING_OP_WRITE_FIXED, sqe, fd, addr, len, offset, userData);
    this.sqeView.setUint16(sqe + SQE_BUF_INDEX, bufIndex, true);
    if (rwFlags) this.sqeView.setUint32(sqe + SQE_OP_FLAGS, rwFlags, true);
  }

  /** fsync(2), or fdatasync(2) when `datasync`, of the whole file. */
  prepFsync(sqe: number, fd: number, datasync: boolean, userData: number): void {
    const v = this.sqeView;
    v.setUint8(sqe + SQE_OPCODE, IORING_OP_FSYNC);
    v.setInt32(sqe + SQE_FD, fd, true);
    if (datasync) v.setUint32(sqe + SQE_OP_FLAGS, IORING_FSYNC_DATASYNC, true);
    this.#setU64(sqe + SQE_USER_DATA, userData);
  }

  /** fallocate(2): the kernel takes the mode in `len` and the length in `addr`. */
  prepFallocate(
    sqe: number,
    fd: number,
    mode: number,
    offset: number,
    len: number,
    userData: number,
  ): void {
    this.#prepRw(IORING_OP_FALLOCATE, sqe, fd, len, mode, offset, userData);
  }

  /** A no-op that completes with res 0: round trips, wake-ups. */
  prepNop(sqe: number, userData: number): void {
    this.sqeView.setUint8(sqe + SQE_OPCODE, IORING_OP_NOP);
    this.sqeView.setInt32(sqe + SQE_FD, -1, true);
    this.#setU64(sqe + SQE_USER_DATA, userData);
  }

  /**
   * IORING_OP_URING_CMD to the driver behind `fd` with `cmd_op` at byte 8. Returns the byte
   * offset (sqe + 48) of the command payload, 80 bytes on an SQE128 ring, for the caller to fill.
   */
  prepUringCmd(sqe: number, fd: number, cmdOp: number, userData: number): number {
    const v = this.sqeView;
    v.setUint8(sqe + SQE_OPCODE, IORING_OP_URING_CMD);
    v.setInt32(sqe + SQE_FD, fd, true);
    v.setUint32(sqe + SQE_CMD_OP, cmdOp >>> 0, true);
    this.#setU64(sqe + SQE_USER_DATA, userData);
    return sqe + SQE_CMD;
  }

  /** read(2) of an eventfd's 8-byte counter into `addr`: completes when the eventfd is written. */
  prepReadEventfd(sqe: number, eventFd: number, addr: bigint | number, userData: number): void {
    this.#prepRw(IORING_OP_READ, sqe, eventFd, addr, 8, 0, userData);
  }

  /** Cancels the request(s) submitted with `targetUserData` (or per `flags`). */
  prepCancel(sqe: number, targetUserData: number, userData: number, flags = 0): void {
    const v = this.sqeView;
    v.setUint8(sqe + SQE_OPCODE, IORING_OP_ASYNC_CANCEL);
    v.setInt32(sqe + SQE_FD, -1, true);
    this.#setU64(sqe + SQE_ADDR, targetUserData);
    if (flags) v.setUint32(sqe + SQE_OP_FLAGS, flags, true);
    this.#setU64(sqe + SQE_USER_DATA, userData);
  }

  /**
   * Makes a prepared SQE name registered file `index` (see `registerFiles`) instead of an fd:
   * the kernel then skips looking the fd up and taking a reference on every operation.
   */
  useFixedFile(sqe: number, index: number): void {
    const v = this.sqeView;
    v.setInt32(sqe + SQE_FD, index, true);
    v.setUint8(sqe + SQE_FLAGS, v.getUint8(sqe + SQE_FLAGS) | IOSQE_FIXED_FILE);
  }

  /** Sets sqe->addr of a prepared SQE (a uring_cmd's driver-specific argument). */
  setSqeAddr(sqe: number, addr: number): void {
    this.#setU64(sqe + SQE_ADDR, addr);
  }

  /**
   * Lets a prepared SQE (addr 0) take its buffer from provided-buffer group `bgid`
   * (`ProvidedBufferRing`): IOSQE_BUFFER_SELECT and sqe->buf_group.
   */
  selectBuffer(sqe: number, bgid: number): void {
    const v = this.sqeView;
    v.setUint8(sqe + SQE_FLAGS, v.getUint8(sqe + SQE_FLAGS) | IOSQE_BUFFER_SELECT);
    v.setUint16(sqe + SQE_BUF_INDEX, bgid, true);
  }

  /** Makes a prepared uring_cmd multishot, each CQE in a buffer of group `bgid`. */
  useMultishotBuffers(sqe: number, bgid: number): void {
    this.selectBuffer(sqe, bgid);
    this.sqeView.setUint32(sqe + SQE_OP_FLAGS, IORING_URING_CMD_MULTISHOT, true);
  }

  /** Sets sqe->flags (IOSQE_FIXED_FILE, IOSQE_IO_LINK, …) on a prepared SQE. */
  setSqeFlags(sqe: number, flags: number): void {
    this.sqeView.setUint8(sqe + SQE_FLAGS, flags);
  }

  // ---- submission ----

  /** Publishes prepared SQEs to the kernel; returns how many the kernel has yet to consume. */
  #flushSq(): number {
    const tail = this.#sqeTail;
    if (this.#sqeHead !== tail) {
      this.#sqeHead = tail;
      // The kernel must see the SQE contents before the tail that covers them: release store.
      Atomics.store(this.#sqRing, this.#sqTail, tail);
    }
    return (tail - Atomics.load(this.#sqRing, this.#sqHead)) >>> 0;
  }

  /** Submits prepared SQEs without waiting; returns the number the kernel consumed. */
  submit(): number {
    return this.submitAndWait(0);
  }

  /**
   * Submits prepared SQEs and waits until at least `waitNr` CQEs are ready, in one
   * io_uring_enter. Returns the number of SQEs consumed. A signal that arrives after the SQEs
   * were consumed ends the wait early (the kernel then reports the count, not EINTR): callers
   * loop on reapCqes, they never assume `waitNr` CQEs.
   */
  submitAndWait(waitNr: number): number {
    // Before the flags: a closed ring's memory is unmapped.
    if (this.#closed) this.#throwClosed("io_uring_enter");
    // Completions the kernel parked for lack of CQ room, or deferred task work, are only
    // posted from inside io_uring_enter with GETEVENTS.
    const flags = waitNr > 0 || (this.#sqFlagsNow() & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN))
      ? IORING_ENTER_GETEVENTS
      : 0;
    return this.#enter(waitNr, flags);
  }

  /**
   * Publishes the prepared SQEs without GETEVENTS: no task work runs in this call, so with
   * DEFER_TASKRUN nothing new is posted to the CQ (a queue's last commits before it closes its
   * ring, `lib/event_loop.ts`).
   */
  submitOnly(): number {
    return this.#enter(0, 0);
  }

  /**
   * Posts what is ready without waiting (io_uring_enter with GETEVENTS, liburing's
   * `io_uring_get_events`): runs pending task work (with DEFER_TASKRUN, that is what delivers
   * completions), flushes overflowed CQEs. Submits what is prepared too.
   */
  getEvents(): number {
    return this.#enter(0, IORING_ENTER_GETEVENTS);
  }

  /**
   * The one io_uring_enter path: publishes the prepared SQEs, enters (unless there is nothing to
   * submit and nothing to get), retries EINTR; other failures throw
   * `SyscallError("io_uring_enter", …)`.
   */
  #enter(waitNr: number, flags: number): number {
    if (this.#closed) this.#throwClosed("io_uring_enter");
    let toSubmit = this.#flushSq();
    if (toSubmit === 0 && flags === 0) return 0;
    for (;;) {
      this.enterCalls++;
      const r = libc.io_uring_enter(SYS_ENTER_BIG, this.fd, toSubmit, waitNr, flags, null, 0n);
      if (r >= 0) return r;
      const e = errno();
      if (e !== EINTR) throw new SyscallError("io_uring_enter", e, `ring fd ${this.fd}`);
      // Interrupted before consuming anything: recount, the tail is already published.
      toSubmit = (this.#sqeTail - Atomics.load(this.#sqRing, this.#sqHead)) >>> 0;
    }
  }

  /**
   * Waits on a Deno helper thread until a CQE is ready, so the calling JS thread keeps running
   * (a control command that blocks in the kernel, e.g. START_DEV); submits nothing. errno does
   * not survive the helper thread, so a failed wait (EINTR) just returns: callers look at the CQ
   * and wait again. Do not close the ring while a wait is pending.
   */
  async waitAsync(): Promise<void> {
    if (this.#closed) this.#throwClosed("io_uring_enter");
    this.enterCalls++;
    await libc.io_uring_enter_nonblocking(
      SYS_ENTER_BIG,
      this.fd,
      0,
      1,
      IORING_ENTER_GETEVENTS,
      null,
      0n,
    );
  }

  // ---- completion ----

  /**
   * Copies every ready CQE out, advances the CQ head once, then calls `onCqe` for each in
   * order. Returns how many were reaped. A callback may prepare and submit SQEs (and that may
   * post more CQEs: they wait for the next call); calling reapCqes from a callback throws. If a
   * callback throws, the remaining callbacks still run and the first error is rethrown after.
   */
  reapCqes(onCqe: CqeCallback): number {
    if (this.#closed) this.#throwClosed("reapCqes");
    if (this.#reaping) throw new Error("IoUring.reapCqes called from one of its own callbacks");
    const head = this.#cqHeadLocal;
    // Acquire: the CQE contents are visible once the tail that covers them is.
    const tail = Atomics.load(this.#cqRing, this.#cqTail);
    const n = (tail - head) >>> 0;
    if (n === 0) return 0;
    const v = this.#cqView;
    const ud = this.#reapUserData, res = this.#reapRes, fl = this.#reapFlags;
    for (let i = 0; i < n; i++) {
      const cqe = this.#cqesByte + ((((head + i) >>> 0) & this.#cqMask) << this.#cqeShift);
      ud[i] = v.getUint32(cqe + CQE_USER_DATA + 4, true) * TWO_POW_32 +
        v.getUint32(cqe + CQE_USER_DATA, true);
      res[i] = v.getInt32(cqe + CQE_RES, true);
      fl[i] = v.getUint32(cqe + CQE_FLAGS, true);
    }
    // Release: the slots are free for the kernel only after they were copied out.
    this.#cqHeadLocal = tail;
    Atomics.store(this.#cqRing, this.#cqHead, tail);
    this.#reaping = true;
    let failure: unknown = undefined;
    let failed = false;
    try {
      for (let i = 0; i < n; i++) {
        try {
          onCqe(ud[i]!, res[i]!, fl[i]!);
        } catch (e) {
          if (!failed) [failed, failure] = [true, e];
        }
      }
    } finally {
      this.#reaping = false;
    }
    if (failed) throw failure;
    return n;
  }

  // ---- registration ----

  #register(op: number, arg: bigint, nr: number, what: string): number {
    if (this.#closed) this.#throwClosed("io_uring_register");
    for (;;) {
      const r = rawSyscall(SYS_io_uring_register, BigInt(this.fd), BigInt(op), arg, BigInt(nr));
      if (r >= 0) return r;
      if (-r !== EINTR) {
        throw new SyscallError("io_uring_register", -r, `${what} (ring fd ${this.fd})`);
      }
    }
  }

  /** Registers `fds` as fixed files 0…n-1 (use with IOSQE_FIXED_FILE and the index as fd). */
  registerFiles(fds: readonly number[]): void {
    const buf = new AlignedBuffer(Math.max(4, fds.length * 4));
    try {
      const v = new DataView(buf.bytes.buffer);
      fds.forEach((fd, i) => v.setInt32(i * 4, fd, true));
      this.#register(IORING_REGISTER_FILES, buf.address, fds.length, "REGISTER_FILES");
    } finally {
      buf.free();
    }
  }

  /**
   * A fixed-buffer table of `nr` empty slots (IORING_REGISTER_BUFFERS2, sparse, Linux 5.19+), for
   * buffers the kernel installs itself: ublk's UBLK_F_AUTO_BUF_REG puts each request's pages in
   * slot `tag` before the request arrives and takes them out at commit.
   */
  registerSparseBuffers(nr: number): void {
    const arg = new AlignedBuffer(RSRC_REGISTER_SIZE);
    try {
      const v = new DataView(arg.bytes.buffer);
      v.setUint32(RSRC_REGISTER_NR, nr, true);
      v.setUint32(RSRC_REGISTER_FLAGS, IORING_RSRC_REGISTER_SPARSE, true);
      // nr_args is the size of the struct for the *2 opcodes.
      this.#register(
        IORING_REGISTER_BUFFERS2,
        arg.address,
        RSRC_REGISTER_SIZE,
        "REGISTER_BUFFERS2",
      );
    } finally {
      arg.free();
    }
  }

  /**
   * Registers `ringMemory` (page-aligned, `entries` × BUF_SIZE bytes, kept by the caller until the
   * io_uring closes, which unregisters it) as the provided-buffer ring of group `bgid`.
   */
  registerBufRing(ringMemory: NativeRegion, entries: number, bgid: number, flags: number): void {
    const arg = new AlignedBuffer(BUF_REG_SIZE);
    try {
      const v = new DataView(arg.bytes.buffer);
      v.setBigUint64(BUF_REG_RING_ADDR, ringMemory.address, true);
      v.setUint32(BUF_REG_RING_ENTRIES, entries, true);
      v.setUint16(BUF_REG_BGID, bgid, true);
      v.setUint16(BUF_REG_FLAGS, flags, true);
      this.#register(IORING_REGISTER_PBUF_RING, arg.address, 1, `REGISTER_PBUF_RING ${bgid}`);
    } finally {
      arg.free();
    }
  }

  /** Registers native regions as fixed buffers 0…n-1 (pinned by the kernel until unregistered). */
  registerBuffers(buffers: readonly NativeRegion[]): void {
    const buf = new AlignedBuffer(Math.max(IOVEC_SIZE, buffers.length * IOVEC_SIZE));
    try {
      const v = new DataView(buf.bytes.buffer);
      buffers.forEach((b, i) => {
        v.setBigUint64(i * IOVEC_SIZE + IOVEC_BASE, b.address, true);
        v.setBigUint64(i * IOVEC_SIZE + IOVEC_LEN, BigInt(b.lengthBytes), true);
      });
      this.#register(IORING_REGISTER_BUFFERS, buf.address, buffers.length, "REGISTER_BUFFERS");
    } finally {
      buf.free();
    }
  }

  /**
   * Unmaps the rings and closes the ring fd; in-flight requests are cancelled by the kernel.
   * Every later call throws EBADF (instead of touching unmapped memory).
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const [p, bytes] of this.#maps) munmap(p, bytes);
    this.#maps.length = 0;
    closeFd(this.fd);
    this.#scratch.free();
  }

  #throwClosed(what: string): never {
    throw new SyscallError(what, EBADF, `ring fd ${this.fd} (closed)`);
  }
}

/**
 * A provided-buffer ring (IORING_REGISTER_PBUF_RING): buffers the kernel picks from for requests
 * of group `bgid` that select one (a multishot uring_cmd, see `IoUring.useMultishotBuffers`);
 * each CQE names the buffer it filled (IORING_CQE_F_BUFFER, id in flags >> 16). The caller
 * hands a buffer (back) with `add` once it has read what the kernel wrote.
 */
export class ProvidedBufferRing {
  readonly bgid: number;
  readonly #memory: AlignedBuffer;
  readonly #view: DataView;
  readonly #tail: Uint16Array;
  readonly #mask: number;
  #next = 0;

  constructor(ring: IoUring, bgid: number, entries: number, flags: number) {
    this.bgid = bgid;
    this.#memory = new AlignedBuffer(entries * BUF_SIZE);
    this.#view = new DataView(this.#memory.bytes.buffer);
    this.#tail = new Uint16Array(this.#memory.bytes.buffer, BUF_RING_TAIL, 1);
    this.#mask = entries - 1;
    try {
      ring.registerBufRing(this.#memory, entries, bgid, flags);
    } catch (e) {
      this.#memory.free();
      throw e;
    }
  }

  /** Offers `lengthBytes` at native address `addr` as buffer `bid`. */
  add(addr: number, lengthBytes: number, bid: number): void {
    const slot = (this.#next & this.#mask) * BUF_SIZE;
    const v = this.#view;
    v.setUint32(slot + BUF_ADDR, addr % TWO_POW_32, true);
    v.setUint32(slot + BUF_ADDR + 4, Math.floor(addr / TWO_POW_32), true);
    v.setUint32(slot + BUF_LEN, lengthBytes, true);
    v.setUint16(slot + BUF_BID, bid, true);
    this.#next = (this.#next + 1) & 0xffff;
    // The kernel must see the slot before the tail that covers it: release store.
    Atomics.store(this.#tail, 0, this.#next);
  }

  /** Frees the ring's memory: only once its io_uring is closed. */
  free(): void {
    this.#memory.free();
  }
}
