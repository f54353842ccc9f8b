// A device that is a region of its file (`attach --offset/--sizelimit`), its sector size and
// `fastloop stat`'s table, without ublk. The engine runs on a real ext4 on a loop device
// (lib/event_loop.ts through test/host/engine_harness.ts); the oracles are the file read with
// O_DIRECT through the filesystem (`dd`), `filefrag` and the file's bytes outside the region,
// which must not change.

import assert from "node:assert/strict";
import { EIO } from "../../ffi/errno.ts";
import {
  UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
  UBLK_IO_OP_WRITE_ZEROES,
} from "../../ffi/ublk_cmd.ts";
import { Counter } from "../../lib/queue_state.ts";
import { growableLength, parseByteSize, parseSectorSize, regionLength } from "../../lib/region.ts";
import { COLUMNS, selectColumns, table } from "../../lib/commands/stat.ts";
import { ExitCode, UserError } from "../../lib/errors.ts";
import { Harness } from "./engine_harness.ts";
import { isRoot, patternBytes, readDirect, run, withFilesystem, writeAt } from "./fs_fixtures.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const root = isRoot();

/** Equal bytes; a failure names the first differing offset (a diff of MiBs would not fit). */
function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const at = actual.findIndex((b, i) => b !== expected[i]);
  assert.equal(at, -1, `${what}: the bytes differ first at offset ${at}`);
}

Deno.test("parseByteSize() reads sizes as losetup writes them and refuses anything else (usage)", () => {
  const ok: Array<[string, number]> = [
    ["0", 0],
    ["4096", 4096],
    ["1K", 1024],
    ["1k", 1024],
    ["1KiB", 1024],
    ["1KB", 1000],
    ["3M", 3 * MiB],
    ["2GiB", 2 * 1024 * MiB],
    ["1T", 1024 ** 4],
  ];
  for (const [text, n] of ok) assert.equal(parseByteSize("attach", "offset", text), n, text);
  assert.equal(parseByteSize("attach", "offset", undefined), undefined);
  for (const bad of ["", "-1", "1.5M", "0x10", "1e3", " 1", "1 M", "1MiBB", "1Ki", "M", "1X"]) {
    assert.throws(
      () => parseByteSize("attach", "offset", bad),
      (e: unknown) =>
        e instanceof UserError && e.exitCode === ExitCode.usage &&
        /--offset must be a size in bytes/.test(e.message),
      JSON.stringify(bad),
    );
  }
  assert.throws(() => parseByteSize("attach", "sizelimit", "99999999P"), /too large/);
});

Deno.test("parseSectorSize() takes 512 and 4096 only (usage error otherwise)", () => {
  assert.equal(parseSectorSize("attach", "512"), 512);
  assert.equal(parseSectorSize("attach", "4096"), 4096);
  for (const bad of ["1024", "2048", "8192", "256", "0", "4k", "", "x".repeat(100)]) {
    assert.throws(
      () => parseSectorSize("attach", bad),
      (e: unknown) =>
        e instanceof UserError && e.exitCode === ExitCode.usage &&
        /--sector-size must be 512 or 4096/.test(e.message),
      bad.slice(0, 10),
    );
  }
});

