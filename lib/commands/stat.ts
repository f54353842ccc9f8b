//! `fastloop stat [DEV|FILE] [--verbose | --output COL,...] [--noheadings] [--json]`: one row per
//! attached device, asked from each server over its control socket (the counters live in the
//! server's shared memory; asking does not wake the queues). By default the columns a person
//! scans, as `losetup -l` shows them; `--verbose` adds every counter. A server that is gone is
//! shown as `dead`, from what the registry and /sys know.

import { type Command, parseCommandArgs } from "../cli.ts";
import { UsageError } from "../errors.ts";
import { partitionsOf } from "../partitions.ts";
import {
  controlRequest,
  listRecords,
  quotePath,
  readSupervisorStatus,
  type RegistryEntry,
  resolve,
  type SupervisorStatus,
} from "../registry.ts";
import { requireRoot } from "../validate.ts";

/** A live server answers from memory; anything slower than this is reported, not waited for. */
const STAT_TIMEOUT_MS = 5_000;

const HELP = `Usage: fastloop stat [DEV|FILE] [--verbose | --output COL,...] [--noheadings] [--json]

Show fastloop's devices, one row each, with the columns a person scans (as losetup -l does):
  DEVICE     /dev/ublkbN
  FILE       the attached file
  OFFSET     where the device starts in the file, in bytes (attach --offset)
  SIZELIMIT  the most the device may span, in bytes; 0: to the file's end (attach --sizelimit)
  SIZE       the device's size
  PATH       where its IO goes: direct (straight to the filesystem's device), file (everything
             through the file) or mixed (direct, and some bytes through the file: holes,
             shared or unwritten extents); - while no server serves it
  LEASE      the lease fastloop holds on the file (write, read, none)
  RO         1 for a read-only device
  SERVER     the server's state and pid: running, stopping, handing-over (fastloop restart),
             recovering or crash-loop (its supervisor is starting a new one; IO waits), dead,
             unreachable
--verbose adds SECTOR (logical block size), PARTS (partitions), FSDEV (the filesystem's device),
QxD (queues x depth), DATA (zerocopy: request pages go straight to the disk, UBLK_F_AUTO_BUF_REG,
6.16+; copy: through the server's buffers) and the live counters: READS, WRITES, FLUSH, DISCARD, DIRECT, VIAFILE and
ZERO (bytes by path), EXTENTS (cached, and their memory), HIT/MISS (extent cache), FIEMAP
(calls), INFL (in flight), ERRORS (failed requests by kind: EIO, ENOSPC, other), RSS (server
memory).
Under the table come notes: a device whose server died and when the next one starts, why the
direct path is off (e.g. "ublkb0: direct path off (bdev-write-mounted-refused): the kernel
refuses to open a mounted filesystem's device for writing (...): boot with
bdev_allow_write_mounted=1, or use a kernel built with CONFIG_BLK_DEV_WRITE_MOUNTED=y"), the
last IO error (operation, file offset, path), and where each server logs (its file under
/run/fastloop/log, and syslog when /dev/log exists).
Prints nothing (JSON: []) when no device is attached.

Options:
  -v, --verbose        every column
  -O, --output COLS    these columns, in this order (comma-separated, any case)
  -n, --noheadings     no header line and no notes: only the rows (for scripts)
  --json               print a JSON array, one object per device, with every field and
                       counter: offsetBytes, sizeLimitBytes, sizeBytes, sectorBytes, partscan,
                       partitions, path (as PATH), mode (fast or file), ...; "modeReason" says
                       why the direct path is off and "directPathOff" names it:
                       filesystem-not-eligible, bdev-write-mounted-refused, device-busy,
                       device-permission-denied, device-missing, device-open-failed (absent
                       while the direct path is on)
  -h, --help           show this help`;

