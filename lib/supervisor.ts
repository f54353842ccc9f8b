//! The supervisor (`fastloop __server --supervise`, the process `attach` leaves behind): it runs
//! the device's server as its child and, when the server dies (kill -9, OOM, a bug), starts a new
//! one that takes the device over through ublk user recovery, so the device's IO waits in the
//! kernel instead of failing. It holds no file, lease or device itself and does no IO, so it
//! cannot hang the device; its whole job is this loop.
//!
//! Policy when servers keep dying: the device's data comes first, so the supervisor never deletes
//! a device on its own while the kernel still holds it. A server that served for a while is
//! replaced at once; one that died before it was ready (it could not start: the file is gone, a
//! bug at start-up) or soon after (a request that kills every server that serves it) is replaced
//! after a pause that doubles per such death in a row, up to `RESTART_PAUSE_MAX_MS`, and again and
//! again. `CRASH_LOOP_DEATHS` of those in a row are a crash loop: said in the log, syslog and the
//! kernel log, and shown by `stat` with the deaths, the cause and the next try, which the
//! supervisor publishes in `ublkbN.supervisor.json`. IO waits all along, so nothing acknowledged
//! can be lost and nothing in flight fails; once the cause is gone the next server serves the
//! waiting IO. Only the user deletes such a device (`fastloop detach --force`: its waiting IO then
//! fails). A server exiting 0 (it detached) ends the supervisor; SIGTERM/SIGINT/SIGHUP are passed
//! to the server (detach), or, between two servers, end the wait and remove the device.
//!
//! `fastloop restart` replaces the supervisor too, so an upgrade runs new code in both processes
//! (`lib/handover.ts`): the new supervisor's first server takes the device over from the running
//! one (`--takeover`), which then exits with `EXIT_HANDED_OVER`; its supervisor, seeing that,
//! ends without touching the device. A planned restart is not a death: the new supervisor keeps
//! the old one's counts and adds the restart to them. A supervisor that finds its device
//! supervised by another live supervisor bows out instead of starting a rival server.

import { libc } from "../ffi/libc.ts";
import { openLog, writeReadiness } from "./daemon.ts";
import { ExitCode } from "./errors.ts";
import { EXIT_HANDED_OVER } from "./handover.ts";
import { kernelLog, log, setLogContext } from "./log.ts";
import {
  cleanupDeadDevice,
  type DeviceRecord,
  processAlive,
  type ProcessRef,
  readRecord,
  readSupervisorStatus,
  removeRecord,
  removeSupervisorStatus,
  type SupervisorStatus,
  writeSupervisorStatus,
} from "./registry.ts";
import { programDescription, selfCommand } from "./self_exec.ts";

/**
 * A server that served at least this long before it died is replaced at once: a crash, not a
 * loop. Measured with a pause after every death: over 20 kills a few seconds apart the recovery
 * time rose from 2.9 s to 6.4 s as the pause reached its cap.
 */
export const SERVED_LONG_ENOUGH_MS = 1_000;
/** The pause after the first quick death; it doubles per quick death in a row. */
export const RESTART_PAUSE_FIRST_MS = 100;
/** Tens of seconds: a cause that goes away (a file put back) is noticed soon after. */
export const RESTART_PAUSE_MAX_MS = 30_000;
/** Quick deaths in a row that make a crash loop (the log, syslog and the kernel log say so). */
export const CRASH_LOOP_DEATHS = 3;
/** A recovering server must report within this (it waits for the dead one's rings to go). */
const RESTART_READY_TIMEOUT_MS = 120_000;

export interface SupervisorOptions {
  logPath: string;
  /** `__server FILE ...` arguments for each server it starts. */
  serverArgs: string[];
  recoverable: boolean;
  /** `fastloop recover`: the first server takes over this device (its supervisor is gone). */
  recoverDeviceId?: number;
  /**
   * `fastloop restart`: the device's server is running, and the first server takes the device
   * over from it (`--takeover`; lib/handover.ts). Only with `recoverDeviceId`.
   */
  takeover?: boolean;
}

