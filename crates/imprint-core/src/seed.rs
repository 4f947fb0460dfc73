//! The cloud-init NoCloud seed: checking the templates on the stick (`imprint/seed/`),
//! rendering them for one machine (hostname and network from the config's `machines` table or
//! the hostname pattern, a fresh `instance-id` per install), and putting the result where the
//! installed OS's cloud-init finds it:
//!
//! - [`cidata_addition`]: a small FAT partition labelled `CIDATA` at the very end of the disk's
//!   usable space (works for any root filesystem, needs no mount; the root partition's
//!   growpart grows up to it), built in memory and handed to the write engine, which writes
//!   and reads it back before its single commit of the partition table;
//! - [`inject_into_dir`]: `/var/lib/cloud/seed/nocloud/` on the mounted root filesystem.
//!
//! Both read every file back and compare. Files are written as JSON where we render them
//! (meta-data, network-config): JSON is YAML, so cloud-init reads it, and we need no YAML
//! library in the PID-1 binary. user-data is copied byte for byte and may hold secrets, so the
//! report only ever sees [`RenderedSeed::summary`]: sizes and digests, never contents.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use gpt::partition::Partition as GptPartition;
use gpt::partition_types;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{check_hostname, MachineEntry, RootPartition, SeedConfig, StaticNetwork};
use crate::gpt_table::GptTable;
use crate::machine::{MacAddr, MachineIdentity};
use crate::write::Addition;

/// GPT partition name and FAT volume label of the seed partition; NoCloud looks for the label.
pub const CIDATA_LABEL: &str = "CIDATA";
/// Size of the seed partition. Small enough to cost nothing, large enough for user-data with
/// embedded files; a whole number of MiB so it stays aligned on 512- and 4096-byte disks.
pub const CIDATA_SIZE: u64 = 8 << 20;
/// The most template bytes a seed folder may hold: the partition less FAT overhead (1 MiB)
/// and room for what rendering adds (64 KiB).
pub const SEED_TEMPLATE_CAPACITY: u64 = CIDATA_SIZE - (1 << 20) - (64 << 10);
/// Where NoCloud looks on the root filesystem, relative to its mount point.
pub const ROOTFS_SEED_DIR: &str = "var/lib/cloud/seed/nocloud";
/// The NoCloud file names.
pub const USER_DATA: &str = "user-data";
/// See [`USER_DATA`].
pub const META_DATA: &str = "meta-data";
/// See [`USER_DATA`].
pub const NETWORK_CONFIG: &str = "network-config";

const MIB: u64 = 1 << 20;

/// What kind of user-data the template is (the first line decides, as in cloud-init).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserDataKind {
    /// `#cloud-config`.
    CloudConfig,
    /// `#!…`: a script run once.
    Script,
    /// `## template: jinja` followed by one of the others.
    JinjaTemplate,
    /// A MIME multipart archive (`Content-Type: multipart/…`).
    Multipart,
    /// No user-data template: an empty `#cloud-config` is written, because NoCloud needs the
    /// file to exist.
    Empty,
}

/// The validated templates from the stick's seed folder.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedTemplates {
    /// user-data, byte for byte.
    pub user_data: Vec<u8>,
    /// Its kind.
    pub user_data_kind: UserDataKind,
    /// meta-data keys (merged under ours: `instance-id` and `local-hostname` always win).
    pub meta_data: Map<String, Value>,
    /// network-config, byte for byte, if present (a machines-table entry replaces it).
    pub network_config: Option<Vec<u8>>,
}

/// Seed handling failed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// A template file or the folder could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A template is malformed.
    #[error("{}: {reason}", path.display())]
    Template {
        /// The template file.
        path: PathBuf,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The install id cannot be part of an instance-id.
    #[error("install id {id:?} must be non-empty letters, digits, '-', '_' or '.'")]
    InstallId {
        /// The rejected id.
        id: String,
    },
    /// More than one machines-table entry matches this machine.
    #[error("this machine matches seed.machines {}: make the keys unique", entries.iter().map(|(i, k)| format!("[{i}] by {k}")).collect::<Vec<_>>().join(" and "))]
    AmbiguousMachine {
        /// Index and matching key of each entry.
        entries: Vec<(usize, String)>,
    },
    /// The hostname could not be made.
    #[error("hostname: {reason}")]
    Hostname {
        /// Why.
        reason: String,
    },
    /// A static network entry names no usable interface.
    #[error("seed.machines[{entry}].network: {reason}")]
    Network {
        /// The entry.
        entry: usize,
        /// Why.
        reason: String,
    },
    /// The seed does not fit its partition.
    #[error("the seed is {size} bytes; the {capacity}-byte CIDATA partition cannot hold it")]
    TooLarge {
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        capacity: u64,
    },
    /// The disk's partition table could not be read or written.
    #[error("{step} on {}", disk.display())]
    Gpt {
        /// The disk.
        disk: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The cause.
        source: gpt::GptError,
    },
    /// A GPT header could not be written.
    #[error("{step} on {}", disk.display())]
    GptHeader {
        /// The disk.
        disk: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The cause.
        source: gpt::header::HeaderError,
    },
    /// The disk's layout does not allow the seed partition.
    #[error("{}: {reason}", disk.display())]
    Layout {
        /// The disk.
        disk: PathBuf,
        /// Why.
        reason: String,
    },
    /// I/O on the disk or the seed directory failed.
    #[error("{step} {}", path.display())]
    Io {
        /// The disk, file or folder.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// A file read back differs from what was written.
    #[error("read-back of {file} on {} does not match what was written: {reason}", location.display())]
    ReadBack {
        /// The disk or folder.
        location: PathBuf,
        /// The seed file (`user-data`, …) or `volume label`.
        file: String,
        /// How it differs.
        reason: String,
    },
    /// The seed templates break cloud-init's rules (each problem names file, line, column).
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Check {
        /// Every problem found, in file order.
        problems: Vec<SeedProblem>,
    },
    /// `unknown_machines` is `refuse` and no machines-table entry matches this machine.
    #[error(
        "this machine is not in seed.machines and unknown_machines is \"refuse\": nothing is \
         written to it. To install it, add an entry keyed by {}",
        unknown_machine_keys(macs, serial.as_deref(), uuid.as_deref())
    )]
    UnknownMachine {
        /// The machine's NIC MACs (wired first).
        macs: Vec<MacAddr>,
        /// Its DMI serial, if the firmware has a real one.
        serial: Option<String>,
        /// Its DMI product UUID.
        uuid: Option<String>,
    },
    /// The root partition for `root-filesystem` placement could not be determined.
    #[error("seed.root_partition: {reason}")]
    RootPartition {
        /// Why.
        reason: String,
    },
}

/// Reads a seed template if present: a regular file only (never a symbolic link, a FIFO or a
/// device), at most [`crate::input::limits::SEED_FILE`] bytes.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, SeedError> {
    match crate::input::read_bounded_no_symlink(path, crate::input::limits::SEED_FILE) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SeedError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn classify_user_data(path: &Path, data: &[u8]) -> Result<UserDataKind, SeedError> {
    let text = String::from_utf8_lossy(&data[..data.len().min(4096)]);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let first = text.lines().next().unwrap_or("").trim_end();
    if first.starts_with("#cloud-config") {
        Ok(UserDataKind::CloudConfig)
    } else if first.starts_with("#!") {
        Ok(UserDataKind::Script)
    } else if first.eq_ignore_ascii_case("## template: jinja") {
        Ok(UserDataKind::JinjaTemplate)
    } else if text.lines().take(20).any(|l| {
        l.to_ascii_lowercase()
            .starts_with("content-type: multipart/")
    }) {
        Ok(UserDataKind::Multipart)
    } else {
        Err(SeedError::Template {
            path: path.to_path_buf(),
            // The line itself is not shown: the file may be anything (a password hash).
            reason: "its first line is not a kind cloud-init runs; start with \
                     \"#cloud-config\", \"#!\" (a script), \"## template: jinja\", or use a MIME \
                     multipart archive"
                .into(),
        })
    }
}

/// Parses meta-data: a JSON object, or flat YAML (`key: value` lines, `#` comments). Nested
/// YAML is refused rather than misread; write such meta-data as JSON.
fn parse_meta_data(path: &Path, text: &str) -> Result<Map<String, Value>, SeedError> {
    let bad = |line: usize, why: &str| SeedError::Template {
        path: path.to_path_buf(),
        reason: format!("line {line}: {why}"),
    };
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if trimmed.starts_with('{') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(bad(1, "JSON meta-data must be an object")),
            Err(e) => Err(bad(e.line(), &format!("not valid JSON: {e}"))),
        };
    }
    let mut map = Map::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_end();
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') || content == "---" {
            continue;
        }
        if line.starts_with([' ', '\t']) || content.starts_with("- ") {
            return Err(bad(
                n,
                "nested YAML is not supported in the meta-data template; write the file as a \
                 JSON object instead",
            ));
        }
        let (key, value) = content
            .split_once(':')
            .ok_or_else(|| bad(n, "expected \"key: value\""))?;
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        if key.is_empty() {
            return Err(bad(n, "empty key"));
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        if value.is_empty() {
            return Err(bad(
                n,
                &format!("{key} has no value (a nested block?): write the file as JSON"),
            ));
        }
        if map
            .insert(key.to_string(), Value::String(value.to_string()))
            .is_some()
        {
            return Err(bad(n, &format!("{key} given twice")));
        }
    }
    Ok(map)
}

