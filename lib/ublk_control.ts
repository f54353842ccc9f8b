//! Device lifecycle control on `/dev/ublk-control`: features, add, params, start, stop, delete,
//! info, user recovery and resize. Each command is an `IORING_OP_URING_CMD` on this module's own io_uring
//! (SQE128: the 32-byte `ublksrv_ctrl_cmd` sits at byte 48 of the SQE).
//!
//! Why the commands are awaited and not waited for synchronously: the driver refuses control
//! commands in io_uring's non-blocking issue path (-EAGAIN), so io_uring runs them on an io-wq
//! kernel thread and `io_uring_enter` returns as soon as the SQE is handed over. Some of them
//! block there for a long time: START_DEV and END_USER_RECOVERY until every tag of every queue
//! has been fetched, DEL_DEV until `/dev/ublkcN` is closed and unmapped. So a command is
//! submitted synchronously (the SQ is only ever touched by the main thread) and its completion is
//! awaited with a `nonblocking` `io_uring_enter(GETEVENTS)` that sleeps on a Deno helper thread;
//! the main thread stays free to start the queue Workers that START_DEV is waiting for. The
//! helper thread never reads errno: a raw syscall returns -errno, and every command's own result
//! comes back in its CQE.
//!
//! Opcodes: the ioctl-encoded `UBLK_U_CMD_*` first, and on -EOPNOTSUPP the legacy number (kernels
//! built without legacy opcodes refuse the latter; kernels before `UBLK_F_CMD_IOCTL_ENCODE` refuse
//! the former).

import { IORING_ASYNC_CANCEL_ALL, IORING_ASYNC_CANCEL_ANY, IoUring } from "../ffi/io_uring.ts";
import { AlignedBuffer, close, geteuid, O_RDWR, open } from "../ffi/libc.ts";
import { EACCES, EBADF, ENOENT, EOPNOTSUPP, EPERM, SyscallError } from "../ffi/errno.ts";
import { ExitCode, ublkMissingError, UserError } from "./errors.ts";
import {
  type BasicParams,
  CTRL_CMD_ADDR,
  CTRL_CMD_DATA0,
  CTRL_CMD_DEV_ID,
  CTRL_CMD_LEN,
  CTRL_CMD_QUEUE_ID,
  decodeDevInfo,
  decodeParams,
  DEV_INFO_SIZE,
  type DevInfo,
  type DiscardParams,
  encodeDevInfo,
  encodeParams,
  iocNr,
  PARAMS_LEN,
  PARAMS_SIZE_THROUGH_DEVT,
  UBLK_FEATURES_LEN,
  UBLK_U_CMD_ADD_DEV,
  UBLK_U_CMD_DEL_DEV,
  UBLK_U_CMD_END_USER_RECOVERY,
  UBLK_U_CMD_GET_DEV_INFO,
  UBLK_U_CMD_GET_FEATURES,
  UBLK_U_CMD_GET_PARAMS,
  UBLK_U_CMD_QUIESCE_DEV,
  UBLK_U_CMD_SET_PARAMS,
  UBLK_U_CMD_START_DEV,
  UBLK_U_CMD_START_USER_RECOVERY,
  UBLK_U_CMD_STOP_DEV,
  UBLK_U_CMD_UPDATE_SIZE,
  type UblkParams,
} from "../ffi/ublk_cmd.ts";

export const UBLK_CONTROL_PATH = "/dev/ublk-control";

/** dev_id / queue_id meaning "none" (a new device's id chosen by the kernel; not a queue). */
const NO_DEV_ID = 0xffffffff;
const NO_QUEUE_ID = 0xffff;
const RING_ENTRIES = 16;
const CMD_BUFFER_BYTES = 4096;
/** user_data of cancel requests: nobody waits for their CQE. */
const CANCEL_USER_DATA = 0;