export const command: Command = {
  summary: "show attached devices: file, region, size, IO path, lease, server (like losetup -l)",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("stat", args, {
      "json": { type: "boolean" },
      "verbose": { type: "boolean", short: "v" },
      "output": { type: "string", short: "O" },
      "noheadings": { type: "boolean", short: "n" },
    });
    if (positionals.length > 1) {
      throw new UsageError("stat: expected at most one DEV or FILE (see 'fastloop stat --help')");
    }
    if (values.verbose && values.output !== undefined) {
      throw new UsageError("stat: give --verbose or --output, not both");
    }
    if (values.json && (values.verbose || values.output !== undefined || values.noheadings)) {
      throw new UsageError(
        "stat: --json prints every field; --verbose, --output and " +
          "--noheadings shape the table",
      );
    }
    const columns = selectColumns(values.output, values.verbose ?? false);
    requireRoot("stat");
    const entries = positionals.length === 1 ? [resolve(positionals[0]!)] : listRecords();
    const rows: Row[] = (await Promise.all(entries.map(statOf))).map((row) => ({
      ...row,
      path: displayPath(row),
    }));
    if (values.json) {
      console.log(JSON.stringify(rows, null, 2));
    } else if (rows.length > 0) {
      const headings = !(values.noheadings ?? false);
      console.log(table(rows, columns, headings));
      if (!headings) return 0;
      for (const row of rows) {
        const name = String(row["device"] ?? "-").replace(/^\/dev\//, "");
        const note = typeof row["note"] === "string" ? `${name}: ${row["note"]}` : null;
        for (const line of [note, directPathLine(row), lastErrorLine(row)]) {
          if (line) console.log(line);
        }
      }
      console.log(logLines(rows));
    }
    return 0;
  },
};

type Row = Record<string, unknown>;

/** The server's own view, or what the registry knows when the server is gone or mute. */
export async function statOf(entry: RegistryEntry): Promise<Row> {
  const r = entry.record;
  const base: Row = {
    device: r.blockPath,
    id: r.id,
    file: r.file.path,
    offsetBytes: r.options.offsetBytes ?? 0,
    sizeLimitBytes: r.options.sizeLimitBytes ?? 0,
    // The kernel's size: right even while no server runs.
    sizeBytes: deviceSizeBytes(r.blockPath),
    sectorBytes: r.options.sectorBytes,
    partscan: r.options.partscan ?? false,
    partitions: partitionsOf(r.blockPath).map((p) => p.name),
    queues: r.options.queues,
    depth: r.options.depth,
    readOnly: r.options.readOnly,
    startedAt: r.startedAt,
    log: r.logPath,
  };
  const supervision = readSupervisorStatus(r.id);
  if (!entry.alive) {
    const recovering = entry.supervisorAlive;
    return {
      ...base,
      mode: "-",
      lease: "none",
      server: {
        pid: r.server.pid,
        state: !recovering ? "dead" : supervision?.crashLoop ? "crash-loop" : "recovering",
      },
      supervisor: recovering ? { ...r.supervisor, ...supervision } : r.supervisor,
      note: recovering
        ? recoveryNote(r.blockPath, supervision)
        : "server is dead: run 'fastloop detach' to clean up",
    };
  }
  if (supervision) base["supervisor"] = { ...r.supervisor, ...supervision };
  try {
    const reply = await controlRequest(r.socketPath, { cmd: "stat" }, STAT_TIMEOUT_MS);
    if (reply.ok && typeof reply["stat"] === "object" && reply["stat"] !== null) {
      return { ...base, ...(reply["stat"] as Row) };
    }
    return { ...base, server: { pid: r.server.pid, state: "error" }, note: reply.error };
  } catch (e) {
    return {
      ...base,
      server: { pid: r.server.pid, state: "unreachable" },
      note: `control socket: ${(e as Error).message}`,
    };
  }
}

