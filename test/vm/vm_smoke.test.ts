// The test VM itself (scripts/vm.sh): it must offer what every other VM test relies on, and fail
// here, loudly, when it does not — a VM test never passes by skipping. Checked with the kernel's own
// view (/proc, /sys, stat of device nodes) and the real tools (mkfs, mount, losetup, fio, cmp),
// never with fastloop's code, except the last test, which checks `fastloop doctor` against /sys.
//
// Each test that formats the scratch disk /dev/vda unmounts it before it ends.

import assert from "node:assert/strict";

const SCRATCH_DISK = "/dev/vda";
const MIB = 1024 * 1024;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(program: string, args: string[]): Run {
  const out = new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).outputSync();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Runs a tool that must succeed; returns its stdout. */
function ok(program: string, args: string[]): string {
  const r = run(program, args);
  assert.equal(
    r.code,
    0,
    `${program} ${args.join(" ")} failed (${r.code}): ${r.stderr}${r.stdout}`,
  );
  return r.stdout;
}

/** The filesystem type mounted at `dir`, from the kernel's mount table; null when none is. */
function mountedType(dir: string): string | null {
  for (const line of Deno.readTextFileSync("/proc/self/mountinfo").split("\n")) {
    // mountinfo: id parent major:minor root mountpoint options [optional...] - fstype source ...
    const fields = line.split(" ");
    const dash = fields.indexOf("-");
    if (fields[4] === dir && dash > 0) return fields[dash + 1] ?? null;
  }
  return null;
}

/** Formats the scratch disk with `mkfs`, mounts it on a fresh directory, runs `body`, cleans up. */
function withScratchFs(mkfs: string[], fstype: string, body: (dir: string) => void): void {
  ok(mkfs[0]!, [...mkfs.slice(1), SCRATCH_DISK]);
  const dir = Deno.makeTempDirSync({ prefix: "vm-smoke-" });
  let mounted = false;
  try {
    ok("mount", ["-t", fstype, SCRATCH_DISK, dir]);
    mounted = true;
    body(dir);
  } finally {
    if (mounted) run("umount", [dir]);
    Deno.removeSync(dir, { recursive: true });
  }
}

function patternBytes(length: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let x = seed >>> 0;
  for (let i = 0; i < length; i++) {
    // xorshift32: cheap, deterministic, and no two 4 KiB blocks alike.
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x & 0xff;
  }
  return bytes;
}

Deno.test("the VM kernel has ublk: /dev/ublk-control is a character device and ublk_drv is loaded", () => {
  const st = Deno.statSync("/dev/ublk-control");
  assert.ok(st.isCharDevice, "/dev/ublk-control is not a character device");
  assert.ok(Deno.statSync("/sys/module/ublk_drv").isDirectory);
});

Deno.test("the scratch disk /dev/vda is a block device of at least 1 GiB", () => {
  assert.ok(Deno.statSync(SCRATCH_DISK).isBlockDevice, `${SCRATCH_DISK} is not a block device`);
  const sectors = Number(Deno.readTextFileSync("/sys/block/vda/size").trim());
  assert.ok(sectors * 512 >= 1024 * MIB, `${SCRATCH_DISK} has only ${sectors} sectors`);
});