/// Checks network-config: JSON with `version` 1 or 2 (optionally under `network:`), or YAML
/// with a `version: 1|2` line and no tabs.
fn check_network_config(path: &Path, text: &str) -> Result<(), SeedError> {
    let bad = |why: String| SeedError::Template {
        path: path.to_path_buf(),
        reason: why,
    };
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        let v: Value =
            serde_json::from_str(trimmed).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let inner = v.get("network").unwrap_or(&v);
        return match inner.get("version").and_then(Value::as_u64) {
            Some(1 | 2) => Ok(()),
            _ => Err(bad("needs \"version\": 1 or 2".into())),
        };
    }
    if let Some(n) = text.lines().position(|l| l.contains('\t')) {
        return Err(bad(format!(
            "line {}: tab character (YAML indents with spaces)",
            n + 1
        )));
    }
    let has_version = text.lines().any(|l| {
        let t = l.trim();
        t == "version: 1" || t == "version: 2"
    });
    if has_version {
        Ok(())
    } else {
        Err(bad(
            "no \"version: 1\" or \"version: 2\" line: not a cloud-init network-config".into(),
        ))
    }
}

/// One thing wrong in a seed file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedProblem {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// The key path, e.g. `users[0].lock_passwd` (empty: the whole file).
    pub key_path: String,
    /// What is wrong; never quotes a value from the file.
    pub message: String,
}

impl std::fmt::Display for SeedProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: ", self.path.display(), self.line, self.column)?;
        if !self.key_path.is_empty() {
            write!(f, "{}: ", self.key_path)?;
        }
        f.write_str(&self.message)
    }
}

/// What a file name in a seed folder was probably meant to be: the NoCloud names are exact,
/// and cloud-init silently ignores `userdata`, `user-data.yaml`, `network_config` … — a
/// machine nobody can log into. `vendor-data` is a real NoCloud file that imprint does not
/// carry.
fn misnamed_seed_file(name: &str) -> Option<String> {
    if [USER_DATA, META_DATA, NETWORK_CONFIG].contains(&name) {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let stem = [
        ".yaml",
        ".yml",
        ".json",
        ".txt",
        ".cfg",
        ".conf",
        ".cloud-config",
    ]
    .iter()
    .find_map(|ext| lower.strip_suffix(ext))
    .unwrap_or(&lower);
    let squashed: String = stem
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.' | ' '))
        .collect();
    let meant = match squashed.as_str() {
        "userdata" | "cloudconfig" | "clouduserdata" => USER_DATA,
        "metadata" => META_DATA,
        "networkconfig" | "network" | "netplan" => NETWORK_CONFIG,
        "vendordata" => {
            return Some(
                "imprint carries only user-data, meta-data and network-config: put these \
                 settings into user-data"
                    .into(),
            )
        }
        _ => return None,
    };
    Some(format!(
        "cloud-init ignores a file of this name: did you mean {meant}? (rename it to exactly \
         {meant})"
    ))
}

/// Refuses files in `dir` whose name looks like a misspelt seed file.
fn check_seed_file_names(dir: &Path) -> Result<(), SeedError> {
    let entries = fs::read_dir(dir).map_err(|source| SeedError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut problems = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| SeedError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // On a case-insensitive file system (the stick's FAT) `USER-DATA` *is* `user-data`:
        // the same file answers to both names.
        let lower = name.to_ascii_lowercase();
        if lower != name && [USER_DATA, META_DATA, NETWORK_CONFIG].contains(&lower.as_str()) {
            use std::os::unix::fs::MetadataExt;
            let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same(&entry.path(), &dir.join(&lower)) {
                continue;
            }
        }
        if let Some(message) = misnamed_seed_file(&name) {
            problems.push(SeedProblem {
                path: dir.join(entry.file_name()),
                line: 1,
                column: 1,
                key_path: String::new(),
                message,
            });
        }
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SeedError::Check { problems })
    }
}

/// The host's check of a seed folder given to `imprint build`/`flash`: everything
/// [`validate_seed_dir`] checks, and the folder must hold at least one seed file — an empty
/// one is almost always the wrong folder.
pub fn check_seed_dir_for_build(dir: &Path) -> Result<SeedTemplates, SeedError> {
    let templates = validate_seed_dir(dir)?;
    if [USER_DATA, META_DATA, NETWORK_CONFIG]
        .iter()
        .all(|name| !dir.join(name).exists())
    {
        return Err(SeedError::Template {
            path: dir.to_path_buf(),
            reason: "the seed folder holds no user-data, meta-data or network-config: put your \
                     #cloud-config in user-data there, or leave out --seed to build without \
                     a seed"
                .into(),
        });
    }
    Ok(templates)
}

/// With the `seed-schema` feature: the YAML and schema checks of one template; `Ok` without it.
#[cfg_attr(not(feature = "seed-schema"), allow(unused_variables))]
fn check_yaml_template(path: &Path, name: &str, data: &[u8]) -> Result<(), SeedError> {
    #[cfg(feature = "seed-schema")]
    {
        let Ok(text) = std::str::from_utf8(data) else {
            return Err(SeedError::Template {
                path: path.to_path_buf(),
                reason: "not UTF-8 text".into(),
            });
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let problems = match name {
            USER_DATA => crate::seed_schema::check_cloud_config(path, text),
            META_DATA => crate::seed_schema::check_meta_data(path, text),
            _ => crate::seed_schema::check_network_config(path, text),
        };
        if !problems.is_empty() {
            return Err(SeedError::Check { problems });
        }
    }
    Ok(())
}

/// Reads and checks the seed templates in `dir` (`user-data`, `meta-data`,
/// `network-config`). Each file is optional, the folder is not.
pub fn validate_seed_dir(dir: &Path) -> Result<SeedTemplates, SeedError> {
    let meta = fs::metadata(dir).map_err(|source| SeedError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(SeedError::Template {
            path: dir.to_path_buf(),
            reason: "not a folder".into(),
        });
    }
    check_seed_file_names(dir)?;
    let ud_path = dir.join(USER_DATA);
    let (user_data, user_data_kind) = match read_optional(&ud_path)? {
        Some(b) => {
            let kind = classify_user_data(&ud_path, &b)?;
            if kind == UserDataKind::CloudConfig {
                check_yaml_template(&ud_path, USER_DATA, &b)?;
            }
            (b, kind)
        }
        None => (b"#cloud-config\n{}\n".to_vec(), UserDataKind::Empty),
    };

    let md_path = dir.join(META_DATA);
    let meta_data = match read_optional(&md_path)? {
        Some(b) => {
            let text = String::from_utf8(b).map_err(|_| SeedError::Template {
                path: md_path.clone(),
                reason: "not UTF-8 text".into(),
            })?;
            check_yaml_template(&md_path, META_DATA, text.as_bytes())?;
            parse_meta_data(&md_path, &text)?
        }
        None => Map::new(),
    };

    let nc_path = dir.join(NETWORK_CONFIG);
    let network_config = match read_optional(&nc_path)? {
        Some(b) => {
            let text = std::str::from_utf8(&b).map_err(|_| SeedError::Template {
                path: nc_path.clone(),
                reason: "not UTF-8 text".into(),
            })?;
            check_yaml_template(&nc_path, NETWORK_CONFIG, &b)?;
            check_network_config(&nc_path, text)?;
            Some(b)
        }
        None => None,
    };

    // The templates must fit the seed partition the appliance writes (with room for the
    // instance-id and network stanza rendering adds): found here, not on the machine.
    let size = (user_data.len() + network_config.as_ref().map_or(0, Vec::len)) as u64
        + fs::metadata(&md_path).map_or(0, |m| m.len());
    if size > SEED_TEMPLATE_CAPACITY {
        return Err(SeedError::TooLarge {
            size,
            capacity: SEED_TEMPLATE_CAPACITY,
        });
    }

    Ok(SeedTemplates {
        user_data,
        user_data_kind,
        meta_data,
        network_config,
    })
}

fn unknown_machine_keys(macs: &[MacAddr], serial: Option<&str>, uuid: Option<&str>) -> String {
    let mut keys = Vec::new();
    if !macs.is_empty() {
        let list: Vec<String> = macs.iter().map(ToString::to_string).collect();
        keys.push(format!("\"mac\" (one of {})", list.join(", ")));
    }
    // Firmware strings are untrusted: quoted and escaped, never raw.
    if let Some(s) = serial {
        keys.push(format!("\"dmi_serial\": {s:?}"));
    }
    if let Some(u) = uuid {
        keys.push(format!("\"dmi_uuid\": {u:?}"));
    }
    if keys.is_empty() {
        "a MAC or DMI serial (this machine reports neither)".into()
    } else {
        keys.join(" or ")
    }
}

/// Decides whether the appliance may write this machine, before any disk is touched:
/// `Ok(Some(i))` when `seed.machines[i]` is its entry, `Ok(None)` when it has none and
/// `unknown_machines` is `allow` (it gets the hostname pattern), and an error when it has
/// none and `unknown_machines` is `refuse` (a strict fleet), or when two entries match.
pub fn check_known_machine(
    config: &crate::config::Config,
    identity: &MachineIdentity,
) -> Result<Option<usize>, SeedError> {
    let hits: Vec<(usize, MachineMatch)> = config
        .seed
        .machines
        .iter()
        .enumerate()
        .filter_map(|(i, e)| entry_matches(e, identity).map(|m| (i, with_entry(m, i))))
        .collect();
    match hits.as_slice() {
        [] if config.unknown_machines == crate::config::UnknownMachines::Refuse => {
            let mut nics: Vec<_> = identity.nics.iter().filter(|n| !n.mac.is_zero()).collect();
            nics.sort_by_key(|n| n.wireless);
            Err(SeedError::UnknownMachine {
                macs: nics.iter().map(|n| n.mac).collect(),
                serial: identity.serial().map(str::to_string),
                uuid: identity.dmi.product_uuid.clone(),
            })
        }
        [] => Ok(None),
        [(i, _)] => Ok(Some(*i)),
        _ => Err(SeedError::AmbiguousMachine {
            entries: hits
                .iter()
                .map(|(i, m)| {
                    let key = match m {
                        MachineMatch::Mac { mac, .. } => format!("mac {mac}"),
                        MachineMatch::DmiSerial { .. } => "dmi_serial".into(),
                        MachineMatch::DmiUuid { .. } => "dmi_uuid".into(),
                        MachineMatch::Pattern { .. } => "pattern".into(),
                    };
                    (*i, key)
                })
                .collect(),
        }),
    }
}

/// How the machine was recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum MachineMatch {
    /// A machines-table entry keyed by one of its NICs' MAC.
    Mac {
        /// Index in `seed.machines`.
        entry: usize,
        /// The MAC.
        mac: MacAddr,
    },
    /// A machines-table entry keyed by the DMI product or board serial.
    DmiSerial {
        /// Index in `seed.machines`.
        entry: usize,
    },
    /// A machines-table entry keyed by the DMI product UUID.
    DmiUuid {
        /// Index in `seed.machines`.
        entry: usize,
    },
    /// No entry: the hostname comes from `seed.hostname_pattern`.
    Pattern {
        /// The pattern used.
        pattern: String,
    },
}

