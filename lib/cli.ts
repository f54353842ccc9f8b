//! Argument parsing shared by the commands: strict, GNU-style options (`--name VALUE`,
//! `--name=VALUE`, `-n VALUE`, `-nVALUE`, grouped short flags `-rP`, `--` ends the options), with
//! every failure a one-line `UsageError`.
//!
//! Not `node:util`'s parseArgs, which this replaced: importing any `node:` module starts Deno's
//! Node compatibility layer, 0.35–0.6 s of every fastloop process start in the test VM (TCG), and
//! attach starts three.

import { UsageError } from "./errors.ts";

export interface Command {
  /** One line for `fastloop --help`. */
  summary: string;
  /** Full text for `fastloop CMD --help`. */
  help: string;
  run(args: string[]): Promise<number>;
}

/** One option: a flag (`boolean`) or an option that takes a value (`string`). */
export interface OptionSpec {
  type: "string" | "boolean";
  /** A one-letter alias. */
  short?: string;
}

type Options = Record<string, OptionSpec>;

/** What was given: a string option's last value, `true` for a flag; absent when not given. */
export type OptionValues<T extends Options> =
  & { -readonly [K in keyof T]?: T[K]["type"] extends "string" ? string : boolean }
  & { help?: boolean };

/**
 * Parses `args` against `options` (plus `-h, --help`). Options and positionals may mix; a repeated
 * option keeps its last value. Unknown options, missing values and values given to flags are
 * `UsageError`s naming the command.
 */
export function parseCommandArgs<T extends Options>(
  command: string,
  args: string[],
  options: T,
): { values: OptionValues<T>; positionals: string[] } {
  try {
    const parsed = parseStrict(args, { ...options, help: { type: "boolean", short: "h" } });
    return { values: parsed.values as OptionValues<T>, positionals: parsed.positionals };
  } catch (e) {
    if (!(e instanceof ParseError)) throw e;
    const message = e.message
      // An option named by a 100 kB argument is shown by its start only.
      .replace(/[^\s'"]{65,}/g, (o) => `${o.slice(0, 64)}... (${o.length} characters)`);
    throw new UsageError(`${command}: ${message} (see 'fastloop ${command} --help')`);
  }
}

class ParseError extends Error {}

function parseStrict(args: string[], options: Options) {
  const values: Record<string, string | boolean> = {};
  const positionals: string[] = [];
  const byShort = new Map<string, string>();
  for (const [name, spec] of Object.entries(options)) {
    if (spec.short !== undefined) byShort.set(spec.short, name);
  }
  const label = (name: string) => {
    const short = options[name]!.short;
    return short === undefined ? `--${name}` : `-${short}, --${name}`;
  };
  const unknown = (option: string) =>
    new ParseError(
      `Unknown option '${option}' (a path that starts with '-' goes after '--', as in -- ${option})`,
    );
  // The value of a string option written apart from it is the next argument, whatever it looks
  // like (as getopt does): `--depth -1` is then refused for its value, in the option's words.
  const separateValue = (name: string, i: number): string => {
    const value = args[i];
    if (value === undefined) {
      throw new ParseError(`Option '${label(name)} <value>' argument missing`);
    }
    return value;
  };

  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--") {
      positionals.push(...args.slice(i + 1));
      break;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const spec = Object.hasOwn(options, name) ? options[name]! : undefined;
      if (spec === undefined) throw unknown(`--${name}`);
      if (spec.type === "boolean") {
        if (eq >= 0) throw new ParseError(`Option '--${name}' does not take an argument`);
        values[name] = true;
      } else {
        values[name] = eq >= 0 ? arg.slice(eq + 1) : separateValue(name, ++i);
      }
      continue;
    }
    if (arg.startsWith("-") && arg !== "-") {
      // -r, -rP (flags grouped), -o 4096, -o4096, -rPo 4096.
      for (let c = 1; c < arg.length; c++) {
        const name = byShort.get(arg[c]!);
        if (name === undefined) throw unknown(`-${arg[c]}`);
        if (options[name]!.type === "boolean") {
          values[name] = true;
          continue;
        }
        values[name] = c + 1 < arg.length ? arg.slice(c + 1) : separateValue(name, ++i);
        break;
      }
      continue;
    }
    positionals.push(arg);
  }
  return { values, positionals };
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