/** The pause before the next server after `quickDeaths` quick deaths in a row (0: at once). */
export function restartPauseMs(quickDeaths: number): number {
  if (quickDeaths === 0) return 0;
  return Math.min(RESTART_PAUSE_FIRST_MS * 2 ** (quickDeaths - 1), RESTART_PAUSE_MAX_MS);
}

/** Runs the supervisor to its end; resolves with the process exit code. */
export async function runSupervisor(opts: SupervisorOptions): Promise<number> {
  const logFd = openLog(opts.logPath);
  libc.setsid();
  const say = (m: string) => log(`supervisor: ${m}`);
  let child: Deno.ChildProcess | null = null;
  let stopping: string | null = null;
  /** Ends a pause between two servers early (a signal arrived). */
  let wake: (() => void) | null = null;
  for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
    Deno.addSignalListener(signal, () => {
      stopping ??= signal;
      say(`${signal}: passing it to the server`);
      try {
        child?.kill("SIGTERM");
      } catch {
        // Between two servers: the loop sees `stopping`.
      }
      wake?.();
    });
  }
  let deviceId: number | null = opts.recoverDeviceId ?? null;
  const takeover = opts.takeover === true && deviceId !== null;
  /** The server that hands the device over to our first one (`fastloop restart`). */
  const handingOver: ProcessRef | null = takeover ? readRecord(deviceId!)?.server ?? null : null;
  say(
    `supervisor ${Deno.pid} (${programDescription()}) started${
      takeover
        ? `: ublkb${deviceId} is being restarted; its running server` +
          `${handingOver ? ` (pid ${handingOver.pid})` : ""} hands it over to our first server`
        : deviceId !== null
        ? `: taking over ublkb${deviceId}, whose supervisor is gone`
        : ""
    }`,
  );
  let reported = false;
  // A restart carries the old supervisor's counts over: a planned restart is not a death.
  const previous = takeover ? readSupervisorStatus(deviceId!) : null;
  const status: SupervisorStatus = {
    version: 1,
    pid: Deno.pid,
    state: "starting",
    deaths: previous?.deaths ?? 0,
    quickDeaths: 0,
    crashLoop: false,
    lastDeath: previous?.lastDeath,
    restarts: previous?.restarts,
    lastRestart: previous?.lastRestart,
  };
  const publish = (state: SupervisorStatus["state"], nextTryAtMs?: number) => {
    status.state = state;
    status.nextTryAt = nextTryAtMs === undefined ? undefined : iso(nextTryAtMs);
    if (deviceId === null) return;
    try {
      writeSupervisorStatus(deviceId, status);
    } catch (e) {
      say(`cannot publish the recovery state: ${e instanceof Error ? e.message : String(e)}`);
    }
  };
  /** When the device's IO began to wait for a server (0: it is served). */
  let outageSinceMs = 0;
  for (let first = true;; first = false) {
    const args = [...opts.serverArgs, "--supervised"];
    if (deviceId !== null) args.push("--recover", String(deviceId));
    if (first && takeover) args.push("--takeover");
    const [program, ...rest] = selfCommand(args);
    child = new Deno.Command(program!, {
      args: rest,
      stdin: "null",
      stdout: "piped",
      stderr: "inherit", // our stderr is the log already
    }).spawn();
    say(
      `server started (pid ${child.pid}${
        deviceId !== null ? `, recovering ublkb${deviceId}` : ""
      })`,
    );
    if (reported) publish("starting");
    const { line, timedOut } = await readFirstLine(
      child.stdout,
      reported ? RESTART_READY_TIMEOUT_MS : 0,
    );
    let reply: Record<string, unknown> | null = null;
    try {
      reply = line === null ? null : JSON.parse(line);
    } catch {
      reply = null;
    }
    if (!reported) {
      // The first answer is attach's: pass it on, whatever it is, then stdout joins the log.
      reported = true;
      writeReadiness(
        reply ?? { ok: false, error: "The server exited before reporting", exitCode: 1 },
        logFd,
      );
      // A taking-over server that failed after the old one handed over (it is gone, the device
      // is still there) leaves a device that needs us: supervise it as after a death.
      const orphaned = takeover && handingOver !== null && !processAlive(handingOver) &&
        kernelHasDevice(deviceId!);
      if (reply?.["ok"] !== true && !orphaned) {
        const exit = await child.status;
        return exit.success ? ExitCode.failure : (exit.code || ExitCode.failure);
      }
      if (reply?.["ok"] !== true) {
        say(`the first server failed after ublkb${deviceId} was handed over to it; supervising`);
      }
    }
    let readyAtMs = 0;
    if (reply?.["ok"] === true && typeof reply["id"] === "number") {
      readyAtMs = Date.now();
      deviceId = reply["id"];
      setLogContext(`ublkb${deviceId}`);
      if (outageSinceMs > 0) say(`ublkb${deviceId} recovered in ${readyAtMs - outageSinceMs} ms`);
      if (first && takeover) {
        status.restarts = (status.restarts ?? 0) + 1;
        status.lastRestart = {
          at: iso(readyAtMs),
          fromPid: handingOver?.pid ?? 0,
          toPid: child.pid,
        };
        say(
          `ublkb${deviceId} restarted: server ${child.pid} took it over from ` +
            `${handingOver ? `server ${handingOver.pid}` : "the old server"} ` +
            `(restart ${status.restarts} since attach)`,
        );
        publish("starting");
      }
      // Served again only once it outlived a quick death: a server that a waiting request kills
      // as soon as it is ready does not end the outage.
      if (await outlives(child, SERVED_LONG_ENOUGH_MS)) {
        if (status.crashLoop) {
          const m = `ublkb${deviceId} is served again, ${
            seconds(Date.now() - outageSinceMs)
          } after its server died (${status.deaths} death(s) since attach); the crash loop is over`;
          say(m);
          kernelLog(m);
        }
        outageSinceMs = 0;
        status.quickDeaths = 0;
        status.crashLoop = false;
        status.waitingSince = undefined;
        publish("serving");
      }
    } else if (line === null && !stopping) {
      // Timed out, or its stdout ended: it is exiting (a waiting request can kill it before it
      // says ready). Either way it will not serve.
      if (timedOut) say("the new server did not report in time; stopping it");
      try {
        child.kill("SIGKILL");
      } catch {
        // Already gone.
      }
    }
    const exit = await child.status;
    const pid = child.pid;
    child = null;
    if (exit.success) {
      // The server removed the record, socket and our status as it detached, but our own last
      // publish can land after that (a ready server detached just as it had served long enough).
      if (deviceId !== null && readRecord(deviceId) === null) removeSupervisorStatus(deviceId);
      say("server exited after detaching; done");
      return ExitCode.ok;
    }
    if (exit.code === EXIT_HANDED_OVER) {
      say(
        `server ${pid} handed ublkb${deviceId} over to a new server (fastloop restart); ` +
          "its new supervisor takes over from here: done",
      );
      return ExitCode.ok;
    }
    const diedAtMs = Date.now();
    const how = exit.signal ? `signal ${exit.signal}` : `exit status ${exit.code}`;
    const cause = readyAtMs > 0
      ? `it died ${seconds(diedAtMs - readyAtMs)} after it was ready`
      : typeof reply?.["error"] === "string"
      ? `it could not start: ${reply["error"]}`
      : timedOut
      ? "it did not report ready in time"
      : "it died before it was ready";
    say(`server died (${how}): ${cause}`);
    const record = deviceId === null ? null : readRecord(deviceId);
    const rival = record ? rivalSupervisor(record) : null;
    if (rival !== null) {
      say(`ublkb${deviceId} is supervised by ${rival} now (a restart): not restarting; done`);
      return ExitCode.ok;
    }
    if (stopping || !opts.recoverable || record === null) {
      const why = stopping
        ? `${stopping} during recovery`
        : !opts.recoverable
        ? "the device is not recoverable (--no-recover)"
        : "no device to recover";
      say(`not restarting: ${why}; removing the device`);
      if (record) await cleanupDeadDevice(record).catch((e) => say(`cleanup failed: ${e}`));
      return stopping ? ExitCode.ok : ExitCode.failure;
    }
    if (!kernelHasDevice(record.id)) {
      // Deleted behind our back (ublk's own tools): no IO can be waiting for a server.
      say(`ublkb${record.id} is gone from the kernel: nothing left to serve; removing its record`);
      removeRecord(record.id);
      return ExitCode.failure;
    }
    const quick = diedAtMs - (readyAtMs || diedAtMs) < SERVED_LONG_ENOUGH_MS;
    status.deaths++;
    status.quickDeaths = quick ? status.quickDeaths + 1 : 0;
    status.lastDeath = { at: iso(diedAtMs), how, cause };
    if (outageSinceMs === 0) outageSinceMs = diedAtMs;
    status.waitingSince = iso(outageSinceMs);
    const pauseMs = restartPauseMs(status.quickDeaths);
    if (status.quickDeaths === CRASH_LOOP_DEATHS) {
      status.crashLoop = true;
      const m = `crash loop: ${status.quickDeaths} servers in a row died before serving ` +
        `(last: ${cause}); IO to ublkb${record.id} waits; retrying with pauses up to ` +
        `${RESTART_PAUSE_MAX_MS / 1000} s; see 'fastloop stat'; ` +
        `'fastloop detach --force ublkb${record.id}' deletes the device and fails its IO`;
      say(m);
      kernelLog(`ublkb${record.id}: ${m}`);
    }
    publish("waiting", diedAtMs + pauseMs);
    if (pauseMs > 0) {
      say(`next server in ${seconds(pauseMs)} (${status.quickDeaths} quick death(s) in a row)`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, pauseMs);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wake = null;
    }
    if (stopping) {
      // Signalled between two servers: there is no server to pass it to, so detach here.
      say(`${stopping} between servers: not restarting; removing the device`);
      await cleanupDeadDevice(record).catch((e) => say(`cleanup failed: ${e}`));
      return ExitCode.ok;
    }
  }
}

