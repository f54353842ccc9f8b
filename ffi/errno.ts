//! errno values of Linux x86_64 (asm-generic/errno-base.h, asm-generic/errno.h) and the error
//! type every FFI wrapper throws: it names the syscall, the errno and the object it concerned.

export const EPERM = 1;
export const ENOENT = 2;
export const EINTR = 4;
export const EIO = 5;
export const ENXIO = 6;
export const EBADF = 9;
export const EAGAIN = 11;
export const ENOMEM = 12;
export const EACCES = 13;
export const EFAULT = 14;
export const EBUSY = 16;
export const EEXIST = 17;
export const ENODEV = 19;
export const ENOTDIR = 20;
export const EISDIR = 21;
export const EINVAL = 22;
export const ENOTTY = 25;
export const ETXTBSY = 26;
export const EFBIG = 27;
export const ENOSPC = 28;
export const ESPIPE = 29;
export const EROFS = 30;
export const EPIPE = 32;
export const ERANGE = 34;
export const ENOSYS = 38;
export const ENOTEMPTY = 39;
export const ENODATA = 61;
export const EOVERFLOW = 75;
export const EOPNOTSUPP = 95;
export const EADDRINUSE = 98;
export const ENOBUFS = 105;
export const ECONNREFUSED = 111;
export const ETIMEDOUT = 110;
export const EALREADY = 114;
export const EINPROGRESS = 115;
export const ECANCELED = 125;

/** errno → [name, strerror text]. */
const ERRNO_TABLE: Record<number, readonly [string, string]> = {
  [EPERM]: ["EPERM", "Operation not permitted"],
  [ENOENT]: ["ENOENT", "No such file or directory"],
  3: ["ESRCH", "No such process"],
  [EINTR]: ["EINTR", "Interrupted system call"],
  [EIO]: ["EIO", "Input/output error"],
  [ENXIO]: ["ENXIO", "No such device or address"],
  7: ["E2BIG", "Argument list too long"],
  8: ["ENOEXEC", "Exec format error"],
  [EBADF]: ["EBADF", "Bad file descriptor"],
  10: ["ECHILD", "No child processes"],
  [EAGAIN]: ["EAGAIN", "Resource temporarily unavailable"],
  [ENOMEM]: ["ENOMEM", "Cannot allocate memory"],
  [EACCES]: ["EACCES", "Permission denied"],
  [EFAULT]: ["EFAULT", "Bad address"],
  15: ["ENOTBLK", "Block device required"],
  [EBUSY]: ["EBUSY", "Device or resource busy"],
  [EEXIST]: ["EEXIST", "File exists"],
  18: ["EXDEV", "Invalid cross-device link"],
  [ENODEV]: ["ENODEV", "No such device"],
  [ENOTDIR]: ["ENOTDIR", "Not a directory"],
  [EISDIR]: ["EISDIR", "Is a directory"],
  [EINVAL]: ["EINVAL", "Invalid argument"],
  23: ["ENFILE", "Too many open files in system"],
  24: ["EMFILE", "Too many open files"],
  [ENOTTY]: ["ENOTTY", "Inappropriate ioctl for device"],
  [ETXTBSY]: ["ETXTBSY", "Text file busy"],
  [EFBIG]: ["EFBIG", "File too large"],
  [ENOSPC]: ["ENOSPC", "No space left on device"],
  [ESPIPE]: ["ESPIPE", "Illegal seek"],
  [EROFS]: ["EROFS", "Read-only file system"],
  31: ["EMLINK", "Too many links"],
  [EPIPE]: ["EPIPE", "Broken pipe"],
  [ERANGE]: ["ERANGE", "Numerical result out of range"],
  35: ["EDEADLK", "Resource deadlock avoided"],
  36: ["ENAMETOOLONG", "File name too long"],
  37: ["ENOLCK", "No locks available"],
  [ENOSYS]: ["ENOSYS", "Function not implemented"],
  [ENOTEMPTY]: ["ENOTEMPTY", "Directory not empty"],
  40: ["ELOOP", "Too many levels of symbolic links"],
  [ENODATA]: ["ENODATA", "No data available"],
  [EOVERFLOW]: ["EOVERFLOW", "Value too large for defined data type"],
  [EOPNOTSUPP]: ["EOPNOTSUPP", "Operation not supported"],
  [EADDRINUSE]: ["EADDRINUSE", "Address already in use"],
  104: ["ECONNRESET", "Connection reset by peer"],
  [ENOBUFS]: ["ENOBUFS", "No buffer space available"],
  [ETIMEDOUT]: ["ETIMEDOUT", "Connection timed out"],
  [ECONNREFUSED]: ["ECONNREFUSED", "Connection refused"],
  [EALREADY]: ["EALREADY", "Operation already in progress"],
  [EINPROGRESS]: ["EINPROGRESS", "Operation now in progress"],
  121: ["EREMOTEIO", "Remote I/O error"],
  122: ["EDQUOT", "Disk quota exceeded"],
  [ECANCELED]: ["ECANCELED", "Operation canceled"],
};

export function errnoName(errno: number): string {
  return ERRNO_TABLE[errno]?.[0] ?? `errno ${errno}`;
}

export function errnoText(errno: number): string {
  return ERRNO_TABLE[errno]?.[1] ?? "Unknown error";
}

/**
 * A failed system call. `message` reads like `FIEMAP /data/img: EOPNOTSUPP (Operation not
 * supported)`: the call, the object it concerned (path, fd or device), the errno name.
 */
export class SyscallError extends Error {
  override readonly name = "SyscallError";
  constructor(
    readonly syscall: string,
    readonly errno: number,
    readonly object: string = "",
  ) {
    super(
      `${syscall}${object ? ` ${object}` : ""}: ${errnoName(errno)} (${errnoText(errno)})`,
    );
  }

  get code(): string {
    return errnoName(this.errno);
  }
}
