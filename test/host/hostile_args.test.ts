// Hostile arguments on every command (attach, detach, stat, restart, map, doctor, the internal
// __server, and the command name itself), on a host without ublk: each gets one line on stderr
// with a stable non-zero exit code, no stack trace, nothing on stdout, a line of bounded length
// even for a 100 kB argument, and changes nothing (no state directory entry, no server process,
// the files named unchanged). test/host/cli_errors.test.ts holds the ordinary bad inputs; this file the
// adversarial ones. The cases that need a real device are in test/vm/hostile.test.ts.

import assert from "node:assert/strict";
import { assertOneLineError, fastloop, filesUnder, HAS_UBLK } from "./cli_support.ts";
import { parseDeviceRef } from "../../lib/registry.ts";

/** 100 kB: under Linux's 128 KiB limit for one argv string, far over PATH_MAX. */
const HUGE = "a".repeat(100_000);

function serverProcesses(): number[] {
  const pids: number[] = [];
  for (const p of Deno.readDirSync("/proc")) {
    if (!/^[0-9]+$/.test(p.name)) continue;
    try {
      if (Deno.readTextFileSync(`/proc/${p.name}/cmdline`).split("\0").includes("__server")) {
        pids.push(Number(p.name));
      }
    } catch {
      // Exited meanwhile.
    }
  }
  return pids;
}

/** Size, mtime and bytes of a file: what "unchanged" means here. */
function fingerprint(path: string): string {
  const st = Deno.statSync(path);
  const bytes = Deno.readFileSync(path);
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) sum = (sum * 31 + bytes[i]!) >>> 0;
  return `${st.size} ${st.mtime?.getTime()} ${sum}`;
}

interface Scratch {
  dir: string;
  runDir: string;
  /** A valid 1 MiB file: the one numeric-option cases name. */
  good: string;
}

/**
 * A scratch directory with hostile objects in it; afterwards the state directory must be empty,
 * no server process may run, and the good file must be unchanged.
 */
async function withScratch(fn: (s: Scratch) => Promise<void>): Promise<void> {
  const dir = Deno.makeTempDirSync({ prefix: "fastloop-hostile-" });
  const runDir = `${dir}/run`;
  const good = `${dir}/good.img`;
  const f = Deno.openSync(good, { write: true, create: true });
  f.writeSync(new TextEncoder().encode("fastloop hostile-args sentinel\n"));
  f.truncateSync(1 << 20);
  f.close();
  const servers = serverProcesses();
  const before = fingerprint(good);
  try {
    await fn({ dir, runDir, good });
    assert.deepEqual(filesUnder(runDir), [], "nothing in the state directory");
    assert.deepEqual(serverProcesses(), servers, "no server process started");
    assert.equal(fingerprint(good), before, "the file is unchanged");
  } finally {
    for (const l of listeners.splice(0)) l.close();
    Deno.removeSync(dir, { recursive: true });
  }
}

const listeners: Deno.Listener[] = [];

/**
 * Runs every case, a few fastloop processes at a time (each is a Deno start-up of about a
 * second), and checks each one's result.
 */
async function checkAll(
  runDir: string,
  cases: Array<{ args: string[]; code: number; pattern: RegExp; what: string; dropDac?: boolean }>,
): Promise<void> {
  const queue = [...cases];
  const worker = async () => {
    for (let c = queue.shift(); c; c = queue.shift()) {
      const run = await fastloop(c.args, { runDir, dropDac: c.dropDac });
      assertOneLineError(run, c.code, c.pattern, c.what);
    }
  };
  await Promise.all([worker(), worker(), worker()]);
}

async function sh(script: string, ...args: string[]): Promise<void> {
  const out = await new Deno.Command("sh", { args: ["-c", script, "sh", ...args] }).output();
  assert.ok(out.success, `${script}: ${new TextDecoder().decode(out.stderr)}`);
}

