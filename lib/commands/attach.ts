//! `fastloop attach FILE`: validate, start the device's processes in the background, wait until
//! they report the device live (or why not), print `/dev/ublkbN` — like `losetup -f --show`.
//!
//! What runs in the background is this same program (`lib/self_exec.ts`), so a compiled binary
//! works too: `fastloop __server --supervise`, the supervisor, started detached (its own session,
//! stdin closed, stdout a pipe that carries exactly one readiness line, stderr a pipe until it
//! points it at its log file), which runs `fastloop __server` — the server — as its child and
//! restarts it if it dies (`lib/server.ts`). `attach` then lets go of it (`unref`), so both
//! outlive it. The server undoes its own half-made start-up before it reports a failure; if
//! nothing reports, `attach` kills the supervisor's process group and removes what it left.

import { disableTransparentHugePages, libc } from "../../ffi/libc.ts";
import { type Command, parseCommandArgs, parseIntFlag } from "../cli.ts";
import { ExitCode, UsageError, UserError } from "../errors.ts";
import {
  cleanupDeadDevice,
  ensureRunDir,
  listRecords,
  logDir,
  pruneLogs,
  quotePath,
} from "../registry.ts";
import { selfCommand } from "../self_exec.ts";
import {
  DEPTH_DEFAULT,
  DEPTH_MAX,
  DEPTH_MIN,
  MAX_IO_BYTES_CEILING,
  MAX_IO_BYTES_FLOOR,
  QUEUE_BUFFER_BUDGET_BYTES,
  QUEUES_DEFAULT,
  QUEUES_MAX,
  QUEUES_MIN,
  requireRoot,
  validateAttachFile,
  validateLayout,
} from "../validate.ts";
import { layoutArgs, parseByteSize, parseSectorSize } from "../region.ts";

const SIGKILL = 9;

/**
 * How long the background processes may take to bring a device up. On hardware it is about a
 * second; in the TCG test VM each Deno start costs seconds and two attaches at once on a busy
 * host took over 60 s (measured), so the bound only catches a server that is truly stuck.
 */
const READY_TIMEOUT_MS_DEFAULT = 180_000;

// The --depth line's figures (lib/validate.ts, maxIoBytesForDepth).
const SHRINK_ABOVE = QUEUE_BUFFER_BUDGET_BYTES / MAX_IO_BYTES_CEILING;
const CEILING_KIB = MAX_IO_BYTES_CEILING / 1024;
const FLOOR_KIB = MAX_IO_BYTES_FLOOR / 1024;
const BUDGET_MIB = QUEUE_BUFFER_BUDGET_BYTES / (1024 * 1024);

const HELP = `Usage: fastloop attach FILE [--read-only] [--offset BYTES] [--sizelimit BYTES]
                            [--sector-size 512|4096] [--partscan] [--queues N] [--depth N]
                            [--no-recover] [--json]

Attach the regular file FILE as a ublk block device and print its path (/dev/ublkbN).
IO goes straight to the file's blocks on the filesystem's own device where that is safe, and
through the file (O_DIRECT) everywhere else. The file is guarded by a lease while attached.

Options:
  -r, --read-only       attach read-only (a read lease; the device refuses writes)
  -o, --offset BYTES    the device starts this far into FILE (like losetup -o); a multiple of
                        the sector size, inside the file
  --sizelimit BYTES     the device is at most this long (like losetup --sizelimit; 0: to the
                        end of FILE); a multiple of the sector size. BYTES may end in K, M, G, T
                        (KiB, MiB, ...: powers of 1024) or KB, MB, ... (powers of 1000)
  -b, --sector-size N   the device's logical block size, 512 or 4096 (like losetup -b; default:
                        that of the filesystem's device); not below the filesystem device's,
                        which IO through the file with O_DIRECT needs
  -P, --partscan        scan FILE's partition table: partitions appear as /dev/ublkbNp1, ...
                        (like losetup -P). Without it the kernel does not scan on Linux 7.0 and
                        later (UBLK_F_NO_AUTO_PART_SCAN); older kernels (6.12) scan every new
                        ublk device at start, so its partitions appear either way
  --queues N     number of IO queues, one thread each (${QUEUES_MIN}..${QUEUES_MAX}, default ${QUEUES_DEFAULT})
  --depth N      requests in flight per queue (${DEPTH_MIN}..${DEPTH_MAX}, default ${DEPTH_DEFAULT});
                 a queue's buffers are depth x largest request; above depth ${SHRINK_ABOVE} the largest
                 request shrinks from ${CEILING_KIB} KiB (down to ${FLOOR_KIB} KiB) to keep them near ${BUDGET_MIB} MiB
  --no-recover   do not create the device recoverable (IO fails at once if the server dies)
  --json         print a JSON object instead of the device path
  -h, --help     show this help

Exit codes: 0 attached, 2 usage (also a malformed size, a sector size other than 512 or 4096),
3 unusable file (also an offset past its end, a region not made of whole sectors, a sector size
below the filesystem device's), 4 file in use or already attached, 5 no ublk in this kernel,
6 not root, 1 other failure.`;

