//! The server of a device (`fastloop __server`): its main thread owns the file (opened once,
//! carrying the lease), the lease policy, the device created by `lib/device.ts`, the registry
//! record and the control socket; the queues run in Workers owned by the device, so this thread
//! never touches an IO. Its supervisor (`lib/supervisor.ts`) restarts it when it dies.
//!
//! Start-up is all-or-nothing: every step pushes its undo on a stack, and a failure unwinds it
//! before the one readiness line (`{"ok":false,…}`) goes out, so a failed attach leaves no device,
//! record, lock or lease behind. After the readiness line, stdout and stderr both point at the log.
//!
//! The lease and the modes it allows are `lib/lease_policy.ts`'s.

import { SyscallError } from "../ffi/errno.ts";
import { forgetLease } from "../ffi/fcntl.ts";
import { close, fstat, libc, O_DIRECT, O_RDONLY, O_RDWR, open } from "../ffi/libc.ts";
import { hasFeature, UBLK_F_NO_AUTO_PART_SCAN } from "../ffi/ublk_cmd.ts";
import { serveControlSocket } from "./control_socket.ts";
import { openLog, writeReadiness } from "./daemon.ts";
import { ExitCode, UserError } from "./errors.ts";
import {
  EXIT_HANDED_OVER,
  handOverQueues,
  handOverRefusal,
  removeTakeoverMarker,
  successorName,
  TAKEOVER_CLAIM_WAIT_MS,
  writeTakeoverMarker,
} from "./handover.ts";
import { programDescription } from "./self_exec.ts";
import { filesystemEligibility } from "./eligibility.ts";
import { type DirectPathOff, openDirectDevice } from "./direct_path.ts";
import { log, logTargets, setLogContext } from "./log.ts";
import type { Device } from "./device.ts";
import { LeasePolicy } from "./lease_policy.ts";
import {
  type DeviceRecord,
  FileClaim,
  findByFile,
  processStartTicks,
  quotePath,
  removeRecord,
  socketPath,
  writeRecord,
} from "./registry.ts";
import { fileInUseError, requireUblk } from "./validate.ts";
import { poisonByte } from "./supervisor.ts";
import { checkSectorSize, type Layout, regionLength } from "./region.ts";
import { partitionsOf, scanPartitions } from "./partitions.ts";
import { resizeDevice } from "./resize.ts";

export interface ServerOptions {
  filePath: string;
  readOnly: boolean;
  queues: number;
  depth: number;
  maxIoBytes: number;
  /** The device's region of the file and its sector size (`lib/region.ts`). */
  offsetBytes: number;
  sizeLimitBytes: number;
  /** Absent: the logical block size of the filesystem's device. */
  sectorBytes?: number;
  /** Scan the partition table once the device is live (`lib/partitions.ts`). */
  partscan: boolean;
  recoverable: boolean;
  logPath: string;
  /** st_dev/st_ino `attach` validated: the server refuses a file swapped in since. */
  expectDev?: string;
  expectIno?: string;
  /** Started by a supervisor (`runSupervisor`), which the record then names. */
  supervised?: boolean;
  /** Take over this device, whose previous server died (ublk user recovery). */
  recoverDeviceId?: number;
  /**
   * `fastloop restart`: the device's server is still running and hands it over; wait for it to
   * let go of the file (lib/handover.ts). Only with `recoverDeviceId`.
   */
  takeover?: boolean;
}

export { log } from "./log.ts";

