// What losetup users reach for, checked against the kernel's loop device on the same image, in the
// test VM on both kernels: a region (`--offset/--sizelimit` vs `losetup -o/--sizelimit`), the
// sector size (`--sector-size` vs `-b`), partitions (`--partscan` vs `-P`), resize (`resize` vs
// `losetup -c`, Linux 6.16+), and the `stat` table. Oracles: the loop device (bytes by cmp, sizes
// and sector sizes in /sys/block, partitions' start and size in /sys/block/NAME/NAMEpK), the
// files compared with cmp after both are detached (a write through fastloop lands where the same
// write through loop lands, and nothing outside the region changes), e2fsck and /proc/locks.
// Small images: the whole file runs in about 2 minutes per kernel under TCG.

import assert from "node:assert/strict";
import {
  fastloop,
  ok,
  recordOf,
  registryFiles,
  run,
  running,
  serverProcesses,
  ublkDevices,
  waitFor,
  withHostFs as withSharedHostFs,
} from "./support.ts";

const KIB = 1024;
const MIB = 1024 * KIB;
const kernel = Deno.readTextFileSync("/proc/sys/kernel/osrelease").trim();
/** UBLK_F_UPDATE_SIZE is 6.16+, UBLK_F_NO_AUTO_PART_SCAN 7.0+: Debian's 6.12 has neither. */
const [major, minor] = kernel.split(".").map(Number) as [number, number];
const hasUpdateSize = major > 6 || (major === 6 && minor >= 16);
const hasNoAutoPartScan = major >= 7;

function assertNothingLeft(): void {
  assert.deepEqual(ublkDevices(), [], "no ublk device left");
  assert.deepEqual(serverProcesses(), [], "no server process left");
  assert.deepEqual(registryFiles(), [], "no registry record, socket or lock left");
}

/** A small host ext4 for one test; afterwards nothing the test attached may remain. */
function withHostFs(fn: (mnt: string, tmp: string) => Promise<void>): Promise<void> {
  return withSharedHostFs(fn, { fsSize: "256M", afterwards: assertNothingLeft });
}

/** `fastloop attach ARGS... FILE`: the device. */
async function attach(file: string, args: string[]): Promise<string> {
  const r = await fastloop(["attach", ...args, file]);
  assert.equal(r.code, 0, `attach ${args.join(" ")} ${file}: ${r.stderr}`);
  const dev = r.stdout.trim();
  assert.match(dev, /^\/dev\/ublkb[0-9]+$/);
  return dev;
}

async function detach(dev: string): Promise<void> {
  const r = await fastloop(["detach", dev]);
  assert.equal(r.code, 0, `detach ${dev}: ${r.stderr}`);
}

/** `losetup --find --show ARGS... FILE`: the loop device. */
async function losetup(file: string, args: string[]): Promise<string> {
  return (await ok("losetup", ["--find", "--show", ...args, file])).trim();
}