export const command: Command = {
  summary: "attach FILE as /dev/ublkbN and print the device (like losetup -f --show)",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("attach", args, {
      "read-only": { type: "boolean", short: "r" },
      "offset": { type: "string", short: "o" },
      "sizelimit": { type: "string" },
      "sector-size": { type: "string", short: "b" },
      "partscan": { type: "boolean", short: "P" },
      "queues": { type: "string" },
      "depth": { type: "string" },
      "no-recover": { type: "boolean" },
      "json": { type: "boolean" },
    });
    if (positionals.length !== 1) {
      throw new UsageError(
        `attach: expected exactly one FILE, got ${positionals.length} (see 'fastloop attach --help')`,
      );
    }
    const readOnly = values["read-only"] ?? false;
    const queues = parseIntFlag(
      "attach",
      "queues",
      values.queues,
      QUEUES_DEFAULT,
      QUEUES_MIN,
      QUEUES_MAX,
    );
    const depth = parseIntFlag(
      "attach",
      "depth",
      values.depth,
      DEPTH_DEFAULT,
      DEPTH_MIN,
      DEPTH_MAX,
    );
    const asked = {
      offsetBytes: parseByteSize("attach", "offset", values.offset),
      sizeLimitBytes: parseByteSize("attach", "sizelimit", values.sizelimit),
      sectorBytes: parseSectorSize("attach", values["sector-size"]),
    };
    requireRoot("attach");
    const target = validateAttachFile(positionals[0]!, readOnly);
    const layout = validateLayout(target, asked);

    ensureRunDir();
    pruneLogs();
    const logPath = `${logDir()}/${logName(target.path)}`;
    // attach leaves the supervisor behind, which runs the server (lib/server.ts).
    const serverArgs = [
      "__server",
      "--supervise",
      target.path,
      "--log",
      logPath,
      "--queues",
      String(queues),
      "--depth",
      String(depth),
      "--dev",
      target.dev,
      "--ino",
      target.ino,
      ...layoutArgs(layout),
    ];
    if (values.partscan) serverArgs.push("--partscan");
    if (readOnly) serverArgs.push("--read-only");
    if (values["no-recover"]) serverArgs.push("--no-recover");
    const child = spawnServer(serverArgs);

    const ready = await awaitReadiness(child, readyTimeoutMs());
    if (ready.kind === "ok") {
      child.unref();
      const reply = ready.reply;
      if (values.json) {
        const { ok: _ok, ...rest } = reply;
        console.log(JSON.stringify(rest));
      } else {
        console.log(String(reply["device"]));
        if (reply["mode"] === "file" && typeof reply["reason"] === "string") {
          console.error(
            `fastloop: note: ${quotePath(target.path)} is served through the file: ${
              reply["reason"]
            }`,
          );
        }
      }
      return ExitCode.ok;
    }

    if (ready.kind === "failed") {
      // The server undid its start-up before reporting; wait so no process is left when we exit.
      await waitExit(child, 10_000);
      removeQuietly(logPath);
      const code = Object.values(ExitCode).includes(ready.exitCode as ExitCode)
        ? ready.exitCode as ExitCode
        : ExitCode.failure;
      throw new UserError(ready.error, code);
    }

    // No readiness line: the server died or hung. Make sure it is gone, then remove leftovers.
    const status = await killAndReap(child);
    for (const { record } of listRecords()) {
      if (record.supervisor?.pid === child.pid || record.server.pid === child.pid) {
        await cleanupDeadDevice(record);
      }
    }
    const detail = lastLine(ready.stderr) || lastLine(readLog(logPath));
    const what = ready.kind === "timeout"
      ? `did not report within ${readyTimeoutMs() / 1000} s and was stopped`
      : `exited (${status}) before the device was live`;
    throw new UserError(
      `The server for ${quotePath(target.path)} ${what}${
        detail ? `: ${detail}` : ""
      } (log: ${logPath})`,
      ExitCode.failure,
    );
  },
};

export function readyTimeoutMs(): number {
  const env = Number(Deno.env.get("FASTLOOP_ATTACH_TIMEOUT_MS"));
  return Number.isFinite(env) && env > 0 ? env : READY_TIMEOUT_MS_DEFAULT;
}

/** `<file name>-<time>-<attach pid>.log`, safe for a file name whatever FILE was called. */
function logName(filePath: string): string {
  const base = (filePath.split("/").pop() ?? "file").replace(/[^A-Za-z0-9._-]/g, "_").slice(0, 64);
  const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\..*$/, "");
  return `${base || "file"}-${stamp}-${Deno.pid}.log`;
}