/// Which rule named the machine. An install never fails over a hostname: the rules are tried
/// in this order and the last always yields one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum HostnameSource {
    /// The machines-table entry that matched.
    MachinesEntry {
        /// Index in `seed.machines`.
        entry: usize,
    },
    /// The `seed.hostname_pattern` the config sets.
    ConfigPattern {
        /// The pattern.
        pattern: String,
    },
    /// The seed's own meta-data `local-hostname`.
    SeedMetaData,
    /// The default pattern.
    DefaultPattern {
        /// The pattern.
        pattern: String,
    },
    /// Nothing else could name it: `imprint-` and the target disk's serial (or the install id
    /// before a disk is chosen).
    Fallback {
        /// What the name was made from.
        from: String,
    },
}

impl HostnameSource {
    /// One line for the console.
    pub fn describe(&self) -> String {
        match self {
            HostnameSource::MachinesEntry { entry } => {
                format!("named by machines entry {entry}")
            }
            HostnameSource::ConfigPattern { pattern } => {
                format!("named by the config's hostname_pattern {pattern:?}")
            }
            HostnameSource::SeedMetaData => "named by the seed's meta-data local-hostname".into(),
            HostnameSource::DefaultPattern { pattern } => {
                format!("named by the default pattern {pattern:?}")
            }
            HostnameSource::Fallback { from } => format!(
                "no machines entry, pattern or local-hostname could name it: named after {from}"
            ),
        }
    }
}

/// Where the network-config came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkSource {
    /// The entry's simple static form, rendered to v2.
    TableStatic {
        /// The address (not a secret; the operator wants to see it).
        address: String,
        /// The NIC it applies to.
        interface: MacAddr,
    },
    /// The entry's `network_config`.
    TableNetworkConfig,
    /// The template's `network-config`.
    Template,
    /// None: cloud-init's default (DHCP on the first NIC).
    None,
}

/// The seed for one machine and one install.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedSeed {
    /// `imprint-<install id>`.
    pub instance_id: String,
    /// `local-hostname`.
    pub hostname: String,
    /// Which rule named the machine.
    pub hostname_source: HostnameSource,
    /// How the machine was recognised.
    pub matched: MachineMatch,
    /// Where the network-config came from.
    pub network_source: NetworkSource,
    /// What kind of user-data it is.
    pub user_data_kind: UserDataKind,
    /// user-data bytes.
    pub user_data: Vec<u8>,
    /// meta-data bytes (JSON).
    pub meta_data: Vec<u8>,
    /// network-config bytes, if any.
    pub network_config: Option<Vec<u8>>,
}

/// One file of the seed, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    /// `user-data`, `meta-data`, `network-config`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents, hex.
    pub sha256: String,
}

/// What the report says about the seed. Contents are never included: user-data and
/// network-config (Wi-Fi passwords) may hold secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedSummary {
    /// The instance-id.
    pub instance_id: String,
    /// The hostname.
    pub hostname: String,
    /// Which rule named the machine.
    pub hostname_source: HostnameSource,
    /// How the machine was recognised.
    pub matched: MachineMatch,
    /// Where the network-config came from.
    pub network: NetworkSource,
    /// What kind of user-data was written.
    pub user_data_kind: UserDataKind,
    /// The files, by size and digest.
    pub files: Vec<FileSummary>,
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

impl RenderedSeed {
    /// The files to write, in order.
    pub fn files(&self) -> Vec<(&'static str, &[u8])> {
        let mut v = vec![
            (USER_DATA, self.user_data.as_slice()),
            (META_DATA, self.meta_data.as_slice()),
        ];
        if let Some(nc) = &self.network_config {
            v.push((NETWORK_CONFIG, nc.as_slice()));
        }
        v
    }

    /// The report's view: hostname, match, network source, and each file's size and digest.
    pub fn summary(&self) -> SeedSummary {
        SeedSummary {
            instance_id: self.instance_id.clone(),
            hostname: self.hostname.clone(),
            hostname_source: self.hostname_source.clone(),
            matched: self.matched.clone(),
            network: self.network_source.clone(),
            user_data_kind: self.user_data_kind,
            files: self
                .files()
                .into_iter()
                .map(|(name, data)| FileSummary {
                    name: name.to_string(),
                    size: data.len() as u64,
                    sha256: sha256_hex(data),
                })
                .collect(),
        }
    }
}

/// Lower-case, hostname-safe form of an identifier: runs of anything but letters and digits
/// become one hyphen, no hyphen at either end.
fn hostname_part(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Expands a hostname pattern for this machine. `{serial}` falls back to the primary MAC when
/// the firmware has no real serial, so a pattern never yields a hostname shared by a fleet.
pub fn expand_hostname(pattern: &str, id: &MachineIdentity) -> Result<String, SeedError> {
    let err = |reason: String| SeedError::Hostname { reason };
    let mac = id.primary_mac();
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| err(format!("{pattern:?}: unclosed '{{'")))?;
        let name = &rest[open + 1..open + close];
        let value = match name {
            "serial" => id
                .serial()
                .map(hostname_part)
                .filter(|s| !s.is_empty())
                .or_else(|| mac.map(|m| m.compact()))
                .ok_or_else(|| {
                    err("{serial}: no DMI serial and no network interface on this machine".into())
                })?,
            "mac" => mac
                .map(|m| m.compact())
                .ok_or_else(|| err("{mac}: no physical network interface found".into()))?,
            "mac6" => mac
                .map(|m| m.compact()[6..].to_string())
                .ok_or_else(|| err("{mac6}: no physical network interface found".into()))?,
            "uuid" => id
                .uuid()
                .map(hostname_part)
                .ok_or_else(|| err("{uuid}: the firmware reports no DMI product UUID".into()))?,
            other => return Err(err(format!("unknown placeholder {{{other}}}"))),
        };
        out.push_str(&value);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    // A long serial must not make an invalid label: cut each label at 63 characters.
    let out = out
        .split('.')
        .map(|l| l[..l.len().min(63)].trim_end_matches('-'))
        .collect::<Vec<_>>()
        .join(".");
    check_hostname(&out).map_err(err)?;
    Ok(out)
}

fn entry_matches(e: &MachineEntry, id: &MachineIdentity) -> Option<MachineMatch> {
    let eq = |a: &str, b: &str| a.trim().eq_ignore_ascii_case(b.trim());
    if let Some(mac) = e.mac {
        if id.nics.iter().any(|n| n.mac == mac) {
            return Some(MachineMatch::Mac { entry: 0, mac });
        }
    }
    if let Some(s) = &e.dmi_serial {
        let serials = [&id.dmi.product_serial, &id.dmi.board_serial];
        if serials.into_iter().flatten().any(|x| eq(x, s)) {
            return Some(MachineMatch::DmiSerial { entry: 0 });
        }
    }
    if let Some(u) = &e.dmi_uuid {
        if id.dmi.product_uuid.as_deref().is_some_and(|x| eq(x, u)) {
            return Some(MachineMatch::DmiUuid { entry: 0 });
        }
    }
    None
}

fn with_entry(m: MachineMatch, i: usize) -> MachineMatch {
    match m {
        MachineMatch::Mac { mac, .. } => MachineMatch::Mac { entry: i, mac },
        MachineMatch::DmiSerial { .. } => MachineMatch::DmiSerial { entry: i },
        MachineMatch::DmiUuid { .. } => MachineMatch::DmiUuid { entry: i },
        p @ MachineMatch::Pattern { .. } => p,
    }
}

