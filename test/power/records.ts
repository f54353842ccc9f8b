// Records of the power-loss test, shared by the writer (first boot, vm_crash.ts) and the checker
// (second boot, vm_check.ts). A record is one 4 KiB block whose every byte follows from
// (device, stream, seq): the checker regenerates it and compares all 4096 bytes, so a missing,
// stale, torn or misplaced block is caught without trusting anything the writer stored.
//
// Layout of each device (and of the file behind it), 96 MiB:
//   [0, 16M)   flush stream, even seqs   (written before attach: fastloop's direct path)
//   [16M, 32M) FUA stream, even seqs     (written before attach: direct path)
//   [32M, 48M) flush stream, odd seqs    (a hole: fastloop writes through the file, which
//   [48M, 64M) FUA stream, odd seqs       allocates, so the file's metadata must be synced too)
//   [64M, 96M) background fio load (in flight when the power goes)

export const RECORD_BYTES = 4096;
export const MIB = 1024 * 1024;
export const FILE_BYTES = 96 * MIB;
export const FIO_OFFSET = 64 * MIB;
export const FIO_BYTES = 32 * MIB;
/** Seqs per stream that fit without wrapping (two 16 MiB halves of 4 KiB records). */
export const MAX_SEQ = (2 * 16 * MIB) / RECORD_BYTES;

export type Stream = "flush" | "fua";

/** Byte offset of record `seq` of `stream` on the device (and in the file). */
export function recordOffset(stream: Stream, seq: number): number {
  if (!Number.isInteger(seq) || seq < 0 || seq >= MAX_SEQ) throw new RangeError(`seq ${seq}`);
  const half = seq % 2 === 0 ? 0 : 32 * MIB; // even: allocated region, odd: the hole
  const base = stream === "flush" ? 0 : 16 * MIB;
  return half + base + Math.floor(seq / 2) * RECORD_BYTES;
}

/** The 4096 bytes record `seq` of `stream` on device `device` ("A", "B") must hold. */
export function recordBytes(device: string, stream: Stream, seq: number): Uint8Array {
  const out = new Uint8Array(RECORD_BYTES);
  const head = new TextEncoder().encode(`FLPOWER ${device} ${stream} ${seq}\n`);
  out.set(head);
  // xorshift32 seeded from the identity: cheap, deterministic, never all zeros.
  let x = (seq + 1) * 2654435761 ^ (stream === "fua" ? 0x5bd1e995 : 0x1b873593) ^
    device.charCodeAt(0) << 24;
  x = x >>> 0 || 1;
  const view = new DataView(out.buffer);
  for (let i = 64; i < RECORD_BYTES; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    view.setUint32(i, x, true);
  }
  return out;
}

/** The console line the writer prints once a record is durable (after fsync / a FUA write). */
export function durableLine(device: string, stream: Stream, seq: number): string {
  return `POWER-DURABLE ${device} ${stream} ${seq}`;
}

/** The highest durable seq per device and stream found in console output (-1: none). */
export function lastDurable(output: string): Record<string, Record<Stream, number>> {
  const last: Record<string, Record<Stream, number>> = {};
  for (const m of output.matchAll(/POWER-DURABLE ([A-Z]) (flush|fua) ([0-9]+)/g)) {
    const entry = (last[m[1]!] ??= { flush: -1, fua: -1 });
    entry[m[2] as Stream] = Math.max(entry[m[2] as Stream], Number(m[3]));
  }
  return last;
}
