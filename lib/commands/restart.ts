//! `fastloop restart DEV|FILE... | --all`: replace each device's server, and its supervisor, by
//! new processes that run the fastloop installed now, while the device stays attached and in use.
//! The steps and why in that order: `lib/handover.ts`. What this command adds is the checks that
//! come first (each refusal one line with its exit code, the device untouched) and the rule that
//! the running server is asked to hand over only once the new one is up and waiting for it.

import { ENODEV, SyscallError } from "../../ffi/errno.ts";
import {
  hasFeature,
  UBLK_F_QUIESCE,
  UBLK_F_USER_RECOVERY,
  UBLK_F_USER_RECOVERY_REISSUE,
  UBLK_S_DEV_LIVE,
  UBLK_STATE_NAMES,
} from "../../ffi/ublk_cmd.ts";
import { type Command, parseCommandArgs } from "../cli.ts";
import { ExitCode, UsageError, UserError } from "../errors.ts";
import { readTakeoverMarker, supervisorArgs, type TakeoverMarker } from "../handover.ts";
import {
  type ControlReply,
  controlRequest,
  ensureRunDir,
  listRecords,
  processAlive,
  type RegistryEntry,
  resolve,
} from "../registry.ts";
import { requireRoot } from "../validate.ts";
import {
  awaitReadiness,
  killAndReap,
  lastLine,
  type Readiness,
  readLog,
  readyTimeoutMs,
  spawnServer,
} from "./attach.ts";

/**
 * The running server answers once it has handed over: QUIESCE_DEV may wait 10 s for backend IO,
 * the queues another 10-20 s, then a flush.
 */
const HANDOVER_TIMEOUT_MS = 120_000;

const HELP = `Usage: fastloop restart DEV|FILE... [--json]
       fastloop restart --all [--json]

Replace a device's server, and its supervisor, by new ones that run the fastloop installed now
(an upgrade), while the device stays attached and in use: a mounted filesystem needs no unmount.
The new server starts first; then the running one stops taking work, finishes what it serves and
hands the device over. IO that arrives meanwhile waits in the kernel and is served by the new
server: nothing fails, and the device keeps its settings (queues, depth, read-only).
On kernels with UBLK_F_QUIESCE (6.16+) the device is quiesced; on older ones the running server
holds back new requests, which the kernel re-issues to the new server (ublk user recovery).
If the new server cannot start, the running one goes on serving and nothing changes.
DEV is /dev/ublkbN, ublkbN or N; FILE is the attached file. Prints each device restarted.

Options:
  --all        restart every fastloop device, one after the other
  --json       print one JSON object per device and line: the new server's answer, with the
               old server (oldServer), how it handed over (handOver) and the time taken (restartMs)
  -h, --help   show this help

Exit codes: 0 restarted, 2 usage, 3 cannot be restarted (attached with --no-recover, its server
is not running, or it runs an older fastloop that cannot hand over), 4 busy (being recovered or
restarted already, starting or stopping), 5 the kernel made the device without user recovery,
6 not root, 7 not attached, 1 other failure.`;

export const command: Command = {
  summary: "replace a device's server with the fastloop installed now, under live IO (upgrade)",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("restart", args, {
      "all": { type: "boolean", short: "a" },
      "json": { type: "boolean" },
    });
    const all = values.all ?? false;
    if (all && positionals.length > 0) {
      throw new UsageError("restart: give devices or --all, not both");
    }
    if (!all && positionals.length === 0) {
      throw new UsageError("restart: expected DEV, FILE or --all (see 'fastloop restart --help')");
    }
    requireRoot("restart");
    const json = values.json ?? false;
    if (positionals.length === 1) {
      await restartEntry(resolve(positionals[0]!), json);
      return ExitCode.ok;
    }
    // Several: one at a time, each failure on its own line; the exit code is the first failure's.
    const entries: Array<RegistryEntry | UserError> = all
      ? listRecords()
      : positionals.map((ref) => {
        try {
          return resolve(ref);
        } catch (e) {
          if (e instanceof UserError) return e;
          throw e;
        }
      });
    let code: number = ExitCode.ok;
    for (const entry of entries) {
      try {
        if (entry instanceof UserError) throw entry;
        await restartEntry(entry, json);
      } catch (e) {
        if (!(e instanceof UserError) && !(e instanceof SyscallError)) throw e;
        console.error(`fastloop: ${e.message}`);
        if (code === ExitCode.ok) code = e instanceof UserError ? e.exitCode : ExitCode.failure;
      }
    }
    return code;
  },
};

