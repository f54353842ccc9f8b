//! `fastloop resize DEV|FILE [--size SIZE]`, like `losetup -c`: the device takes its file's
//! current size (its region's, up to `--sizelimit`) while IO runs; with `--size` the device's
//! server first grows the file through its own descriptor, so its lease holds. The server does
//! the work (lib/server.ts, the control socket's `resize`): it owns the file, the queues learn
//! the size before the kernel (UBLK_U_CMD_UPDATE_SIZE, Linux 6.16+), and it refuses a file that
//! shrank below the device without changing anything.

import { type Command, parseCommandArgs } from "../cli.ts";
import { ExitCode, UsageError, UserError } from "../errors.ts";
import { controlRequest, resolve } from "../registry.ts";
import { parseByteSize } from "../region.ts";
import { requireRoot } from "../validate.ts";

/** Growing a file allocates nothing (it ends in a hole), and the kernel's part is one command. */
const RESIZE_TIMEOUT_MS = 60_000;

const HELP = `Usage: fastloop resize DEV|FILE [--size SIZE] [--json]

Make an attached device take its file's current size, as losetup -c does, while IO runs: the
rest of the file from --offset on, at most --sizelimit. With --size SIZE, the file is first
grown so that the device can be SIZE bytes (through fastloop's own descriptor, so its lease
holds and the direct path stays on), then the device. SIZE may end in K, M, G, T (powers of
1024) or KB, MB, ... (powers of 1000). A device never shrinks: a file that shrank below it is
refused and nothing changes. Prints the device and its new size in bytes.
Needs UBLK_F_UPDATE_SIZE, which Linux 6.16 and later have; on older kernels (6.12) it exits 5.

Growing the file yourself while it is attached: another process's truncate fails at first
with "Resource temporarily unavailable" (EAGAIN), because coreutils opens the file with
O_NONBLOCK and fastloop holds a lease on it; the open breaks the lease, fastloop moves the
device to the path through the file, and the truncate succeeds when run again. Then run
'fastloop resize DEV'. --size does all of it without breaking the lease.

Options:
  --size SIZE  grow the file, then the device, to SIZE bytes (a multiple of the sector size,
               not past --sizelimit, not below the device's size)
  --json       print a JSON object: device, fromBytes, sizeBytes
  -h, --help   show this help

Exit codes: 0 resized (or already that size), 2 usage, 3 the file shrank below the device or
SIZE does not fit, 4 the device has no running server (it is being recovered), 5 the kernel
lacks UBLK_F_UPDATE_SIZE (before 6.16), 6 not root, 7 not attached, 1 other failure.`;

export const command: Command = {
  summary: "make a device take its file's new size, or grow both (like losetup -c)",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("resize", args, {
      "size": { type: "string" },
      "json": { type: "boolean" },
    });
    if (positionals.length !== 1) {
      throw new UsageError(
        `resize: expected exactly one DEV or FILE, got ${positionals.length} ` +
          `(see 'fastloop resize --help')`,
      );
    }
    const sizeBytes = parseByteSize("resize", "size", values.size);
    if (sizeBytes === 0) throw new UsageError("resize: --size must be more than 0");
    requireRoot("resize");
    const entry = resolve(positionals[0]!);
    const r = entry.record;
    if (!entry.alive) {
      throw new UserError(
        `${r.blockPath} has no running server${
          entry.supervisorAlive ? " (it is being recovered)" : ""
        }: try again once 'fastloop stat' shows it running`,
        ExitCode.busy,
      );
    }
    const reply = await controlRequest(
      r.socketPath,
      { cmd: "resize", sizeBytes },
      RESIZE_TIMEOUT_MS,
    );
    if (!reply.ok) {
      const code = Object.values(ExitCode).includes(reply["exitCode"] as ExitCode)
        ? reply["exitCode"] as ExitCode
        : ExitCode.failure;
      throw new UserError(`${r.blockPath}: ${reply.error ?? "resize failed"}`, code);
    }
    const { ok: _ok, ...rest } = reply;
    if (values.json) console.log(JSON.stringify(rest));
    else console.log(`${reply["device"]} ${reply["sizeBytes"]}`);
    return ExitCode.ok;
  },
};
