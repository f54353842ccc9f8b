// Signals, logs and the root-only control channel, inside the test VM (a kernel with ublk).
// - SIGTERM or SIGINT to the server or to the supervisor means detach: afterwards the kernel has
//   no such block device, no fastloop process is left, the registry is empty, another process
//   can open the file and take a write lease on it (no one else holds it open), and the data
//   written through the device before the signal is in the file (cmp against a reference).
// - The per-device log file and syslog (busybox syslogd on /dev/log) record attach, a crash
//   (kill -9), the recovery and the detach; `stat` names both.
// - A non-root user cannot reach a device's control socket, and the CLI tells it it needs root.
// Oracles: /sys/block, /proc, the run directory, F_SETLEASE, cmp, the log texts themselves.

import assert from "node:assert/strict";
import {
  attach,
  fastloop,
  ok,
  registryFiles,
  run,
  serverProcesses,
  ublkDevices,
  withHostFs,
} from "./support.ts";
import { close, O_RDWR, open } from "../../ffi/libc.ts";
import { setLease } from "../../ffi/fcntl.ts";

const RUN_DIR = "/run/fastloop";

interface Record_ {
  server: { pid: number };
  supervisor?: { pid: number };
  logPath: string;
  socketPath: string;
}

function recordOf(dev: string): Record_ {
  return JSON.parse(Deno.readTextFileSync(`${RUN_DIR}/${dev.slice(5)}.json`));
}

function running(pid: number): boolean {
  try {
    return !Deno.readTextFileSync(`/proc/${pid}/stat`).includes(") Z ");
  } catch {
    return false;
  }
}

async function waitFor(what: string, cond: () => boolean, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * `stat --json DEV` as the server answers it. Under TCG on a loaded host the server can miss
 * stat's 5 s deadline (the row then says "unreachable"): ask again, for up to a minute.
 */
// deno-lint-ignore no-explicit-any
async function liveStat(dev: string): Promise<any> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const r = await fastloop(["stat", "--json", dev]);
    assert.equal(r.code, 0, r.stderr);
    const [row] = JSON.parse(r.stdout);
    if (row?.server?.state === "running" || Date.now() > deadline) return row;
  }
}

/** A preallocated file and a random reference image of `sizeMiB` on tmpfs. */
async function fileAndReference(file: string, ref: string, sizeMiB: number): Promise<void> {
  await ok("dd", [
    "if=/dev/zero",
    `of=${file}`,
    "bs=1M",
    `count=${sizeMiB}`,
    "conv=fsync",
    "status=none",
  ]);
  await ok("dd", ["if=/dev/urandom", `of=${ref}`, "bs=1M", `count=${sizeMiB}`, "status=none"]);
}

const SIGNAL_CASES = [
  { target: "server", signal: "SIGTERM" },
  { target: "server", signal: "SIGINT" },
  { target: "supervisor", signal: "SIGTERM" },
  { target: "supervisor", signal: "SIGINT" },
  // The supervisor signalled while it is bringing a killed server back (or about to).
  { target: "supervisor after kill -9 of the server", signal: "SIGTERM" },
] as const;