/// The hostname of a machine with no machines entry, by the rules of [`render_for_disk`].
fn name_unlisted_machine(
    templates: &SeedTemplates,
    seed: &SeedConfig,
    identity: &MachineIdentity,
    install_id: &str,
    disk_serial: Option<&str>,
) -> (String, HostnameSource) {
    let default = crate::config::DEFAULT_HOSTNAME_PATTERN;
    if seed.hostname_pattern != default {
        if let Ok(h) = expand_hostname(&seed.hostname_pattern, identity) {
            let pattern = seed.hostname_pattern.clone();
            return (h, HostnameSource::ConfigPattern { pattern });
        }
    }
    if let Some(h) = templates
        .meta_data
        .get("local-hostname")
        .and_then(Value::as_str)
        .filter(|h| check_hostname(h).is_ok())
    {
        return (h.to_string(), HostnameSource::SeedMetaData);
    }
    if let Ok(h) = expand_hostname(default, identity) {
        let pattern = default.to_string();
        return (h, HostnameSource::DefaultPattern { pattern });
    }
    let (part, from) = match disk_serial.map(hostname_part).filter(|s| !s.is_empty()) {
        Some(s) => (s, "the target disk's serial".to_string()),
        None => (hostname_part(install_id), "the install id".to_string()),
    };
    let mut h = format!("imprint-{part}");
    h.truncate(63);
    let h = h.trim_end_matches('-').to_string();
    (h, HostnameSource::Fallback { from })
}

