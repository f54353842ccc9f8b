//! `fastloop doctor [--json]`: what the running kernel offers fastloop — ublk (device node,
//! module, GET_FEATURES bits by name), io_uring, privileges, leases — and for each missing piece
//! the fix. Exit 0 when fastloop can run here, 5 when something it needs is missing.

import { type Command, parseCommandArgs } from "../cli.ts";
import { ExitCode, UserError } from "../errors.ts";
import { geteuid, pathExists } from "../../ffi/libc.ts";
import { IoUring } from "../../ffi/io_uring.ts";
import {
  featureNames,
  hasFeature,
  UBLK_F_AUTO_BUF_REG,
  UBLK_F_NO_AUTO_PART_SCAN,
  UBLK_F_SUPPORT_ZERO_COPY,
  UBLK_F_UPDATE_SIZE,
  UBLK_F_USER_RECOVERY,
} from "../../ffi/ublk_cmd.ts";
import { UBLK_CONTROL_PATH, UblkControl } from "../ublk_control.ts";
import { quotePath } from "../registry.ts";
import {
  readWriteMountedSetting,
  WRITE_MOUNTED_FIX,
  type WriteMountedSetting,
} from "../direct_path.ts";

export interface DoctorCheck {
  name: string;
  ok: boolean;
  /** What was found, in a few words. */
  detail: string;
  /** How to fix it when `ok` is false (and the check is required). */
  fix?: string;
  /** A failed optional check does not stop fastloop from running. */
  required: boolean;
}

export interface DoctorReport {
  kernel: string;
  canRun: boolean;
  ublk: {
    controlDevice: boolean;
    moduleLoaded: boolean;
    moduleAvailable: "loaded" | "builtin" | "loadable" | "absent";
    features: string | null;
    featureNames: string[];
  };
  ioUringDisabled: number | null;
  root: boolean;
  /** bdev_allow_write_mounted: may a mounted filesystem's device be opened for writing? */
  bdevWriteMounted: WriteMountedSetting;
  checks: DoctorCheck[];
}

function readText(path: string): string | null {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return null;
  }
}

/** Where ublk_drv would come from on this kernel: already loaded, built in, a module file, none. */
function ublkModuleAvailability(release: string): DoctorReport["ublk"]["moduleAvailable"] {
  if (pathExists("/sys/module/ublk_drv")) return "loaded";
  const base = `/lib/modules/${release}`;
  if (readText(`${base}/modules.builtin`)?.includes("/ublk_drv.ko")) return "builtin";
  if (readText(`${base}/modules.dep`)?.match(/(^|\/)ublk_drv\.ko[^:]*:/m)) return "loadable";
  return "absent";
}

