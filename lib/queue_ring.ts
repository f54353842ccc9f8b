//! The io_uring of one ublk queue: how it is set up, and how the queue's loop waits on it.

import {
  IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SINGLE_ISSUER,
  IORING_SETUP_TASKRUN_FLAG,
  IoUring,
} from "../ffi/io_uring.ts";
import type { QueueConfig } from "./queue_state.ts";

/**
 * The ring of a queue of `depth` tags. Only the queue's Worker ever enters it, so by default it is
 * SINGLE_ISSUER with DEFER_TASKRUN: ublk delivers requests as task work, which then runs inside
 * our own io_uring_enter instead of interrupting the thread (fewer wake-ups per batch). Kernels
 * without those flags get COOP_TASKRUN, then a plain ring; `mode` starts lower down that list.
 */
export function setupQueueRing(depth: number, mode: QueueConfig["ringMode"] = "defer"): IoUring {
  let entries = 64;
  while (entries < Math.min(4096, depth * 2 + 8)) entries *= 2;
  // TASKRUN_FLAG: pending task work shows in the SQ ring's flags (`spinForWork` watches it).
  const choices = [
    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
    0,
  ].slice(mode === "plain" ? 2 : mode === "coop" ? 1 : 0);
  return IoUring.setupFirst(
    entries,
    { sqe128: true, cqe32: true, cqEntries: entries * 4 },
    choices,
  );
}

/**
 * Submits what a turn prepared and waits for at least one CQE, with a short spin before sleeping
 * when `spinUs` > 0, for latency: waking a sleeping thread costs a scheduler round trip (under a
 * VM an IPI between vCPUs), often more than the wait itself at low queue depth. It spins only
 * while work keeps coming back within `spinUs`: a spin that finds nothing turns it off, and a
 * sleep that ends within `spinUs` turns it back on, so an idle queue sleeps. With more than
 * `maxInService` requests in service it sleeps at once: a sleep then collects several completions.
 */
export class QueueWait {
  readonly #ring: IoUring;
  readonly #maxMs: number;
  readonly #maxInService: number;
  #budgetMs: number;

  constructor(ring: IoUring, spinUs: number, maxInService: number) {
    this.#ring = ring;
    this.#maxMs = spinUs / 1000;
    this.#maxInService = maxInService;
    this.#budgetMs = this.#maxMs;
  }

  /** `inService`: the queue's requests fetched and not yet committed. */
  submitAndWait(inService: number): void {
    const ring = this.#ring;
    if (ring.cqReady() === 0 && inService <= this.#maxInService) {
      if (this.#budgetMs > 0) {
        // What this turn prepared goes out first, then a short spin for what comes back.
        ring.submit();
        if (!ring.spinForWork(performance.now() + this.#budgetMs)) this.#budgetMs = 0;
      } else if (this.#maxMs > 0) {
        const t0 = performance.now();
        ring.submitAndWait(1);
        if (performance.now() - t0 < this.#maxMs) this.#budgetMs = this.#maxMs;
      }
    }
    ring.submitAndWait(ring.cqReady() === 0 ? 1 : 0);
  }
}
