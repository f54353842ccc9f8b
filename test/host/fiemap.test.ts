// FIEMAP on real ext4 and xfs filesystems (kernel loop devices), checked against `filefrag -v`,
// against O_DIRECT reads of the loop device at the reported physical offsets, and the ABI
// constants against the installed kernel headers compiled by a C compiler.

import assert from "node:assert/strict";
import * as fiemapAbi from "../../ffi/fiemap.ts";
import {
  extentFlagNames,
  fiemap,
  FIEMAP_EXTENT_SHARED,
  FIEMAP_EXTENT_UNWRITTEN,
  type FiemapExtent,
} from "../../ffi/fiemap.ts";
import * as blkdevAbi from "../../ffi/blkdev.ts";
import * as fcntlAbi from "../../ffi/fcntl.ts";
import { SyscallError } from "../../ffi/errno.ts";
import { close, O_RDONLY, open } from "../../ffi/libc.ts";
import { classifyExtent, ExtentKind, ExtentReason } from "../../lib/eligibility.ts";
import {
  filefrag,
  type FsKind,
  hasCommand,
  isRoot,
  makeScenarios,
  readDirect,
  run,
  withFilesystem,
  withTmpfs,
  writeAt,
} from "./fs_fixtures.ts";

const root = isRoot();

function mapPath(path: string, opts: Parameters<typeof fiemap>[3] = {}): FiemapExtent[] {
  const fd = open(path, O_RDONLY);
  try {
    return fiemap(fd, 0, Infinity, { sync: true, path, ...opts });
  } finally {
    close(fd);
  }
}

/** fastloop's extents against filefrag's, extent by extent, in filefrag's block units. */
async function assertMatchesFilefrag(path: string, extents: FiemapExtent[]): Promise<void> {
  const ff = await filefrag(path);
  assert.equal(extents.length, ff.extents.length, `${path}: extent count vs filefrag`);
  extents.forEach((e, i) => {
    const f = ff.extents[i]!;
    const at = `${path} extent ${i}`;
    // filefrag prints inline extents in bytes, everything else in filesystem blocks.
    const unit = f.flags.includes("inline") ? 1 : ff.blockSize;
    assert.equal(Math.floor(e.logical / unit), f.logicalBlock, `${at} logical`);
    assert.equal(Math.floor(e.physical / unit), f.physicalBlock, `${at} physical`);
    assert.equal(Math.floor(e.length / unit), f.lengthBlocks, `${at} length`);
    // filefrag adds "eof" itself (the extent reaches the file size); it is not a FIEMAP flag.
    assert.deepEqual(extentFlagNames(e.flags), f.flags.filter((n) => n !== "eof"), `${at} flags`);
  });
}

/** Every written extent's device blocks hold exactly the file's bytes (O_DIRECT, the loop device). */
async function assertDeviceHoldsFileBytes(device: string, path: string, extents: FiemapExtent[]) {
  const file = await Deno.readFile(path);
  let checked = 0;
  for (const e of extents) {
    if (e.flags & FIEMAP_EXTENT_UNWRITTEN) continue;
    if (e.logical >= file.length) continue;
    const raw = await readDirect(device, e.physical, e.length);
    const inFile = Math.min(e.length, file.length - e.logical);
    const want = file.subarray(e.logical, e.logical + inFile);
    assert.ok(
      raw.subarray(0, inFile).every((b, i) => b === want[i]),
      `${path}: device bytes at ${e.physical} differ from file bytes at ${e.logical}`,
    );
    checked += inFile;
  }
  return checked;
}

