//! Which bytes of the file a device is, and in what sector size: `attach --offset`, `--sizelimit`
//! and `--sector-size`, as losetup's `-o`, `--sizelimit` and `-b`. The device is the file's
//! region [offset, offset + length), where the length is the rest of the file, or the size limit
//! when the file is longer; a `resize` moves the end as the file grows, never past the limit.
//! The engine adds the offset to every request in one place (`Request.readDescriptor`), so its
//! bounds, extent cache, fences and punches all work in file offsets and stay inside the region.
//!
//! Exit codes: a value malformed on its own (not a size, a sector size other than 512 or 4096) is
//! a usage error (2); a value that does not fit this file (an offset past its end, a region not
//! made of whole sectors, a sector size below the filesystem device's) is bad input (3).

import { fstat, fstatfs } from "../ffi/libc.ts";
import { UsageError, UserError } from "./errors.ts";

/** The sector sizes a device may have (`--sector-size`). */
export const SECTOR_SIZES: readonly number[] = [512, 4096];

/** A device's place in its file. */
export interface Layout {
  /** Where the device starts in the file. */
  offsetBytes: number;
  /** The most the device may span (0: up to the file's end, as losetup's 0). */
  sizeLimitBytes: number;
  /** The device's logical block size. */
  sectorBytes: number;
}

const UNITS: Record<string, number> = { K: 1, M: 2, G: 3, T: 4, P: 5 };

/**
 * A byte count as losetup and truncate write it: digits, optionally with K, M, G, T or P (powers
 * of 1024, also spelt KiB, MiB, …) or KB, MB, … (powers of 1000). undefined stays undefined.
 */
export function parseByteSize(
  command: string,
  flag: string,
  value: string | undefined,
): number | undefined {
  if (value === undefined) return undefined;
  const m = /^([0-9]+)(?:([KMGTP])(iB|B)?)?$/i.exec(value);
  if (!m || (m[3] !== undefined && m[3] !== "iB" && m[3].toUpperCase() !== "B")) {
    const shown = value.length > 64 ? `${value.length} characters` : JSON.stringify(value);
    throw new UsageError(
      `${command}: --${flag} must be a size in bytes such as 1048576, 1M or 4GiB, got ${shown}`,
    );
  }
  const power = m[2] ? UNITS[m[2].toUpperCase()]! : 0;
  const base = m[3]?.toUpperCase() === "B" ? 1000 : 1024;
  const n = Number(m[1]) * base ** power;
  if (!Number.isSafeInteger(n)) {
    throw new UsageError(`${command}: --${flag} is too large: ${value.slice(0, 64)}`);
  }
  return n;
}

/** `--sector-size`: 512 or 4096, as digits; undefined when not given. */
export function parseSectorSize(command: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = /^[0-9]{1,6}$/.test(value) ? Number(value) : NaN;
  if (!SECTOR_SIZES.includes(n)) {
    const shown = value.length > 64 ? `${value.length} characters` : JSON.stringify(value);
    throw new UsageError(
      `${command}: --sector-size must be ${SECTOR_SIZES.join(" or ")}, got ${shown}`,
    );
  }
  return n;
}

/**
 * The device's size for a file of `fileSizeBytes` (`name` is the file's quoted path): the
 * region's length, checked to start inside the file and to be whole sectors. One line, exit 3.
 */
export function regionLength(name: string, fileSizeBytes: number, layout: Layout): number {
  const { offsetBytes: offset, sizeLimitBytes: limit, sectorBytes: sector } = layout;
  if (offset % sector !== 0) {
    throw new UserError(
      `--offset ${offset} is not a multiple of the sector size (${sector} bytes)`,
    );
  }
  if (limit % sector !== 0) {
    throw new UserError(
      `--sizelimit ${limit} is not a multiple of the sector size (${sector} bytes)`,
    );
  }
  if (offset >= fileSizeBytes) {
    throw new UserError(
      `--offset ${offset} is past the end of ${name} (${fileSizeBytes} bytes)`,
    );
  }
  const length = growableLength(fileSizeBytes, layout);
  if (length % sector !== 0) {
    throw new UserError(
      offset === 0 && limit === 0
        ? `${name} is ${fileSizeBytes} bytes, not a multiple of ${sector} (extend it with ` +
          `truncate -s)`
        : `The region of ${name} from offset ${offset} is ${length} bytes, not a multiple of ` +
          `the sector size ${sector} (extend the file with truncate -s, or give --sizelimit)`,
    );
  }
  return length;
}