/// Renders the simple static form to cloud-init network-config v2. The interface is matched
/// by MAC, so it does not matter what the installed OS names it.
pub fn static_network_v2(n: &StaticNetwork, mac: MacAddr) -> Value {
    let mut eth = Map::new();
    eth.insert("match".into(), json!({ "macaddress": mac.to_string() }));
    eth.insert("addresses".into(), json!([n.address.to_string()]));
    eth.insert("dhcp4".into(), json!(false));
    eth.insert("dhcp6".into(), json!(false));
    if let Some(gw) = n.gateway {
        // gateway4/gateway6, not `routes: to 0.0.0.0/0`: cloud-init turns these into each
        // renderer's native gateway (ENI `gateway`, networkd `Gateway=`, sysconfig `GATEWAY`,
        // NetworkManager, netplan), whereas its ENI renderer turns a default route into
        // `post-up route add … || true`, and Debian 12 has no `route` command: the machine
        // came up without a default route.
        let key = if gw.is_ipv4() { "gateway4" } else { "gateway6" };
        eth.insert(key.into(), json!(gw.to_string()));
    }
    if !n.dns.is_empty() || !n.search.is_empty() {
        let mut ns = Map::new();
        if !n.dns.is_empty() {
            ns.insert(
                "addresses".into(),
                json!(n.dns.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            );
        }
        if !n.search.is_empty() {
            ns.insert("search".into(), json!(n.search));
        }
        eth.insert("nameservers".into(), Value::Object(ns));
    }
    json!({ "version": 2, "ethernets": { "lan0": Value::Object(eth) } })
}

fn to_json_bytes(v: &Value) -> Vec<u8> {
    // Serializing a Value cannot fail (string keys only); fall back to compact just in case.
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s.into_bytes()
}

/// Renders the seed for this machine and this install, naming it as [`render_for_disk`] does
/// before a target disk is known (the last-resort name then comes from the install id).
pub fn render(
    templates: &SeedTemplates,
    seed: &SeedConfig,
    identity: &MachineIdentity,
    install_id: &str,
) -> Result<RenderedSeed, SeedError> {
    render_for_disk(templates, seed, identity, install_id, None)
}

/// Renders the seed for this machine and this install.
///
/// The machine is looked up in `seed.machines` by any NIC's MAC, the DMI product/board serial
/// or the DMI UUID; more than one matching entry is an error (never a guess). The hostname
/// comes from, in order: the matching entry; a `seed.hostname_pattern` the config sets; the
/// seed's own meta-data `local-hostname`; the default pattern; and `imprint-` plus
/// `disk_serial` (the target disk's serial) or the install id — so it never fails for want of
/// a name. Without an entry, network-config comes from the template.
pub fn render_for_disk(
    templates: &SeedTemplates,
    seed: &SeedConfig,
    identity: &MachineIdentity,
    install_id: &str,
    disk_serial: Option<&str>,
) -> Result<RenderedSeed, SeedError> {
    if install_id.is_empty()
        || !install_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(SeedError::InstallId {
            id: install_id.to_string(),
        });
    }
    let instance_id = format!("imprint-{install_id}");

    let hits: Vec<(usize, MachineMatch)> = seed
        .machines
        .iter()
        .enumerate()
        .filter_map(|(i, e)| entry_matches(e, identity).map(|m| (i, with_entry(m, i))))
        .collect();
    if hits.len() > 1 {
        return Err(SeedError::AmbiguousMachine {
            entries: hits
                .iter()
                .map(|(i, m)| {
                    let key = match m {
                        MachineMatch::Mac { mac, .. } => format!("mac {mac}"),
                        MachineMatch::DmiSerial { .. } => "dmi_serial".into(),
                        MachineMatch::DmiUuid { .. } => "dmi_uuid".into(),
                        MachineMatch::Pattern { .. } => "pattern".into(),
                    };
                    (*i, key)
                })
                .collect(),
        });
    }

    let (hostname, hostname_source, matched, entry) = match hits.into_iter().next() {
        Some((i, m)) => {
            let e = &seed.machines[i];
            check_hostname(&e.hostname).map_err(|reason| SeedError::Hostname { reason })?;
            (
                e.hostname.clone(),
                HostnameSource::MachinesEntry { entry: i },
                m,
                Some((i, e)),
            )
        }
        None => {
            let (h, src) =
                name_unlisted_machine(templates, seed, identity, install_id, disk_serial);
            (
                h,
                src,
                MachineMatch::Pattern {
                    pattern: seed.hostname_pattern.clone(),
                },
                None,
            )
        }
    };

    let (network_config, network_source) = match entry {
        Some((i, e)) if e.network.is_some() => {
            let n = e.network.as_ref().ok_or(SeedError::Network {
                entry: i,
                reason: "missing".into(),
            })?;
            let mac = n
                .interface
                .or(e.mac)
                .or_else(|| identity.primary_mac())
                .ok_or_else(|| SeedError::Network {
                    entry: i,
                    reason: "no physical network interface on this machine".into(),
                })?;
            if !identity.nics.iter().any(|nic| nic.mac == mac) {
                return Err(SeedError::Network {
                    entry: i,
                    reason: format!(
                        "interface {mac} is not a NIC of this machine (found: {})",
                        identity
                            .nics
                            .iter()
                            .map(|n| format!("{} {}", n.name, n.mac))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            (
                Some(to_json_bytes(&static_network_v2(n, mac))),
                NetworkSource::TableStatic {
                    address: n.address.to_string(),
                    interface: mac,
                },
            )
        }
        Some((_, e)) if e.network_config.is_some() => (
            e.network_config.as_ref().map(to_json_bytes),
            NetworkSource::TableNetworkConfig,
        ),
        _ => match &templates.network_config {
            Some(nc) => (Some(nc.clone()), NetworkSource::Template),
            None => (None, NetworkSource::None),
        },
    };

    // Template keys, then the entry's extras, then ours — ours always win.
    let mut meta = templates.meta_data.clone();
    if let Some((_, e)) = entry {
        meta.extend(e.meta_data.clone());
    }
    meta.insert("instance-id".into(), Value::String(instance_id.clone()));
    meta.insert("local-hostname".into(), Value::String(hostname.clone()));

    Ok(RenderedSeed {
        instance_id,
        hostname,
        hostname_source,
        matched,
        network_source,
        user_data_kind: templates.user_data_kind,
        user_data: templates.user_data.clone(),
        meta_data: to_json_bytes(&Value::Object(meta)),
        network_config,
    })
}

/// Where the seed landed, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "placement", rename_all = "kebab-case")]
pub enum SeedPlacement {
    /// A `CIDATA` partition on the disk.
    CidataPartition {
        /// The disk.
        disk: PathBuf,
        /// GPT partition number.
        partition_number: u32,
        /// GPT partition GUID (`PARTUUID`).
        partition_guid: String,
        /// First sector.
        first_lba: u64,
        /// Last sector.
        last_lba: u64,
        /// Logical sector size.
        sector_size: u32,
        /// The image already had a `CIDATA` partition, which was reformatted and reused.
        reused: bool,
    },
    /// A folder on the mounted root filesystem.
    Directory {
        /// The folder.
        path: PathBuf,
    },
}

/// A partition GUID derived from the instance-id: stable for one install (the report and the
/// disk agree), different across installs, and no random source needed in PID 1.
fn partition_guid(instance_id: &str) -> uuid::Uuid {
    let d = Sha256::digest(format!("imprint cidata {instance_id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// The `CIDATA` seed partition for a disk of `disk_size` bytes whose final partition table
/// starts from `table` (the image's): a write-engine [`Addition`] whose content — a FAT
/// filesystem labelled `CIDATA` holding the rendered files — is built and checked in memory.
/// The engine writes it, reads it back and commits its entry with the rest of the table.
///
/// The partition takes the last [`CIDATA_SIZE`] bytes of usable space (1-MiB aligned), with
/// the first free entry number: the image's entries are neither moved nor renumbered. A
/// `CIDATA` partition the image already has is reformatted and reused. `disk` names the disk
/// in errors and in the placement.
pub fn cidata_addition(
    table: &GptTable,
    disk_size: u64,
    disk: &Path,
    rendered: &RenderedSeed,
) -> Result<(Addition, SeedPlacement), SeedError> {
    let sector_size = table.sector_size();
    let ss = u64::from(sector_size);
    let layout = |reason: String| SeedError::Layout {
        disk: disk.to_path_buf(),
        reason,
    };
    let payload: u64 = rendered.files().iter().map(|(_, d)| d.len() as u64).sum();
    // FAT metadata and cluster slack take well under 1 MiB of the partition.
    if payload > CIDATA_SIZE - MIB {
        return Err(SeedError::TooLarge {
            size: payload,
            capacity: CIDATA_SIZE - MIB,
        });
    }
    let last_usable = table
        .last_usable_on(disk_size)
        .map_err(|e| layout(e.to_string()))?;
    let (number, entry, reused) = match table.find_by_name(CIDATA_LABEL) {
        Some((n, p)) => {
            if (p.last_lba + 1 - p.first_lba) * ss < MIB {
                return Err(layout(format!(
                    "the image's own CIDATA partition {n} is smaller than 1 MiB"
                )));
            }
            (n, p, true)
        }
        None => {
            let size_lba = CIDATA_SIZE / ss;
            let align = MIB / ss;
            let first = (last_usable + 1)
                .checked_sub(size_lba)
                .map(|f| f / align * align)
                .ok_or_else(|| layout("disk too small for the seed partition".into()))?;
            let used_end = table.last_used_lba();
            if first <= used_end || first < table.header().first_usable {
                return Err(layout(format!(
                    "no {} MiB free at the end of the disk: the last partition ends at sector \
                     {used_end}, usable space ends at {last_usable}",
                    CIDATA_SIZE / MIB
                )));
            }
            let number = table
                .free_slot()
                .ok_or_else(|| layout("the partition table has no free entry".into()))?;
            let entry = GptPartition {
                part_type_guid: partition_types::BASIC,
                part_guid: partition_guid(&rendered.instance_id),
                first_lba: first,
                last_lba: last_usable,
                flags: 0,
                name: CIDATA_LABEL.to_string(),
            };
            (number, entry, false)
        }
    };
    let len = (entry.last_lba + 1 - entry.first_lba) * ss;
    let content = cidata_filesystem(len, sector_size, &entry, rendered)
        .map_err(|e| layout(format!("building the FAT filesystem: {e}")))?;
    let placement = SeedPlacement::CidataPartition {
        disk: disk.to_path_buf(),
        partition_number: number,
        partition_guid: entry.part_guid.to_string(),
        first_lba: entry.first_lba,
        last_lba: entry.last_lba,
        sector_size,
        reused,
    };
    Ok((
        Addition {
            what: format!("the {CIDATA_LABEL} seed partition"),
            number,
            entry,
            content,
        },
        placement,
    ))
}

/// A zeroed `len`-byte FAT filesystem labelled `CIDATA` holding the rendered files, read
/// back from memory and compared before it is returned.
fn cidata_filesystem(
    len: u64,
    sector_size: u32,
    entry: &GptPartition,
    rendered: &RenderedSeed,
) -> io::Result<Vec<u8>> {
    // Zeroed throughout: stale signatures (an old ext4 superblock in FAT's reserved sectors)
    // would make blkid see two filesystems and report no label.
    let mut disk = io::Cursor::new(vec![0u8; len as usize]);
    let mut label = [b' '; 11];
    label[..CIDATA_LABEL.len()].copy_from_slice(CIDATA_LABEL.as_bytes());
    let mut id = [0u8; 4];
    id.copy_from_slice(&entry.part_guid.as_bytes()[..4]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(u32::from_le_bytes(id))
            .bytes_per_sector(sector_size as u16),
    )?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        for (name, data) in rendered.files() {
            let mut f = fs.root_dir().create_file(name)?;
            f.truncate()?;
            f.write_all(data)?;
            f.flush()?;
        }
        fs.unmount()?;
    }
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        if fs.volume_label() != CIDATA_LABEL {
            return Err(io::Error::other("the volume label did not read back"));
        }
        for (name, want) in rendered.files() {
            let mut got = Vec::new();
            fs.root_dir().open_file(name)?.read_to_end(&mut got)?;
            compare(name, want, &got).map_err(|r| io::Error::other(format!("{name}: {r}")))?;
        }
    }
    Ok(disk.into_inner())
}

/// The FAT volume serial the seed partition gets, as firmware and GRUB show it
/// (`XXXX-XXXX`): GRUB's `search --fs-uuid` finds the installed disk by it.
pub fn cidata_volume_serial(partition_guid: &uuid::Uuid) -> String {
    let b = partition_guid.as_bytes();
    let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    format!("{:04X}-{:04X}", id >> 16, id & 0xffff)
}

fn compare(_name: &str, want: &[u8], got: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} bytes instead of {}", got.len(), want.len()));
    }
    match want.iter().zip(got).position(|(a, b)| a != b) {
        Some(at) => Err(format!("first difference at byte {at}")),
        None => Ok(()),
    }
}

/// Writes the seed into `dir` (the root filesystem's `var/lib/cloud/seed/nocloud`, see
/// [`ROOTFS_SEED_DIR`]; the appliance mounts), creating it, with files readable by root only
/// (user-data may hold secrets), synced, and read back.
pub fn inject_into_dir(dir: &Path, rendered: &RenderedSeed) -> Result<SeedPlacement, SeedError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |path: &Path, step: &'static str| {
        let path = path.to_path_buf();
        move |source| SeedError::Io { path, step, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io(dir, "creating"))?;
    for (name, data) in rendered.files() {
        let path = dir.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path, "creating"))?;
        // An existing file keeps its mode on open; set it explicitly.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io(&path, "setting permissions of"))?;
        f.write_all(data).map_err(io(&path, "writing"))?;
        f.sync_all().map_err(io(&path, "syncing"))?;
        // Best effort: the read-back below should come from the device, not the cache.
        let _ = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing"))?;
    verify_dir(dir, rendered)?;
    Ok(SeedPlacement::Directory {
        path: dir.to_path_buf(),
    })
}

/// Reads the seed files back from `dir` and compares them with `rendered`.
pub fn verify_dir(dir: &Path, rendered: &RenderedSeed) -> Result<(), SeedError> {
    for (name, want) in rendered.files() {
        let path = dir.join(name);
        let got = fs::read(&path).map_err(|source| SeedError::Io {
            path: path.clone(),
            step: "reading back",
            source,
        })?;
        compare(name, want, &got).map_err(|reason| SeedError::ReadBack {
            location: dir.to_path_buf(),
            file: name.to_string(),
            reason,
        })?;
    }
    Ok(())
}

/// Picks the root partition for `root-filesystem` placement from the installed disk's GPT
/// (as read by the `gpt` crate): by number or name if configured, else the only "Linux root
/// (x86-64)" partition, else the only "Linux filesystem" partition. Never guesses between two.
pub fn pick_root_partition(
    parts: &BTreeMap<u32, GptPartition>,
    sel: &RootPartition,
) -> Result<u32, SeedError> {
    let err = |reason: String| SeedError::RootPartition { reason };
    let used = || parts.iter().filter(|(_, p)| p.is_used());
    if let Some(n) = sel.number {
        return match parts.get(&n) {
            Some(p) if p.is_used() => match &sel.label {
                Some(l) if p.name != *l => Err(err(format!(
                    "partition {n} is named {:?}, not {l:?}",
                    p.name
                ))),
                _ => Ok(n),
            },
            _ => Err(err(format!("the image has no partition {n}"))),
        };
    }
    if let Some(l) = &sel.label {
        let hits: Vec<u32> = used()
            .filter(|(_, p)| p.name == *l)
            .map(|(n, _)| *n)
            .collect();
        return match hits.as_slice() {
            [n] => Ok(*n),
            [] => Err(err(format!("no partition is named {l:?}"))),
            many => Err(err(format!("partitions {many:?} are all named {l:?}"))),
        };
    }
    for ty in [partition_types::LINUX_ROOT_X64, partition_types::LINUX_FS] {
        let hits: Vec<u32> = used()
            .filter(|(_, p)| p.part_type_guid.guid == ty.guid)
            .map(|(n, _)| *n)
            .collect();
        match hits.as_slice() {
            [n] => return Ok(*n),
            [] => continue,
            many => {
                return Err(err(format!(
                    "partitions {many:?} all have type {}; set seed.root_partition.number",
                    ty.guid
                )))
            }
        }
    }
    Err(err(
        "no Linux root or Linux filesystem partition; set seed.root_partition.number".into(),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::machine::{Dmi, Nic};

    fn identity() -> MachineIdentity {
        MachineIdentity {
            dmi: Dmi {
                sys_vendor: Some("Intel(R) Client Systems".into()),
                product_name: Some("NUC11TNHi5".into()),
                product_serial: Some("BTTN1234ABCD".into()),
                product_uuid: Some("8C1F3A2E-0000-1111-2222-333344445555".into()),
                board_serial: None,
            },
            nics: vec![
                Nic {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:00:00:01".parse().unwrap(),
                    wireless: false,
                },
                Nic {
                    name: "wlan0".into(),
                    mac: "aa:bb:cc:00:00:02".parse().unwrap(),
                    wireless: true,
                },
            ],
        }
    }

    fn templates() -> SeedTemplates {
        SeedTemplates {
            user_data: b"#cloud-config\npassword: hunter2\nchpasswd: {expire: false}\n".to_vec(),
            user_data_kind: UserDataKind::CloudConfig,
            meta_data: Map::from_iter([("region".to_string(), json!("lab"))]),
            network_config: Some(b"version: 2\nethernets: {}\n".to_vec()),
        }
    }

    fn seed_config(machines: &str) -> SeedConfig {
        Config::from_json(&format!(r#"{{"seed": {{"machines": {machines}}}}}"#))
            .unwrap()
            .seed
    }

    fn meta(r: &RenderedSeed) -> Value {
        serde_json::from_slice(&r.meta_data).unwrap()
    }

    #[test]
    fn table_hit_by_mac_renders_static_network() {
        let cfg = seed_config(
            r#"[{"mac": "AA-BB-CC-00-00-02", "hostname": "nuc-kitchen",
                 "network": {"address": "192.168.1.54/24", "gateway": "192.168.1.1",
                             "dns": ["192.168.1.1", "1.1.1.1"], "search": ["lab"]},
                 "meta_data": {"public-keys": ["ssh-ed25519 AAAA"]}},
                {"dmi_serial": "OTHER", "hostname": "other"}]"#,
        );
        let r = render(&templates(), &cfg, &identity(), "20261125-abc").unwrap();
        assert_eq!(r.hostname, "nuc-kitchen");
        assert_eq!(r.instance_id, "imprint-20261125-abc");
        assert_eq!(
            r.matched,
            MachineMatch::Mac {
                entry: 0,
                mac: "aa:bb:cc:00:00:02".parse().unwrap()
            }
        );
        let m = meta(&r);
        assert_eq!(m["instance-id"], "imprint-20261125-abc");
        assert_eq!(m["local-hostname"], "nuc-kitchen");
        assert_eq!(m["region"], "lab");
        assert_eq!(m["public-keys"][0], "ssh-ed25519 AAAA");
        let nc: Value = serde_json::from_slice(r.network_config.as_ref().unwrap()).unwrap();
        let eth = &nc["ethernets"]["lan0"];
        assert_eq!(nc["version"], 2);
        // The entry's key MAC is the interface configured.
        assert_eq!(eth["match"]["macaddress"], "aa:bb:cc:00:00:02");
        assert_eq!(eth["addresses"][0], "192.168.1.54/24");
        assert_eq!(eth["gateway4"], "192.168.1.1");
        assert!(eth.get("routes").is_none());
        assert_eq!(eth["nameservers"]["addresses"][1], "1.1.1.1");
        assert_eq!(eth["nameservers"]["search"][0], "lab");
        assert!(matches!(
            r.network_source,
            NetworkSource::TableStatic { .. }
        ));
    }

    #[test]
    fn table_hit_by_dmi_serial_uses_primary_nic_and_raw_config() {
        let cfg = seed_config(
            r#"[{"dmi_serial": "bttn1234abcd", "hostname": "nuc-02",
                 "network": {"address": "10.0.0.2/8"}}]"#,
        );
        let r = render(&templates(), &cfg, &identity(), "x").unwrap();
        assert_eq!(r.hostname, "nuc-02");
        assert_eq!(r.matched, MachineMatch::DmiSerial { entry: 0 });
        let nc: Value = serde_json::from_slice(r.network_config.as_ref().unwrap()).unwrap();
        // Keyed by serial without an interface: the first wired NIC.
        assert_eq!(
            nc["ethernets"]["lan0"]["match"]["macaddress"],
            "aa:bb:cc:00:00:01"
        );
        assert!(nc["ethernets"]["lan0"].get("routes").is_none());

        let cfg = seed_config(
            r#"[{"dmi_uuid": "8c1f3a2e-0000-1111-2222-333344445555", "hostname": "nuc-03",
                 "network_config": {"version": 2, "ethernets": {"e": {"dhcp4": true}}}}]"#,
        );
        let r = render(&templates(), &cfg, &identity(), "x").unwrap();
        assert_eq!(r.matched, MachineMatch::DmiUuid { entry: 0 });
        assert_eq!(r.network_source, NetworkSource::TableNetworkConfig);
        let nc: Value = serde_json::from_slice(r.network_config.as_ref().unwrap()).unwrap();
        assert_eq!(nc["ethernets"]["e"]["dhcp4"], true);
    }

    #[test]
    fn fallback_pattern_and_template_network() {
        let cfg = seed_config(r#"[{"mac": "00:11:22:33:44:55", "hostname": "elsewhere"}]"#);
        let r = render(&templates(), &cfg, &identity(), "x").unwrap();
        assert_eq!(r.hostname, "nuc-bttn1234abcd");
        assert_eq!(
            r.matched,
            MachineMatch::Pattern {
                pattern: "nuc-{serial}".into()
            }
        );
        assert_eq!(r.network_source, NetworkSource::Template);
        assert_eq!(
            r.network_config.as_deref(),
            Some(&b"version: 2\nethernets: {}\n"[..])
        );

        // No real serial: {serial} falls back to the primary MAC.
        let mut id = identity();
        id.dmi.product_serial = Some("To Be Filled By O.E.M.".into());
        assert_eq!(
            expand_hostname("nuc-{serial}", &id).unwrap(),
            "nuc-aabbcc000001"
        );
        assert_eq!(expand_hostname("lab-{mac6}", &id).unwrap(), "lab-000001");
        assert_eq!(
            expand_hostname("{uuid}", &id).unwrap(),
            "8c1f3a2e-0000-1111-2222-333344445555"
        );
        id.nics.clear();
        assert!(expand_hostname("nuc-{serial}", &id).is_err());
        assert!(expand_hostname("nuc-{mac}", &id).is_err());
    }

    #[test]
    fn hostname_precedence_never_fails() {
        let mut t = templates();
        t.meta_data
            .insert("local-hostname".into(), Value::String("from-seed".into()));
        // A bare machine: no DMI serial, no NIC.
        let mut bare = identity();
        bare.dmi.product_serial = None;
        bare.dmi.board_serial = None;
        bare.dmi.product_uuid = None;
        bare.nics.clear();
        let cfg = seed_config("[]");
        // 1. The machines entry wins over everything.
        let hit = seed_config(r#"[{"mac": "aa:bb:cc:00:00:01", "hostname": "nuc-01"}]"#);
        let r = render(&t, &hit, &identity(), "x").unwrap();
        assert_eq!(r.hostname, "nuc-01");
        assert_eq!(
            r.hostname_source,
            HostnameSource::MachinesEntry { entry: 0 }
        );
        // 2. A pattern the config sets wins over the seed's own name...
        let mut pat = cfg.clone();
        pat.hostname_pattern = "lab-{mac6}".into();
        let r = render(&t, &pat, &identity(), "x").unwrap();
        assert_eq!(r.hostname, "lab-000001");
        // ...unless it cannot be expanded here: then 3., the seed's meta-data.
        let r = render(&t, &pat, &bare, "x").unwrap();
        assert_eq!(r.hostname, "from-seed");
        assert_eq!(r.hostname_source, HostnameSource::SeedMetaData);
        let meta: Value = serde_json::from_slice(&r.meta_data).unwrap();
        assert_eq!(meta["local-hostname"], "from-seed");
        // 3. over 4.: the seed's name beats the default pattern.
        let r = render(&t, &cfg, &identity(), "x").unwrap();
        assert_eq!(r.hostname, "from-seed");
        // 4. The default pattern without a seed name.
        let r = render(&templates(), &cfg, &identity(), "x").unwrap();
        assert_eq!(r.hostname, "nuc-bttn1234abcd");
        assert!(matches!(
            r.hostname_source,
            HostnameSource::DefaultPattern { .. }
        ));
        // 5. Nothing at all: the target disk's serial, or the install id before a disk.
        let r = render_for_disk(&templates(), &cfg, &bare, "x1", Some("S4EW NX0R_12")).unwrap();
        assert_eq!(r.hostname, "imprint-s4ew-nx0r-12");
        assert!(matches!(r.hostname_source, HostnameSource::Fallback { .. }));
        let r = render(&templates(), &cfg, &bare, "20261201-abc").unwrap();
        assert_eq!(r.hostname, "imprint-20261201-abc");
        check_hostname(&r.hostname).unwrap();
    }

    #[test]
    fn strict_fleets_refuse_unknown_machines() {
        let config = |unknown: &str, machines: &str| {
            Config::from_json(&format!(
                r#"{{"unknown_machines": "{unknown}", "seed": {{"machines": {machines}}}}}"#
            ))
            .unwrap()
        };
        let other = r#"[{"mac": "00:11:22:33:44:55", "hostname": "elsewhere"}]"#;
        // Default (allow): an unknown machine is written, with the pattern hostname.
        assert_eq!(
            Config::from_json("{}").unwrap().unknown_machines,
            crate::config::UnknownMachines::Allow
        );
        assert_eq!(
            check_known_machine(&config("allow", other), &identity()).unwrap(),
            None
        );
        // Refuse: the error names every key the operator could add.
        let e = check_known_machine(&config("refuse", other), &identity()).unwrap_err();
        assert!(matches!(e, SeedError::UnknownMachine { .. }));
        assert_eq!(
            e.to_string(),
            "this machine is not in seed.machines and unknown_machines is \"refuse\": nothing \
             is written to it. To install it, add an entry keyed by \"mac\" (one of \
             aa:bb:cc:00:00:01, aa:bb:cc:00:00:02) or \"dmi_serial\": \"BTTN1234ABCD\" or \
             \"dmi_uuid\": \"8C1F3A2E-0000-1111-2222-333344445555\""
        );
        // Known machines pass in both modes, by any key.
        for m in [
            r#"[{"mac": "00:11:22:33:44:55", "hostname": "x"}, {"mac": "AA-BB-CC-00-00-02", "hostname": "nuc-01"}]"#,
            r#"[{"mac": "00:11:22:33:44:55", "hostname": "x"}, {"dmi_serial": " bttn1234abcd ", "hostname": "nuc-01"}]"#,
            r#"[{"mac": "00:11:22:33:44:55", "hostname": "x"}, {"dmi_uuid": "8c1f3a2e-0000-1111-2222-333344445555", "hostname": "nuc-01"}]"#,
        ] {
            assert_eq!(
                check_known_machine(&config("refuse", m), &identity()).unwrap(),
                Some(1),
                "{m}"
            );
        }
        // Two entries for one machine stay an error, never a guess.
        let two = r#"[{"mac": "aa:bb:cc:00:00:01", "hostname": "a"}, {"dmi_serial": "BTTN1234ABCD", "hostname": "b"}]"#;
        assert!(matches!(
            check_known_machine(&config("allow", two), &identity()),
            Err(SeedError::AmbiguousMachine { .. })
        ));
        // Firmware strings are escaped in the message.
        let mut id = identity();
        id.dmi.product_serial = Some("X\u{1b}[2J".into());
        let e = check_known_machine(&config("refuse", other), &id)
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains('\u{1b}') && e.contains(r#""X\u{1b}[2J""#),
            "{e}"
        );
    }

    #[test]
    fn two_matching_entries_are_an_error() {
        let cfg = seed_config(
            r#"[{"mac": "aa:bb:cc:00:00:01", "hostname": "a"},
                {"dmi_serial": "BTTN1234ABCD", "hostname": "b"}]"#,
        );
        let e = render(&templates(), &cfg, &identity(), "x").unwrap_err();
        assert!(matches!(e, SeedError::AmbiguousMachine { .. }));
        let msg = e.to_string();
        assert!(msg.contains("[0]") && msg.contains("[1]"), "{msg}");
    }

    #[test]
    fn static_interface_must_exist() {
        let cfg = seed_config(
            r#"[{"dmi_serial": "BTTN1234ABCD", "hostname": "a",
                 "network": {"address": "10.0.0.2/8", "interface": "de:ad:be:ef:00:01"}}]"#,
        );
        let e = render(&templates(), &cfg, &identity(), "x").unwrap_err();
        assert!(e.to_string().contains("not a NIC of this machine"), "{e}");
    }

    #[test]
    fn bad_install_id_rejected() {
        let cfg = seed_config("[]");
        for id in ["", "a b", "x/y"] {
            assert!(render(&templates(), &cfg, &identity(), id).is_err(), "{id}");
        }
    }

    #[test]
    fn summary_never_contains_contents() {
        let mut t = templates();
        t.network_config = Some(
            b"version: 2\nwifis:\n  w:\n    access-points:\n      x: {password: wifisecret}\n"
                .to_vec(),
        );
        let r = render(&t, &seed_config("[]"), &identity(), "x").unwrap();
        let s = serde_json::to_string(&r.summary()).unwrap();
        assert!(!s.contains("hunter2"), "{s}");
        assert!(!s.contains("wifisecret"), "{s}");
        assert!(!s.contains("chpasswd"), "{s}");
        let ud = r.summary().files.into_iter().next().unwrap();
        assert_eq!(ud.name, "user-data");
        assert_eq!(ud.size, t.user_data.len() as u64);
        assert_eq!(ud.sha256, sha256_hex(&t.user_data));
        assert_eq!(ud.sha256.len(), 64);
        assert!(s.contains("\"user_data_kind\":\"cloud-config\""), "{s}");
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn seed_dir_validation() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Empty folder: an empty cloud-config, no meta-data keys, no network-config.
        let t = validate_seed_dir(d).unwrap();
        assert_eq!(t.user_data_kind, UserDataKind::Empty);
        assert!(t.user_data.starts_with(b"#cloud-config"));
        assert!(t.network_config.is_none());

        write(d, USER_DATA, "#!/bin/sh\necho hi\n");
        write(
            d,
            META_DATA,
            "# comment\ninstance-id: old\nlocal-hostname: 'x'\ncloud_name: \"lab\"\n",
        );
        write(
            d,
            NETWORK_CONFIG,
            "network:\n  version: 2\n  ethernets: {}\n",
        );
        let t = validate_seed_dir(d).unwrap();
        assert_eq!(t.user_data_kind, UserDataKind::Script);
        assert_eq!(t.meta_data["cloud_name"], "lab");
        assert_eq!(t.meta_data["local-hostname"], "x");
        // Ours win over the template's instance-id.
        let r = render(&t, &seed_config("[]"), &identity(), "new").unwrap();
        assert_eq!(meta(&r)["instance-id"], "imprint-new");

        write(d, META_DATA, r#"{"public-keys": ["k"]}"#);
        assert_eq!(
            validate_seed_dir(d).unwrap().meta_data["public-keys"][0],
            "k"
        );

        for (file, text, needle) in [
            (USER_DATA, "hello\n", "#cloud-config"),
            (META_DATA, "public-keys:\n  - ssh-ed25519 AAAA\n", "JSON"),
            (META_DATA, "just text\n", "key: value"),
            (
                META_DATA,
                "[1]",
                if cfg!(feature = "seed-schema") {
                    ":1:1: meta-data is a list"
                } else {
                    "line 1"
                },
            ),
            (NETWORK_CONFIG, "ethernets: {}\n", "version"),
            (NETWORK_CONFIG, "version: 2\n\tethernets: {}\n", "tab"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), file, text);
            let e = validate_seed_dir(dir.path()).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(file), "{msg}");
            assert!(msg.contains(needle), "{file} {text:?}: {msg}");
        }
        for ok in [
            "## template: jinja\n#cloud-config\n",
            "Content-Type: multipart/mixed; boundary=\"X\"\nMIME-Version: 1.0\n",
        ] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), USER_DATA, ok);
            validate_seed_dir(dir.path()).unwrap();
        }
        assert!(validate_seed_dir(&d.join("missing")).is_err());
    }

    #[test]
    fn misnamed_seed_files_are_refused() {
        for (name, meant) in [
            ("userdata", USER_DATA),
            ("user-data.yaml", USER_DATA),
            ("User_Data.yml", USER_DATA),
            ("cloud-config.yaml", USER_DATA),
            ("metadata", META_DATA),
            ("meta_data.json", META_DATA),
            ("network_config", NETWORK_CONFIG),
            ("network-config.yaml", NETWORK_CONFIG),
            // Not found by cloud-init on a case-sensitive file system.
            ("USER-DATA", USER_DATA),
        ] {
            let dir = tempfile::tempdir().unwrap();
            // Even next to a correct file: the misnamed one would be silently left out.
            write(dir.path(), USER_DATA, "#cloud-config\n");
            write(dir.path(), name, "#cloud-config\n");
            let e = validate_seed_dir(dir.path()).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "{}:1:1: cloud-init ignores a file of this name: did you mean {meant}? \
                     (rename it to exactly {meant})",
                    dir.path().join(name).display()
                )
            );
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "vendor-data", "#cloud-config\n");
        let e = validate_seed_dir(dir.path()).unwrap_err().to_string();
        assert!(e.ends_with("vendor-data:1:1: imprint carries only user-data, meta-data and network-config: put these settings into user-data"), "{e}");
        // Other files (notes, backups) are left alone.
        let dir = tempfile::tempdir().unwrap();
        for name in ["README.md", "user-data.bak", "notes.txt"] {
            write(dir.path(), name, "x");
        }
        write(dir.path(), USER_DATA, "#cloud-config\n");
        validate_seed_dir(dir.path()).unwrap();
    }

    #[test]
    fn an_empty_seed_folder_is_refused_at_build_time() {
        let dir = tempfile::tempdir().unwrap();
        // The appliance accepts it (the defaults are a complete seed) …
        validate_seed_dir(dir.path()).unwrap();
        // … but a build with an empty --seed folder almost always names the wrong folder.
        write(dir.path(), "README.md", "notes");
        let e = check_seed_dir_for_build(dir.path())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}: the seed folder holds no user-data, meta-data or network-config: put your \
                 #cloud-config in user-data there, or leave out --seed to build without a seed",
                dir.path().display()
            )
        );
        write(dir.path(), META_DATA, "instance-id: x\n");
        check_seed_dir_for_build(dir.path()).unwrap();
    }

    #[cfg(feature = "seed-schema")]
    #[test]
    fn seed_dir_schema_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            USER_DATA,
            "\u{feff}#cloud-config\nusers:\n  - name: ops\n    lock_passwd: maybe\n    sudo: 5\n",
        );
        let e = validate_seed_dir(d).unwrap_err();
        let SeedError::Check { problems } = &e else {
            panic!("{e:?}")
        };
        let ud = d.join(USER_DATA);
        assert_eq!(
            problems
                .iter()
                .map(|p| (p.path.clone(), p.line, p.column, p.key_path.as_str()))
                .collect::<Vec<_>>(),
            [
                (ud.clone(), 4, 18, "users[0].lock_passwd"),
                (ud.clone(), 5, 11, "users[0].sudo")
            ]
        );
        assert_eq!(
            e.to_string().lines().next().unwrap(),
            format!(
                "{}:4:18: users[0].lock_passwd: expected boolean, found text",
                ud.display()
            )
        );
        // Scripts, templates and multipart archives are not YAML: not parsed.
        write(
            d,
            USER_DATA,
            "## template: jinja\n#cloud-config\nhostname: {{ v1.x }}\n",
        );
        validate_seed_dir(d).unwrap();
        write(d, USER_DATA, "#cloud-config\n");
        write(d, NETWORK_CONFIG, "version: 2\nethernet: {}\n");
        let e = validate_seed_dir(d).unwrap_err().to_string();
        assert!(
            e.contains("network-config:2:1: ethernet: unknown key"),
            "{e}"
        );
        fs::remove_file(d.join(NETWORK_CONFIG)).unwrap();
        write(d, META_DATA, "instance-id: [a\n");
        let e = validate_seed_dir(d).unwrap_err().to_string();
        assert!(e.contains("meta-data:2:1: not valid YAML"), "{e}");
    }

    /// A sparse disk image with a GPT like an installed OS's: an ESP and a root partition,
    /// numbered 1 and 15 (as Ubuntu's images are), backup header at the end.
    fn disk_image(
        sector: u32,
        size: u64,
    ) -> (tempfile::NamedTempFile, BTreeMap<u32, GptPartition>) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(size).unwrap();
        let lb = gpt::disk::LogicalBlockSize::try_from(u64::from(sector)).unwrap();
        let ss = u64::from(sector);
        let mut g = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(lb)
            .create_from_device(tmp.reopen().unwrap(), None)
            .unwrap();
        let mib = MIB / ss;
        g.add_partition_at("EFI", 15, mib, 32 * mib, partition_types::EFI, 0)
            .unwrap();
        g.add_partition_at("root", 1, 33 * mib, 64 * mib, partition_types::LINUX_FS, 0)
            .unwrap();
        let parts = g.partitions().clone();
        g.write().unwrap();
        // The crate renumbers on write (15 becomes 2); put the ESP entry back into slot 15
        // so the test disk has a gap, like real images do, and fix the CRCs.
        let mut f = tmp.reopen().unwrap();
        let h = gpt::GptConfig::new()
            .logical_block_size(lb)
            .open_from_device(&mut f)
            .unwrap();
        let (mut p, mut b) = (
            h.primary_header().unwrap().clone(),
            h.backup_header().unwrap().clone(),
        );
        drop(h);
        for start in [p.part_start, b.part_start] {
            GptPartition::zero()
                .write_to_device(&mut f, 1, start, lb, 128)
                .unwrap();
            parts[&15]
                .write_to_device(&mut f, 14, start, lb, 128)
                .unwrap();
        }
        b.write_backup(&mut f, lb).unwrap();
        p.write_primary(&mut f, lb).unwrap();
        (tmp, parts)
    }

    /// Puts `a` and the final table onto the disk file the way the write engine's commit does.
    fn apply(img: &Path, table: &GptTable, a: &Addition) {
        let mut disk = fs::read(img).unwrap();
        let ss = u64::from(table.sector_size());
        let o = (a.entry.first_lba * ss) as usize;
        disk[o..o + a.content.len()].copy_from_slice(&a.content);
        let mut t = table.clone();
        t.set_entry(a.number, &a.entry).unwrap();
        let l = t.lay_out(disk.len() as u64, &disk[..ss as usize]).unwrap();
        disk[..l.primary_region.len()].copy_from_slice(&l.primary_region);
        let o = l.backup_offset as usize;
        disk[o..o + l.backup_region.len()].copy_from_slice(&l.backup_region);
        fs::write(img, disk).unwrap();
    }

    fn read_table(img: &Path, sector: u32) -> GptTable {
        GptTable::read(&mut File::open(img).unwrap(), sector).unwrap()
    }

    fn inject_and_check(sector: u32) {
        let (img, before) = disk_image(sector, 256 * MIB);
        assert!(before.contains_key(&15));
        let cfg = seed_config(
            r#"[{"mac": "aa:bb:cc:00:00:01", "hostname": "nuc-01",
                 "network": {"address": "192.168.1.54/24", "gateway": "192.168.1.1"}}]"#,
        );
        let r = render(&templates(), &cfg, &identity(), "t1").unwrap();
        let table = read_table(img.path(), sector);
        let (a, placement) = cidata_addition(&table, 256 * MIB, img.path(), &r).unwrap();
        let SeedPlacement::CidataPartition {
            partition_number,
            first_lba,
            last_lba,
            reused,
            ..
        } = placement.clone()
        else {
            panic!("{placement:?}")
        };
        let ss = u64::from(sector);
        assert!(!reused);
        // The first free slot; the existing 1 and 15 keep their numbers and places.
        assert_eq!(partition_number, 2);
        assert_eq!((first_lba * ss) % MIB, 0);
        assert!((last_lba + 1 - first_lba) * ss >= CIDATA_SIZE);
        apply(img.path(), &table, &a);

        // Independent read-back with gpt + fatfs.
        let lb = gpt::disk::LogicalBlockSize::try_from(ss).unwrap();
        let g = gpt::GptConfig::new()
            .logical_block_size(lb)
            .only_valid_headers(true)
            .open(img.path())
            .unwrap();
        let parts = g.partitions();
        assert_eq!(parts[&1], before[&1]);
        assert_eq!(parts[&15], before[&15]);
        let p = &parts[&2];
        assert_eq!(p.name, "CIDATA");
        assert_eq!(p.last_lba, g.header().last_usable);
        let mut f = File::open(img.path()).unwrap();
        let mut buf = vec![0u8; ((p.last_lba + 1 - p.first_lba) * ss) as usize];
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(p.first_lba * ss)).unwrap();
        f.read_exact(&mut buf).unwrap();
        let fs = fatfs::FileSystem::new(io::Cursor::new(buf), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("CIDATA")
        );
        let serial = cidata_volume_serial(&p.part_guid);
        assert_eq!(
            format!(
                "{:04X}-{:04X}",
                fs.volume_id() >> 16,
                fs.volume_id() & 0xffff
            ),
            serial
        );
        let read = |name: &str| {
            let mut v = Vec::new();
            fs.root_dir()
                .open_file(name)
                .unwrap()
                .read_to_end(&mut v)
                .unwrap();
            v
        };
        assert_eq!(read("user-data"), r.user_data);
        assert_eq!(read("meta-data"), r.meta_data);
        assert_eq!(read("network-config"), r.network_config.clone().unwrap());
        drop(fs);

        // An image that already carries a CIDATA partition: it is reused, not duplicated.
        let r2 = render(&templates(), &cfg, &identity(), "t2").unwrap();
        let table = read_table(img.path(), sector);
        let (a2, again) = cidata_addition(&table, 256 * MIB, img.path(), &r2).unwrap();
        let SeedPlacement::CidataPartition {
            partition_number: n2,
            reused: reused2,
            ..
        } = again
        else {
            panic!()
        };
        assert!(reused2);
        assert_eq!(n2, 2);
        assert_eq!(a2.entry, parts[&2]);
    }

    #[test]
    fn cidata_addition_512() {
        inject_and_check(512);
    }

    #[test]
    fn cidata_addition_4096() {
        inject_and_check(4096);
    }

    #[test]
    fn cidata_addition_refuses_a_full_disk_and_an_oversized_seed() {
        // Root fills the disk to its last usable sector: no room.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(64 * MIB).unwrap();
        let mut g = gpt::GptConfig::new()
            .writable(true)
            .create_from_device(tmp.reopen().unwrap(), None)
            .unwrap();
        let last = g.header().last_usable;
        g.add_partition_at(
            "root",
            1,
            2048,
            last - 2048 + 1,
            partition_types::LINUX_FS,
            0,
        )
        .unwrap();
        g.write().unwrap();
        let r = render(&templates(), &seed_config("[]"), &identity(), "t").unwrap();
        let table = read_table(tmp.path(), 512);
        let e = cidata_addition(&table, 64 * MIB, tmp.path(), &r).unwrap_err();
        assert!(e.to_string().contains("no 8 MiB free"), "{e}");
        // The same image on a disk 16 MiB larger has room.
        assert!(cidata_addition(&table, 80 * MIB, tmp.path(), &r).is_ok());
        // A seed larger than the partition.
        let mut big = r.clone();
        big.user_data = vec![b'#'; (CIDATA_SIZE) as usize];
        let e = cidata_addition(&table, 80 * MIB, tmp.path(), &big).unwrap_err();
        assert!(matches!(e, SeedError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn inject_into_dir_writes_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(ROOTFS_SEED_DIR);
        let r = render(&templates(), &seed_config("[]"), &identity(), "t").unwrap();
        let p = inject_into_dir(&target, &r).unwrap();
        assert_eq!(
            p,
            SeedPlacement::Directory {
                path: target.clone()
            }
        );
        assert_eq!(fs::read(target.join(USER_DATA)).unwrap(), r.user_data);
        let mode = fs::metadata(target.join(USER_DATA))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn root_partition_pick() {
        let (_img, parts) = disk_image(512, 128 * MIB);
        assert_eq!(
            pick_root_partition(&parts, &RootPartition::default()).unwrap(),
            1
        );
        let by_label = RootPartition {
            label: Some("EFI".into()),
            number: None,
        };
        assert_eq!(pick_root_partition(&parts, &by_label).unwrap(), 15);
        let missing = RootPartition {
            number: Some(3),
            label: None,
        };
        assert!(pick_root_partition(&parts, &missing).is_err());
    }
}

/// Property tests: any bytes as seed files are accepted or refused with an error naming the
/// file — never a panic (PID 1 reads the seed from a stick anyone may have edited).
/// `PROPTEST_CASES=100000` runs them longer.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::test_util::proptest_cases(128), ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_seed_files_never_panic(
            user in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2048)),
            meta in proptest::option::of("[ -~\n\t:{}\\[\\]\"]{0,400}"),
            net in proptest::option::of("(version: [0-9]\n)?[ -~\n:{}\\[\\]\"]{0,400}"),
        ) {
            let dir = tempfile::tempdir().unwrap();
            if let Some(u) = &user {
                fs::write(dir.path().join(USER_DATA), u).unwrap();
            }
            if let Some(m) = &meta {
                fs::write(dir.path().join(META_DATA), m).unwrap();
            }
            if let Some(n) = &net {
                fs::write(dir.path().join(NETWORK_CONFIG), n).unwrap();
            }
            if let Ok(t) = validate_seed_dir(dir.path()) {
                // Whatever passed is copied byte for byte.
                if let Some(u) = &user {
                    prop_assert_eq!(&t.user_data, u);
                }
            }
        }
    }
}
