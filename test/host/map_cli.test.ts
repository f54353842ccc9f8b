// `fastloop map` run as a subprocess, exactly as a user runs it: its --json output checked
// extent by extent against `filefrag -v`, the device against `findmnt`, the byte summary against
// sums computed from filefrag's extents, and every bad input against exit code and one-line
// stderr.

import assert from "node:assert/strict";
import type { MapReport } from "../../lib/commands/map.ts";
import { onLeaseBreak, setLease } from "../../ffi/fcntl.ts";
import { close, O_RDWR, open } from "../../ffi/libc.ts";
import {
  type CommandResult,
  filefrag,
  type FsKind,
  isRoot,
  makeScenarios,
  run,
  testDir,
  withFilesystem,
  withTmpfs,
} from "./fs_fixtures.ts";

const MAIN = decodeURIComponent(new URL("../../main.ts", import.meta.url).pathname);
const root = isRoot();

function fastloop(...args: string[]): Promise<CommandResult> {
  return run(Deno.execPath(), ["run", "-A", "--no-check", MAIN, ...args], { allowFail: true });
}

async function mapJson(path: string): Promise<MapReport> {
  const r = await fastloop("map", "--json", path);
  assert.equal(r.code, 0, `map --json ${path}: ${r.stderr}`);
  return JSON.parse(r.stdout) as MapReport;
}

for (const kind of ["ext4", "xfs"] as FsKind[]) {
  Deno.test({
    name: `fastloop map --json on ${kind} agrees with filefrag -v extent by extent`,
    ignore: !root,
    async fn() {
      const mkfsArgs = kind === "xfs" ? ["-m", "reflink=1"] : [];
      await withFilesystem(kind, { mkfsArgs }, async (fs) => {
        const source = (await run("findmnt", ["-no", "SOURCE", "--target", fs.dir])).stdout.trim();
        for (const s of await makeScenarios(fs)) {
          const report = await mapJson(s.path);
          const ff = await filefrag(s.path);
          assert.equal(report.filesystem, kind);
          assert.equal(report.eligible, true, `${s.name}: ${report.ineligibleReason}`);
          assert.equal(report.device?.path, source, "device is findmnt's SOURCE");
          assert.equal(report.sizeBytes, ff.sizeBytes);
          assert.equal(report.blockSize, ff.blockSize);
          assert.equal(report.extents.length, ff.extents.length, `${s.name}: extent count`);
          let written = 0;
          let unwritten = 0;
          report.extents.forEach((e, i) => {
            const f = ff.extents[i]!;
            const at = `${s.name} extent ${i}`;
            assert.equal(e.logicalBlock, f.logicalBlock, `${at} logical`);
            assert.equal(e.physicalBlock, f.physicalBlock, `${at} physical`);
            assert.equal(e.lengthBlocks, f.lengthBlocks, `${at} length`);
            assert.equal(e.lengthBytes, f.lengthBlocks * ff.blockSize, `${at} bytes`);
            assert.equal(e.physicalBytes, f.physicalBlock * ff.blockSize, `${at} physical bytes`);
            assert.deepEqual(e.flagNames, f.flags.filter((n) => n !== "eof"), `${at} flags`);
            // The verdict, from filefrag's flags: shared → file; unwritten → zeros; else direct.
            const inFile = Math.max(
              0,
              Math.min((f.logicalBlock + f.lengthBlocks) * ff.blockSize, ff.sizeBytes) -
                f.logicalBlock * ff.blockSize,
            );
            if (f.flags.includes("shared")) {
              assert.equal(e.kind, "via-file", `${at} shared is not direct`);
              assert.equal(e.reason, "shared");
              assert.equal(e.read, "file");
              assert.equal(e.write, "file");
            } else if (f.flags.includes("unwritten")) {
              assert.equal(e.kind, "unwritten", at);
              assert.equal(e.read, "zeros");
              assert.equal(e.write, "file");
              unwritten += inFile;
            } else {
              assert.equal(e.kind, "direct", at);
              assert.equal(e.read, "direct");
              assert.equal(e.write, "direct");
              written += inFile;
            }
          });
          assert.equal(report.summary.directBytes, written, `${s.name}: direct bytes`);
          // Holes: exactly the file's bytes that no filefrag extent covers.
          const covered = new Uint8Array(ff.sizeBytes);
          for (const f of ff.extents) {
            covered.fill(
              1,
              f.logicalBlock * ff.blockSize,
              (f.logicalBlock + f.lengthBlocks) * ff.blockSize,
            );
          }
          const inHole = new Uint8Array(ff.sizeBytes);
          for (const h of report.holes) {
            inHole.fill(1, h.logicalBytes, h.logicalBytes + h.lengthBytes);
          }
          assert.ok(covered.every((c, i) => c !== inHole[i]), `${s.name}: holes vs filefrag`);
          assert.equal(report.summary.holeBytes, inHole.reduce((a, b) => a + b, 0));
          assert.equal(report.summary.unwrittenBytes, unwritten, `${s.name}: unwritten bytes`);
          assert.equal(report.summary.fastPathShare, written / ff.sizeBytes);
          if (s.name === "reflinked") {
            assert.ok(report.extents.length > 0 && report.summary.directBytes === 0);
          }
          if (s.name === "clone-rewritten") {
            // The rewritten range was copied on write: direct now; the rest still shared.
            assert.ok(report.extents.some((e) => e.reason === "shared"));
            assert.ok(report.extents.some((e) => e.kind === "direct"));
          }
        }
      });
    },
  });
}

