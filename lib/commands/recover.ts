//! `fastloop recover DEV`: bring back a device whose server and supervisor are both gone (e.g.
//! both were killed). A recoverable device (`UBLK_F_USER_RECOVERY`) outlives its server: the
//! kernel keeps /dev/ublkbN and holds its IO. This starts a new supervisor, exactly as `attach`
//! does, whose first server takes the device over (`__server --recover ID`: START_USER_RECOVERY,
//! queues fetch, END_USER_RECOVERY) and re-issues the held IO; from then on it is an attached
//! device like any other. Every case where that cannot work is refused with one line: not a
//! fastloop device, still served, already being recovered, given up on, `--no-recover`, gone
//! from the kernel.

import { ENODEV, SyscallError } from "../../ffi/errno.ts";
import { hasFeature, UBLK_F_USER_RECOVERY, UBLK_S_DEV_DEAD } from "../../ffi/ublk_cmd.ts";
import { type Command, parseCommandArgs } from "../cli.ts";
import { ExitCode, UsageError, UserError } from "../errors.ts";
import { readTakeoverMarker, supervisorArgs } from "../handover.ts";
import { ensureRunDir, quotePath, type RegistryEntry, resolve } from "../registry.ts";
import { requireRoot } from "../validate.ts";
import {
  awaitReadiness,
  killAndReap,
  lastLine,
  readLog,
  readyTimeoutMs,
  spawnServer,
  waitExit,
} from "./attach.ts";

const HELP = `Usage: fastloop recover DEV [--json]

Bring back a fastloop device whose server and supervisor are both gone (for example both were
killed): a new supervisor and server take the device over through ublk user recovery, the IO
the kernel held meanwhile is re-issued, and the device serves again with the same data.
Devices recover by themselves while their supervisor lives; this is for when it does not.
DEV is /dev/ublkbN, ublkbN, N or the attached file. Prints the device (like attach).

Options:
  --json       print a JSON object instead of the device path
  -h, --help   show this help

Exit codes: 0 recovered, 2 usage, 3 not recoverable (--no-recover, given up, dead in the
kernel), 4 still served or already being recovered, 5 the kernel lacks user recovery, 6 not
root, 7 not a fastloop device, 1 other failure.`;

export const command: Command = {
  summary: "bring back a device whose server and supervisor are gone (ublk user recovery)",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("recover", args, {
      "json": { type: "boolean" },
    });
    if (positionals.length !== 1) {
      throw new UsageError(
        `recover: expected exactly one DEV, got ${positionals.length} (see 'fastloop recover --help')`,
      );
    }
    requireRoot("recover");
    const ref = positionals[0]!;
    let entry: RegistryEntry;
    try {
      entry = resolve(ref);
    } catch (e) {
      if (e instanceof UserError && e.exitCode === ExitCode.notAttached) {
        throw new UserError(
          `${quotePath(ref)} is not a fastloop device (see 'fastloop stat')`,
          ExitCode.notAttached,
        );
      }
      throw e;
    }
    await checkRecoverable(entry);
    const r = entry.record;

    ensureRunDir();
    // The settings attach gave, plus --recover: the log continues in the device's own file.
    const serverArgs = [...supervisorArgs(r), "--recover", String(r.id)];
    const started = performance.now();
    const child = spawnServer(serverArgs);
    const ready = await awaitReadiness(child, readyTimeoutMs());
    if (ready.kind === "ok") {
      child.unref();
      const { ok: _ok, ...reply } = ready.reply;
      const recoveredMs = Math.round(performance.now() - started);
      if (values.json) console.log(JSON.stringify({ ...reply, recoveredMs }));
      else console.log(String(reply["device"]));
      return ExitCode.ok;
    }
    if (ready.kind === "failed") {
      // The server undid its start-up (the device stays as it was: recoverable again).
      await waitExit(child, 10_000);
      const code = Object.values(ExitCode).includes(ready.exitCode as ExitCode)
        ? ready.exitCode as ExitCode
        : ExitCode.failure;
      throw new UserError(`Recovering ${r.blockPath} failed: ${ready.error}`, code);
    }
    const status = await killAndReap(child);
    const detail = lastLine(ready.stderr) || lastLine(readLog(r.logPath));
    const what = ready.kind === "timeout"
      ? `did not report within ${readyTimeoutMs() / 1000} s and was stopped`
      : `exited (${status}) before the device was live`;
    throw new UserError(
      `The server recovering ${r.blockPath} ${what}${detail ? `: ${detail}` : ""} ` +
        `(log: ${r.logPath})`,
      ExitCode.failure,
    );
  },
};

/** Refuses, with the reason, a device that is not waiting for a new server or cannot take one. */
async function checkRecoverable(entry: RegistryEntry): Promise<void> {
  const r = entry.record;
  const dev = r.blockPath;
  if (entry.alive) {
    throw new UserError(
      `${dev} is healthy: its server (pid ${r.server.pid}) is running; nothing to recover`,
      ExitCode.busy,
    );
  }
  if (entry.supervisorAlive) {
    throw new UserError(
      `${dev} is being recovered already by its supervisor (pid ${r.supervisor!.pid})`,
      ExitCode.busy,
    );
  }
  const takeover = readTakeoverMarker(r.id);
  if (takeover) {
    throw new UserError(
      `${dev} is being restarted: server ${takeover.pid} is taking it over`,
      ExitCode.busy,
    );
  }
  if (!r.options.recoverable) {
    throw new UserError(
      `${dev} cannot be recovered: it was attached with --no-recover; ` +
        `run 'fastloop detach ${dev}' to clear`,
      ExitCode.badInput,
    );
  }
  // The kernel's view: the device must still exist, be recoverable, and not be dead.
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
    if (!hasFeature(info.flags, UBLK_F_USER_RECOVERY)) {
      throw new UserError(
        `${dev} cannot be recovered: the kernel did not create it with user recovery ` +
          `(UBLK_F_USER_RECOVERY); run 'fastloop detach ${dev}'`,
        ExitCode.unsupported,
      );
    }
    if (info.state === UBLK_S_DEV_DEAD) {
      throw new UserError(
        `${dev} cannot be recovered: the kernel has stopped it; run 'fastloop detach ${dev}'`,
        ExitCode.badInput,
      );
    }
  } finally {
    ctrl.close();
  }
}
