// `fastloop doctor` inside the test VM (kernel 6.12 or 7.3, ublk_drv loaded): it must find ublk,
// read the feature bits the running kernel really offers and say that fastloop can run.
// Oracles: /sys/module and /dev (the kernel's own view), the feature sets recorded for each
// Debian kernel in ../shared/KERNEL.md (GET_FEATURES = 0x1fe on 6.12, 0x1fffff on 7.3), and
// `uname -r`.

import assert from "node:assert/strict";

const MAIN = decodeURIComponent(new URL("../../main.ts", import.meta.url).pathname);

interface Report {
  kernel: string;
  canRun: boolean;
  ublk: {
    controlDevice: boolean;
    moduleLoaded: boolean;
    moduleAvailable: string;
    features: string | null;
    featureNames: string[];
  };
  ioUringDisabled: number | null;
  root: boolean;
  checks: { name: string; ok: boolean; required: boolean }[];
}

async function doctor(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--no-check", "--quiet", MAIN, "doctor", ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/** Named bits each kernel of the VM must report (KERNEL.md: 0x1fe on 6.12, 0x1fffff on 7.3). */
const EXPECTED_612 = [
  "URING_CMD_COMP_IN_TASK",
  "NEED_GET_DATA",
  "USER_RECOVERY",
  "USER_RECOVERY_REISSUE",
  "UNPRIVILEGED_DEV",
  "CMD_IOCTL_ENCODE",
  "USER_COPY",
  "ZONED",
];
const EXPECTED_73_MORE = [
  "SUPPORT_ZERO_COPY",
  "USER_RECOVERY_FAIL_IO",
  "UPDATE_SIZE",
  "AUTO_BUF_REG",
  "QUIESCE",
  "PER_IO_DAEMON",
  "BUF_REG_OFF_DAEMON",
];

Deno.test("doctor --json finds ublk and the running kernel's feature bits", async () => {
  const r = await doctor(["--json"]);
  assert.equal(r.code, 0, `doctor failed (${r.code}): ${r.stderr}${r.stdout}`);
  const report = JSON.parse(r.stdout) as Report;

  const uname = new TextDecoder().decode(
    (await new Deno.Command("uname", { args: ["-r"], stdout: "piped" }).output()).stdout,
  ).trim();
  assert.equal(report.kernel, uname);
  assert.equal(report.root, true);
  assert.equal(report.canRun, true);
  assert.equal(report.ublk.controlDevice, exists("/dev/ublk-control"));
  assert.equal(report.ublk.controlDevice, true);
  assert.equal(report.ublk.moduleLoaded, exists("/sys/module/ublk_drv"));
  assert.equal(
    report.ioUringDisabled,
    Number(
      Deno.readTextFileSync(
        "/proc/sys/kernel/io_uring_disabled",
      ).trim(),
    ),
  );

  // The hex value and the names must describe the same bits.
  assert.ok(report.ublk.features !== null);
  const bits = BigInt(report.ublk.features);
  let count = 0;
  for (let b = 0n; b < 64n; b++) if ((bits >> b) & 1n) count++;
  assert.equal(report.ublk.featureNames.length, count);

  const expected = uname.startsWith("6.12.")
    ? EXPECTED_612
    : uname.startsWith("7.")
    ? [...EXPECTED_612, ...EXPECTED_73_MORE]
    : null;
  assert.ok(expected !== null, `no recorded ublk feature set for kernel ${uname}`);
  for (const name of expected) {
    assert.ok(
      report.ublk.featureNames.includes(name),
      `${uname}: GET_FEATURES lacks ${name} (${report.ublk.featureNames.join(" ")})`,
    );
  }
  if (uname.startsWith("6.12.")) {
    // 6.12 predates these: reporting them would mean the bits were decoded wrongly.
    for (const name of EXPECTED_73_MORE) assert.ok(!report.ublk.featureNames.includes(name));
  }
});

Deno.test("doctor prints one line per check and says fastloop can run", async () => {
  const r = await doctor([]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^ok\s+ublk_drv\s+\/dev\/ublk-control present/m);
  assert.match(r.stdout, /^ok\s+ublk features\s+GET_FEATURES 0x[0-9a-f]+$/m);
  assert.match(r.stdout, /^ublk features: .*CMD_IOCTL_ENCODE/m);
  assert.match(r.stdout, /^fastloop can run here$/m);
  assert.equal(r.stderr, "");
});

Deno.test("doctor rejects an unknown flag with a usage error", async () => {
  const r = await doctor(["--bogus"]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^fastloop: doctor: .*--bogus/);
  assert.equal(r.stderr.trim().split("\n").length, 1, "one line, no stack trace");
});
