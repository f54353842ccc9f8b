//! Resizing a live device (`fastloop resize`, like `losetup -c`), run by its server, which owns
//! the file: the device takes its region's new length (the rest of the file from the offset, at
//! most the size limit), or, asked for a size, the file is first grown to hold it with ftruncate
//! on the server's own fd. That fd holds the lease, and the kernel breaks a lease only for
//! another opener, so the direct path stays on; the new tail is a hole (read as zeros, written
//! through the file, which allocates it). The queues learn the size before the kernel does
//! (`Device.resize`: the mailbox, then UBLK_U_CMD_UPDATE_SIZE), so no request past what they
//! serve can arrive. A device never shrinks here: shrinking would have to drain and fail IO
//! that the kernel already accepted, and a file that shrank below its device is a mistake to
//! report, not to follow. Every refusal changes nothing and is one line with an exit code.

import { fstat, ftruncate } from "../ffi/libc.ts";
import { hasFeature, UBLK_F_UPDATE_SIZE } from "../ffi/ublk_cmd.ts";
import type { Device } from "./device.ts";
import { ExitCode } from "./errors.ts";
import { log } from "./log.ts";
import { growableLength, type Layout } from "./region.ts";
import { quotePath } from "./registry.ts";

export interface ResizeContext {
  device: Device;
  /** The server's fd of the file (O_RDWR for a read-write device), the one the lease is on. */
  fileFd: number;
  filePath: string;
  readOnly: boolean;
  layout: Layout;
  deviceSizeBytes: number;
}

export type ResizeReply =
  | { ok: true; device: string; fromBytes: number; sizeBytes: number }
  | { ok: false; error: string; exitCode: number };

/** Resizes `ctx.device` to its region's length, or to `sizeBytes` (growing the file first). */
export async function resizeDevice(ctx: ResizeContext, sizeBytes: unknown): Promise<ResizeReply> {
  const { device, layout } = ctx;
  const refuse = (error: string, exitCode: number = ExitCode.badInput): ResizeReply => {
    log(`resize refused: ${error}`);
    return { ok: false, error, exitCode };
  };
  if (!hasFeature(device.features, UBLK_F_UPDATE_SIZE)) {
    return refuse(
      `Resizing a live device needs UBLK_F_UPDATE_SIZE, which Linux 6.16 and later have ` +
        `(this is Linux ${kernelRelease()})`,
      ExitCode.unsupported,
    );
  }
  const name = quotePath(ctx.filePath);
  const from = ctx.deviceSizeBytes;
  const { offsetBytes: offset, sizeLimitBytes: limit, sectorBytes: sector } = layout;
  const fileSize = fstat(ctx.fileFd, ctx.filePath).size;
  let to: number;
  if (sizeBytes !== undefined) {
    if (typeof sizeBytes !== "number" || !Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
      return refuse(`Invalid size ${JSON.stringify(sizeBytes)}`, ExitCode.usage);
    }
    to = sizeBytes;
    if (to % sector !== 0) {
      return refuse(`--size ${to} is not a multiple of the sector size (${sector} bytes)`);
    }
    if (to < from) {
      return refuse(
        `--size ${to} is below the device's size (${from} bytes): resize only grows a device`,
      );
    }
    if (limit > 0 && to > limit) {
      return refuse(`--size ${to} is past the device's --sizelimit (${limit} bytes)`);
    }
    if (offset + to > fileSize) {
      if (ctx.readOnly) {
        return refuse(`the device is read-only: fastloop does not grow ${name} for it`);
      }
      ftruncate(ctx.fileFd, offset + to, ctx.filePath);
      log(
        `grew ${ctx.filePath} from ${fileSize} to ${offset + to} bytes (own fd: the lease holds)`,
      );
    }
  } else {
    to = growableLength(fileSize, layout);
    if (to < from) {
      return refuse(
        `${name} is ${fileSize} bytes: the device (${from} bytes from offset ${offset}) no ` +
          `longer fits in it; nothing changed`,
      );
    }
    if (to % sector !== 0) {
      return refuse(
        `the region of ${name} from offset ${offset} is ${to} bytes, not a multiple of the ` +
          `sector size ${sector} (extend the file with truncate -s)`,
      );
    }
  }
  if (to !== from) {
    await device.resize(to);
    log(`resized ${device.blockPath} from ${from} to ${to} bytes`);
  }
  return { ok: true, device: device.blockPath, fromBytes: from, sizeBytes: to };
}

/** The running kernel's release (`uname -r`), for messages. */
function kernelRelease(): string {
  try {
    return Deno.readTextFileSync("/proc/sys/kernel/osrelease").trim();
  } catch {
    return "(unknown release)";
  }
}
