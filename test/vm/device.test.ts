// lib/device.ts end to end inside the test VM (a kernel with ublk): createDevice serves a file on
// ext4 (on the scratch disk /dev/vda) as /dev/ublkbN. The device runs in a child Deno process
// (test/vm/device_driver.ts), so a hang is killable and a crash is visible.
// Oracles are independent of fastloop: cmp against the file read through the filesystem, fio's
// own crc32c verify, the file read back after the device is gone with the page cache dropped,
// and /sys/block for the device's existence and size.

import assert from "node:assert/strict";

const SCRATCH_DISK = "/dev/vda";
const MIB = 1024 * 1024;
/** The driver (its own module, type-checked): creates the device, READY, waits, COUNTERS. */
const DRIVER = new URL("./device_driver.ts", import.meta.url).pathname;

async function run(program: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(program, { args, stdout: "piped", stderr: "piped" })
    .output();
  const dec = new TextDecoder();
  assert.equal(
    out.code,
    0,
    `${program} ${args.join(" ")} failed (${out.code}): ${dec.decode(out.stderr)}${
      dec.decode(out.stdout)
    }`,
  );
  return dec.decode(out.stdout);
}

async function dropCaches(): Promise<void> {
  await run("sync", []);
  Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
}

/** A fresh ext4 on the scratch disk, mounted for the body, always unmounted and removed. */
async function withScratchFs(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = Deno.makeTempDirSync({ prefix: "fastloop-device-" });
  await run("/usr/sbin/mkfs.ext4", ["-q", "-F", SCRATCH_DISK]).catch(() =>
    run("mkfs.ext4", ["-q", "-F", SCRATCH_DISK])
  );
  await run("mount", [SCRATCH_DISK, dir]);
  try {
    await body(dir);
  } finally {
    await run("umount", [dir]);
    Deno.removeSync(dir, { recursive: true });
  }
}

interface Served {
  dev: string;
  /** SIGKILL the server: a crash, as far as the kernel can tell. */
  kill(): Promise<void>;
  /** Stops and deletes the device; returns the counters the server saw. */
  stop(): Promise<Record<string, unknown>>;
}

