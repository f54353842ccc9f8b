// What `fastloop restart` and `recover` start from a device's record (lib/handover.ts): the
// settings carry over as `__server` arguments, and one they cannot pass on is refused rather than
// dropped; the takeover marker names a live server only.

import assert from "node:assert/strict";
import {
  readTakeoverMarker,
  removeTakeoverMarker,
  supervisorArgs,
  writeTakeoverMarker,
} from "../../lib/handover.ts";
import { UserError } from "../../lib/errors.ts";
import { type DeviceRecord, takeoverPath } from "../../lib/registry.ts";

function record(options: Record<string, unknown>): DeviceRecord {
  return {
    version: 1,
    id: 3,
    blockPath: "/dev/ublkb3",
    charPath: "/dev/ublkc3",
    file: { path: "/srv/disk one.img", dev: "2049", ino: "18446744073709551615" },
    server: { pid: 1, startTicks: 1 },
    startedAt: new Date().toISOString(),
    logPath: "/run/fastloop/log/d.log",
    socketPath: "/run/fastloop/ublkb3.sock",
    options: options as DeviceRecord["options"],
  };
}

Deno.test("supervisorArgs passes every setting of the record on, the file by its identity", () => {
  assert.deepEqual(
    supervisorArgs(record({ readOnly: true, queues: 4, depth: 512, recoverable: true })),
    [
      "__server",
      "--supervise",
      "/srv/disk one.img",
      "--log",
      "/run/fastloop/log/d.log",
      "--queues",
      "4",
      "--depth",
      "512",
      "--dev",
      "2049",
      "--ino",
      "18446744073709551615",
      "--offset",
      "0",
      "--sizelimit",
      "0",
      "--read-only",
    ],
  );
  // The region, the sector size and the partition scan carry over too (lib/region.ts).
  const region = supervisorArgs(record({
    readOnly: false,
    queues: 1,
    depth: 128,
    recoverable: true,
    offsetBytes: 1048576,
    sizeLimitBytes: 33554432,
    sectorBytes: 4096,
    partscan: true,
  }));
  assert.deepEqual(region.slice(region.indexOf("--offset")), [
    "--offset",
    "1048576",
    "--sizelimit",
    "33554432",
    "--sector-size",
    "4096",
    "--partscan",
  ]);
  const rw = supervisorArgs(record({ readOnly: false, queues: 1, depth: 128, recoverable: false }));
  assert.ok(!rw.includes("--read-only"));
  assert.equal(rw.at(-1), "--no-recover");
});

Deno.test("supervisorArgs refuses a setting it does not know instead of dropping it", () => {
  assert.throws(
    () =>
      supervisorArgs(
        record({ readOnly: false, queues: 1, depth: 128, recoverable: true, sectorSize: 4096 }),
      ),
    (e: unknown) =>
      e instanceof UserError && e.exitCode === 3 && /cannot pass on: sectorSize$/.test(e.message),
  );
});

Deno.test("the takeover marker names this live process, and a dead writer's marker reads as none", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "fastloop-takeover-" });
  const saved = Deno.env.get("FASTLOOP_RUN_DIR");
  Deno.env.set("FASTLOOP_RUN_DIR", dir);
  try {
    const written = writeTakeoverMarker(5);
    assert.equal(written.pid, Deno.pid);
    assert.equal(written.supervisorPid, Deno.ppid);
    assert.match(written.program, /^fastloop [0-9.]+ at \/.*main\.ts$/);
    assert.deepEqual(readTakeoverMarker(5), written);
    removeTakeoverMarker(5);
    assert.equal(readTakeoverMarker(5), null);
    // A marker left by a process that is gone (its pid reaped, or reused by another process).
    const child = new Deno.Command("true").spawn();
    await child.status;
    Deno.writeTextFileSync(
      takeoverPath(6),
      JSON.stringify({ ...written, pid: child.pid }),
    );
    assert.equal(readTakeoverMarker(6), null);
    Deno.writeTextFileSync(takeoverPath(7), JSON.stringify({ ...written, startTicks: 1 }));
    assert.equal(readTakeoverMarker(7), null, "same pid, another start time: not the writer");
    removeTakeoverMarker(6);
    assert.ok(Deno.statSync(takeoverPath(6)), "someone else's marker is left alone");
  } finally {
    if (saved === undefined) Deno.env.delete("FASTLOOP_RUN_DIR");
    else Deno.env.set("FASTLOOP_RUN_DIR", saved);
    Deno.removeSync(dir, { recursive: true });
  }
});