const COMMAND_NAMES: Record<number, string> = {
  [iocNr(UBLK_U_CMD_GET_DEV_INFO)]: "UBLK_CMD_GET_DEV_INFO",
  [iocNr(UBLK_U_CMD_ADD_DEV)]: "UBLK_CMD_ADD_DEV",
  [iocNr(UBLK_U_CMD_DEL_DEV)]: "UBLK_CMD_DEL_DEV",
  [iocNr(UBLK_U_CMD_START_DEV)]: "UBLK_CMD_START_DEV",
  [iocNr(UBLK_U_CMD_STOP_DEV)]: "UBLK_CMD_STOP_DEV",
  [iocNr(UBLK_U_CMD_SET_PARAMS)]: "UBLK_CMD_SET_PARAMS",
  [iocNr(UBLK_U_CMD_GET_PARAMS)]: "UBLK_CMD_GET_PARAMS",
  [iocNr(UBLK_U_CMD_START_USER_RECOVERY)]: "UBLK_CMD_START_USER_RECOVERY",
  [iocNr(UBLK_U_CMD_END_USER_RECOVERY)]: "UBLK_CMD_END_USER_RECOVERY",
  [iocNr(UBLK_U_CMD_GET_FEATURES)]: "UBLK_U_CMD_GET_FEATURES",
  [iocNr(UBLK_U_CMD_UPDATE_SIZE)]: "UBLK_U_CMD_UPDATE_SIZE",
  [iocNr(UBLK_U_CMD_QUIESCE_DEV)]: "UBLK_U_CMD_QUIESCE_DEV",
};

interface CommandArgs {
  devId: number;
  /** In/out buffer for the command (copied in before, out after). */
  buffer?: Uint8Array;
  /**
   * `data[0]`: the server pid for START_DEV / END_USER_RECOVERY, the sectors for UPDATE_SIZE, the
   * timeout of QUIESCE_DEV.
   */
  data0?: number;
  /** False for GET_FEATURES and QUIESCE_DEV, which have no legacy number. */
  legacy?: boolean;
}

/** What ADD_DEV asks for; the kernel may lower queues (to the CPU count) and max IO size. */
export interface AddDeviceRequest {
  /** -1 (or undefined): let the kernel choose. */
  devId?: number;
  queues: number;
  depth: number;
  maxIoBytes: number;
  flags: bigint;
}

/**
 * One open `/dev/ublk-control` with its own ring. Commands may overlap (START_DEV waits for the
 * queues while the caller goes on); each has its own native buffer and a user_data sequence.
 */
export class UblkControl {
  readonly #fd: number;
  readonly #ring: IoUring;
  #nextId = 1;
  /** user_data → CQE result, filled by `#reap` for whichever command finished. */
  readonly #done = new Map<number, number>();
  #closed = false;

  private constructor(fd: number, ring: IoUring) {
    this.#fd = fd;
    this.#ring = ring;
  }

  /** Opens the control device; clear errors when ublk is missing or we are not root. */
  static open(): UblkControl {
    let fd: number;
    try {
      fd = open(UBLK_CONTROL_PATH, O_RDWR);
    } catch (e) {
      if (e instanceof SyscallError && e.errno === ENOENT) {
        throw ublkMissingError();
      }
      if (e instanceof SyscallError && (e.errno === EACCES || e.errno === EPERM)) {
        throw new UserError(
          `Cannot open ${UBLK_CONTROL_PATH}: ${e.code} (fastloop must run as root)`,
          ExitCode.permission,
        );
      }
      throw e;
    }
    if (geteuid() !== 0) {
      close(fd);
      throw new UserError("fastloop must run as root to create ublk devices", ExitCode.permission);
    }
    try {
      return new UblkControl(fd, IoUring.setup(RING_ENTRIES, { sqe128: true }));
    } catch (e) {
      close(fd);
      throw e;
    }
  }

  /** `UBLK_U_CMD_GET_FEATURES`: the UBLK_F_* bits this kernel supports. */
  getFeatures(): bigint {
    const buf = new Uint8Array(UBLK_FEATURES_LEN);
    const id = this.#submit(UBLK_U_CMD_GET_FEATURES, { devId: NO_DEV_ID, buffer: buf }, buf);
    try {
      const res = this.#waitSync(id.userData);
      if (res < 0) throw new SyscallError("UBLK_U_CMD_GET_FEATURES", -res, UBLK_CONTROL_PATH);
      // Read before the native buffer is unmapped (its views die with it).
      return new DataView(id.copyOut.buffer, id.copyOut.byteOffset, 8).getBigUint64(0, true);
    } finally {
      id.native.free();
    }
  }