Deno.test("regionLength() is the rest of the file or the size limit, whole sectors, inside the file", () => {
  const at = (offsetBytes: number, sizeLimitBytes: number, sectorBytes = 512) => ({
    offsetBytes,
    sizeLimitBytes,
    sectorBytes,
  });
  const f = "'f'";
  assert.equal(regionLength(f, 8 * MiB, at(0, 0)), 8 * MiB);
  assert.equal(regionLength(f, 8 * MiB, at(MiB, 0)), 7 * MiB);
  assert.equal(regionLength(f, 8 * MiB, at(MiB, 2 * MiB)), 2 * MiB);
  // A limit past the file's end is cut to the file, as loop does (it may grow into it).
  assert.equal(regionLength(f, 8 * MiB, at(MiB, 64 * MiB)), 7 * MiB);
  assert.equal(growableLength(8 * MiB, at(MiB, 64 * MiB)), 7 * MiB);
  assert.equal(growableLength(100 * MiB, at(MiB, 64 * MiB)), 64 * MiB);
  const refused: Array<[number, ReturnType<typeof at>, RegExp]> = [
    [8 * MiB, at(8 * MiB, 0), /--offset 8388608 is past the end of 'f' \(8388608 bytes\)/],
    [8 * MiB, at(9 * MiB, 0), /is past the end/],
    [8 * MiB, at(1000, 0), /--offset 1000 is not a multiple of the sector size \(512 bytes\)/],
    [8 * MiB, at(512, 0, 4096), /--offset 512 is not a multiple of the sector size \(4096/],
    [8 * MiB, at(0, 1000), /--sizelimit 1000 is not a multiple/],
    [1000 * 512 + 1000, at(0, 0), /'f' is 513000 bytes, not a multiple of 512 \(extend/],
    [8 * MiB + 512, at(0, 0, 4096), /is 8389120 bytes, not a multiple of 4096/],
    [8 * MiB + 512, at(4096, 0, 4096), /The region of 'f' from offset 4096 is 8385024 bytes/],
  ];
  for (const [size, layout, pattern] of refused) {
    assert.throws(
      () => regionLength(f, size, layout),
      (e: unknown) =>
        e instanceof UserError && e.exitCode === ExitCode.badInput &&
        pattern.test(e.message),
      JSON.stringify(layout),
    );
  }
});

Deno.test({
  name: "engine serves a region of the file: reads, writes, bounds and punches stay inside it",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      // 6 MiB of data, then a 2 MiB hole; the device is [1 MiB, 1 MiB + 6 MiB): 5 MiB of data and
      // 1 MiB of the hole, so it has every route (device, zeros, file).
      const file = `${fs.dir}/img`;
      const data = patternBytes(6 * MiB, 21);
      await writeAt(file, 0, data);
      await run("truncate", ["-s", "8M", file]);
      const offset = MiB;
      const length = 6 * MiB;
      const before = await readDirect(file, 0, 8 * MiB);
      const h = new Harness(file, fs.device, length, { regionOffsetBytes: offset });
      try {
        // Device offset 0 is file offset 1 MiB; the last MiB of the device is the file's hole.
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 0, MiB), MiB);
        assertSameBytes(h.buffer(0, MiB), data.subarray(MiB, 2 * MiB), "device offset 0");
        assert.equal(h.serve(0, UBLK_IO_OP_READ, 5 * MiB, MiB), MiB);
        assertSameBytes(h.buffer(0, MiB), new Uint8Array(MiB), "the region's last MiB");
        assert.ok(h.counter(Counter.bytesReadDirect) >= MiB, "the data came from the device");
        assert.equal(h.counter(Counter.bytesReadZero), MiB, "the hole read as zeros");

        // Past the region's end: EIO, though the file goes on for another MiB.
        assert.equal(h.serve(1, UBLK_IO_OP_READ, length, 4 * KiB), -EIO);
        assert.equal(h.serve(1, UBLK_IO_OP_WRITE, length - 4 * KiB, 8 * KiB), -EIO);

        // Writes land at region offset + device offset: over data (direct) and into the hole
        // (through the file).
        const a = patternBytes(64 * KiB, 22);
        h.fill(2, a);
        assert.equal(h.serve(2, UBLK_IO_OP_WRITE, 128 * KiB, a.length), a.length);
        const b = patternBytes(128 * KiB, 23);
        h.fill(3, b);
        assert.equal(h.serve(3, UBLK_IO_OP_WRITE, 5 * MiB + 64 * KiB, b.length), b.length);
        assert.ok(h.counter(Counter.bytesWrittenDirect) >= a.length);
        assert.equal(h.counter(Counter.bytesWrittenFile), b.length);
        // Discard and write-zeroes over the region's first and last 256 KiB.
        assert.equal(h.serve(0, UBLK_IO_OP_DISCARD, 0, 256 * KiB), 0);
        assert.equal(h.serve(1, UBLK_IO_OP_WRITE_ZEROES, length - 256 * KiB, 256 * KiB), 0);

        const want = before.slice();
        want.set(a, offset + 128 * KiB);
        want.set(b, offset + 5 * MiB + 64 * KiB);
        want.fill(0, offset, offset + 256 * KiB);
        want.fill(0, offset + length - 256 * KiB, offset + length);
        const after = await readDirect(file, 0, 8 * MiB);
        assertSameBytes(after.subarray(0, offset), before.subarray(0, offset), "before the region");
        assertSameBytes(
          after.subarray(offset + length),
          before.subarray(offset + length),
          "after the region",
        );
        assertSameBytes(after, want, "the whole file");
        assert.equal(Deno.statSync(file).size, 8 * MiB, "the file's size is unchanged");
      } finally {
        h.close();
      }
    });
  },
});

