// Micro-measurements of ffi/io_uring.ts on the host (printed by `deno bench`, never asserted):
// what one io_uring_enter round trip costs from Deno, and how batching amortises it.
//   deno bench --allow-all test/host/io_uring.bench.ts

import { IoUring } from "../../ffi/io_uring.ts";
import { getpid } from "../../ffi/libc.ts";

const ring = IoUring.setup(64);
const ring128 = IoUring.setup(64, { sqe128: true, cqe32: true });
let sink = 0;
const onCqe = (userData: number, res: number) => {
  sink += userData + res;
};

function nopRoundTrip(r: IoUring, batch: number): void {
  for (let i = 0; i < batch; i++) r.prepNop(r.getSqe(), i);
  let reaped = 0;
  while (reaped < batch) {
    r.submitAndWait(batch - reaped);
    reaped += r.reapCqes(onCqe);
  }
}

Deno.bench("baseline: getpid() through FFI (one syscall)", { group: "syscall" }, () => {
  sink += getpid();
});

Deno.bench("NOP round trip, 1 per io_uring_enter", { group: "syscall", baseline: true }, () => {
  nopRoundTrip(ring, 1);
});

Deno.bench("NOP round trip, SQE128/CQE32 ring, 1 per enter", { group: "syscall" }, () => {
  nopRoundTrip(ring128, 1);
});

Deno.bench("32 NOPs per io_uring_enter (per batch)", { group: "batch" }, () => {
  nopRoundTrip(ring, 32);
});

Deno.bench("32 NOPs per io_uring_enter, SQE128/CQE32 ring (per batch)", { group: "batch" }, () => {
  nopRoundTrip(ring128, 32);
});

globalThis.addEventListener("unload", () => {
  ring.close();
  ring128.close();
  if (sink === -1) console.log(sink);
});
