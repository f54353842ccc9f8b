//! `linux/ublk_cmd.h`: the ublk ABI. Command opcodes (ioctl-encoded, with the legacy numbers as
//! fallback), feature flags, IO ops and flags, and the layouts of `ublksrv_ctrl_cmd`,
//! `ublksrv_ctrl_dev_info`, `ublk_params`, `ublksrv_io_desc` and `ublksrv_io_cmd` as named
//! offsets, with encode/decode helpers over a `DataView` (little-endian, x86_64).
//!
//! Follows include/uapi/linux/ublk_cmd.h of Linux 7.x; every layout used here is unchanged since
//! 6.1 (the host's 6.1 header agrees on each offset), and newer fields are appended, so one layout
//! serves 6.12 and 7.3. The kernel tells which features it has through GET_FEATURES.

import type { IoUring } from "./io_uring.ts";
import { MAP_POPULATE, MAP_SHARED, mmap, munmap, PROT_READ } from "./libc.ts";

// --- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------------

const IOC_NRSHIFT = 0;
const IOC_TYPESHIFT = 8;
const IOC_SIZESHIFT = 16;
const IOC_DIRSHIFT = 30;
const IOC_WRITE = 1;
const IOC_READ = 2;

/** `_IOC(dir, type, nr, size)` as an unsigned 32-bit number. */
function ioc(dir: number, type: string, nr: number, size: number): number {
  return ((dir << IOC_DIRSHIFT) | (size << IOC_SIZESHIFT) | (type.charCodeAt(0) << IOC_TYPESHIFT) |
    (nr << IOC_NRSHIFT)) >>> 0;
}
const ior = (nr: number, size: number) => ioc(IOC_READ, "u", nr, size);
const iowr = (nr: number, size: number) => ioc(IOC_READ | IOC_WRITE, "u", nr, size);

/** `_IOC_NR(op)`: the legacy command number inside an ioctl-encoded opcode. */
export function iocNr(op: number): number {
  return op & 0xff;
}

// --- struct ublksrv_ctrl_cmd (32 bytes, the payload of a control SQE at byte 48) ------------

export const CTRL_CMD_SIZE = 32;
export const CTRL_CMD_DEV_ID = 0; // __u32 dev_id
export const CTRL_CMD_QUEUE_ID = 4; // __u16 queue_id (-1 when not for a queue)
export const CTRL_CMD_LEN = 6; // __u16 len: size of the buffer at addr
export const CTRL_CMD_ADDR = 8; // __u64 addr: in/out buffer
export const CTRL_CMD_DATA0 = 16; // __u64 data[0]: inline argument (pid for START_DEV)
export const CTRL_CMD_DEV_PATH_LEN = 24; // __u16 dev_path_len (unprivileged devices only)

// --- struct ublksrv_io_cmd (16 bytes, the payload of an IO SQE at byte 48) -------------------

export const IO_CMD_SIZE = 16;
export const IO_CMD_Q_ID = 0; // __u16 q_id
export const IO_CMD_TAG = 2; // __u16 tag
export const IO_CMD_RESULT = 4; // __s32 result (COMMIT only: bytes done or -errno)
export const IO_CMD_ADDR = 8; // __u64 addr: the tag's buffer in our address space

/**
 * Fills `sqe` (from `ring.sqe()`) with ublk IO command `cmdOp` (FETCH_REQ, COMMIT_AND_FETCH_REQ)
 * for `tag` of queue `queueId` on /dev/ublkcN (`charFd`). `result` is the committed request's
 * bytes or -errno; `addr` the tag's buffer (0 with zero copy), a number (no BigInt on the IO
 * path); `sqeAddr` goes into sqe->addr: with UBLK_F_AUTO_BUF_REG the `ublk_auto_buf_reg` of the
 * next request (`autoBufReg`), otherwise 0.
 */