const sysName = (dev: string) => dev.replace(/^\/dev\//, "");
const sys = (dev: string, attr: string) =>
  Deno.readTextFileSync(`/sys/block/${sysName(dev)}/${attr}`).trim();
const sizeBytes = (dev: string) => Number(sys(dev, "size")) * 512;

/** The kernel's partitions of `dev`: index, start and size (512-byte sectors), from /sys. */
function partitions(dev: string): Array<{ n: number; start: number; size: number }> {
  const name = sysName(dev);
  const found = [];
  for (const e of Deno.readDirSync(`/sys/block/${name}`)) {
    const m = new RegExp(`^${name}p([0-9]+)$`).exec(e.name);
    if (!m) continue;
    const read = (f: string) =>
      Number(Deno.readTextFileSync(`/sys/block/${name}/${e.name}/${f}`).trim());
    found.push({ n: Number(m[1]), start: read("start"), size: read("size") });
  }
  return found.sort((a, b) => a.n - b.n);
}

function dropCaches(): void {
  Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
}

/** `bytes` random bytes from the kernel at `path`. */
async function randomFile(path: string, bytes: number): Promise<void> {
  await ok("dd", [
    "if=/dev/urandom",
    `of=${path}`,
    `bs=${64 * KIB}`,
    `count=${bytes / (64 * KIB)}`,
    "status=none",
  ]);
}

/** Writes `src` to `dev` at byte `offset` with O_DIRECT (block-aligned). */
async function writeAt(dev: string, src: string, offset: number): Promise<void> {
  await ok("dd", [
    `if=${src}`,
    `of=${dev}`,
    "bs=4096",
    `seek=${offset}`,
    "oflag=direct,seek_bytes",
    "conv=notrunc",
    "status=none",
  ]);
}

/**
 * A classic MBR (the first 512 bytes of `file`) with primary partitions of type 0x83 at
 * [start, start + size) in the device's logical blocks, which is how the kernel reads them.
 */
function writeMbr(file: string, parts: Array<{ start: number; size: number }>): void {
  const mbr = new Uint8Array(512);
  const v = new DataView(mbr.buffer);
  parts.forEach((p, i) => {
    const at = 446 + 16 * i;
    mbr.set([0x00, 0xfe, 0xff, 0xff, 0x83, 0xfe, 0xff, 0xff], at); // status, CHS (unused), type
    v.setUint32(at + 8, p.start, true);
    v.setUint32(at + 12, p.size, true);
  });
  mbr[510] = 0x55;
  mbr[511] = 0xaa;
  const f = Deno.openSync(file, { write: true });
  try {
    f.writeSync(mbr);
  } finally {
    f.close();
  }
}

interface StatRow {
  device: string;
  mode: string;
  path: string;
  offsetBytes: number;
  sizeLimitBytes: number;
  sizeBytes: number;
  sectorBytes: number;
  partitions: string[];
  leaseBreaks: number;
  server: { pid: number; state: string };
}

async function statOf(dev: string): Promise<StatRow> {
  const r = await fastloop(["stat", "--json", dev]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout)[0];
}

Deno.test("a region (--offset/--sizelimit) is the bytes losetup -o/--sizelimit gives; writes land where loop's do, also after a server restart", async () => {
  await withHostFs(async (mnt, tmp) => {
    // 6 MiB of data, then a 2 MiB hole: the region [1 MiB, 7 MiB) has data and a hole.
    const file = `${mnt}/region.img`;
    await randomFile(file, 6 * MIB);
    await ok("truncate", ["-s", "8M", file]);
    const copy = `${mnt}/region-loop.img`;
    await ok("cp", [file, copy]);
    const region = ["--offset", "1M", "--sizelimit", String(6 * MIB)];
    const loop = await losetup(copy, ["-o", "1M", "--sizelimit", String(6 * MIB)]);
    const dev = await attach(file, region);
    try {
      assert.equal(sizeBytes(dev), sizeBytes(loop), "the same size as loop's");
      assert.equal(sizeBytes(dev), 6 * MIB);
      await ok("cmp", [dev, loop]);

      const row = await statOf(dev);
      assert.equal(row.mode, "fast", "the direct path is on (what this test exercises)");
      assert.deepEqual([row.offsetBytes, row.sizeLimitBytes, row.sizeBytes], [
        MIB,
        6 * MIB,
        6 * MIB,
      ]);
      // The table a person reads: the losetup -l columns, the region's figures.
      const table = await fastloop(["stat", dev]);
      assert.equal(table.code, 0, table.stderr);
      const [header, line] = table.stdout.split("\n");
      assert.deepEqual(header!.split(/\s+/), [
        "DEVICE",
        "FILE",
        "OFFSET",
        "SIZELIMIT",
        "SIZE",
        "PATH",
        "LEASE",
        "RO",
        "SERVER",
      ]);
      assert.match(
        line!,
        new RegExp(
          `^${dev}\\s+${file}\\s+1048576\\s+6291456\\s+6\\.0M\\s+(direct|mixed)\\s+write\\s+0\\s+running\\(`,
        ),
      );
      const bare = await fastloop(["stat", "-n", "-O", "device,offset,size", dev]);
      assert.equal(bare.stdout, `${dev}  1048576  6.0M\n`);

      // The same writes through both: over data (direct), into the hole (through the file),
      // at the region's last block.
      const block = `${tmp}/block`;
      await randomFile(block, 64 * KIB);
      for (const at of [128 * KIB, 5 * MIB + 64 * KIB, 6 * MIB - 64 * KIB]) {
        await writeAt(dev, block, at);
        await writeAt(loop, block, at);
      }
      // A restarted server (the supervisor's) keeps the region.
      const before = recordOf(dev).server.pid;
      Deno.kill(before, "SIGKILL");
      await waitFor("a new server", () => {
        try {
          const pid = recordOf(dev).server.pid;
          return pid !== before && running(pid);
        } catch {
          return false;
        }
      }, 120_000);
      await writeAt(dev, block, 2 * MIB);
      await writeAt(loop, block, 2 * MIB);
      await ok("cmp", [dev, loop]);
      const after = await statOf(dev);
      assert.deepEqual([after.offsetBytes, after.sizeLimitBytes, after.sizeBytes], [
        MIB,
        6 * MIB,
        6 * MIB,
      ]);
    } finally {
      await run("losetup", ["-d", loop]);
    }
    await detach(dev);
    dropCaches();
    // Both files, whole: the writes are at the same file offsets and nothing else changed.
    await ok("cmp", [file, copy]);
    assert.equal(Deno.statSync(file).size, 8 * MIB);
  });
});

Deno.test("--sector-size 4096 --partscan gives the block size and partitions of losetup -b 4096 -P; detach refuses a mounted partition, then removes them", async () => {
  await withHostFs(async (mnt, tmp) => {
    // Partitions in 4 KiB blocks: 1 MiB at 1 MiB, 8 MiB at 4 MiB (read in 512-byte sectors they
    // would be elsewhere: only a 4 KiB device finds these).
    const file = `${mnt}/disk4k.img`;
    await randomFile(file, 16 * MIB);
    writeMbr(file, [{ start: 256, size: 256 }, { start: 1024, size: 2048 }]);
    const copy = `${mnt}/disk4k-loop.img`;
    await ok("cp", [file, copy]);
    const loop = await losetup(copy, ["-b", "4096", "-P"]);
    const dev = await attach(file, ["--sector-size", "4096", "--partscan"]);
    const inner = `${tmp}/inner`;
    Deno.mkdirSync(inner);
    let mounted = false;
    try {
      for (const attr of ["queue/logical_block_size", "size"]) {
        assert.equal(sys(dev, attr), sys(loop, attr), attr);
      }
      assert.equal(sys(dev, "queue/logical_block_size"), "4096");
      assert.equal((await ok("blockdev", ["--getss", dev])).trim(), "4096");
      const parts = partitions(dev);
      assert.deepEqual(parts, partitions(loop), "the same partitions as loop's");
      assert.deepEqual(parts, [{ n: 1, start: 2048, size: 2048 }, {
        n: 2,
        start: 8192,
        size: 16384,
      }]);
      for (const n of [1, 2]) await ok("cmp", [`${dev}p${n}`, `${loop}p${n}`]);
      assert.deepEqual((await statOf(dev)).partitions, [`${sysName(dev)}p1`, `${sysName(dev)}p2`]);

      // A filesystem on the second partition, mounted: detach is refused, naming it.
      await ok("mkfs.ext4", ["-F", "-q", `${dev}p2`]);
      await ok("mount", [`${dev}p2`, inner]);
      mounted = true;
      const busy = await fastloop(["detach", dev]);
      assert.equal(busy.code, 4, busy.stderr);
      assert.match(
        busy.stderr,
        new RegExp(
          `^fastloop: ${dev}: its partition ${dev}p2 is mounted on ${inner}: unmount it first`,
        ),
      );
      assert.equal(busy.stderr.trim().split("\n").length, 1, "one line");
      assert.ok(running(recordOf(dev).server.pid), "still served");
      await ok("umount", [inner]);
      mounted = false;
    } finally {
      if (mounted) await run("umount", [inner]);
      await run("losetup", ["-d", loop]);
    }
    await detach(dev);
    assert.throws(() => Deno.statSync(`/sys/block/${sysName(dev)}`), Deno.errors.NotFound);
    // devtmpfs removes the nodes a moment after the kernel deletes the partitions.
    await waitFor("the partitions' nodes gone", () =>
      [`${dev}p1`, `${dev}p2`].every((p) => {
        try {
          Deno.statSync(p);
          return false;
        } catch {
          return true;
        }
      }), 5_000);
    // The filesystem fastloop's partition wrote is where the kernel's loop finds partition 2.
    dropCaches();
    const check = await losetup(file, ["-b", "4096", "-P", "--read-only"]);
    try {
      const fsck = await run("e2fsck", ["-fn", `${check}p2`]);
      assert.equal(fsck.code, 0, `e2fsck -fn ${check}p2: ${fsck.stdout}${fsck.stderr}`);
    } finally {
      await run("losetup", ["-d", check]);
    }
  });
});

Deno.test("without --partscan the device has the partitions losetup without -P has (none) where the kernel offers NO_AUTO_PART_SCAN; with it, those of losetup -P", async () => {
  await withHostFs(async (mnt) => {
    const file = `${mnt}/disk.img`;
    await randomFile(file, 8 * MIB);
    writeMbr(file, [{ start: 2048, size: 4096 }, { start: 8192, size: 6144 }]);
    const copy = `${mnt}/disk-loop.img`;
    await ok("cp", [file, copy]);

    const plainLoop = await losetup(copy, []);
    const plain = await attach(file, []);
    try {
      assert.deepEqual(partitions(plainLoop), [], "losetup without -P: no partitions");
      if (hasNoAutoPartScan) {
        assert.deepEqual(partitions(plain), partitions(plainLoop), `${kernel}: none either`);
      } else {
        // Documented (attach --help): kernels before 7.0 scan every new ublk device at start.
        assert.equal(partitions(plain).length, 2, `${kernel} scans at START_DEV`);
      }
    } finally {
      await run("losetup", ["-d", plainLoop]);
    }
    await detach(plain);

    const loop = await losetup(copy, ["-P"]);
    const dev = await attach(file, ["--partscan"]);
    try {
      assert.deepEqual(partitions(dev), partitions(loop), "the same partitions as losetup -P");
      assert.deepEqual(partitions(dev), [{ n: 1, start: 2048, size: 4096 }, {
        n: 2,
        start: 8192,
        size: 6144,
      }]);
      for (const n of [1, 2]) await ok("cmp", [`${dev}p${n}`, `${loop}p${n}`]);
    } finally {
      await run("losetup", ["-d", loop]);
    }
    await detach(dev);
  });
});

Deno.test({
  name:
    "resize needs UBLK_F_UPDATE_SIZE: on kernels before 6.16 it exits 5 in one line and changes nothing",
  ignore: hasUpdateSize,
  async fn() {
    await withHostFs(async (mnt) => {
      const file = `${mnt}/small.img`;
      await ok("truncate", ["-s", "4M", file]);
      const dev = await attach(file, []);
      for (const args of [["resize", dev, "--size", "8M"], ["resize", dev]]) {
        const r = await fastloop(args);
        assert.equal(r.code, 5, r.stderr);
        assert.match(
          r.stderr.trim(),
          /^fastloop: \/dev\/ublkb[0-9]+: Resizing a live device needs UBLK_F_UPDATE_SIZE, which Linux 6\.16 and later have \(this is Linux 6\.12\.[^)]*\)$/,
        );
        assert.equal(r.stdout, "");
      }
      assert.equal(sizeBytes(dev), 4 * MIB, "the device is unchanged");
      await detach(dev);
      assert.equal(Deno.statSync(file).size, 4 * MIB, "the file is unchanged");
    });
  },
});