for (const kind of ["ext4", "xfs"] as FsKind[]) {
  Deno.test({
    name: `fiemap() on ${kind} agrees with filefrag and the device holds the file's bytes`,
    ignore: !root,
    async fn() {
      await withFilesystem(
        kind,
        { mkfsArgs: kind === "xfs" ? ["-m", "reflink=1"] : [] },
        async (fs) => {
          const scenarios = await makeScenarios(fs);
          for (const s of scenarios) {
            const extents = mapPath(s.path);
            await assertMatchesFilefrag(s.path, extents);
            const checked = await assertDeviceHoldsFileBytes(fs.device, s.path, extents);
            if (s.name !== "fallocated") assert.ok(checked > 0, `${s.name}: some bytes checked`);
            if (s.name === "fallocated") {
              assert.ok(extents.some((e) => e.flags & FIEMAP_EXTENT_UNWRITTEN), "unwritten seen");
            }
            if (s.name === "reflinked") {
              assert.ok(extents.every((e) => e.flags & FIEMAP_EXTENT_SHARED), "all shared");
            }
            if (s.name === "many") assert.ok(extents.length > 512, "more than one page");
            if (s.name.startsWith("fragmented")) {
              assert.ok(extents.length > 1, `${s.name}: ${extents.length} extents`);
            }
          }
        },
      );
    },
  });
}

Deno.test({
  name: "fiemap() pages through a file: any page size gives the same extents",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const scenarios = await makeScenarios(fs);
      const many = scenarios.find((s) => s.name === "many")!.path;
      const whole = mapPath(many);
      assert.ok(whole.length >= 600);
      for (const perCall of [1, 7, 64, 599, 600, 601]) {
        assert.deepEqual(mapPath(many, { extentsPerCall: perCall }), whole, `${perCall} per call`);
      }
      // maxExtents stops early; a range returns only the extents overlapping it.
      assert.deepEqual(mapPath(many, { maxExtents: 10, extentsPerCall: 3 }), whole.slice(0, 10));
      const fd = open(many, O_RDONLY);
      try {
        const from = 100 * 8192 + 100;
        const part = fiemap(fd, from, 80 * 8192, { extentsPerCall: 16 });
        const want = whole.filter((e) =>
          e.logical + e.length > from && e.logical < from + 80 * 8192
        );
        // iomap (ext4, xfs) flags the last extent of the requested range "last" too.
        const noLast = (l: FiemapExtent[]) => l.map((e) => ({ ...e, flags: e.flags & ~1 }));
        assert.deepEqual(noLast(part), noLast(want));
        assert.equal(part.length, 81); // extents 100..180: the range starts and ends inside one
      } finally {
        close(fd);
      }
    });
  },
});

Deno.test({
  name: "fiemap() on tmpfs fails naming FIEMAP, the path and EOPNOTSUPP",
  ignore: !root,
  async fn() {
    await withTmpfs(async (dir) => {
      const path = `${dir}/file`;
      await Deno.writeTextFile(path, "data");
      let err: unknown;
      try {
        mapPath(path);
      } catch (e) {
        err = e;
      }
      assert.ok(err instanceof SyscallError, `threw ${err}`);
      assert.equal(err.code, "EOPNOTSUPP");
      assert.match(err.message, new RegExp(`^FIEMAP ${path}: EOPNOTSUPP`));
    });
  },
});

Deno.test("extentFlagNames() names every FIEMAP_EXTENT_* flag and shows unknown bits", () => {
  assert.deepEqual(extentFlagNames(0), []);
  assert.deepEqual(extentFlagNames(0x3fff), [
    "last",
    "unknown_loc",
    "delalloc",
    "encoded",
    "encrypted",
    "not_aligned",
    "inline",
    "tail_packed",
    "unwritten",
    "merged",
    "shared",
    "0x70",
  ]);
});

