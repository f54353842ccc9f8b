// Log pruning in the state directory: the newest logs of gone devices stay, and so does every log
// a device record still names, however old.

import assert from "node:assert/strict";
import { type DeviceRecord, logDir, pruneLogs, writeRecord } from "../../lib/registry.ts";

Deno.test("pruneLogs keeps the newest logs and every log a record names, and deletes the rest", () => {
  const dir = Deno.makeTempDirSync({ prefix: "fastloop-run-" });
  const saved = Deno.env.get("FASTLOOP_RUN_DIR");
  Deno.env.set("FASTLOOP_RUN_DIR", dir);
  try {
    Deno.mkdirSync(logDir(), { recursive: true });
    const now = Date.now() / 1000;
    const logPath = (i: number) => `${logDir()}/dev${i}.log`;
    for (let i = 0; i < 12; i++) {
      Deno.writeTextFileSync(logPath(i), `log ${i}\n`);
      // Log i is i hours old: 0 is the newest.
      Deno.utimeSync(logPath(i), now - i * 3600, now - i * 3600);
    }
    Deno.writeTextFileSync(`${logDir()}/notes.txt`, "not a log\n");
    // The oldest log belongs to a device that is still attached (its record names it).
    const record: DeviceRecord = {
      version: 1,
      id: 7,
      blockPath: "/dev/ublkb7",
      charPath: "/dev/ublkc7",
      file: { path: "/img", dev: "1", ino: "2" },
      server: { pid: Deno.pid, startTicks: 0 },
      startedAt: new Date().toISOString(),
      logPath: logPath(11),
      socketPath: `${dir}/ublkb7.sock`,
      options: { readOnly: false, queues: 1, depth: 128, recoverable: true },
    };
    writeRecord(record);

    assert.equal(pruneLogs(4), 7, "logs 4..10 removed");
    const left = [...Deno.readDirSync(logDir())].map((e) => e.name).sort();
    assert.deepEqual(left, [
      "dev0.log",
      "dev1.log",
      "dev11.log",
      "dev2.log",
      "dev3.log",
      "notes.txt",
    ]);
    assert.equal(pruneLogs(4), 0, "nothing more to prune");
  } finally {
    if (saved === undefined) Deno.env.delete("FASTLOOP_RUN_DIR");
    else Deno.env.set("FASTLOOP_RUN_DIR", saved);
    Deno.removeSync(dir, { recursive: true });
  }
});
