// First boot of the power-loss test (run inside the VM by power_loss.test.ts): sets up two
// devices over files on ext4 on /dev/vda, writes numbered records to both, prints a line for
// every record that is durable by the block layer's contract, and cuts the power (sysrq 'b':
// reboot at once, no sync; QEMU runs with -no-reboot, so it exits) while writes are in flight.
//
//   A: fastloop. The flush stream is buffered writes + fsync every 8 records (REQ_PREFLUSH
//      reaches the server as a FLUSH); the FUA stream is O_DIRECT|O_DSYNC writes, which the block
//      layer sends with REQ_FUA. fio writes in the background at queue depth 16.
//   B: the kernel's loop driver, buffered (no --direct-io), with a writer that lies: it reports
//      records durable without fsync and without O_DSYNC. The loop device acknowledges them from
//      the page cache, so they die with the power: the checker must find them missing, which
//      shows that the test can catch a device that acknowledges from memory.
//
// Usage: deno run --allow-all test/power/vm_crash.ts

import {
  AlignedBuffer,
  close,
  fsync,
  libc,
  O_DIRECT,
  O_DSYNC,
  O_RDWR,
  open,
  pwrite,
} from "../../ffi/libc.ts";
import {
  durableLine,
  FILE_BYTES,
  FIO_BYTES,
  FIO_OFFSET,
  MAX_SEQ,
  RECORD_BYTES,
  recordBytes,
  recordOffset,
  type Stream,
} from "./records.ts";

const DISK = "/dev/vda";
const MNT = "/mnt/power";
/**
 * Stop writing (and cut the power) after TARGET_SEQ records per stream, or after MAX_WRITE_MS
 * once at least MIN_SEQ are written (4 flushes): a loaded host can be slow, but the check needs
 * something to check (power_loss.test.ts asks for MIN_SEQ).
 */
const TARGET_SEQ = Math.min(Number(Deno.env.get("FASTLOOP_POWER_RECORDS") ?? 480), MAX_SEQ - 64);
const MIN_SEQ = 32;
const MAX_WRITE_MS = 20_000;
const FLUSH_EVERY = 8;
const SYS_pwrite64 = 18n;

function sh(program: string, args: string[]): string {
  const out = new Deno.Command(program, { args, stdout: "piped", stderr: "piped" }).outputSync();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    throw new Error(`${program} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
  return text;
}

/** 96 MiB: [0, 32M) and [64M, 96M) written with zeros and synced, [32M, 64M) a hole. */
function makeFile(path: string): void {
  sh("truncate", ["-s", String(FILE_BYTES), path]);
  for (const [seekMiB, countMiB] of [[0, 32], [64, 32]]) {
    sh("dd", [
      "if=/dev/zero",
      `of=${path}`,
      "bs=1M",
      `seek=${seekMiB}`,
      `count=${countMiB}`,
      "conv=notrunc,fsync",
      "status=none",
    ]);
  }
}

interface Target {
  name: string;
  path: string;
  honest: boolean;
  bufferedFd: number;
  directFd: number;
}

function say(line: string): void {
  // console.log writes synchronously: the line is on its way to the console before we go on.
  console.log(line);
}

function main(): void {
  Deno.mkdirSync(MNT, { recursive: true });
  sh("mkfs.ext4", ["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", DISK]);
  sh("mount", [DISK, MNT]);
  makeFile(`${MNT}/a.img`);
  makeFile(`${MNT}/b.img`);
  sh("sync", []);

  const devA = sh("fastloop", ["attach", `${MNT}/a.img`]).trim();
  const devB = sh("losetup", ["-f", "--show", `${MNT}/b.img`]).trim();
  say(`power: A = fastloop ${devA}, B = loop (buffered) ${devB}`);
  // No periodic writeback: what the liar left in the page cache stays there until the power
  // goes (deterministic loss). fastloop's data must not depend on writeback timing anyway.
  Deno.writeTextFileSync("/proc/sys/vm/dirty_writeback_centisecs", "0");
  Deno.writeTextFileSync("/proc/sys/vm/dirty_expire_centisecs", "360000");

  const fio = new Deno.Command("fio", {
    args: [
      "--name=load",
      `--filename=${devA}`,
      `--offset=${FIO_OFFSET}`,
      `--size=${FIO_BYTES}`,
      "--rw=randwrite",
      "--bs=4k",
      "--ioengine=io_uring",
      "--direct=1",
      "--iodepth=16",
      "--rate_iops=400",
      "--time_based",
      "--runtime=600",
    ],
    stdout: "null",
    stderr: "null",
  }).spawn();
  void fio;

  const targets: Target[] = [
    { name: "A", path: devA, honest: true },
    { name: "B", path: devB, honest: false },
  ].map((t) => ({
    ...t,
    bufferedFd: open(t.path, O_RDWR),
    directFd: open(t.path, O_RDWR | O_DIRECT | (t.honest ? O_DSYNC : 0)),
  }));
  const buf = new AlignedBuffer(RECORD_BYTES);
  const write = (t: Target, stream: Stream, seq: number) => {
    buf.bytes.set(recordBytes(t.name, stream, seq));
    const fd = stream === "fua" ? t.directFd : t.bufferedFd;
    const n = pwrite(fd, buf.pointer, RECORD_BYTES, recordOffset(stream, seq));
    if (n !== RECORD_BYTES) throw new Error(`short write ${n} on ${t.path}`);
  };

  const started = Date.now();
  let seq = 0;
  for (; seq < TARGET_SEQ && (seq < MIN_SEQ || Date.now() - started < MAX_WRITE_MS); seq++) {
    for (const t of targets) {
      write(t, "flush", seq);
      if (seq % FLUSH_EVERY === FLUSH_EVERY - 1) {
        if (t.honest) fsync(t.bufferedFd, t.path);
        say(durableLine(t.name, "flush", seq));
      }
      // O_DSYNC|O_DIRECT: complete only once the device acknowledged a FUA write (A); the liar's
      // O_DIRECT alone completes once loop put it into the page cache (B).
      write(t, "fua", seq);
      say(durableLine(t.name, "fua", seq));
    }
  }
  const a = targets[0]!;
  // In flight when the power goes: unflushed buffered records (may be lost: never reported),
  // one FUA write issued on another thread and not awaited, and fio's queue of 16.
  for (let extra = 0; extra < 5; extra++) write(a, "flush", seq + extra);
  buf.bytes.set(recordBytes(a.name, "fua", seq));
  const inflight = libc.syscall_nonblocking(
    SYS_pwrite64,
    BigInt(a.directFd),
    buf.address,
    BigInt(RECORD_BYTES),
    BigInt(recordOffset("fua", seq)),
    0n,
    0n,
  );
  void inflight;
  say(
    `power: ${seq} records per stream in ${Date.now() - started} ms; cutting the power ` +
      "(a FUA write and fio in flight)",
  );
  Deno.writeTextFileSync("/proc/sys/kernel/sysrq", "1");
  Deno.writeTextFileSync("/proc/sysrq-trigger", "b");
  // Not reached: the VM is gone. Should it not be, say so (vm.sh then sees an exit status).
  for (const t of targets) {
    close(t.bufferedFd);
    close(t.directFd);
  }
  console.error("power: sysrq 'b' did not stop the VM");
  Deno.exit(99);
}

main();
