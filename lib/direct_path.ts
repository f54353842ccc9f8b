//! Whether the direct path can open the filesystem's own block device, and when it cannot, why:
//! a stable code (`directPathOff` in `stat --json` and `map --json`) and one line naming the cause
//! and its fix, for `stat`, `map`, `doctor` and the server's log.
//!
//! Causes are told apart by the open's errno and by what the kernel says around it. Since 6.8 a
//! kernel built with CONFIG_BLK_DEV_WRITE_MOUNTED=n, or booted with bdev_allow_write_mounted=0,
//! fails with EBUSY every open for writing of a mounted filesystem's device (reads still open).
//! That setting is a boot parameter (`__setup` in block/bdev.c), not a module parameter: there is
//! no /sys/module/block/parameters/bdev_allow_write_mounted (checked on Debian 6.12 and 7.3), so
//! it is read from /proc/cmdline, else from the kernel config. EBUSY on a device nobody has
//! mounted, or held by a stacking driver (/sys/dev/block/M:m/holders), is another cause.

import { EACCES, EBUSY, ENODEV, ENOENT, ENXIO, EPERM, SyscallError } from "../ffi/errno.ts";
import {
  close,
  devMajor,
  devMinor,
  fstat,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  open,
  S_IFBLK,
  S_IFMT,
} from "../ffi/libc.ts";
import type { Eligibility } from "./eligibility.ts";

/** Why the direct path is off: stable names for `--json` and scripts. */
export const DirectPathOff = {
  /** The filesystem, or this file's layout on it, does not allow direct access. */
  filesystemNotEligible: "filesystem-not-eligible",
  /** The kernel refuses to open a mounted filesystem's device for writing. */
  bdevWriteMountedRefused: "bdev-write-mounted-refused",
  /** EBUSY for another reason: a driver (dm, md, …) or another user holds the device. */
  deviceBusy: "device-busy",
  /** EACCES/EPERM: not root, or a container, device cgroup or security module denies it. */
  devicePermissionDenied: "device-permission-denied",
  /** No such device: not in /sys/dev/block, no /dev node, or gone (ENOENT, ENXIO, ENODEV). */
  deviceMissing: "device-missing",
  /** Any other open failure (its errno is in the reason). */
  deviceOpenFailed: "device-open-failed",
} as const;
export type DirectPathOff = (typeof DirectPathOff)[keyof typeof DirectPathOff];

/** What to change when the kernel refuses writes to mounted filesystems' devices. */
export const WRITE_MOUNTED_FIX = "boot with bdev_allow_write_mounted=1, or use a kernel built " +
  "with CONFIG_BLK_DEV_WRITE_MOUNTED=y";

/** The kernel's bdev_allow_write_mounted as far as it can be known from user space. */
export interface WriteMountedSetting {
  /** true: mounted filesystems' devices open for writing; false: refused; null: unknown. */
  allowed: boolean | null;
  /** Where the answer comes from, in words ("bdev_allow_write_mounted=0 on the kernel …"). */
  source: string;
}

const PARAM = "bdev_allow_write_mounted";
const CONFIG = "CONFIG_BLK_DEV_WRITE_MOUNTED";

/** lib/kstrtox.c kstrtobool(): how the kernel reads a boolean boot parameter. */
export function kstrtobool(s: string): boolean | undefined {
  const c = s.charAt(0);
  if (c !== "" && "eEyYtT1".includes(c)) return true;
  if (c !== "" && "dDnNfF0".includes(c)) return false;
  if (c === "o" || c === "O") {
    const d = s.charAt(1).toLowerCase();
    if (d === "n") return true;
    if (d === "f") return false;
  }
  return undefined;
}

/**
 * The setting from the kernel command line (`/proc/cmdline`) and the kernel config text (with
 * the path it was read from), either of which may be missing. The command line wins: the config
 * only gives the built-in default. Pure: tests feed it text.
 */
