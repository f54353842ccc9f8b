// The driver of test/vm/device.test.ts, run as its own process (so a hang is killable and a
// crash visible): creates the device on FILE in MODE with QUEUES queues (or takes over device
// RECOVER_ID), prints `READY <dev>`, waits for a line on stdin, prints `COUNTERS <json>`, stops
// and deletes the device. A module of its own so that `deno task check` type-checks it against
// lib/device.ts. Usage: deno run -A test/vm/device_driver.ts FILE MODE QUEUES [RECOVER_ID]

import { createDevice } from "../../lib/device.ts";
import { filesystemEligibility } from "../../lib/eligibility.ts";
import { O_DIRECT, O_RDWR, open } from "../../ffi/libc.ts";
import type { Mode } from "../../lib/queue_state.ts";

const [path, mode, queues, recoverId] = Deno.args;
const fd = open(path!, O_RDWR | O_DIRECT);
const el = filesystemEligibility(fd, path!);
const backingFd = el.eligible ? open(el.device!.devicePath, O_RDWR | O_DIRECT) : -1;
const dev = await createDevice({
  filePath: path!,
  fileFd: fd,
  fileSizeBytes: Deno.statSync(path!).size,
  regionOffsetBytes: 0,
  backingFd,
  logicalBlockSize: el.device?.logicalBlockSize ?? 512,
  physicalBlockSize: el.device?.physicalBlockSize ?? 4096,
  readOnly: false,
  queues: Number(queues),
  depth: 32,
  maxIoBytes: 256 * 1024,
  mode: mode as Mode,
  recoverable: true,
  ...(recoverId ? { recoverDeviceId: Number(recoverId) } : {}),
});
console.log("READY " + dev.blockPath);
const buf = new Uint8Array(16);
await Deno.stdin.read(buf);
const counters = await dev.counters();
await dev.stop();
await dev.delete();
console.log("COUNTERS " + JSON.stringify(counters));