export function prepIoCommand(
  ring: IoUring,
  sqe: number,
  charFd: number,
  cmdOp: number,
  queueId: number,
  tag: number,
  result: number,
  addr: number,
  sqeAddr: number,
  userData: number,
): void {
  const p = ring.prepUringCmd(sqe, charFd, cmdOp, userData);
  if (sqeAddr !== 0) ring.setSqeAddr(sqe, sqeAddr);
  const v = ring.sqeView;
  v.setUint16(p + IO_CMD_Q_ID, queueId, true);
  v.setUint16(p + IO_CMD_TAG, tag, true);
  v.setInt32(p + IO_CMD_RESULT, result, true);
  v.setUint32(p + IO_CMD_ADDR, addr % 0x1_0000_0000, true);
  v.setUint32(p + IO_CMD_ADDR + 4, Math.floor(addr / 0x1_0000_0000), true);
}

// --- control opcodes -------------------------------------------------------------------------

/** Legacy (plain number) control opcodes, accepted only with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES. */
export const UBLK_CMD_GET_QUEUE_AFFINITY = 0x01;
export const UBLK_CMD_GET_DEV_INFO = 0x02;
export const UBLK_CMD_ADD_DEV = 0x04;
export const UBLK_CMD_DEL_DEV = 0x05;
export const UBLK_CMD_START_DEV = 0x06;
export const UBLK_CMD_STOP_DEV = 0x07;
export const UBLK_CMD_SET_PARAMS = 0x08;
export const UBLK_CMD_GET_PARAMS = 0x09;
export const UBLK_CMD_START_USER_RECOVERY = 0x10;
export const UBLK_CMD_END_USER_RECOVERY = 0x11;
export const UBLK_CMD_GET_DEV_INFO2 = 0x12;

export const UBLK_U_CMD_GET_QUEUE_AFFINITY = ior(UBLK_CMD_GET_QUEUE_AFFINITY, CTRL_CMD_SIZE);
export const UBLK_U_CMD_GET_DEV_INFO = ior(UBLK_CMD_GET_DEV_INFO, CTRL_CMD_SIZE);
export const UBLK_U_CMD_ADD_DEV = iowr(UBLK_CMD_ADD_DEV, CTRL_CMD_SIZE);
export const UBLK_U_CMD_DEL_DEV = iowr(UBLK_CMD_DEL_DEV, CTRL_CMD_SIZE);
export const UBLK_U_CMD_START_DEV = iowr(UBLK_CMD_START_DEV, CTRL_CMD_SIZE);
export const UBLK_U_CMD_STOP_DEV = iowr(UBLK_CMD_STOP_DEV, CTRL_CMD_SIZE);
export const UBLK_U_CMD_SET_PARAMS = iowr(UBLK_CMD_SET_PARAMS, CTRL_CMD_SIZE);
export const UBLK_U_CMD_GET_PARAMS = ior(UBLK_CMD_GET_PARAMS, CTRL_CMD_SIZE);
export const UBLK_U_CMD_START_USER_RECOVERY = iowr(UBLK_CMD_START_USER_RECOVERY, CTRL_CMD_SIZE);
export const UBLK_U_CMD_END_USER_RECOVERY = iowr(UBLK_CMD_END_USER_RECOVERY, CTRL_CMD_SIZE);
export const UBLK_U_CMD_GET_DEV_INFO2 = ior(UBLK_CMD_GET_DEV_INFO2, CTRL_CMD_SIZE);
/** No legacy number: the kernel compares the whole encoded value (6.5+). */
export const UBLK_U_CMD_GET_FEATURES = ior(0x13, CTRL_CMD_SIZE);
export const UBLK_U_CMD_DEL_DEV_ASYNC = ior(0x14, CTRL_CMD_SIZE);
export const UBLK_U_CMD_UPDATE_SIZE = iowr(0x15, CTRL_CMD_SIZE);
export const UBLK_U_CMD_QUIESCE_DEV = iowr(0x16, CTRL_CMD_SIZE);
export const UBLK_U_CMD_TRY_STOP_DEV = iowr(0x17, CTRL_CMD_SIZE);
/** GET_FEATURES writes this many bytes (one __u64) to addr; len must equal it. */
export const UBLK_FEATURES_LEN = 8;

// --- IO opcodes (on /dev/ublkcN) -------------------------------------------------------------

