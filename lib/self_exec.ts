//! How fastloop runs itself again: the argv of a child process that executes this same program
//! (a compiled binary, or `deno run main.ts` from the source tree), so `attach` can start its
//! background server either way without knowing how it was installed.

import { VERSION } from "./version.ts";

/** The entry module, next to `lib/`: `file:///…/main.ts`. */
const MAIN_MODULE_URL = new URL("../main.ts", import.meta.url);

/**
 * argv (program first) that runs `fastloop ARGS...` in a new process.
 *
 * A compiled binary (`deno compile`) is its own program, so re-executing `Deno.execPath()` with
 * the arguments is enough. From source, `Deno.execPath()` is the deno binary: it needs `run`, the
 * permissions (the server uses FFI, files, sockets, signals) and `--no-check`, because type
 * checking already happened in CI and would only slow down start-up of every device.
 */
export function selfCommand(args: readonly string[]): string[] {
  if (Deno.build.standalone) return [Deno.execPath(), ...args];
  return [
    Deno.execPath(),
    "run",
    "--allow-all",
    "--no-check",
    "--quiet",
    mainModulePath(),
    ...args,
  ];
}

/** The filesystem path of `main.ts` when running from source. */
export function mainModulePath(): string {
  if (MAIN_MODULE_URL.protocol !== "file:") {
    throw new Error(`fastloop must run from a local file, not ${MAIN_MODULE_URL.href}`);
  }
  return decodeURIComponent(MAIN_MODULE_URL.pathname);
}

/**
 * Which fastloop this process is, for the log: `fastloop 0.1.0 at /usr/local/bin/fastloop` or,
 * from source, `fastloop 0.1.0 at /src/fastloop/main.ts`. A restart names both servers this way.
 */
export function programDescription(): string {
  let where: string;
  try {
    where = Deno.build.standalone ? Deno.execPath() : mainModulePath();
  } catch {
    where = "unknown path";
  }
  return `fastloop ${VERSION} at ${where}`;
}