/**
 * What the region spans in a file of `fileSizeBytes`: the rest of the file from the offset, at
 * most the size limit (0 or less when the file ends before the offset). Not rounded to sectors.
 */
export function growableLength(fileSizeBytes: number, layout: Layout): number {
  const rest = fileSizeBytes - layout.offsetBytes;
  return layout.sizeLimitBytes > 0 ? Math.min(layout.sizeLimitBytes, rest) : rest;
}

/**
 * Refuses a sector size the file path cannot serve: O_DIRECT through the file needs IO aligned
 * to the logical block size of the filesystem's device, so a smaller device sector (a 512-byte
 * write on a 4096-byte disk) would fail. One line, exit 3.
 */
export function checkSectorSize(
  sectorBytes: number,
  device: { devicePath: string; logicalBlockSize: number } | null,
): void {
  if (device && sectorBytes < device.logicalBlockSize) {
    throw new UserError(
      `--sector-size ${sectorBytes} is below the logical block size of ${device.devicePath} ` +
        `(${device.logicalBlockSize} bytes), which IO through the file with O_DIRECT needs`,
    );
  }
}

/** The layout as `__server` takes it (every server of the device gets the same, `recover` too). */
export function layoutArgs(
  layout: { offsetBytes: number; sizeLimitBytes: number; sectorBytes?: number },
): string[] {
  const args = [
    "--offset",
    String(layout.offsetBytes),
    "--sizelimit",
    String(layout.sizeLimitBytes),
  ];
  if (layout.sectorBytes !== undefined) args.push("--sector-size", String(layout.sectorBytes));
  return args;
}

/**
 * How far a queue's IO may reach in the file: the device's end, and the file's size as last seen
 * (at most that end). IO ending past the size fails with EIO instead of re-growing a file someone
 * else truncated. The size is exact while the lease is held (a truncate breaks it first); without
 * the lease the engine looks it up again per request (`refresh`), and on taking it back.
 */
export class RegionBounds {
  /** The file offset where the device ends: its region's start + its size. */
  regionEnd: number;
  /** The file's size as last seen, at most `regionEnd`. */
  sizeBytes: number;
  readonly #fd: number;
  readonly #path: string;
  readonly #offsetBytes: number;

  constructor(fd: number, path: string, offsetBytes: number, deviceBytes: number) {
    this.#fd = fd;
    this.#path = path;
    this.#offsetBytes = offsetBytes;
    this.regionEnd = offsetBytes + deviceBytes;
    this.sizeBytes = this.regionEnd;
    this.refresh();
  }

  /** The device's new size (`fastloop resize`, which grows the file first); `refresh` follows. */
  setDeviceSize(deviceBytes: number): void {
    this.regionEnd = this.#offsetBytes + deviceBytes;
  }

  /** Looks the file's size up again; true when `sizeBytes` changed. */
  refresh(): boolean {
    let size: number;
    try {
      size = fstat(this.#fd, this.#path).size;
    } catch {
      return false; // fstat on an open fd does not fail in practice; keep the last size
    }
    const next = Math.min(this.regionEnd, size);
    if (next === this.sizeBytes) return false;
    this.sizeBytes = next;
    return true;
  }
}

/** The filesystem block size of the file (at least the device's logical block). */
export function filesystemBlockBytes(fd: number, path: string, logicalBlockBytes: number): number {
  try {
    return Math.max(logicalBlockBytes, fstatfs(fd, path).blockSize);
  } catch {
    // Not expected on an open fd; then the page size is the safe assumption for ext4/xfs.
    return Math.max(logicalBlockBytes, 4096);
  }
}