export const UBLK_IO_FETCH_REQ = 0x20;
export const UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21;
export const UBLK_IO_NEED_GET_DATA = 0x22;
export const UBLK_U_IO_FETCH_REQ = iowr(UBLK_IO_FETCH_REQ, IO_CMD_SIZE);
export const UBLK_U_IO_COMMIT_AND_FETCH_REQ = iowr(UBLK_IO_COMMIT_AND_FETCH_REQ, IO_CMD_SIZE);
export const UBLK_U_IO_NEED_GET_DATA = iowr(UBLK_IO_NEED_GET_DATA, IO_CMD_SIZE);
export const UBLK_U_IO_REGISTER_IO_BUF = iowr(0x23, IO_CMD_SIZE);
export const UBLK_U_IO_UNREGISTER_IO_BUF = iowr(0x24, IO_CMD_SIZE);

// --- batched IO commands (UBLK_F_BATCH_IO, 7.0+) ----------------------------------------------
// PREP_IO_CMDS readies tags (instead of one FETCH_REQ each), COMMIT_IO_CMDS gives back finished
// requests and readies their tags again, and the multishot FETCH_IO_CMDS delivers the tags of
// new requests into a provided buffer, as u16s, many per CQE. PREP and COMMIT carry an array of
// elements at sqe->addr; the header below is the command payload at byte 48.

// struct ublk_batch_io (16 bytes)
export const BATCH_IO_SIZE = 16;
export const BATCH_IO_Q_ID = 0; // __u16 q_id
export const BATCH_IO_FLAGS = 2; // __u16 flags (UBLK_BATCH_F_*)
export const BATCH_IO_NR_ELEM = 4; // __u16 nr_elem: elements at sqe->addr (PREP, COMMIT)
export const BATCH_IO_ELEM_BYTES = 6; // __u8 elem_bytes: 8, +8 with HAS_BUF_ADDR; 2 for FETCH
/** The element carries the tag's buffer address (copy mode: required there, refused elsewhere). */
export const UBLK_BATCH_F_HAS_BUF_ADDR = 1 << 1;

// struct ublk_elem_header (8 bytes), then __u64 buf_addr with UBLK_BATCH_F_HAS_BUF_ADDR
export const ELEM_HEADER_SIZE = 8;
export const ELEM_TAG = 0; // __u16 tag
export const ELEM_BUF_INDEX = 2; // __u16 buf_index: the fixed-buffer slot (UBLK_F_AUTO_BUF_REG)
export const ELEM_RESULT = 4; // __s32 result (COMMIT: bytes done or -errno)
export const ELEM_BUF_ADDR = 8; // __u64 buf_addr (after the header)
/** FETCH_IO_CMDS writes each tag as one __u16. */
export const FETCH_ELEM_BYTES = 2;

export const UBLK_U_IO_PREP_IO_CMDS = iowr(0x25, BATCH_IO_SIZE);
export const UBLK_U_IO_COMMIT_IO_CMDS = iowr(0x26, BATCH_IO_SIZE);
export const UBLK_U_IO_FETCH_IO_CMDS = iowr(0x27, BATCH_IO_SIZE);

/**
 * Fills `sqe` with batched command `cmdOp` for queue `queueId` on /dev/ublkcN: `nrElem` elements
 * of `elemBytes` at native address `elemsAddr` (PREP, COMMIT; 0 for FETCH, whose buffer the
 * caller selects with `IoUring.useMultishotBuffers`).
 */
export function prepBatchCommand(
  ring: IoUring,
  sqe: number,
  charFd: number,
  cmdOp: number,
  queueId: number,
  flags: number,
  nrElem: number,
  elemBytes: number,
  elemsAddr: number,
  userData: number,
): void {
  const p = ring.prepUringCmd(sqe, charFd, cmdOp, userData);
  if (elemsAddr !== 0) ring.setSqeAddr(sqe, elemsAddr);
  const v = ring.sqeView;
  v.setUint16(p + BATCH_IO_Q_ID, queueId, true);
  v.setUint16(p + BATCH_IO_FLAGS, flags, true);
  v.setUint16(p + BATCH_IO_NR_ELEM, nrElem, true);
  v.setUint8(p + BATCH_IO_ELEM_BYTES, elemBytes);
}

