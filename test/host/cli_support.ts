// What the host CLI tests share: running fastloop from source as a separate process with its own
// state directory (FASTLOOP_RUN_DIR), optionally as another user or without the capabilities that
// bypass file permissions, and the check that an error is one prefixed line with no stack trace.

import assert from "node:assert/strict";
import { pathExists } from "../../ffi/libc.ts";

export const MAIN = new URL("../../main.ts", import.meta.url).pathname;

export const HAS_UBLK = pathExists("/dev/ublk-control");

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

export interface FastloopOptions {
  /** The state directory (FASTLOOP_RUN_DIR). */
  runDir: string;
  cwd?: string;
  /** Run as this uid (and gid), through setpriv (util-linux). */
  asUser?: number;
  /** Keep uid 0 but drop the capabilities that bypass file permissions (a confined root). */
  dropDac?: boolean;
}

/** Runs `fastloop ARGS...` from source. */
export async function fastloop(args: string[], opts: FastloopOptions): Promise<Run> {
  let program = Deno.execPath();
  let argv = ["run", "--allow-all", "--no-check", "--quiet", MAIN, ...args];
  const env: Record<string, string> = { FASTLOOP_RUN_DIR: opts.runDir, NO_COLOR: "1" };
  if (opts.asUser !== undefined) {
    // Deno needs a cache directory the unprivileged user may write.
    env["DENO_DIR"] = `${opts.runDir}/deno-dir`;
    Deno.mkdirSync(env["DENO_DIR"], { recursive: true, mode: 0o777 });
    Deno.chmodSync(env["DENO_DIR"], 0o777);
    argv = [`--reuid=${opts.asUser}`, `--regid=${opts.asUser}`, "--clear-groups", program, ...argv];
    program = "setpriv";
  } else if (opts.dropDac) {
    const caps = "-dac_override,-dac_read_search";
    argv = [`--inh-caps=${caps}`, `--bounding-set=${caps}`, program, ...argv];
    program = "setpriv";
  }
  const out = await new Deno.Command(program, {
    args: argv,
    cwd: opts.cwd,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Longest stderr line accepted: a message quoting a huge argument must cut it short. */
export const LINE_MAX = 1000;

/**
 * The run failed with `code` and one line on stderr: "fastloop: ..." matching `pattern`, of
 * bounded length, no stack trace; nothing on stdout.
 */
export function assertOneLineError(run: Run, code: number, pattern: RegExp, what = ""): void {
  const shown = `${what ? `${what}: ` : ""}exit ${run.code}, stderr: ${run.stderr.slice(0, 2000)}`;
  assert.equal(run.code, code, shown);
  const lines = run.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `one line on stderr: ${shown}`);
  assert.match(lines[0]!, /^fastloop: /, shown);
  assert.match(lines[0]!, pattern, shown);
  assert.ok(lines[0]!.length <= LINE_MAX, `${what}: a ${lines[0]!.length}-character line`);
  assert.doesNotMatch(run.stderr, /\bat .*\.ts:\d+/, `no stack trace: ${shown}`);
  assert.equal(run.stdout, "", `nothing on stdout: ${shown}`);
}

/** Files (not directories) left anywhere under `dir`, relative paths; `deno-dir` excluded. */
export function filesUnder(dir: string, prefix = ""): string[] {
  const found: string[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(dir)];
  } catch {
    return found;
  }
  for (const e of entries) {
    if (e.name === "deno-dir") continue;
    if (e.isDirectory) found.push(...filesUnder(`${dir}/${e.name}`, `${prefix}${e.name}/`));
    else found.push(`${prefix}${e.name}`);
  }
  return found;
}
