// The block device and filesystem found under a file, checked against util-linux's view
// (`findmnt`, `losetup`, `blockdev`), and the eligibility policy on real filesystems: ext4,
// xfs (data device and realtime), tmpfs, overlayfs.

import assert from "node:assert/strict";
import { backingDeviceOf, BlockDeviceError, filesystemOf } from "../../ffi/blkdev.ts";
import { close, O_RDONLY, open } from "../../ffi/libc.ts";
import { dataLayoutProblem, filesystemEligibility } from "../../lib/eligibility.ts";
import { FS_COMPR_FL, FS_ENCRYPT_FL, FS_JOURNAL_DATA_FL } from "../../ffi/blkdev.ts";
import {
  type FsKind,
  hasCommand,
  isRoot,
  run,
  testDir,
  withFilesystem,
  withTmpfs,
  writeAt,
  xfsRealtimeSupported,
} from "./fs_fixtures.ts";

const root = isRoot();
const xfsRealtime = await xfsRealtimeSupported();
const overlay = root && await filesystemAvailable("overlay");
if (root && !overlay) console.log("skip: this kernel has no overlay filesystem");

/** Is `fs` in /proc/filesystems (after asking modprobe to load it, where there is one)? */
async function filesystemAvailable(fs: string): Promise<boolean> {
  if (await hasCommand("modprobe")) await run("modprobe", ["-q", fs], { allowFail: true });
  const list = await Deno.readTextFile("/proc/filesystems");
  return list.split("\n").some((line) => line.split("\t").at(-1) === fs);
}
if (root && !xfsRealtime) {
  console.log("skip: this kernel cannot mount xfs with a realtime device (CONFIG_XFS_RT)");
}

function withFd<T>(path: string, fn: (fd: number) => T): T {
  const fd = open(path, O_RDONLY);
  try {
    return fn(fd);
  } finally {
    close(fd);
  }
}

async function findmnt(dir: string, column: string): Promise<string> {
  return (await run("findmnt", ["-no", column, "--target", dir])).stdout.trim();
}

async function blockdev(flag: string, device: string): Promise<number> {
  return Number((await run("blockdev", [flag, device])).stdout.trim());
}

for (
  const [kind, sectorSize] of [["ext4", 512], ["xfs", 512], ["xfs", 4096], ["ext4", 4096]] as [
    FsKind,
    number,
  ][]
) {
  Deno.test({
    name: `backingDeviceOf() on ${kind} over a ${sectorSize}-byte-sector loop device matches ` +
      `findmnt, losetup and blockdev`,
    ignore: !root,
    async fn() {
      await withFilesystem(kind, { sectorSize }, async (fs) => {
        const path = `${fs.dir}/file`;
        await writeAt(path, 0, new Uint8Array(8192).fill(1));
        const dev = withFd(path, (fd) => backingDeviceOf(fd, path));
        const fsName = withFd(path, (fd) => filesystemOf(fd, path));

        assert.equal(dev.devicePath, await findmnt(fs.dir, "SOURCE"));
        assert.equal(`${dev.major}:${dev.minor}`, await findmnt(fs.dir, "MAJ:MIN"));
        assert.equal(fsName.name, await findmnt(fs.dir, "FSTYPE"));
        const attached = (await run("losetup", ["-j", fs.image])).stdout;
        assert.ok(attached.startsWith(`${dev.devicePath}:`), `losetup -j: ${attached}`);
        assert.equal(dev.partition, false);
        assert.equal(dev.sizeBytes, await blockdev("--getsize64", fs.device));
        assert.equal(dev.logicalBlockSize, await blockdev("--getss", fs.device));
        assert.equal(dev.physicalBlockSize, await blockdev("--getpbsz", fs.device));
        assert.equal(dev.logicalBlockSize, sectorSize);

        const e = withFd(path, (fd) => filesystemEligibility(fd, path));
        assert.equal(e.eligible, true, e.reason);
        assert.equal(e.filesystem, kind);
        assert.equal(e.device?.devicePath, fs.device);
      });
    },
  });
}

Deno.test({
  name: "filesystemOf() tells ext2 from ext4 (one statfs magic) as findmnt does",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", { mkfsArgs: ["-t", "ext2"] }, async (fs) => {
      const name = withFd(fs.dir, (fd) => filesystemOf(fd, fs.dir).name);
      assert.equal(name, await findmnt(fs.dir, "FSTYPE"));
      assert.equal(name, "ext2");
      const path = `${fs.dir}/file`;
      await writeAt(path, 0, new Uint8Array(4096));
      assert.equal(withFd(path, (fd) => filesystemEligibility(fd, path)).eligible, true);
    });
  },
});

Deno.test({
  name: "a tmpfs file has no block device and is not eligible, with the reason",
  ignore: !root,
  async fn() {
    await withTmpfs(async (dir) => {
      const path = `${dir}/file`;
      await Deno.writeTextFile(path, "data");
      withFd(path, (fd) => {
        assert.equal(filesystemOf(fd, path).name, "tmpfs");
        assert.throws(() => backingDeviceOf(fd, path), (e: unknown) => {
          assert.ok(e instanceof BlockDeviceError);
          assert.match(e.message, /^tmpfs has no block device: /);
          return true;
        });
        const e = filesystemEligibility(fd, path);
        assert.equal(e.eligible, false);
        assert.equal(e.filesystem, "tmpfs");
        assert.match(e.reason ?? "", /tmpfs keeps file data in memory/);
      });
    });
  },
});