// --- struct ublk_auto_buf_reg, carried in sqe->addr of FETCH / COMMIT_AND_FETCH (7.x) ---------
// bits 0-15 index, 16-23 flags, 24-31 reserved0, 32-63 reserved1 (ublk_auto_buf_reg_to_sqe_addr).
export const AUTO_BUF_REG_INDEX_SHIFT = 0;
export const AUTO_BUF_REG_FLAGS_SHIFT = 16;
/** Complete the fetch with UBLK_IO_F_NEED_REG_BUF instead of failing when registration fails. */
export const UBLK_AUTO_BUF_REG_FALLBACK = 1 << 0;
export const UBLK_IO_F_NEED_REG_BUF = 1 << 17;

/** sqe->addr asking the driver to register the next request's buffer at fixed-buffer `index`. */
export function autoBufReg(index: number, flags = 0): number {
  return (index << AUTO_BUF_REG_INDEX_SHIFT) | (flags << AUTO_BUF_REG_FLAGS_SHIFT);
}

/** Result of a fetch CQE: a request is in the descriptor. */
export const UBLK_IO_RES_OK = 0;
export const UBLK_IO_RES_NEED_GET_DATA = 1;
/** -ENODEV: the device is stopping (or the queue was cancelled); do not fetch again. */
export const UBLK_IO_RES_ABORT = -19;

// --- memory map of /dev/ublkcN ----------------------------------------------------------------

export const UBLKSRV_CMD_BUF_OFFSET = 0;
export const UBLKSRV_IO_BUF_OFFSET = 0x80000000;
export const UBLK_MAX_QUEUE_DEPTH = 4096;
export const UBLK_MAX_NR_QUEUES = 4096;
/** Largest single IO buffer the driver supports (UBLK_IO_BUF_BITS = 25). */
export const UBLK_IO_BUF_MAX_BYTES = 1 << 25;

// --- feature flags (__u64 in dev_info.flags and GET_FEATURES; all fit in 2^53) ---------------

export const UBLK_F_SUPPORT_ZERO_COPY = 2 ** 0;
export const UBLK_F_URING_CMD_COMP_IN_TASK = 2 ** 1;
export const UBLK_F_NEED_GET_DATA = 2 ** 2;
export const UBLK_F_USER_RECOVERY = 2 ** 3;
export const UBLK_F_USER_RECOVERY_REISSUE = 2 ** 4;
export const UBLK_F_UNPRIVILEGED_DEV = 2 ** 5;
export const UBLK_F_CMD_IOCTL_ENCODE = 2 ** 6;
export const UBLK_F_USER_COPY = 2 ** 7;
export const UBLK_F_ZONED = 2 ** 8;
export const UBLK_F_USER_RECOVERY_FAIL_IO = 2 ** 9;
export const UBLK_F_UPDATE_SIZE = 2 ** 10;
export const UBLK_F_AUTO_BUF_REG = 2 ** 11;
export const UBLK_F_QUIESCE = 2 ** 12;
export const UBLK_F_PER_IO_DAEMON = 2 ** 13;
export const UBLK_F_BUF_REG_OFF_DAEMON = 2 ** 14;
export const UBLK_F_BATCH_IO = 2 ** 15;
export const UBLK_F_INTEGRITY = 2 ** 16;
export const UBLK_F_SAFE_STOP_DEV = 2 ** 17;
export const UBLK_F_NO_AUTO_PART_SCAN = 2 ** 18;
export const UBLK_F_SHMEM_ZC = 2 ** 19;