  /** ADD_DEV: creates /dev/ublkcN; returns what the kernel granted (id, queues, flags). */
  async addDevice(req: AddDeviceRequest): Promise<DevInfo> {
    const devId = req.devId === undefined || req.devId < 0 ? NO_DEV_ID : req.devId;
    const buf = new Uint8Array(DEV_INFO_SIZE);
    encodeDevInfo(new DataView(buf.buffer), {
      nrHwQueues: req.queues,
      queueDepth: req.depth,
      maxIoBufBytes: req.maxIoBytes,
      devId,
      flags: req.flags,
    });
    await this.#command(UBLK_U_CMD_ADD_DEV, { devId, buffer: buf });
    return decodeDevInfo(new DataView(buf.buffer));
  }

  /** SET_PARAMS (before START_DEV): basic, and discard when given. */
  async setParams(devId: number, basic: BasicParams, discard?: DiscardParams): Promise<void> {
    const buf = new Uint8Array(PARAMS_SIZE_THROUGH_DEVT);
    const len = encodeParams(new DataView(buf.buffer), basic, discard);
    await this.#command(UBLK_U_CMD_SET_PARAMS, { devId, buffer: buf.subarray(0, len) });
  }

  /** GET_PARAMS, including the read-only devt (char and disk major:minor). */
  async getParams(devId: number): Promise<UblkParams> {
    const buf = new Uint8Array(PARAMS_SIZE_THROUGH_DEVT);
    new DataView(buf.buffer).setUint32(PARAMS_LEN, PARAMS_SIZE_THROUGH_DEVT, true);
    await this.#command(UBLK_U_CMD_GET_PARAMS, { devId, buffer: buf });
    return decodeParams(new DataView(buf.buffer));
  }

  /**
   * START_DEV: resolves once every tag of every queue is fetched and /dev/ublkbN exists.
   * `pid` is the server process the kernel records (and reports in dev_info).
   */
  async startDevice(devId: number, pid: number): Promise<void> {
    await this.#command(UBLK_U_CMD_START_DEV, { devId, data0: pid });
  }

  /** STOP_DEV: removes /dev/ublkbN (draining it); the queues' fetches end with ABORT. */
  async stopDevice(devId: number): Promise<void> {
    await this.#command(UBLK_U_CMD_STOP_DEV, { devId });
  }

  /** DEL_DEV: waits until /dev/ublkcN is closed and unmapped by every server, then frees the id. */
  async deleteDevice(devId: number): Promise<void> {
    await this.#command(UBLK_U_CMD_DEL_DEV, { devId });
  }

  async getDeviceInfo(devId: number): Promise<DevInfo> {
    const buf = new Uint8Array(DEV_INFO_SIZE);
    await this.#command(UBLK_U_CMD_GET_DEV_INFO, { devId, buffer: buf });
    return decodeDevInfo(new DataView(buf.buffer));
  }

  /** START_USER_RECOVERY: the old server is gone (its /dev/ublkcN closed); get ready to refetch. */
  async startUserRecovery(devId: number): Promise<void> {
    await this.#command(UBLK_U_CMD_START_USER_RECOVERY, { devId });
  }

  /** END_USER_RECOVERY: resolves once the new server's queues have fetched every tag. */
  async endUserRecovery(devId: number, pid: number): Promise<void> {
    await this.#command(UBLK_U_CMD_END_USER_RECOVERY, { devId, data0: pid });
  }

  /**
   * UPDATE_SIZE (UBLK_F_UPDATE_SIZE, 6.16+): the live device's capacity becomes `sectors` (512
   * bytes each, whatever its logical block size) and the kernel tells its users (a uevent, as
   * `losetup -c` does). No legacy number. Callers check the feature first (older kernels do not
   * know the command) and send it only to a started device: until a later stable fix the kernel
   * dereferenced NULL for one that was added but not started, or already stopped.
   */
  async updateSize(devId: number, sectors: number): Promise<void> {
    await this.#command(UBLK_U_CMD_UPDATE_SIZE, { devId, data0: sectors, legacy: false });
  }

