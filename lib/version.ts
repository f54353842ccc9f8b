//! fastloop's version, in one place: `fastloop --version`, and the log line each server and
//! supervisor writes when it starts (so a device's log says which fastloop served it when).

export const VERSION = "0.1.0";