/** /sys/block/NAME/size (512-byte sectors) in bytes; undefined when the kernel has no such disk. */
function deviceSizeBytes(blockPath: string): number | undefined {
  try {
    const sectors = Number(
      Deno.readTextFileSync(`/sys/block/${blockPath.replace(/^\/dev\//, "")}/size`).trim(),
    );
    return Number.isSafeInteger(sectors) ? sectors * 512 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * What a device whose IO waits for a server is doing, in one line: how its servers died, and
 * when the next one starts.
 */
export function recoveryNote(
  device: string,
  s: SupervisorStatus | null,
  nowMs = Date.now(),
): string {
  if (!s || s.deaths === 0) return "server died; its supervisor is starting a new one (IO waits)";
  const since = s.waitingSince ? ` since ${s.waitingSince}` : "";
  const last = s.lastDeath ? `; last: ${s.lastDeath.how}, ${s.lastDeath.cause}` : "";
  const loop = s.crashLoop
    ? `crash loop, ${s.quickDeaths} servers in a row died before serving`
    : "";
  const next = s.state === "waiting" && s.nextTryAt
    ? `next server in ${
      Math.max(0, (Date.parse(s.nextTryAt) - nowMs) / 1000).toFixed(0)
    } s (at ${s.nextTryAt})`
    : "a new server is starting";
  return `server died ${s.deaths} time(s)${last}${loop ? `; ${loop}` : ""}; IO waits${since}; ` +
    `${next}; 'fastloop detach --force ${device}' deletes the device and fails its IO`;
}

/** Where each device's server logs: the file, and syslog when it reaches one. */
function logLines(rows: Row[]): string {
  return rows.map((row) => {
    const logging = row["logging"] as { syslog?: string | null; syslogNote?: string } | undefined;
    const syslog = logging?.syslog
      ? `, syslog via ${logging.syslog}`
      : logging?.syslogNote
      ? ` (not syslog: ${logging.syslogNote})`
      : "";
    return `log of ${row["device"] ?? "?"}: ${row["log"] ?? "-"}${syslog}`;
  }).join("\n");
}

/** A counter by its path in `DeviceCounters` (`reads`, `bytesRead.direct`). */
function counter(row: Row, path: string): number | undefined {
  let v: unknown = row["counters"];
  for (const key of path.split(".")) {
    if (typeof v !== "object" || v === null) return undefined;
    v = (v as Record<string, unknown>)[key];
  }
  return typeof v === "number" ? v : undefined;
}

/**
 * The IO path as a person thinks of it: `direct` (the fast mode: straight to the filesystem's
 * device), `file` (everything through the file), `mixed` (fast mode, and bytes went both ways,
 * e.g. holes written through the file); `-` while no server serves the device.
 */
export function displayPath(row: Row): string {
  const mode = typeof row["mode"] === "string" ? row["mode"] : "-";
  if (mode !== "fast") return mode;
  const direct = (counter(row, "bytesRead.direct") ?? 0) +
    (counter(row, "bytesWritten.direct") ?? 0);
  const file = (counter(row, "bytesRead.file") ?? 0) + (counter(row, "bytesWritten.file") ?? 0);
  return direct > 0 && file > 0 ? "mixed" : "direct";
}

function bytes(n: number | undefined): string {
  if (n === undefined) return "-";
  const units = ["B", "K", "M", "G", "T"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v}B` : `${v < 10 ? v.toFixed(1) : Math.round(v)}${units[u]}`;
}

function count(n: number | undefined): string {
  return n === undefined ? "-" : String(n);
}

interface Column {
  name: string;
  /** In the default table (what a person scans, as `losetup -l` shows). */
  brief: boolean;
  cell(row: Row): string;
}

/** Every column, in table order; `--verbose` shows them all, `--output` picks some. */
export const COLUMNS: readonly Column[] = [
  { name: "DEVICE", brief: true, cell: (row) => String(row["device"] ?? "-") },
  // Quoted when unusual: a newline in the name must not split the row.
  {
    name: "FILE",
    brief: true,
    cell: (row) => row["file"] === undefined ? "-" : quotePath(String(row["file"])),
  },
  { name: "OFFSET", brief: true, cell: (row) => count(numberField(row, "offsetBytes")) },
  { name: "SIZELIMIT", brief: true, cell: (row) => count(numberField(row, "sizeLimitBytes")) },
  { name: "SIZE", brief: true, cell: (row) => bytes(numberField(row, "sizeBytes")) },
  { name: "SECTOR", brief: false, cell: (row) => count(numberField(row, "sectorBytes")) },
  {
    name: "PARTS",
    brief: false,
    cell: (row) => Array.isArray(row["partitions"]) ? String(row["partitions"].length) : "-",
  },
  { name: "FSDEV", brief: false, cell: (row) => String(row["backingDevice"] ?? "-") },
  { name: "PATH", brief: true, cell: (row) => displayPath(row) },
  { name: "LEASE", brief: true, cell: (row) => String(row["lease"] ?? "-") },
  {
    name: "RO",
    brief: true,
    cell: (row) => typeof row["readOnly"] === "boolean" ? (row["readOnly"] ? "1" : "0") : "-",
  },
  { name: "QxD", brief: false, cell: (row) => `${row["queues"] ?? "?"}x${row["depth"] ?? "?"}` },
  {
    name: "DATA",
    brief: false,
    cell: (row) => row["dataMode"] === "zero-copy" ? "zerocopy" : String(row["dataMode"] ?? "-"),
  },
  { name: "READS", brief: false, cell: (row) => count(counter(row, "reads")) },
  { name: "WRITES", brief: false, cell: (row) => count(counter(row, "writes")) },
  { name: "FLUSH", brief: false, cell: (row) => count(counter(row, "flushes")) },
  { name: "DISCARD", brief: false, cell: (row) => count(counter(row, "discards")) },
  {
    name: "DIRECT",
    brief: false,
    cell: (row) =>
      bytes(sum(counter(row, "bytesRead.direct"), counter(row, "bytesWritten.direct"))),
  },
  {
    name: "VIAFILE",
    brief: false,
    cell: (row) => bytes(sum(counter(row, "bytesRead.file"), counter(row, "bytesWritten.file"))),
  },
  { name: "ZERO", brief: false, cell: (row) => bytes(counter(row, "bytesRead.zero")) },
  {
    name: "EXTENTS",
    brief: false,
    cell: (row) => {
      const extents = counter(row, "extentsCached");
      return extents === undefined ? "-" : `${extents}(${bytes(counter(row, "extentCacheBytes"))})`;
    },
  },
  {
    name: "HIT/MISS",
    brief: false,
    cell: (row) => `${count(counter(row, "cacheHits"))}/${count(counter(row, "cacheMisses"))}`,
  },
  { name: "FIEMAP", brief: false, cell: (row) => count(counter(row, "fiemapCalls")) },
  { name: "INFL", brief: false, cell: (row) => count(counter(row, "inflight")) },
  { name: "ERRORS", brief: false, cell: (row) => errorsCell(row) },
  { name: "RSS", brief: false, cell: (row) => bytes(numberField(row, "rssBytes")) },
  {
    name: "SERVER",
    brief: true,
    cell: (row) => {
      const server = row["server"] as { pid?: number; state?: string } | undefined;
      return `${server?.state ?? "?"}(${server?.pid ?? "?"})`;
    },
  },
];

/**
 * The columns `--output` names (comma-separated, any case, in the order given), all of them
 * for `--verbose`, else the brief ones.
 */
export function selectColumns(output: string | undefined, verbose: boolean): Column[] {
  if (output === undefined) return COLUMNS.filter((c) => verbose || c.brief);
  const picked: Column[] = [];
  for (const name of output.split(",")) {
    const column = COLUMNS.find((c) => c.name.toLowerCase() === name.trim().toLowerCase());
    if (!column) {
      const shown = name.length > 64 ? `${name.length} characters` : JSON.stringify(name);
      throw new UsageError(
        `stat: unknown column ${shown} in --output (columns: ${
          COLUMNS.map((c) => c.name).join(",")
        })`,
      );
    }
    picked.push(column);
  }
  return picked;
}

/** The rows as a table of `columns`, with a header line unless `headings` is false. */
export function table(rows: Row[], columns: readonly Column[], headings = true): string {
  const lines = rows.map((row) => columns.map((c) => c.cell(row)));
  const all = headings ? [columns.map((c) => c.name), ...lines] : lines;
  const widths = columns.map((_, i) => Math.max(...all.map((l) => l[i]!.length)));
  return all
    .map((cells) => cells.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd())
    .join("\n");
}

function numberField(row: Row, key: string): number | undefined {
  const v = row[key];
  return typeof v === "number" ? v : undefined;
}

/** `0`, or `3(eio 2,enospc 1)`: the requests that failed, by kind. */
function errorsCell(row: Row): string {
  const total = counter(row, "errors");
  if (total === undefined) return "-";
  if (total === 0) return "0";
  const kinds = ["eio", "enospc", "other"]
    .map((k) => [k, counter(row, `errorsByKind.${k}`) ?? 0] as const)
    .filter(([, n]) => n > 0)
    .map(([k, n]) => `${k} ${n}`);
  return `${total}(${kinds.join(",")})`;
}

/**
 * `ublkb0: direct path off (bdev-write-mounted-refused): the kernel refuses …`: why a device
 * serves everything through the file, for devices whose base mode is `file`.
 */
function directPathLine(row: Row): string | null {
  if (row["baseMode"] !== "file" || typeof row["modeReason"] !== "string") return null;
  const code = typeof row["directPathOff"] === "string" ? ` (${row["directPathOff"]})` : "";
  return `${deviceName(row)}: direct path off${code}: ${row["modeReason"]}`;
}

function deviceName(row: Row): string {
  return String(row["device"] ?? "-").replace(/^\/dev\//, "");
}

/**
 * `ublkb0: last error EIO on write of 4096 bytes at file offset 1048576 (direct), at TIME`: a
 * file offset (the device's own offset plus `--offset`), as the engine works in file offsets.
 */
function lastErrorLine(row: Row): string | null {
  const e = (row["counters"] as Record<string, unknown> | undefined)?.["lastError"] as
    | Record<string, unknown>
    | null
    | undefined;
  if (!e) return null;
  return `${deviceName(row)}: last error ${e["errno"]} on ${e["op"]} of ${e["lengthBytes"]} ` +
    `bytes at file offset ${e["offsetBytes"]} (${e["path"]}), at ${e["at"]}`;
}

function sum(a: number | undefined, b: number | undefined): number | undefined {
  return a === undefined && b === undefined ? undefined : (a ?? 0) + (b ?? 0);
}
