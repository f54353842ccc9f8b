// lib/cli.ts's option parser, against what getopt_long and losetup users type.
import assert from "node:assert/strict";
import { parseCommandArgs } from "../../lib/cli.ts";
import { UsageError } from "../../lib/errors.ts";

const OPTIONS = {
  "read-only": { type: "boolean", short: "r" },
  "partscan": { type: "boolean", short: "P" },
  "offset": { type: "string", short: "o" },
  "json": { type: "boolean" },
  "log": { type: "string" },
} as const;

const parse = (...args: string[]) => parseCommandArgs("attach", args, OPTIONS);

function refused(args: string[], pattern: RegExp) {
  assert.throws(() => parse(...args), (e: unknown) => {
    assert.ok(e instanceof UsageError, `${args.join(" ")}: ${e}`);
    assert.match(e.message, pattern, args.join(" "));
    assert.match(e.message, /^attach: .*\(see 'fastloop attach --help'\)$/);
    assert.doesNotMatch(e.message, /\n/);
    return true;
  });
}

Deno.test("options: long, long=value, short, short with its value joined, grouped flags", () => {
  assert.deepEqual(parse("a.img", "--offset", "4096", "--json"), {
    values: { offset: "4096", json: true },
    positionals: ["a.img"],
  });
  assert.deepEqual(parse("--offset=1M", "a.img").values, { offset: "1M" });
  assert.deepEqual(parse("--offset=", "a.img").values, { offset: "" });
  assert.deepEqual(parse("-o", "512", "a.img").values, { offset: "512" });
  assert.deepEqual(parse("-o512", "a.img").values, { offset: "512" });
  assert.deepEqual(parse("-rP", "a.img").values, { "read-only": true, partscan: true });
  assert.deepEqual(parse("-rPo", "8K", "a.img").values, {
    "read-only": true,
    partscan: true,
    offset: "8K",
  });
  assert.deepEqual(parse("-rPo8K", "a.img").values, {
    "read-only": true,
    partscan: true,
    offset: "8K",
  });
  assert.deepEqual(parse("-h").values, { help: true });
  assert.deepEqual(parse("--help").values, { help: true });
});

Deno.test("options: the last of a repeated option counts; values that look like options are values", () => {
  assert.deepEqual(parse("-o", "1", "--offset", "2", "a").values, { offset: "2" });
  assert.deepEqual(parse("--offset", "-1", "a").values, { offset: "-1" });
  assert.deepEqual(parse("--log", "--json", "a").values, { log: "--json" });
});

Deno.test("positionals: mixed with options, '-' is one, and everything after '--' is one", () => {
  assert.deepEqual(parse("a", "-r", "b").positionals, ["a", "b"]);
  assert.deepEqual(parse("-").positionals, ["-"]);
  assert.deepEqual(parse("-r", "--", "--json", "-o", "--").positionals, ["--json", "-o", "--"]);
  assert.deepEqual(parse("-r", "--", "--json").values, { "read-only": true });
});

Deno.test("refused in one line: unknown options, a missing value, a value given to a flag", () => {
  refused(
    ["--bogus", "a"],
    /Unknown option '--bogus' \(a path that starts with '-' goes after '--'/,
  );
  refused(["-rz", "a"], /Unknown option '-z'/);
  refused(["---offset", "1", "a"], /Unknown option '---offset'/);
  refused(["--toString", "a"], /Unknown option '--toString'/);
  refused(["--offset"], /^attach: Option '-o, --offset <value>' argument missing/);
  refused(["a", "-o"], /Option '-o, --offset <value>' argument missing/);
  refused(["--log"], /Option '--log <value>' argument missing/);
  refused(["--json=yes", "a"], /Option '--json' does not take an argument/);
  refused(["--" + "x".repeat(100_000)], /Unknown option '--x{62}\.\.\. \(100002 characters\)'/);
});
