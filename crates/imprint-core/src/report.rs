//! The install report: one JSON file per run in `imprint/reports/` on the stick, written on
//! success and on failure alike. It names the machine, the disks seen, the target and why, the
//! image, the timings and throughput per phase, the verification result, where the seed went and
//! the error if any — never the seed's contents (user-data can hold password hashes and keys).
//!
//! The JSON field names are the format: reports written by earlier versions parse (sections they
//! lack default to empty), and the decision "this disk already holds this image" reads typed
//! fields ([`Report::records_install_of`]), never string keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::discover::Disk;
use crate::machine::MachineIdentity;
use crate::signature::SignatureCheck;

/// Report format version written by this build.
pub const VERSION: u32 = 1;

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
    /// Inventory mode: the machine's facts recorded, nothing written to any disk.
    Inventory,
}

/// Early boot facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BootInfo {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// How many kernel modules were loaded.
    pub modules_loaded: usize,
    /// Modules that failed to load, with the reason.
    pub module_failures: Vec<(String, String)>,
    /// Booted with UEFI variables (efivarfs mounted).
    pub efi: bool,
    /// The device set settled before the timeout.
    pub settled: bool,
    /// Seconds from PID 1's start to the end of early boot.
    pub seconds: f64,
    /// Storage controllers still appearing when early boot stopped waiting (only when it
    /// gave up: `settled` is false).
    pub pending: Vec<String>,
    /// Where early boot's wait for devices went (reports before it existed lack it).
    pub coldplug: Option<Coldplug>,
}

/// How early boot's coldplug and settle loop spent its time (docs/live-image.md, "Early
/// boot"). Instants are seconds after PID 1's start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Coldplug {
    /// Passes of the loop: new devices looked for, their modules queued, the disks checked.
    pub passes: u32,
    /// Full walks of `/sys/devices` for `modalias` files: the first pass's, then only when
    /// kernel uevents were lost or cannot be read.
    pub walks: u32,
    /// Their total time, and the longest one's.
    pub walk_seconds: f64,
    pub longest_walk_seconds: f64,
    /// Kernel uevents read (the devices that appeared after the first walk).
    pub uevents: u32,
    /// Checks of the disks (storage controllers, the stick's ESP) and their total time; run
    /// only in passes where no module was loading and no device appeared.
    pub checks: u32,
    pub check_seconds: f64,
    /// The last new device (`modalias`), the last change of the block devices and of the USB
    /// devices: the settle rule waits for quiet after each.
    pub last_device_at: f64,
    pub last_block_change_at: f64,
    pub last_usb_change_at: f64,
}

/// Where the time from power-on to the first byte on the target went, in seconds, each phase
/// from the end of the one before (docs/benchmarks.md, "Time to first byte"). Firmware, shim
/// and GRUB are before the kernel's clock starts: only the host sees them (`scripts/bench-boot`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phases {
    /// Kernel start to PID 1's `main` (the kernel's uptime then).
    pub kernel_seconds: Option<f64>,
    /// PID 1's start to the last kernel module inserted.
    pub modules_seconds: Option<f64>,
    /// Then until the disks and the stick were there (see `boot.settled`).
    pub settle_seconds: Option<f64>,
    /// Then: stick mounted, config and seed read, image opened, signature checked.
    pub medium_seconds: Option<f64>,
    /// Then: identity, disk scan, target policy, confirmation.
    pub choose_seconds: Option<f64>,
    /// Then until the first payload byte was written: target opened, plan, wipe, decode.
    pub first_write_seconds: Option<f64>,
    /// The kernel's uptime (`CLOCK_BOOTTIME`) at the first payload byte: all of the above.
    pub first_byte_uptime_seconds: Option<f64>,
}

/// The stick's read rate in bench mode (`imprint.bench` on the kernel command line): the
/// image's payload read the way the write engine reads it, against a plain sequential
/// `O_DIRECT` read of the whole payload partition (what `dd bs=4M iflag=direct` does), in the
/// same boot, the page cache dropped before each.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StickRead {
    /// The payload partition.
    pub partition: String,
    /// Bytes of compressed payload read through the image reader.
    pub payload_bytes: u64,
    pub payload_seconds: f64,
    /// Bytes of the partition read with `O_DIRECT`, 4 MiB at a time.
    pub direct_bytes: u64,
    pub direct_seconds: f64,
}

impl StickRead {
    /// MiB/s of the image reader.
    pub fn payload_mib_s(&self) -> f64 {
        self.payload_bytes as f64 / self.payload_seconds.max(1e-9) / 1048576.0
    }

