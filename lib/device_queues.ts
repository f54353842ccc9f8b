//! The Workers of a device's queues, as `lib/device.ts` drives them: started one per queue on
//! this module (each resolves once it has fetched every tag), reached through their mailboxes
//! (`postToQueues`, quit included), joined, and closed; and the latest of their last errors.
//! Both ends of a Worker are here: in a Worker, the entry at the end of this file runs the
//! queue's loop (`runQueue` in lib/event_loop.ts) on the Worker's thread.

import { close, eventfd, pinThreadToCpu } from "../ffi/libc.ts";
import { mapIoDescriptors } from "../ffi/ublk_cmd.ts";
import { runQueue } from "./event_loop.ts";
import {
  type LastError,
  MbOp,
  type Mode,
  type QueueConfig,
  QueueShared,
  type WorkerMessage,
} from "./queue_state.ts";

export interface Queue {
  worker: Worker;
  eventFd: number;
  shared: QueueShared;
  /** Settles when the Worker has ended (clean exit or error). */
  exited: Promise<void>;
  done: boolean;
}

/**
 * Posts one mailbox command to every live queue and waits until each acknowledged it (setMode:
 * once the IO the new mode forbids has drained) or ended.
 */
export async function postToQueues(
  queues: Queue[],
  op: MbOp,
  mode?: Mode,
  sizeBytes?: number,
): Promise<void> {
  await Promise.all(
    queues.filter((q) => !q.done).map((q) =>
      q.shared.acknowledged(q.shared.post(op, q.eventFd, mode, sizeBytes), () => q.done)
    ),
  );
}

/**
 * Waits for every queue's Worker to end; after `timeoutMs` tells the late ones to quit, and
 * after as long again terminates them.
 */
export async function joinQueues(queues: Queue[], timeoutMs: number): Promise<void> {
  const all = Promise.all(queues.map((q) => q.exited));
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => {
    timer = setTimeout(() => resolve("late"), timeoutMs);
  });
  const r = await Promise.race([all.then(() => "ok" as const), late]);
  clearTimeout(timer);
  if (r === "late") {
    void postToQueues(queues, MbOp.quit);
    const r2 = await Promise.race([all.then(() => "ok" as const), sleep(timeoutMs)]);
    if (r2 !== "ok") { for (const q of queues) if (!q.done) q.worker.terminate(); }
  }
}

/** Terminates what is left of the Workers and closes their doorbells. */
export function closeQueues(queues: Queue[]): void {
  for (const q of queues) {
    if (!q.done) q.worker.terminate();
    if (q.eventFd >= 0) close(q.eventFd);
    q.eventFd = -1;
  }
}

/** Starts one Worker per queue; resolves when all are fetching, rejects when one fails. */
export function startQueues(
  base: Omit<QueueConfig, "queueId" | "eventFd">,
  onFailure: (message: string) => void,
): { queues: Queue[]; fetching: Promise<void> } {
  const queues: Queue[] = [];
  const fetchingAll: Promise<void>[] = [];
  for (let queueId = 0; queueId < base.queues; queueId++) {
    const efd = eventfd(0);
    const worker = new Worker(import.meta.url, { type: "module" });
    let resolveFetching!: () => void;
    let rejectFetching!: (e: Error) => void;
    fetchingAll.push(
      new Promise<void>((res, rej) => {
        resolveFetching = res;
        rejectFetching = rej;
      }),
    );
    let resolveExit!: () => void;
    const exited = new Promise<void>((res) => (resolveExit = res));
    const q: Queue = {
      worker,
      eventFd: efd,
      shared: new QueueShared(base.sab, base.queues, queueId),
      exited,
      done: false,
    };
    const end = () => {
      q.done = true;
      resolveExit();
    };
    worker.onmessage = (e: MessageEvent<WorkerMessage>) => {
      const m = e.data;
      if (m.type === "fetching") resolveFetching();
      else if (m.type === "exit") end();
      else {
        const err = new Error(`queue ${queueId}: ${m.message}`);
        rejectFetching(err);
        onFailure(err.message);
        end();
      }
    };
    worker.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      const err = new Error(`queue ${queueId}: ${e.message}`);
      rejectFetching(err);
      onFailure(err.message);
      end();
    };
    const cfg: QueueConfig = { ...base, queueId, eventFd: efd };
    worker.postMessage(cfg);
    queues.push(q);
  }
  return { queues, fetching: Promise.all(fetchingAll).then(() => {}) };
}

/** The most recent of the queues' last errors, with its time as an ISO string. */
export function latestError(
  queues: QueueShared[],
): (Omit<LastError, "atMs"> & { at: string }) | null {
  let latest: LastError | null = null;
  for (const q of queues) {
    const e = q.lastError();
    if (e && (latest === null || e.atMs >= latest.atMs)) latest = e;
  }
  if (latest === null) return null;
  const { atMs, ...rest } = latest;
  return { ...rest, at: new Date(atMs).toISOString() };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// --- the Worker entry ---------------------------------------------------------------------------

interface WorkerScope {
  onmessage: ((event: MessageEvent<QueueConfig>) => void) | null;
  postMessage(message: WorkerMessage): void;
  close(): void;
}

// In a Worker (only there is `WorkerGlobalScope` defined) this module serves the queue it is
// posted: it maps the queue's descriptors, runs `runQueue` on this thread and reports.
if (typeof (globalThis as { WorkerGlobalScope?: unknown }).WorkerGlobalScope === "function") {
  const scope = globalThis as unknown as WorkerScope;
  scope.onmessage = (event) => {
    const cfg = event.data;
    try {
      if (cfg.queueCpu >= 0) pinThreadToCpu(cfg.queueCpu);
      const { desc, unmap } = mapIoDescriptors(cfg.charFd, cfg.devId, cfg.queueId, cfg.depth);
      try {
        runQueue(cfg, desc, () => scope.postMessage({ type: "fetching", queueId: cfg.queueId }));
      } finally {
        unmap();
      }
      scope.postMessage({ type: "exit", queueId: cfg.queueId });
    } catch (e) {
      const message = e instanceof Error ? e.message : String(e);
      scope.postMessage({ type: "error", queueId: cfg.queueId, message });
    }
    scope.close();
  };
}