Deno.test("SIGTERM and SIGINT to the server or to the supervisor (also mid-recovery) detach: device, processes, record and lease gone, data in the file", async () => {
  await withHostFs(async (mnt, tmp) => {
    // Attached one after another: five at once (ten Deno starts) overran attach's 180 s under
    // TCG on a loaded host. The signals then go out together.
    const cases = [];
    for (const [i, { target, signal }] of SIGNAL_CASES.entries()) {
      const file = `${mnt}/sig${i}.img`;
      const ref = `${tmp}/ref${i}`;
      await fileAndReference(file, ref, 4);
      const dev = await attach(file);
      const rec = recordOf(dev);
      assert.ok(rec.supervisor && running(rec.supervisor.pid), "a supervisor is running");
      // Written through the device and acknowledged (O_DIRECT), no flush asked for: the detach
      // the signal starts must drain and flush it.
      await ok("dd", [`if=${ref}`, `of=${dev}`, "bs=1M", "oflag=direct", "status=none"]);
      cases.push({ target, signal, file, ref, dev, rec });
    }

    const row = await liveStat(cases[0]!.dev);
    assert.equal(row.logging?.file, cases[0]!.rec.logPath, "stat names the log file");
    assert.equal(row.logging?.syslog, null, "no syslog daemon runs in this test");
    assert.match(String(row.logging?.syslogNote), /does not exist/);

    for (const c of cases) {
      if (c.target.includes("kill -9")) {
        Deno.kill(c.rec.server.pid, "SIGKILL");
        await new Promise((r) => setTimeout(r, 300));
      }
      Deno.kill(c.target === "server" ? c.rec.server.pid : c.rec.supervisor!.pid, c.signal);
    }
    for (const c of cases) {
      const what = `${c.signal} to the ${c.target} of ${c.dev}`;
      await waitFor(
        `both processes to exit after ${what}`,
        () => !running(c.rec.server.pid) && !running(c.rec.supervisor!.pid),
      );
      assert.ok(!exists(`/sys/block/${c.dev.slice(5)}`), `${what}: gone from /sys/block`);
      const log = Deno.readTextFileSync(c.rec.logPath);
      const said = c.target === "server"
        ? `${c.signal}: detaching`
        : `supervisor: ${c.signal}: passing`;
      assert.ok(log.includes(said), `${what}: the log says so:\n${log}`);
      if (c.target.includes("kill -9")) {
        // Whichever server it met (the dead one, or a new one starting), it removed the device.
        assert.match(log, /supervisor: server died \(signal SIGKILL\)/, `${what}: ${log}`);
      } else {
        assert.match(log, /detached; exiting/, `${what}: ${log}`);
        assert.match(log, /supervisor: server exited after detaching; done/, `${what}: ${log}`);
      }
    }
    assert.deepEqual(ublkDevices(), [], "no ublk device left");
    assert.deepEqual(serverProcesses(), [], "no fastloop process left");
    assert.deepEqual(registryFiles(), [], "no record, socket or lock left");
    assert.deepEqual(JSON.parse((await fastloop(["stat", "--json"])).stdout), []);

    Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
    for (const c of cases) {
      // Nobody holds the file any more: a write lease needs every other open of it gone.
      const fd = open(c.file, O_RDWR);
      try {
        setLease(fd, "write", c.file);
        setLease(fd, "unlock", c.file);
      } finally {
        close(fd);
      }
      await ok("cmp", [c.file, c.ref]);
    }
  });
});

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

Deno.test("attach, a crash, the recovery and detach are in the log file and in syslog; stat names both", async () => {
  await withHostFs(async (mnt, tmp) => {
    const syslogFile = `${tmp}/syslog`;
    const syslogd = new Deno.Command("busybox", {
      args: ["syslogd", "-n", "-O", syslogFile],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      await waitFor("syslogd's /dev/log", () => exists("/dev/log"), 20_000);
      const file = `${mnt}/log.img`;
      await fileAndReference(file, `${tmp}/ref`, 8);
      const dev = await attach(file);
      const name = dev.slice(5);
      const rec = recordOf(dev);
      const row = await liveStat(dev);
      assert.equal(row.logging?.syslog, "/dev/log");
      const table = (await fastloop(["stat", dev])).stdout;
      assert.ok(
        table.includes(`log of ${dev}: ${rec.logPath}, syslog via /dev/log`),
        `stat's table names the log: ${table}`,
      );

      Deno.kill(rec.server.pid, "SIGKILL");
      await waitFor(
        "a new server",
        () => recordOf(dev).server.pid !== rec.server.pid && running(recordOf(dev).server.pid),
      );
      await ok("dd", [`if=${tmp}/ref`, `of=${dev}`, "bs=1M", "oflag=direct", "status=none"]);
      const detach = await fastloop(["detach", dev]);
      assert.equal(detach.code, 0, detach.stderr);
      await waitFor("the supervisor to exit", () => !running(rec.supervisor!.pid));

      const events = [
        `starting for ${file}`,
        `device ${dev} live`,
        `ready: ${dev}`,
        "supervisor: server died (signal SIGKILL)",
        `device ${dev} recovered`,
        `supervisor: ${name} recovered in`,
        "detach requested over the control socket",
        "detached; exiting",
        "supervisor: server exited after detaching; done",
      ];
      const log = Deno.readTextFileSync(rec.logPath);
      for (const e of events) assert.ok(log.includes(e), `log file has "${e}":\n${log}`);
      // syslogd writes asynchronously: give it a moment for the last lines.
      await waitFor(
        "the last line in syslog",
        () => readOr(syslogFile).includes("server exited after detaching"),
        20_000,
      );
      const sys = readOr(syslogFile);
      for (const e of events) {
        assert.ok(sys.includes(e), `syslog has "${e}":\n${sys}`);
      }
      assert.match(
        sys,
        new RegExp(`daemon\\.err fastloop\\[[0-9]+\\]: ${name}: supervisor: server died`),
      );
      assert.match(sys, new RegExp(`daemon\\.info fastloop\\[[0-9]+\\]: ${name}: ready: ${dev}`));
      console.log(
        `log: ${log.split("\n").length - 1} lines in ${rec.logPath}, ` +
          `${sys.split("\n").filter((l) => l.includes("fastloop[")).length} in syslog`,
      );
    } finally {
      syslogd.kill("SIGTERM");
      await syslogd.status;
      try {
        Deno.removeSync("/dev/log");
      } catch {
        // syslogd removed it.
      }
    }
  });
});

function readOr(path: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return "";
  }
}