    /// MiB/s of the plain `O_DIRECT` read.
    pub fn direct_mib_s(&self) -> f64 {
        self.direct_bytes as f64 / self.direct_seconds.max(1e-9) / 1048576.0
    }
}

/// CPU and memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hardware {
    /// The first CPU's brand string.
    pub cpu: Option<String>,
    /// Logical CPUs.
    pub cpus: usize,
    /// Total memory.
    pub memory_bytes: u64,
    /// Kernel version as the system reports it.
    pub kernel: Option<String>,
}

/// The image written (from its manifest) and its signature check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageInfo {
    /// Image name.
    pub name: String,
    /// SHA-256 of the raw image, hex.
    pub sha256: String,
    /// Raw image size in bytes.
    pub raw_size: u64,
    /// The sector size the image was built for, when it says.
    pub sector_size: Option<u32>,
    /// Size of the compressed payload in bytes.
    pub compressed_size: Option<u64>,
    /// The signature policy's outcome (absent until it ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureCheck>,
}

/// A disk the target policy turned down.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rejected {
    /// Kernel name of the disk.
    pub disk: String,
    /// Why it is not the target.
    pub why: String,
}

/// The target decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SelectionInfo {
    /// Kernel name of the disk written (or to be written), if any.
    pub chosen: Option<String>,
    /// Why that disk (or why none).
    pub reason: String,
    /// Every disk turned down, with the reason.
    pub rejected: Vec<Rejected>,
}

/// Where the seed went and what it held (sizes and digests, never contents).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedInfo {
    /// Machine entry matched, hostname and which rule gave it, file digests (no contents).
    pub summary: crate::seed::SeedSummary,
    /// Where it was written.
    pub placement: crate::seed::SeedPlacement,
}

/// The boot entry made for the next boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NextBoot {
    /// `BootNext` was set.
    pub set: bool,
    /// Why it was not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The entry, e.g. `Boot0003`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_entry: Option<String>,
    /// The entry's description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Partition number of the installed disk's ESP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub esp_partition: Option<u32>,
    /// Its unique partition GUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub esp_partuuid: Option<String>,
    /// The loader path in the entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader: Option<String>,
    /// What happened to `BootOrder`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<String>,
    /// A `BootNext` set by an earlier run was still pending: the firmware ignored it.
    pub ignored_before: bool,
    /// The FAT serial of the install's seed partition, recorded on the stick so that its GRUB
    /// hands a machine it provisioned to its disk (docs/boot-order.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stick_handover: Option<String>,
}

/// The report. Sections are filled in as the flow gets to them; `None` is written as `null`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Report format version.
    #[serde(default)]
    pub version: u32,
    /// This run's id (also in the seed's instance-id).
    pub install_id: String,
    /// How the run ended.
    pub status: Status,
    /// Seconds since the epoch when the run started (the machine's clock).
    #[serde(default)]
    pub started_at: u64,
    /// Early boot facts: kernel, modules, time to settle.
    #[serde(default)]
    pub boot: Option<BootInfo>,
    /// DMI and NICs.
    #[serde(default)]
    pub machine: Option<MachineIdentity>,
    /// CPU and memory.
    #[serde(default)]
    pub hardware: Option<Hardware>,
    /// Every disk seen.
    #[serde(default)]
    pub disks: Option<Vec<Disk>>,
    /// The target decision: chosen disk, reason, rejected disks with reasons.
    #[serde(default)]
    pub selection: Option<SelectionInfo>,
    /// Image name, digest, sizes and signature.
    #[serde(default)]
    pub image: Option<ImageInfo>,
    /// The write engine's report: timings, throughput, verification, the final table.
    #[serde(default, deserialize_with = "section")]
    pub write: Option<crate::write::WriteReport>,
    /// Seed summary and placement.
    #[serde(default, deserialize_with = "section")]
    pub seed: Option<SeedInfo>,
    /// The boot entry made for the next boot.
    #[serde(default)]
    pub next_boot: Option<NextBoot>,
    /// Seconds per phase of the whole flow.
    #[serde(default)]
    pub timings: BTreeMap<String, f64>,
    /// Power-on to first byte, by phase.
    #[serde(default)]
    pub phases: Option<Phases>,
    /// Bench mode's stick read rates.
    #[serde(default)]
    pub stick_read: Option<StickRead>,
    /// The error, when the run failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// A report file [`load_all`] could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// Why it was skipped (I/O error or the JSON error with line and column).
    pub why: String,
}

