// What the host CLI tests share: running fastloop from source as a separate process with its own
// state directory (FASTLOOP_RUN_DIR), optionally as another user or without the capabilities that
// bypass file permissions, and the check that an error is one prefixed line with no stack trace.

import assert from "node:assert/strict";
import { pathExists } from "../../ffi/libc.ts";

/** The source tree, no trailing slash (decoded: the clone's path may hold a space). */
export const ROOT = decodeURIComponent(new URL("../../", import.meta.url).pathname).slice(0, -1);
export const MAIN = `${ROOT}/main.ts`;

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
    const tree = unprivilegedTree();
    env["DENO_DIR"] = tree.denoDir;
    const user = [`--reuid=${opts.asUser}`, `--regid=${opts.asUser}`, "--clear-groups"];
    argv = [...user, tree.deno, "run", "--allow-all", "--no-check", "--quiet", tree.main, ...args];
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

/** Can a user who is neither owner nor in the group reach and execute `path` (mode bits only)? */
function othersCanExecute(path: string): boolean {
  const real = Deno.realPathSync(path);
  if (((Deno.statSync(real).mode ?? 0) & 0o001) === 0) return false;
  for (
    let dir = real.slice(0, real.lastIndexOf("/"));
    dir !== "";
    dir = dir.slice(0, dir.lastIndexOf("/"))
  ) {
    if (((Deno.statSync(dir).mode ?? 0) & 0o001) === 0) return false;
  }
  return true;
}

/** Copies the files under `from` (recursively) to `to`, world-readable whatever their mode was. */
function copyReadable(from: string, to: string): void {
  Deno.mkdirSync(to, { recursive: true });
  Deno.chmodSync(to, 0o755);
  for (const e of Deno.readDirSync(from)) {
    if (e.isDirectory) copyReadable(`${from}/${e.name}`, `${to}/${e.name}`);
    else if (e.isFile) {
      Deno.copyFileSync(`${from}/${e.name}`, `${to}/${e.name}`);
      Deno.chmodSync(`${to}/${e.name}`, 0o644);
    }
  }
}

let unprivileged: { main: string; deno: string; denoDir: string } | null = null;

/**
 * What a user without privileges runs fastloop from: a world-readable copy of the sources in a
 * 0755 directory of its own, and the deno binary, copied too when others cannot reach it. The
 * tree itself may be where that user cannot read it (a clone under /root, mode 0700; a umask of
 * 077): Deno would then fail to import main.ts before fastloop could refuse the user. Made once
 * per test process, removed when it ends.
 */
function unprivilegedTree(): { main: string; deno: string; denoDir: string } {
  if (unprivileged) return unprivileged;
  const dir = Deno.makeTempDirSync({ prefix: "fastloop-unprivileged-" });
  globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
  Deno.chmodSync(dir, 0o755);
  const tree = `${dir}/tree`;
  copyReadable(`${ROOT}/lib`, `${tree}/lib`);
  copyReadable(`${ROOT}/ffi`, `${tree}/ffi`);
  for (const f of ["main.ts", "deno.json"]) {
    Deno.copyFileSync(`${ROOT}/${f}`, `${tree}/${f}`);
    Deno.chmodSync(`${tree}/${f}`, 0o644);
  }
  let deno = Deno.execPath();
  if (!othersCanExecute(deno)) {
    deno = `${dir}/deno`;
    Deno.copyFileSync(Deno.execPath(), deno);
    Deno.chmodSync(deno, 0o755);
  }
  // Deno needs a cache directory the user may write.
  const denoDir = `${dir}/deno-dir`;
  Deno.mkdirSync(denoDir);
  Deno.chmodSync(denoDir, 0o777);
  unprivileged = { main: `${tree}/main.ts`, deno, denoDir };
  return unprivileged;
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