export type Readiness =
  | { kind: "ok"; reply: Record<string, unknown> }
  | { kind: "failed"; error: string; exitCode: number }
  | { kind: "eof" | "timeout"; stderr: string };

/**
 * Starts fastloop's `__server` with `serverArgs`, detached, its stdout/stderr piped for readiness.
 * Without transparent huge pages from its first page on (the flag is inherited): see
 * `disableTransparentHugePages`.
 */
export function spawnServer(serverArgs: string[]): Deno.ChildProcess {
  try {
    disableTransparentHugePages();
  } catch {
    // An old kernel: the server only uses more memory.
  }
  const [program, ...programArgs] = selfCommand(serverArgs);
  return new Deno.Command(program!, {
    args: programArgs,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    detached: true,
  }).spawn();
}

/**
 * Reads the server's one readiness line. Its stderr is collected meanwhile: it holds whatever the
 * server printed before it switched to its log (e.g. Deno failing to start).
 */
export async function awaitReadiness(
  child: Deno.ChildProcess,
  timeoutMs: number,
): Promise<Readiness> {
  const decoder = new TextDecoder();
  let stderrText = "";
  const stderrReader = child.stderr.getReader();
  const stderrDone = (async () => {
    try {
      for (;;) {
        const { value, done } = await stderrReader.read();
        if (done) break;
        if (stderrText.length < 65536) stderrText += decoder.decode(value, { stream: true });
      }
    } catch {
      // Cancelled.
    }
  })();

  const reader = child.stdout.getReader();
  let stdoutText = "";
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((
    r,
  ) => (timer = setTimeout(() => r("timeout"), timeoutMs)));
  let line: string | null = null;
  let timedOut = false;
  try {
    for (;;) {
      const next = await Promise.race([reader.read(), timeout]);
      if (next === "timeout") {
        timedOut = true;
        break;
      }
      if (next.done) break;
      stdoutText += decoder.decode(next.value, { stream: true });
      const nl = stdoutText.indexOf("\n");
      if (nl >= 0) {
        line = stdoutText.slice(0, nl);
        break;
      }
    }
  } finally {
    clearTimeout(timer);
    await reader.cancel().catch(() => {});
  }
  if (line === null) {
    // Give stderr a moment to reach EOF (the server may still be writing its last words).
    let wait: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([stderrDone, new Promise((r) => (wait = setTimeout(r, 1000)))]);
    clearTimeout(wait);
  }
  await stderrReader.cancel().catch(() => {});
  if (line === null) return { kind: timedOut ? "timeout" : "eof", stderr: stderrText };
  let reply: Record<string, unknown>;
  try {
    reply = JSON.parse(line);
  } catch {
    return { kind: "eof", stderr: `unexpected output: ${line.slice(0, 200)}` };
  }
  if (reply["ok"] === true && typeof reply["device"] === "string") return { kind: "ok", reply };
  return {
    kind: "failed",
    error: typeof reply["error"] === "string" ? reply["error"] : "The server failed to start",
    exitCode: typeof reply["exitCode"] === "number" ? reply["exitCode"] : ExitCode.failure,
  };
}

export async function waitExit(
  child: Deno.ChildProcess,
  timeoutMs: number,
): Promise<string | null> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const status = await Promise.race([
    child.status,
    new Promise<null>((r) => (timer = setTimeout(() => r(null), timeoutMs))),
  ]);
  clearTimeout(timer);
  if (status === null) return null;
  return status.signal ? `signal ${status.signal}` : `status ${status.code}`;
}

/**
 * How long a server stopped by SIGTERM may take to undo its start-up (delete the device it
 * added) before it is killed. A kill in the middle leaves a ublk device that nothing names (no
 * record yet, ublksrv_pid still 0), so the wait is generous: 8 attaches at once in the loaded
 * TCG VM took more than 10 s to unwind (measured: orphan devices after a 10 s bound).
 */
const UNWIND_TIMEOUT_MS = 120_000;

/** SIGTERM (the server cleans up), then SIGKILL if it does not exit in `UNWIND_TIMEOUT_MS`. */
export async function killAndReap(child: Deno.ChildProcess): Promise<string> {
  try {
    child.kill("SIGTERM");
  } catch {
    // Already exited.
  }
  const status = await waitExit(child, UNWIND_TIMEOUT_MS);
  if (status !== null) return status;
  // The supervisor leads its own process group (setsid) and its server stays in it: one kill
  // of the group ends both.
  libc.kill(-child.pid, SIGKILL);
  return (await waitExit(child, 5_000)) ?? "unkillable";
}

export function lastLine(text: string): string {
  const lines = text.split("\n").map((l) => l.trim()).filter((l) => l !== "");
  return (lines[lines.length - 1] ?? "").slice(0, 300);
}

export function readLog(path: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return "";
  }
}

function removeQuietly(path: string): void {
  try {
    Deno.removeSync(path);
  } catch {
    // Never created.
  }
}
