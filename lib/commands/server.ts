//! `fastloop __server FILE --log PATH ...`: the internal entry of the background process that
//! `attach` starts. Not meant to be run by hand; its options mirror `attach`'s, plus the log path
//! and the file identity that `attach` validated.

import { type Command, parseCommandArgs, parseIntFlag } from "../cli.ts";
import { UsageError } from "../errors.ts";
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
    "                         [--supervise | --supervised] [--recover ID [--takeover]]",
    "",
    "Internal: the background process behind one device, started by 'fastloop attach'.",
    "It writes one JSON readiness line on stdout, then logs to PATH. With --supervise it is the",
    "supervisor instead: it runs the server as its child and restarts it (ublk user recovery)",
    "when it dies. --takeover (fastloop restart): the device's running server hands it over;",
    "wait for it to let go of the file.",
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
      "takeover": { type: "boolean" },
    });
    const [filePath, ...extra] = positionals;
    if (filePath === undefined || extra.length > 0 || values.log === undefined) {
      throw new UsageError("__server: needs exactly one FILE and --log PATH");
    }
    const recoverable = !(values["no-recover"] ?? false);
    const recoverDeviceId = values.recover === undefined
      ? undefined
      : parseIntFlag("__server", "recover", values.recover, 0, 0, 1 << 20);
    const takeover = values.takeover ?? false;
    if (takeover && recoverDeviceId === undefined) {
      throw new UsageError("__server: --takeover needs --recover ID");
    }
    if (values.supervise) {
      // Same arguments for every server the supervisor starts, minus this flag, --recover
      // (`fastloop recover`) and --takeover (`fastloop restart`), which the supervisor adds
      // itself when a server must take over.
      const serverArgs = ["__server"];
      for (let i = 0; i < args.length; i++) {
        if (args[i] === "--recover") i++;
        else if (
          !args[i]!.startsWith("--recover=") && args[i] !== "--supervise" &&
          args[i] !== "--takeover"
        ) {
          serverArgs.push(args[i]!);
        }
      }
      // Loaded here, and the server's modules below: the supervisor starts without them (each
      // start of a restart or attach waits for it; seconds under the test VM's TCG).
      const { runSupervisor } = await import("../supervisor.ts");
      return await runSupervisor({
        logPath: values.log,
        serverArgs,
        recoverable,
        recoverDeviceId,
        takeover,
      });
    }
    const depth = parseIntFlag(
      "__server",
      "depth",
      values.depth,
      DEPTH_DEFAULT,
      DEPTH_MIN,
      DEPTH_MAX,
    );
    const { runServer } = await import("../server.ts");
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
      takeover,
    });
  },
};