Deno.test("a non-root user cannot reach the control socket, and the CLI tells it that root is needed", async () => {
  await withHostFs(async (mnt, tmp) => {
    const file = `${mnt}/root.img`;
    await fileAndReference(file, `${tmp}/ref`, 8);
    const dev = await attach(file);
    const rec = recordOf(dev);
    try {
      const dir = Deno.statSync(RUN_DIR);
      assert.equal(dir.uid, 0);
      assert.equal(dir.mode! & 0o777, 0o700, "the run directory is root-only");
      const sock = Deno.lstatSync(rec.socketPath);
      assert.ok(sock.isSocket, `${rec.socketPath} is a socket`);
      assert.equal(sock.uid, 0);
      assert.equal(sock.mode! & 0o777, 0o600, "the socket is root-only");

      // Deno as uid/gid 65534 with no supplementary groups, with a cache dir it may write.
      const denoDir = `${tmp}/deno-nobody`;
      Deno.mkdirSync(denoDir, { mode: 0o777 });
      Deno.chmodSync(denoDir, 0o777);
      Deno.chmodSync(tmp, 0o755);
      const env = { DENO_DIR: denoDir, NO_COLOR: "1", PATH: Deno.env.get("PATH") ?? "" };
      const probeCode = `const p = ${JSON.stringify(rec.socketPath)};
         try {
           const c = await Deno.connect({ transport: "unix", path: p });
           await c.write(new TextEncoder().encode('{"cmd":"detach"}\\n'));
           console.log("CONNECTED");
         } catch (e) { console.log("REFUSED " + e.name); }
         console.log(Deno.readTextFileSync("/proc/self/status").match(/^Uid:.*$/m)[0]);`;
      const cli = [["attach", file], ["detach", dev], ["detach", "--all"], ["stat"]];
      // All at once: each is a Deno start, seconds apiece under TCG.
      const [probe, ...runs] = await Promise.all([
        run("deno", ["eval", probeCode], { uid: 65534, env }),
        ...cli.map((args) => run("fastloop", args, { uid: 65534, env })),
      ]);
      assert.match(probe!.stdout, /^Uid:\s+65534\s+65534/m, probe!.stderr);
      assert.match(probe!.stdout, /REFUSED PermissionDenied/, `${probe!.stdout}${probe!.stderr}`);
      cli.forEach((args, i) => {
        const r = runs[i]!;
        assert.equal(r.code, 6, `fastloop ${args.join(" ")} as nobody: ${r.stderr}`);
        assert.equal(r.stdout, "");
        const lines = r.stderr.trimEnd().split("\n");
        assert.equal(lines.length, 1, `one line, no stack trace: ${r.stderr}`);
        assert.match(lines[0]!, /^fastloop: \w+ must run as root/);
      });
      // Nothing of that reached the device.
      assert.ok(running(rec.server.pid), "the server still runs");
      const row = await liveStat(dev);
      assert.equal(row.server.state, "running");
    } finally {
      const d = await fastloop(["detach", dev]);
      assert.equal(d.code, 0, d.stderr);
    }
  });
});