  /**
   * QUIESCE_DEV (a device created with UBLK_F_QUIESCE, 6.16+): new requests wait in the kernel
   * from now on; once every queue has an idle tag (a fetch posted) within `timeoutMs`, the
   * queues' posted fetches complete with UBLK_IO_RES_ABORT, while requests the server is still
   * serving complete as usual. The device then waits for a new server (user recovery) once this
   * one closes /dev/ublkcN. -EBUSY: some queue had every tag in service for `timeoutMs`.
   */
  async quiesceDevice(devId: number, timeoutMs: number): Promise<void> {
    await this.#command(UBLK_U_CMD_QUIESCE_DEV, { devId, data0: timeoutMs, legacy: false });
  }

  /**
   * Cancels every command still running (IORING_OP_ASYNC_CANCEL, ANY|ALL): a START_DEV or
   * END_USER_RECOVERY waiting for queues that will never fetch returns -EINTR, so the device
   * can be deleted. Their promises reject with that error.
   */
  cancelPending(): void {
    this.#ring.prepCancel(
      this.#ring.sqe(),
      0,
      CANCEL_USER_DATA,
      IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY,
    );
    this.#ring.submit();
  }

  /** Closes the ring and the device; do not call while a command is still awaited. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#ring.close();
    close(this.#fd);
  }

  // --- plumbing ---------------------------------------------------------------------------

  /** Issues `op` (encoded), retrying with the legacy number on -EOPNOTSUPP; throws on error. */
  async #command(op: number, args: CommandArgs): Promise<void> {
    let res = await this.#run(op, args);
    if (res === -EOPNOTSUPP && args.legacy !== false) res = await this.#run(iocNr(op), args);
    if (res < 0) {
      throw new SyscallError(
        COMMAND_NAMES[iocNr(op)] ?? `ublk command 0x${op.toString(16)}`,
        -res,
        `ublk device ${args.devId === NO_DEV_ID ? "(new)" : args.devId}`,
      );
    }
  }

  async #run(op: number, args: CommandArgs): Promise<number> {
    const sub = this.#submit(op, args, args.buffer);
    try {
      const res = await this.#waitAsync(sub.userData);
      if (args.buffer) args.buffer.set(sub.copyOut);
      return res;
    } finally {
      sub.native.free();
    }
  }

  /**
   * Fills one SQE with the command and submits it. The buffer is copied into native memory
   * (the kernel reads and writes it from io-wq, after this call returns, so it must not move).
   */
  #submit(op: number, args: CommandArgs, buffer: Uint8Array | undefined) {
    if (this.#closed) throw new SyscallError("io_uring_enter", EBADF, UBLK_CONTROL_PATH);
    const native = new AlignedBuffer(CMD_BUFFER_BYTES);
    if (buffer) native.bytes.set(buffer);
    const userData = this.#nextId++;
    let sqe: number;
    try {
      sqe = this.#ring.sqe();
    } catch (e) {
      native.free();
      throw e;
    }
    const p = this.#ring.prepUringCmd(sqe, this.#fd, op, userData);
    const v = this.#ring.sqeView;
    v.setUint32(p + CTRL_CMD_DEV_ID, args.devId >>> 0, true);
    v.setUint16(p + CTRL_CMD_QUEUE_ID, NO_QUEUE_ID, true);
    v.setUint16(p + CTRL_CMD_LEN, buffer ? buffer.byteLength : 0, true);
    v.setBigUint64(p + CTRL_CMD_ADDR, buffer ? native.address : 0n, true);
    v.setBigUint64(p + CTRL_CMD_DATA0, BigInt(args.data0 ?? 0), true);
    this.#ring.submit();
    const copyOut = native.bytes.subarray(0, buffer ? buffer.byteLength : 0);
    return { userData, native, copyOut };
  }

  /** Moves every available CQE into `#done`. */
  #reap(): void {
    this.#ring.reapCqes((userData, res) => {
      if (userData !== CANCEL_USER_DATA) this.#done.set(userData, res);
    });
  }

  #waitSync(userData: number): number {
    for (;;) {
      this.#reap();
      const res = this.#done.get(userData);
      if (res !== undefined) {
        this.#done.delete(userData);
        return res;
      }
      this.#ring.submitAndWait(1);
    }
  }

  async #waitAsync(userData: number): Promise<number> {
    for (;;) {
      this.#reap();
      const res = this.#done.get(userData);
      if (res !== undefined) {
        this.#done.delete(userData);
        return res;
      }
      // Sleep on a helper thread until some CQE arrives (maybe another command's: loop).
      await this.#ring.waitAsync();
    }
  }
}