/** Feature bit → name, for `doctor` and logs. Bits the kernel sets beyond these show as `bit N`. */
export const UBLK_FEATURE_NAMES: readonly (readonly [number, string])[] = [
  [UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"],
  [UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"],
  [UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"],
  [UBLK_F_USER_RECOVERY, "USER_RECOVERY"],
  [UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"],
  [UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"],
  [UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"],
  [UBLK_F_USER_COPY, "USER_COPY"],
  [UBLK_F_ZONED, "ZONED"],
  [UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"],
  [UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"],
  [UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"],
  [UBLK_F_QUIESCE, "QUIESCE"],
  [UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"],
  [UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"],
  [UBLK_F_BATCH_IO, "BATCH_IO"],
  [UBLK_F_INTEGRITY, "INTEGRITY"],
  [UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV"],
  [UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"],
  [UBLK_F_SHMEM_ZC, "SHMEM_ZC"],
];

/** Names of the bits set in `flags` (a __u64 as bigint), unknown bits as `bit N`. */
export function featureNames(flags: bigint): string[] {
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (((flags >> BigInt(bit)) & 1n) === 0n) continue;
    const known = UBLK_FEATURE_NAMES.find(([value]) => value === 2 ** bit);
    names.push(known ? known[1] : `bit ${bit}`);
  }
  return names;
}

/** True when every bit of `mask` (a flag above) is set in `flags`. */
export function hasFeature(flags: bigint, mask: number): boolean {
  const m = BigInt(mask);
  return (flags & m) === m;
}

// --- device state (dev_info.state) ------------------------------------------------------------

export const UBLK_S_DEV_DEAD = 0;
export const UBLK_S_DEV_LIVE = 1;
export const UBLK_S_DEV_QUIESCED = 2;
export const UBLK_S_DEV_FAIL_IO = 3;
export const UBLK_STATE_NAMES: Record<number, string> = {
  [UBLK_S_DEV_DEAD]: "dead",
  [UBLK_S_DEV_LIVE]: "live",
  [UBLK_S_DEV_QUIESCED]: "quiesced",
  [UBLK_S_DEV_FAIL_IO]: "fail-io",
};

// --- struct ublksrv_ctrl_dev_info (64 bytes) --------------------------------------------------

export const DEV_INFO_SIZE = 64;
export const DEV_INFO_NR_HW_QUEUES = 0; // __u16 nr_hw_queues
export const DEV_INFO_QUEUE_DEPTH = 2; // __u16 queue_depth
export const DEV_INFO_STATE = 4; // __u16 state
export const DEV_INFO_MAX_IO_BUF_BYTES = 8; // __u32 max_io_buf_bytes
export const DEV_INFO_DEV_ID = 12; // __u32 dev_id
export const DEV_INFO_UBLKSRV_PID = 16; // __s32 ublksrv_pid
export const DEV_INFO_FLAGS = 24; // __u64 flags
export const DEV_INFO_UBLKSRV_FLAGS = 32; // __u64 ublksrv_flags (ours, ignored by the kernel)
export const DEV_INFO_OWNER_UID = 40; // __u32 owner_uid (set by the kernel)
export const DEV_INFO_OWNER_GID = 44; // __u32 owner_gid (set by the kernel)

export interface DevInfo {
  nrHwQueues: number;
  queueDepth: number;
  state: number;
  maxIoBufBytes: number;
  devId: number;
  ublksrvPid: number;
  flags: bigint;
  ublksrvFlags: bigint;
  ownerUid: number;
  ownerGid: number;
}

export function encodeDevInfo(view: DataView, info: Partial<DevInfo>): void {
  for (let i = 0; i < DEV_INFO_SIZE; i++) view.setUint8(i, 0);
  view.setUint16(DEV_INFO_NR_HW_QUEUES, info.nrHwQueues ?? 0, true);
  view.setUint16(DEV_INFO_QUEUE_DEPTH, info.queueDepth ?? 0, true);
  view.setUint16(DEV_INFO_STATE, info.state ?? 0, true);
  view.setUint32(DEV_INFO_MAX_IO_BUF_BYTES, info.maxIoBufBytes ?? 0, true);
  view.setUint32(DEV_INFO_DEV_ID, info.devId ?? 0xffffffff, true);
  view.setInt32(DEV_INFO_UBLKSRV_PID, info.ublksrvPid ?? 0, true);
  view.setBigUint64(DEV_INFO_FLAGS, info.flags ?? 0n, true);
  view.setBigUint64(DEV_INFO_UBLKSRV_FLAGS, info.ublksrvFlags ?? 0n, true);
}

export function decodeDevInfo(view: DataView): DevInfo {
  return {
    nrHwQueues: view.getUint16(DEV_INFO_NR_HW_QUEUES, true),
    queueDepth: view.getUint16(DEV_INFO_QUEUE_DEPTH, true),
    state: view.getUint16(DEV_INFO_STATE, true),
    maxIoBufBytes: view.getUint32(DEV_INFO_MAX_IO_BUF_BYTES, true),
    devId: view.getUint32(DEV_INFO_DEV_ID, true),
    ublksrvPid: view.getInt32(DEV_INFO_UBLKSRV_PID, true),
    flags: view.getBigUint64(DEV_INFO_FLAGS, true),
    ublksrvFlags: view.getBigUint64(DEV_INFO_UBLKSRV_FLAGS, true),
    ownerUid: view.getUint32(DEV_INFO_OWNER_UID, true),
    ownerGid: view.getUint32(DEV_INFO_OWNER_GID, true),
  };
}

// --- struct ublk_params -----------------------------------------------------------------------

export const UBLK_PARAM_TYPE_BASIC = 1 << 0;
export const UBLK_PARAM_TYPE_DISCARD = 1 << 1;
export const UBLK_PARAM_TYPE_DEVT = 1 << 2;
export const UBLK_PARAM_TYPE_ZONED = 1 << 3;
export const UBLK_PARAM_TYPE_DMA_ALIGN = 1 << 4;
export const UBLK_PARAM_TYPE_SEGMENT = 1 << 5;

export const UBLK_ATTR_READ_ONLY = 1 << 0;
export const UBLK_ATTR_ROTATIONAL = 1 << 1;
export const UBLK_ATTR_VOLATILE_CACHE = 1 << 2;
export const UBLK_ATTR_FUA = 1 << 3;

export const PARAMS_LEN = 0; // __u32 len: bytes of ublk_params we pass/accept
export const PARAMS_TYPES = 4; // __u32 types: UBLK_PARAM_TYPE_* present
// struct ublk_param_basic basic (32 bytes) at 8
export const PARAMS_BASIC_ATTRS = 8; // __u32 attrs: UBLK_ATTR_*
export const PARAMS_BASIC_LOGICAL_BS_SHIFT = 12; // __u8 logical_bs_shift
export const PARAMS_BASIC_PHYSICAL_BS_SHIFT = 13; // __u8 physical_bs_shift
export const PARAMS_BASIC_IO_OPT_SHIFT = 14; // __u8 io_opt_shift
export const PARAMS_BASIC_IO_MIN_SHIFT = 15; // __u8 io_min_shift
export const PARAMS_BASIC_MAX_SECTORS = 16; // __u32 max_sectors
export const PARAMS_BASIC_CHUNK_SECTORS = 20; // __u32 chunk_sectors
export const PARAMS_BASIC_DEV_SECTORS = 24; // __u64 dev_sectors
export const PARAMS_BASIC_VIRT_BOUNDARY_MASK = 32; // __u64 virt_boundary_mask
// struct ublk_param_discard discard (20 bytes) at 40
export const PARAMS_DISCARD_ALIGNMENT = 40; // __u32 discard_alignment
export const PARAMS_DISCARD_GRANULARITY = 44; // __u32 discard_granularity
export const PARAMS_DISCARD_MAX_SECTORS = 48; // __u32 max_discard_sectors
export const PARAMS_DISCARD_MAX_WRITE_ZEROES_SECTORS = 52; // __u32 max_write_zeroes_sectors
export const PARAMS_DISCARD_MAX_SEGMENTS = 56; // __u16 max_discard_segments
// struct ublk_param_devt devt (16 bytes) at 60, read-only (GET_PARAMS)
export const PARAMS_DEVT_CHAR_MAJOR = 60; // __u32 char_major
export const PARAMS_DEVT_CHAR_MINOR = 64; // __u32 char_minor
export const PARAMS_DEVT_DISK_MAJOR = 68; // __u32 disk_major
export const PARAMS_DEVT_DISK_MINOR = 72; // __u32 disk_minor
/** Bytes of ublk_params up to the end of `devt`: what fastloop sets and reads. */
export const PARAMS_SIZE_THROUGH_DEVT = 76;
/** Bytes up to the end of `discard`: SET_PARAMS sends only basic + discard. */
export const PARAMS_SIZE_THROUGH_DISCARD = 60;

export interface BasicParams {
  attrs: number;
  logicalBsShift: number;
  physicalBsShift: number;
  ioOptShift: number;
  ioMinShift: number;
  maxSectors: number;
  chunkSectors: number;
  devSectors: number;
}

export interface DiscardParams {
  alignment: number;
  granularity: number;
  maxDiscardSectors: number;
  maxWriteZeroesSectors: number;
  maxSegments: number;
}

export interface DevtParams {
  charMajor: number;
  charMinor: number;
  diskMajor: number;
  diskMinor: number;
}

export interface UblkParams {
  types: number;
  basic: BasicParams;
  discard?: DiscardParams;
  devt?: DevtParams;
}

/** Writes basic (+ discard) into `view` for SET_PARAMS; returns the `len` to pass. */
export function encodeParams(
  view: DataView,
  basic: BasicParams,
  discard?: DiscardParams,
): number {
  const len = PARAMS_SIZE_THROUGH_DISCARD;
  for (let i = 0; i < len; i++) view.setUint8(i, 0);
  view.setUint32(PARAMS_LEN, len, true);
  view.setUint32(
    PARAMS_TYPES,
    UBLK_PARAM_TYPE_BASIC | (discard ? UBLK_PARAM_TYPE_DISCARD : 0),
    true,
  );
  view.setUint32(PARAMS_BASIC_ATTRS, basic.attrs, true);
  view.setUint8(PARAMS_BASIC_LOGICAL_BS_SHIFT, basic.logicalBsShift);
  view.setUint8(PARAMS_BASIC_PHYSICAL_BS_SHIFT, basic.physicalBsShift);
  view.setUint8(PARAMS_BASIC_IO_OPT_SHIFT, basic.ioOptShift);
  view.setUint8(PARAMS_BASIC_IO_MIN_SHIFT, basic.ioMinShift);
  view.setUint32(PARAMS_BASIC_MAX_SECTORS, basic.maxSectors, true);
  view.setUint32(PARAMS_BASIC_CHUNK_SECTORS, basic.chunkSectors, true);
  view.setBigUint64(PARAMS_BASIC_DEV_SECTORS, BigInt(basic.devSectors), true);
  if (discard) {
    view.setUint32(PARAMS_DISCARD_ALIGNMENT, discard.alignment, true);
    view.setUint32(PARAMS_DISCARD_GRANULARITY, discard.granularity, true);
    view.setUint32(PARAMS_DISCARD_MAX_SECTORS, discard.maxDiscardSectors, true);
    view.setUint32(
      PARAMS_DISCARD_MAX_WRITE_ZEROES_SECTORS,
      discard.maxWriteZeroesSectors,
      true,
    );
    view.setUint16(PARAMS_DISCARD_MAX_SEGMENTS, discard.maxSegments, true);
  }
  return len;
}

export function decodeParams(view: DataView): UblkParams {
  const types = view.getUint32(PARAMS_TYPES, true);
  const params: UblkParams = {
    types,
    basic: {
      attrs: view.getUint32(PARAMS_BASIC_ATTRS, true),
      logicalBsShift: view.getUint8(PARAMS_BASIC_LOGICAL_BS_SHIFT),
      physicalBsShift: view.getUint8(PARAMS_BASIC_PHYSICAL_BS_SHIFT),
      ioOptShift: view.getUint8(PARAMS_BASIC_IO_OPT_SHIFT),
      ioMinShift: view.getUint8(PARAMS_BASIC_IO_MIN_SHIFT),
      maxSectors: view.getUint32(PARAMS_BASIC_MAX_SECTORS, true),
      chunkSectors: view.getUint32(PARAMS_BASIC_CHUNK_SECTORS, true),
      devSectors: Number(view.getBigUint64(PARAMS_BASIC_DEV_SECTORS, true)),
    },
  };
  if (types & UBLK_PARAM_TYPE_DISCARD) {
    params.discard = {
      alignment: view.getUint32(PARAMS_DISCARD_ALIGNMENT, true),
      granularity: view.getUint32(PARAMS_DISCARD_GRANULARITY, true),
      maxDiscardSectors: view.getUint32(PARAMS_DISCARD_MAX_SECTORS, true),
      maxWriteZeroesSectors: view.getUint32(PARAMS_DISCARD_MAX_WRITE_ZEROES_SECTORS, true),
      maxSegments: view.getUint16(PARAMS_DISCARD_MAX_SEGMENTS, true),
    };
  }
  if (types & UBLK_PARAM_TYPE_DEVT && view.byteLength >= PARAMS_SIZE_THROUGH_DEVT) {
    params.devt = {
      charMajor: view.getUint32(PARAMS_DEVT_CHAR_MAJOR, true),
      charMinor: view.getUint32(PARAMS_DEVT_CHAR_MINOR, true),
      diskMajor: view.getUint32(PARAMS_DEVT_DISK_MAJOR, true),
      diskMinor: view.getUint32(PARAMS_DEVT_DISK_MINOR, true),
    };
  }
  return params;
}

// --- struct ublksrv_io_desc (24 bytes per tag, mmapped read-only from /dev/ublkcN) -----------

export const IO_DESC_SIZE = 24;
export const IO_DESC_OP_FLAGS = 0; // __u32 op_flags: op in bits 0-7, UBLK_IO_F_* above
export const IO_DESC_NR_SECTORS = 4; // __u32 nr_sectors
export const IO_DESC_START_SECTOR = 8; // __u64 start_sector
export const IO_DESC_ADDR = 16; // __u64 addr: the buffer we gave at fetch

export const UBLK_IO_OP_READ = 0;
export const UBLK_IO_OP_WRITE = 1;
export const UBLK_IO_OP_FLUSH = 2;
export const UBLK_IO_OP_DISCARD = 3;
export const UBLK_IO_OP_WRITE_SAME = 4;
export const UBLK_IO_OP_WRITE_ZEROES = 5;

export const UBLK_IO_F_FAILFAST_DEV = 1 << 8;
export const UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9;
export const UBLK_IO_F_FAILFAST_DRIVER = 1 << 10;
export const UBLK_IO_F_META = 1 << 11;
export const UBLK_IO_F_FUA = 1 << 13;
export const UBLK_IO_F_NOUNMAP = 1 << 15;
export const UBLK_IO_F_SWAP = 1 << 16;

/**
 * Maps queue `queueId`'s descriptor area of /dev/ublkcN (`charFd`), read-only (the driver refuses
 * writable maps): tag t's `ublksrv_io_desc` is at t * IO_DESC_SIZE. `unmap` before DEL_DEV, which
 * waits for every mapping of the device to go.
 */
export function mapIoDescriptors(
  charFd: number,
  devId: number,
  queueId: number,
  depth: number,
): { desc: DataView; unmap(): void } {
  const bytes = ioDescAreaBytes(depth);
  const ptr = mmap(
    bytes,
    PROT_READ,
    MAP_SHARED | MAP_POPULATE,
    charFd,
    ioDescMmapOffset(queueId),
    `/dev/ublkc${devId} queue ${queueId}`,
  );
  return {
    desc: new DataView(Deno.UnsafePointerView.getArrayBuffer(ptr, bytes)),
    unmap: () => munmap(ptr, bytes),
  };
}

/** Size of a queue's descriptor area: whole pages, as the kernel allocates and maps it. */
export function ioDescAreaBytes(depth: number, pageSize = 4096): number {
  return Math.ceil((depth * IO_DESC_SIZE) / pageSize) * pageSize;
}

/** mmap offset of queue `q`'s descriptors: queues are spaced by the area of the largest depth. */
export function ioDescMmapOffset(queueId: number, pageSize = 4096): number {
  return UBLKSRV_CMD_BUF_OFFSET + queueId * ioDescAreaBytes(UBLK_MAX_QUEUE_DEPTH, pageSize);
}

// Sector arithmetic: 512-byte units, as the block layer counts them.
export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE = 512;
