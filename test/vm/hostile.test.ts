// Hostile arguments that need a real ublk device (the rest are in test/host/hostile_args.test.ts):
// a file name with a space and a newline attaches, serves its bytes and detaches by that name;
// symlinks to the attached file and to its block device are refused; junk references leave the
// device alone; a file on a read-only mount attaches only --read-only; the largest --queues and
// --depth either work or are refused cleanly. Oracles: cmp against copies on tmpfs, fio verify,
// /sys and /proc (bench/soak.ts `leakCounts`), never fastloop's own view alone.

import assert from "node:assert/strict";
import { maxIoBytesForDepth } from "../../lib/validate.ts";
import {
  assertNoLeaks,
  attach,
  detach,
  fastloop,
  leakCounts,
  MIB,
  ok,
  type Run,
  run,
  withHostFs,
} from "../../bench/soak.ts";
import { SCRATCH_DISK } from "./support.ts";

function assertOneLineError(r: Run, code: number, pattern: RegExp, what: string): void {
  const shown = `${what}: exit ${r.code}, stderr: ${r.stderr.slice(0, 1000)}`;
  assert.equal(r.code, code, shown);
  assert.equal(r.stderr.trimEnd().split("\n").length, 1, shown);
  assert.match(r.stderr, /^fastloop: /, shown);
  assert.match(r.stderr.trimEnd(), pattern, shown);
  assert.ok(r.stderr.length < 1000, `${what}: a ${r.stderr.length}-character message`);
  assert.equal(r.stdout, "", shown);
}

async function randomFile(path: string, ref: string, mib: number): Promise<void> {
  await ok("dd", ["if=/dev/urandom", `of=${ref}`, "bs=1M", `count=${mib}`, "status=none"]);
  await ok("dd", [`if=${ref}`, `of=${path}`, "bs=1M", "conv=fsync", "status=none"]);
}

