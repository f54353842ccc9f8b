//! `fastloop __server FILE --log PATH ...`: the internal entry of the background process that
//! `attach` starts. Not meant to be run by hand; its options mirror `attach`'s, plus the log path
//! and the file identity that `attach` validated.

import { type Command, parseCommandArgs, parseIntFlag } from "../cli.ts";
import { UsageError } from "../errors.ts";
import { runServer } from "../server.ts";
import { runSupervisor } from "../supervisor.ts";
import { parseByteSize } from "../region.ts";
import {
  DEPTH_DEFAULT,
  DEPTH_MAX,
  DEPTH_MIN,
  maxIoBytesForDepth,
  QUEUES_DEFAULT,
  QUEUES_MAX,
  QUEUES_MIN,
} from "../validate.ts";

export const command: Command = {
  summary: "internal: the per-device server process started by attach",
  help: [
    "Usage: fastloop __server FILE --log PATH [--read-only] [--queues N] [--depth N]",
    "                         [--offset BYTES] [--sizelimit BYTES] [--sector-size N]",
    "                         [--partscan] [--no-recover] [--dev DEV --ino INO]",
    "                         [--supervise | --supervised] [--recover ID]",
    "",
    "Internal: the background process behind one device, started by 'fastloop attach'.",
    "It writes one JSON readiness line on stdout, then logs to PATH. With --supervise it is the",
    "supervisor instead: it runs the server as its child and restarts it (ublk user recovery)",
    "when it dies.",
  ].join("\n"),
  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs("__server", args, {
      "log": { type: "string" },
      "read-only": { type: "boolean" },
      "queues": { type: "string" },
      "depth": { type: "string" },
      "offset": { type: "string" },
      "sizelimit": { type: "string" },
      "sector-size": { type: "string" },
      "partscan": { type: "boolean" },
      "no-recover": { type: "boolean" },
      "dev": { type: "string" },
      "ino": { type: "string" },
      "supervise": { type: "boolean" },
      "supervised": { type: "boolean" },
      "recover": { type: "string" },
    });
    const [filePath, ...extra] = positionals;
    if (filePath === undefined || extra.length > 0 || values.log === undefined) {
      throw new UsageError("__server: needs exactly one FILE and --log PATH");
    }
    const recoverable = !(values["no-recover"] ?? false);
    const recoverDeviceId = values.recover === undefined
      ? undefined
      : parseIntFlag("__server", "recover", values.recover, 0, 0, 1 << 20);
    if (values.supervise) {
      // Same arguments for every server the supervisor starts, minus this flag and --recover
      // (`fastloop recover`), which the supervisor adds itself when a server must take over.
      const serverArgs = ["__server"];
      for (let i = 0; i < args.length; i++) {
        if (args[i] === "--recover") i++;
        else if (!args[i]!.startsWith("--recover=") && args[i] !== "--supervise") {
          serverArgs.push(args[i]!);
        }
      }
      return await runSupervisor({ logPath: values.log, serverArgs, recoverable, recoverDeviceId });
    }
    const depth = parseIntFlag(
      "__server",
      "depth",
      values.depth,
      DEPTH_DEFAULT,
      DEPTH_MIN,
      DEPTH_MAX,
    );
    return await runServer({
      filePath,
      readOnly: values["read-only"] ?? false,
      queues: parseIntFlag(
        "__server",
        "queues",
        values.queues,
        QUEUES_DEFAULT,
        QUEUES_MIN,
        QUEUES_MAX,
      ),
      depth,
      maxIoBytes: maxIoBytesForDepth(depth),
      offsetBytes: parseByteSize("__server", "offset", values.offset) ?? 0,
      sizeLimitBytes: parseByteSize("__server", "sizelimit", values.sizelimit) ?? 0,
      // attach passes the sector size it settled on: the filesystem device's by default, which
      // may be any power of two from 512 to 4096 (lib/device.ts checks); absent, the server
      // takes that default itself.
      sectorBytes: values["sector-size"] === undefined
        ? undefined
        : parseIntFlag("__server", "sector-size", values["sector-size"], 0, 512, 4096),
      partscan: values.partscan ?? false,
      recoverable,
      logPath: values.log,
      expectDev: values.dev,
      expectIno: values.ino,
      supervised: values.supervised ?? false,
      recoverDeviceId,
    });
  },
};
