// Power loss, end to end: the test VM loses power (sysrq 'b', no sync; QEMU exits on the reset)
// while records are being written through fastloop with flushes and FUA writes, and the same
// disk is booted again to check that every record acknowledged as durable survived.
//
// Boot 1 (vm_crash.ts) prints `POWER-DURABLE DEV STREAM SEQ` after each fsync / FUA write has
// completed; this side takes the highest seqs from the console it saw (a line lost with the
// power only lowers them), then boot 2 (vm_check.ts) reads the records back through the
// filesystem and through fastloop. Device B, a buffered loop device written by a lying writer
// (no fsync, no O_DSYNC), must come back with records missing: that is the proof that this test
// can catch a device that acknowledges from memory.
//
// What it proves and what not: QEMU writes the guest's disk with cache=none (O_DIRECT on the
// image file), and the host itself keeps running, so what a guest crash loses is the guest's
// memory — its page cache, ext4's uncommitted journal, requests not yet sent to the virtio disk.
// That is exactly where a server that acknowledged too early would hold data. A lost write
// cache of the physical disk (the host losing power) is not simulated; that part rests on
// fastloop passing FLUSH and FUA on to the filesystem's device (fdatasync / RWF_DSYNC).
// Direct-path records (already allocated blocks) reach QEMU as soon as the server's O_DIRECT write
// completes, so what this mostly tests is the file path: records written into the file's holes
// are durable only once the server's fsync of the file commits ext4's allocation. Checked once on
// 6.12 by breaking fastloop on purpose (FLUSH completed without fsync, FUA dropped): 32 of the 128
// durable records came back as zeros (the first one, flush seq 33, in a hole), and this test
// failed.
//
// Runs once per kernel in FASTLOOP_TEST_KERNELS (default "6.12 7.3"; empty: ignored).

import assert from "node:assert/strict";
import { lastDurable } from "./records.ts";

const ROOT = decodeURIComponent(new URL("../../", import.meta.url).pathname);
const kernels = (Deno.env.get("FASTLOOP_TEST_KERNELS") ?? "6.12 7.3").split(/\s+/).filter(Boolean);
const VM_TIMEOUT_S = Deno.env.get("FASTLOOP_VM_TIMEOUT") ?? "900";

async function vm(kernel: string, disk: string, args: string[], crashOk: boolean) {
  const out = await new Deno.Command("bash", {
    args: [
      `${ROOT}scripts/vm.sh`,
      "--kernel",
      kernel,
      "--timeout",
      VM_TIMEOUT_S,
      "--keep-disk",
      disk,
      "--disk-size",
      "2G",
      ...(crashOk ? ["--crash-ok"] : []),
      "--",
      ...args,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

function tail(text: string, lines = 30): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

if (kernels.length === 0) {
  Deno.test({
    name: "power loss (no kernel in FASTLOOP_TEST_KERNELS)",
    ignore: true,
    fn() {},
  });
}

for (const kernel of kernels) {
  Deno.test(`power loss on ${kernel}: every record acknowledged after a flush or as FUA survives, and a lying buffered loop device is caught`, async () => {
    const dir = Deno.makeTempDirSync({ dir: `${ROOT}.cache`, prefix: "power-" });
    const disk = `${dir}/disk.img`;
    try {
      const t0 = performance.now();
      const first = await vm(
        kernel,
        disk,
        ["deno", "run", "--allow-all", "--no-check", "test/power/vm_crash.ts"],
        true,
      );
      const t1 = performance.now();
      assert.equal(first.code, 0, `first boot: ${tail(first.stdout)}\n${tail(first.stderr, 5)}`);
      assert.match(first.stdout, /power: [0-9]+ records per stream .* cutting the power/);
      assert.match(
        first.stderr,
        /stopped without an exit status/,
        "the VM went down without the clean exit of init (no sync, no status)",
      );
      const last = lastDurable(first.stdout);
      const a = last["A"];
      const b = last["B"];
      assert.ok(a && b, `durable lines for both devices: ${JSON.stringify(last)}`);
      // Enough acknowledged to mean something: 4 flushes, 32 FUA writes (vm_crash.ts MIN_SEQ).
      assert.ok(a.flush >= 31 && a.fua >= 31, `A durable: ${JSON.stringify(a)}`);
      assert.ok(b.flush >= 31 && b.fua >= 31, `B durable: ${JSON.stringify(b)}`);

      const second = await vm(kernel, disk, [
        "deno",
        "run",
        "--allow-all",
        "--no-check",
        "test/power/vm_check.ts",
        String(a.flush),
        String(a.fua),
        String(b.flush),
        String(b.fua),
      ], false);
      const t2 = performance.now();
      const m = /POWER-RESULT (\{.*\})/.exec(second.stdout);
      assert.ok(m, `second boot printed no result (${second.code}): ${tail(second.stdout)}`);
      const result = JSON.parse(m[1]!);
      console.log(
        `kernel ${kernel}: durable A flush<=${a.flush} fua<=${a.fua}, B (liar) flush<=${b.flush} ` +
          `fua<=${b.fua}; result ${JSON.stringify(result)}; boots ${
            ((t1 - t0) / 1000).toFixed(0)
          } s + ${((t2 - t1) / 1000).toFixed(0)} s`,
      );
      assert.equal(
        result.fileA.missing,
        0,
        `file A lost durable records: ${result.fileA.firstBad}`,
      );
      assert.equal(result.fileA.checked, a.flush + a.fua + 2);
      assert.equal(result.deviceA.missing, 0, `device A: ${result.deviceA.firstBad}`);
      assert.equal(result.fsck, "clean", "host ext4 clean after the power cut");
      assert.ok(result.fileB.missing > 0, "the lying loop setup lost records it acknowledged");
      assert.equal(second.code, 0, tail(second.stdout));
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  });
}