Deno.test("a file named with a space and a newline attaches, serves its bytes, and detaches by that name; junk references change nothing", async () => {
  const before = leakCounts();
  await withHostFs(SCRATCH_DISK, async (mnt, tmp) => {
    const file = `${mnt}/a name with\nnewline.img`;
    await randomFile(file, `${tmp}/ref`, 8);
    const dev = await attach(file);
    await ok("cmp", [dev, `${tmp}/ref`]);
    const st = await fastloop(["stat", "--json", file]);
    assert.equal(st.code, 0, st.stderr);
    const [row] = JSON.parse(st.stdout);
    assert.equal(row.file, file, "stat names the file exactly");
    assert.equal(row.device, dev);
    // The table is one line per device even so (the name is quoted there); under it, one line
    // names the device's log.
    const table = await fastloop(["stat"]);
    assert.equal(table.code, 0, table.stderr);
    const lines = table.stdout.trimEnd().split("\n");
    const logLine = lines.findIndex((l) => l.startsWith("log of "));
    assert.equal(logLine, 2, `header + one row, then the log line:\n${table.stdout}`);
    assert.equal(lines.filter((l) => l.startsWith("log of ")).length, 1, table.stdout);

    // Junk and near-miss references: refused in one line, the device untouched.
    Deno.symlinkSync(dev, `${tmp}/link-to-device`);
    Deno.symlinkSync(file, `${tmp}/link-to-file`);
    const refused: Array<[string[], number, RegExp]> = [
      [["attach", `${tmp}/link-to-file`], 4, /already attached as \/dev\/ublkb[0-9]+$/],
      [["attach", `${tmp}/link-to-device`], 3, /is a block device, not a regular file$/],
      [["attach", dev], 3, /is a block device, not a regular file$/],
      [["attach", dev.replace("ublkb", "ublkc")], 3, /is a character device/],
      [["attach", "--read-only", file], 4, /already attached/],
      [["detach", ""], 7, /"" is not attached/],
      [["detach", "a".repeat(100_000)], 7, /\(100000 characters\) is not attached/],
      // Leading zeros: not another name for the device (ublkb00 was read as ublkb0).
      [["detach", dev.replace(/[0-9]+$/, (n) => `00${n}`)], 7, /is not attached/],
      [["detach", `${dev}0`], 7, /is not attached/],
      [["detach", "--", "-1"], 7, /-1 is not attached/],
      [["detach", `${file}\n`], 7, /is not attached/],
      [["stat", `${file} `], 7, /is not attached/],
    ];
    for (const [args, code, pattern] of refused) {
      assertOneLineError(await fastloop(args), code, pattern, args.join(" ").slice(0, 80));
    }
    assert.equal(leakCounts().ublkIds - before.ublkIds, 1, "still exactly one device");
    await ok("cmp", [dev, `${tmp}/ref`]);

    // A write through the device lands in the file with the odd name.
    await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref2`, "bs=1M", "count=8", "status=none"]);
    await ok("dd", [`if=${tmp}/ref2`, `of=${dev}`, "bs=1M", "oflag=direct", "status=none"]);
    await detach(file);
    Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
    await ok("cmp", [file, `${tmp}/ref2`]);
  });
  assertNoLeaks(leakCounts(), before, "after the odd name");
});

Deno.test("a file on a read-only mount: read-write attach refused (exit 3), --read-only attaches and reads", async () => {
  const before = leakCounts();
  await withHostFs(SCRATCH_DISK, async (mnt, tmp) => {
    const file = `${mnt}/ro.img`;
    await randomFile(file, `${tmp}/ref`, 8);
    await ok("mount", ["-o", "remount,ro", mnt]);
    try {
      assertOneLineError(
        await fastloop(["attach", file]),
        3,
        /read-only filesystem \(attach it with --read-only\)$/,
        "read-write on a read-only mount",
      );
      assertNoLeaks(leakCounts(), before, "after the refusal");
      const dev = await attach(file, ["--read-only"]);
      assert.equal(Deno.readTextFileSync(`/sys/block/${dev.slice(5)}/ro`).trim(), "1");
      await ok("cmp", [dev, `${tmp}/ref`]);
      await detach(dev);
    } finally {
      await run("mount", ["-o", "remount,rw", mnt]);
    }
  });
  assertNoLeaks(leakCounts(), before, "after the read-only mount");
});

Deno.test("the largest --queues and --depth attach and pass fio verify, or are refused in one line leaving nothing", async () => {
  const before = leakCounts();
  await withHostFs(SCRATCH_DISK, async (mnt) => {
    const file = `${mnt}/max.img`;
    await ok("truncate", ["-s", `${64}M`, file]);
    for (
      const opts of [["--queues", "32", "--depth", "16"], ["--queues", "1", "--depth", "4096"]]
    ) {
      const r = await fastloop(["attach", ...opts, file]);
      if (r.code !== 0) {
        assertOneLineError(r, r.code, /./, `attach ${opts.join(" ")}`);
        assert.notEqual(r.code, 0);
        console.log(`attach ${opts.join(" ")}: refused: ${r.stderr.trim()}`);
        assertNoLeaks(leakCounts(), before, `after attach ${opts.join(" ")} was refused`);
        continue;
      }
      const dev = r.stdout.trim();
      // blk-mq lists only the hardware queues some CPU maps to (measured: 2 of 32 on 2 CPUs).
      const nrQueues = [...Deno.readDirSync(`/sys/block/${dev.slice(5)}/mq`)].length;
      const cpus = navigator.hardwareConcurrency;
      assert.equal(nrQueues, Math.min(Number(opts[1]), cpus), "the kernel's mapped queues");
      const depth = Number(Deno.readTextFileSync(`/sys/block/${dev.slice(5)}/mq/0/nr_tags`));
      assert.equal(depth, Number(opts[3]), "the kernel's tags per queue");
      // In copy mode the largest request shrinks with depth so a queue's buffers stay bounded
      // (4096 x 64 KiB); with zero copy there are no buffers and a request is up to 1 MiB.
      const maxKiB = Number(
        Deno.readTextFileSync(`/sys/block/${dev.slice(5)}/queue/max_hw_sectors_kb`),
      );
      const [row] = JSON.parse((await fastloop(["stat", "--json", dev])).stdout);
      const expected = row.dataMode === "zero-copy" ? 1024 : maxIoBytesForDepth(depth) / 1024;
      assert.equal(maxKiB, expected, `the kernel's largest request (${row.dataMode})`);
      await ok("fio", [
        "--name=max",
        `--filename=${dev}`,
        "--rw=randwrite",
        "--bs=4k",
        `--size=${8 * MIB}`,
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=64",
        "--numjobs=2",
        "--offset_increment=8M", // each job writes and verifies its own 8 MiB
        "--verify=crc32c",
        "--verify_fatal=1",
      ]);
      const rss = leakCounts();
      console.log(`attach ${opts.join(" ")}: works (${formatRss(dev)}); ${rss.fds} fds`);
      await detach(dev);
    }
  });
  assertNoLeaks(leakCounts(), before, "after the largest options");
});

function formatRss(dev: string): string {
  const record = JSON.parse(Deno.readTextFileSync(`/run/fastloop/${dev.slice(5)}.json`));
  const kb = /^VmRSS:\s+([0-9]+) kB$/m.exec(
    Deno.readTextFileSync(`/proc/${record.server.pid}/status`),
  )?.[1];
  return `server RSS ${(Number(kb) / 1024).toFixed(0)} MiB`;
}