Deno.test({
  name: "FIEMAP, block, fsxattr and lease constants match the installed kernel headers",
  ignore: !(await hasCommand("cc")),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "fastloop-abi-" });
    try {
      const values: Record<string, number | bigint> = {
        "sizeof(struct fiemap)": fiemapAbi.FIEMAP_SIZE,
        "sizeof(struct fiemap_extent)": fiemapAbi.FIEMAP_EXTENT_SIZE,
        "offsetof(struct fiemap, fm_start)": fiemapAbi.FM_START,
        "offsetof(struct fiemap, fm_length)": fiemapAbi.FM_LENGTH,
        "offsetof(struct fiemap, fm_flags)": fiemapAbi.FM_FLAGS,
        "offsetof(struct fiemap, fm_mapped_extents)": fiemapAbi.FM_MAPPED_EXTENTS,
        "offsetof(struct fiemap, fm_extent_count)": fiemapAbi.FM_EXTENT_COUNT,
        "offsetof(struct fiemap, fm_extents)": fiemapAbi.FIEMAP_SIZE,
        "offsetof(struct fiemap_extent, fe_logical)": fiemapAbi.FE_LOGICAL,
        "offsetof(struct fiemap_extent, fe_physical)": fiemapAbi.FE_PHYSICAL,
        "offsetof(struct fiemap_extent, fe_length)": fiemapAbi.FE_LENGTH,
        "offsetof(struct fiemap_extent, fe_flags)": fiemapAbi.FE_FLAGS,
        "FS_IOC_FIEMAP": fiemapAbi.FS_IOC_FIEMAP,
        "FIEMAP_FLAG_SYNC": fiemapAbi.FIEMAP_FLAG_SYNC,
        "FIEMAP_FLAG_XATTR": fiemapAbi.FIEMAP_FLAG_XATTR,
        "FIEMAP_FLAG_CACHE": fiemapAbi.FIEMAP_FLAG_CACHE,
        "FIEMAP_EXTENT_LAST": fiemapAbi.FIEMAP_EXTENT_LAST,
        "FIEMAP_EXTENT_UNKNOWN": fiemapAbi.FIEMAP_EXTENT_UNKNOWN,
        "FIEMAP_EXTENT_DELALLOC": fiemapAbi.FIEMAP_EXTENT_DELALLOC,
        "FIEMAP_EXTENT_ENCODED": fiemapAbi.FIEMAP_EXTENT_ENCODED,
        "FIEMAP_EXTENT_DATA_ENCRYPTED": fiemapAbi.FIEMAP_EXTENT_DATA_ENCRYPTED,
        "FIEMAP_EXTENT_NOT_ALIGNED": fiemapAbi.FIEMAP_EXTENT_NOT_ALIGNED,
        "FIEMAP_EXTENT_DATA_INLINE": fiemapAbi.FIEMAP_EXTENT_DATA_INLINE,
        "FIEMAP_EXTENT_DATA_TAIL": fiemapAbi.FIEMAP_EXTENT_DATA_TAIL,
        "FIEMAP_EXTENT_UNWRITTEN": fiemapAbi.FIEMAP_EXTENT_UNWRITTEN,
        "FIEMAP_EXTENT_MERGED": fiemapAbi.FIEMAP_EXTENT_MERGED,
        "FIEMAP_EXTENT_SHARED": fiemapAbi.FIEMAP_EXTENT_SHARED,
        "BLKGETSIZE64": blkdevAbi.BLKGETSIZE64,
        "BLKSSZGET": blkdevAbi.BLKSSZGET,
        "BLKPBSZGET": blkdevAbi.BLKPBSZGET,
        "FS_IOC_FSGETXATTR": blkdevAbi.FS_IOC_FSGETXATTR,
        "sizeof(struct fsxattr)": blkdevAbi.FSXATTR_SIZE,
        "offsetof(struct fsxattr, fsx_xflags)": blkdevAbi.FSX_XFLAGS,
        "FS_XFLAG_REALTIME": blkdevAbi.FS_XFLAG_REALTIME,
        "FS_IOC_GETFLAGS": blkdevAbi.FS_IOC_GETFLAGS,
        "FS_COMPR_FL": blkdevAbi.FS_COMPR_FL,
        "FS_ENCRYPT_FL": blkdevAbi.FS_ENCRYPT_FL,
        "FS_JOURNAL_DATA_FL": blkdevAbi.FS_JOURNAL_DATA_FL,
        "EXT4_SUPER_MAGIC": blkdevAbi.EXT4_SUPER_MAGIC,
        "XFS_SUPER_MAGIC": blkdevAbi.XFS_SUPER_MAGIC,
        "BTRFS_SUPER_MAGIC": blkdevAbi.BTRFS_SUPER_MAGIC,
        "TMPFS_MAGIC": blkdevAbi.TMPFS_MAGIC,
        "OVERLAYFS_SUPER_MAGIC": blkdevAbi.OVERLAYFS_SUPER_MAGIC,
        "NFS_SUPER_MAGIC": blkdevAbi.NFS_SUPER_MAGIC,
        "FUSE_SUPER_MAGIC": blkdevAbi.FUSE_SUPER_MAGIC,
        "F2FS_SUPER_MAGIC": blkdevAbi.F2FS_SUPER_MAGIC,
        "F_SETLEASE": fcntlAbi.F_SETLEASE,
        "F_GETLEASE": fcntlAbi.F_GETLEASE,
        "F_SETOWN": fcntlAbi.F_SETOWN,
        "F_SETSIG": fcntlAbi.F_SETSIG,
        "F_RDLCK": fcntlAbi.F_RDLCK,
        "F_WRLCK": fcntlAbi.F_WRLCK,
        "F_UNLCK": fcntlAbi.F_UNLCK,
      };
      const names = Object.keys(values);
      const src = [
        "#define _GNU_SOURCE",
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <fcntl.h>",
        "#include <linux/fs.h>",
        "#include <linux/fiemap.h>",
        "#include <linux/magic.h>",
        "int main(void) {",
        ...names.map((n) => `  printf("%llu\\n", (unsigned long long)(${n}));`),
        "  return 0;",
        "}",
      ].join("\n");
      await Deno.writeTextFile(`${dir}/abi.c`, src);
      await run("cc", ["-o", `${dir}/abi`, `${dir}/abi.c`]);
      const lines = (await run(`${dir}/abi`, [])).stdout.trim().split("\n");
      names.forEach((n, i) => {
        assert.equal(BigInt(lines[i]!), BigInt(values[n]!), n);
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "fiemap() without sync reports ext4 delayed allocation, which is never direct",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const path = `${fs.dir}/dirty`;
      // Buffered write, no fsync: the blocks are not allocated yet (writeback waits ~30 s).
      await Deno.writeFile(path, new Uint8Array(64 * 1024).fill(9));
      const dirty = mapPath(path, { sync: false });
      const ff = (await run("filefrag", ["-v", path])).stdout; // filefrag without -s: no sync
      assert.equal(dirty.length, 1);
      assert.deepEqual(extentFlagNames(dirty[0]!.flags), ["last", "unknown_loc", "delalloc"]);
      assert.match(ff, /unknown_loc,delalloc/);
      assert.deepEqual(classifyExtent(dirty[0]!.flags, 512, dirty[0]), {
        kind: ExtentKind.viaFile,
        reason: ExtentReason.delalloc,
      });
      // With FIEMAP_FLAG_SYNC the same file maps to real, direct blocks.
      const synced = mapPath(path, { sync: true });
      assert.deepEqual(extentFlagNames(synced[0]!.flags), ["last"]);
      assert.equal(classifyExtent(synced[0]!.flags, 512, synced[0]).kind, ExtentKind.direct);
    });
  },
});

Deno.test({
  name: "fiemap() reports ext4 inline data as inline and not aligned, which is never direct",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", { mkfsArgs: ["-O", "inline_data"] }, async (fs) => {
      const path = `${fs.dir}/tiny`;
      await writeAt(path, 0, new TextEncoder().encode("tiny file kept in the inode\n"));
      const extents = mapPath(path);
      await assertMatchesFilefrag(path, extents);
      assert.equal(extents.length, 1);
      assert.deepEqual(extentFlagNames(extents[0]!.flags), ["last", "not_aligned", "inline"]);
      assert.deepEqual(classifyExtent(extents[0]!.flags, 512, extents[0]), {
        kind: ExtentKind.viaFile,
        reason: ExtentReason.inline,
      });
    });
  },
});
