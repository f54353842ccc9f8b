//! Block devices and filesystems under a file (`linux/fs.h` block ioctls, `linux/magic.h`):
//! file → the device its filesystem lives on (`st_dev` → major:minor → `/sys/dev/block/M:m` →
//! `/dev/NAME`), device size and sector sizes (`BLKGETSIZE64`, `BLKSSZGET`, `BLKPBSZGET`), a
//! partition table re-read (`BLKRRPART`), the filesystem type from the statfs magic, and
//! `FS_IOC_FSGETXATTR` (XFS realtime files).

import { ENOENT, SyscallError } from "./errno.ts";
import {
  close,
  devMajor,
  devMinor,
  fstat,
  fstatfs,
  ioctl,
  O_RDONLY,
  open,
  pathExists,
  S_IFBLK,
  S_IFMT,
} from "./libc.ts";

// linux/fs.h block device ioctls (type 0x12).
/** `_IOR(0x12, 114, size_t)`: device size in bytes into a `u64`. */
export const BLKGETSIZE64 = 0x80081272n;
/** `_IO(0x12, 104)`: logical block (sector) size into an `int`. */
export const BLKSSZGET = 0x1268n;
/** `_IO(0x12, 123)`: physical block size into an `unsigned int`. */
export const BLKPBSZGET = 0x127bn;
/** `_IO(0x12, 95)`: re-read the partition table (CAP_SYS_ADMIN; EBUSY while a partition is open). */
export const BLKRRPART = 0x125fn;

/** `_IOR('X', 31, struct fsxattr)`; sizeof(struct fsxattr) = 28. */
export const FS_IOC_FSGETXATTR = 0x801c581fn;
// struct fsxattr (28 bytes)
export const FSX_XFLAGS = 0; // __u32 fsx_xflags
export const FSXATTR_SIZE = 28;
/** fsx_xflags: the file's data lives on the XFS realtime device, not the data device. */
export const FS_XFLAG_REALTIME = 0x1;

/**
 * `_IOR('f', 1, long)`: the inode flags (`chattr`/`lsattr`). Named `long` for history, but the
 * kernel reads and writes an `int`.
 */
export const FS_IOC_GETFLAGS = 0x80086601n;
/** Inode flags that change where or how the data sits on the device. */
export const FS_COMPR_FL = 0x4; // compressed by the filesystem
export const FS_ENCRYPT_FL = 0x800; // fscrypt: the device holds ciphertext
export const FS_JOURNAL_DATA_FL = 0x4000; // ext3/4 data journaling for this file (chattr +j)

// linux/magic.h (and, for zfs and bcachefs, their own sources: they are out of tree).
export const EXT4_SUPER_MAGIC = 0xef53; // shared by ext2, ext3 and ext4
export const XFS_SUPER_MAGIC = 0x58465342;
export const BTRFS_SUPER_MAGIC = 0x9123683e;
export const TMPFS_MAGIC = 0x01021994;
export const RAMFS_MAGIC = 0x858458f6;
export const OVERLAYFS_SUPER_MAGIC = 0x794c7630;
export const NFS_SUPER_MAGIC = 0x6969;
export const FUSE_SUPER_MAGIC = 0x65735546;
export const ZFS_SUPER_MAGIC = 0x2fc12fc1;
export const F2FS_SUPER_MAGIC = 0xf2f52010;
export const BCACHEFS_SUPER_MAGIC = 0xca451a4e;

const FILESYSTEM_NAMES: Record<number, string> = {
  [EXT4_SUPER_MAGIC]: "ext4",
  [XFS_SUPER_MAGIC]: "xfs",
  [BTRFS_SUPER_MAGIC]: "btrfs",
  [TMPFS_MAGIC]: "tmpfs",
  [RAMFS_MAGIC]: "ramfs",
  [OVERLAYFS_SUPER_MAGIC]: "overlay",
  [NFS_SUPER_MAGIC]: "nfs",
  [FUSE_SUPER_MAGIC]: "fuse",
  [ZFS_SUPER_MAGIC]: "zfs",
  [F2FS_SUPER_MAGIC]: "f2fs",
  [BCACHEFS_SUPER_MAGIC]: "bcachefs",
  0xff534d42: "cifs",
  0xfe534d42: "smb2",
  0x01021997: "9p",
  0x73717368: "squashfs",
  0xe0f5e1e2: "erofs",
  0x4d44: "vfat",
  0x2011bab0: "exfat",
  0x5346544e: "ntfs",
  0x7366746e: "ntfs3",
  0x15013346: "udf",
  0x9660: "iso9660",
  0x3434: "nilfs2",
  0x7461636f: "ocfs2",
  0x00c36400: "ceph",
  0x47504653: "gpfs",
  0x52654973: "reiserfs",
  0x3153464a: "jfs",
};

