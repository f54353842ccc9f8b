//! The planned hand-over of a device from its running server to a new one (`fastloop restart`):
//! what the command, both servers and both supervisors agree on. The order is the point:
//!
//! 1. `restart` starts a new supervisor whose first server takes the device over
//!    (`__server --recover ID --takeover`). That server writes the takeover marker
//!    (`ublkbN.takeover.json`: its pid, its supervisor, which fastloop it is) and waits for the
//!    file's claim, which the running server holds. A new fastloop that cannot start is found out
//!    here, before anything happens to the device.
//! 2. `restart` asks the running server to hand over (`handover` on its control socket). It stops
//!    taking work (QUIESCE_DEV; on kernels without it, it holds back new requests for the kernel
//!    to re-issue), finishes what it serves, flushes, closes /dev/ublkcN, releases the lease and
//!    closes the file, answers how it went, and exits with `EXIT_HANDED_OVER`. The claim (a
//!    flock) is released by its exit, not before: the new server can take it only once every
//!    thread of the old one is exiting, which a 6.12 kernel wants of the old queue threads before
//!    START_USER_RECOVERY (else a WARN).
//! 3. The old supervisor sees `EXIT_HANDED_OVER` and ends without touching the device.
//! 4. The new server takes the claim, opens the file and takes the lease (released before the
//!    claim, so that open breaks nobody's lease), and takes the device over through user
//!    recovery: the IO that waited meanwhile is served.
//!
//! The device never goes away and no request fails: while no server serves it, its IO waits in
//! the kernel, as it does when a server dies. Both servers log who they are and who the other is.

import {
  hasFeature,
  UBLK_F_QUIESCE,
  UBLK_F_USER_RECOVERY,
  UBLK_F_USER_RECOVERY_REISSUE,
} from "../ffi/ublk_cmd.ts";
import type { Device } from "./device.ts";
import { ExitCode, UserError } from "./errors.ts";
import {
  type DeviceRecord,
  processAlive,
  type ProcessRef,
  processStartTicks,
  takeoverPath,
  writeJsonAtomically,
} from "./registry.ts";
import { layoutArgs } from "./region.ts";
import { programDescription } from "./self_exec.ts";

/**
 * A server's exit status after it handed its device over: its supervisor must neither restart
 * it nor clean up. Apart from fastloop's own exit codes (0-7) and the shell's signal statuses.
 */
export const EXIT_HANDED_OVER = 80;

/** How long a taking-over server waits for the running one to let go of the file. */
export const TAKEOVER_CLAIM_WAIT_MS = 60_000;

/** What a taking-over server publishes while it waits for the file's claim. */
export interface TakeoverMarker {
  pid: number;
  startTicks: number;
  /** Its supervisor: the one `restart` started. */
  supervisorPid: number;
  /** `fastloop VERSION at PATH`. */
  program: string;
}

/** Publishes this process as the server about to take device `id` over. */
export function writeTakeoverMarker(id: number): TakeoverMarker {
  const marker: TakeoverMarker = {
    pid: Deno.pid,
    startTicks: processStartTicks(Deno.pid) ?? 0,
    supervisorPid: Deno.ppid,
    program: programDescription(),
  };
  writeJsonAtomically(takeoverPath(id), marker);
  return marker;
}

/** The marker of device `id` when a live process wrote it, else null. */
export function readTakeoverMarker(id: number): TakeoverMarker | null {
  try {
    const m = JSON.parse(Deno.readTextFileSync(takeoverPath(id))) as Partial<TakeoverMarker>;
    if (
      typeof m.pid !== "number" || typeof m.startTicks !== "number" ||
      typeof m.supervisorPid !== "number" || typeof m.program !== "string"
    ) {
      return null;
    }
    return processAlive(m as ProcessRef) ? m as TakeoverMarker : null;
  } catch {
    return null;
  }
}

/** Removes the marker of device `id` if this process wrote it. */
export function removeTakeoverMarker(id: number): void {
  try {
    const m = JSON.parse(Deno.readTextFileSync(takeoverPath(id)));
    if (m?.pid === Deno.pid) Deno.removeSync(takeoverPath(id));
  } catch {
    // Gone already.
  }
}

/** The options a record may hold that `supervisorArgs` knows how to pass on. */
const KNOWN_OPTIONS = new Set([
  "readOnly",
  "queues",
  "depth",
  "recoverable",
  "offsetBytes",
  "sizeLimitBytes",
  "sectorBytes",
  "partscan",
]);

/**
 * `__server --supervise ...` arguments that run a device's processes again with the settings
 * its record holds (`recover`, `restart`; the caller adds `--recover ID`). A setting this
 * fastloop cannot pass on is refused rather than dropped: a restart must not change the device.
 */
export function supervisorArgs(record: DeviceRecord): string[] {
  const options = record.options as unknown as Record<string, unknown>;
  const unknown = Object.keys(options).filter((k) => !KNOWN_OPTIONS.has(k));
  if (unknown.length > 0) {
    throw new UserError(
      `${record.blockPath} was attached with setting(s) this fastloop cannot pass on: ` +
        `${unknown.join(", ")}`,
      ExitCode.badInput,
    );
  }
  const o = record.options;
  const args = [
    "__server",
    "--supervise",
    record.file.path,
    "--log",
    record.logPath,
    "--queues",
    String(o.queues),
    "--depth",
    String(o.depth),
    "--dev",
    record.file.dev,
    "--ino",
    record.file.ino,
  ];
  args.push(...layoutArgs({
    offsetBytes: o.offsetBytes ?? 0,
    sizeLimitBytes: o.sizeLimitBytes ?? 0,
    sectorBytes: o.sectorBytes, // absent in older records: the server's default
  }));
  if (o.partscan) args.push("--partscan");
  if (o.readOnly) args.push("--read-only");
  if (!o.recoverable) args.push("--no-recover");
  return args;
}

/** Why this device cannot wait for a new server, as a control reply; null when it can. */
export function handOverRefusal(
  device: Device,
  recoverable: boolean,
): Record<string, unknown> | null {
  const flags = device.flags;
  const canWait = recoverable && hasFeature(flags, UBLK_F_USER_RECOVERY) &&
    (hasFeature(flags, UBLK_F_QUIESCE) || hasFeature(flags, UBLK_F_USER_RECOVERY_REISSUE));
  if (canWait) return null;
  return {
    ok: false,
    error: `${device.blockPath} cannot wait for a new server (created without user recovery)`,
    exitCode: ExitCode.badInput,
  };
}

/** The successor named in a handover request, for the log. */
export function successorName(to: unknown): string {
  const next = typeof to === "object" && to !== null ? to as Record<string, unknown> : {};
  if (typeof next["pid"] !== "number") return "a new server";
  const program = typeof next["program"] === "string" ? ` (${next["program"]})` : "";
  return `server ${next["pid"]}${program}`;
}

/** Lets the device's queues go (`Device.handOver`); how it went and how long it took. */
export async function handOverQueues(device: Device): Promise<{ how: string; ms: number }> {
  const startedAt = performance.now();
  let how: string;
  try {
    how = await device.handOver();
  } catch (e) {
    // The queues are gone either way; what they still held, the kernel re-issues.
    const why = e instanceof Error ? e.message : String(e);
    how = `failed half-way (${why}), the kernel re-issues the rest`;
  }
  return { how, ms: Math.round(performance.now() - startedAt) };
}