/// What [`load_all`] found: the reports, oldest first, and the files it skipped.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Reports that parsed, by start time.
    pub reports: Vec<Report>,
    /// Files that did not.
    pub skipped: Vec<Skipped>,
}

/// A section of the report that only people read (`write`, `seed`): one this build cannot
/// parse — written by another version, or edited — is dropped, never the whole report, whose
/// status, image and chosen disk decide "already installed".
fn section<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl Report {
    /// A new report for run `install_id`.
    pub fn new(install_id: &str) -> Report {
        Report {
            version: VERSION,
            install_id: install_id.to_string(),
            status: Status::Running,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            boot: None,
            machine: None,
            hardware: None,
            disks: None,
            selection: None,
            image: None,
            write: None,
            seed: None,
            next_boot: None,
            timings: BTreeMap::new(),
            phases: None,
            stick_read: None,
            error: None,
        }
    }

    /// Records how long a phase took (milliseconds precision).
    pub fn timing(&mut self, phase: &str, secs: f64) {
        self.timings
            .insert(phase.to_string(), (secs * 1000.0).round() / 1000.0);
    }

    /// The disk this run chose, as it was seen then.
    pub fn chosen_disk(&self) -> Option<&Disk> {
        let chosen = self.selection.as_ref()?.chosen.as_deref()?;
        self.disks.as_ref()?.iter().find(|d| d.name == chosen)
    }

    /// Whether this report records a successful install of the image with digest
    /// `image_sha256` on the disk with serial `disk_serial`. Disks are matched by serial, not by
    /// kernel name: names change with the order drivers probe in.
    pub fn records_install_of(&self, disk_serial: &str, image_sha256: &str) -> bool {
        self.status == Status::Installed
            && !disk_serial.is_empty()
            && self
                .image
                .as_ref()
                .is_some_and(|i| i.sha256 == image_sha256)
            && self
                .chosen_disk()
                .is_some_and(|d| d.serial.as_deref() == Some(disk_serial))
    }

    /// Writes the report to `dir/<install id>.json`, whole on the medium (FAT included) when
    /// this returns: see [`crate::durable::replace_file`].
    pub fn save(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.install_id));
        let mut bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        crate::durable::replace_file(&path, &bytes)?;
        Ok(path)
    }
}

