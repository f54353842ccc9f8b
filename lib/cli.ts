//! Argument parsing shared by the commands: `node:util` parseArgs in strict mode, with every
//! parse failure turned into a one-line `UsageError`.

import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "./errors.ts";

export interface Command {
  /** One line for `fastloop --help`. */
  summary: string;
  /** Full text for `fastloop CMD --help`. */
  help: string;
  run(args: string[]): Promise<number>;
}

type Options = NonNullable<ParseArgsConfig["options"]>;

/** parseArgs with strict checking; unknown flags and missing values become a `UsageError`. */
export function parseCommandArgs<T extends Options>(
  command: string,
  args: string[],
  options: T,
) {
  try {
    return parseArgs({
      args,
      options: { ...options, help: { type: "boolean", short: "h" } },
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    const message = (e instanceof Error ? e.message.split("\n")[0] ?? "" : String(e))
      // An option named by a 100 kB argument is shown by its start only.
      .replace(/[^\s'"]{65,}/g, (o) => `${o.slice(0, 64)}... (${o.length} characters)`);
    throw new UsageError(
      `${command}: ${message.replace(/\.$/, "")} (see 'fastloop ${command} --help')`,
    );
  }
}

/** Parses a positive integer flag value in [min, max]. */
export function parseIntFlag(
  command: string,
  flag: string,
  value: string | undefined,
  fallback: number,
  min: number,
  max: number,
): number {
  if (value === undefined) return fallback;
  if (!/^[0-9]+$/.test(value)) {
    throw new UsageError(
      `${command}: --${flag} must be a whole number, got ${
        value.length > 64 ? `${value.length} characters` : JSON.stringify(value)
      }`,
    );
  }
  const n = Number(value);
  if (n < min || n > max) {
    throw new UsageError(`${command}: --${flag} must be between ${min} and ${max}, got ${n}`);
  }
  return n;
}