Deno.test({
  name: "engine grown by setDeviceSize serves the new tail, which it refused before",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/img`;
      await writeAt(file, 0, patternBytes(2 * MiB, 31));
      const h = new Harness(file, fs.device, MiB, { regionOffsetBytes: MiB });
      try {
        assert.equal(h.serve(0, UBLK_IO_OP_READ, MiB, 4 * KiB), -EIO, "past the device's end");
        // What `resize --size` does: the server grows the file on its own fd, then the queues.
        await run("truncate", ["-s", "4M", file]);
        h.engine.setDeviceSize(3 * MiB);
        for (const at of [MiB, 2 * MiB]) {
          assert.equal(h.serve(0, UBLK_IO_OP_READ, at, MiB), MiB);
          assertSameBytes(h.buffer(0, MiB), new Uint8Array(MiB), "the new tail is a hole");
        }
        const c = patternBytes(64 * KiB, 32);
        h.fill(1, c);
        assert.equal(h.serve(1, UBLK_IO_OP_WRITE, 3 * MiB - 64 * KiB, c.length), c.length);
        assertSameBytes(await readDirect(file, 4 * MiB - 64 * KiB, c.length), c, "the write");
        assert.equal(h.serve(2, UBLK_IO_OP_READ, 3 * MiB, 4 * KiB), -EIO, "still bounded");
      } finally {
        h.close();
      }
    });
  },
});

Deno.test("stat's default columns are the ones losetup -l users scan; --verbose has every column", () => {
  const brief = selectColumns(undefined, false).map((c) => c.name);
  assert.deepEqual(brief, [
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
  assert.equal(selectColumns(undefined, true).length, COLUMNS.length);
  assert.deepEqual(
    selectColumns("size,Device, offset", false).map((c) => c.name),
    ["SIZE", "DEVICE", "OFFSET"],
  );
  assert.throws(
    () => selectColumns("DEVICE,BOGUS", false),
    (e: unknown) =>
      e instanceof UserError && e.exitCode === ExitCode.usage &&
      /unknown column "BOGUS" in --output \(columns: DEVICE,FILE,/.test(e.message),
  );
  const row = {
    device: "/dev/ublkb3",
    file: "/mnt/disk image.img",
    offsetBytes: 1048576,
    sizeLimitBytes: 4194304,
    sizeBytes: 4194304,
    mode: "fast",
    lease: "write",
    readOnly: false,
    server: { pid: 42, state: "running" },
    counters: {
      bytesRead: { direct: 4096, file: 512, zero: 0 },
      bytesWritten: { direct: 0, file: 0 },
    },
  };
  const lines = table([row], selectColumns(undefined, false)).split("\n");
  assert.equal(lines.length, 2);
  assert.deepEqual(lines[0]!.split(/\s+/), brief);
  assert.deepEqual(lines[1]!.split(/\s{2,}/), [
    "/dev/ublkb3",
    '"/mnt/disk image.img"',
    "1048576",
    "4194304",
    "4.0M",
    "mixed",
    "write",
    "0",
    "running(42)",
  ]);
  assert.equal(table([row], selectColumns("DEVICE,PATH", false), false), "/dev/ublkb3  mixed");
});
