//! The lease policy of a server (issue 5): the file is opened once, O_RDWR (read-write attach) or
//! O_RDONLY, and that fd holds a write or read lease; the device's IO may go to the filesystem's
//! device directly only while it is held. When the kernel breaks it (SIGIO):
//! - someone opens the file for writing or truncates it: the device goes to file mode (direct IO
//!   drains and the extent cache is dropped), then the lease is released — the opener waits only
//!   for that drain;
//! - someone opens it for reading: the kernel refuses a read lease on an fd open for writing
//!   (EAGAIN, even our own fd; measured), and without any lease a later writer would go unnoticed,
//!   so a reader is handled like a writer.
//! Then the lease is retried with backoff; once held again the device returns to its base mode
//! with a fresh mapping. Every transition is logged and counted for `stat`. Mode changes are
//! serialised: a break can arrive while a regain is still draining.

import {
  getLease,
  LeaseRefusedError,
  type LeaseType,
  onLeaseBreak,
  setLease,
  trySetLease,
} from "../ffi/fcntl.ts";
import { fadvise, fdatasync, POSIX_FADV_DONTNEED } from "../ffi/libc.ts";
import { log } from "./log.ts";
import type { Mode } from "./queue_state.ts";

interface Transition {
  at: string;
  from: Mode;
  to: Mode;
  lease: LeaseType;
  why: string;
}

const MAX_TRANSITIONS_KEPT = 32;
const LEASE_RETRY_FIRST_MS = 1000;
const LEASE_RETRY_MAX_MS = 8000;

export class LeasePolicy {
  /** The lease held now. */
  lease: LeaseType = "none";
  /** The mode the device is in. */
  mode: Mode = "file";
  /** The mode the device runs in while the lease is held (file when it is not eligible). */
  baseMode: Mode = "file";
  readonly #fd: number;
  readonly #path: string;
  readonly #wanted: "read" | "write";
  /** Switches the device's queues to a mode (resolves once drained). */
  readonly #applyMode: (mode: Mode) => Promise<void>;
  #transitions: Transition[] = [];
  #transitionCount = 0;
  #breaks = 0;
  #regains = 0;
  #chain: Promise<void> = Promise.resolve();
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #retryDelayMs = LEASE_RETRY_FIRST_MS;
  #stopped = false;

  constructor(
    fd: number,
    path: string,
    readOnly: boolean,
    applyMode: (mode: Mode) => Promise<void>,
  ) {
    this.#fd = fd;
    this.#path = path;
    this.#wanted = readOnly ? "read" : "write";
    this.#applyMode = applyMode;
  }

  /** Is the lease this device wants held? */
  get held(): boolean {
    return this.lease === this.#wanted;
  }