export interface Filesystem {
  /** statfs `f_type`. */
  magic: number;
  /**
   * Name as the kernel calls it: from the statfs magic, refined by the mount table for the
   * ext family (ext2/ext3/ext4 share one magic); `unknown (0x…)` if neither knows it.
   */
  name: string;
  /** statfs `f_bsize`: the filesystem block size (the unit `filefrag` counts in). */
  blockSize: number;
  /** The superblock's mount options from /proc/self/mountinfo (`data=journal`, …), if found. */
  options: string[];
}

/** The filesystem `fd` lives on. */
export function filesystemOf(fd: number, path = `fd ${fd}`): Filesystem {
  const st = fstatfs(fd, path);
  const magic = st.type >>> 0;
  const { dev } = fstat(fd, path);
  const mount = mountOf(devMajor(dev), devMinor(dev));
  let name = FILESYSTEM_NAMES[magic] ?? `unknown (0x${magic.toString(16)})`;
  // The mount table tells the ext family apart; trust it only for the magic it agrees with.
  if (magic === EXT4_SUPER_MAGIC && mount?.type.startsWith("ext")) name = mount.type;
  return { magic, name, blockSize: st.blockSize, options: mount?.options ?? [] };
}

/** The fstype and superblock options in /proc/self/mountinfo of device `major:minor`. */
function mountOf(major: number, minor: number): { type: string; options: string[] } | undefined {
  let text: string;
  try {
    text = Deno.readTextFileSync("/proc/self/mountinfo");
  } catch {
    return undefined;
  }
  for (const line of text.split("\n")) {
    // "36 35 7:3 / /mnt rw,relatime shared:1 - ext4 /dev/loop3 rw,data=journal": after " - "
    // come the fstype, the source and the superblock options.
    const fields = line.split(" ");
    if (fields[2] !== `${major}:${minor}`) continue;
    const dash = fields.indexOf("-");
    if (dash < 0) continue;
    return { type: fields[dash + 1] ?? "", options: (fields[dash + 3] ?? "").split(",") };
  }
  return undefined;
}

export interface BackingDevice {
  /** `/dev/NAME`, checked to be the block device `major:minor`. */
  devicePath: string;
  /** Kernel name (`loop3`, `vda1`, `dm-0`). */
  name: string;
  major: number;
  minor: number;
  /** True for a partition: FIEMAP offsets are relative to it, which is what fastloop opens. */
  partition: boolean;
  sizeBytes: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
}

/**
 * The filesystem's block device cannot be found or opened: a fact for the caller to weigh (for
 * fastloop, a reason the direct path is off), not an error of the program. `errno` is the open's
 * when that is what failed (null when the device is not in /sys or /dev at all), so callers can
 * tell a container's EACCES from a missing node.
 */
export class BlockDeviceError extends Error {
  override name = "BlockDeviceError";
  constructor(message: string, readonly errno: number | null) {
    super(message);
  }
}

/**
 * The block device the filesystem of `fd` lives on. Throws `BlockDeviceError` when there is none
 * (tmpfs, overlayfs, NFS, FUSE, btrfs: their `st_dev` is an anonymous device number).
 */
