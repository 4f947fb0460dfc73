//! The install report: one JSON file per run in `imprint/reports/` on the stick, written on
//! success and on failure alike. It names the machine, the disks seen, the target and why, the
//! image, the timings and throughput per phase, the verification result, where the seed went and
//! the error if any — never the seed's contents (user-data can hold password hashes and keys).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Still running (a report with this status was interrupted).
    Running,
    /// The image was written, verified and seeded.
    Installed,
    /// The disk already held this image from an earlier successful run; nothing was written.
    AlreadyInstalled,
    /// The operator declined; nothing was written.
    Declined,
    /// Stopped with an error.
    Failed,
}

/// The report. Sections are filled in as the flow gets to them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Report format version.
    pub version: u32,
    /// This run's id (also in the seed's instance-id).
    pub install_id: String,
    /// How the run ended.
    pub status: Status,
    /// Seconds since the epoch when the run started (the machine's clock).
    pub started_at: u64,
    /// Early boot facts: kernel, modules, time to settle.
    pub boot: Value,
    /// DMI and NICs.
    pub machine: Value,
    /// CPU and memory (sysinfo).
    pub hardware: Value,
    /// Every disk seen.
    pub disks: Value,
    /// The target decision: chosen disk, reason, rejected disks with reasons.
    pub selection: Value,
    /// Image name, digest and sizes.
    pub image: Value,
    /// The write engine's report: timings per phase, throughput, verification, GPT move.
    pub write: Value,
    /// Seed summary (which machine entry matched, file sizes and digests) and placement.
    pub seed: Value,
    /// The boot entry made for the next boot.
    pub next_boot: Value,
    /// Seconds per phase of the whole flow.
    pub timings: Value,
    /// The error, when the run failed.
    pub error: Option<String>,
}

impl Report {
    /// A new report for run `install_id`.
    pub fn new(install_id: &str) -> Report {
        Report {
            version: 1,
            install_id: install_id.to_string(),
            status: Status::Running,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            boot: Value::Null,
            machine: Value::Null,
            hardware: Value::Null,
            disks: Value::Null,
            selection: Value::Null,
            image: Value::Null,
            write: Value::Null,
            seed: Value::Null,
            next_boot: Value::Null,
            timings: Value::Object(Default::default()),
            error: None,
        }
    }

    /// Records how long a phase took.
    pub fn timing(&mut self, phase: &str, secs: f64) {
        if let Value::Object(m) = &mut self.timings {
            m.insert(
                phase.to_string(),
                Value::from((secs * 1000.0).round() / 1000.0),
            );
        }
    }

    /// Writes the report to `dir/<install id>.json` (temp file, fsync, rename, fsync dir).
    pub fn save(&self, dir: &Path) -> std::io::Result<PathBuf> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.install_id));
        let tmp = dir.join(format!("{}.json.tmp", self.install_id));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(path)
    }

    /// Reads every report in `dir` (unreadable files are skipped: a damaged old report must not
    /// stop an install).
    pub fn load_all(dir: &Path) -> Vec<Report> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<Report> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by_key(|r| r.started_at);
        out
    }
}

/// A new install id: UTC date and time plus 4 random hex digits, e.g. `20261125-114210-3f9a`.
pub fn new_install_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    let mut rnd = [0u8; 2];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut rnd);
    }
    format!(
        "{y:04}{mo:02}{d:02}-{:02}{:02}{:02}-{:02x}{:02x}",
        t / 3600,
        (t / 60) % 60,
        t % 60,
        rnd[0],
        rnd[1]
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn install_ids_are_safe_for_seeds_and_file_names() {
        let id = new_install_id();
        assert_eq!(id.len(), 20, "{id}");
        assert!(
            id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{id}"
        );
    }

    #[test]
    fn save_and_load_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let mut r = Report::new("20261125-000000-abcd");
        r.status = Status::Installed;
        r.timing("write", 1.23456);
        let p = r.save(t.path()).unwrap();
        assert!(p.ends_with("20261125-000000-abcd.json"));
        std::fs::write(t.path().join("junk.json"), b"{not json").unwrap();
        let all = Report::load_all(t.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].status, Status::Installed);
        assert_eq!(all[0].timings["write"], 1.235);
    }
}