/** Path objects no command may accept as a regular file, made in `dir`. */
async function hostileObjects(dir: string): Promise<Array<[string, string, RegExp]>> {
  // A block device node (the loop major, minor 250) and a symlink to it: mknod needs no device.
  await sh(`mknod "$1/blockdev" b 7 250 && ln -s "$1/blockdev" "$1/link-to-blockdev"`, dir);
  await sh(`ln -s "$1/loop-b" "$1/loop-a" && ln -s "$1/loop-a" "$1/loop-b"`, dir);
  await sh(`ln -s "$1/nowhere" "$1/dangling"`, dir);
  // A unix socket file (kept listening until the scratch directory goes: closing unlinks it).
  listeners.push(Deno.listen({ transport: "unix", path: `${dir}/socket` }));
  return [
    ["block device", `${dir}/blockdev`, /is a block device, not a regular file$/],
    ["symlink to a block device", `${dir}/link-to-blockdev`, /is a block device/],
    ["symlink loop", `${dir}/loop-a`, /Too many levels of symbolic links \(os error 40\)$/],
    ["dangling symlink", `${dir}/dangling`, /does not exist$|No such file/],
    ["socket", `${dir}/socket`, /is a socket, not a regular file$/],
    ["path through a regular file", `${dir}/good.img/x`, /not a directory|Not a directory/],
    ["sysfs file", "/sys/kernel/mm/transparent_hugepage/enabled", /\/sys \(sysfs\) file/],
    ["procfs file", "/proc/self/stat", /\/proc \(procfs\) file/],
    ["huge name", HUGE, /"a{64}\.\.\." \(100000 characters\)/],
    ["name over PATH_MAX", `${dir}/${"d/".repeat(3000)}f`, /\(6[0-9]{3} characters\)/],
    ["component over NAME_MAX", `${dir}/${"n".repeat(300)}`, /File name too long/],
    ["newline in a missing name", `${dir}/no\nsuch file`, /"[^"]*no\\nsuch file"/],
  ];
}

Deno.test("attach refuses hostile paths in one line, exit 3, starting nothing", async () => {
  await withScratch(async ({ dir, runDir }) => {
    const objects = await hostileObjects(dir);
    await checkAll(
      runDir,
      objects.map(([what, path, pattern]) => ({ args: ["attach", path], code: 3, pattern, what })),
    );
  });
});

Deno.test("map refuses hostile paths in one line, exit 3", async () => {
  await withScratch(async ({ dir, runDir }) => {
    const objects = await hostileObjects(dir);
    await checkAll(runDir, [
      ...objects.map(([what, path, pattern]) => ({
        args: ["map", path],
        code: 3,
        pattern,
        what: `map ${what}`,
      })),
      { args: ["map", ""], code: 3, pattern: /file name is empty/, what: "map empty" },
    ]);
  });
});

Deno.test("detach and stat of hostile references: not attached (exit 7), in one line", async () => {
  await withScratch(async ({ dir, runDir }) => {
    const refs: Array<[string, string, RegExp]> = [
      ...(await hostileObjects(dir)).map(([what, path]): [string, string, RegExp] => [
        what,
        path,
        /is not attached/,
      ]),
      ["empty", "", /^fastloop: "" is not attached/],
      ["id past the range", "ublkb99999999", /ublkb99999999 is not attached/],
      ["huge id", `/dev/ublkb${"9".repeat(5000)}`, /\(5010 characters\) is not attached/],
      ["negative id", "ublkb-1", /ublkb-1 is not attached/],
      ["hex id", "0x1", /0x1 is not attached/],
      ["id with spaces", " 1 ", /" 1 " is not attached/],
      ["the control device", "/dev/ublk-control", /ublk-control is not attached/],
    ];
    // detach for every one; stat resolves references with the same code, so a few suffice.
    await checkAll(runDir, [
      ...refs.map(([what, ref, pattern]) => ({
        args: ["detach", "--", ref],
        code: 7,
        pattern,
        what: `detach ${what}`,
      })),
      ...refs.filter((_, i) => i % 4 === 0).map(([what, ref, pattern]) => ({
        args: ["stat", "--json", "--", ref],
        code: 7,
        pattern,
        what: `stat ${what}`,
      })),
      ...refs.filter((_, i) => i % 4 === 1).map(([what, ref, pattern]) => ({
        args: ["restart", "--", ref],
        code: 7,
        pattern,
        what: `restart ${what}`,
      })),
    ]);
  });
});

