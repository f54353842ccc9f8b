// A kernel that refuses to open a mounted filesystem's device for writing (booted with
// bdev_allow_write_mounted=0; scripts/test-all.sh has a stage for it): a read-write attach of a
// file on a mounted ext4 serves everything through the file, the data is right (fio crc32c verify
// on the device, cmp of device and file, a reference image in the file after detach), and stat,
// stat --json, map and doctor name the cause and the fix. In a normal boot that test is ignored
// and the other one checks map and doctor against the kernel's answer to the same open.
// Oracles: /proc/cmdline as this test reads it, the kernel's own EBUSY (or success) when this test
// opens the mounted device for writing, fio's verify, cmp and e2fsck.

import assert from "node:assert/strict";
import { SyscallError } from "../../ffi/errno.ts";
import { close, O_RDWR, open } from "../../ffi/libc.ts";
import { attach, detach, fastloop, ok, SCRATCH_DISK, withHostFs } from "./support.ts";

const MIB = 1024 * 1024;
const CODE = "bdev-write-mounted-refused";
const FIX =
  /boot with bdev_allow_write_mounted=1, or use a kernel built with CONFIG_BLK_DEV_WRITE_MOUNTED=y/;

/** The boot refuses writes to mounted devices: the last such word on the command line says 0. */
function bootedRefusing(): boolean {
  const words = Deno.readTextFileSync("/proc/cmdline").trim().split(/\s+/);
  const values = words.filter((w) => w.startsWith("bdev_allow_write_mounted="));
  return /^bdev_allow_write_mounted=(0|n|N|off)$/.test(values.at(-1) ?? "");
}

/** The kernel's own answer: does the mounted scratch disk open for writing (open(2), O_RDWR)? */
function scratchOpensForWriting(): boolean {
  try {
    close(open(SCRATCH_DISK, O_RDWR));
    return true;
  } catch (e) {
    assert.ok(e instanceof SyscallError && e.code === "EBUSY", `open ${SCRATCH_DISK}: ${e}`);
    return false;
  }
}

