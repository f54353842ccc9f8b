// Load, leaks and CLI concurrency, inside the test VM: the short version of `deno task soak`
// (bench/soak.ts holds the pieces both use). Oracles: fio's own verify, cmp of the backing files
// read through the host filesystem, and the kernel's views of what could leak (/sys/class/ublk-char,
// /sys/block, /dev, /proc/locks, /proc/PID/{cmdline,status,fd}) — never fastloop's own registry.

import assert from "node:assert/strict";
import {
  assertFlat,
  assertNoLeaks,
  detach,
  fastloop,
  fastloopProcesses,
  formatCounts,
  leakCounts,
  memoryGrowth,
  memoryTable,
  MIB,
  ok,
  runCycles,
  runLoad,
  summary,
  withHostFs,
} from "../../bench/soak.ts";
import { SCRATCH_DISK } from "./support.ts";
import { setLease, trySetLease } from "../../ffi/fcntl.ts";
import { close, O_RDWR, open } from "../../ffi/libc.ts";

const LOAD_DEVICES = 8;
const LOAD_SECONDS = 20;
const CYCLES = 8;

/**
 * A write lease is granted only when no process anywhere has the file open (fcntl(2)): taking
 * one proves that no server, supervisor or stray fd still holds the file.
 */
function nobodyHasOpen(file: string): boolean {
  const fd = open(file, O_RDWR);
  try {
    if (!trySetLease(fd, "write", file)) return false;
    setLease(fd, "unlock", file);
    return true;
  } finally {
    close(fd);
  }
}

Deno.test(`${LOAD_DEVICES} devices attached at once under mixed fio verify: no errors, memory and fds flat, nothing left`, async () => {
  const before = leakCounts();
  await withHostFs(SCRATCH_DISK, async (mnt, tmp) => {
    const load = await runLoad({
      dir: mnt,
      tmp,
      devices: LOAD_DEVICES,
      sizeMiB: 32,
      seconds: LOAD_SECONDS,
      sampleSec: 3,
    });
    console.log(
      `load: ${LOAD_DEVICES} attaches at once took ${load.attachSec.toFixed(1)} s; fio wrote ${
        (load.writeBytes / MIB).toFixed(0)
      } MiB and verified ${(load.readBytes / MIB).toFixed(0)} MiB in ${LOAD_SECONDS} s`,
    );
    console.log(memoryTable(load.samples));
    for (const g of memoryGrowth(load.samples)) {
      console.log(
        `  ${g.role} ${g.pid}: max RSS ${g.firstKiB} KiB (first half) -> ${g.secondKiB} KiB, ` +
          `fds ${g.fdsFirst} -> ${g.fdsLast}`,
      );
    }
    const servers = load.samples[1]?.usage;
    assert.equal(
      [...(servers?.values() ?? [])].filter((u) => u.role === "server").length,
      LOAD_DEVICES,
      "one server per device was sampled",
    );
    // A 20 s run is mostly warm-up: the first IOs map each queue's buffers and compile the hot
    // path (measured on a loaded host: 66-88 MiB before IO, up to +19 MiB once it ran). So this
    // bound only catches gross growth; fds must not move at all. The soak (10 min, `deno task
    // soak`) holds RSS to 8 MiB or 10% between the halves of its run.
    assertFlat(load.samples, (firstKiB) => Math.max(32 * 1024, firstKiB * 0.5));
    for (let i = 0; i < LOAD_DEVICES; i++) {
      assert.ok(nobodyHasOpen(`${mnt}/load-${i}.img`), `load-${i}.img is open by nobody`);
    }
  });
  const after = leakCounts();
  console.log(`leaks after the load: ${formatCounts(after)}`);
  assertNoLeaks(after, before, "after the load");
});

