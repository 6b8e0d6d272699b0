//! One-line log records on stderr: `forkserver[PID]: LEVEL message`.
//!
//! The level comes from `FORKSERVER_LOG` (`error`, `warn`, `info`, `debug`;
//! default `info`). Plain lines with no colour suit journald and pipes alike.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// How much the server logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Failures of the server itself.
    Error = 0,
    /// Refusals and client errors.
    Warn = 1,
    /// Start, stop, connections.
    Info = 2,
    /// Every spawn and exit.
    Debug = 3,
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the most verbose level that is written.
pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Reads `FORKSERVER_LOG`; unknown values leave the level alone.
pub(crate) fn init_from_env() {
    let level = match std::env::var("FORKSERVER_LOG").as_deref() {
        Ok("error") => Level::Error,
        Ok("warn") => Level::Warn,
        Ok("info") => Level::Info,
        Ok("debug") => Level::Debug,
        _ => return,
    };
    set_level(level);
}

pub(crate) fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

pub(crate) fn write(level: Level, args: std::fmt::Arguments<'_>) {
    let name = match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
    };
    // One write per record, so records of processes sharing a stderr (a
    // journal, a terminal) never interleave mid-line. A failed write to
    // stderr has nowhere to be reported.
    let line = format!("forkserver[{}]: {name} {args}\n", std::process::id());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

macro_rules! log {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)*));
        }
    };
}
pub(crate) use log;
