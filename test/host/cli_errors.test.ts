// CLI error paths of attach / detach / stat on a host without ublk: every bad input gets one
// line on stderr, the documented exit code, no stack trace, and leaves nothing behind (no
// registry file, lock, log or socket, no server process). Each test runs fastloop as a separate
// process with its own state directory (FASTLOOP_RUN_DIR) so parallel suites cannot collide.

import assert from "node:assert/strict";
import { assertOneLineError, fastloop, filesUnder, HAS_UBLK } from "./cli_support.ts";
import { close, libc, O_RDWR, open, pathExists } from "../../ffi/libc.ts";
import { run, withFilesystem } from "./fs_fixtures.ts";

/** PIDs of processes whose command line mentions `needle` (read from /proc, not from fastloop). */
function processesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const p of Deno.readDirSync("/proc")) {
    if (!/^[0-9]+$/.test(p.name) || Number(p.name) === Deno.pid) continue;
    try {
      const cmdline = Deno.readTextFileSync(`/proc/${p.name}/cmdline`).replaceAll("\0", " ");
      if (cmdline.includes("__server") && cmdline.includes(needle)) pids.push(Number(p.name));
    } catch {
      // Exited meanwhile.
    }
  }
  return pids;
}

/** A scratch directory with a run dir inside; removed afterwards. */
async function withScratch(fn: (dir: string, runDir: string) => Promise<void>): Promise<void> {
  const dir = Deno.makeTempDirSync({ prefix: "fastloop-cli-" });
  const runDir = `${dir}/run`;
  try {
    await fn(dir, runDir);
    assert.deepEqual(filesUnder(runDir), [], "nothing left in the state directory");
    assert.deepEqual(processesMentioning(dir), [], "no server process left");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

function writeFile(path: string, sizeBytes: number): void {
  const f = Deno.openSync(path, { write: true, create: true, truncate: true });
  f.truncateSync(sizeBytes);
  f.close();
}

Deno.test("attach, detach, stat and resize each print their usage for --help and exit 0", async () => {
  await withScratch(async (_dir, runDir) => {
    for (const cmd of ["attach", "detach", "stat", "resize"]) {
      const run = await fastloop([cmd, "--help"], { runDir });
      assert.deepEqual(run.code, 0, cmd);
      assert.match(run.stdout, new RegExp(`^Usage: fastloop ${cmd} `), cmd);
      assert.deepEqual(run.stderr, "", cmd);
    }
  });
});

Deno.test("stat with no devices prints nothing and exits 0; --json prints []", async () => {
  await withScratch(async (_dir, runDir) => {
    const plain = await fastloop(["stat"], { runDir });
    assert.deepEqual([plain.code, plain.stdout, plain.stderr], [0, "", ""]);
    const json = await fastloop(["stat", "--json"], { runDir });
    assert.deepEqual(json.code, 0);
    assert.deepEqual(JSON.parse(json.stdout), []);
  });
});

Deno.test("attach refuses bad files with one line and exit 3", async () => {
  await withScratch(async (dir, runDir) => {
    writeFile(`${dir}/odd.img`, 1000);
    writeFile(`${dir}/empty.img`, 0);
    writeFile(`${dir}/name with space\nand newline.img`, 999);
    Deno.mkdirSync(`${dir}/adir`);
    Deno.symlinkSync("/dev/null", `${dir}/link-to-dev`);
    const fifo = await new Deno.Command("mkfifo", { args: [`${dir}/fifo`] }).output();
    assert.ok(fifo.success, "mkfifo");
    const cases: Array<[string, RegExp]> = [
      [`${dir}/missing.img`, /missing\.img does not exist$/],
      [`${dir}/adir`, /is a directory, not a regular file$/],
      [`${dir}/odd.img`, /is 1000 bytes, not a multiple of 512/],
      [`${dir}/empty.img`, /is empty/],
      [`${dir}/name with space\nand newline.img`, /is 999 bytes, not a multiple of 512/],
      [`${dir}/fifo`, /is a FIFO, not a regular file$/],
      [`${dir}/link-to-dev`, /is a character device, not a regular file$/],
      ["/dev/null", /is a character device/],
      ["/proc/self/status", /is a \/proc \(procfs\) file/],
      ["", /file name is empty/],
    ];
    for (const [path, pattern] of cases) {
      const run = await fastloop(["attach", path], { runDir });
      assertOneLineError(run, 3, pattern);
    }
  });
});

Deno.test("attach rejects bad flags and arguments with exit 2", async () => {
  await withScratch(async (dir, runDir) => {
    writeFile(`${dir}/good.img`, 1 << 20);
    const cases: Array<[string[], RegExp]> = [
      [["attach"], /expected exactly one FILE, got 0/],
      [["attach", "a", "b"], /expected exactly one FILE, got 2/],
      [["attach", "--queues", "0", `${dir}/good.img`], /--queues must be between 1 and 32, got 0/],
      [["attach", "--queues", "99999999999", `${dir}/good.img`], /--queues must be between/],
      [["attach", "--queues", "-1", `${dir}/good.img`], /queues/],
      [["attach", "--depth", "0", `${dir}/good.img`], /--depth must be between 1 and 4096/],
      [["attach", "--depth", "4097", `${dir}/good.img`], /--depth must be between 1 and 4096/],
      [["attach", "--depth", "1x", `${dir}/good.img`], /--depth must be a whole number/],
      [["attach", "--bogus", `${dir}/good.img`], /Unknown option '--bogus'/],
      [["detach"], /expected DEV, FILE or --all/],
      [["detach", "--all", "ublkb0"], /not both/],
      [["stat", "a", "b"], /at most one/],
    ];
    for (const [args, pattern] of cases) {
      assertOneLineError(await fastloop(args, { runDir }), 2, pattern);
    }
  });
});

Deno.test("attach refuses a region or sector size that does not fit the file: one line, exit 3", async () => {
  await withScratch(async (dir, runDir) => {
    const file = `${dir}/disk.img`;
    writeFile(file, 8 << 20);
    writeFile(`${dir}/odd.img`, (8 << 20) + 1000);
    const cases: Array<[string[], RegExp]> = [
      [
        ["--offset", "8M", file],
        /--offset 8388608 is past the end of .*disk\.img \(8388608 bytes\)$/,
      ],
      [["--offset", "1G", file], /--offset 1073741824 is past the end of/],
      [
        ["--offset", "1000", file],
        /--offset 1000 is not a multiple of the sector size \(512 bytes\)$/,
      ],
      [
        ["-b", "4096", "-o", "512", file],
        /--offset 512 is not a multiple of the sector size \(4096/,
      ],
      [["--sizelimit", "1000", file], /--sizelimit 1000 is not a multiple of the sector size/],
      [
        ["--sector-size", "4096", `${dir}/odd.img`],
        /odd\.img is 8389608 bytes, not a multiple of 4096/,
      ],
      [
        ["-o", "1M", `${dir}/odd.img`],
        /The region of .*odd\.img from offset 1048576 is 7341032 bytes/,
      ],
    ];
    for (const [args, pattern] of cases) {
      assertOneLineError(
        await fastloop(["attach", ...args], { runDir }),
        3,
        pattern,
        args.join(" "),
      );
    }
  });
});

Deno.test("attach, resize and stat refuse malformed sizes, sector sizes and columns with exit 2", async () => {
  await withScratch(async (dir, runDir) => {
    const file = `${dir}/disk.img`;
    writeFile(file, 8 << 20);
    const cases: Array<[string[], RegExp]> = [
      [["attach", "--sector-size", "1024", file], /--sector-size must be 512 or 4096, got "1024"$/],
      [["attach", "-b", "2048", file], /--sector-size must be 512 or 4096, got "2048"$/],
      [["attach", "--sector-size", "4k", file], /--sector-size must be 512 or 4096/],
      [["attach", "--offset", "1.5M", file], /--offset must be a size in bytes .*got "1\.5M"$/],
      [["attach", "--offset", "-1", file], /--offset must be a size in bytes .*got "-1"$/],
      [["attach", "--sizelimit", "lots", file], /--sizelimit must be a size in bytes/],
      [["resize", "--size", "big", file], /--size must be a size in bytes/],
      [["resize", "--size", "0", file], /--size must be more than 0/],
      [["resize"], /expected exactly one DEV or FILE, got 0/],
      [["stat", "--output", "DEVICE,NOPE"], /unknown column "NOPE" in --output \(columns: DEVICE,/],
      [["stat", "--verbose", "--output", "DEVICE"], /--verbose or --output, not both/],
      [["stat", "--json", "--verbose"], /--json prints every field/],
    ];
    for (const [args, pattern] of cases) {
      assertOneLineError(await fastloop(args, { runDir }), 2, pattern, args.join(" "));
    }
  });
});

Deno.test("resize of a device or file that is not attached: one line, exit 7", async () => {
  await withScratch(async (dir, runDir) => {
    const file = `${dir}/disk.img`;
    writeFile(file, 8 << 20);
    const cases: Array<[string[], RegExp]> = [
      [["resize", "/dev/ublkb7"], /'?\/dev\/ublkb7'? is not attached by fastloop$/],
      [["resize", "ublkb3", "--size", "16M"], /ublkb3'? is not attached by fastloop$/],
      [["resize", file], /disk\.img'? is not attached$/],
      [["resize", `${dir}/missing.img`], /is not attached \(no such device or file\)$/],
    ];
    for (const [args, pattern] of cases) {
      assertOneLineError(await fastloop(args, { runDir }), 7, pattern, args.join(" "));
    }
    assert.equal(Deno.statSync(file).size, 8 << 20, "the file is untouched");
  });
});

Deno.test({
  name: "attach --sector-size below the filesystem device's logical block size is refused (exit 3)",
  ignore: Deno.uid() !== 0,
  async fn() {
    await withScratch(async (_dir, runDir) => {
      // ext4 on a loop device with 4096-byte sectors (the oracle: blockdev --getss says so).
      await withFilesystem("ext4", { sectorSize: 4096 }, async (fs) => {
        assert.equal((await run("blockdev", ["--getss", fs.device])).stdout.trim(), "4096");
        const file = `${fs.dir}/disk.img`;
        writeFile(file, 8 << 20);
        const refused = await fastloop(["attach", "--sector-size", "512", file], { runDir });
        assertOneLineError(
          refused,
          3,
          new RegExp(
            `--sector-size 512 is below the logical block size of ${fs.device} \\(4096 bytes\\)`,
          ),
        );
        // Its default sector size is the device's: an offset of 512 does not fit it.
        const offset = await fastloop(["attach", "--offset", "512", file], { runDir });
        assertOneLineError(offset, 3, /--offset 512 is not a multiple of the sector size \(4096/);
      });
    });
  },
});

Deno.test("attach read-write of a file on a read-only mount suggests --read-only (exit 3)", async () => {
  await withScratch(async (dir, runDir) => {
    const mnt = `${dir}/ro`;
    Deno.mkdirSync(mnt);
    const mount = await new Deno.Command("mount", {
      args: ["-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt],
    }).output();
    assert.ok(mount.success, "mount tmpfs (the host tests run as root)");
    try {
      writeFile(`${mnt}/f.img`, 1 << 20);
      const ro = await new Deno.Command("mount", { args: ["-o", "remount,ro", mnt] }).output();
      assert.ok(ro.success, "remount read-only");
      // Oracle: the kernel itself refuses a write open there.
      assert.throws(() => Deno.openSync(`${mnt}/f.img`, { write: true }));
      const run = await fastloop(["attach", `${mnt}/f.img`], { runDir });
      assertOneLineError(run, 3, /read-only filesystem \(attach it with --read-only\)$/);
    } finally {
      await new Deno.Command("umount", { args: [mnt] }).output();
    }
  });
});

Deno.test("attach of a file another process has open fails with exit 4 naming the process", async () => {
  await withScratch(async (dir, runDir) => {
    const file = `${dir}/busy.img`;
    writeFile(file, 1 << 20);
    // The holder keeps the file open read-only; a write lease is then impossible (fcntl(2)).
    const holder = new Deno.Command("sh", {
      args: ["-c", `exec 3<"$0"; echo ready; exec sleep 60`, file],
      stdout: "piped",
    }).spawn();
    try {
      const reader = holder.stdout.getReader();
      await reader.read(); // "ready": the fd is open
      reader.releaseLock();
      const started = Date.now();
      const run = await fastloop(["attach", file], { runDir });
      assertOneLineError(
        run,
        4,
        new RegExp(`is in use by another process: ${holder.pid} \\(sleep\\)`),
      );
      // The holder was not disturbed: it still runs and still has the file open.
      const fds = [...Deno.readDirSync(`/proc/${holder.pid}/fd`)].map((e) =>
        Deno.readLinkSync(`/proc/${holder.pid}/fd/${e.name}`)
      );
      assert.ok(fds.includes(file), "the holder still has the file open");
      assert.ok(Date.now() - started < 30_000, "refused quickly, not after a lease-break timeout");
    } finally {
      holder.kill("SIGKILL");
      await holder.status;
      await holder.stdout.cancel().catch(() => {});
    }
  });
});

Deno.test({
  name: "attach on a kernel without ublk fails with exit 5 and leaves no server, lock or record",
  ignore: HAS_UBLK,
  async fn() {
    await withScratch(async (dir, runDir) => {
      const file = `${dir}/good.img`;
      writeFile(file, 1 << 20);
      const run = await fastloop(["attach", file], { runDir });
      assertOneLineError(run, 5, /ublk is not available: \/dev\/ublk-control is missing/);
      // The server had the file open and leased. A write lease is granted only when no other
      // open of the file exists anywhere (fcntl(2)), so taking one proves the server let go.
      const fd = open(file, O_RDWR);
      try {
        const F_SETLEASE = 1024;
        const F_WRLCK = 1;
        const F_UNLCK = 2;
        assert.deepEqual(libc.fcntl(fd, F_SETLEASE, BigInt(F_WRLCK)), 0, "write lease granted");
        assert.deepEqual(libc.fcntl(fd, F_SETLEASE, BigInt(F_UNLCK)), 0);
      } finally {
        close(fd);
      }
    });
  },
});

Deno.test("attach of a file already attached is refused (exit 4) naming the device, by any path", async () => {
  await withScratch(async (dir, runDir) => {
    const file = `${dir}/attached.img`;
    writeFile(file, 1 << 20);
    Deno.linkSync(file, `${dir}/hardlink.img`);
    const st = Deno.statSync(file);
    // A record as a live server writes it, naming this test process as the server.
    const ticks = startTicks(Deno.pid);
    Deno.mkdirSync(runDir, { recursive: true, mode: 0o700 });
    Deno.writeTextFileSync(
      `${runDir}/ublkb7.json`,
      JSON.stringify(fakeRecord(7, file, st, Deno.pid, ticks, runDir)),
    );
    try {
      for (const path of [file, `${dir}/hardlink.img`]) {
        const run = await fastloop(["attach", path], { runDir });
        assertOneLineError(run, 4, /is already attached as \/dev\/ublkb7$/);
      }
    } finally {
      Deno.removeSync(`${runDir}/ublkb7.json`);
    }
  });
});

Deno.test("detach of something not attached exits 7; detach --all with nothing exits 0", async () => {
  await withScratch(async (dir, runDir) => {
    writeFile(`${dir}/free.img`, 1 << 20);
    const cases: Array<[string, RegExp]> = [
      ["/dev/ublkb3", /\/dev\/ublkb3 is not attached by fastloop$/],
      ["ublkb12", /ublkb12 is not attached by fastloop$/],
      [`${dir}/free.img`, /free\.img is not attached$/],
      [`${dir}/missing.img`, /missing\.img is not attached \(no such device or file\)$/],
      ["", /^fastloop: "" is not attached/],
      ["a b\nc", /^fastloop: "a b\\nc" is not attached/],
      ["-1", /-1 is not attached/],
    ];
    for (const [ref, pattern] of cases) {
      assertOneLineError(await fastloop(["detach", "--", ref], { runDir }), 7, pattern);
    }
    const all = await fastloop(["detach", "--all"], { runDir });
    assert.deepEqual([all.code, all.stdout, all.stderr], [0, "", ""]);
  });
});

Deno.test("a record whose server is dead shows as dead in stat, and detach removes it", async () => {
  await withScratch(async (dir, runDir) => {
    const file = `${dir}/orphan.img`;
    writeFile(file, 1 << 20);
    // A pid that is certainly dead: a child that has exited and been reaped.
    const child = new Deno.Command("true").spawn();
    await child.status;
    Deno.mkdirSync(`${runDir}/files`, { recursive: true, mode: 0o700 });
    const st = Deno.statSync(file);
    Deno.writeTextFileSync(
      `${runDir}/ublkb5.json`,
      JSON.stringify(fakeRecord(5, file, st, child.pid, 1, runDir)),
    );
    // A killed server leaves its lock file (the flock itself dies with it).
    Deno.writeTextFileSync(`${runDir}/files/${st.dev}-${st.ino}.lock`, "");
    const stat = await fastloop(["stat", "--json"], { runDir });
    assert.deepEqual(stat.code, 0, stat.stderr);
    const rows = JSON.parse(stat.stdout);
    assert.deepEqual(rows.length, 1);
    assert.deepEqual(rows[0].device, "/dev/ublkb5");
    assert.deepEqual(rows[0].server.state, "dead");
    const table = await fastloop(["stat"], { runDir });
    assert.match(table.stdout, /\/dev\/ublkb5 .* dead\(/);
    const detach = await fastloop(["detach", file], { runDir });
    assert.deepEqual([detach.code, detach.stderr], [0, ""]);
    assert.ok(!pathExists(`${runDir}/ublkb5.json`), "the stale record is gone");
    assert.ok(!pathExists(`${runDir}/files/${st.dev}-${st.ino}.lock`), "its lock file too");
  });
});

Deno.test("every command refuses a non-root user with exit 6", async () => {
  await withScratch(async (dir, runDir) => {
    writeFile(`${dir}/good.img`, 1 << 20);
    Deno.chmodSync(dir, 0o755);
    const commands = [
      ["attach", `${dir}/good.img`],
      ["detach", "--all"],
      ["stat"],
      ["resize", `${dir}/good.img`],
      ["restart", "--all"],
    ];
    for (const args of commands) {
      const run = await fastloop(args, { runDir, asUser: 65534 });
      assertOneLineError(run, 6, /must run as root/);
    }
  });
});

function startTicks(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19]);
}

function fakeRecord(
  id: number,
  file: string,
  st: Deno.FileInfo,
  pid: number,
  ticks: number,
  runDir: string,
) {
  return {
    version: 1,
    id,
    blockPath: `/dev/ublkb${id}`,
    charPath: `/dev/ublkc${id}`,
    file: { path: file, dev: String(st.dev), ino: String(st.ino) },
    server: { pid, startTicks: ticks },
    startedAt: new Date().toISOString(),
    logPath: `${runDir}/log/none.log`,
    socketPath: `${runDir}/ublkb${id}.sock`,
    options: { readOnly: false, queues: 1, depth: 128, recoverable: true },
  };
}