/** Resolves true if `child` is still running after `ms`, false as soon as it exits. */
async function outlives(child: Deno.ChildProcess, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const lived = await Promise.race([
    child.status.then(() => false),
    new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), ms))),
  ]);
  clearTimeout(timer);
  return lived;
}

/**
 * Another supervisor whose server serves the device now, as the record says (one that `fastloop
 * restart` started, while this one restarted a server that died during the hand-over).
 */
function rivalSupervisor(record: DeviceRecord): string | null {
  const s = record.supervisor;
  if (!s || s.pid === Deno.pid || !processAlive(s) || !processAlive(record.server)) return null;
  return `supervisor ${s.pid} (server ${record.server.pid})`;
}

/** Does the kernel still have ublk device `id` (its char device in sysfs)? */
function kernelHasDevice(id: number): boolean {
  try {
    Deno.statSync(`/sys/class/ublk-char/ublkc${id}`);
    return true;
  } catch {
    return false;
  }
}

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s`;
}

/** The first line of a child's stdout, or null at EOF or after `timeoutMs` (0: no timeout). */
async function readFirstLine(
  stream: ReadableStream<Uint8Array>,
  timeoutMs: number,
): Promise<{ line: string | null; timedOut: boolean }> {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let text = "";
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((r) => {
    if (timeoutMs > 0) timer = setTimeout(() => r("timeout"), timeoutMs);
  });
  try {
    for (;;) {
      const next = await Promise.race([reader.read(), timeout]);
      if (next === "timeout" || next.done) return { line: null, timedOut: next === "timeout" };
      text += decoder.decode(next.value, { stream: true });
      const nl = text.indexOf("\n");
      if (nl >= 0) return { line: text.slice(0, nl), timedOut: false };
    }
  } finally {
    clearTimeout(timer);
    await reader.cancel().catch(() => {});
  }
}

/**
 * Fault injection for the supervisor's tests: FASTLOOP_FAULT_POISON_FILE names a file holding a
 * byte offset, read at each server's start; a request covering that byte kills the server, so
 * every server dies on the same waiting request until the file is removed. -1: off.
 */
export function poisonByte(): number {
  const path = Deno.env.get("FASTLOOP_FAULT_POISON_FILE");
  if (!path) return -1;
  try {
    const byte = Number(Deno.readTextFileSync(path).trim());
    if (Number.isSafeInteger(byte) && byte >= 0) {
      log(`fault injection: a request covering byte ${byte} kills this server`);
      return byte;
    }
  } catch {
    // No poison file (any more): a healthy server.
  }
  return -1;
}
