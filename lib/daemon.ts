//! What a device's two background processes (the server, `lib/server.ts`, and its supervisor,
//! `lib/supervisor.ts`) share about being started by `attach`: stderr pointed at the device's
//! log file, and one JSON readiness line on stdout, after which stdout joins the log too.

import { SyscallError } from "../ffi/errno.ts";
import { errno, libc, O_APPEND, O_CREAT, O_WRONLY, open } from "../ffi/libc.ts";

const encoder = new TextEncoder();

/** Points fd 2 at the log file; returns the log fd (kept for fd 1 after readiness). */
export function openLog(path: string): number {
  const fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o600);
  dup2(fd, 2);
  return fd;
}

/** dup2(2): makes `newFd` refer to what `oldFd` refers to (closing what it referred to). */
function dup2(oldFd: number, newFd: number): void {
  if (libc.dup2(oldFd, newFd) < 0) {
    throw new SyscallError("dup2", errno(), `fd ${oldFd} -> ${newFd}`);
  }
}

/** The one readiness line `attach` waits for; then stdout is the log as well. */
export function writeReadiness(reply: Record<string, unknown>, logFd: number): void {
  try {
    Deno.stdout.writeSync(encoder.encode(JSON.stringify(reply) + "\n"));
  } catch {
    // `attach` gave up waiting (timeout or killed): it cleans up after us if needed.
  }
  // From now on stdout is the log too: this closes the readiness pipe, so `attach` sees EOF.
  dup2(logFd, 1);
}
