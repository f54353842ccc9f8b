// The data oracles in each data mode the kernel offers (lib/request_data.ts): zero copy
// (UBLK_F_AUTO_BUF_REG, 6.16+: the request's own pages are registered in the queue's ring and the
// backend reads and writes them in place) and copy (per-tag buffers; FASTLOOP_ZERO_COPY=0 forces
// it where zero copy exists). Zero copy changes where the data lives, not which blocks are
// written: the same checks pass in both. Oracles: cmp against references on tmpfs and against
// /dev/zero, fio's crc32c verify, an ext4 made on the device checked by e2fsck and read through
// the kernel's own loop device. Where the kernel has UBLK_F_BATCH_IO (7.0+) the same checks run
// once more with the batched ublk commands (FASTLOOP_BATCH_IO=1, lib/ublk_hop.ts).

import assert from "node:assert/strict";
import { hasFeature, UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO } from "../../ffi/ublk_cmd.ts";
import { attach, detach, fastloop, kernelFeatures, ok, run, withHostFs } from "./support.ts";

const MIB = 1024 * 1024;

const features = await kernelFeatures();
const zeroCopyOffered = hasFeature(features, UBLK_F_AUTO_BUF_REG);
const batchOffered = hasFeature(features, UBLK_F_BATCH_IO);

const variants = [
  { mode: "zero-copy", commands: "per-tag", lacks: zeroCopyOffered ? "" : "AUTO_BUF_REG" },
  { mode: "copy", commands: "per-tag", lacks: "" },
  {
    mode: "zero-copy",
    commands: "batched",
    lacks: !zeroCopyOffered ? "AUTO_BUF_REG" : !batchOffered ? "BATCH_IO" : "",
  },
  { mode: "copy", commands: "batched", lacks: batchOffered ? "" : "BATCH_IO" },
] as const;

for (const { mode, commands, lacks } of variants) {
  const env = {
    FASTLOOP_ZERO_COPY: mode === "copy" ? "0" : "1",
    FASTLOOP_BATCH_IO: commands === "batched" ? "1" : "0",
  };
  Deno.test({
    name: `${mode}, ${commands} ublk commands: bytes, holes, fio verify and an ext4 read back ` +
      `through the kernel's loop device${lacks ? ` (SKIPPED: this kernel lacks ${lacks})` : ""}`,
    ignore: lacks !== "",
    async fn() {
      await withHostFs(async (mnt, tmp) => {
        const file = `${mnt}/${mode}-${commands}.img`;
        await ok("truncate", ["-s", "96M", file]);
        const dev = await attach(file, [], { env });
        const [row] = JSON.parse((await fastloop(["stat", "--json", dev])).stdout);
        assert.equal(row.dataMode, mode, `the device runs in ${mode} mode`);
        assert.equal(row.ublkCommands, commands, `the device takes ${commands} ublk commands`);
        if (mode === "zero-copy") assert.equal(row.maxIoBytes, MIB, "1 MiB requests unsplit");

        // 1. Whole 1 MiB requests over [0, 16M), then a read that spans data and holes: in zero
        //    copy one request is several segments on one buffer, the hole's from /dev/zero.
        await ok("dd", ["if=/dev/urandom", `of=${tmp}/ref`, "bs=1M", "count=16", "status=none"]);
        await ok("dd", [`if=${tmp}/ref`, `of=${dev}`, "bs=1M", "oflag=direct", "conv=fsync"]);
        await ok("dd", [
          `if=${tmp}/ref`,
          `of=${dev}`,
          "bs=64K",
          "count=1",
          "seek=321",
          "oflag=direct",
        ]);
        await ok("dd", [`if=${dev}`, `of=${tmp}/back`, "bs=1M", "count=24", "iflag=direct"]);
        await ok("cmp", ["-n", String(16 * MIB), `${tmp}/back`, `${tmp}/ref`]);
        await ok("cmp", [
          "-i",
          `${16 * MIB}:0`,
          "-n",
          String(4 * MIB + 64 * 1024),
          `${tmp}/back`,
          "/dev/zero",
        ]);
        await ok("cmp", ["-i", `${321 * 64 * 1024}:0`, "-n", "65536", `${tmp}/back`, `${tmp}/ref`]);
        await ok("cmp", [
          "-i",
          `${321 * 64 * 1024 + 65536}:0`,
          "-n",
          String(MIB),
          `${tmp}/back`,
          "/dev/zero",
        ]);

        // 2. fio: random reads and writes of 4 KiB to 1 MiB, verified.
        const fio = await run("fio", [
          "--name=modes",
          `--filename=${dev}`,
          "--offset=32M",
          "--size=24M",
          "--rw=randrw",
          "--bsrange=4k-1m",
          "--ioengine=io_uring",
          "--direct=1",
          "--iodepth=16",
          "--verify=crc32c",
          "--do_verify=1",
          "--verify_fatal=1",
        ]);
        assert.equal(fio.code, 0, `fio verify: ${fio.stdout}${fio.stderr}`);

        // 3. ext4 made on the device, files written through it, then checked and read through the
        //    kernel's loop device on the same file.
        await ok("mkfs.ext4", ["-F", "-q", dev]);
        const inner = `${tmp}/inner`;
        Deno.mkdirSync(inner);
        await ok("mount", [dev, inner]);
        try {
          await ok("cp", [`${tmp}/ref`, `${inner}/ref`]);
          await ok("dd", [
            "if=/dev/urandom",
            `of=${inner}/small`,
            "bs=4k",
            "count=77",
            "status=none",
          ]);
          await ok("sync", []);
        } finally {
          await ok("umount", [inner]);
        }
        await detach(dev);
        const loop = (await ok("losetup", ["--find", "--show", "--direct-io=on", file])).trim();
        try {
          const fsck = await run("e2fsck", ["-fn", loop]);
          assert.equal(fsck.code, 0, `e2fsck through loop: ${fsck.stdout}${fsck.stderr}`);
          await ok("mount", ["-o", "ro", loop, inner]);
          try {
            await ok("cmp", [`${inner}/ref`, `${tmp}/ref`]);
            assert.equal(Deno.statSync(`${inner}/small`).size, 77 * 4096);
          } finally {
            await ok("umount", [inner]);
          }
        } finally {
          await run("losetup", ["-d", loop]);
        }
      });
    },
  });
}
