//! File leases (`fcntl(2)` `F_SETLEASE`/`F_GETLEASE`, `linux/fcntl.h` + `asm-generic/fcntl.h`)
//! and their break notification: the kernel sends SIGIO to the lease holder when another process
//! opens or truncates the file, and holds that opener until the lease is released or downgraded
//! (or `/proc/sys/fs/lease-break-time` passes).
//!
//! Rules the kernel imposes, which callers must respect:
//! - A write lease needs every other open of the file to be closed, in any process, including a
//!   second fd of our own: the file must be opened exactly once.
//! - SIGIO's default action kills the process: the listener must be installed (`onLeaseBreak`)
//!   before the lease is taken.
//! - During a break, `F_GETLEASE` reports the type being broken to (`read` for a new reader,
//!   `none` for a writer or truncate), not the type still held.

import { EAGAIN, SyscallError } from "./errno.ts";
import { fcntl } from "./libc.ts";

// asm-generic/fcntl.h
export const F_GETOWN = 9;
export const F_SETOWN = 8;
export const F_SETSIG = 10;
export const F_GETSIG = 11;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
// linux/fcntl.h: F_LINUX_SPECIFIC_BASE (1024) + n
export const F_SETLEASE = 1024;
export const F_GETLEASE = 1025;

/** A lease as fastloop names it; `none` is `F_UNLCK`. */
export type LeaseType = "read" | "write" | "none";

const TO_FCNTL: Record<"read" | "write" | "unlock", number> = {
  read: F_RDLCK,
  write: F_WRLCK,
  unlock: F_UNLCK,
};

function fromFcntl(type: number): LeaseType {
  if (type === F_RDLCK) return "read";
  if (type === F_WRLCK) return "write";
  return "none";
}

/** The lease each fd was last set to by this module; tells a break apart from a stray SIGIO. */
const held = new Map<number, LeaseType>();

/**
 * The lease could not be taken because the file is open elsewhere (EAGAIN). Still a
 * `SyscallError`, with a message that says what to do about it.
 */
export class LeaseRefusedError extends SyscallError {
  constructor(readonly type: "read" | "write", readonly path: string) {
    super("F_SETLEASE", EAGAIN, path);
    this.message = type === "write"
      ? `Cannot take a write lease on ${path}: the file is open elsewhere (another process, or ` +
        `a second fd of this one); close it first (F_SETLEASE: EAGAIN)`
      : `Cannot take a read lease on ${path}: the file is open for writing elsewhere ` +
        `(F_SETLEASE: EAGAIN)`;
  }
}

/**
 * Takes, downgrades or releases the lease on `fd` (releasing when none is held is a no-op). A read lease needs no writer but us; a write
 * lease needs no other open at all. Throws `LeaseRefusedError` when the kernel says the file is
 * in use (EAGAIN), `SyscallError("F_SETLEASE", …)` otherwise (EACCES: not the owner and no
 * CAP_LEASE; EINVAL: not a regular file or the filesystem refuses leases, e.g. NFS).
 */
export function setLease(fd: number, type: "read" | "write" | "unlock", path: string): void {
  try {
    fcntl(fd, F_SETLEASE, TO_FCNTL[type], "F_SETLEASE", path);
  } catch (e) {
    if (!(e instanceof SyscallError && e.errno === EAGAIN)) throw e;
    // F_UNLCK without a lease is EAGAIN (generic_delete_lease found nothing): already released.
    if (type !== "unlock") throw new LeaseRefusedError(type, path);
  }
  held.set(fd, type === "unlock" ? "none" : type);
}

/** Like `setLease`, but returns false instead of throwing when the file is in use (to retry). */
export function trySetLease(fd: number, type: "read" | "write", path: string): boolean {
  try {
    setLease(fd, type, path);
    return true;
  } catch (e) {
    if (e instanceof LeaseRefusedError) return false;
    throw e;
  }
}

/** `F_GETLEASE`: the lease held, or during a break the type it is being broken to. */
export function getLease(fd: number, path = `fd ${fd}`): LeaseType {
  return fromFcntl(fcntl(fd, F_GETLEASE, 0, "F_GETLEASE", path));
}

const RANK: Record<LeaseType, number> = { none: 0, read: 1, write: 2 };

/**
 * Calls `onBreak(breakingTo)` when the kernel starts breaking the lease on `fd`: `read` when
 * another process opened the file for reading (downgrade to a read lease, or release), `none`
 * when it opened it for writing or truncated it (release). The callback should answer with
 * `setLease` quickly: the opener is blocked until then. Install this before taking the lease —
 * SIGIO would otherwise kill the process. Returns a function that removes the listener.
 *
 * The kernel delivers SIGIO to the process that took the lease (it sets the fd's owner itself);
 * `F_SETOWN` is called anyway so the owner is right even if the fd was inherited.
 */
export function onLeaseBreak(
  fd: number,
  onBreak: (breakingTo: "read" | "none") => void,
  path = `fd ${fd}`,
): () => void {
  fcntl(fd, F_SETOWN, Deno.pid, "F_SETOWN", path);
  const listener = () => {
    const have = held.get(fd) ?? "none";
    if (have === "none") return;
    let now: LeaseType;
    try {
      now = getLease(fd, path);
    } catch {
      return; // fd closed under us: nothing left to break
    }
    // SIGIO is shared by every fd of the process: only a lower type than we hold is a break.
    if (RANK[now] < RANK[have]) onBreak(now === "read" ? "read" : "none");
  };
  Deno.addSignalListener("SIGIO", listener);
  return () => Deno.removeSignalListener("SIGIO", listener);
}

/** Forgets what this module recorded for `fd` (call when closing it). */
export function forgetLease(fd: number): void {
  held.delete(fd);
}
