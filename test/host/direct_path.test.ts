// Why the direct path is off (lib/direct_path.ts): the kernel's bdev_allow_write_mounted read the
// way the kernel reads it (kstrtobool, the command line over the config), each open failure told
// apart by errno and by what /proc and /sys say, and, on real loop-mounted filesystems, where a
// device is mounted (against the path the test mounted it at) and what `map` says when the device
// opens for writing (root) and when it does not even open for reading (a user without privileges,
// against the device node's own mode).

import assert from "node:assert/strict";
import {
  classifyDeviceOpenFailure,
  type DeviceOpenFailure,
  DirectPathOff,
  kstrtobool,
  mountPointsOf,
  writeMountedSetting,
} from "../../lib/direct_path.ts";
import { EACCES, EBUSY, EINVAL, ENOENT, ENXIO, EPERM } from "../../ffi/errno.ts";
import { close, devMajor, devMinor, O_DIRECT, O_RDWR, open } from "../../ffi/libc.ts";
import type { MapReport } from "../../lib/commands/map.ts";
import { fastloop as fastloopAs } from "./cli_support.ts";
import { isRoot, run, testDir, withFilesystem } from "./fs_fixtures.ts";

const root = isRoot();

Deno.test("kstrtobool reads booleans as the kernel does", () => {
  for (const s of ["1", "y", "Y", "yes", "t", "true", "on", "ON", "e", "enable"]) {
    assert.equal(kstrtobool(s), true, s);
  }
  for (const s of ["0", "n", "N", "no", "f", "false", "off", "OFF", "d", "disable"]) {
    assert.equal(kstrtobool(s), false, s);
  }
  for (const s of ["", "2", "o", "ox", "maybe", " 1"]) assert.equal(kstrtobool(s), undefined, s);
});

Deno.test("writeMountedSetting: the command line wins, its last valid word counts", () => {
  const y = { path: "/boot/config-x", text: "CONFIG_BLOCK=y\nCONFIG_BLK_DEV_WRITE_MOUNTED=y\n" };
  const n = {
    path: "/proc/config.gz",
    text: "CONFIG_BLOCK=y\n# CONFIG_BLK_DEV_WRITE_MOUNTED is not set\n",
  };
  const old = { path: "/boot/config-6.1", text: "CONFIG_BLOCK=y\nCONFIG_EXT4_FS=m\n" };
  const cases: Array<[string | null, typeof y | null, boolean | null, RegExp]> = [
    ["quiet bdev_allow_write_mounted=0", y, false, /^bdev_allow_write_mounted=0 on the kernel/],
    ["bdev_allow_write_mounted=off ro", null, false, /=off on the kernel command line/],
    ["bdev_allow_write_mounted=1", n, true, /^bdev_allow_write_mounted=1 on the kernel/],
    ["bdev_allow_write_mounted=0 bdev_allow_write_mounted=y", n, true, /=y on the kernel/],
    ["bdev_allow_write_mounted=0 bdev_allow_write_mounted=bogus", y, false, /=0 on/],
    // An invalid value leaves the built-in default; words after "--" are init's.
    ["bdev_allow_write_mounted=", n, false, /is not set in \/proc\/config\.gz/],
    ["quiet -- bdev_allow_write_mounted=0", y, true, /=y in \/boot\/config-x/],
    ["quiet", n, false, /CONFIG_BLK_DEV_WRITE_MOUNTED is not set in \/proc\/config\.gz/],
    ["quiet", old, true, /has no CONFIG_BLK_DEV_WRITE_MOUNTED \(a kernel before 6\.8\)/],
    ["quiet", { path: "/x", text: "garbage" }, null, /no kernel config found/],
    ["quiet", null, null, /not on the kernel command line, and no kernel config found/],
    [null, null, null, /no kernel config found/],
  ];
  for (const [cmdline, config, allowed, source] of cases) {
    const s = writeMountedSetting(cmdline, config);
    const at = `${cmdline} / ${config?.path}`;
    assert.equal(s.allowed, allowed, at);
    assert.match(s.source, source, at);
  }
});

const refused = { allowed: false, source: "bdev_allow_write_mounted=0 on the kernel command line" };
const allowed = { allowed: true, source: "CONFIG_BLK_DEV_WRITE_MOUNTED=y in /boot/config-x" };
const unknown = { allowed: null, source: "not on the kernel command line, and no kernel config" };

function failure(over: Partial<DeviceOpenFailure>): DeviceOpenFailure {
  return {
    devicePath: "/dev/vda",
    errno: EBUSY,
    write: true,
    writeMounted: refused,
    mountPoints: ["/mnt/host fs"],
    holders: [],
    ...over,
  };
}