/** Resident memory of this process in bytes (VmRSS in /proc/self/status). */
export function residentBytes(): number {
  try {
    const m = /^VmRSS:\s+([0-9]+) kB$/m.exec(Deno.readTextFileSync("/proc/self/status"));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

class Server {
  readonly #opts: ServerOptions;
  readonly #undo: Array<{ what: string; run: () => void | Promise<void> }> = [];
  #logFd = -1;
  #fileFd = -1;
  #device: Device | null = null;
  #record: DeviceRecord | null = null;
  /** The start-up step running (named in the log when it fails). */
  #step = "";
  #identity = { dev: "", ino: "" };
  #fileSizeBytes = 0;
  /** The device's size: its region's length (grows with `resize`). */
  #deviceSizeBytes = 0;
  #sectorBytes = 512;
  /** Serialises resizes: each one reads the sizes it changes. */
  #resizing: Promise<unknown> = Promise.resolve();
  #backingFd = -1;
  #blockSizes = { logical: 512, physical: 4096 };
  /** Made once the file is open (`#openFile`); `stat` and `stop` before that see none. */
  #leases!: LeasePolicy;
  /** Why the device cannot use the direct path ("" when it can). */
  #baseReason = "";
  #directPathOff: DirectPathOff | null = null;
  #filesystem = "";
  #backingDevice: string | null = null;
  #stopping: Promise<void> | null = null;
  /** Handing the device over to a new server (`fastloop restart`): it is no longer ours. */
  #handingOver = false;
  #starting = true;
  #stopDuringStart: string | null = null;
  #resolveDone!: (code: number) => void;
  readonly done = new Promise<number>((r) => (this.#resolveDone = r));
  readonly #startedAt = new Date().toISOString();

  constructor(opts: ServerOptions) {
    this.#opts = opts;
  }

  /** Runs start-up; returns the exit code the process should end with once `done` resolves. */
  async start(): Promise<void> {
    this.#logFd = openLog(this.#opts.logPath);
    // A new session keeps a terminal's hang-up and job-control signals away. A supervised
    // server stays in its supervisor's session and process group instead, so that one kill of
    // the group (attach's last resort) ends both.
    if (!this.#opts.supervised) libc.setsid();
    const o = this.#opts;
    log(
      `server ${Deno.pid} (${programDescription()}) starting for ${o.filePath} ` +
        `(${o.readOnly ? "read-only" : "read-write"}, ${o.queues} queue(s) x depth ${o.depth}` +
        `${
          o.recoverDeviceId === undefined
            ? ""
            : o.takeover
            ? `, taking ublkb${o.recoverDeviceId} over from its running server`
            : `, recovering ublkb${o.recoverDeviceId}`
        })`,
    );
    try {
      await this.#startSteps();
      if (this.#stopDuringStart !== null) {
        throw new UserError(`Start-up interrupted by ${this.#stopDuringStart}`, ExitCode.failure);
      }
    } catch (e) {
      const error = e instanceof UserError || e instanceof SyscallError
        ? e.message
        : `internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`;
      const exitCode = e instanceof UserError ? e.exitCode : ExitCode.failure;
      log(`start-up failed (${this.#step}): ${error}`);
      await this.#unwind();
      log("start-up undone; exiting");
      writeReadiness({ ok: false, error: error.split("\n")[0], exitCode }, this.#logFd);
      this.#resolveDone(exitCode);
      return;
    }
    this.#starting = false;
    const record = this.#record!;
    writeReadiness({
      ok: true,
      device: record.blockPath,
      id: record.id,
      file: record.file.path,
      mode: this.#leases.mode,
      reason: this.#baseReason || undefined,
      directPathOff: this.#directPathOff ?? undefined,
      filesystem: this.#filesystem,
      backingDevice: this.#backingDevice,
      pid: Deno.pid,
      log: this.#opts.logPath,
    }, this.#logFd);
    log(
      `ready: ${record.blockPath} (mode ${this.#leases.mode}${
        this.#baseReason ? `: ${this.#baseReason}` : ""
      })`,
    );
  }

  /**
   * Start-up, as named steps run in order; each pushes the undo of what it did, so a failure at
   * any step unwinds exactly what exists (`#unwind`).
   */
  async #startSteps(): Promise<void> {
    for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
      Deno.addSignalListener(signal, () => {
        log(`${signal}: detaching`);
        this.stop(`${signal}`);
      });
    }
    const steps: ReadonlyArray<readonly [string, () => void | Promise<void>]> = [
      ["claim the file", () => this.#claimFile()],
      ["open the file", () => this.#openFile()],
      ["take the lease", () => this.#takeLease()],
      ["find ublk", () => requireUblk()],
      ["find the direct path", () => this.#findDirectPath()],
      ["place the device in the file", () => this.#placeDevice()],
      ["start the device", () => this.#startDevice()],
      ["open the control socket", () => this.#openControlSocket()],
      ["write the record", () => this.#writeRecord()],
    ];
    for (const [what, step] of steps) {
      this.#step = what;
      await step();
    }
  }

  /**
   * An exclusive claim on the file, before opening it: a second open would break the lease of a
   * server that already serves this file. Taking a device over, it waits for the running server
   * to let go (its exit releases the claim).
   */
  async #claimFile(): Promise<void> {
    const o = this.#opts;
    this.#identity = this.#expectedIdentity();
    const claim = o.takeover && o.recoverDeviceId !== undefined
      ? await this.#waitForClaim(o.recoverDeviceId)
      : FileClaim.tryTake(this.#identity);
    if (!claim) {
      const other = findByFile(o.filePath);
      throw new UserError(
        `${quotePath(o.filePath)} is already attached${
          other ? ` as ${other.record.blockPath}` : ""
        }`,
        ExitCode.busy,
      );
    }
    this.#pushUndo("release the file claim", () => {
      // Handed over: the claim goes with this process's exit (lib/handover.ts).
      if (!this.#handingOver) claim.release();
    });
  }

  /** The file's claim, once the server handing the device over has exited (`--takeover`). */
  async #waitForClaim(id: number): Promise<FileClaim> {
    writeTakeoverMarker(id);
    log(`waiting for ublkb${id}'s running server to hand it over`);
    const deadline = Date.now() + TAKEOVER_CLAIM_WAIT_MS;
    try {
      for (;;) {
        const claim = FileClaim.tryTake(this.#identity);
        if (claim) return claim;
        if (this.#stopDuringStart !== null) {
          throw new UserError(`Start-up interrupted by ${this.#stopDuringStart}`, ExitCode.failure);
        }
        if (Date.now() > deadline) {
          throw new UserError(
            `The running server of ublkb${id} did not hand it over within ` +
              `${TAKEOVER_CLAIM_WAIT_MS / 1000} s`,
            ExitCode.busy,
          );
        }
        await new Promise((r) => setTimeout(r, 10));
      }
    } finally {
      removeTakeoverMarker(id);
    }
  }

  /** The file, once. O_DIRECT so file-path IO bypasses the page cache like direct IO does. */
  #openFile(): void {
    const o = this.#opts;
    try {
      this.#fileFd = open(o.filePath, (o.readOnly ? O_RDONLY : O_RDWR) | O_DIRECT);
    } catch (e) {
      if (!(e instanceof SyscallError && e.code === "EINVAL")) throw e;
      // The filesystem refuses O_DIRECT (e.g. tmpfs before 6.6): serve through its page cache.
      this.#fileFd = open(o.filePath, o.readOnly ? O_RDONLY : O_RDWR);
      log("the filesystem refuses O_DIRECT: file IO goes through its page cache");
    }
    const fd = this.#fileFd;
    this.#pushUndo("close the file", () => {
      forgetLease(fd);
      close(fd);
    });
    this.#leases = new LeasePolicy(
      fd,
      o.filePath,
      o.readOnly,
      (mode) => this.#device?.setMode(mode) ?? Promise.resolve(),
    );
    const st = fstat(fd, o.filePath);
    if (st.dev.toString() !== this.#identity.dev || st.ino.toString() !== this.#identity.ino) {
      throw new UserError(`${quotePath(o.filePath)} was replaced while attaching; try again`);
    }
    if (st.size === 0) throw new UserError(`${quotePath(o.filePath)} is empty`);
    this.#fileSizeBytes = st.size;
  }

  /**
   * The lease: write for read-write, read for read-only. The break listener goes first: an
   * unhandled SIGIO would kill the process. A new attach must not share the file; a recovery must
   * not leave the device without a server, so it starts on the file path without the lease.
   */
  #takeLease(): void {
    const leases = this.#leases;
    this.#pushUndo("remove the lease-break listener", leases.listen());
    if (!leases.take()) {
      if (this.#opts.recoverDeviceId === undefined) throw fileInUseError(this.#opts.filePath);
      log("recovering without the lease (the file is open elsewhere): file mode until it is free");
    }
    this.#pushUndo("release the lease", () => leases.release());
  }

  /** Where the data lives, and whether IO may go there directly (`lib/eligibility.ts`). */
  async #findDirectPath(): Promise<void> {
    const o = this.#opts;
    const eligibility = filesystemEligibility(this.#fileFd, o.filePath);
    this.#filesystem = eligibility.filesystem;
    this.#backingDevice = eligibility.device?.devicePath ?? null;
    this.#blockSizes = {
      logical: eligibility.device?.logicalBlockSize ?? 512,
      physical: eligibility.device?.physicalBlockSize ?? 4096,
    };
    this.#sectorBytes = o.sectorBytes ?? this.#blockSizes.logical;
    checkSectorSize(this.#sectorBytes, eligibility.device ?? null);
    // Not opening it (a container, a kernel refusing writes to mounted devices) is still correct
    // through the file; `lib/direct_path.ts` says why, for the log and `stat`.
    const direct = await openDirectDevice(eligibility, o.readOnly);
    const backingFd = direct.fd ?? -1;
    this.#backingFd = backingFd;
    if (direct.fd !== null) this.#pushUndo(`close ${direct.devicePath}`, () => close(backingFd));
    this.#leases.baseMode = direct.fd !== null ? "fast" : "file";
    this.#baseReason = direct.fd !== null ? "" : direct.reason;
    this.#directPathOff = direct.fd !== null ? null : direct.code;
    log(
      this.#leases.baseMode === "fast"
        ? `${eligibility.filesystem} on ${eligibility.device?.devicePath}: direct path enabled`
        : `file mode: ${this.#baseReason}`,
    );
  }

  /**
   * The device's region of the file (`lib/region.ts`): checked against the file for a new
   * device. A device taken over keeps the size the kernel has for it (a `resize` may have grown
   * it since attach), whatever the file's size is now: IO past the file's end fails with EIO.
   */
  #placeDevice(): void {
    const o = this.#opts;
    const layout = this.#layout();
    if (o.recoverDeviceId !== undefined) {
      const sectors = Number(readSysfs(`/sys/block/ublkb${o.recoverDeviceId}/size`));
      if (Number.isSafeInteger(sectors) && sectors > 0) {
        this.#deviceSizeBytes = sectors * 512;
        return;
      }
    }
    this.#deviceSizeBytes = regionLength(quotePath(o.filePath), this.#fileSizeBytes, layout);
  }

  #layout(): Layout {
    const o = this.#opts;
    return {
      offsetBytes: o.offsetBytes,
      sizeLimitBytes: o.sizeLimitBytes,
      sectorBytes: this.#sectorBytes,
    };
  }

  /**
   * The ublk device, new or taken over. Undo: stop and delete it (detach), except when a recovery
   * fails during start-up: then it is only let go, so its IO waits for the next server.
   */
  async #startDevice(): Promise<void> {
    const o = this.#opts;
    const { createDevice } = await import("./device.ts");
    // A lease break during start-up (handled already) leaves the device starting in file mode.
    const leases = this.#leases;
    const startMode = leases.baseMode === "fast" && leases.held ? "fast" : "file";
    const device = await createDevice({
      filePath: o.filePath,
      fileFd: this.#fileFd,
      fileSizeBytes: this.#deviceSizeBytes,
      regionOffsetBytes: o.offsetBytes,
      backingFd: this.#backingFd,
      logicalBlockSize: this.#sectorBytes,
      physicalBlockSize: this.#blockSizes.physical,
      readOnly: o.readOnly,
      queues: o.queues,
      depth: o.depth,
      maxIoBytes: o.maxIoBytes,
      mode: startMode,
      recoverable: o.recoverable,
      recoverDeviceId: o.recoverDeviceId,
      poisonByte: poisonByte(),
    });
    this.#device = device;
    setLogContext(`ublkb${device.id}`);
    leases.mode = startMode;
    this.#pushUndo(`stop and delete ${device.blockPath}`, async () => {
      if (this.#handingOver) return; // `device.handOver` let it go already
      if (this.#starting && o.recoverDeviceId !== undefined) return device.abandon();
      await device.stop();
      await device.delete();
    });
    if (!leases.held) leases.scheduleRetry();
    if (startMode === "fast" && !leases.held) {
      // The lease broke while the device was being created: no direct IO without it.
      await leases.setMode("file", "the lease broke during start-up");
    }
    log(
      `device ${device.blockPath} ${o.recoverDeviceId === undefined ? "live" : "recovered"} ` +
        `(id ${device.id}; data: ${device.dataMode}, requests up to ${device.maxIoBytes} bytes; ` +
        `ublk commands: ${device.ublkCommands})`,
    );
    if (o.partscan && o.recoverDeviceId === undefined) {
      // Where the kernel scanned in START_DEV (no UBLK_F_NO_AUTO_PART_SCAN) only the nodes
      // are waited for. A table that cannot be read leaves the device without partitions.
      const scanned = !hasFeature(device.flags, UBLK_F_NO_AUTO_PART_SCAN);
      try {
        const parts = await scanPartitions(device.blockPath, scanned);
        log(`partitions: ${parts.map((p) => p.name).join(", ") || "none"}`);
      } catch (e) {
        log(`partition scan failed: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }

  #openControlSocket(): void {
    const socket = serveControlSocket(socketPath(this.#device!.id), (r) => this.#control(r));
    this.#pushUndo("close the control socket", () => socket.close());
  }

  /** The record that names this server, its supervisor and the socket: the device is ours. */
  #writeRecord(): void {
    const o = this.#opts;
    const device = this.#device!;
    const record: DeviceRecord = {
      version: 1,
      id: device.id,
      blockPath: device.blockPath,
      charPath: device.charPath,
      file: { path: o.filePath, dev: this.#identity.dev, ino: this.#identity.ino },
      server: { pid: Deno.pid, startTicks: processStartTicks(Deno.pid) ?? 0 },
      supervisor: o.supervised
        ? { pid: Deno.ppid, startTicks: processStartTicks(Deno.ppid) ?? 0 }
        : undefined,
      startedAt: this.#startedAt,
      logPath: o.logPath,
      socketPath: socketPath(device.id),
      options: {
        readOnly: o.readOnly,
        queues: o.queues,
        depth: o.depth,
        recoverable: o.recoverable,
        offsetBytes: o.offsetBytes,
        sizeLimitBytes: o.sizeLimitBytes,
        sectorBytes: this.#sectorBytes,
        partscan: o.partscan,
      },
    };
    writeRecord(record);
    this.#record = record;
    this.#pushUndo("remove the registry record", () => {
      // Handed over: the next server writes its own record over this one.
      if (!this.#handingOver) removeRecord(device.id);
    });
  }

  #expectedIdentity(): { dev: string; ino: string } {
    if (this.#opts.expectDev !== undefined && this.#opts.expectIno !== undefined) {
      return { dev: this.#opts.expectDev, ino: this.#opts.expectIno };
    }
    const info = Deno.statSync(this.#opts.filePath);
    return { dev: String(info.dev), ino: String(info.ino) };
  }

  #pushUndo(what: string, run: () => void | Promise<void>): void {
    this.#undo.push({ what, run });
  }

  /** Runs every undo step, newest first; a failing step is logged and the rest still run. */
  async #unwind(): Promise<void> {
    while (this.#undo.length > 0) {
      const step = this.#undo.pop()!;
      try {
        await step.run();
      } catch (e) {
        log(`cleanup: ${step.what} failed: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }

  /** Graceful detach: stop → drain → flush → delete → release the lease → remove the record. */
  stop(why: string): Promise<void> {
    if (this.#starting) {
      // Start-up is not interruptible half-way (a step may be inside the kernel); it checks
      // this flag when done and unwinds itself instead of reporting ready.
      this.#stopDuringStart ??= why;
      return this.done.then(() => {});
    }
    if (this.#stopping) return this.#stopping;
    this.#stopping = (async () => {
      // Let a mode change in progress finish: it may be draining IO.
      await this.#leases?.stop();
      log(`detaching (${why})`);
      await this.#unwind();
      log("detached; exiting");
      this.#resolveDone(ExitCode.ok);
    })();
    return this.#stopping;
  }

  /**
   * `fastloop restart`: hands the device over to the server named by `to` (its takeover marker)
   * and exits with `EXIT_HANDED_OVER` once the reply is out (lib/handover.ts). Refused while
   * starting or stopping, and for a device that cannot wait for a new server. Once begun it goes
   * through: with QUIESCE_DEV there is no way back to serving.
   */
  async #handOver(to: unknown): Promise<Record<string, unknown>> {
    const device = this.#device;
    if (this.#starting || device === null) {
      return { ok: false, error: "The server is still starting", exitCode: ExitCode.busy };
    }
    if (this.#stopping) {
      return { ok: false, error: "The server is stopping", exitCode: ExitCode.busy };
    }
    const refusal = handOverRefusal(device, this.#opts.recoverable);
    if (refusal) return refusal;
    const successor = successorName(to);
    let handedOver!: () => void;
    this.#stopping = new Promise<void>((r) => (handedOver = r));
    this.#handingOver = true;
    // Let a mode change in progress finish: it may be draining IO.
    await this.#leases.stop();
    log(
      `handing ${device.blockPath} over to ${successor} (fastloop restart); ` +
        `this is server ${Deno.pid} (${programDescription()}); its IO waits meanwhile`,
    );
    const { how, ms } = await handOverQueues(device);
    log(`${device.blockPath}: ${how}, in ${ms} ms; releasing the lease and the file`);
    await this.#unwind();
    log(`handed ${device.blockPath} over to ${successor}; exiting`);
    handedOver();
    return {
      ok: true,
      pid: Deno.pid,
      how,
      handOverMs: ms,
      // Called by the control socket once this reply is written: then the process may end.
      afterReply: () => this.#resolveDone(EXIT_HANDED_OVER),
    };
  }

  // --- control socket -----------------------------------------------------------------------

  async #control(request: { cmd?: unknown }): Promise<Record<string, unknown>> {
    switch (request.cmd) {
      case "ping":
        return { ok: true, pid: Deno.pid, program: programDescription(), handOver: true };
      case "stat":
        return { ok: true, stat: await this.stat() };
      case "detach":
        log("detach requested over the control socket");
        await this.stop("detach command");
        return { ok: true };
      case "resize": {
        const sizeBytes = (request as { sizeBytes?: unknown }).sizeBytes;
        const next = this.#resizing.then(() => this.#resize(sizeBytes));
        this.#resizing = next.catch(() => {});
        return await next;
      }
      case "handover":
        return await this.#handOver((request as { to?: unknown }).to);
      default:
        return { ok: false, error: `Unknown command ${JSON.stringify(request.cmd)}` };
    }
  }

  /** `fastloop resize` (lib/resize.ts), one at a time. */
  async #resize(sizeBytes: unknown): Promise<Record<string, unknown>> {
    if (this.#stopping) {
      return { ok: false, error: "the device is being detached", exitCode: ExitCode.busy };
    }
    const o = this.#opts;
    const r = await resizeDevice({
      device: this.#device!,
      fileFd: this.#fileFd,
      filePath: o.filePath,
      readOnly: o.readOnly,
      layout: this.#layout(),
      deviceSizeBytes: this.#deviceSizeBytes,
    }, sizeBytes);
    if (r.ok) this.#deviceSizeBytes = r.sizeBytes;
    return r;
  }

  /** What `fastloop stat` shows for this device. */
  async stat(): Promise<Record<string, unknown>> {
    const r = this.#record;
    return {
      device: r?.blockPath,
      id: r?.id,
      file: this.#opts.filePath,
      filesystem: this.#filesystem,
      backingDevice: this.#backingDevice,
      ...this.#leases?.stat(),
      modeReason: this.#baseReason || undefined,
      directPathOff: this.#directPathOff ?? undefined,
      readOnly: this.#opts.readOnly,
      offsetBytes: this.#opts.offsetBytes,
      sizeLimitBytes: this.#opts.sizeLimitBytes,
      sizeBytes: this.#deviceSizeBytes,
      sectorBytes: this.#sectorBytes,
      partscan: this.#opts.partscan,
      partitions: r ? partitionsOf(r.blockPath).map((p) => p.name) : [],
      queues: this.#opts.queues,
      depth: this.#opts.depth,
      dataMode: this.#device?.dataMode,
      ublkCommands: this.#device?.ublkCommands,
      maxIoBytes: this.#device?.maxIoBytes,
      server: {
        pid: Deno.pid,
        state: this.#handingOver ? "handing-over" : this.#stopping ? "stopping" : "running",
      },
      startedAt: this.#startedAt,
      rssBytes: residentBytes(),
      log: this.#opts.logPath,
      logging: logTargets(this.#opts.logPath),
      counters: await this.#device?.counters(),
    };
  }
}

function readSysfs(path: string): string {
  try {
    return Deno.readTextFileSync(path).trim();
  } catch {
    return "";
  }
}

/** Runs a server to completion; resolves with the process exit code. */
export async function runServer(opts: ServerOptions): Promise<number> {
  const server = new Server(opts);
  globalThis.addEventListener("unhandledrejection", (ev) => {
    ev.preventDefault();
    log(`unhandled rejection: ${ev.reason instanceof Error ? ev.reason.stack : ev.reason}`);
  });
  await server.start();
  return await server.done;
}
