// File leases against real processes: a `sleep` holding the file open through shell
// redirection, and shell openers that time their own open(2) with `date +%s%N`.

import assert from "node:assert/strict";
import {
  getLease,
  LeaseRefusedError,
  onLeaseBreak,
  setLease,
  trySetLease,
} from "../../ffi/fcntl.ts";
import { SyscallError } from "../../ffi/errno.ts";
import { close, O_RDONLY, O_RDWR, open } from "../../ffi/libc.ts";
import { testDir } from "./fs_fixtures.ts";

async function withTempFile(fn: (path: string) => Promise<void>): Promise<void> {
  // Not /tmp: it may be tmpfs on some machines; leases need a local filesystem anyway.
  const dir = await Deno.makeTempDir({ dir: testDir(), prefix: "fastloop-lease-" });
  try {
    const path = `${dir}/file`;
    await Deno.writeTextFile(path, "leased data\n");
    await fn(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Spawns `sleep` with `path` open on its stdin (shell redirection); resolves once it is open. */
async function holdOpen(path: string, mode: "<" | ">>" = "<"): Promise<Deno.ChildProcess> {
  const child = new Deno.Command("sh", {
    args: ["-c", `exec sleep 30 ${mode === "<" ? "<" : "1>>"} "$0"`, path],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const fdLink = `/proc/${child.pid}/fd/${mode === "<" ? 0 : 1}`;
  for (let i = 0; i < 200; i++) {
    try {
      if (Deno.readLinkSync(fdLink) === path) return child;
    } catch { /* not exec'd yet */ }
    await new Promise((r) => setTimeout(r, 10));
  }
  child.kill("SIGKILL");
  await child.status;
  throw new Error(`sleep never opened ${path}`);
}

async function stop(child: Deno.ChildProcess): Promise<void> {
  child.kill("SIGKILL");
  await child.status;
}

Deno.test("setLease(write) is refused with a clear error while another process has the file open", async () => {
  await withTempFile(async (path) => {
    const sleeper = await holdOpen(path);
    const fd = open(path, O_RDWR);
    try {
      let err: unknown;
      try {
        setLease(fd, "write", path);
      } catch (e) {
        err = e;
      }
      assert.ok(err instanceof LeaseRefusedError, `threw ${err}`);
      assert.ok(err instanceof SyscallError && err.code === "EAGAIN");
      assert.match(
        err.message,
        new RegExp(`^Cannot take a write lease on ${path}: the file is open elsewhere`),
      );
      assert.equal(getLease(fd), "none");
      assert.equal(trySetLease(fd, "write", path), false);
      // Once the other process is gone, the same call succeeds.
      await stop(sleeper);
      setLease(fd, "write", path);
      assert.equal(getLease(fd), "write");
      setLease(fd, "unlock", path);
      assert.equal(getLease(fd), "none");
    } finally {
      await stop(sleeper).catch(() => {});
      close(fd);
    }
  });
});

Deno.test("setLease(write) is refused while a second fd of this process has the file open", async () => {
  await withTempFile((path) => {
    const fd = open(path, O_RDWR);
    const second = open(path, O_RDONLY);
    try {
      assert.throws(() => setLease(fd, "write", path), LeaseRefusedError);
      close(second);
      setLease(fd, "write", path);
      assert.equal(getLease(fd), "write");
      setLease(fd, "unlock", path);
    } finally {
      close(fd);
    }
    return Promise.resolve();
  });
});

Deno.test("a read lease needs an O_RDONLY fd: the kernel counts our own O_RDWR fd as a writer", async () => {
  await withTempFile(async (path) => {
    const reader = await holdOpen(path, "<");
    const rw = open(path, O_RDWR);
    try {
      // What a server holding one O_RDWR fd meets when it tries to downgrade on a read break.
      assert.throws(() => setLease(rw, "read", path), LeaseRefusedError);
    } finally {
      close(rw);
    }
    const ro = open(path, O_RDONLY);
    try {
      setLease(ro, "read", path); // another reader is fine for a read lease
      assert.equal(getLease(ro), "read");
      setLease(ro, "unlock", path);
    } finally {
      close(ro);
      await stop(reader);
    }
  });
});

/**
 * Another process opens `path` for reading (`<`) or appending (`>>`) and reports how long its
 * open(2) took, in ms, timed inside that process.
 */
async function timedOpen(path: string, redirect: "<" | ">>"): Promise<number> {
  const options = redirect === "<" ? "{ read: true }" : "{ append: true }";
  const script = `const t = performance.now(); const f = Deno.openSync(Deno.args[0], ${options});
    console.log(performance.now() - t); f.close();`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--quiet", script, path],
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return Number(new TextDecoder().decode(out.stdout).trim());
}

for (
  const [redirect, opener, breakingTo] of [["<", "reader", "read"], [
    ">>",
    "writer",
    "none",
  ]] as const
) {
  Deno.test(`a ${opener}'s open breaks the write lease to "${breakingTo}" and, answered, is not held`, async () => {
    await withTempFile(async (path) => {
      const breakTimeS = Number(await Deno.readTextFile("/proc/sys/fs/lease-break-time"));
      const fd = open(path, O_RDWR);
      const seen: { to: string; getLease: string }[] = [];
      // The listener first: SIGIO's default action would kill this process.
      const unlisten = onLeaseBreak(fd, (to) => {
        seen.push({ to, getLease: getLease(fd) });
        setLease(fd, "unlock", path);
      }, path);
      try {
        setLease(fd, "write", path);
        const ms = await timedOpen(path, redirect);
        console.log(
          `  ${opener} open with a write lease held: ${ms.toFixed(1)} ms ` +
            `(lease-break-time ${breakTimeS} s)`,
        );
        assert.deepEqual(seen, [{ to: breakingTo, getLease: breakingTo }]);
        assert.equal(getLease(fd), "none");
        assert.ok(ms < 1000, `open took ${ms} ms`);
        assert.ok(ms < breakTimeS * 1000 / 10, "far below the lease-break time");
        // No lease held now: another open is not a break (and shows what an open costs here).
        const baseline = await timedOpen(path, redirect);
        console.log(`  ${opener} open without a lease: ${baseline.toFixed(1)} ms`);
        assert.equal(seen.length, 1);
      } finally {
        setLease(fd, "unlock", path);
        unlisten();
        close(fd);
      }
    });
  });
}
