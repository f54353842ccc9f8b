// The state directory's cleanup. Log pruning: the newest logs of gone devices stay, and so does
// every log a device record still names, however old. Removing a record also removes the
// half-written copies that writers killed between write and rename left, and only those.

import assert from "node:assert/strict";
import {
  type DeviceRecord,
  logDir,
  pruneLogs,
  removeRecord,
  writeRecord,
} from "../../lib/registry.ts";

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

Deno.test("removeRecord removes the device's files and its dead writers' temporaries, and nothing else", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "fastloop-run-" });
  const saved = Deno.env.get("FASTLOOP_RUN_DIR");
  Deno.env.set("FASTLOOP_RUN_DIR", dir);
  try {
    // A writer that is gone: a process that ran and exited (its pid is not reused this soon).
    const gone = new Deno.Command("true").spawn();
    await gone.status;
    const dead = gone.pid;
    const names = [
      "ublkb3.json",
      "ublkb3.sock",
      "ublkb3.supervisor.json",
      `ublkb3.json.tmp-${dead}`,
      `ublkb3.supervisor.json.tmp-${dead}`,
      `ublkb3.takeover.json.tmp-${dead}`,
      // pid 1 is alive: its rename is still to come.
      "ublkb3.supervisor.json.tmp-1",
      // Another device's files, whose ids share a prefix.
      `ublkb30.json.tmp-${dead}`,
      "ublkb30.json",
    ];
    for (const name of names) Deno.writeTextFileSync(`${dir}/${name}`, "{}\n");

    removeRecord(3);
    const left = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
    assert.deepEqual(left, [
      "ublkb3.supervisor.json.tmp-1",
      "ublkb30.json",
      `ublkb30.json.tmp-${dead}`,
    ]);
  } finally {
    if (saved === undefined) Deno.env.delete("FASTLOOP_RUN_DIR");
    else Deno.env.set("FASTLOOP_RUN_DIR", saved);
    Deno.removeSync(dir, { recursive: true });
  }
});
