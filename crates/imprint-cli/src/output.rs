//! How much `imprint` says: `--quiet` (errors and the result line only), the default, or
//! `--verbose` (also each phase's time and rate, the places looked at, the layout of what was
//! made). Set once in `main` from the global flags; read by every command.
//!
//! Results go to standard output ([`outln!`](crate::commands::outln)); everything else —
//! progress, notes, details — goes to standard error through [`note!`] and [`detail!`], so
//! `imprint … > result.txt` keeps only results at every level. With `--json` the result is JSON
//! on standard output and an error is one JSON object on standard error.

use std::sync::OnceLock;

/// How much to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// `--quiet`: errors and the final result line.
    Quiet,
    /// The default: results, progress, notes.
    Normal,
    /// `--verbose`: also per-phase timings and what was looked at.
    Verbose,
}

static LEVEL: OnceLock<Level> = OnceLock::new();

/// Sets the level for the process (the first call wins).
pub fn set_level(level: Level) {
    let _ = LEVEL.set(level);
}

/// The level set by `main` (the default when unset, as in unit tests).
pub fn level() -> Level {
    LEVEL.get().copied().unwrap_or(Level::Normal)
}

/// True under `--quiet`.
pub fn quiet() -> bool {
    level() == Level::Quiet
}

/// True under `--verbose`.
pub fn verbose() -> bool {
    level() == Level::Verbose
}

/// A note on standard error (not a result): shown unless `--quiet`.
macro_rules! note {
    ($($arg:tt)*) => {{
        if !$crate::output::quiet() {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), $($arg)*);
        }
    }};
}
pub(crate) use note;

/// A detail on standard error: shown only with `--verbose`.
macro_rules! detail {
    ($($arg:tt)*) => {{
        if $crate::output::verbose() {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), $($arg)*);
        }
    }};
}
pub(crate) use detail;
