//! User-facing failures and the exit codes fastloop promises to scripts. `main.ts` is the only
//! place that turns an error into an exit code.

/** Stable exit codes (documented in the README). */
export const ExitCode = {
  ok: 0,
  /** A system call or the kernel failed in a way the user did not cause. */
  failure: 1,
  /** Bad command line: unknown command or flag, missing or malformed argument. */
  usage: 2,
  /** The file or device named cannot be used: missing, a directory, wrong size, wrong filesystem. */
  badInput: 3,
  /** The file or device is busy: in use by another process, already attached, mounted. */
  busy: 4,
  /** The running kernel lacks what fastloop needs (no ublk driver, io_uring disabled). */
  unsupported: 5,
  /** Not permitted: fastloop must run as root. */
  permission: 6,
  /** The device or file named is not attached. */
  notAttached: 7,
} as const;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

/**
 * A mistake or condition the user can act on: printed as one line (`fastloop: <message>`),
 * never with a stack trace.
 */
export class UserError extends Error {
  override readonly name = "UserError";
  constructor(message: string, readonly exitCode: ExitCode = ExitCode.badInput) {
    super(message);
  }
}

export class UsageError extends UserError {
  constructor(message: string) {
    super(message, ExitCode.usage);
  }
}

/** This kernel has no ublk (or its module is not loaded): the one message for it. */
export function ublkMissingError(): UserError {
  return new UserError(
    "ublk is not available: /dev/ublk-control is missing (modprobe ublk_drv)",
    ExitCode.unsupported,
  );
}
