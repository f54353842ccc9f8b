//! Test fixtures: real ext4 and xfs filesystems on kernel loop devices (root only), always torn
//! down — unmount, detach the loop device, remove the image — even when the test fails. Plus the
//! independent oracles the tests compare fastloop with: `filefrag -v`, `losetup`, `findmnt`,
//! `blockdev`.

/** Where images live: not /tmp (may be tmpfs, which FIEMAP and loop-mounts cannot test). */
const IMAGE_DIR = "/var/tmp";

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
}

export interface FsOptions {
  sizeMiB?: number;
  /** Extra mkfs arguments (e.g. `["-m", "reflink=1"]` for xfs). */
  mkfsArgs?: string[];
  /** `losetup --sector-size`: the loop device's logical block size. */
  sectorSize?: number;
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
  const work = await Deno.makeTempDir({ dir: IMAGE_DIR, prefix: `fastloop-${kind}-` });
  const image = `${work}/fs.img`;
  const dir = `${work}/mnt`;
  let device = "";
  let mounted = false;
  try {
    await Deno.mkdir(dir);
    // xfs refuses filesystems under 300 MiB; the image is sparse, so size costs nothing.
    const sizeMiB = opts.sizeMiB ?? (kind === "xfs" ? 320 : 64);
    await run("truncate", ["-s", `${sizeMiB}M`, image]);
    const loArgs = ["--find", "--show"];
    if (opts.sectorSize) loArgs.push("--sector-size", String(opts.sectorSize));
    device = (await run("losetup", [...loArgs, image])).stdout.trim();
    if (kind === "ext4") {
      await run("mkfs.ext4", ["-q", "-F", "-b", "4096", ...(opts.mkfsArgs ?? []), device]);
    } else {
      await run("mkfs.xfs", ["-q", "-f", ...(opts.mkfsArgs ?? []), device]);
    }
    await run("mount", [device, dir]);
    mounted = true;
    return await fn({ kind, device, dir, image });
  } finally {
    if (mounted) await unmount(dir);
    if (device) await run("losetup", ["-d", device], { allowFail: true });
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
  const dir = await Deno.makeTempDir({ dir: IMAGE_DIR, prefix: "fastloop-tmpfs-" });
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