export function backingDeviceOf(fd: number, path: string): BackingDevice {
  const { dev } = fstat(fd, path);
  const major = devMajor(dev);
  const minor = devMinor(dev);
  const sys = `/sys/dev/block/${major}:${minor}`;
  let uevent: string;
  try {
    uevent = Deno.readTextFileSync(`${sys}/uevent`);
  } catch {
    const fs = filesystemOf(fd, path).name;
    throw new BlockDeviceError(
      `${fs} has no block device: ${path} is on device ${major}:${minor}, which is not in ` +
        `/sys/dev/block`,
      null,
    );
  }
  const name = /^DEVNAME=(.+)$/m.exec(uevent)?.[1];
  if (name === undefined) {
    throw new BlockDeviceError(
      `Cannot name the block device ${major}:${minor} of ${path}: no DEVNAME`,
      null,
    );
  }
  const devicePath = `/dev/${name}`;
  const devFd = openBlockDevice(devicePath, major, minor);
  try {
    return {
      devicePath,
      name,
      major,
      minor,
      partition: pathExists(`${sys}/partition`),
      sizeBytes: blockDeviceSize(devFd, devicePath),
      logicalBlockSize: logicalBlockSize(devFd, devicePath),
      physicalBlockSize: physicalBlockSize(devFd, devicePath),
    };
  } finally {
    close(devFd);
  }
}

/**
 * Opens `devicePath` read-only and checks it really is block device `major:minor` — a stale or
 * hand-made `/dev` entry must never be mistaken for the filesystem's device.
 */
function openBlockDevice(devicePath: string, major: number, minor: number): number {
  let fd: number;
  try {
    fd = open(devicePath, O_RDONLY);
  } catch (e) {
    if (e instanceof SyscallError && e.errno === ENOENT) {
      throw new BlockDeviceError(
        `Block device ${devicePath} (${major}:${minor}) is missing from /dev`,
        ENOENT,
      );
    }
    if (e instanceof SyscallError) {
      // EPERM/EACCES: not root, or a container that hides the host's disks.
      throw new BlockDeviceError(
        `Cannot open the filesystem's block device: ${e.message}`,
        e.errno,
      );
    }
    throw e;
  }
  const st = fstat(fd, devicePath);
  if (
    (st.mode & S_IFMT) !== S_IFBLK || devMajor(st.rdev) !== major || devMinor(st.rdev) !== minor
  ) {
    close(fd);
    throw new BlockDeviceError(
      `${devicePath} is not block device ${major}:${minor}`,
      null,
    );
  }
  return fd;
}

/** `BLKGETSIZE64` of an open block device. */
export function blockDeviceSize(fd: number, object = `fd ${fd}`): number {
  const out = new BigUint64Array(1);
  ioctl(fd, BLKGETSIZE64, Deno.UnsafePointer.of(out), "BLKGETSIZE64", object);
  return Number(out[0]);
}

/** `BLKSSZGET`: the smallest unit the device addresses (O_DIRECT alignment). */
export function logicalBlockSize(fd: number, object = `fd ${fd}`): number {
  const out = new Int32Array(1);
  ioctl(fd, BLKSSZGET, Deno.UnsafePointer.of(out), "BLKSSZGET", object);
  return out[0]!;
}

/** `BLKPBSZGET`: the device's atomic write unit. */
export function physicalBlockSize(fd: number, object = `fd ${fd}`): number {
  const out = new Uint32Array(1);
  ioctl(fd, BLKPBSZGET, Deno.UnsafePointer.of(out), "BLKPBSZGET", object);
  return out[0]!;
}

/** `BLKRRPART` on an open whole disk: the kernel reads its partition table again. */
export function rereadPartitions(fd: number, object = `fd ${fd}`): void {
  ioctl(fd, BLKRRPART, null, "BLKRRPART", object);
}

/** `FS_IOC_GETFLAGS`: the inode flags (`FS_*_FL`); throws on filesystems without it (ENOTTY). */
export function inodeFlags(fd: number, object = `fd ${fd}`): number {
  const out = new Uint32Array(2); // room for a long, in case a kernel ever writes one
  ioctl(fd, FS_IOC_GETFLAGS, Deno.UnsafePointer.of(out), "FS_IOC_GETFLAGS", object);
  return out[0]!;
}

/** `FS_IOC_FSGETXATTR` `fsx_xflags` (`FS_XFLAG_*`); throws on filesystems without it (ENOTTY). */
export function fsxattrFlags(fd: number, object = `fd ${fd}`): number {
  const buf = new Uint8Array(FSXATTR_SIZE);
  ioctl(fd, FS_IOC_FSGETXATTR, Deno.UnsafePointer.of(buf), "FS_IOC_FSGETXATTR", object);
  return new DataView(buf.buffer).getUint32(FSX_XFLAGS, true);
}
