//! `fastloop stat [DEV|FILE] [--json]`: one row per attached device with its live figures, asked
//! from each server over its control socket (the counters live in the server's shared memory;
//! asking does not wake the queues). A server that is gone is shown as `dead`.

import { type Command, parseCommandArgs } from "../cli.ts";
import { UsageError } from "../errors.ts";
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

const HELP = `Usage: fastloop stat [DEV|FILE] [--json]

Show fastloop's devices: backing file and filesystem device, IO mode (fast: direct IO to the
filesystem's device; file: through the file; mixed: both seen), lease state, queues x depth, and
live counters split by path, extent cache, FIEMAP calls, in-flight IO, server memory, and the
IO errors the device returned (by kind: EIO, ENOSPC, other; the last one is printed under the
table with its operation, offset and path); then where each device's server logs (its file under
/run/fastloop/log, and syslog when /dev/log exists).
A device whose server died shows its server as recovering (or crash-loop, when servers keep
dying before they serve) and a line under the table: how often and how its servers died, since
when its IO waits, and when the next server starts; IO waits meanwhile, nothing fails.
A server handing its device over to a new one ('fastloop restart') shows as handing-over; the
supervisor's JSON counts restarts apart from deaths (restarts, lastRestart).
A device that serves everything through the file has a line under the table saying why, e.g.
"ublkb0: direct path off (bdev-write-mounted-refused): the kernel refuses to open a mounted
filesystem's device for writing (...): boot with bdev_allow_write_mounted=1, or use a kernel
built with CONFIG_BLK_DEV_WRITE_MOUNTED=y".
Prints nothing (JSON: []) when no device is attached.

Options:
  --json       print a JSON array, one object per device; "modeReason" says why the direct
               path is off and "directPathOff" names it: filesystem-not-eligible,
               bdev-write-mounted-refused, device-busy, device-permission-denied,
               device-missing, device-open-failed (absent while the direct path is on)
  -h, --help   show this help`;

export const command: Command = {
  summary: "show attached devices, their IO paths, lease state and counters",
  help: HELP,
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("stat", args, {
      "json": { type: "boolean" },
    });
    if (positionals.length > 1) {
      throw new UsageError("stat: expected at most one DEV or FILE (see 'fastloop stat --help')");
    }
    requireRoot("stat");
    const entries = positionals.length === 1 ? [resolve(positionals[0]!)] : listRecords();
    const rows = await Promise.all(entries.map(statOf));
    if (values.json) {
      console.log(JSON.stringify(rows, null, 2));
    } else if (rows.length > 0) {
      console.log(table(rows));
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

/** fast / file / mixed, as the user thinks of it: by where bytes actually went. */
export function displayMode(row: Row): string {
  const mode = typeof row["mode"] === "string" ? row["mode"] : "-";
  const direct = (counter(row, "bytesRead.direct") ?? 0) +
    (counter(row, "bytesWritten.direct") ?? 0);
  const file = (counter(row, "bytesRead.file") ?? 0) + (counter(row, "bytesWritten.file") ?? 0);
  if (mode === "fast" && direct > 0 && file > 0) return "mixed";
  return mode;
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

function table(rows: Row[]): string {
  const header = [
    "DEVICE",
    "FILE",
    "FSDEV",
    "MODE",
    "LEASE",
    "QxD",
    "READS",
    "WRITES",
    "FLUSH",
    "DISCARD",
    "DIRECT",
    "VIAFILE",
    "ZERO",
    "EXTENTS",
    "HIT/MISS",
    "FIEMAP",
    "INFL",
    "ERRORS",
    "RSS",
    "SERVER",
  ];
  const lines = rows.map((row) => {
    const server = row["server"] as { pid?: number; state?: string } | undefined;
    const directBytes = sum(counter(row, "bytesRead.direct"), counter(row, "bytesWritten.direct"));
    const fileBytes = sum(counter(row, "bytesRead.file"), counter(row, "bytesWritten.file"));
    const zeroBytes = counter(row, "bytesRead.zero");
    const extents = counter(row, "extentsCached");
    const cacheMem = counter(row, "extentCacheBytes");
    return [
      String(row["device"] ?? "-"),
      // Quoted when unusual: a newline in the name must not split the row.
      row["file"] === undefined ? "-" : quotePath(String(row["file"])),
      String(row["backingDevice"] ?? "-"),
      displayMode(row),
      String(row["lease"] ?? "-"),
      `${row["queues"] ?? "?"}x${row["depth"] ?? "?"}`,
      count(counter(row, "reads")),
      count(counter(row, "writes")),
      count(counter(row, "flushes")),
      count(counter(row, "discards")),
      bytes(directBytes),
      bytes(fileBytes),
      bytes(zeroBytes),
      extents === undefined ? "-" : `${extents}(${bytes(cacheMem)})`,
      `${count(counter(row, "cacheHits"))}/${count(counter(row, "cacheMisses"))}`,
      count(counter(row, "fiemapCalls")),
      count(counter(row, "inflight")),
      errorsCell(row),
      bytes(typeof row["rssBytes"] === "number" ? row["rssBytes"] : undefined),
      `${server?.state ?? "?"}(${server?.pid ?? "?"})`,
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  return [header, ...lines]
    .map((cells) => cells.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd())
    .join("\n");
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

/** `ublkb0: last error EIO on write of 4096 bytes at offset 1048576 (direct), at TIME`. */
function lastErrorLine(row: Row): string | null {
  const e = (row["counters"] as Record<string, unknown> | undefined)?.["lastError"] as
    | Record<string, unknown>
    | null
    | undefined;
  if (!e) return null;
  return `${deviceName(row)}: last error ${e["errno"]} on ${e["op"]} of ${e["lengthBytes"]} ` +
    `bytes at offset ${e["offsetBytes"]} (${e["path"]}), at ${e["at"]}`;
}

function sum(a: number | undefined, b: number | undefined): number | undefined {
  return a === undefined && b === undefined ? undefined : (a ?? 0) + (b ?? 0);
}