export function writeMountedSetting(
  cmdline: string | null,
  config: { path: string; text: string } | null,
): WriteMountedSetting {
  let fromCmdline: boolean | undefined;
  let token = "";
  // Each occurrence is applied in order, so the last valid one counts; words after "--" are
  // init's, not the kernel's.
  for (const word of (cmdline ?? "").trim().split(/\s+/)) {
    if (word === "--") break;
    if (!word.startsWith(`${PARAM}=`)) continue;
    const v = kstrtobool(word.slice(PARAM.length + 1));
    if (v !== undefined) {
      fromCmdline = v;
      token = word;
    }
  }
  if (fromCmdline !== undefined) {
    return { allowed: fromCmdline, source: `${token} on the kernel command line` };
  }
  if (config !== null) {
    if (new RegExp(`^${CONFIG}=y$`, "m").test(config.text)) {
      return { allowed: true, source: `${CONFIG}=y in ${config.path}` };
    }
    if (new RegExp(`^# ${CONFIG} is not set$`, "m").test(config.text)) {
      return { allowed: false, source: `${CONFIG} is not set in ${config.path}` };
    }
    if (/^CONFIG_BLOCK=y$/m.test(config.text)) {
      // The option came with the restriction (6.8): a kernel without it never refuses.
      return { allowed: true, source: `${config.path} has no ${CONFIG} (a kernel before 6.8)` };
    }
  }
  return {
    allowed: null,
    source: `not on the kernel command line, and no kernel config found (/boot/config-*, ` +
      `/lib/modules/*/config, /proc/config.gz)`,
  };
}

function readText(path: string): string | null {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return null;
  }
}

/** The kernel config of the running kernel, where distributions put it. */
async function kernelConfig(release: string): Promise<{ path: string; text: string } | null> {
  for (const path of [`/boot/config-${release}`, `/lib/modules/${release}/config`]) {
    const text = readText(path);
    if (text !== null) return { path, text };
  }
  try {
    // CONFIG_IKCONFIG_PROC; DecompressionStream, not node:zlib, whose import costs every command.
    const gz = await Deno.readFile("/proc/config.gz");
    const stream = new Blob([gz]).stream().pipeThrough(new DecompressionStream("gzip"));
    return { path: "/proc/config.gz", text: await new Response(stream).text() };
  } catch {
    return null;
  }
}

/** The running kernel's bdev_allow_write_mounted (command line, else config default). */
export async function readWriteMountedSetting(
  release = Deno.osRelease(),
): Promise<WriteMountedSetting> {
  const cmdline = readText("/proc/cmdline");
  const quick = writeMountedSetting(cmdline, null);
  if (quick.allowed !== null) return quick;
  return writeMountedSetting(cmdline, await kernelConfig(release));
}

/** What surrounded a failed open of the filesystem's device, as `classifyDeviceOpenFailure` needs. */
export interface DeviceOpenFailure {
  devicePath: string;
  /** errno of open(2). */
  errno: number;
  /** The open asked for write access (a read-write attach, or `map`'s probe). */
  write: boolean;
  writeMounted: WriteMountedSetting;
  /** Where the device is mounted (mountinfo); empty when nowhere. */
  mountPoints: string[];
  /** Drivers holding the device (/sys/dev/block/M:m/holders: dm-0, md127, …). */
  holders: string[];
}

export interface DirectPathVerdict {
  code: DirectPathOff;
  /** One line: the cause, the evidence (errno, mount, setting) and the fix where there is one. */
  reason: string;
}

/** Why opening the device failed. Pure: tests feed it errno and what /proc and /sys said. */
export function classifyDeviceOpenFailure(f: DeviceOpenFailure): DirectPathVerdict {
  const dev = f.devicePath;
  const how = f.write ? "for writing" : "for reading";
  const call = new SyscallError("open", f.errno, dev).message;
  const mounted = f.mountPoints.length > 0
    ? `${dev} is mounted on ${f.mountPoints.map((m) => JSON.stringify(m)).join(", ")}`
    : "";
  if (f.errno === EBUSY && f.write && mounted && f.writeMounted.allowed !== true) {
    const setting = f.writeMounted.allowed === false
      ? f.writeMounted.source
      : `its setting could not be read: ${f.writeMounted.source}`;
    return {
      code: DirectPathOff.bdevWriteMountedRefused,
      reason: `the kernel refuses to open a mounted filesystem's device for writing (${call}; ` +
        `${mounted}; ${setting}): ${WRITE_MOUNTED_FIX}`,
    };
  }
  const code = openErrnoCode(f.errno);
  switch (code) {
    case DirectPathOff.deviceBusy: {
      const who = f.holders.length > 0
        ? `it is held by ${f.holders.join(", ")} (device mapper, md or another stacking driver)`
        : f.writeMounted.allowed === true && mounted
        ? `${mounted}, which the kernel allows (${f.writeMounted.source}), so another user ` +
          "holds it exclusively"
        : "another user holds it exclusively";
      return { code, reason: `${dev} is busy ${how}: ${who} (${call})` };
    }
    case DirectPathOff.devicePermissionDenied:
      return {
        code,
        reason: `not permitted to open ${dev} ${how} (${call}): not root, or a container, ` +
          "device cgroup or security module denies access to the device",
      };
    case DirectPathOff.deviceMissing:
      return { code, reason: `${dev} is missing or gone (${call})` };
    default:
      return { code, reason: `cannot open ${dev} ${how} (${call})` };
  }
}

