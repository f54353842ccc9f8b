// The ABI check: every struct offset, size and constant that an ffi/ module defines is compared,
// by name, with what the C compiler reads from the kernel UAPI (and glibc) headers.
//
// Each scripts/abi/NAME.c prints the values ffi/NAME.ts must hold, keyed by the names the module
// exports (see scripts/abi/abi.h). This test compiles each program with `cc`, runs it, imports
// the module and compares. Names the installed headers are too old to have are listed as "not in
// this header", not failed. So that those names are checked too, the same programs are also
// compiled against the newest linux-libc-dev Debian ships (trixie-backports), fetched once and
// cached in .cache/ by scripts/abi/newer-headers.sh; FASTLOOP_ABI_NEWER=0 turns that off, and
// where it cannot be fetched those tests are skipped with the reason.

import assert from "node:assert/strict";

const ABI_DIR = decodeURIComponent(new URL("../../scripts/abi/", import.meta.url).pathname);
const FFI_DIR = decodeURIComponent(new URL("../../ffi/", import.meta.url).pathname);

interface AbiReport {
  module: string;
  header: string;
  values: Record<string, string>;
  notInHeader: string[];
}

function hasCompiler(): boolean {
  try {
    return new Deno.Command("cc", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

const haveCc = hasCompiler();
if (!haveCc) {
  console.log(
    "abi.test.ts: SKIPPED: no C compiler (`cc`) on PATH; install gcc to run the ABI check",
  );
}

const programs = [...Deno.readDirSync(ABI_DIR)]
  .filter((e) => e.isFile && e.name.endsWith(".c"))
  .map((e) => e.name.slice(0, -2))
  .sort();

/** Compiles and runs scripts/abi/NAME.c (against the headers in `includeDirs` first). */
async function abiReport(name: string, includeDirs: string[] = []): Promise<AbiReport> {
  const tmp = await Deno.makeTempDir({ prefix: "fastloop-abi-" });
  try {
    const exe = `${tmp}/${name}`;
    const args = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O0"];
    for (const dir of includeDirs) args.push("-I", dir);
    args.push("-o", exe, `${ABI_DIR}${name}.c`);
    const cc = await new Deno.Command("cc", { args, stdout: "piped", stderr: "piped" }).output();
    if (!cc.success) {
      throw new Error(`cc ${name}.c failed:\n${new TextDecoder().decode(cc.stderr)}`);
    }
    const out = await new Deno.Command(exe, { stdout: "piped", stderr: "piped" }).output();
    assert.ok(out.success, `${name} exited with ${out.code}`);
    return JSON.parse(new TextDecoder().decode(out.stdout)) as AbiReport;
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
}

/** What a TS export holds, as a BigInt, or a reason it cannot be compared. */
function tsValue(v: unknown): bigint | string {
  if (typeof v === "bigint") return v;
  if (typeof v === "number" && Number.isSafeInteger(v)) return BigInt(v);
  return `not an integer constant (${typeof v} ${String(v)})`;
}

/** Names of integer constants a module exports (UPPER_CASE), to show what no C line covers. */
function integerExports(mod: Record<string, unknown>): string[] {
  return Object.keys(mod).filter((k) =>
    /^[A-Z][A-Z0-9_]*$/.test(k) && typeof tsValue(mod[k]) === "bigint"
  );
}

function compare(report: AbiReport, mod: Record<string, unknown>): string[] {
  const problems: string[] = [];
  for (const [name, cText] of Object.entries(report.values)) {
    const c = BigInt(cText);
    if (!(name in mod)) {
      problems.push(`${name}: not exported by ${report.module} (header: ${c})`);
      continue;
    }
    const ts = tsValue(mod[name]);
    if (typeof ts === "string") {
      problems.push(`${name}: ${ts}`);
    } else if (ts !== c) {
      problems.push(
        `${name}: ${report.module} has ${ts} (0x${ts.toString(16)}), ` +
          `${report.header} has ${c} (0x${c.toString(16)})`,
      );
    }
  }
  return problems;
}

/** Runs the check of ffi/NAME.ts against one set of headers; fails on any mismatch. */
async function checkModule(name: string, includeDirs: string[], label: string): Promise<void> {
  const report = await abiReport(name, includeDirs);
  assert.equal(report.module, `ffi/${name}.ts`, "scripts/abi/NAME.c checks ffi/NAME.ts");
  const mod = await import(`${FFI_DIR}${name}.ts`) as Record<string, unknown>;
  let problems = compare(report, mod);

  if (name === "errno") {
    // Some errnos are only named in the module's table, not exported: check the table for
    // every errno, since the names shown to users must be the ones the headers give.
    const errnoName = mod.errnoName as (n: number) => string;
    problems = problems.filter((p) => !/^E\w+: not exported/.test(p));
    for (const [e, v] of Object.entries(report.values)) {
      const shown = errnoName(Number(v));
      if (shown !== e) problems.push(`errnoName(${v}) is ${shown}, the header calls it ${e}`);
    }
  }

  const checked = new Set([...Object.keys(report.values), ...report.notInHeader]);
  const unchecked = integerExports(mod).filter((k) => !checked.has(k));
  console.log(
    `ffi/${name}.ts: ${Object.keys(report.values).length} values checked against ` +
      `${report.header} (${label})`,
  );
  if (report.notInHeader.length) {
    console.log(`  not in this header: ${report.notInHeader.join(", ")}`);
  }
  if (unchecked.length) console.log(`  exported but not covered: ${unchecked.join(", ")}`);
  assert.deepEqual(problems, [], `ABI mismatches (${label}):\n${problems.join("\n")}`);
}

for (const name of programs) {
  Deno.test({
    name: `ffi/${name}.ts constants and struct layouts match the installed headers`,
    ignore: !haveCc,
    fn: () => checkModule(name, [], "installed headers"),
  });
}

/** Include dirs of the newest Debian UAPI headers, or why there are none. */
function newerHeaders(): { dirs: string[]; version: string } | { skip: string } {
  if (Deno.env.get("FASTLOOP_ABI_NEWER") === "0") return { skip: "FASTLOOP_ABI_NEWER=0" };
  if (!haveCc) return { skip: "no C compiler" };
  const cacheDir = decodeURIComponent(new URL("../../.cache/", import.meta.url).pathname);
  try {
    const out = new Deno.Command("bash", {
      args: [`${ABI_DIR}newer-headers.sh`, cacheDir],
      stdout: "piped",
      stderr: "piped",
    }).outputSync();
    const text = new TextDecoder();
    if (!out.success) {
      return {
        skip: `newer-headers.sh failed: ${text.decode(out.stderr).trim().split("\n").pop()}`,
      };
    }
    const dirs = text.decode(out.stdout).trim().split(":");
    const version = Deno.readTextFileSync(`${cacheDir}abi-headers/version`).trim();
    return { dirs, version };
  } catch (e) {
    return { skip: `newer-headers.sh could not run: ${e}` };
  }
}

const newer = newerHeaders();
if ("skip" in newer) {
  console.log(`abi.test.ts: checks against newer headers SKIPPED: ${newer.skip}`);
}
for (const name of programs) {
  const label = "dirs" in newer ? `linux-libc-dev ${newer.version}` : "newer linux-libc-dev";
  Deno.test({
    name: `ffi/${name}.ts constants and struct layouts match ${label} (trixie-backports)`,
    ignore: "skip" in newer,
    fn: () => checkModule(name, "dirs" in newer ? newer.dirs : [], label),
  });
}

Deno.test({
  name: "ABI check compares: a wrong offset in a module is reported by name",
  ignore: !haveCc,
  async fn() {
    const report = await abiReport("io_uring");
    const mod = { ...(await import(`${FFI_DIR}io_uring.ts`)) } as Record<string, unknown>;
    assert.deepEqual(compare(report, mod), []);
    mod.SQE_USER_DATA = 24;
    delete mod.IORING_OP_URING_CMD;
    const problems = compare(report, mod);
    assert.equal(problems.length, 2);
    assert.match(problems.join("\n"), /SQE_USER_DATA: ffi\/io_uring.ts has 24 .* has 32/);
    assert.match(problems.join("\n"), /IORING_OP_URING_CMD: not exported/);
  },
});