export async function runChecks(): Promise<DoctorReport> {
  const kernel = Deno.osRelease();
  const checks: DoctorCheck[] = [];
  const root = geteuid() === 0;
  checks.push({
    name: "root",
    ok: root,
    detail: root ? "running as root" : `running as uid ${geteuid()}`,
    fix: "run fastloop as root (sudo fastloop ...)",
    required: true,
  });

  const disabledText = readText("/proc/sys/kernel/io_uring_disabled");
  const ioUringDisabled = disabledText === null ? null : Number(disabledText.trim());
  let ringOk = false;
  let ringDetail = "";
  try {
    IoUring.setup(4, { sqe128: true, cqe32: true }).close();
    ringOk = true;
    ringDetail = `io_uring_setup with SQE128|CQE32 works (io_uring_disabled=${
      ioUringDisabled ?? "n/a"
    })`;
  } catch (e) {
    ringDetail = `io_uring_setup failed: ${e instanceof Error ? e.message : String(e)}`;
  }
  checks.push({
    name: "io_uring",
    ok: ringOk,
    detail: ringDetail,
    fix: ioUringDisabled && ioUringDisabled > 0
      ? "sysctl -w kernel.io_uring_disabled=0"
      : "use a kernel built with CONFIG_IO_URING (6.1 or newer)",
    required: true,
  });

  const moduleAvailable = ublkModuleAvailability(kernel);
  const moduleLoaded = moduleAvailable === "loaded";
  const controlDevice = pathExists(UBLK_CONTROL_PATH);
  checks.push({
    name: "ublk_drv",
    ok: controlDevice,
    detail: controlDevice
      ? `${UBLK_CONTROL_PATH} present (module ${moduleAvailable})`
      : `${UBLK_CONTROL_PATH} missing (module ${moduleAvailable})`,
    fix: moduleAvailable === "loadable"
      ? "modprobe ublk_drv"
      : moduleAvailable === "absent"
      ? "this kernel has no ublk driver: use one built with CONFIG_BLK_DEV_UBLK (Debian trixie " +
        "6.12 or newer), or run fastloop in the project's VM (deno task vm)"
      : "the module is loaded but the node is missing: create it (udev, or mknod from " +
        "/sys/class/misc/ublk-control/dev)",
    required: true,
  });

  let features: bigint | null = null;
  if (controlDevice && root) {
    try {
      const ctl = UblkControl.open();
      try {
        features = ctl.getFeatures();
      } finally {
        ctl.close();
      }
      checks.push({
        name: "ublk features",
        ok: true,
        detail: `GET_FEATURES 0x${features.toString(16)}`,
        required: true,
      });
    } catch (e) {
      checks.push({
        name: "ublk features",
        ok: false,
        detail: `GET_FEATURES failed: ${e instanceof Error ? e.message : String(e)}`,
        fix: "use a kernel with ublk UBLK_U_CMD_GET_FEATURES (6.5 or newer)",
        required: true,
      });
    }
  }
  if (features !== null) {
    const recovery = hasFeature(features, UBLK_F_USER_RECOVERY);
    checks.push({
      name: "ublk recovery",
      ok: recovery,
      detail: recovery
        ? "USER_RECOVERY offered: devices survive a server restart"
        : "USER_RECOVERY missing: a dead server fails the device",
      fix: "use a kernel 6.1 or newer with UBLK_F_USER_RECOVERY",
      required: false,
    });
    const zeroCopy = hasFeature(features, UBLK_F_AUTO_BUF_REG | UBLK_F_SUPPORT_ZERO_COPY);
    checks.push({
      name: "data mode",
      ok: zeroCopy,
      detail: zeroCopy
        ? "zero copy: AUTO_BUF_REG offered, request pages go straight to the disk's driver"
        : "copy: AUTO_BUF_REG missing, each request is copied through the server's buffers",
      fix: "use a kernel 6.16 or newer (UBLK_F_AUTO_BUF_REG) for zero copy",
      required: false,
    });
    const resize = hasFeature(features, UBLK_F_UPDATE_SIZE);
    checks.push({
      name: "ublk resize",
      ok: resize,
      detail: resize
        ? "UPDATE_SIZE offered: 'fastloop resize' grows a live device"
        : "UPDATE_SIZE missing: 'fastloop resize' exits 5",
      fix: "use a kernel 6.16 or newer (UBLK_F_UPDATE_SIZE)",
      required: false,
    });
    const noScan = hasFeature(features, UBLK_F_NO_AUTO_PART_SCAN);
    checks.push({
      name: "ublk partition scan",
      ok: noScan,
      detail: noScan
        ? "NO_AUTO_PART_SCAN offered: partitions are scanned only with attach --partscan"
        : "NO_AUTO_PART_SCAN missing: the kernel scans each new device's partition table " +
          "at start, with --partscan or not",
      fix: "use a kernel 7.0 or newer (UBLK_F_NO_AUTO_PART_SCAN)",
      required: false,
    });
  }

  const leases = readText("/proc/sys/fs/leases-enable");
  const leasesOk = leases === null || leases.trim() === "1";
  checks.push({
    name: "file leases",
    ok: leasesOk,
    detail: leases === null
      ? "fs.leases-enable not present (assumed on)"
      : `fs.leases-enable=${leases.trim()}`,
    fix:
      "sysctl -w fs.leases-enable=1 (without leases fastloop serves everything through the file)",
    required: false,
  });
  // Optional: without it a read-write attach still works, through the file.
  const writeMounted = await readWriteMountedSetting(kernel);
  checks.push({
    name: "write-mounted",
    ok: writeMounted.allowed !== false,
    detail: writeMounted.allowed === true
      ? `the kernel opens a mounted filesystem's device for writing (${writeMounted.source}): ` +
        "the direct path works for read-write attaches"
      : writeMounted.allowed === false
      ? `the kernel refuses to open a mounted filesystem's device for writing ` +
        `(${writeMounted.source}): read-write attaches serve everything through the file`
      : `unknown whether the kernel opens a mounted filesystem's device for writing ` +
        `(${writeMounted.source}); 'fastloop map FILE' tries the file's device`,
    fix: WRITE_MOUNTED_FIX,
    required: false,
  });
  checks.push({
    name: "FIEMAP",
    ok: true,
    detail: "checked per file at attach: ext2/3/4 and xfs data devices get the fast path " +
      "(see 'fastloop map FILE')",
    required: false,
  });

  const canRun = checks.every((c) => c.ok || !c.required);
  return {
    kernel,
    canRun,
    ublk: {
      controlDevice,
      moduleLoaded,
      moduleAvailable,
      features: features === null ? null : `0x${features.toString(16)}`,
      featureNames: features === null ? [] : featureNames(features),
    },
    ioUringDisabled,
    root,
    bdevWriteMounted: writeMounted,
    checks,
  };
}

function render(report: DoctorReport): string {
  const lines = [`kernel ${report.kernel}`];
  for (const c of report.checks) {
    const mark = c.ok ? "ok  " : c.required ? "MISSING" : "warn";
    lines.push(`${mark.padEnd(8)}${c.name.padEnd(15)}${c.detail}`);
    if (!c.ok && c.fix) lines.push(`${"".padEnd(23)}fix: ${c.fix}`);
  }
  if (report.ublk.featureNames.length > 0) {
    lines.push(`ublk features: ${report.ublk.featureNames.join(" ")}`);
  }
  lines.push(
    report.canRun ? "fastloop can run here" : "fastloop cannot run here: fix the MISSING items",
  );
  return lines.join("\n");
}

export const command: Command = {
  summary: "report what this kernel offers fastloop (ublk, io_uring, privileges)",
  help: `Usage: fastloop doctor [--json]

Reports what the running kernel offers fastloop: the kernel release, whether ublk is present
(/dev/ublk-control, the ublk_drv module) and its feature bits (UBLK_U_CMD_GET_FEATURES, by
name), whether io_uring is enabled, whether fastloop runs as root, lease support, and whether
the kernel opens a mounted filesystem's device for writing (bdev_allow_write_mounted, from the
kernel command line, else CONFIG_BLK_DEV_WRITE_MOUNTED in the kernel config; refused, a
read-write attach serves everything through the file); for each missing piece, the fix.

Options:
  --json   print the report as JSON

Exit status: 0 when fastloop can run here, 5 when something it needs is missing.`,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("doctor", args, {
      json: { type: "boolean" },
    });
    if (positionals.length > 0) {
      throw new UserError(
        `doctor: unexpected argument ${quotePath(positionals[0]!)} (see 'fastloop doctor --help')`,
        ExitCode.usage,
      );
    }
    const report = await runChecks();
    console.log(values.json ? JSON.stringify(report, null, 2) : render(report));
    return report.canRun ? ExitCode.ok : ExitCode.unsupported;
  },
};