/** The code for an open that failed with `errno`, when nothing else is known about it. */
export function openErrnoCode(errno: number): DirectPathOff {
  if (errno === EBUSY) return DirectPathOff.deviceBusy;
  if (errno === EACCES || errno === EPERM) return DirectPathOff.devicePermissionDenied;
  if (errno === ENOENT || errno === ENXIO || errno === ENODEV) return DirectPathOff.deviceMissing;
  return DirectPathOff.deviceOpenFailed;
}

/** Where block device `major:minor` is mounted, from /proc/self/mountinfo (octal escapes undone). */
export function mountPointsOf(major: number, minor: number): string[] {
  const text = readText("/proc/self/mountinfo") ?? "";
  const points: string[] = [];
  for (const line of text.split("\n")) {
    const fields = line.split(" ");
    if (fields[2] !== `${major}:${minor}` || fields[4] === undefined) continue;
    points.push(fields[4].replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8))));
  }
  return points;
}

function holdersOf(major: number, minor: number): string[] {
  try {
    return [...Deno.readDirSync(`/sys/dev/block/${major}:${minor}/holders`)].map((e) => e.name)
      .sort();
  } catch {
    return [];
  }
}

/** The result of opening the filesystem's device for the direct path. */
export type DirectOpen =
  | { fd: number; devicePath: string }
  | { fd: null; code: DirectPathOff; reason: string };

/**
 * Opens the eligible filesystem's device with O_DIRECT, read-write unless `readOnly`, or says
 * why the direct path is off (also when the filesystem is not eligible).
 */
export async function openDirectDevice(e: Eligibility, readOnly: boolean): Promise<DirectOpen> {
  if (!e.eligible || e.device === undefined) {
    return {
      fd: null,
      code: e.directPathOff ?? DirectPathOff.filesystemNotEligible,
      reason: e.reason ?? `${e.filesystem} is not eligible`,
    };
  }
  const { devicePath, major, minor } = e.device;
  let fd: number;
  try {
    fd = open(devicePath, (readOnly ? O_RDONLY : O_RDWR) | O_DIRECT);
  } catch (err) {
    if (!(err instanceof SyscallError)) throw err;
    return {
      fd: null,
      ...classifyDeviceOpenFailure({
        devicePath,
        errno: err.errno,
        write: !readOnly,
        writeMounted: await readWriteMountedSetting(),
        mountPoints: mountPointsOf(major, minor),
        holders: holdersOf(major, minor),
      }),
    };
  }
  // Eligibility checked that the node is major:minor; it must still be, or IO would go elsewhere.
  const st = fstat(fd, devicePath);
  if (
    (st.mode & S_IFMT) !== S_IFBLK || devMajor(st.rdev) !== major || devMinor(st.rdev) !== minor
  ) {
    close(fd);
    return {
      fd: null,
      code: DirectPathOff.deviceMissing,
      reason: `${devicePath} is no longer block device ${major}:${minor}`,
    };
  }
  return { fd, devicePath };
}

/**
 * `map`'s question: can a read-write attach open this eligible filesystem's device? Opens it
 * the way the server would (O_RDWR | O_DIRECT) and closes it at once; nothing is written.
 */
export async function probeDirectWrite(
  e: Eligibility,
): Promise<{ writable: true } | { writable: false; code: DirectPathOff; reason: string }> {
  const r = await openDirectDevice(e, false);
  if (r.fd === null) return { writable: false, code: r.code, reason: r.reason };
  close(r.fd);
  return { writable: true };
}
