//! The one `Deno.dlopen` of glibc (x86_64 Linux) and thin wrappers that turn -1/errno into a
//! `SyscallError` naming the call and the object. Everything that touches a pointer goes through
//! here or through another module of `ffi/`.
//!
//! Rule kept by every wrapper: errno is read right after the synchronous call, on the same
//! thread, before anything else can run. `nonblocking` symbols (run on a helper thread) must not
//! rely on errno: they use the raw syscall, whose return value carries -errno.

import { EINTR, SyscallError } from "./errno.ts";

const symbols = {
  // long syscall(long number, ...); variadic, but on x86_64 integer varargs travel in the same
  // registers as fixed arguments, so a fixed 7-argument prototype is exact.
  syscall: {
    parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"],
    result: "i64",
  },
  // Same symbol, run on a Deno helper thread; its result is the raw return, errno is lost.
  syscall_nonblocking: {
    name: "syscall",
    parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"],
    result: "i64",
    nonblocking: true,
  },
  // syscall(SYS_io_uring_enter, unsigned int fd, u32 to_submit, u32 min_complete, u32 flags,
  // const void *arg, size_t argsz): the hot call of every queue loop. Typed 32-bit arguments
  // keep it on V8's fast FFI path without a BigInt per call (measured: 12 ns of FFI overhead
  // against 18–22 ns for the all-i64 `syscall` with BigInt arguments).
  io_uring_enter: {
    name: "syscall",
    parameters: ["i64", "i32", "u32", "u32", "u32", "pointer", "usize"],
    result: "i32",
  },
  // The same on a Deno helper thread (for a thread that must not block); errno is lost there.
  io_uring_enter_nonblocking: {
    name: "syscall",
    parameters: ["i64", "i32", "u32", "u32", "u32", "pointer", "usize"],
    result: "i32",
    nonblocking: true,
  },
  // int *__errno_location(void);
  __errno_location: { parameters: [], result: "pointer" },
  // int open(const char *path, int flags, mode_t mode);
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  // int close(int fd);
  close: { parameters: ["i32"], result: "i32" },
  // ssize_t pread(int fd, void *buf, size_t count, off_t offset);
  pread: { parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  // ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset);
  pwrite: { parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  // ssize_t read(int fd, void *buf, size_t count);
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  // ssize_t write(int fd, const void *buf, size_t count);
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  // int ioctl(int fd, unsigned long request, void *arg);
  ioctl: { parameters: ["i32", "u64", "pointer"], result: "i32" },
  // int fcntl(int fd, int cmd, long arg);
  fcntl: { parameters: ["i32", "i32", "i64"], result: "i32" },
  // int fallocate(int fd, int mode, off_t offset, off_t len);
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  // int fsync(int fd);
  fsync: { parameters: ["i32"], result: "i32" },
  // int fdatasync(int fd);
  fdatasync: { parameters: ["i32"], result: "i32" },
  // int posix_fadvise(int fd, off_t offset, off_t len, int advice); returns an errno, not -1.
  posix_fadvise: { parameters: ["i32", "i64", "i64", "i32"], result: "i32" },
  // int ftruncate(int fd, off_t length);
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  // void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  // int munmap(void *addr, size_t len);
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  // int eventfd(unsigned int initval, int flags);
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  // int fstat(int fd, struct stat *st);
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  // int statfs(const char *path, struct statfs *buf);
  statfs: { parameters: ["buffer", "buffer"], result: "i32" },
  // int fstatfs(int fd, struct statfs *buf);
  fstatfs: { parameters: ["i32", "buffer"], result: "i32" },
  // void *memset(void *s, int c, size_t n);
  memset: { parameters: ["pointer", "i32", "usize"], result: "pointer" },
  // pid_t getpid(void);
  getpid: { parameters: [], result: "i32" },
  // uid_t geteuid(void);
  geteuid: { parameters: [], result: "u32" },
  // int kill(pid_t pid, int sig);
  kill: { parameters: ["i32", "i32"], result: "i32" },
  // pid_t setsid(void);
  setsid: { parameters: [], result: "i32" },
  // int dup2(int oldfd, int newfd);
  dup2: { parameters: ["i32", "i32"], result: "i32" },
  // int socket(int domain, int type, int protocol);
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int connect(int sockfd, const struct sockaddr *addr, socklen_t addrlen);
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // ssize_t send(int sockfd, const void *buf, size_t len, int flags);
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
} as const satisfies Deno.ForeignLibraryInterface;

type Libc = Deno.DynamicLibrary<typeof symbols>["symbols"];

/**
 * glibc's functions, each bound on first use. Deno compiles a call trampoline per symbol when it
 * binds it: binding all of them up front cost 0.5 s of every process start in the test VM (TCG),
 * where a CLI command uses a handful. A bound symbol replaces its getter, so later calls (the
 * queue loop's io_uring_enter) read a plain property.
 */
export const libc: Libc = bindOnFirstUse();

function bindOnFirstUse(): Libc {
  const lazy = {} as Libc;
  for (const name of Object.keys(symbols) as (keyof typeof symbols)[]) {
    Object.defineProperty(lazy, name, {
      configurable: true,
      enumerable: true,
      get() {
        const bound = Deno.dlopen("libc.so.6", { [name]: symbols[name] }).symbols[name];
        Object.defineProperty(lazy, name, { value: bound, enumerable: true });
        return bound;
      },
    });
  }
  return lazy;
}

const errnoView = new Deno.UnsafePointerView(libc.__errno_location()!);

/** errno of the calling thread; read it right after the failed call. */
export function errno(): number {
  return errnoView.getInt32(0);
}

// open(2) flags, asm-generic/fcntl.h as used on x86_64.
export const O_RDONLY = 0o0;
export const O_WRONLY = 0o1;
export const O_RDWR = 0o2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_NOCTTY = 0o400;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DSYNC = 0o10000;
export const O_DIRECT = 0o40000;
export const O_LARGEFILE = 0o100000;
export const O_DIRECTORY = 0o200000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const O_PATH = 0o10000000;

// mmap(2), asm-generic/mman-common.h.
export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_POPULATE = 0x08000;
const MAP_FAILED = -1n;

// eventfd(2).
export const EFD_NONBLOCK = O_NONBLOCK;
export const EFD_CLOEXEC = O_CLOEXEC;

// fallocate(2), linux/falloc.h.
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

// posix_fadvise(2), linux/fadvise.h.
export const POSIX_FADV_DONTNEED = 4;

export const PAGE_SIZE = 4096;

// prctl(2), linux/prctl.h.
export const SYS_prctl = 157;
export const PR_SET_THP_DISABLE = 41;
// sched_setaffinity(2).
export const SYS_sched_setaffinity = 203;

const encoder = new TextEncoder();

/** A NUL-terminated copy of `s` for a `const char *` parameter. */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  if (s.includes("\0")) throw new SyscallError("open", 22, JSON.stringify(s));
  const bytes = new Uint8Array(encoder.encode(s).length + 1);
  encoder.encodeInto(s, bytes);
  return bytes;
}

/** Throws `SyscallError(name, errno, object)` when `result` is negative (-1 convention). */
function check(result: number | bigint, name: string, object: string): number {
  if (result < 0) throw new SyscallError(name, errno(), object);
  return Number(result);
}

export function open(path: string, flags: number, mode = 0o600): number {
  const cpath = cString(path);
  for (;;) {
    const fd = libc.open(cpath, flags | O_CLOEXEC, mode);
    if (fd >= 0) return fd;
    const e = errno();
    if (e !== EINTR) throw new SyscallError("open", e, path);
  }
}

export function close(fd: number): void {
  // close(2) must not be retried on EINTR: the fd is gone either way on Linux.
  libc.close(fd);
}

export function pread(fd: number, buf: Deno.PointerValue, len: number, offset: number): number {
  for (;;) {
    const n = libc.pread(fd, buf, BigInt(len), BigInt(offset));
    if (n >= 0) return Number(n);
    const e = errno();
    if (e !== EINTR) throw new SyscallError("pread", e, `fd ${fd} offset ${offset}`);
  }
}

export function pwrite(fd: number, buf: Deno.PointerValue, len: number, offset: number): number {
  for (;;) {
    const n = libc.pwrite(fd, buf, BigInt(len), BigInt(offset));
    if (n >= 0) return Number(n);
    const e = errno();
    if (e !== EINTR) throw new SyscallError("pwrite", e, `fd ${fd} offset ${offset}`);
  }
}

/** ioctl with a pointer argument; `name` is the request's name for the error (`FIEMAP`). */
export function ioctl(
  fd: number,
  request: bigint,
  arg: Deno.PointerValue,
  name: string,
  object: string,
): number {
  for (;;) {
    const r = libc.ioctl(fd, request, arg);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) throw new SyscallError(name, e, object);
  }
}