/** Starts the driver on `file`; resolves once the device is live (or fails with its stderr). */
async function serve(
  file: string,
  mode: "fast" | "file",
  queues = 1,
  recoverId?: number,
) {
  const args = ["run", "--allow-all", "--no-check", "--quiet", DRIVER, file, mode, String(queues)];
  if (recoverId !== undefined) args.push(String(recoverId));
  const child = new Deno.Command(Deno.execPath(), {
    args,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const killer = setTimeout(() => child.kill("SIGKILL"), 180_000);
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  const nextLine = async (prefix: string): Promise<string> => {
    for (;;) {
      const nl = out.indexOf("\n");
      if (nl >= 0) {
        const line = out.slice(0, nl);
        out = out.slice(nl + 1);
        if (line.startsWith(prefix)) return line.slice(prefix.length);
        continue;
      }
      const { value, done } = await lines.read();
      if (done) {
        const err = await new Response(child.stderr).text();
        throw new Error(`driver ended before ${prefix.trim()}: ${err}`);
      }
      out += value;
    }
  };
  const dev = await nextLine("READY ");
  const served: Served = {
    dev,
    async kill() {
      child.kill("SIGKILL");
      await child.status;
      clearTimeout(killer);
      await child.stderr.cancel().catch(() => {});
    },
    async stop() {
      const w = child.stdin.getWriter();
      await w.write(new TextEncoder().encode("stop\n"));
      await w.close();
      const counters = JSON.parse(await nextLine("COUNTERS ")) as Record<string, unknown>;
      const status = await child.status;
      clearTimeout(killer);
      await child.stderr.cancel();
      assert.equal(status.code, 0, "driver exit status");
      return counters;
    },
  };
  return served;
}

function deviceExists(dev: string): boolean {
  try {
    Deno.statSync(`/sys/block/${dev.slice("/dev/".length)}`);
    return true;
  } catch {
    return false;
  }
}

Deno.test("a written file reads back identical, fio verify passes, writes land in the file", async () => {
  await withScratchFs(async (dir) => {
    const file = `${dir}/img`;
    const src = `${dir}/src`;
    await run("dd", [`if=/dev/urandom`, `of=${file}`, "bs=1M", "count=96", "status=none"]);
    await run("dd", [`if=/dev/urandom`, `of=${src}`, "bs=1M", "count=8", "status=none"]);
    await run("sync", []);
    const s = await serve(file, "fast");
    let stopped = false;
    try {
      const sectors = Number(
        Deno.readTextFileSync(`/sys/block/${s.dev.slice(5)}/size`).trim(),
      );
      assert.equal(sectors * 512, 96 * MIB, "device size = file size (kernel's view)");
      await run("cmp", [s.dev, file]);
      await run("fio", [
        "--name=verify",
        `--filename=${s.dev}`,
        "--direct=1",
        "--ioengine=io_uring",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
      ]);
      // A known pattern at 64 MiB, then read back through the filesystem after detach.
      await run("dd", [
        `if=${src}`,
        `of=${s.dev}`,
        "bs=1M",
        "seek=64",
        "oflag=direct",
        "conv=notrunc",
        "status=none",
      ]);
      const counters = await s.stop();
      stopped = true;
      const read = counters.bytesRead as { direct: number };
      assert.ok(read.direct > 0, "a fully written file is read on the direct path");
      assert.ok(!deviceExists(s.dev), `${s.dev} is gone after delete`);
      await dropCaches();
      await run("cmp", ["-n", String(8 * MIB), src, file, "0", String(64 * MIB)]);
    } finally {
      if (!stopped) await s.stop().catch(() => {});
    }
  });
});

Deno.test("a sparse file reads zeros in its holes, and writes into holes reach the file", async () => {
  await withScratchFs(async (dir) => {
    const file = `${dir}/sparse`;
    const src = `${dir}/src`;
    await run("truncate", ["-s", "48M", file]);
    await run("dd", [
      `if=/dev/urandom`,
      `of=${file}`,
      "bs=1M",
      "count=1",
      "seek=8",
      "conv=notrunc",
      "status=none",
    ]);
    await run("dd", [`if=/dev/urandom`, `of=${src}`, "bs=1M", "count=4", "status=none"]);
    await run("sync", []);
    const s = await serve(file, "fast");
    let stopped = false;
    try {
      // The filesystem returns zeros for the holes: the device must agree byte for byte.
      await run("cmp", [s.dev, file]);
      await run("dd", [
        `if=${src}`,
        `of=${s.dev}`,
        "bs=1M",
        "seek=20",
        "oflag=direct",
        "conv=notrunc",
        "status=none",
      ]);
      await run("cmp", [s.dev, file]);
      const counters = await s.stop();
      stopped = true;
      const read = counters.bytesRead as { zero: number };
      const written = counters.bytesWritten as { file: number };
      assert.ok(read.zero > 0, "holes were zero-filled");
      assert.ok(written.file >= 4 * MIB, "writes into holes went through the file");
      await dropCaches();
      await run("cmp", ["-n", String(4 * MIB), src, file, "0", String(20 * MIB)]);
      // The hole before the write is still a hole (filefrag: the file is not fully allocated).
      const du = Number((await run("du", ["-k", file])).split(/\s/)[0]);
      assert.ok(du < 48 * 1024, `file stays sparse (${du} KiB allocated)`);
    } finally {
      if (!stopped) await s.stop().catch(() => {});
    }
  });
});

Deno.test("file mode serves everything through the file", async () => {
  await withScratchFs(async (dir) => {
    const file = `${dir}/img`;
    await run("dd", [`if=/dev/urandom`, `of=${file}`, "bs=1M", "count=16", "status=none"]);
    await run("sync", []);
    const s = await serve(file, "file", 2);
    let stopped = false;
    try {
      await run("cmp", [s.dev, file]);
      const counters = await s.stop();
      stopped = true;
      const read = counters.bytesRead as { direct: number; file: number };
      assert.equal(read.direct, 0);
      assert.ok(read.file >= 16 * MIB);
    } finally {
      if (!stopped) await s.stop().catch(() => {});
    }
  });
});

Deno.test("a killed server's device waits, and a new server recovers it without losing IO", async () => {
  await withScratchFs(async (dir) => {
    const file = `${dir}/img`;
    await run("dd", [`if=/dev/urandom`, `of=${file}`, "bs=1M", "count=32", "status=none"]);
    await run("sync", []);
    const first = await serve(file, "fast");
    const id = Number(first.dev.slice("/dev/ublkb".length));
    const fio = new Deno.Command("fio", {
      args: [
        "--name=recover",
        `--filename=${first.dev}`,
        "--direct=1",
        "--ioengine=io_uring",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let second: Served | undefined;
    try {
      await new Promise((r) => setTimeout(r, 3000));
      await first.kill();
      // The kernel keeps the device (USER_RECOVERY): same node, same size, IO waiting.
      assert.ok(deviceExists(first.dev), "the device outlives its server");
      second = await serve(file, "fast", 1, id);
      assert.equal(second.dev, first.dev);
      const out = await fio.output();
      assert.equal(
        out.code,
        0,
        `fio across the restart: ${new TextDecoder().decode(out.stderr)}`,
      );
      await second.stop();
      second = undefined;
      assert.ok(!deviceExists(first.dev));
    } finally {
      try {
        fio.kill("SIGKILL");
      } catch {
        // already exited
      }
      if (second) await second.stop().catch(() => {});
    }
  });
});
