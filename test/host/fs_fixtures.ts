//! Test fixtures: real ext4 and xfs filesystems on kernel loop devices (root only), always torn
//! down — unmount, detach the loop device, remove the image — even when the test fails. Plus the
//! independent oracles the tests compare fastloop with: `filefrag -v`, `losetup`, `findmnt`,
//! `blockdev`.

/**
 * Where test files and images live: `$FASTLOOP_TEST_DIR`, else /var/tmp, else the repo's
 * `.cache/test` (the test VM has no /var/tmp). Not /tmp: it may be tmpfs, which has no FIEMAP.
 */
export function testDir(): string {
  const fromEnv = Deno.env.get("FASTLOOP_TEST_DIR");
  if (fromEnv) return fromEnv;
  try {
    if (Deno.statSync("/var/tmp").isDirectory) return "/var/tmp";
  } catch { /* fall through */ }
  const dir = decodeURIComponent(new URL("../../.cache/test", import.meta.url).pathname);
  Deno.mkdirSync(dir, { recursive: true });
  return dir;
}

export interface CommandResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program to completion (no shell); throws with its stderr when it fails. */
export async function run(cmd: string, args: string[], opts: { allowFail?: boolean } = {}) {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const result: CommandResult = {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
  if (out.code !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${args.join(" ")} exited ${out.code}: ${result.stderr.trim()}`);
  }
  return result;
}

export async function sh(script: string): Promise<string> {
  return (await run("sh", ["-c", script])).stdout;
}

export function isRoot(): boolean {
  return Deno.uid() === 0;
}

export async function hasCommand(name: string): Promise<boolean> {
  return (await run("sh", ["-c", `command -v ${name}`], { allowFail: true })).code === 0;
}

export type FsKind = "ext4" | "xfs";

export interface MountedFs {
  kind: FsKind;
  /** The loop device the image is attached to (`/dev/loopN`). */
  device: string;
  /** Mount point (an empty directory of its own). */
  dir: string;
  /** The image file. */
  image: string;
  /** xfs realtime device, when asked for. */
  rtDevice?: string;
}

export interface FsOptions {
  sizeMiB?: number;
  /** Extra mkfs arguments (e.g. `["-m", "reflink=1"]` for xfs). */
  mkfsArgs?: string[];
  /** `losetup --sector-size`: the loop device's logical block size. */
  sectorSize?: number;
  /** xfs only: add a realtime device of this size (a second loop device). */
  xfsRealtimeMiB?: number;
  /** `mount -o` options (e.g. `data=journal`). */
  mountOptions?: string[];
}

/**
 * Makes a `kind` filesystem on a fresh loop device, mounts it, runs `fn`, and tears everything
 * down in `finally`.
 */
export async function withFilesystem<T>(
  kind: FsKind,
  opts: FsOptions,
  fn: (fs: MountedFs) => Promise<T>,
): Promise<T> {
  const work = await Deno.makeTempDir({ dir: testDir(), prefix: `fastloop-${kind}-` });
  const image = `${work}/fs.img`;
  const dir = `${work}/mnt`;
  let device = "";
  let rtDevice = "";
  let mounted = false;
  try {
    await Deno.mkdir(dir);
    // xfs refuses filesystems under 300 MiB; the image is sparse, so size costs nothing.
    const sizeMiB = opts.sizeMiB ?? (kind === "xfs" ? 320 : 64);
    await run("truncate", ["-s", `${sizeMiB}M`, image]);
    const loArgs = ["--find", "--show"];
    if (opts.sectorSize) loArgs.push("--sector-size", String(opts.sectorSize));
    device = (await run("losetup", [...loArgs, image])).stdout.trim();
    const mountArgs: string[] = [];
    const options = [...(opts.mountOptions ?? [])];
    if (kind === "ext4") {
      await run("mkfs.ext4", ["-q", "-F", "-b", "4096", ...(opts.mkfsArgs ?? []), device]);
    } else {
      const rtArgs: string[] = [];
      if (opts.xfsRealtimeMiB) {
        await run("truncate", ["-s", `${opts.xfsRealtimeMiB}M`, `${work}/rt.img`]);
        rtDevice = (await run("losetup", ["--find", "--show", `${work}/rt.img`])).stdout.trim();
        rtArgs.push("-r", `rtdev=${rtDevice}`);
        options.push(`rtdev=${rtDevice}`);
      }
      await run("mkfs.xfs", ["-q", "-f", ...rtArgs, ...(opts.mkfsArgs ?? []), device]);
    }
    if (options.length) mountArgs.push("-o", options.join(","));
    await run("mount", [...mountArgs, device, dir]);
    mounted = true;
    return await fn({ kind, device, dir, image, ...(rtDevice ? { rtDevice } : {}) });
  } finally {
    if (mounted) await unmount(dir);
    if (device) await run("losetup", ["-d", device], { allowFail: true });
    if (rtDevice) await run("losetup", ["-d", rtDevice], { allowFail: true });
    await Deno.remove(work, { recursive: true }).catch(() => {});
  }
}

async function unmount(dir: string): Promise<void> {
  // A process the test spawned may still be exiting: retry briefly, then detach lazily.
  for (let i = 0; i < 20; i++) {
    if ((await run("umount", [dir], { allowFail: true })).code === 0) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  await run("umount", ["-l", dir], { allowFail: true });
}

/** Makes a tmpfs mount of its own under a temp dir for `fn`, and removes it afterwards. */
export async function withTmpfs<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ dir: testDir(), prefix: "fastloop-tmpfs-" });
  let mounted = false;
  try {
    await run("mount", ["-t", "tmpfs", "-o", "size=16m", "tmpfs", dir]);
    mounted = true;
    return await fn(dir);
  } finally {
    if (mounted) await unmount(dir);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** One extent line of `filefrag -v`, in filesystem blocks as filefrag prints them. */
export interface FilefragExtent {
  logicalBlock: number;
  physicalBlock: number;
  lengthBlocks: number;
  flags: string[];
}

export interface Filefrag {
  blockSize: number;
  sizeBytes: number;
  extents: FilefragExtent[];
}

/**
 * `filefrag -v -s FILE` (synced first, like fastloop's mapping), parsed. Lines look like
 * `   0:        0..     399:       8451..      8850:    400:             last,eof`.
 */
export async function filefrag(path: string): Promise<Filefrag> {
  const { stdout } = await run("filefrag", ["-v", "-s", path]);
  const head = /File size of .* is (\d+) \((\d+) blocks? of (\d+) bytes\)/.exec(stdout);
  if (!head) throw new Error(`Unexpected filefrag output:\n${stdout}`);
  const extents: FilefragExtent[] = [];
  for (const line of stdout.split("\n")) {
    const m = /^\s*\d+:\s*(\d+)\.\.\s*\d+:\s*(\d+)\.\.\s*\d*:\s*(\d+):\s*(?:\d+:)?\s*(\S*)\s*$/
      .exec(line);
    if (!m) continue;
    extents.push({
      logicalBlock: Number(m[1]),
      physicalBlock: Number(m[2]),
      lengthBlocks: Number(m[3]),
      flags: m[4] ? m[4].split(",").filter((f) => f !== "") : [],
    });
  }
  return { sizeBytes: Number(head[1]), blockSize: Number(head[3]), extents };
}

/** Reads `length` bytes at `offset` of `path` with O_DIRECT (`dd iflag=direct`), as an oracle. */
export async function readDirect(
  path: string,
  offset: number,
  length: number,
  blockSize = 4096,
): Promise<Uint8Array> {
  if (offset % blockSize || length % blockSize) {
    throw new Error(`readDirect: ${offset}+${length} not aligned to ${blockSize}`);
  }
  const out = await new Deno.Command("dd", {
    args: [
      `if=${path}`,
      "iflag=direct,skip_bytes,count_bytes",
      `bs=${blockSize}`,
      `skip=${offset}`,
      `count=${length}`,
      "status=none",
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (out.code !== 0) throw new Error(`dd ${path}: ${new TextDecoder().decode(out.stderr)}`);
  return out.stdout;
}

/** Deterministic pseudo-random bytes (so a mismatch is reproducible). */
export function patternBytes(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

const KiB = 1024;
const MiB = 1024 * KiB;

/** Writes `data` at `offset` of `path` with plain file APIs, then fsyncs (no fastloop code). */
export async function writeAt(path: string, offset: number, data: Uint8Array): Promise<void> {
  const f = await Deno.open(path, { write: true, create: true });
  try {
    await f.seek(offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < data.length) done += await f.write(data.subarray(done));
    await f.sync();
  } finally {
    f.close();
  }
}

/** A file fastloop must map, and what kind of file it is. */
export interface Scenario {
  name: string;
  path: string;
}

/**
 * The files every FIEMAP test maps, made with plain syscalls and coreutils: fully written,
 * sparse, fallocated (unwritten, partly written), fragmented (two files written interleaved with
 * fsync between chunks), many extents (more than one FIEMAP page), and on xfs with reflink a
 * reflinked copy (shared) and a partly rewritten clone.
 */
export async function makeScenarios(fs: MountedFs): Promise<Scenario[]> {
  const d = fs.dir;
  const out: Scenario[] = [];
  await writeAt(`${d}/full`, 0, patternBytes(1 * MiB + 3000, 1)); // tail not block-aligned
  out.push({ name: "full", path: `${d}/full` });

  await run("truncate", ["-s", "8M", `${d}/sparse`]);
  await writeAt(`${d}/sparse`, 1 * MiB, patternBytes(64 * KiB, 2));
  await writeAt(`${d}/sparse`, 4 * MiB + 4 * KiB, patternBytes(12 * KiB, 3));
  await writeAt(`${d}/sparse`, 8 * MiB - 4 * KiB, patternBytes(4 * KiB, 4));
  out.push({ name: "sparse", path: `${d}/sparse` });

  await run("fallocate", ["-l", "2M", `${d}/fallocated`]);
  await writeAt(`${d}/fallocated`, 512 * KiB, patternBytes(64 * KiB, 5));
  out.push({ name: "fallocated", path: `${d}/fallocated` });

  // Interleaved appends with fsync in between make the allocator alternate between the files.
  for (let i = 0; i < 24; i++) {
    await writeAt(`${d}/frag-a`, i * 64 * KiB, patternBytes(64 * KiB, 100 + i));
    await writeAt(`${d}/frag-b`, i * 64 * KiB, patternBytes(64 * KiB, 200 + i));
  }
  out.push({ name: "fragmented-a", path: `${d}/frag-a` });
  out.push({ name: "fragmented-b", path: `${d}/frag-b` });

  // Every other 4 KiB block written: 600 separate extents, more than one FIEMAP page (512).
  const many = await Deno.open(`${d}/many`, { write: true, create: true });
  try {
    for (let i = 0; i < 600; i++) {
      await many.seek(i * 8 * KiB, Deno.SeekMode.Start);
      await many.write(patternBytes(4 * KiB, 1000 + i));
    }
    await many.sync();
  } finally {
    many.close();
  }
  out.push({ name: "many", path: `${d}/many` });

  if (fs.kind === "xfs") {
    await run("cp", ["--reflink=always", `${d}/full`, `${d}/reflinked`]);
    out.push({ name: "reflinked", path: `${d}/reflinked` });
    await run("cp", ["--reflink=always", `${d}/frag-a`, `${d}/clone-rewritten`]);
    await writeAt(`${d}/clone-rewritten`, 128 * KiB, patternBytes(64 * KiB, 7));
    out.push({ name: "clone-rewritten", path: `${d}/clone-rewritten` });
  }
  await run("sync", []);
  return out;
}

/**
 * Can this kernel mount xfs with a realtime device (CONFIG_XFS_RT)? Probed by trying: mount
 * fails with ENOSYS ("Function not implemented") without it.
 */
export async function xfsRealtimeSupported(): Promise<boolean> {
  if (!isRoot() || !(await hasCommand("mkfs.xfs"))) return false;
  try {
    return await withFilesystem("xfs", { xfsRealtimeMiB: 16 }, () => Promise.resolve(true));
  } catch (e) {
    if (e instanceof Error && /Function not implemented/.test(e.message)) return false;
    throw e;
  }
}
