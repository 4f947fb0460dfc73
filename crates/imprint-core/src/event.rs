//! Progress events of a network install: what the appliance `PUT`s to
//! `reports/<machine>/progress.json` every few seconds and at each phase change, and what
//! `imprint netboot serve` reads to draw one row per machine.

use serde::{Deserialize, Serialize};

use crate::progress::Phase;
use crate::report::Status;

/// The event document's name in `reports/<machine>/`.
pub const PROGRESS_NAME: &str = "progress.json";

/// Where a network install is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventPhase {
    /// The NIC is up with a DHCP lease.
    Network,
    /// Fetching config.json and the seed.
    Config,
    /// Choosing the target disk (and asking, when the config says so).
    Target,
    /// Checking the image's payload digest before writing.
    Precheck,
    /// Zeroing the ends of the target.
    Wipe,
    /// Decoding and writing the image.
    Writing,
    /// Reading the target back and comparing.
    Verifying,
    /// Writing the held-back regions, the seed partition and the partition table.
    Commit,
    /// The seed is written; recording it.
    Seed,
    /// Making the installed disk the next boot.
    BootOrder,
    /// The run ended without an error (`result` says how).
    Done,
    /// The run ended with an error (`error` says which).
    Failed,
}

impl From<Phase> for EventPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Precheck => EventPhase::Precheck,
            Phase::Wipe => EventPhase::Wipe,
            Phase::Write | Phase::Compress => EventPhase::Writing,
            Phase::Verify => EventPhase::Verifying,
            Phase::Commit => EventPhase::Commit,
        }
    }
}

/// One progress event, as `PUT` (JSON, one object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The machine: the booting NIC's MAC as in `reports/<machine>/` (`52-54-00-12-34-56`).
    pub machine: String,
    /// This run's install id (the report's name).
    pub install_id: Option<String>,
    /// The hostname the seed gives this machine, once known.
    pub hostname: Option<String>,
    /// Where the install is.
    pub phase: EventPhase,
    /// Bytes of the current phase done.
    pub bytes_done: u64,
    /// Bytes the current phase expects (0 when it has no size).
    pub bytes_total: u64,
    /// Bytes per second in the current phase so far.
    pub rate: f64,
    /// Seconds since the network came up.
    pub elapsed_secs: f64,
    /// The run's result, in the last event.
    pub result: Option<Status>,
    /// The error chain, in the last event of a failed run.
    pub error: Option<String>,
    /// Counts the events sent by this run, from 1.
    pub seq: u64,
}

impl Event {
    /// The body to `PUT`: the JSON object and a newline.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain fields cannot fail; an empty body would be refused by the server.
        let mut body = serde_json::to_vec(self).unwrap_or_default();
        body.push(b'\n');
        body
    }
}

impl EventPhase {
    /// Lower-case name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            EventPhase::Network => "network",
            EventPhase::Config => "config",
            EventPhase::Target => "target",
            EventPhase::Precheck => "precheck",
            EventPhase::Wipe => "wipe",
            EventPhase::Writing => "writing",
            EventPhase::Verifying => "verifying",
            EventPhase::Commit => "commit",
            EventPhase::Seed => "seed",
            EventPhase::BootOrder => "boot-order",
            EventPhase::Done => "done",
            EventPhase::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn events_encode_as_one_json_object() {
        let e = Event {
            machine: "52-54-00-12-34-56".into(),
            install_id: Some("20261201-101500-abcd".into()),
            hostname: Some("nuc-1".into()),
            phase: EventPhase::Writing,
            bytes_done: 1 << 20,
            bytes_total: 4 << 20,
            rate: 1048576.0,
            elapsed_secs: 12.5,
            result: None,
            error: None,
            seq: 7,
        };
        let body = e.encode();
        assert_eq!(body.last(), Some(&b'\n'));
        assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "machine": "52-54-00-12-34-56",
                "install_id": "20261201-101500-abcd",
                "hostname": "nuc-1",
                "phase": "writing",
                "bytes_done": 1048576,
                "bytes_total": 4194304,
                "rate": 1048576.0,
                "elapsed_secs": 12.5,
                "result": null,
                "error": null,
                "seq": 7
            })
        );
        let done = Event {
            phase: EventPhase::BootOrder,
            result: Some(Status::AlreadyInstalled),
            ..e
        };
        let v: serde_json::Value = serde_json::from_slice(&done.encode()).unwrap();
        assert_eq!(v["phase"], "boot-order");
        assert_eq!(v["result"], "already-installed");
        // What the server reads back is what was sent.
        let back: Event = serde_json::from_slice(&done.encode()).unwrap();
        assert_eq!(back, done);
        for p in [
            EventPhase::Network,
            EventPhase::BootOrder,
            EventPhase::Failed,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }
}