export function fcntl(fd: number, cmd: number, arg: number, name: string, object: string): number {
  return check(libc.fcntl(fd, cmd, BigInt(arg)), name, object);
}

export function fallocate(
  fd: number,
  mode: number,
  offset: number,
  len: number,
  object = `fd ${fd}`,
): void {
  check(libc.fallocate(fd, mode, BigInt(offset), BigInt(len)), "fallocate", object);
}

export function fsync(fd: number, object = `fd ${fd}`): void {
  check(libc.fsync(fd), "fsync", object);
}

export function fdatasync(fd: number, object = `fd ${fd}`): void {
  check(libc.fdatasync(fd), "fdatasync", object);
}

/** posix_fadvise(2) over [offset, offset+len) (len 0: to the end of the file). */
export function fadvise(
  fd: number,
  offset: number,
  len: number,
  advice: number,
  object = `fd ${fd}`,
): void {
  // The call returns the error number itself and leaves errno alone.
  const e = libc.posix_fadvise(fd, BigInt(offset), BigInt(len), advice);
  if (e !== 0) throw new SyscallError("posix_fadvise", e, object);
}

export function ftruncate(fd: number, length: number, object = `fd ${fd}`): void {
  check(libc.ftruncate(fd, BigInt(length)), "ftruncate", object);
}