Deno.test("numeric options: empty, negative, huge, hex, exponent, padded and fractional values exit 2", async () => {
  await withScratch(async ({ good, runDir }) => {
    const values: Array<[string, RegExp]> = [
      ["", /must be a whole number, got ""$/],
      ["-5", /must be a whole number, got "-5"$/],
      ["-0", /must be a whole number, got "-0"$/],
      ["+8", /must be a whole number/],
      ["0x10", /must be a whole number/],
      ["1e3", /must be a whole number/],
      ["8.0", /must be a whole number/],
      [" 8", /must be a whole number/],
      ["8\n", /must be a whole number, got "8\\n"$/],
      ["\u0668", /must be a whole number/], // ARABIC-INDIC DIGIT EIGHT
      ["4294967297", /must be between/], // 2^32 + 1: must not wrap to 1
      ["18446744073709551617", /must be between/], // 2^64 + 1
      ["9".repeat(100_000), /must be between .* got Infinity$/],
      ["x".repeat(100_000), /must be a whole number, got 100000 characters$/],
    ];
    // Both flags go through one parser: every value on --queues (as --queues=V), every other
    // one on --depth (as --depth V).
    const cases = values.flatMap(([value, pattern], i) => {
      const forms = [[`--queues=${value}`]];
      if (i % 2 === 0 && !value.startsWith("-")) forms.push(["--depth", value]);
      return forms.map((form) => ({
        args: ["attach", ...form, good],
        code: 2,
        pattern,
        what: `attach ${form.join(" ").slice(0, 40)}`,
      }));
    });
    await checkAll(runDir, [
      ...cases,
      // A value that looks like a flag is still the option's value (as getopt takes it), and is
      // refused in the option's words.
      {
        args: ["attach", "--depth", "-1", good],
        code: 2,
        pattern: /--depth must be a whole number, got "-1"$/,
        what: "--depth -1",
      },
      {
        args: ["__server", good, "--log", `${runDir}/x.log`, "--recover", "99999999"],
        code: 2,
        pattern: /--recover must be between/,
        what: "__server --recover",
      },
    ]);
  });
});

Deno.test("size options (--offset, --sizelimit, --size, --sector-size): hostile values exit 2", async () => {
  await withScratch(async ({ good, runDir }) => {
    const values: Array<[string, RegExp]> = [
      ["", /must be a size in bytes such as 1048576, 1M or 4GiB, got ""$/],
      ["1e3", /must be a size in bytes/],
      ["0x10", /must be a size in bytes/],
      ["\u0668", /must be a size in bytes/], // ARABIC-INDIC DIGIT EIGHT
      ["1M\n", /must be a size in bytes .*got "1M\\n"$/],
      ["9".repeat(100_000), /is too large: 9{64}$/],
      ["99999999999P", /is too large/],
      ["x".repeat(100_000), /got 100000 characters$/],
    ];
    const cases = values.flatMap(([value, pattern], i) => [
      { args: ["attach", `--offset=${value}`, good], code: 2, pattern, what: `--offset ${i}` },
      {
        args: ["attach", `--sizelimit=${value}`, good],
        code: 2,
        pattern,
        what: `--sizelimit ${i}`,
      },
      { args: ["resize", `--size=${value}`, good], code: 2, pattern, what: `--size ${i}` },
    ]);
    for (const value of ["", "513", "4097", "9".repeat(100_000), "x".repeat(100_000)]) {
      cases.push({
        args: ["attach", `--sector-size=${value}`, good],
        code: 2,
        pattern: /--sector-size must be 512 or 4096, got ("[0-9x]{0,64}"|100000 characters)$/,
        what: `--sector-size ${value.slice(0, 8)}`,
      });
    }
    await checkAll(runDir, cases);
  });
});