/// Reads every `*.json` report in `dir`. A file that cannot be read or parsed is skipped and
/// listed in [`Loaded::skipped`] (a damaged old report must not stop an install, and the
/// operator should hear about it). A missing directory is no reports.
pub fn load_all(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return loaded,
        Err(e) => {
            loaded.skipped.push(Skipped {
                path: dir.to_path_buf(),
                why: format!("listing: {e}"),
            });
            return loaded;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let parsed = std::fs::read(&path)
            .map_err(|e| format!("reading: {e}"))
            .and_then(|b| serde_json::from_slice::<Report>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(r) => loaded.reports.push(r),
            Err(why) => loaded.skipped.push(Skipped { path, why }),
        }
    }
    loaded.reports.sort_by_key(|r| r.started_at);
    loaded
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
    fn save_and_load_round_trip_and_bad_files_are_skipped_by_name() {
        let t = tempfile::tempdir().unwrap();
        let mut r = Report::new("20261125-000000-abcd");
        r.status = Status::Installed;
        r.timing("write", 1.23456);
        let p = r.save(t.path()).unwrap();
        assert!(p.ends_with("20261125-000000-abcd.json"));
        std::fs::write(t.path().join("junk.json"), b"{not json").unwrap();
        std::fs::write(t.path().join("wrong.json"), br#"{"status": 3}"#).unwrap();
        std::fs::write(t.path().join("notes.txt"), b"not a report").unwrap();
        let all = load_all(t.path());
        assert_eq!(all.reports.len(), 1);
        assert_eq!(all.reports[0].status, Status::Installed);
        assert_eq!(all.reports[0].timings["write"], 1.235);
        let skipped: Vec<_> = all
            .skipped
            .iter()
            .map(|s| s.path.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(skipped, ["junk.json", "wrong.json"]);
        assert!(all.skipped[0].why.contains("line 1"), "{:?}", all.skipped);
        assert!(load_all(&t.path().join("missing")).reports.is_empty());
    }

    /// A report as the appliance wrote it before the report was typed (fields trimmed to what
    /// matters, plus keys this build does not know).
    const OLD_REPORT: &str = r#"{
      "version": 1, "install_id": "20261130-101010-0a0b", "status": "installed",
      "started_at": 1790000000,
      "boot": {"kernel": "6.1.0-28-amd64", "modules_loaded": 31, "module_failures": [["crc32c_intel", "No such device"]],
               "efi": true, "settled": true, "seconds": 2.5},
      "machine": {"dmi": {"sys_vendor": "QEMU", "product_name": null, "product_serial": "SN1",
                          "product_uuid": null, "board_serial": null},
                  "nics": [{"name": "eth0", "mac": "52:54:00:12:34:56", "wireless": false}]},
      "hardware": {"cpu": "QEMU Virtual CPU", "cpus": 2, "memory_bytes": 2147483648, "kernel": "6.1"},
      "disks": [{"name": "nvme0n1", "dev_path": "/dev/nvme0n1", "major": 259, "minor": 0,
                 "transport": "nvme", "sys_path": "/sys/devices/x/nvme0n1", "size": 1073741824,
                 "logical_block_size": 512, "physical_block_size": 512, "model": "QEMU NVMe Ctrl",
                 "serial": "NVME0001", "wwid": null, "removable": false, "external": false,
                 "read_only": false, "rotational": false, "partitions": [], "holders": []}],
      "selection": {"chosen": "nvme0n1", "reason": "the only internal disk",
                    "rejected": [{"disk": "sda", "why": "USB"}]},
      "image": {"name": "demo", "sha256": "abc123", "raw_size": 1048576, "sector_size": 512,
                "compressed_size": 4096,
                "signature": {"signed": false, "key_id": null, "verified": false}},
      "write": {"verified": true, "write_seconds": 1.0},
      "seed": {"summary": {"hostname": "nuc-1"}, "placement": {"placement": "cidata-partition"}},
      "next_boot": {"set": true, "boot_entry": "Boot0003", "description": "imprint: QEMU",
                    "esp_partition": 1, "esp_partuuid": "x", "loader": "\\EFI\\BOOT\\BOOTX64.EFI",
                    "boot_order": "Unchanged", "ignored_before": false},
      "timings": {"discover": 0.1, "total": 3.0},
      "error": null,
      "from_the_future": 42
    }"#;

    #[test]
    fn old_reports_parse_and_decide_already_installed_by_typed_fields() {
        let r: Report = serde_json::from_str(OLD_REPORT).unwrap();
        assert_eq!(r.status, Status::Installed);
        assert_eq!(r.chosen_disk().unwrap().serial.as_deref(), Some("NVME0001"));
        assert_eq!(
            r.next_boot.as_ref().unwrap().boot_entry.as_deref(),
            Some("Boot0003")
        );
        assert!(r.records_install_of("NVME0001", "abc123"));
        // Its `write` and `seed` sections have fields this build lacks: dropped, not fatal.
        assert!(r.write.is_none() && r.seed.is_none());
        assert!(!r.records_install_of("NVME0002", "abc123"), "other disk");
        assert!(!r.records_install_of("NVME0001", "def456"), "other image");
        assert!(!r.records_install_of("", "abc123"), "no serial, no match");
        let mut failed = r.clone();
        failed.status = Status::Failed;
        assert!(!failed.records_install_of("NVME0001", "abc123"));
        let mut elsewhere = r.clone();
        elsewhere.selection.as_mut().unwrap().chosen = Some("sda".into());
        assert!(!elsewhere.records_install_of("NVME0001", "abc123"));
        // A run that failed before discovery: sections are null or absent.
        let early: Report = serde_json::from_str(
            r#"{"install_id": "x", "status": "failed", "boot": null, "error": "no stick"}"#,
        )
        .unwrap();
        assert!(early.disks.is_none() && early.timings.is_empty());
        assert!(!early.records_install_of("NVME0001", "abc123"));
    }

    #[test]
    fn field_names_stay_what_the_tests_and_old_readers_expect() {
        let r: Report = serde_json::from_str(OLD_REPORT).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "installed");
        assert_eq!(v["selection"]["chosen"], "nvme0n1");
        assert_eq!(v["selection"]["rejected"][0]["why"], "USB");
        assert_eq!(v["image"]["signature"]["verified"], false);
        assert_eq!(v["next_boot"]["set"], true);
        assert_eq!(v["boot"]["module_failures"][0][0], "crc32c_intel");
        let fresh = serde_json::to_value(Report::new("y")).unwrap();
        assert_eq!(fresh["status"], "running");
        assert!(fresh["machine"].is_null() && fresh["error"].is_null());
        let nb = serde_json::to_value(NextBoot {
            why: Some("no efivarfs".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            nb,
            serde_json::json!({"set": false, "why": "no efivarfs", "ignored_before": false})
        );
    }
}
