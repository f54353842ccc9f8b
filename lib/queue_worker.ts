//! Worker entry for one ublk queue: maps the queue's IO descriptors from /dev/ublkcN, then runs
//! `runQueue` (lib/event_loop.ts) synchronously on this Worker's own thread until the device
//! stops or the main thread says quit. See lib/event_loop.ts for why a Worker and how the main
//! thread reaches it while it sleeps in io_uring_enter.
//!
//! Messages to the main thread: `{ type: "fetching" }` once every tag is fetched (START_DEV may
//! go), `{ type: "exit" }` after a clean end, `{ type: "error", message }` when the queue failed.

/// <reference lib="deno.worker" />

import { MAP_POPULATE, MAP_SHARED, mmap, munmap, PROT_READ } from "../ffi/libc.ts";
import { ioDescAreaBytes, ioDescMmapOffset } from "../ffi/ublk_cmd.ts";
import { type QueueConfig, runQueue } from "./event_loop.ts";

export type WorkerMessage =
  | { type: "fetching"; queueId: number }
  | { type: "exit"; queueId: number }
  | { type: "error"; queueId: number; message: string };

self.onmessage = (event: MessageEvent<QueueConfig>) => {
  const cfg = event.data;
  const post = (m: WorkerMessage) => self.postMessage(m);
  try {
    const bytes = ioDescAreaBytes(cfg.depth);
    const ptr = mmap(
      bytes,
      PROT_READ,
      MAP_SHARED | MAP_POPULATE,
      cfg.charFd,
      ioDescMmapOffset(cfg.queueId),
      `/dev/ublkc${cfg.devId} queue ${cfg.queueId}`,
    );
    const desc = new DataView(Deno.UnsafePointerView.getArrayBuffer(ptr, bytes));
    runQueue(
      cfg,
      { desc, unmap: () => munmap(ptr, bytes) },
      () => post({ type: "fetching", queueId: cfg.queueId }),
    );
    post({ type: "exit", queueId: cfg.queueId });
  } catch (e) {
    post({
      type: "error",
      queueId: cfg.queueId,
      message: e instanceof Error ? e.message : String(e),
    });
  }
  self.close();
};
