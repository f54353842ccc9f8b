//! `fastloop detach DEV|FILE... | --all [--force]`: ask each device's server to stop, drain,
//! flush, delete the device and release the file, and wait until it has exited. A device in use
//! (it or one of its partitions mounted, held exclusively, open by a process) is refused unless
//! `--force`; its partitions go with it. A device whose
//! server is dead is cleaned up here directly: DEL_DEV through `/dev/ublk-control`, record removed.

import { EBUSY, SyscallError } from "../../ffi/errno.ts";
import { close, O_EXCL, O_RDONLY, open } from "../../ffi/libc.ts";
import { type Command, parseCommandArgs } from "../cli.ts";
import { ExitCode, UsageError, UserError } from "../errors.ts";
import {
  cleanupDeadDevice,
  controlRequest,
  type DeviceRecord,
  listRecords,
  processAlive,
  type ProcessRef,
  readRecord,
  type RegistryEntry,
  resolve,
} from "../registry.ts";
import { blockDeviceNumbers, mountPointsOf, processesUsing, requireRoot } from "../validate.ts";
import { partitionsOf } from "../partitions.ts";

/** A detach flushes everything acknowledged: give a slow disk time. */
const DETACH_TIMEOUT_MS = 120_000;
/** After answering, the server still closes its files and exits. */
const EXIT_TIMEOUT_MS = 30_000;

const HELP = `Usage: fastloop detach DEV|FILE... [--force]
       fastloop detach --all [--force]

Detach devices attached by fastloop: in-flight IO is drained, everything acknowledged is flushed
to the disk, the device and its partitions (/dev/ublkbNp1, ...) are deleted, the file's lease
released and the server exits. A device is refused while it or one of its partitions is mounted
or open.
DEV is /dev/ublkbN, ublkbN or N; FILE is the attached file (any path to it).

Options:
  --all        detach every fastloop device
  --force      detach even if the device is mounted or open (its users get IO errors); also
               the way to delete a device whose servers keep dying (its waiting IO fails)
  -h, --help   show this help

Exit codes: 0 detached, 2 usage, 4 device or partition mounted or in use, 6 not root,
7 not attached,
1 other failure.`;

export const command: Command = {
  summary: "detach a device (DEV, FILE or --all): flush, stop, delete, release the file",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("detach", args, {
      "all": { type: "boolean", short: "a" },
      "force": { type: "boolean", short: "f" },
    });
    const all = values.all ?? false;
    const force = values.force ?? false;
    if (all && positionals.length > 0) {
      throw new UsageError("detach: give devices or --all, not both");
    }
    if (!all && positionals.length === 0) {
      throw new UsageError("detach: expected DEV, FILE or --all (see 'fastloop detach --help')");
    }
    requireRoot("detach");
    if (positionals.length === 1) {
      await detachEntry(resolve(positionals[0]!), force);
      return ExitCode.ok;
    }
    // Several targets: try each, report each failure on its own line, exit with the first code.
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
        await detachEntry(entry, force);
      } catch (e) {
        if (!(e instanceof UserError) && !(e instanceof SyscallError)) throw e;
        console.error(`fastloop: ${e.message}`);
        if (code === ExitCode.ok) code = e instanceof UserError ? e.exitCode : ExitCode.failure;
      }
    }
    return code;
  },
};

/** Detaches one device, through its server if it lives, directly if not. */
export async function detachEntry(entry: RegistryEntry, force: boolean): Promise<void> {
  const record = entry.record;
  if (!entry.alive && !entry.supervisorAlive) {
    await cleanupDeadDevice(record);
    return;
  }
  if (!force) ensureNotBusy(record);
  let asked = false;
  if (entry.alive) {
    try {
      const reply = await controlRequest(
        record.socketPath,
        { cmd: "detach", force },
        DETACH_TIMEOUT_MS,
      );
      if (!reply.ok) {
        throw new UserError(
          `${record.blockPath}: the server refused to detach: ${reply.error ?? "no reason given"}`,
          ExitCode.failure,
        );
      }
      asked = true;
    } catch (e) {
      if (e instanceof UserError) throw e;
      // No socket or nobody listening: the server is alive but deaf. SIGTERM means detach too.
    }
  }
  if (!asked) {
    // SIGTERM means detach to both; a supervisor between two servers passes it on and cleans up.
    const target = entry.alive ? record.server : record.supervisor!;
    try {
      Deno.kill(target.pid, "SIGTERM");
    } catch {
      // Exited meanwhile.
    }
  }
  for (
    const [who, proc] of [["server", record.server], ["supervisor", record.supervisor]] as const
  ) {
    if (proc && !(await waitGone(proc, EXIT_TIMEOUT_MS))) {
      throw new UserError(
        `${record.blockPath}: the ${who} (pid ${proc.pid}) did not exit; see ${record.logPath}`,
        ExitCode.failure,
      );
    }
  }
  // A server that died half-way leaves its record (and maybe its device): finish its job.
  const left = readRecord(record.id);
  if (left && left.server.pid === record.server.pid) await cleanupDeadDevice(left);
}

/** Refuses a device that is (or whose partition is) mounted, claimed, or open by a process. */
function ensureNotBusy(record: DeviceRecord): void {
  const dev = record.blockPath;
  const numbers = blockDeviceNumbers(dev);
  if (numbers) {
    const points = mountPointsOf(numbers.major, numbers.minor);
    if (points.length > 0) {
      throw new UserError(
        `${dev} is mounted on ${points.join(", ")}: unmount it first (or detach --force)`,
        ExitCode.busy,
      );
    }
  }
  const partitions = partitionsOf(dev);
  for (const p of partitions) {
    const points = mountPointsOf(p.major, p.minor);
    if (points.length > 0) {
      throw new UserError(
        `${dev}: its partition ${p.devicePath} is mounted on ${points.join(", ")}: unmount it ` +
          `first (or detach --force)`,
        ExitCode.busy,
      );
    }
  }
  try {
    // O_EXCL on a block device fails with EBUSY while a filesystem, md, dm or another
    // exclusive opener holds it — including mounts in other mount namespaces.
    close(open(dev, O_RDONLY | O_EXCL));
  } catch (e) {
    if (e instanceof SyscallError && e.errno === EBUSY) {
      const holders = sysfsHolders(dev);
      throw new UserError(
        `${dev} is in use${holders ? ` by ${holders}` : " (held exclusively)"}: ` +
          `release it first (or detach --force)`,
        ExitCode.busy,
      );
    }
    if (!(e instanceof SyscallError)) throw e;
  }
  for (const node of [dev, ...partitions.map((p) => p.devicePath)]) {
    try {
      const s = Deno.statSync(node);
      const users = processesUsing({ dev: s.dev, ino: s.ino });
      if (users.length > 0) {
        throw new UserError(
          `${node} is open by ${users.join(", ")}: close it first (or detach --force)`,
          ExitCode.busy,
        );
      }
    } catch (e) {
      if (e instanceof UserError) throw e;
    }
  }
}

function sysfsHolders(dev: string): string {
  const name = dev.split("/").pop() ?? "";
  try {
    return [...Deno.readDirSync(`/sys/block/${name}/holders`)].map((h) => h.name).join(", ");
  } catch {
    return "";
  }
}

async function waitGone(server: ProcessRef, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(server)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
  return true;
}