Deno.test("flags and positionals out of shape exit 2 on every command", async () => {
  await withScratch(async ({ good, runDir }) => {
    const cases: Array<[string[], RegExp]> = [
      [["attach", "--read-only=yes", good], /does not take an argument/],
      [["attach", "--queues"], /argument missing/],
      [["attach", good, good], /expected exactly one FILE, got 2/],
      [["attach", `--${HUGE}`, good], /Unknown option '--a{62}\.\.\. \(100002 characters\)'/],
      [["detach", "--all", "--force=1"], /does not take an argument/],
      [["detach", "--all", ""], /not both/],
      [["restart"], /expected DEV, FILE or --all/],
      [["restart", "--all", ""], /not both/],
      [["restart", "--all=1"], /does not take an argument/],
      [["stat", "", ""], /at most one/],
      [["stat", "--json=false"], /does not take an argument/],
      [["map"], /expected exactly one FILE, got 0/],
      [["map", "--json", good, ""], /expected exactly one FILE, got 2/],
      [["doctor", ""], /unexpected argument ""/],
      [["doctor", HUGE], /unexpected argument "a{64}\.\.\." \(100000 characters\)/],
      [["doctor", "--json=1"], /does not take an argument/],
      [["__server"], /needs exactly one FILE and --log PATH/],
      [["__server", good, "--log"], /argument missing/],
      [[""], /Unknown command ""/],
      [["attach\n"], /Unknown command "attach\\n"/],
    ];
    await checkAll(
      runDir,
      cases.map(([args, pattern]) => ({
        args,
        code: 2,
        pattern,
        what: args.join(" ").slice(0, 60),
      })),
    );
  });
});

Deno.test("attach of a file in a directory its caller cannot search is refused (exit 3), the file untouched", async () => {
  await withScratch(async ({ dir, runDir }) => {
    const closed = `${dir}/closed`;
    Deno.mkdirSync(closed);
    const inside = `${closed}/f.img`;
    Deno.writeFileSync(inside, new Uint8Array(1 << 20));
    const before = fingerprint(inside);
    Deno.chmodSync(closed, 0o000);
    try {
      for (const cmd of ["attach", "map"]) {
        const run = await fastloop([cmd, inside], { runDir, dropDac: true });
        assertOneLineError(run, cmd === "attach" ? 3 : 6, /[Pp]ermission denied/, cmd);
      }
    } finally {
      Deno.chmodSync(closed, 0o700);
    }
    assert.equal(fingerprint(inside), before);
  });
});

Deno.test({
  name:
    "attach gets past validation for a name with a space and a newline, and for --read-only on a read-only mount",
  // Without ublk the server then fails with exit 5: what counts is that validation let it by
  // and that the failure leaves nothing. With ublk, test/vm/hostile.test.ts attaches them.
  ignore: HAS_UBLK,
  async fn() {
    await withScratch(async ({ dir, runDir }) => {
      const odd = `${dir}/name with space\nand newline.img`;
      Deno.writeFileSync(odd, new Uint8Array(1 << 20));
      const run = await fastloop(["attach", odd], { runDir });
      assertOneLineError(run, 5, /ublk is not available/, "odd name");

      const mnt = `${dir}/ro`;
      Deno.mkdirSync(mnt);
      await sh(`mount -t tmpfs -o size=4m tmpfs "$1"`, mnt);
      try {
        Deno.writeFileSync(`${mnt}/f.img`, new Uint8Array(1 << 20));
        await sh(`mount -o remount,ro "$1"`, mnt);
        const ro = await fastloop(["attach", "--read-only", `${mnt}/f.img`], { runDir });
        assertOneLineError(ro, 5, /ublk is not available/, "--read-only on a read-only mount");
      } finally {
        await sh(`umount "$1"`, mnt);
      }
    });
  },
});

Deno.test("parseDeviceRef() takes only the kernel's spelling of a device: no leading zeros, signs or spaces", () => {
  for (const [ref, id] of [["0", 0], ["ublkb0", 0], ["/dev/ublkb12", 12], ["9999999", 9999999]]) {
    assert.equal(parseDeviceRef(ref as string), id, String(ref));
  }
  for (const ref of ["00", "ublkb00", "/dev/ublkb012", "-1", "+1", " 1", "1 ", "0x1", "1e3", ""]) {
    assert.equal(parseDeviceRef(ref), null, JSON.stringify(ref));
  }
  assert.equal(parseDeviceRef("99999999"), null, "past seven digits");
});
