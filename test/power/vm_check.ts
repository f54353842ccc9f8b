// Second boot of the power-loss test (run inside the VM by power_loss.test.ts) on the disk the
// first boot (vm_crash.ts) lost power on. Given the highest durable seq per device and stream
// that the first boot's console showed, it checks every record up to it:
//   - in file A through the filesystem (mounting replays ext4's journal), the independent oracle,
//     and then through a fresh fastloop device attached to it;
//   - in file B (the lying loop setup): the records it claimed must be missing, or the test could
//     not tell a device that acknowledges from memory from an honest one.
// Then e2fsck -fn of the host filesystem. Prints one line `POWER-RESULT {json}`; exits 0 when
// A holds every durable record and the host filesystem is clean.
//
// Usage: deno run --allow-all test/power/vm_check.ts A_FLUSH A_FUA B_FLUSH B_FUA

import { RECORD_BYTES, recordBytes, recordOffset, type Stream } from "./records.ts";

const DISK = "/dev/vda";
const MNT = "/mnt/power";

function run(program: string, args: string[]): { code: number; out: string } {
  const o = new Deno.Command(program, { args, stdout: "piped", stderr: "piped" }).outputSync();
  const dec = new TextDecoder();
  return { code: o.code, out: dec.decode(o.stdout) + dec.decode(o.stderr) };
}

function must(program: string, args: string[]): string {
  const r = run(program, args);
  if (r.code !== 0) throw new Error(`${program} ${args.join(" ")} (${r.code}): ${r.out}`);
  return r.out;
}

interface Check {
  checked: number;
  missing: number;
  firstBad?: string;
}

/** Compares every record 0..last of each stream in `path` with what it must hold. */
function check(path: string, device: string, last: Record<Stream, number>): Check {
  const f = Deno.openSync(path, { read: true });
  const got = new Uint8Array(RECORD_BYTES);
  const result: Check = { checked: 0, missing: 0 };
  try {
    for (const stream of ["flush", "fua"] as const) {
      for (let seq = 0; seq <= last[stream]; seq++) {
        f.seekSync(recordOffset(stream, seq), Deno.SeekMode.Start);
        let n = 0;
        while (n < RECORD_BYTES) {
          const r = f.readSync(got.subarray(n));
          if (r === null) break;
          n += r;
        }
        const want = recordBytes(device, stream, seq);
        result.checked++;
        if (n !== RECORD_BYTES || !got.every((b, i) => b === want[i])) {
          result.missing++;
          if (!result.firstBad) {
            const head = got.every((b) => b === 0)
              ? "zeros"
              : JSON.stringify(new TextDecoder().decode(got.subarray(0, 32)).split("\n")[0]);
            result.firstBad = `${stream} ${seq}: found ${head}`;
          }
        }
      }
    }
  } finally {
    f.close();
  }
  return result;
}

function main(): number {
  const [aFlush, aFua, bFlush, bFua] = Deno.args.map(Number);
  if ([aFlush, aFua, bFlush, bFua].some((n) => n === undefined || !Number.isInteger(n))) {
    console.error("usage: vm_check.ts A_FLUSH A_FUA B_FLUSH B_FUA");
    return 2;
  }
  const lastA = { flush: aFlush!, fua: aFua! };
  const lastB = { flush: bFlush!, fua: bFua! };
  Deno.mkdirSync(MNT, { recursive: true });
  must("mount", [DISK, MNT]);
  const fileA = check(`${MNT}/a.img`, "A", lastA);
  const fileB = check(`${MNT}/b.img`, "B", lastB);
  // The same records through fastloop on the recovered file.
  const dev = must("fastloop", ["attach", `${MNT}/a.img`]).trim();
  let deviceA: Check;
  try {
    deviceA = check(dev, "A", lastA);
  } finally {
    must("fastloop", ["detach", dev]);
  }
  must("umount", [MNT]);
  const fsck = run("e2fsck", ["-fn", DISK]);
  const result = {
    fileA,
    deviceA,
    fileB,
    fsck: fsck.code === 0 ? "clean" : fsck.out.trim().split("\n").slice(-3).join(" | "),
  };
  console.log(`POWER-RESULT ${JSON.stringify(result)}`);
  return fileA.missing === 0 && deviceA.missing === 0 && fsck.code === 0 ? 0 : 1;
}

Deno.exit(main());