async function json<T>(args: string[]): Promise<T> {
  const r = await fastloop(args);
  assert.equal(r.code, 0, `fastloop ${args.join(" ")}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

interface StatRow {
  device: string;
  mode: string;
  baseMode: string;
  modeReason?: string;
  directPathOff?: string;
  counters: {
    bytesRead: { direct: number; file: number };
    bytesWritten: { direct: number; file: number };
  };
}

Deno.test({
  name: "refused writes to mounted devices: attach serves through the file, correctly, and " +
    "stat, map and doctor say why",
  ignore: !bootedRefusing(),
  async fn() {
    await withHostFs(async (mnt, tmp) => {
      const file = `${mnt}/disk.img`;
      const size = 64 * MIB;
      await ok("dd", ["if=/dev/zero", `of=${file}`, "bs=1M", `count=${size / MIB}`, "conv=fsync"]);
      assert.equal(scratchOpensForWriting(), false, "the kernel refuses (EBUSY)");

      const r = await fastloop(["attach", file]);
      assert.equal(r.code, 0, r.stderr);
      const dev = r.stdout.trim();
      assert.match(r.stderr, /served through the file: the kernel refuses to open a mounted/);
      assert.match(r.stderr, FIX);

      await ok("fio", [
        "--name=verify",
        `--filename=${dev}`,
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
      ]);
      await ok("cmp", [dev, file]);

      const [row] = await json<StatRow[]>(["stat", "--json", dev]);
      assert.ok(row);
      assert.equal(row.mode, "file");
      assert.equal(row.baseMode, "file");
      assert.equal(row.directPathOff, CODE);
      assert.match(row.modeReason ?? "", /bdev_allow_write_mounted=0 on the kernel command line/);
      assert.match(row.modeReason ?? "", new RegExp(`open ${SCRATCH_DISK}: EBUSY`));
      assert.match(row.modeReason ?? "", FIX);
      assert.equal(row.counters.bytesWritten.direct, 0, "nothing written directly");
      assert.ok(row.counters.bytesWritten.file >= 16 * MIB, "fio's writes went through the file");
      const table = await fastloop(["stat"]);
      const name = dev.slice("/dev/".length);
      assert.match(table.stdout, new RegExp(`^${dev}\\s.*\\sfile\\s`, "m"));
      assert.match(
        table.stdout,
        new RegExp(`^${name}: direct path off \\(${CODE}\\): the kernel`, "m"),
      );

      const map = await json<Record<string, unknown>>(["map", "--json", file]);
      assert.equal(map["eligible"], true);
      assert.equal(map["deviceWritable"], false);
      assert.equal(map["directPathOff"], CODE);
      assert.match(String(map["directPathOffReason"]), FIX);
      const mapText = await fastloop(["map", file]);
      assert.match(
        mapText.stdout,
        new RegExp(`^Direct path: eligible, but off for a read-write attach \\(${CODE}\\): `, "m"),
      );
      assert.match(mapText.stdout, /^Fast path: none for a read-write attach/m);

      // doctor: an optional check that fails (warn), with the fix; fastloop can still run.
      const doc = await fastloop(["doctor", "--json"]);
      assert.equal(doc.code, 0, doc.stderr);
      const report = JSON.parse(doc.stdout);
      assert.deepEqual(report.bdevWriteMounted, {
        allowed: false,
        source: "bdev_allow_write_mounted=0 on the kernel command line",
      });
      const docText = await fastloop(["doctor"]);
      assert.match(docText.stdout, /^warn\s+write-mounted\s+the kernel refuses to open a mounted/m);
      assert.match(docText.stdout, /^\s+fix: boot with bdev_allow_write_mounted=1/m);

      // A known image through the device; after detach the file holds exactly it.
      await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref`, "bs=1M", `count=${size / MIB}`]);
      await ok("dd", [`if=${tmp}/ref`, `of=${dev}`, "bs=1M", "oflag=direct", "status=none"]);
      await detach(dev);
      Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
      await ok("cmp", [file, `${tmp}/ref`]);

      // Reading is still allowed: a read-only attach takes the direct path, as map says.
      assert.match(mapText.stdout, /a --read-only attach reads 100\.0% of the file/);
      const ro = await attach(file, ["--read-only"]);
      await ok("cmp", [ro, `${tmp}/ref`]);
      const [roRow] = await json<StatRow[]>(["stat", "--json", ro]);
      assert.equal(roRow?.baseMode, "fast", roRow?.modeReason);
      assert.equal(roRow?.directPathOff, undefined);
      assert.ok((roRow?.counters.bytesRead.direct ?? 0) >= size, "read on the direct path");
      await detach(ro);
    });
  },
});

Deno.test("map, doctor and a read-write attach agree with the kernel on opening a mounted filesystem's device", async () => {
  await withHostFs(async (mnt, tmp) => {
    const file = `${mnt}/small.img`;
    const size = 4 * MIB;
    await ok("dd", ["if=/dev/zero", `of=${file}`, "bs=1M", `count=${size / MIB}`, "conv=fsync"]);
    const opens = scratchOpensForWriting();
    assert.equal(opens, !bootedRefusing(), "the kernel does what the command line says");
    const map = await json<Record<string, unknown>>(["map", "--json", file]);
    assert.equal(map["deviceWritable"], opens);
    assert.equal(map["directPathOff"], opens ? null : CODE);
    const doc = await json<{ bdevWriteMounted: { allowed: boolean | null } }>(["doctor", "--json"]);
    // Refused only when the kernel refuses (the VM has no kernel config: otherwise "unknown").
    if (opens) assert.notEqual(doc.bdevWriteMounted.allowed, false);
    else assert.equal(doc.bdevWriteMounted.allowed, false);

    // The server opens the device the same way: direct writes exactly when it opens.
    const dev = await attach(file);
    await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref`, "bs=1M", `count=${size / MIB}`]);
    await ok("dd", [`if=${tmp}/ref`, `of=${dev}`, "bs=1M", "oflag=direct", "status=none"]);
    const [row] = await json<StatRow[]>(["stat", "--json", dev]);
    assert.equal(row?.baseMode, opens ? "fast" : "file", row?.modeReason);
    assert.equal(row?.directPathOff, opens ? undefined : CODE);
    const direct = row?.counters.bytesWritten.direct ?? 0;
    assert.ok(opens ? direct >= size : direct === 0, `${direct} bytes written directly`);
    await detach(dev);
    Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
    await ok("cmp", [file, `${tmp}/ref`]);
  });
});