Deno.test({
  name: "fastloop map prints a filefrag-like table with the verdict and a summary",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const path = `${fs.dir}/file`;
      await run("fallocate", ["-l", "1M", path]);
      await run("dd", [`if=/dev/urandom`, `of=${path}`, "bs=64k", "count=2", "conv=notrunc,fsync"]);
      const r = await fastloop("map", path);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, new RegExp(`Filesystem: ext4 on ${fs.device} `));
      assert.match(r.stdout, /Direct path: eligible/);
      assert.match(r.stdout, /^\s+0:\s+0\.\.\s+31:.*direct\s+direct/m);
      assert.match(r.stdout, /unwritten\S*\s+zeros\s+file\s+unwritten: reads as zeros/);
      assert.match(r.stdout, /Fast path: 12\.5% of the file \(131072 bytes/);
    });
  },
});

/** A bad input: exit code, exactly one line on stderr, no stack trace. */
async function assertBadInput(args: string[], code: number, message: RegExp): Promise<void> {
  const r = await fastloop(...args);
  assert.equal(r.code, code, `${args.join(" ")}: exit ${r.code}, stderr ${r.stderr}`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `one line on stderr, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^fastloop: /);
  assert.match(lines[0]!, message);
  assert.doesNotMatch(r.stderr, /\bat .*\.ts:\d+/, "no stack trace");
  assert.equal(r.stdout, "");
}

Deno.test("fastloop map rejects a missing path, a directory and device nodes (exit 3)", async () => {
  const dir = await Deno.makeTempDir({ dir: testDir(), prefix: "fastloop-map-" });
  try {
    await assertBadInput(["map", `${dir}/nope`], 3, /No such file: .*nope/);
    await assertBadInput(["map", dir], 3, /is a directory, not a regular file/);
    await assertBadInput(["map", "/dev/null"], 3, /\/dev\/null is a character device/);
    await run("mkfifo", [`${dir}/fifo`]);
    await assertBadInput(["map", `${dir}/fifo`], 3, /is a FIFO, not a regular file/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "fastloop map rejects a block device (exit 3)",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      await assertBadInput(["map", fs.device], 3, /is a block device, not a regular file/);
    });
  },
});

Deno.test({
  name: "fastloop map says a tmpfs file has no extent map (exit 3)",
  ignore: !root,
  async fn() {
    await withTmpfs(async (dir) => {
      await Deno.writeTextFile(`${dir}/file`, "data");
      await assertBadInput(
        ["map", `${dir}/file`],
        3,
        /tmpfs has no extent map: FIEMAP .*EOPNOTSUPP/,
      );
    });
  },
});

Deno.test("fastloop map rejects unknown flags and a missing FILE (exit 2)", async () => {
  await assertBadInput(["map", "--bogus", "/etc/hostname"], 2, /Unknown option '--bogus'/);
  await assertBadInput(["map"], 2, /expected exactly one FILE, got 0/);
  await assertBadInput(["map", "a", "b"], 2, /expected exactly one FILE, got 2/);
});

Deno.test({
  name: "fastloop map --json reports ext4 inline data in bytes, via the file, as filefrag does",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", { mkfsArgs: ["-O", "inline_data"] }, async (fs) => {
      const path = `${fs.dir}/tiny`;
      await Deno.writeTextFile(path, "kept in the inode\n");
      const report = await mapJson(path);
      const ff = await filefrag(path);
      assert.equal(report.extents.length, 1);
      const [e, f] = [report.extents[0]!, ff.extents[0]!];
      assert.equal(e.logicalBlock, f.logicalBlock);
      assert.equal(e.physicalBlock, f.physicalBlock);
      assert.equal(e.lengthBlocks, f.lengthBlocks);
      assert.equal(e.lengthBlocks, 18, "bytes, not blocks");
      assert.deepEqual(e.flagNames, ["last", "not_aligned", "inline"]);
      assert.equal(e.kind, "via-file");
      assert.equal(e.reason, "inline");
      assert.equal(report.summary.viaFileBytes, 18);
      assert.equal(report.summary.fastPathShare, 0);
    });
  },
});

Deno.test("fastloop map on a file whose write lease holder lets go maps it; one that does not gets exit 4", async () => {
  const dir = await Deno.makeTempDir({ dir: testDir(), prefix: "fastloop-map-lease-" });
  const path = `${dir}/leased`;
  await Deno.writeFile(path, new Uint8Array(65536).fill(1));
  const fd = open(path, O_RDWR);
  let answer = true;
  const breaks: string[] = [];
  const unlisten = onLeaseBreak(fd, (to) => {
    breaks.push(to);
    if (answer) setLease(fd, "unlock", path); // what an attached device's server does
  }, path);
  try {
    // A holder that answers: map waits the few ms it takes, then maps.
    setLease(fd, "write", path);
    const ok = await fastloop("map", "--json", path);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal((JSON.parse(ok.stdout) as MapReport).sizeBytes, 65536);
    assert.deepEqual(breaks, ["read"]);

    // A holder that never answers: map gives up after its 3 s, exit 4, one line.
    answer = false;
    setLease(fd, "write", path);
    const t0 = performance.now();
    const busy = await fastloop("map", path);
    const ms = performance.now() - t0;
    assert.equal(busy.code, 4, busy.stderr);
    assert.match(busy.stderr, /^fastloop: .*leased by another process that did not let go/);
    assert.equal(busy.stderr.trimEnd().split("\n").length, 1);
    assert.ok(ms < 20_000, `gave up after ${ms} ms, not the 45 s lease-break time`);
  } finally {
    setLease(fd, "unlock", path);
    unlisten();
    close(fd);
    await Deno.remove(dir, { recursive: true });
  }
});