export function eventfd(initval = 0, flags = EFD_CLOEXEC): number {
  return check(libc.eventfd(initval, flags), "eventfd", "");
}

/** mmap; throws on MAP_FAILED. */
export function mmap(
  len: number,
  prot: number,
  flags: number,
  fd = -1,
  offset = 0,
  object = "",
): Deno.PointerObject {
  const p = libc.mmap(null, BigInt(len), prot, flags, fd, BigInt(offset));
  if (p === null || BigInt(Deno.UnsafePointer.value(p)) === (MAP_FAILED & 0xffffffffffffffffn)) {
    throw new SyscallError("mmap", errno(), object || `${len} bytes`);
  }
  return p;
}

export function munmap(p: Deno.PointerValue, len: number): void {
  check(libc.munmap(p, BigInt(len)), "munmap", `${len} bytes`);
}

/**
 * Turns transparent huge pages off for this process and the children it starts (the flag is
 * inherited across fork and execve). With THP "always" (Debian's default) a 2 MiB page backs a
 * region where one 4 KiB page was touched, and khugepaged keeps collapsing more over time: a
 * server's resident memory then creeps up for minutes with nothing new allocated. Measured in
 * the soak: +9..29 MiB per server over 10 minutes; one 64 MiB mapping held 32 MiB of huge pages
 * under 4 KiB IO; a server under 4 KiB IO settled at 104 MiB with THP and 86 MiB without.
 */
export function disableTransparentHugePages(): void {
  const r = rawSyscall(SYS_prctl, BigInt(PR_SET_THP_DISABLE), 1n, 0n, 0n, 0n);
  if (r < 0) throw new SyscallError("prctl(PR_SET_THP_DISABLE)", -r);
}

/**
 * Pins the calling thread to CPU `cpu` (sched_setaffinity with tid 0: this thread only, not the
 * process). Returns false when the kernel refuses (a CPU outside the allowed set, or offline).
 */
export function pinThreadToCpu(cpu: number): boolean {
  const mask = new BigUint64Array(16); // 1024 CPUs
  mask[Math.floor(cpu / 64)] = 1n << BigInt(cpu % 64);
  return rawSyscall(
    SYS_sched_setaffinity,
    0n,
    BigInt(mask.byteLength),
    BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(mask))),
  ) === 0;
}

/** True when `path` names anything stat(2) can reach (a sysfs attribute, a device node). */
export function pathExists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Native, page-aligned, zeroed memory that the kernel can DMA into (O_DIRECT, io_uring).
 * It is never moved by the JS GC; free it with `free()`.
 */
export class AlignedBuffer {
  readonly pointer: Deno.PointerObject;
  readonly address: bigint;
  readonly bytes: Uint8Array<ArrayBuffer>;
  #freed = false;

