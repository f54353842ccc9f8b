//! `sys/socket.h` and `sys/un.h` (glibc, x86_64): the unix datagram socket that `lib/log.ts`
//! sends syslog lines on (`/dev/log`). Deno has unix stream sockets but no datagram ones.

import { SyscallError } from "./errno.ts";
import { close, errno, libc } from "./libc.ts";

export const AF_UNIX = 1;
export const SOCK_DGRAM = 2;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;

// struct sockaddr_un { sa_family_t sun_family; char sun_path[108]; }
export const SOCKADDR_UN_SIZE = 110;
export const SUN_FAMILY = 0; // sa_family_t (u16)
export const SUN_PATH = 2; // char[108]
const SUN_PATH_MAX = SOCKADDR_UN_SIZE - SUN_PATH;

/**
 * A unix datagram socket connected to `path`, non-blocking: a sender never waits for a slow or
 * stuck receiver. Throws `SyscallError` (socket/connect) when there is no receiver.
 */
export function connectUnixDatagram(path: string): number {
  const bytes = new TextEncoder().encode(path);
  if (bytes.length >= SUN_PATH_MAX) throw new SyscallError("connect", 36, path); // ENAMETOOLONG
  const addr = new Uint8Array(SOCKADDR_UN_SIZE);
  new DataView(addr.buffer).setUint16(SUN_FAMILY, AF_UNIX, true);
  addr.set(bytes, SUN_PATH);
  const fd = libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new SyscallError("socket", errno(), path);
  // Length up to the path's NUL, as the kernel expects for a pathname socket.
  if (libc.connect(fd, addr, SUN_PATH + bytes.length + 1) < 0) {
    const e = errno();
    close(fd);
    throw new SyscallError("connect", e, path);
  }
  return fd;
}

/** send(2) of one datagram, never blocking; returns 0 or the errno of the failure. */
export function sendDatagram(fd: number, data: Uint8Array<ArrayBuffer>): number {
  const n = libc.send(fd, data, BigInt(data.length), MSG_DONTWAIT | MSG_NOSIGNAL);
  return n < 0 ? errno() : 0;
}