Deno.test("io_uring is enabled in the VM kernel", () => {
  // Absent on kernels without the sysctl (io_uring then always on); "0" means enabled for all.
  let disabled = "0";
  try {
    disabled = Deno.readTextFileSync("/proc/sys/kernel/io_uring_disabled").trim();
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  assert.equal(disabled, "0");
});

Deno.test("mkfs.ext4 and mount of /dev/vda give an ext4 mount that keeps written bytes", () => {
  withScratchFs(["mkfs.ext4", "-q", "-F"], "ext4", (dir) => {
    assert.equal(mountedType(dir), "ext4");
    const data = patternBytes(MIB, 1);
    Deno.writeFileSync(`${dir}/a`, data);
    ok("sync", []);
    assert.deepEqual(Deno.readFileSync(`${dir}/a`), data);
  });
  assert.equal(run("e2fsck", ["-fn", SCRATCH_DISK]).code, 0, "e2fsck found errors");
});

Deno.test("a loop device attached with direct IO over a file on ext4 reads and writes the file's bytes", () => {
  withScratchFs(["mkfs.ext4", "-q", "-F"], "ext4", (dir) => {
    const file = `${dir}/backing.img`;
    const initial = patternBytes(8 * MIB, 2);
    Deno.writeFileSync(file, initial);
    const loopDev = ok("losetup", ["--find", "--show", "--direct-io=on", file]).trim();
    try {
      assert.match(loopDev, /^\/dev\/loop[0-9]+$/);
      const name = loopDev.slice("/dev/".length);
      assert.equal(Deno.readTextFileSync(`/sys/block/${name}/loop/backing_file`).trim(), file);
      // Reading through the device must give the file's bytes.
      ok("cmp", ["-n", String(8 * MIB), loopDev, file]);
      // Writing through the device must land in the file.
      const patch = `${dir}/patch.bin`;
      Deno.writeFileSync(patch, patternBytes(MIB, 3));
      ok("dd", [
        `if=${patch}`,
        `of=${loopDev}`,
        "bs=1M",
        "seek=2",
        "oflag=direct",
        "conv=notrunc,fsync",
        "status=none",
      ]);
      ok("cmp", ["-n", String(MIB), patch, file, "0", String(2 * MIB)]);
    } finally {
      run("losetup", ["-d", loopDev]);
    }
  });
});

Deno.test("fio runs io_uring direct IO with verification on a file in the VM", () => {
  withScratchFs(["mkfs.ext4", "-q", "-F"], "ext4", (dir) => {
    const out = ok("fio", [
      "--name=smoke",
      `--filename=${dir}/fio.dat`,
      "--size=16M",
      "--bs=4k",
      "--rw=randwrite",
      "--ioengine=io_uring",
      "--iodepth=8",
      "--direct=1",
      "--verify=crc32c",
      "--output-format=json",
    ]);
    const report = JSON.parse(out) as {
      jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[];
    };
    const job = report.jobs[0];
    assert.ok(job, "fio reported no job");
    assert.equal(job.error, 0);
    assert.equal(job.write.io_bytes, 16 * MIB);
    // The verify phase reads everything back.
    assert.equal(job.read.io_bytes, 16 * MIB);
  });
});

Deno.test("mount -t xfs loads the xfs module on demand and mounts a fresh xfs", () => {
  withScratchFs(["mkfs.xfs", "-q", "-f"], "xfs", (dir) => {
    assert.equal(mountedType(dir), "xfs");
    assert.ok(Deno.statSync("/sys/module/xfs").isDirectory);
  });
});

Deno.test("dmsetup builds a flakey target (module loaded on demand) that reads like its device", () => {
  const dir = Deno.makeTempDirSync({ prefix: "vm-smoke-dm-" });
  let loopDev = "";
  let dmCreated = false;
  try {
    const file = `${dir}/dm.img`;
    const data = patternBytes(4 * MIB, 4);
    Deno.writeFileSync(file, data);
    loopDev = ok("losetup", ["--find", "--show", file]).trim();
    const sectors = (4 * MIB) / 512;
    ok("dmsetup", [
      "create",
      "vm-smoke-flakey",
      "--table",
      `0 ${sectors} flakey ${loopDev} 0 60 0`,
    ]);
    dmCreated = true;
    assert.ok(Deno.statSync("/sys/module/dm_flakey").isDirectory);
    // Without udev there is no /dev/mapper link: read the dm node the kernel made.
    const dmName = ok("dmsetup", [
      "info",
      "-c",
      "--noheadings",
      "-o",
      "blkdevname",
      "vm-smoke-flakey",
    ])
      .trim();
    ok("cmp", [`/dev/${dmName}`, file]);
  } finally {
    if (dmCreated) run("dmsetup", ["remove", "vm-smoke-flakey"]);
    if (loopDev) run("losetup", ["-d", loopDev]);
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("fastloop doctor in the VM finds ublk and lists its feature bits", () => {
  const r = run("fastloop", ["doctor", "--json"]);
  assert.equal(r.code, 0, `fastloop doctor failed (${r.code}): ${r.stderr}${r.stdout}`);
  const report = JSON.parse(r.stdout) as {
    kernel: string;
    canRun: boolean;
    ublk: { controlDevice: boolean; moduleLoaded: boolean; features: string | null };
  };
  assert.equal(report.kernel, Deno.osRelease());
  assert.equal(report.canRun, true);
  assert.equal(report.ublk.controlDevice, true);
  assert.equal(report.ublk.moduleLoaded, true);
  assert.ok(report.ublk.features !== null, "doctor reported no GET_FEATURES value");
  // Every kernel that builds ublk_drv encodes its commands as ioctls (UBLK_F_CMD_IOCTL_ENCODE,
  // bit 6, since 6.1); a value without it was not read from the kernel.
  assert.ok((BigInt(report.ublk.features) & (1n << 6n)) !== 0n, `features ${report.ublk.features}`);
  console.log(`ublk features on ${report.kernel}: ${report.ublk.features}`);
  // A human-readable run too, as the README shows it.
  console.log(ok("fastloop", ["doctor"]));
});
