//! fastloop: attach a regular file as a block device served at the speed of the disk under it.
//! This file parses the command name, dispatches, and decides the exit code — nothing else.

import { ExitCode, UserError } from "./lib/errors.ts";
import { SyscallError } from "./ffi/errno.ts";
import type { Command } from "./lib/cli.ts";
import { VERSION } from "./lib/version.ts";

export { VERSION };

type Loader = () => Promise<{ command: Command }>;

/** Command name → one-line summary and module, imported lazily so `map` never loads ublk code. */
const COMMANDS: Record<string, { summary: string; load: Loader }> = {
  attach: {
    summary: "attach FILE as /dev/ublkbN and print the device (like losetup -f --show)",
    load: () => import("./lib/commands/attach.ts"),
  },
  detach: {
    summary: "detach a device (DEV, FILE or --all): flush, stop, delete, release the file",
    load: () => import("./lib/commands/detach.ts"),
  },
  stat: {
    summary: "show attached devices: file, region, size, IO path, lease, server (like losetup -l)",
    load: () => import("./lib/commands/stat.ts"),
  },
  resize: {
    summary: "make a device take its file's new size, or grow both (like losetup -c)",
    load: () => import("./lib/commands/resize.ts"),
  },
  recover: {
    summary: "bring back a device whose server and supervisor are gone (ublk user recovery)",
    load: () => import("./lib/commands/recover.ts"),
  },
  restart: {
    summary: "replace a device's server with the fastloop installed now, under live IO (upgrade)",
    load: () => import("./lib/commands/restart.ts"),
  },
  map: {
    summary: "show a file's extents and which of them fastloop can reach directly",
    load: () => import("./lib/commands/map.ts"),
  },
  doctor: {
    summary: "report what this kernel offers fastloop (ublk, io_uring, privileges)",
    load: () => import("./lib/commands/doctor.ts"),
  },
};

/** Internal entry points of the background processes `attach` starts (not shown in help). */
const INTERNAL: Record<string, Loader> = {
  "__server": () => import("./lib/commands/server.ts"),
};

function usage(): string {
  const lines = [
    "Usage: fastloop COMMAND [ARGS...]",
    "",
    "Attach a regular file as a ublk block device whose IO goes straight to the blocks of the",
    "filesystem's own device (FIEMAP + O_DIRECT), guarded by a file lease.",
    "",
    "Commands:",
  ];
  for (const [name, { summary }] of Object.entries(COMMANDS)) {
    lines.push(`  ${name.padEnd(8)} ${summary}`);
  }
  lines.push(
    "",
    "Run 'fastloop COMMAND --help' for a command's options.",
    "Exit codes: 0 ok, 1 system failure, 2 usage, 3 bad input, 4 busy, 5 kernel lacks a feature,",
    "6 not permitted, 7 not attached.",
  );
  return lines.join("\n");
}

export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return name === undefined ? ExitCode.usage : ExitCode.ok;
  }
  if (name === "--version" || name === "version") {
    console.log(`fastloop ${VERSION}`);
    return ExitCode.ok;
  }
  const load = COMMANDS[name]?.load ?? INTERNAL[name];
  if (!load) {
    throw new UserError(
      `Unknown command ${JSON.stringify(name)} (see 'fastloop --help')`,
      ExitCode.usage,
    );
  }
  const { command } = await load();
  if (rest.includes("--help") || rest.includes("-h")) {
    console.log(command.help);
    return ExitCode.ok;
  }
  return await command.run(rest);
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (e) {
    if (e instanceof UserError) {
      console.error(`fastloop: ${e.message}`);
      code = e.exitCode;
    } else if (e instanceof SyscallError) {
      console.error(`fastloop: ${e.message}`);
      code = ExitCode.failure;
    } else {
      // A bug: keep the stack so it can be reported.
      console.error("fastloop: internal error:", e);
      code = ExitCode.failure;
    }
  }
  Deno.exit(code);
}