Deno.test("classifyDeviceOpenFailure: EBUSY on a mounted device under a refusing kernel", () => {
  const v = classifyDeviceOpenFailure(failure({}));
  assert.equal(v.code, DirectPathOff.bdevWriteMountedRefused);
  assert.equal(v.code, "bdev-write-mounted-refused");
  // The evidence and the fix, on one line.
  assert.match(v.reason, /refuses to open a mounted filesystem's device for writing/);
  assert.match(v.reason, /open \/dev\/vda: EBUSY/);
  assert.match(v.reason, /\/dev\/vda is mounted on "\/mnt\/host fs"/);
  assert.match(v.reason, /bdev_allow_write_mounted=0 on the kernel command line/);
  assert.match(v.reason, /boot with bdev_allow_write_mounted=1, or use a kernel built with/);
  assert.match(v.reason, /CONFIG_BLK_DEV_WRITE_MOUNTED=y/);
  assert.ok(!v.reason.includes("\n"));
  // Unknown setting, same evidence: still the likely cause, and it says it could not check.
  const u = classifyDeviceOpenFailure(failure({ writeMounted: unknown }));
  assert.equal(u.code, DirectPathOff.bdevWriteMountedRefused);
  assert.match(u.reason, /its setting could not be read/);
});

Deno.test("classifyDeviceOpenFailure: other EBUSY causes are device-busy", () => {
  // The kernel allows writes to mounted devices: EBUSY must come from someone else.
  const a = classifyDeviceOpenFailure(failure({ writeMounted: allowed }));
  assert.equal(a.code, DirectPathOff.deviceBusy);
  assert.match(a.reason, /which the kernel allows .*another user holds it exclusively/);
  // Not mounted anywhere: not the write-mounted restriction, whatever the setting.
  const b = classifyDeviceOpenFailure(failure({ mountPoints: [], holders: ["dm-0", "md127"] }));
  assert.equal(b.code, DirectPathOff.deviceBusy);
  assert.match(b.reason, /held by dm-0, md127 \(device mapper, md/);
  assert.match(b.reason, /open \/dev\/vda: EBUSY/);
  // A read-only open is never refused by that setting.
  const c = classifyDeviceOpenFailure(failure({ write: false }));
  assert.equal(c.code, DirectPathOff.deviceBusy);
  assert.match(c.reason, /busy for reading/);
});

Deno.test("classifyDeviceOpenFailure: permission, missing device and the rest", () => {
  for (const errno of [EACCES, EPERM]) {
    const v = classifyDeviceOpenFailure(failure({ errno }));
    assert.equal(v.code, DirectPathOff.devicePermissionDenied);
    assert.match(v.reason, /not permitted to open \/dev\/vda for writing .*container/);
    assert.match(v.reason, errno === EACCES ? /EACCES/ : /EPERM/);
  }
  for (const errno of [ENOENT, ENXIO]) {
    const v = classifyDeviceOpenFailure(failure({ errno }));
    assert.equal(v.code, DirectPathOff.deviceMissing);
    assert.match(v.reason, /\/dev\/vda is missing or gone/);
  }
  const other = classifyDeviceOpenFailure(failure({ errno: EINVAL }));
  assert.equal(other.code, DirectPathOff.deviceOpenFailed);
  assert.match(other.reason, /cannot open \/dev\/vda for writing \(open \/dev\/vda: EINVAL/);
});

Deno.test({
  name: "mountPointsOf finds a loop-mounted ext4 where it was mounted, space and all",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const spaced = `${fs.dir} with space`;
      Deno.mkdirSync(spaced);
      await run("mount", ["--bind", fs.dir, spaced]);
      try {
        const st = Deno.statSync(fs.device);
        const rdev = BigInt(st.rdev ?? 0);
        const points = mountPointsOf(devMajor(rdev), devMinor(rdev)).sort();
        assert.deepEqual(points, [fs.dir, spaced].sort());
      } finally {
        await run("umount", [spaced]);
        Deno.removeSync(spaced);
      }
    });
  },
});

Deno.test({
  name: "map says the device opens for writing as root, and why not for a user without access",
  ignore: !root,
  async fn() {
    await withFilesystem("ext4", {}, async (fs) => {
      const file = `${fs.dir}/f.img`;
      await run("dd", ["if=/dev/urandom", `of=${file}`, "bs=64k", "count=4", "status=none"]);
      Deno.chmodSync(file, 0o644);
      Deno.chmodSync(fs.dir, 0o755);
      Deno.chmodSync(fs.dir.slice(0, fs.dir.lastIndexOf("/")), 0o755);
      const runDir = Deno.makeTempDirSync({ dir: testDir(), prefix: "fastloop-dp-" });
      try {
        // Oracle for root: this process opens the device the way a read-write attach does.
        close(open(fs.device, O_RDWR | O_DIRECT));
        const asRoot = await fastloopAs(["map", "--json", file], { runDir });
        assert.equal(asRoot.code, 0, asRoot.stderr);
        const r = JSON.parse(asRoot.stdout) as MapReport;
        assert.equal(r.eligible, true, r.ineligibleReason ?? "");
        assert.equal(r.deviceWritable, true);
        assert.equal(r.directPathOff, null);
        const text = await fastloopAs(["map", file], { runDir });
        assert.match(
          text.stdout,
          /^Direct path: eligible \(\/dev\/loop[0-9]+ opens for writing\)$/m,
        );

        // Oracle for the user: the device node grants others nothing.
        assert.equal((Deno.statSync(fs.device).mode ?? 0) & 0o006, 0, "others cannot open it");
        const asNobody = await fastloopAs(["map", "--json", file], { runDir, asUser: 65534 });
        assert.equal(asNobody.code, 0, asNobody.stderr);
        const n = JSON.parse(asNobody.stdout) as MapReport;
        assert.equal(n.eligible, false);
        assert.equal(n.deviceWritable, null);
        assert.equal(n.directPathOff, DirectPathOff.devicePermissionDenied);
        assert.match(n.directPathOffReason ?? "", /EACCES/);
        const nText = await fastloopAs(["map", file], { runDir, asUser: 65534 });
        assert.match(nText.stdout, /^Direct path: not eligible \(device-permission-denied\): /m);
      } finally {
        Deno.removeSync(runDir, { recursive: true });
      }
    });
  },
});