/** Restarts one device and prints it; a refusal or failure throws (one line, its exit code). */
async function restartEntry(entry: RegistryEntry, json: boolean): Promise<void> {
  const r = entry.record;
  const dev = r.blockPath;
  // First: a setting this fastloop cannot pass on refuses the restart before anything is asked.
  const args = [...supervisorArgs(r), "--recover", String(r.id), "--takeover"];
  const oldServer = await checkRestartable(entry);
  ensureRunDir();
  const startedAt = performance.now();
  const child = spawnServer(args);
  let answered = false;
  const readiness = awaitReadiness(child, readyTimeoutMs()).finally(() => (answered = true));
  const marker = await Promise.race([
    readiness.then(() => null),
    waitForTakeoverMarker(r.id, child.pid, () => answered),
  ]);
  let handOver: ControlReply | null = null;
  if (marker !== null) {
    try {
      handOver = await controlRequest(
        r.socketPath,
        { cmd: "handover", to: { pid: marker.pid, program: marker.program } },
        HANDOVER_TIMEOUT_MS,
      );
    } catch {
      // No answer: the old server may be gone or still handing over; the new one waits for its
      // exit (or gives up, then the readiness says so).
    }
    if (handOver && !handOver.ok) {
      // Refused before anything happened: the old server goes on; the new one must not wait.
      await killAndReap(child);
      const code = Object.values(ExitCode).includes(handOver.exitCode as ExitCode)
        ? handOver.exitCode as ExitCode
        : ExitCode.failure;
      throw new UserError(
        `${dev}: its server (pid ${r.server.pid}) did not hand over: ${
          handOver.error ?? "no reason given"
        }`,
        code,
      );
    }
  }
  const ready = await readiness;
  if (ready.kind !== "ok") throw await failed(entry, ready, marker !== null, child);
  child.unref();
  if (!json) {
    console.log(String(ready.reply["device"]));
    return;
  }
  const { ok: _ok, ...reply } = ready.reply;
  console.log(JSON.stringify({
    ...reply,
    oldServer,
    handOver: handOver
      ? { how: handOver["how"], ms: handOver["handOverMs"] }
      : { how: "no answer from the old server" },
    restartMs: Math.round(performance.now() - startedAt),
  }));
}

/**
 * Refuses, with the reason, a device whose server cannot hand it over; returns the running
 * server (pid, which fastloop) when it can.
 */
async function checkRestartable(entry: RegistryEntry): Promise<{ pid: number; program: unknown }> {
  const r = entry.record;
  const dev = r.blockPath;
  if (!entry.alive) {
    if (entry.supervisorAlive) {
      throw new UserError(
        `${dev} has no running server: its supervisor (pid ${r.supervisor!.pid}) is bringing ` +
          "one back; restart it once 'fastloop stat' shows it running",
        ExitCode.busy,
      );
    }
    throw new UserError(
      `${dev} cannot be restarted: its server (pid ${r.server.pid}) is not running; ` +
        `'fastloop recover ${dev}' brings it back`,
      ExitCode.badInput,
    );
  }
  if (!r.options.recoverable) {
    throw new UserError(
      `${dev} cannot be restarted: it was attached with --no-recover, so its IO would fail ` +
        "without a server; detach and attach it again instead",
      ExitCode.badInput,
    );
  }
  const marker = readTakeoverMarker(r.id);
  if (marker) {
    throw new UserError(
      `${dev} is being restarted already: server ${marker.pid} is taking it over`,
      ExitCode.busy,
    );
  }
  let ping: ControlReply;
  try {
    ping = await controlRequest(r.socketPath, { cmd: "ping" }, 10_000);
  } catch (e) {
    throw new UserError(
      `${dev}: its server (pid ${r.server.pid}) does not answer on ${r.socketPath}: ${
        e instanceof Error ? e.message : e
      }`,
      ExitCode.failure,
    );
  }
  if (ping["handOver"] !== true) {
    throw new UserError(
      `${dev} cannot be restarted: its server (pid ${r.server.pid}) runs an older fastloop ` +
        "that cannot hand a device over; detach and attach it again instead",
      ExitCode.badInput,
    );
  }
  await checkKernel(entry);
  return { pid: r.server.pid, program: ping["program"] };
}

