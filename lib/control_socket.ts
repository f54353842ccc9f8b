//! The server's end of a device's control socket (`/run/fastloop/ublkbN.sock`, root-only): a unix
//! stream socket carrying one JSON request per line and one JSON reply per line. The client end
//! is `controlRequest` in `lib/registry.ts`; what the requests mean is the server's
//! (`lib/server.ts`). A reply may carry `afterReply`, a function (JSON leaves it out): it runs
//! once the reply is written, e.g. to end the process only after the client has its answer.

import { log } from "./log.ts";

const encoder = new TextEncoder();
/** Longest request line: anything longer is not a client of ours. */
const MAX_LINE_CHARS = 65536;

export type ControlHandler = (request: { cmd?: unknown }) => Promise<Record<string, unknown>>;

/**
 * Listens on `path` (a stale socket there is replaced; mode 0600) and answers every request
 * with `handle` until `close()`.
 */
export function serveControlSocket(path: string, handle: ControlHandler): { close(): void } {
  try {
    Deno.removeSync(path);
  } catch {
    // No stale socket.
  }
  const listener = Deno.listen({ transport: "unix", path });
  Deno.chmodSync(path, 0o600);
  let closed = false;
  (async () => {
    try {
      for await (const conn of listener) serveConnection(conn, handle);
    } catch (e) {
      if (!closed) log(`control socket failed: ${(e as Error).message}`);
    }
  })();
  return {
    close() {
      closed = true;
      try {
        listener.close();
      } catch {
        // Already closed.
      }
    },
  };
}

async function serveConnection(conn: Deno.UnixConn, handle: ControlHandler): Promise<void> {
  const decoder = new TextDecoder();
  let pending = "";
  const buf = new Uint8Array(4096);
  try {
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) return;
      pending += decoder.decode(buf.subarray(0, n), { stream: true });
      let nl: number;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        let request: { cmd?: unknown };
        let reply: Record<string, unknown>;
        try {
          request = JSON.parse(line);
          reply = await handle(request);
        } catch (e) {
          reply = e instanceof SyntaxError
            ? { ok: false, error: "Malformed request" }
            : { ok: false, error: e instanceof Error ? e.message : String(e) };
        }
        try {
          await conn.write(encoder.encode(JSON.stringify(reply) + "\n"));
        } finally {
          if (typeof reply["afterReply"] === "function") (reply["afterReply"] as () => void)();
        }
      }
      if (pending.length > MAX_LINE_CHARS) return;
    }
  } catch {
    // Client went away.
  } finally {
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
}