Deno.test(`${CYCLES} attach/detach cycles leave no device, ublk id, process, lease, fd or registry entry`, async () => {
  const before = leakCounts();
  await withHostFs(SCRATCH_DISK, async (mnt, tmp) => {
    const file = `${mnt}/cycle.img`;
    await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref`, "bs=1M", "count=2", "status=none"]);
    await ok("dd", [`if=${tmp}/ref`, `of=${file}`, "bs=1M", "status=none"]);
    await ok("truncate", ["-s", "32M", file]);
    const r = await runCycles(file, `${tmp}/ref`, CYCLES, (i) => {
      if (i % 4 === 0) console.log(`  after cycle ${i}: ${formatCounts(leakCounts())}`);
    });
    console.log(`cycles: attach ${summary(r.attachSec)}; detach ${summary(r.detachSec)}`);
    // The kernel hands out the lowest free id: a leaked one would push the next ones up.
    assert.deepEqual(new Set(r.ids), new Set([before.ublkIds]), `ids reused: ${r.ids.join(",")}`);
    assert.ok(nobodyHasOpen(file), "the file is open by nobody");
  });
  const after = leakCounts();
  console.log(
    `leaks after ${CYCLES} cycles: ${formatCounts(after)} (before: ${formatCounts(before)})`,
  );
  assertNoLeaks(after, before, `after ${CYCLES} cycles`);
  assert.equal(after.logs - before.logs, CYCLES, "one log per attach, kept for the user");
});

Deno.test("parallel attaches of one file by six different paths: exactly one wins, the others exit 4 in one line", async () => {
  const before = leakCounts();
  await withHostFs(SCRATCH_DISK, async (mnt) => {
    const file = `${mnt}/same.img`;
    await ok("truncate", ["-s", "16M", file]);
    Deno.mkdirSync(`${mnt}/sub`);
    Deno.symlinkSync(file, `${mnt}/sub/symlink.img`);
    Deno.linkSync(file, `${mnt}/sub/hardlink.img`);
    const paths = [
      file,
      file,
      `${mnt}/sub/symlink.img`,
      `${mnt}/sub/hardlink.img`,
      `${mnt}/sub/../same.img`,
      `${mnt}//./same.img`,
    ];
    const racers = await Promise.all(paths.map((p) => fastloop(["attach", p])));
    const report = racers.map((r, i) => `${paths[i]}: ${r.code} ${r.stdout}${r.stderr}`).join("\n");
    const winners = racers.filter((r) => r.code === 0);
    assert.equal(winners.length, 1, report);
    const dev = winners[0]!.stdout.trim();
    for (const loser of racers.filter((r) => r.code !== 0)) {
      assert.equal(loser.code, 4, report);
      assert.equal(loser.stderr.trimEnd().split("\n").length, 1, report);
      assert.match(loser.stderr, /^fastloop: .*(already attached|in use by another process)/);
      assert.doesNotMatch(loser.stderr, /\n\s+at /);
      assert.equal(loser.stdout, "");
    }
    assert.equal(leakCounts().ublkIds - before.ublkIds, 1, "one device in the kernel");
    assert.equal(fastloopProcesses().length - before.processes, 2, "one supervisor, one server");
    await detach(dev);
  });
  assertNoLeaks(leakCounts(), before, "after the race");
});

Deno.test("detach --all racing an attach: the attach wins (device listed and detachable) or loses cleanly", async () => {
  const before = leakCounts();
  await withHostFs(SCRATCH_DISK, async (mnt, tmp) => {
    const file = `${mnt}/race.img`;
    await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref`, "bs=1M", "count=4", "status=none"]);
    await ok("dd", [`if=${tmp}/ref`, `of=${file}`, "bs=1M", "status=none"]);
    const outcomes: string[] = [];
    // detach --all over and over for as long as the attach runs, so some land before its server
    // exists, some while it starts (Deno start-up takes seconds under TCG), some around the
    // device going live. A fixed delay always landed before the record existed (measured).
    for (const round of [1, 2]) {
      let settled = false;
      const attaching = fastloop(["attach", file]).finally(() => (settled = true));
      const codes: number[] = [];
      while (!settled) {
        const d = await fastloop(["detach", "--all"]);
        codes.push(d.code);
        if (d.code !== 0) {
          // Refusing a device mid-start is allowed; a stack trace or a multi-line mess is not.
          assert.equal(d.stderr.trimEnd().split("\n").length, 1, `detach --all: ${d.stderr}`);
          assert.match(d.stderr, /^fastloop: /);
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      const attached = await attaching;
      const label = `round ${round} (${codes.length} detach --all, exits ${[...new Set(codes)]})`;
      // Either way the state is consistent: what the kernel has is what stat lists.
      const st = await fastloop(["stat", "--json"]);
      assert.equal(st.code, 0, st.stderr);
      const rows = JSON.parse(st.stdout) as Array<{ device: string; server: { state: string } }>;
      const kernel = leakCounts();
      if (attached.code === 0) {
        const dev = attached.stdout.trim();
        if (rows.length === 1) {
          outcomes.push(`${label}: attach won`);
          assert.equal(rows[0]!.device, dev);
          assert.equal(rows[0]!.server.state, "running");
          assert.equal(kernel.ublkIds - before.ublkIds, 1);
          await ok("cmp", [dev, `${tmp}/ref`]);
          await detach(dev);
        } else {
          outcomes.push(`${label}: attached, then detached by --all`);
          assert.equal(rows.length, 0, st.stdout);
        }
      } else {
        outcomes.push(`${label}: attach lost (${attached.code}: ${attached.stderr.trim()})`);
        assert.equal(attached.stderr.trimEnd().split("\n").length, 1, attached.stderr);
        assert.match(attached.stderr, /^fastloop: /);
        assert.equal(rows.length, 0, st.stdout);
      }
      assertNoLeaks(leakCounts(), before, `after ${label}`);
      assert.ok(nobodyHasOpen(file), "the file is open by nobody");
    }
    console.log(`detach --all vs attach: ${outcomes.join("; ")}`);
    // The file is untouched by all of it.
    Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
    await ok("cmp", [file, `${tmp}/ref`]);
  });
  const after = leakCounts();
  assertNoLeaks(after, before, "after the races");
});
