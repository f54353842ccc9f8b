//! A device's partitions (`attach --partscan`, like `losetup -P`): the kernel's view of them
//! from /sys/block, and the scan itself. On Linux 7.0 and later fastloop creates every device
//! with UBLK_F_NO_AUTO_PART_SCAN, so nothing is read in START_DEV (a server dying during that
//! scan would hang its own start), and `--partscan` asks with BLKRRPART once the device is live;
//! older kernels scan every new device in START_DEV whatever the server asks. The partitions go
//! with the device when it is deleted; `detach` refuses while one is mounted
//! (lib/commands/detach.ts).

import { close, O_RDONLY, open, pathExists } from "../ffi/libc.ts";
import { rereadPartitions } from "../ffi/blkdev.ts";

export interface Partition {
  /** Kernel name (`ublkb0p1`). */
  name: string;
  devicePath: string;
  major: number;
  minor: number;
  /** Start and length on the disk, in 512-byte sectors (sysfs `start`, `size`). */
  startSectors: number;
  sizeSectors: number;
}

/** The partitions the kernel knows of the disk `/dev/NAME`, in order, from /sys/block/NAME. */
export function partitionsOf(blockPath: string): Partition[] {
  const disk = blockPath.replace(/^\/dev\//, "");
  const sys = `/sys/block/${disk}`;
  const found: Partition[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(sys)];
  } catch {
    return found; // no such disk (any more)
  }
  for (const e of entries) {
    if (!e.name.startsWith(disk) || !pathExists(`${sys}/${e.name}/partition`)) continue;
    try {
      const read = (f: string) => Deno.readTextFileSync(`${sys}/${e.name}/${f}`).trim();
      const [major, minor] = read("dev").split(":").map(Number);
      found.push({
        name: e.name,
        devicePath: `/dev/${e.name}`,
        major: major!,
        minor: minor!,
        startSectors: Number(read("start")),
        sizeSectors: Number(read("size")),
      });
    } catch {
      // Removed while we read it.
    }
  }
  const index = (p: Partition) => Number(/([0-9]+)$/.exec(p.name)?.[1] ?? 0);
  return found.sort((a, b) => index(a) - index(b));
}

/**
 * Reads the partition table of a live device (BLKRRPART, served by its own queues) when the
 * kernel did not at start (`scanned`: false), then waits for each partition's /dev node.
 */
export async function scanPartitions(blockPath: string, scanned: boolean): Promise<Partition[]> {
  if (!scanned) {
    const fd = open(blockPath, O_RDONLY);
    try {
      rereadPartitions(fd, blockPath);
    } finally {
      close(fd);
    }
  }
  const parts = partitionsOf(blockPath);
  // devtmpfs makes the nodes a moment after the kernel adds the partitions.
  for (const p of parts) {
    for (let i = 0; i < 250 && !pathExists(p.devicePath); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  return parts;
}