  /** Listens for breaks (before taking the lease: an unhandled SIGIO kills the process). */
  listen(): () => void {
    return onLeaseBreak(this.#fd, (to) => this.#onBreak(to), this.#path);
  }

  /** Takes the lease at start-up; false when another process has the file open. */
  take(): boolean {
    try {
      setLease(this.#fd, this.#wanted, this.#path);
    } catch (e) {
      if (e instanceof LeaseRefusedError) return false;
      throw e;
    }
    this.lease = this.#wanted;
    log(`${this.#wanted} lease taken`);
    syncAndDropPageCache(this.#fd, this.#path);
    return true;
  }

  release(): void {
    if (this.lease !== "none") setLease(this.#fd, "unlock", this.#path);
    this.lease = "none";
  }

  /** Switches the device to `to` (serialised with the lease's own transitions), recorded. */
  setMode(to: Mode, why: string): Promise<void> {
    const next = this.#chain.then(() => this.#switch(to, why));
    this.#chain = next.catch(() => {});
    return next;
  }

  /** Retries the wanted lease with backoff until it is held again, then the base mode. */
  scheduleRetry(): void {
    clearTimeout(this.#retryTimer);
    if (this.#stopped) return;
    this.#retryTimer = setTimeout(() => {
      this.#enqueue(async () => {
        if (this.#stopped || this.held) return;
        if (trySetLease(this.#fd, this.#wanted, this.#path)) {
          this.lease = this.#wanted;
          this.#regains++;
          this.#retryDelayMs = LEASE_RETRY_FIRST_MS;
          log(`${this.#wanted} lease regained`);
          // Whoever had the file open may have left pages in its page cache.
          syncAndDropPageCache(this.#fd, this.#path);
          await this.#switch(this.baseMode, "lease regained (fresh mapping)");
          return;
        }
        this.#retryDelayMs = Math.min(this.#retryDelayMs * 2, LEASE_RETRY_MAX_MS);
        this.scheduleRetry();
      });
    }, this.#retryDelayMs);
  }

  /** No more retries; resolves once a transition in progress (maybe draining IO) is done. */
  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    await this.#chain.catch(() => {});
  }

  /** What `stat` shows of the lease. */
  stat(): Record<string, unknown> {
    let leaseKernel: string | undefined;
    try {
      leaseKernel = getLease(this.#fd);
    } catch {
      leaseKernel = undefined;
    }
    return {
      mode: this.mode,
      baseMode: this.baseMode,
      lease: this.lease,
      leaseKernel,
      leaseBreaks: this.#breaks,
      leaseRegains: this.#regains,
      transitions: this.#transitionCount,
      recentTransitions: this.#transitions,
    };
  }

  #onBreak(to: "read" | "none"): void {
    const brokeAt = performance.now();
    this.#breaks++;
    const opener = to === "read" ? "a reader" : "a writer or truncate";
    log(`lease break: ${opener} opened ${this.#path}`);
    this.#enqueue(async () => {
      if (this.lease === "none") return;
      // Reader or writer alike (see the header): no direct IO may remain in flight when the
      // opener proceeds, and no old mapping may be used afterwards. Trying a downgrade first
      // would cost the opener a second drain for a refusal.
      await this.#switch("file", `${opener} opened the file`);
      setLease(this.#fd, "unlock", this.#path);
      this.lease = "none";
      // The opener has been waiting since the break: this is its delay (issue 5 wants ms).
      log(
        `lease released ${(performance.now() - brokeAt).toFixed(1)} ms after the break; ` +
          "serving through the file",
      );
      this.scheduleRetry();
    });
  }

  #enqueue(step: () => Promise<void>): void {
    this.#chain = this.#chain.then(step).catch((e) => {
      log(`lease handling failed: ${e instanceof Error ? e.message : String(e)}`);
      // Safety first: whatever failed, do not leave direct IO running without a lease.
      if (this.lease === "none" && this.mode !== "file") {
        return this.#switch("file", "error in lease handling").catch(() => {});
      }
    });
  }

  async #switch(to: Mode, why: string): Promise<void> {
    const from = this.mode;
    if (from === to) return;
    await this.#applyMode(to);
    this.mode = to;
    this.#transitionCount++;
    this.#transitions.push({ at: new Date().toISOString(), from, to, lease: this.lease, why });
    if (this.#transitions.length > MAX_TRANSITIONS_KEPT) this.#transitions.shift();
    log(`mode ${from} -> ${to}: ${why}`);
  }
}

/**
 * Before direct IO begins (the lease just taken): write back the file's dirty pages and drop its
 * page cache. A dirty page is newer than the disk (a direct read would return stale data) and,
 * written back later, would overwrite a direct write with older data; a clean page would be
 * served to the next opener instead of what was written directly. Holding the write lease,
 * nobody else has the file open, so no page can come back until a break; under a read lease
 * nobody can write.
 */
function syncAndDropPageCache(fd: number, path: string): void {
  fdatasync(fd, path);
  fadvise(fd, 0, 0, POSIX_FADV_DONTNEED, path);
}