  constructor(readonly lengthBytes: number) {
    const mapped = Math.ceil(lengthBytes / PAGE_SIZE) * PAGE_SIZE;
    this.pointer = mmap(mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    this.address = BigInt(Deno.UnsafePointer.value(this.pointer));
    this.bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(this.pointer, mapped));
  }

  /** A pointer `offset` bytes into the buffer. */
  at(offset: number): Deno.PointerValue {
    return Deno.UnsafePointer.offset(this.pointer, offset);
  }

  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    munmap(this.pointer, this.bytes.byteLength);
  }
}

// struct stat (x86_64, asm/stat.h): the fields fastloop reads. Exported for the ABI check
// (test/host/abi.test.ts compares them with the headers).
export const STAT_SIZE = 144;
export const STAT_DEV = 0; // __kernel_ulong_t st_dev
export const STAT_INO = 8; // __kernel_ulong_t st_ino
export const STAT_MODE = 24; // unsigned int st_mode
export const STAT_RDEV = 40; // __kernel_ulong_t st_rdev
export const STAT_SIZE_FIELD = 48; // __kernel_long_t st_size
export const STAT_BLKSIZE = 56; // __kernel_long_t st_blksize
export const STAT_BLOCKS = 64; // __kernel_long_t st_blocks

export interface Stat {
  dev: bigint;
  ino: bigint;
  mode: number;
  rdev: bigint;
  size: number;
  blksize: number;
  blocks: number;
}

export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFBLK = 0o060000;
export const S_IFDIR = 0o040000;

export function fstat(fd: number, object = `fd ${fd}`): Stat {
  const buf = statScratch;
  check(libc.fstat(fd, buf), "fstat", object);
  const v = new DataView(buf.buffer);
  return {
    dev: v.getBigUint64(STAT_DEV, true),
    ino: v.getBigUint64(STAT_INO, true),
    mode: v.getUint32(STAT_MODE, true),
    rdev: v.getBigUint64(STAT_RDEV, true),
    size: Number(v.getBigInt64(STAT_SIZE_FIELD, true)),
    blksize: Number(v.getBigInt64(STAT_BLKSIZE, true)),
    blocks: Number(v.getBigInt64(STAT_BLOCKS, true)),
  };
}

/** Linux dev_t (glibc encoding) → major, minor. */
export function devMajor(dev: bigint): number {
  return Number(((dev >> 32n) & 0xfffff000n) | ((dev >> 8n) & 0xfffn));
}
export function devMinor(dev: bigint): number {
  return Number(((dev >> 12n) & 0xffffff00n) | (dev & 0xffn));
}

// struct statfs (x86_64, asm-generic/statfs.h with 64-bit longs).
export const STATFS_SIZE = 120;
export const STATFS_TYPE = 0; // __kernel_long_t f_type
export const STATFS_BSIZE = 8; // __kernel_long_t f_bsize
export const STATFS_FLAGS = 80; // __kernel_long_t f_flags

/**
 * One buffer for fstat/fstatfs results, reused (the fields are copied out before returning):
 * fstat runs per request in file mode, and a fresh 144-byte buffer is a malloc each time.
 */
const statScratch = new Uint8Array(Math.max(STAT_SIZE, STATFS_SIZE));

export interface StatFs {
  type: number;
  blockSize: number;
  flags: number;
}

export const ST_RDONLY = 0x0001;

export function fstatfs(fd: number, object = `fd ${fd}`): StatFs {
  const buf = statScratch;
  check(libc.fstatfs(fd, buf), "fstatfs", object);
  const v = new DataView(buf.buffer);
  return {
    type: Number(v.getBigInt64(STATFS_TYPE, true)),
    blockSize: Number(v.getBigInt64(STATFS_BSIZE, true)),
    flags: Number(v.getBigInt64(STATFS_FLAGS, true)),
  };
}

export function getpid(): number {
  return libc.getpid();
}

export function geteuid(): number {
  return libc.geteuid();
}

/** Raw syscall: returns the kernel's result, negative errno on failure (liburing's convention). */
export function rawSyscall(
  nr: number,
  a = 0n,
  b = 0n,
  c = 0n,
  d = 0n,
  e = 0n,
  f = 0n,
): number {
  const r = libc.syscall(BigInt(nr), a, b, c, d, e, f);
  return r < 0 ? -errno() : Number(r);
}
