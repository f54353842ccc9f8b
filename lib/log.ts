//! Where a device's processes (server and supervisor) report lifecycle events and errors: one
//! timestamped line each in the device's log file (their stderr, pointed at
//! `/run/fastloop/log/…` by `lib/server.ts`), and the same line to syslog when the machine has
//! one (`/dev/log`: journald or a syslog daemon), so `journalctl -t fastloop` or
//! /var/log/syslog show it. Syslog is best effort and never blocks: a datagram that the daemon
//! cannot take at once is dropped (and counted), the file still has the line.

import { ECONNREFUSED, ENOENT, errnoName, SyscallError } from "../ffi/errno.ts";
import { close } from "../ffi/libc.ts";
import { connectUnixDatagram, sendDatagram } from "../ffi/socket.ts";

/** The syslog socket; `FASTLOOP_SYSLOG_SOCKET` moves it (tests), "" turns syslog off. */
export function syslogPath(): string {
  return Deno.env.get("FASTLOOP_SYSLOG_SOCKET") ?? "/dev/log";
}

// Facility daemon (3), severities of syslog(3).
const LOG_DAEMON = 3 << 3;
export type Severity = "err" | "warning" | "info";
const SEVERITY: Record<Severity, number> = { err: 3, warning: 4, info: 6 };
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

const encoder = new TextEncoder();
let syslogFd = -1;
/** Why syslog is not used, once a connection was tried and failed ("" while it works). */
let syslogProblem = "";
let syslogTried = false;
let syslogDropped = 0;
let context = "";

/** A prefix for syslog lines from now on (the device, once it exists): "ublkb3". */
export function setLogContext(name: string): void {
  context = name;
}

/**
 * Severity of a line when the caller gave none: failures and deaths are errors, everything else
 * (starts, stops, lease transitions) information.
 */
function severityOf(message: string): Severity {
  return /\b(fail(ed|s)?|died|gave up|error|unhandled)\b/i.test(message) ? "err" : "info";
}

/** One timestamped line in the log file (stderr) and, when there is one, in syslog. */
export function log(message: string, severity: Severity = severityOf(message)): void {
  const line = `${new Date().toISOString()} fastloop[${Deno.pid}] ${message}\n`;
  try {
    Deno.stderr.writeSync(encoder.encode(line));
  } catch {
    // Nowhere left to log to; the server keeps serving.
  }
  toSyslog(message, severity);
}

function toSyslog(message: string, severity: Severity): void {
  if (!syslogTried) connectSyslog();
  if (syslogFd < 0) return;
  // RFC 3164 as glibc's syslog(3) writes it: <PRI>Mmm dd hh:mm:ss TAG[PID]: MSG
  const now = new Date();
  const stamp = `${MONTHS[now.getMonth()]} ${String(now.getDate()).padStart(2, " ")} ${
    now.toTimeString().slice(0, 8)
  }`;
  const text = `<${LOG_DAEMON | SEVERITY[severity]}>${stamp} fastloop[${Deno.pid}]: ${
    context ? `${context}: ` : ""
  }${message.replaceAll("\n", " ")}`;
  const data = encoder.encode(text);
  let err = sendDatagram(syslogFd, data);
  if (err === ECONNREFUSED) {
    // The daemon restarted (a new socket at the same path): connect again, once.
    close(syslogFd);
    syslogFd = -1;
    connectSyslog();
    err = syslogFd < 0 ? -1 : sendDatagram(syslogFd, data);
  }
  if (err !== 0) syslogDropped++;
}

function connectSyslog(): void {
  syslogTried = true;
  const path = syslogPath();
  if (path === "") {
    syslogProblem = "turned off (FASTLOOP_SYSLOG_SOCKET is empty)";
    return;
  }
  try {
    syslogFd = connectUnixDatagram(path);
    syslogProblem = "";
  } catch (e) {
    syslogFd = -1;
    syslogProblem = e instanceof SyscallError && e.errno === ENOENT
      ? `no syslog daemon (${path} does not exist)`
      : `cannot connect to ${path}: ${e instanceof SyscallError ? errnoName(e.errno) : String(e)}`;
  }
}

/** Where this process's log lines go, for `stat`: the file, and syslog or why not. */
export function logTargets(file: string): {
  file: string;
  syslog: string | null;
  syslogNote?: string;
  syslogDropped?: number;
} {
  if (!syslogTried) connectSyslog();
  return syslogFd >= 0
    ? { file, syslog: syslogPath(), ...(syslogDropped ? { syslogDropped } : {}) }
    : { file, syslog: null, syslogNote: syslogProblem };
}

/**
 * One line in the kernel log (`dmesg`), where whoever finds a device's IO hanging looks first:
 * for the few events that explain a wait (a crash loop, its end). Best effort, root only.
 */
export function kernelLog(message: string): void {
  try {
    // <4>: KERN_WARNING. One write is one record.
    Deno.writeTextFileSync("/dev/kmsg", `<4>fastloop: ${message.replaceAll("\n", " ")}\n`, {
      append: true,
    });
  } catch {
    // No /dev/kmsg (a container) or not root: the log file and syslog have the line.
  }
}