Deno.test({
  name: "an overlayfs file is not eligible, with the reason",
  ignore: !overlay,
  async fn() {
    const dir = await Deno.makeTempDir({ dir: testDir(), prefix: "fastloop-overlay-" });
    let mounted = false;
    try {
      for (const d of ["lower", "upper", "work", "mnt"]) await Deno.mkdir(`${dir}/${d}`);
      await Deno.writeTextFile(`${dir}/lower/file`, "lower data");
      await run("mount", [
        "-t",
        "overlay",
        "overlay",
        "-o",
        `lowerdir=${dir}/lower,upperdir=${dir}/upper,workdir=${dir}/work`,
        `${dir}/mnt`,
      ]);
      mounted = true;
      const path = `${dir}/mnt/file`;
      const e = withFd(path, (fd) => filesystemEligibility(fd, path));
      assert.equal(e.eligible, false);
      assert.equal(e.filesystem, await findmnt(`${dir}/mnt`, "FSTYPE"));
      assert.match(e.reason ?? "", /^overlayfs: /);
    } finally {
      if (mounted) await run("umount", [`${dir}/mnt`], { allowFail: true });
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "an xfs realtime file is not eligible; a data-device file on the same xfs is",
  ignore: !xfsRealtime || !(await hasCommand("xfs_io")),
  async fn() {
    await withFilesystem("xfs", { xfsRealtimeMiB: 64 }, async (fs) => {
      const rt = `${fs.dir}/realtime`;
      const data = `${fs.dir}/data`;
      // The realtime flag can only be set while the file has no extents: set it, then write.
      await run("xfs_io", ["-f", "-c", "chattr +r", "-c", "pwrite -q 0 64k", "-c", "fsync", rt]);
      assert.match((await run("xfs_io", ["-c", "lsattr", rt])).stdout, /r/);
      await writeAt(data, 0, new Uint8Array(65536).fill(7));
      const rtE = withFd(rt, (fd) => filesystemEligibility(fd, rt));
      assert.equal(rtE.eligible, false);
      assert.match(rtE.reason ?? "", /^xfs realtime file/);
      const dataE = withFd(data, (fd) => filesystemEligibility(fd, data));
      assert.equal(dataE.eligible, true, dataE.reason);
    });
  },
});

Deno.test({
  name: "ext4 mounted with data=journal is not eligible; the same ext4 in ordered mode is",
  ignore: !root,
  async fn() {
    for (const [options, eligible] of [[["data=journal"], false], [[], true]] as const) {
      await withFilesystem("ext4", { mountOptions: [...options] }, async (fs) => {
        const path = `${fs.dir}/file`;
        await writeAt(path, 0, new Uint8Array(65536).fill(3));
        const e = withFd(path, (fd) => filesystemEligibility(fd, path));
        assert.equal(e.eligible, eligible, `${options}: ${e.reason}`);
        if (!eligible) assert.match(e.reason ?? "", /mounted with data=journal/);
        // findmnt agrees on what the superblock was mounted with.
        assert.equal((await findmnt(fs.dir, "FS-OPTIONS")).includes("data=journal"), !eligible);
      });
    }
  },
});

/** `chattr +j` needs CAP_SYS_RESOURCE (bit 24), which containers often drop even for root. */
function hasCapSysResource(): boolean {
  const status = Deno.readTextFileSync("/proc/self/status");
  const eff = /^CapEff:\s*([0-9a-f]+)$/m.exec(status)?.[1];
  return eff !== undefined && (BigInt(`0x${eff}`) & (1n << 24n)) !== 0n;
}
const canJournalData = root && hasCapSysResource() && await hasCommand("chattr");
if (root && !canJournalData) console.log("skip: chattr +j needs CAP_SYS_RESOURCE and chattr");

Deno.test({
  name: "an ext4 file with data journaling (chattr +j) is not eligible; its neighbour is",
  ignore: !canJournalData,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const journaled = `${fs.dir}/journaled`;
      const plain = `${fs.dir}/plain`;
      await writeAt(journaled, 0, new Uint8Array(65536).fill(4));
      await writeAt(plain, 0, new Uint8Array(65536).fill(5));
      await run("chattr", ["+j", journaled]);
      assert.match((await run("lsattr", [journaled])).stdout, /j/);
      const j = withFd(journaled, (fd) => filesystemEligibility(fd, journaled));
      assert.equal(j.eligible, false);
      assert.match(j.reason ?? "", /chattr \+j/);
      assert.equal(withFd(plain, (fd) => filesystemEligibility(fd, plain)).eligible, true);
    });
  },
});

Deno.test("dataLayoutProblem() refuses encrypted, compressed and journaled data", () => {
  assert.match(dataLayoutProblem("ext4", [], FS_ENCRYPT_FL) ?? "", /encrypted \(fscrypt\)/);
  assert.match(dataLayoutProblem("ext4", [], FS_COMPR_FL) ?? "", /compressed/);
  assert.match(dataLayoutProblem("ext4", [], FS_JOURNAL_DATA_FL) ?? "", /chattr \+j/);
  assert.match(dataLayoutProblem("ext4", ["rw", "data=journal"], 0) ?? "", /data=journal/);
  assert.equal(dataLayoutProblem("ext4", ["rw", "data=ordered"], 0x80000 /* extents */), undefined);
});