Deno.test({
  name:
    "resize grows the file through fastloop's fd (the lease holds) and the device while IO runs, follows an outside truncate up to --sizelimit as losetup -c does, and refuses a shrunk file",
  ignore: !hasUpdateSize,
  async fn() {
    await withHostFs(async (mnt, tmp) => {
      const file = `${mnt}/grow.img`;
      await randomFile(file, 4 * MIB);
      const copy = `${mnt}/grow-loop.img`;
      await ok("cp", [file, copy]);
      const region = ["--offset", "1M", "--sizelimit", "10M"];
      const dev = await attach(file, region);
      const loop = await losetup(copy, ["-o", "1M", "--sizelimit", "10M"]);
      try {
        assert.equal(sizeBytes(dev), 3 * MIB);
        assert.equal(sizeBytes(dev), sizeBytes(loop));
        const ino = Deno.statSync(file).ino!;
        const leases = () =>
          Deno.readTextFileSync("/proc/locks").split("\n").filter((l) =>
            / LEASE /.test(l) && l.includes(`:${ino} `)
          );
        assert.equal(leases().length, 1, "fastloop holds a lease on the file");

        // --size, while fio reads the device (it must see no error).
        const fio = new Deno.Command("fio", {
          args: [
            "--name=during-resize",
            `--filename=${dev}`,
            "--rw=randread",
            "--bs=4k",
            "--ioengine=io_uring",
            "--direct=1",
            "--iodepth=8",
            "--time_based",
            "--runtime=4",
          ],
          stdout: "piped",
          stderr: "piped",
        }).spawn();
        const grown = await fastloop(["resize", dev, "--size", "6M"]);
        const fioOut = await fio.output();
        assert.equal(fioOut.code, 0, `fio: ${new TextDecoder().decode(fioOut.stderr)}`);
        assert.equal(grown.code, 0, grown.stderr);
        assert.equal(grown.stdout, `${dev} ${6 * MIB}\n`);
        assert.equal(sizeBytes(dev), 6 * MIB, "the kernel's size");
        assert.equal(Deno.statSync(file).size, 7 * MIB, "the file grew to offset + size");
        assert.equal(leases().length, 1, "the lease still holds");
        assert.match(leases()[0]!, /WRITE/);
        assert.equal((await statOf(dev)).leaseBreaks, 0);
        // The new tail reads as zeros and takes writes (landing at offset + device offset).
        await ok("cmp", ["-n", String(3 * MIB), "-i", `${3 * MIB}:0`, dev, "/dev/zero"]);
        const block = `${tmp}/block`;
        await randomFile(block, 64 * KIB);
        await writeAt(dev, block, 5 * MIB);

        // The file grown by another process: its truncate breaks the lease, so the first try
        // fails with EAGAIN (coreutils opens with O_NONBLOCK), a later one succeeds.
        const first = await run("truncate", ["-s", "16M", file]);
        assert.notEqual(first.code, 0, "the first truncate is refused while the lease breaks");
        assert.match(first.stderr, /Resource temporarily unavailable/);
        await waitFor(
          "truncate succeeds",
          async () => (await run("truncate", ["-s", "16M", file])).code === 0,
          30_000,
        );
        const follow = await fastloop(["resize", dev]);
        assert.equal(follow.code, 0, follow.stderr);
        // As losetup -c on the same layout: the rest of the file, cut at the size limit.
        await ok("truncate", ["-s", "16M", copy]);
        await ok("losetup", ["-c", loop]);
        assert.equal(sizeBytes(dev), sizeBytes(loop), "the size losetup -c gives");
        assert.equal(sizeBytes(dev), 10 * MIB);

        // Refused, nothing changed: past the limit, below the device, a file that shrank.
        const cases: Array<[string[], RegExp]> = [
          [
            ["--size", "12M"],
            /--size 12582912 is past the device's --sizelimit \(10485760 bytes\)$/,
          ],
          [["--size", "8M"], /--size 8388608 is below the device's size \(10485760 bytes\)/],
        ];
        for (const [args, pattern] of cases) {
          const r = await fastloop(["resize", dev, ...args]);
          assert.equal(r.code, 3, r.stderr);
          assert.match(r.stderr.trim(), pattern);
        }
        await waitFor(
          "the shrink truncate",
          async () => (await run("truncate", ["-s", "8M", file])).code === 0,
          30_000,
        );
        const shrunk = await fastloop(["resize", dev]);
        assert.equal(shrunk.code, 3, shrunk.stderr);
        assert.match(
          shrunk.stderr.trim(),
          /grow\.img'? is 8388608 bytes: the device \(10485760 bytes from offset 1048576\) no longer fits in it; nothing changed$/,
        );
        assert.equal(sizeBytes(dev), 10 * MIB, "unchanged");
      } finally {
        await run("losetup", ["-d", loop]);
      }
      await detach(dev);
      dropCaches();
      // The write at device offset 5 MiB is at file offset 6 MiB.
      await ok("cmp", ["-n", String(64 * KIB), "-i", `${6 * MIB}:0`, file, `${tmp}/block`]);
    });
  },
});
