// Micro-measurements of ffi/io_uring.ts on the host (printed by `deno bench`, never asserted):
// what one io_uring_enter round trip costs from Deno, how batching amortises it, and 4 KiB
// O_DIRECT reads through the ring next to plain pread(2) on the same file.
//   deno bench --allow-all test/host/io_uring.bench.ts

import { IoUring } from "../../ffi/io_uring.ts";
import {
  AlignedBuffer,
  close,
  getpid,
  O_CREAT,
  O_DIRECT,
  O_RDWR,
  open,
  pread,
} from "../../ffi/libc.ts";

const ring = IoUring.setup(64);
const ring128 = IoUring.setup(64, { sqe128: true, cqe32: true });
let sink = 0;
const onCqe = (userData: number, res: number) => {
  sink += userData + res;
};

function nopRoundTrip(r: IoUring, batch: number): void {
  for (let i = 0; i < batch; i++) r.prepNop(r.sqe(), i);
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

// 4 KiB O_DIRECT random reads of a 64 MiB file in a temp dir (skipped where O_DIRECT is refused,
// e.g. a tmpfs /tmp). The file is written once, so its blocks are allocated and on the device.
const FILE_BYTES = 64 * 1024 * 1024;
const dir = Deno.makeTempDirSync({ prefix: "fastloop-uring-bench-" });
let fd = -1;
try {
  const path = `${dir}/data`;
  Deno.writeFileSync(path, new Uint8Array(FILE_BYTES).fill(1));
  fd = open(path, O_RDWR | O_CREAT | O_DIRECT);
} catch (e) {
  console.log(`io_uring.bench.ts: O_DIRECT reads skipped: ${e}`);
}
const bufs = new AlignedBuffer(32 * 4096);
const blocks = FILE_BYTES / 4096;
let rnd = 12345;
const nextBlock = () => {
  rnd = (rnd * 1103515245 + 12345) >>> 0;
  return rnd % blocks;
};

Deno.bench("4 KiB O_DIRECT random read, pread(2)", { group: "read-qd1", ignore: fd < 0 }, () => {
  sink += pread(fd, bufs.pointer, 4096, nextBlock() * 4096);
});

Deno.bench(
  "4 KiB O_DIRECT random read, io_uring QD1",
  { group: "read-qd1", baseline: true, ignore: fd < 0 },
  () => {
    ring.prepRead(ring.sqe(), fd, bufs.address, 4096, nextBlock() * 4096, 1);
    while (ring.reapCqes(onCqe) === 0) ring.submitAndWait(1);
  },
);

Deno.bench("32 x 4 KiB O_DIRECT random reads, io_uring QD32 (per batch)", {
  group: "read-qd32",
  ignore: fd < 0,
}, () => {
  for (let i = 0; i < 32; i++) {
    ring.prepRead(ring.sqe(), fd, bufs.address + BigInt(i * 4096), 4096, nextBlock() * 4096, i);
  }
  let reaped = 0;
  while (reaped < 32) {
    ring.submitAndWait(32 - reaped);
    reaped += ring.reapCqes(onCqe);
  }
});

Deno.bench("32 x 4 KiB O_DIRECT random reads, pread(2) one after another", {
  group: "read-qd32",
  ignore: fd < 0,
}, () => {
  for (let i = 0; i < 32; i++) sink += pread(fd, bufs.pointer, 4096, nextBlock() * 4096);
});

globalThis.addEventListener("unload", () => {
  ring.close();
  ring128.close();
  bufs.free();
  if (fd >= 0) close(fd);
  Deno.removeSync(dir, { recursive: true });
  if (sink === -1) console.log(sink);
});
