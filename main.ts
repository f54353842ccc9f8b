//! fastloop: attach a regular file as a block device served at the speed of the disk under it.
//! This file parses the command name, dispatches, and decides the exit code — nothing else.

import { ExitCode, UserError } from "./lib/errors.ts";
import { SyscallError } from "./ffi/errno.ts";
import type { Command } from "./lib/cli.ts";

export const VERSION = "0.1.0";

/** Command name → module. Imported lazily so `map` never loads the ublk code. */
const COMMANDS: Record<string, () => Promise<{ command: Command }>> = {
  attach: () => import("./lib/commands/attach.ts"),
  detach: () => import("./lib/commands/detach.ts"),
  stat: () => import("./lib/commands/stat.ts"),
  map: () => import("./lib/commands/map.ts"),
  doctor: () => import("./lib/commands/doctor.ts"),
};

/** Internal entry points of the background processes `attach` starts (not shown in help). */
const INTERNAL: Record<string, () => Promise<{ command: Command }>> = {
  "__server": () => import("./lib/commands/server.ts"),
};

async function usage(): Promise<string> {
  const lines = [
    "Usage: fastloop COMMAND [ARGS...]",
    "",
    "Attach a regular file as a ublk block device whose IO goes straight to the blocks of the",
    "filesystem's own device (FIEMAP + O_DIRECT), guarded by a file lease.",
    "",
    "Commands:",
  ];
  for (const [name, load] of Object.entries(COMMANDS)) {
    try {
      lines.push(`  ${name.padEnd(8)} ${(await load()).command.summary}`);
    } catch {
      lines.push(`  ${name}`);
    }
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
    console.log(await usage());
    return name === undefined ? ExitCode.usage : ExitCode.ok;
  }
  if (name === "--version" || name === "version") {
    console.log(`fastloop ${VERSION}`);
    return ExitCode.ok;
  }
  const load = COMMANDS[name] ?? INTERNAL[name];
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