/** The kernel's view: the device exists, is live, and can wait for a new server. */
async function checkKernel(entry: RegistryEntry): Promise<void> {
  const r = entry.record;
  const dev = r.blockPath;
  const { UblkControl } = await import("../ublk_control.ts");
  const ctrl = UblkControl.open();
  try {
    let info;
    try {
      info = await ctrl.getDeviceInfo(r.id);
    } catch (e) {
      if (e instanceof SyscallError && e.errno === ENODEV) {
        throw new UserError(
          `${dev} no longer exists in the kernel; run 'fastloop detach ${dev}' to clear its record`,
          ExitCode.badInput,
        );
      }
      throw e;
    }
    if (
      !hasFeature(info.flags, UBLK_F_USER_RECOVERY) ||
      !(hasFeature(info.flags, UBLK_F_QUIESCE) ||
        hasFeature(info.flags, UBLK_F_USER_RECOVERY_REISSUE))
    ) {
      throw new UserError(
        `${dev} cannot be restarted: the kernel made it without user recovery ` +
          "(UBLK_F_USER_RECOVERY with UBLK_F_QUIESCE or _REISSUE), so its IO would fail",
        ExitCode.unsupported,
      );
    }
    if (info.state !== UBLK_S_DEV_LIVE) {
      throw new UserError(
        `${dev} is ${UBLK_STATE_NAMES[info.state] ?? `in state ${info.state}`} in the kernel, ` +
          "not live: try again once 'fastloop stat' shows it running",
        ExitCode.busy,
      );
    }
  } finally {
    ctrl.close();
  }
}

/**
 * The marker of the server that the supervisor `supervisorPid` started, once it is up and
 * waiting for the file (lib/handover.ts); null if `gaveUp` first (the readiness came).
 */
async function waitForTakeoverMarker(
  id: number,
  supervisorPid: number,
  gaveUp: () => boolean,
): Promise<TakeoverMarker | null> {
  while (!gaveUp()) {
    const marker = readTakeoverMarker(id);
    if (marker && marker.supervisorPid === supervisorPid) return marker;
    await new Promise((r) => setTimeout(r, 20));
  }
  return null;
}

/**
 * The error for a new server that did not report the device live. Before the hand-over the
 * old server still serves: the new processes are stopped. After it, the new supervisor goes on
 * trying (it never gives a device up), so it is left running.
 */
async function failed(
  entry: RegistryEntry,
  ready: Exclude<Readiness, { kind: "ok" }>,
  askedOld: boolean,
  child: Deno.ChildProcess,
): Promise<UserError> {
  const r = entry.record;
  const dev = r.blockPath;
  const why = ready.kind === "failed"
    ? ready.error
    : (ready.kind === "timeout"
      ? `it did not report within ${readyTimeoutMs() / 1000} s`
      : "it exited before the device was live") +
      ((): string => {
        const detail = lastLine(ready.stderr) || lastLine(readLog(r.logPath));
        return detail ? `: ${detail}` : "";
      })();
  if (!askedOld || processAlive(r.server)) {
    await killAndReap(child);
    return new UserError(
      `${dev}: the new server could not start (${why}); ` +
        `server ${r.server.pid} goes on serving ${dev}`,
      ExitCode.failure,
    );
  }
  child.unref();
  return new UserError(
    `${dev} was handed over, but the new server failed (${why}); its supervisor keeps trying ` +
      `while the IO waits: see 'fastloop stat' and ${r.logPath}`,
    ExitCode.failure,
  );
}
