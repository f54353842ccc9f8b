// The lease policy against real openers: a shell opening the file for writing is held in its
// open(2) by the kernel until the policy has drained (switched the device to file mode) and
// released the lease; once it is gone, the retry regains the lease and the base mode. The oracle is
// the kernel: F_GETLEASE, and the opener's own open(2) completing only after the drain.

import assert from "node:assert/strict";
import { getLease } from "../../ffi/fcntl.ts";
import { close, O_RDWR, open } from "../../ffi/libc.ts";
import { LeasePolicy } from "../../lib/lease_policy.ts";
import type { Mode } from "../../lib/queue_state.ts";
import { testDir } from "./fs_fixtures.ts";

interface Applied {
  mode: Mode;
  /** Our lease's line in /proc/locks while the switch was draining ("" if it was gone). */
  leaseDuringDrain: string;
  doneAt: number;
}

/**
 * The /proc/locks line of the lease on `path`'s inode (matched by inode number: nothing else in
 * the test takes leases). F_GETLEASE cannot tell: while a break is
 * pending it reports the lease type being broken to ("none"), though the lease still holds.
 */
function leaseLine(path: string): string {
  const { ino } = Deno.statSync(path);
  return Deno.readTextFileSync("/proc/locks").split("\n").find((l) =>
    / LEASE /.test(l) && l.includes(`:${ino} `)
  ) ?? "";
}

async function withPolicy(
  fn: (p: { policy: LeasePolicy; path: string; fd: number; applied: Applied[] }) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ dir: testDir(), prefix: "fastloop-lease-policy-" });
  const path = `${dir}/disk.img`;
  await Deno.writeFile(path, new Uint8Array(1 << 20));
  const fd = open(path, O_RDWR);
  const applied: Applied[] = [];
  const policy = new LeasePolicy(fd, path, false, async (mode) => {
    const leaseDuringDrain = leaseLine(path);
    await new Promise((r) => setTimeout(r, 50)); // direct IO draining
    applied.push({ mode, leaseDuringDrain, doneAt: performance.now() });
  });
  const unlisten = policy.listen();
  try {
    await fn({ policy, path, fd, applied });
  } finally {
    await policy.stop();
    policy.release();
    unlisten();
    close(fd);
    await Deno.remove(dir, { recursive: true });
  }
}

/** Opens `path` for writing in a shell; resolves with when its open(2) returned, and the child. */
async function openForWriting(
  path: string,
): Promise<{ openedAt: number; child: Deno.ChildProcess }> {
  const child = new Deno.Command("sh", {
    args: ["-c", 'exec sleep 30 1>>"$0"', path],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  for (let i = 0; i < 1000; i++) {
    try {
      if (Deno.readLinkSync(`/proc/${child.pid}/fd/1`) === path) {
        return { openedAt: performance.now(), child };
      }
    } catch { /* still in open(2), or not exec'd yet */ }
    await new Promise((r) => setTimeout(r, 5));
  }
  child.kill("SIGKILL");
  await child.status;
  throw new Error(`the opener never got ${path} open`);
}

Deno.test("a writer's open waits for the drain to file mode; the lease and fast mode come back after it leaves", async () => {
  await withPolicy(async ({ policy, path, fd, applied }) => {
    policy.baseMode = "fast";
    assert.equal(policy.take(), true);
    policy.mode = "fast";
    assert.equal(getLease(fd), "write");

    const { openedAt, child } = await openForWriting(path);
    try {
      // The opener got through only after the switch to file mode had drained, and the lease was
      // still ours during the drain: no direct IO overlaps the opener's writes.
      assert.equal(applied.length, 1);
      assert.equal(applied[0]!.mode, "file");
      assert.match(applied[0]!.leaseDuringDrain, /BREAKING/);
      assert.ok(
        applied[0]!.doneAt <= openedAt,
        "the opener's open returned before the drain ended",
      );
      assert.equal(policy.mode, "file");
      assert.equal(policy.lease, "none");
      assert.equal(getLease(fd), "none");
      // While the writer has it open, the retry cannot take the lease back.
      await new Promise((r) => setTimeout(r, 1300));
      assert.equal(policy.lease, "none");
      assert.equal(policy.mode, "file");
    } finally {
      child.kill("SIGKILL");
      await child.status;
    }

    // Retries back off (1 s, 2 s, …): well within 10 s the lease is held again.
    const deadline = performance.now() + 10_000;
    while (policy.mode !== "fast" && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(policy.mode, "fast");
    assert.equal(getLease(fd), "write");
    assert.deepEqual(applied.map((a) => a.mode), ["file", "fast"]);
    const stat = policy.stat();
    assert.equal(stat.leaseBreaks, 1);
    assert.equal(stat.leaseRegains, 1);
    assert.equal(stat.transitions, 2);
  });
});

Deno.test("take() refuses while another process has the file open, and stop() ends the retries", async () => {
  await withPolicy(async ({ policy, path, fd, applied }) => {
    const { child } = await openForWriting(path);
    try {
      assert.equal(policy.take(), false);
      assert.equal(getLease(fd), "none");
      policy.baseMode = "fast";
      policy.scheduleRetry();
      await policy.stop();
    } finally {
      child.kill("SIGKILL");
      await child.status;
    }
    // Stopped: the file is free now, but no retry takes the lease or switches the mode.
    await new Promise((r) => setTimeout(r, 1300));
    assert.equal(getLease(fd), "none");
    assert.deepEqual(applied, []);
  });
});
