//! Progress of long operations: the phases of an install and the [`Progress`] trait the write
//! engine reports through. The renderers live with the binaries that draw them: bars, lines and
//! JSON events in the `imprint` CLI, the consoles' view in the appliance.

use serde::Serialize;

/// A phase of an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Reading the payload to check its digest before touching the disk.
    Precheck,
    /// Zeroing the ends of the target.
    Wipe,
    /// Decoding and writing the image.
    Write,
    /// Reading the target back and comparing.
    Verify,
    /// Writing the held-back partition table regions and fixing up the GPT.
    Commit,
    /// Compressing an image (`imprint prepare`).
    Compress,
}

impl Phase {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Precheck => "precheck",
            Phase::Wipe => "wipe",
            Phase::Write => "write",
            Phase::Verify => "verify",
            Phase::Commit => "commit",
            Phase::Compress => "compress",
        }
    }
}

/// Receives progress. Implementations must be cheap: `advance` is called per buffer.
pub trait Progress: Send + Sync {
    /// A phase starts; `total` bytes are expected.
    fn begin(&self, phase: Phase, total: u64);
    /// `done` bytes of the current phase are complete (absolute, not a delta).
    fn advance(&self, done: u64);
    /// The current phase ended after `secs` seconds having processed `bytes`.
    fn end(&self, phase: Phase, bytes: u64, secs: f64);
}

/// Discards progress.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: Phase, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self, _: Phase, _: u64, _: f64) {}
}

/// "1.5 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
