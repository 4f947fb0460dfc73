//! The appliance configuration, `imprint/config.json` on the stick: which disk may be written
//! (target policy), whether to ask first, what to do afterwards, and the per-machine cloud-init
//! seed table (hostnames and static addresses keyed by MAC or DMI serial/UUID).
//!
//! Every field has a default, so an empty object `{}` (or no file at all) is a complete,
//! safe configuration. Unknown fields are errors, not silently ignored: a typo in a pin like
//! `"serail"` must stop the appliance, not widen the choice of disk. Errors name the line, the
//! column and the field path. The reference is `docs/config.md`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::discover::Transport;
use crate::machine::MacAddr;

/// The whole appliance configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which disk may become the target.
    pub target: TargetPolicy,
    /// Whether to ask on the console before writing.
    pub confirm: Confirm,
    /// Write again even when the chosen disk already holds exactly this image.
    pub reinstall: bool,
    /// What to do after a successful install.
    pub after: After,
    /// After a fatal error, power off after this many seconds instead of waiting forever
    /// for the operator. `None`: wait (the error stays on screen).
    pub fatal_poweroff_after_secs: Option<u64>,
    /// The cloud-init NoCloud seed.
    pub seed: SeedConfig,
    /// Refuse images that are not signed by a trusted key (see `docs/signing.md`).
    pub require_signature: bool,
    /// Minisign public keys (base64, the second line of a `.pub` file) trusted to sign
    /// images, in addition to the keys baked into the live image.
    pub trusted_keys: Vec<String>,
    /// What to do with a machine that has no entry in `seed.machines`.
    pub unknown_machines: UnknownMachines,
    /// Install (the default), or only take inventory.
    pub mode: Mode,
}

/// What a boot of the stick does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Install the image (the default).
    #[default]
    Install,
    /// Write nothing to any disk: record the machine's facts (DMI, MACs, disks, CPU, memory)
    /// as a report on the stick and power off. The stick's menu has an entry for it too
    /// (`imprint.mode=inventory` on the kernel command line).
    Inventory,
}

/// What the appliance does with a machine that is not in `seed.machines`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownMachines {
    /// Install it, with a hostname from `seed.hostname_pattern` and the template's network
    /// (the default: a lab where any NUC may be imaged).
    #[default]
    Allow,
    /// Write nothing to it: a strict fleet images only machines it knows.
    Refuse,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            target: TargetPolicy::default(),
            confirm: Confirm::IfNotEmpty,
            reinstall: false,
            after: After::Reboot,
            fatal_poweroff_after_secs: None,
            seed: SeedConfig::default(),
            require_signature: false,
            trusted_keys: Vec::new(),
            unknown_machines: UnknownMachines::Allow,
            mode: Mode::Install,
        }
    }
}

/// Which disks may be chosen. See `docs/target-selection.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetPolicy {
    /// Allowed transports, most preferred first. USB is never allowed.
    pub transports: Vec<Transport>,
    /// Only the disk with exactly this serial (surrounding spaces ignored).
    pub serial: Option<String>,
    /// Only the disk with exactly this WWID (`eui.…`, `naa.…`, `t10.…`; case-insensitive).
    pub wwid: Option<String>,
    /// Only disks whose model contains this text (case-insensitive).
    pub model: Option<String>,
    /// Only disks at least this large.
    pub min_size: Option<ByteSize>,
    /// Only disks at most this large.
    pub max_size: Option<ByteSize>,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        TargetPolicy {
            transports: vec![Transport::Nvme, Transport::Sata],
            serial: None,
            wwid: None,
            model: None,
            min_size: None,
            max_size: None,
        }
    }
}

impl TargetPolicy {
    /// Whether any pin (serial, WWID, model, size range) narrows the choice.
    pub fn is_pinned(&self) -> bool {
        self.serial.is_some()
            || self.wwid.is_some()
            || self.model.is_some()
            || self.min_size.is_some()
            || self.max_size.is_some()
    }
}

/// When to ask on the console before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Confirm {
    /// Never ask. The target policy alone protects data.
    Never,
    /// Always ask.
    Always,
    /// Ask only when the chosen disk holds anything (a partition table or a filesystem);
    /// a blank disk is written without a key press. The default: a new NUC needs no
    /// keyboard, a disk with data is never overwritten unattended.
    IfNotEmpty,
}

impl Confirm {
    /// Whether to ask, given whether the chosen disk holds data.
    pub fn required(self, disk_has_data: bool) -> bool {
        match self {
            Confirm::Never => false,
            Confirm::Always => true,
            Confirm::IfNotEmpty => disk_has_data,
        }
    }
}

/// What the appliance does after a successful install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum After {
    /// Reboot into the installed OS.
    Reboot,
    /// Power off (pull the stick, power on later).
    Poweroff,
    /// Stay on the summary screen.
    Wait,
}

/// The seed section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeedConfig {
    /// Where the seed lands on the installed disk.
    pub placement: Placement,
    /// For `root-filesystem` placement: which partition holds the root filesystem.
    pub root_partition: RootPartition,
    /// Hostname for machines not in `machines`. Placeholders: `{serial}`, `{mac}`, `{mac6}`,
    /// `{uuid}` (see `docs/config.md`).
    pub hostname_pattern: String,
    /// Per-machine entries.
    pub machines: Vec<MachineEntry>,
}

impl Default for SeedConfig {
    fn default() -> Self {
        SeedConfig {
            placement: Placement::CidataPartition,
            root_partition: RootPartition::default(),
            hostname_pattern: DEFAULT_HOSTNAME_PATTERN.to_string(),
            machines: Vec::new(),
        }
    }
}

/// Default `seed.hostname_pattern`.
pub const DEFAULT_HOSTNAME_PATTERN: &str = "nuc-{serial}";

/// Placeholders a hostname pattern may use.
pub const HOSTNAME_PLACEHOLDERS: &[&str] = &["serial", "mac", "mac6", "uuid"];

/// Where the seed lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// A small FAT partition labelled `CIDATA` at the end of the disk: works for any root
    /// filesystem and needs no mount.
    CidataPartition,
    /// `/var/lib/cloud/seed/nocloud/` on the installed root filesystem (needs a mount).
    RootFilesystem,
}

/// Selects the root partition for `root-filesystem` placement. With neither field set, the
/// only partition of type "Linux root (x86-64)", else the only "Linux filesystem" one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RootPartition {
    /// GPT partition number (1-based).
    pub number: Option<u32>,
    /// GPT partition name (`PARTLABEL`).
    pub label: Option<String>,
}

/// One machine in the seed table. Exactly one of `mac`, `dmi_serial`, `dmi_uuid` is the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineEntry {
    /// The MAC of any of the machine's NICs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The DMI product serial (or board serial), compared case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmi_serial: Option<String>,
    /// The DMI product UUID, compared case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmi_uuid: Option<String>,
    /// The machine's hostname (`local-hostname`).
    pub hostname: String,
    /// A static address in a simple form, rendered to network-config v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<StaticNetwork>,
    /// A complete cloud-init network-config (version 2), used as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<serde_json::Value>,
    /// Extra meta-data keys (e.g. `public-keys`); `instance-id` and `local-hostname` are ours.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta_data: serde_json::Map<String, serde_json::Value>,
    /// Free text for the operator (JSON has no comments). Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The simple static network form: one interface, one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNetwork {
    /// Address with prefix length, e.g. `192.168.1.54/24` or `2001:db8::54/64`.
    pub address: Cidr,
    /// Default gateway (same address family as `address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// DNS search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// The NIC to configure, by MAC. Default: the entry's `mac`, else the machine's first
    /// wired NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<MacAddr>,
}

/// An IP address with a prefix length (`192.168.1.54/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("{s:?} is not an address/prefix like 192.168.1.54/24: {why}");
        let (addr, prefix) = s.split_once('/').ok_or_else(|| bad("missing /prefix"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("bad address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix == 0 || prefix > max {
            return Err(bad(&format!("prefix length must be 1..={max}")));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// Whether a machine at `addr` can reach the gateway `gw` directly: in its subnet, an IPv6
/// link-local router (the usual IPv6 default route), or an on-link gateway with a /31 or /32
/// (some hosting networks).
fn gateway_reachable(addr: &Cidr, gw: IpAddr) -> bool {
    let link_local_v6 = matches!(gw, IpAddr::V6(g) if g.segments()[0] & 0xffc0 == 0xfe80);
    let point_to_point_v4 = addr.addr.is_ipv4() && addr.prefix >= 31;
    addr.contains(gw) || link_local_v6 || point_to_point_v4
}

impl Cidr {
    fn mask(&self) -> u128 {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        let host = bits - u32::from(self.prefix);
        (!0u128).checked_shl(host).unwrap_or(0) & (!0u128 >> (128 - bits))
    }

    fn bits(addr: IpAddr) -> u128 {
        match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// Whether `ip` is in this address's subnet (same family, same network bits).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Cidr::bits(ip) & self.mask() == Cidr::bits(self.addr) & self.mask()
    }

    /// For IPv4 with room for hosts (prefix up to /30): `Some("network")` or
    /// `Some("broadcast")` when the address is its subnet's network or broadcast address.
    pub fn reserved_host(&self) -> Option<&'static str> {
        if !self.addr.is_ipv4() || self.prefix > 30 {
            return None;
        }
        let host = Cidr::bits(self.addr) & !self.mask() & 0xffff_ffff;
        if host == 0 {
            Some("network")
        } else if host == !self.mask() & 0xffff_ffff {
            Some("broadcast")
        } else {
            None
        }
    }

    /// The subnet, e.g. `192.168.1.0/24` for `192.168.1.54/24`.
    pub fn network(&self) -> Cidr {
        let n = Cidr::bits(self.addr) & self.mask();
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(n as u32)),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(n)),
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A size in bytes. In JSON: a number of bytes, or a string with a unit: `K`, `M`, `G`, `T`
/// (and `KiB`…`TiB`) are powers of 1024; `KB`, `MB`, `GB`, `TB` are powers of 1000, as disk
/// vendors count (`"256GB"` is 256 000 000 000 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{s:?} is not a size: use bytes, or a whole number with K/M/G/T (powers of 1024) \
                 or KB/MB/GB/TB (powers of 1000), e.g. \"200G\" or \"256GB\""
            )
        };
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        let num: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KIB" => 1 << 10,
            "M" | "MIB" => 1 << 20,
            "G" | "GIB" => 1 << 30,
            "T" | "TIB" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        num.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"200G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// One problem found by validation, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Field path, e.g. `seed.machines[2].mac`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Loading or checking the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file failed.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The JSON is malformed or a field has the wrong name, type or value.
    #[error("line {line}, column {column}: {field}: {message}")]
    Parse {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Field path (`target.transports[1]`; `.` for the top level).
        field: String,
        /// serde's message, e.g. "unknown field `serail`, expected one of …".
        message: String,
    },
    /// Well-formed, but inconsistent (duplicate keys, min > max, USB transport, …).
    #[error("{} problem(s): {}", issues.len(), issues.iter().map(Issue::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// Every problem found, not only the first.
        issues: Vec<Issue>,
    },
    /// A parse or validation error in a file; the message carries the file's name.
    #[error("{}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        error: Box<ConfigError>,
    },
}

impl Config {
    /// Parses and validates a configuration.
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        // Editors on Windows save UTF-8 with a byte-order mark; JSON parsers do not expect one.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // serde maps a JSON array onto a struct's fields by position: `[]` or `[true]` would be
        // taken as a configuration. Only an object is one.
        if let Some((i, _)) = text
            .char_indices()
            .find(|(_, c)| !c.is_ascii_whitespace())
            .filter(|(_, c)| *c == '[')
        {
            let line = text[..i].matches('\n').count() + 1;
            let column = i - text[..i].rfind('\n').map_or(0, |n| n + 1) + 1;
            return Err(ConfigError::Parse {
                line,
                column,
                field: ".".to_string(),
                message: "the configuration must be a JSON object ({ ... }), not an array".into(),
            });
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Parse {
                line: inner.line(),
                column: inner.column(),
                field,
                message: strip_position(&inner.to_string()),
            }
        })?;
        // Trailing garbage after the object is an error too.
        de.end().map_err(|e| ConfigError::Parse {
            line: e.line(),
            column: e.column(),
            field: ".".to_string(),
            message: strip_position(&e.to_string()),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::input::read_bounded_string(path, crate::input::limits::CONFIG).map_err(
            |source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            },
        )?;
        Config::from_json(&text).map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// Like [`Config::load`], but a missing file is the default configuration (a stick without
    /// `imprint/config.json` installs with the defaults). Any other read error is an error.
    pub fn load_or_default(path: &Path) -> Result<Config, ConfigError> {
        match Config::load(path) {
            Err(ConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(Config::default())
            }
            other => other,
        }
    }

    /// Checks what serde cannot: consistency across fields and entries.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Vec::new();
        let mut issue = |field: String, message: String| issues.push(Issue { field, message });

        let t = &self.target;
        if t.transports.is_empty() {
            issue(
                "target.transports".into(),
                "empty: no disk could ever be chosen; use e.g. [\"nvme\", \"sata\"]".into(),
            );
        }
        for (i, tr) in t.transports.iter().enumerate() {
            if *tr == Transport::Usb {
                issue(
                    format!("target.transports[{i}]"),
                    "usb is never a target: the provisioning stick is a USB disk, and so is \
                     every disk an operator might leave plugged in"
                        .into(),
                );
            }
            if t.transports[..i].contains(tr) {
                issue(
                    format!("target.transports[{i}]"),
                    format!("{tr} listed twice"),
                );
            }
        }
        if let (Some(min), Some(max)) = (t.min_size, t.max_size) {
            if min > max {
                issue(
                    "target.min_size".into(),
                    format!("{} is larger than target.max_size {}", min.0, max.0),
                );
            }
        }
        for (name, v) in [
            ("serial", &t.serial),
            ("wwid", &t.wwid),
            ("model", &t.model),
        ] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                issue(
                    format!("target.{name}"),
                    "empty string: remove the field to not pin".into(),
                );
            }
        }
        if self.fatal_poweroff_after_secs == Some(0) {
            issue(
                "fatal_poweroff_after_secs".into(),
                "0 would hide the error; use at least a few seconds, or remove the field to wait"
                    .into(),
            );
        }

        for (i, k) in self.trusted_keys.iter().enumerate() {
            let field = format!("trusted_keys[{i}]");
            match crate::signature::TrustedKey::from_base64(k, &field) {
                Err(crate::signature::SignatureError::BadKey { reason, .. }) => {
                    issue(field, reason)
                }
                Err(e) => issue(field, e.to_string()),
                Ok(key) => {
                    if let Some(first) = self.trusted_keys[..i]
                        .iter()
                        .position(|o| o.trim() == k.trim())
                    {
                        issue(
                            field,
                            format!("key {} is also trusted_keys[{first}]", key.id()),
                        );
                    }
                }
            }
        }

        let s = &self.seed;
        if self.unknown_machines == UnknownMachines::Refuse && s.machines.is_empty() {
            issue(
                "unknown_machines".into(),
                "\"refuse\" with an empty seed.machines table would refuse every machine: \
                 add the machines (`imprint reports --machines` makes the table from inventory \
                 reports)"
                    .into(),
            );
        }
        if let Err(m) = check_hostname_pattern(&s.hostname_pattern) {
            issue("seed.hostname_pattern".into(), m);
        }
        if s.root_partition.number == Some(0) {
            issue(
                "seed.root_partition.number".into(),
                "partition numbers start at 1".into(),
            );
        }
        // Where each key, hostname and address was first seen, to name both ends of a clash.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, m) in s.machines.iter().enumerate() {
            let at = |f: &str| format!("seed.machines[{i}].{f}");
            let keys: Vec<(&str, String)> = [
                ("mac", m.mac.map(|x| x.to_string())),
                (
                    "dmi_serial",
                    m.dmi_serial.as_ref().map(|x| x.trim().to_ascii_lowercase()),
                ),
                (
                    "dmi_uuid",
                    m.dmi_uuid.as_ref().map(|x| x.trim().to_ascii_lowercase()),
                ),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            match keys.len() {
                0 => issue(
                    format!("seed.machines[{i}]"),
                    "no key: give exactly one of mac, dmi_serial, dmi_uuid".into(),
                ),
                1 => {}
                _ => issue(
                    format!("seed.machines[{i}]"),
                    "more than one key: give exactly one of mac, dmi_serial, dmi_uuid".into(),
                ),
            }
            if m.mac.is_some_and(|mac| mac.is_zero()) {
                issue(at("mac"), "00:00:00:00:00:00 identifies no NIC".into());
            } else if let Some(mac) = m.mac.filter(|mac| mac.0[0] & 1 == 1) {
                // The I/G bit: broadcast and multicast addresses are never a NIC's own.
                issue(
                    at("mac"),
                    format!(
                        "{mac} is a {} address, never a NIC's own: this entry can never match \
                         (copy the MAC from the machine's screen or inventory report)",
                        if mac.0 == [0xff; 6] {
                            "broadcast"
                        } else {
                            "multicast"
                        }
                    ),
                );
            }
            // (The entry's own `mac` is checked above.)
            for (field, mac) in [(
                "network.interface",
                m.network.as_ref().and_then(|n| n.interface),
            )] {
                // Bit 0 of the first octet marks group (multicast/broadcast) addresses: no
                // NIC has one as its own address.
                if let Some(mac) = mac.filter(|m| m.0[0] & 1 == 1) {
                    issue(
                        at(field),
                        format!("{mac} is a broadcast or multicast address, not a NIC's"),
                    );
                }
            }
            for (k, v) in &keys {
                if v.is_empty() || (*k != "mac" && crate::machine::is_placeholder_serial(v)) {
                    issue(
                        at(k),
                        format!("{v:?} identifies no machine (empty or a vendor placeholder)"),
                    );
                }
                if let Some(first) = seen.insert(format!("{k}={v}"), i) {
                    issue(
                        at(k),
                        format!("{v} is also the key of seed.machines[{first}]"),
                    );
                }
            }
            if let Err(msg) = check_hostname(&m.hostname) {
                issue(at("hostname"), msg);
            } else if let Some(first) =
                seen.insert(format!("hostname={}", m.hostname.to_ascii_lowercase()), i)
            {
                issue(
                    at("hostname"),
                    format!(
                        "{} is also the hostname of seed.machines[{first}]",
                        m.hostname
                    ),
                );
            }
            if m.network.is_some() && m.network_config.is_some() {
                issue(
                    format!("seed.machines[{i}]"),
                    "both network and network_config: give one".into(),
                );
            }
            if let Some(n) = &m.network {
                if let Some(first) = seen.insert(format!("addr={}", n.address.addr), i) {
                    issue(
                        at("network.address"),
                        format!(
                            "{} is also the address of seed.machines[{first}]",
                            n.address.addr
                        ),
                    );
                }
                if let Some(what) = n.address.reserved_host() {
                    issue(
                        at("network.address"),
                        format!(
                            "{} is the {what} address of {}, not a host's: pick another \
                             address or check the /prefix",
                            n.address.addr,
                            n.address.network()
                        ),
                    );
                }
                for (j, domain) in n.search.iter().enumerate() {
                    if let Err(msg) = check_hostname(domain.strip_suffix('.').unwrap_or(domain)) {
                        issue(
                            at(&format!("network.search[{j}]")),
                            format!("not a DNS domain: {msg}"),
                        );
                    }
                }
                if let Some(gw) = n.gateway {
                    if gw.is_ipv4() != n.address.addr.is_ipv4() {
                        issue(
                            at("network.gateway"),
                            format!("{gw} is not the same address family as {}", n.address),
                        );
                    } else if gw == n.address.addr {
                        issue(
                            at("network.gateway"),
                            format!("{gw} is the machine's own address"),
                        );
                    } else if !gateway_reachable(&n.address, gw) {
                        issue(
                            at("network.gateway"),
                            format!(
                                "{gw} is outside the machine's subnet {}: the machine could not \
                                 reach it (check the address's /prefix)",
                                n.address.network()
                            ),
                        );
                    }
                }
            }
            if let Some(nc) = &m.network_config {
                let version = nc.get("version").and_then(serde_json::Value::as_u64);
                if !nc.is_object() || version != Some(2) {
                    issue(
                        at("network_config"),
                        "must be a cloud-init network-config object with \"version\": 2".into(),
                    );
                }
            }
            for reserved in ["instance-id", "local-hostname"] {
                if m.meta_data.contains_key(reserved) {
                    issue(
                        at("meta_data"),
                        format!("{reserved} is set by imprint; remove it here"),
                    );
                }
            }
        }

        if issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { issues })
        }
    }
}

/// serde_json appends " at line L column C" to its messages; we report those separately.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Checks a hostname against RFC 1123: dot-separated labels of letters, digits and hyphens,
/// 1–63 characters each, not starting or ending with a hyphen; 253 characters at most.
pub fn check_hostname(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err(format!("{h:?}: a hostname has 1 to 253 characters"));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{h:?}: each dot-separated part has 1 to 63 characters"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "{h:?}: only letters, digits, hyphens and dots are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{h:?}: a part may not start or end with a hyphen"));
        }
    }
    Ok(())
}

/// Checks a hostname pattern: known placeholders only, and the literal text valid in a
/// hostname (placeholders expand to lower-case letters, digits and hyphens).
pub fn check_hostname_pattern(p: &str) -> Result<(), String> {
    let mut literal = String::new();
    let mut rest = p;
    while let Some(open) = rest.find('{') {
        literal.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("{p:?}: unclosed '{{'"))?;
        let name = &rest[open + 1..open + close];
        if !HOSTNAME_PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "{p:?}: unknown placeholder {{{name}}}; known: {}",
                HOSTNAME_PLACEHOLDERS
                    .iter()
                    .map(|n| format!("{{{n}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        literal.push('x');
        rest = &rest[open + close + 1..];
    }
    literal.push_str(rest);
    if literal.contains('}') {
        return Err(format!("{p:?}: '}}' without '{{'"));
    }
    check_hostname(&literal)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn empty_object_is_the_default() {
        let c = Config::from_json("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.target.transports, [Transport::Nvme, Transport::Sata]);
        assert_eq!(c.confirm, Confirm::IfNotEmpty);
        assert_eq!(c.after, After::Reboot);
        assert!(!c.reinstall);
        assert_eq!(c.seed.placement, Placement::CidataPartition);
        // The default is itself valid.
        Config::default().validate().unwrap();
    }

    #[test]
    fn full_example_parses() {
        let text = r#"{
          "target": {"transports": ["sata", "nvme"], "serial": "S64DNX0T123456",
                     "min_size": "200G", "max_size": 2000000000000},
          "confirm": "never",
          "reinstall": true,
          "after": "poweroff",
          "fatal_poweroff_after_secs": 600,
          "seed": {
            "placement": "root-filesystem",
            "root_partition": {"label": "root"},
            "hostname_pattern": "lab-{mac6}",
            "machines": [
              {"mac": "AA-BB-CC-00-00-01", "hostname": "nuc-01",
               "network": {"address": "192.168.1.54/24", "gateway": "192.168.1.1",
                           "dns": ["1.1.1.1"], "search": ["lab"]}},
              {"dmi_serial": "BTTN1234", "hostname": "nuc-02",
               "network_config": {"version": 2, "ethernets": {}},
               "meta_data": {"public-keys": ["ssh-ed25519 AAAA"]}, "note": "rack 2"}
            ]
          }
        }"#;
        let c = Config::from_json(text).unwrap();
        assert_eq!(c.target.transports, [Transport::Sata, Transport::Nvme]);
        assert_eq!(c.target.min_size, Some(ByteSize(200 << 30)));
        assert_eq!(c.target.max_size, Some(ByteSize(2_000_000_000_000)));
        assert_eq!(c.confirm, Confirm::Never);
        assert_eq!(c.after, After::Poweroff);
        let m = &c.seed.machines[0];
        assert_eq!(m.mac.unwrap().to_string(), "aa:bb:cc:00:00:01");
        let n = m.network.as_ref().unwrap();
        assert_eq!(n.address.to_string(), "192.168.1.54/24");
        assert_eq!(n.address.prefix, 24);
        // Round trip through serde keeps it equal (the report embeds the config).
        let back = Config::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_field_names_line_column_and_field() {
        let text = "{\n  \"target\": {\n    \"serail\": \"X\"\n  }\n}";
        let e = Config::from_json(text).unwrap_err();
        let ConfigError::Parse {
            line,
            column,
            ref field,
            ref message,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(line, 3);
        assert!(column > 4, "{column}");
        assert!(field.starts_with("target"), "{field}");
        assert!(message.contains("unknown field `serail`"), "{message}");
        assert!(message.contains("`serial`"), "{message}");
        let shown = e.to_string();
        assert!(shown.starts_with("line 3, column"), "{shown}");
    }

    #[test]
    fn wrong_values_name_the_field() {
        for (text, field, needle) in [
            (r#"{"confirm": "sometimes"}"#, "confirm", "unknown variant"),
            (
                r#"{"target": {"min_size": "12X"}}"#,
                "target.min_size",
                "not a size",
            ),
            (
                r#"{"seed": {"machines": [{"mac": "zz", "hostname": "a"}]}}"#,
                "seed.machines[0].mac",
                "not a MAC",
            ),
            (
                r#"{"seed": {"machines": [{"mac": "aa:bb:cc:dd:ee:ff", "hostname": "a",
                    "network": {"address": "10.0.0.1"}}]}}"#,
                "seed.machines[0].network.address",
                "missing /prefix",
            ),
            (
                r#"{"target": {"transports": ["nvme", "floppy"]}}"#,
                "target.transports[1]",
                "unknown variant",
            ),
        ] {
            match Config::from_json(text) {
                Err(ConfigError::Parse {
                    field: f, message, ..
                }) => {
                    assert_eq!(f, field, "{text}");
                    assert!(message.contains(needle), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn trailing_garbage_rejected() {
        assert!(matches!(
            Config::from_json("{} x"),
            Err(ConfigError::Parse { .. })
        ));
    }

    fn issues(text: &str) -> Vec<Issue> {
        match Config::from_json(text) {
            Err(ConfigError::Invalid { issues }) => issues,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn validation_catches_inconsistencies() {
        let got = issues(
            r#"{"target": {"transports": ["nvme", "usb"], "min_size": "2T", "max_size": "1T"},
                "seed": {"hostname_pattern": "nuc-{serail}", "machines": [
                  {"mac": "aa:bb:cc:dd:ee:01", "hostname": "nuc-1",
                   "network": {"address": "10.0.0.5/24", "gateway": "fd00::1"}},
                  {"mac": "AA-BB-CC-DD-EE-01", "hostname": "nuc-1",
                   "network": {"address": "10.0.0.5/24"}},
                  {"dmi_serial": "To Be Filled By O.E.M.", "hostname": "bad_name"},
                  {"hostname": "nokey", "mac": "aa:bb:cc:dd:ee:03", "dmi_uuid": "x-1"}
                ]}}"#,
        );
        let fields: Vec<&str> = got.iter().map(|i| i.field.as_str()).collect();
        for want in [
            "target.transports[1]",
            "target.min_size",
            "seed.hostname_pattern",
            "seed.machines[0].network.gateway",
            "seed.machines[1].mac",
            "seed.machines[1].hostname",
            "seed.machines[1].network.address",
            "seed.machines[2].dmi_serial",
            "seed.machines[2].hostname",
            "seed.machines[3]",
        ] {
            assert!(fields.contains(&want), "missing {want} in {got:#?}");
        }
        let dup = got
            .iter()
            .find(|i| i.field == "seed.machines[1].mac")
            .unwrap();
        assert!(dup.message.contains("seed.machines[0]"), "{dup}");
    }

    #[test]
    fn signature_settings() {
        let c = Config::from_json("{}").unwrap();
        assert!(!c.require_signature);
        assert!(c.trusted_keys.is_empty());
        let (_, key, pub_text) = crate::signature::tests::keypair();
        let b64 = pub_text.lines().nth(1).unwrap();
        let c = Config::from_json(&format!(
            r#"{{"require_signature": true, "trusted_keys": ["{b64}"]}}"#
        ))
        .unwrap();
        assert!(c.require_signature);
        assert_eq!(c.trusted_keys, [b64]);
        // A key that does not parse is named; so is a key given twice.
        let got = issues(&format!(
            r#"{{"trusted_keys": ["{b64}", "RWQ-not-a-key", "{b64}"]}}"#
        ));
        assert_eq!(got.len(), 2, "{got:#?}");
        assert_eq!(got[0].field, "trusted_keys[1]");
        // Named by position, never echoed: a pasted secret key must not reach a log.
        assert!(!got[0].message.contains("RWQ-not-a-key"), "{}", got[0]);
        assert!(
            got[0].message.contains("not a minisign public key"),
            "{}",
            got[0]
        );
        assert_eq!(got[1].field, "trusted_keys[2]");
        assert!(got[1].message.contains(&key.id().to_string()), "{}", got[1]);
        // Not a typo-tolerant field either.
        assert!(matches!(
            Config::from_json(r#"{"require_signatures": true}"#),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn machines_entries_that_can_never_match() {
        let machines = |m: &str| format!(r#"{{"seed": {{"machines": [{m}]}}}}"#);
        // A malformed MAC: the parse error names line, column, entry index and field.
        let e = Config::from_json(&machines(r#"{"mac": "aa:bb:cc:00:00", "hostname": "a"}"#))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 1, column 47: seed.machines[0].mac: \"aa:bb:cc:00:00\" is not a MAC address \
             (expected six hex pairs like aa:bb:cc:dd:ee:ff)"
        );
        for (entry, field, needle) in [
            (
                r#"{"mac": "ff:ff:ff:ff:ff:ff", "hostname": "a"}"#,
                "seed.machines[1].mac",
                "ff:ff:ff:ff:ff:ff is a broadcast address, never a NIC's own",
            ),
            (
                r#"{"mac": "01:00:5e:00:00:01", "hostname": "a"}"#,
                "seed.machines[1].mac",
                "01:00:5e:00:00:01 is a multicast address, never a NIC's own",
            ),
            (
                r#"{"dmi_serial": "  ", "hostname": "a"}"#,
                "seed.machines[1].dmi_serial",
                "identifies no machine",
            ),
            (
                r#"{"mac": "02:00:00:00:00:09", "hostname": "a",
                    "network": {"address": "192.168.1.54/24", "gateway": "192.168.2.1"}}"#,
                "seed.machines[1].network.gateway",
                "192.168.2.1 is outside the machine's subnet 192.168.1.0/24",
            ),
            (
                r#"{"mac": "02:00:00:00:00:09", "hostname": "a",
                    "network": {"address": "2001:db8::54/64", "gateway": "2001:db9::1"}}"#,
                "seed.machines[1].network.gateway",
                "2001:db9::1 is outside the machine's subnet 2001:db8::/64",
            ),
            (
                r#"{"mac": "02:00:00:00:00:09", "hostname": "a",
                    "network": {"address": "192.168.1.255/24"}}"#,
                "seed.machines[1].network.address",
                "192.168.1.255 is the broadcast address of 192.168.1.0/24",
            ),
            (
                r#"{"mac": "02:00:00:00:00:09", "hostname": "a",
                    "network": {"address": "10.0.0.0/8"}}"#,
                "seed.machines[1].network.address",
                "10.0.0.0 is the network address of 10.0.0.0/8",
            ),
            (
                r#"{"mac": "02:00:00:00:00:09", "hostname": "a",
                    "network": {"address": "10.0.0.5/8", "search": ["lab.example", "bad domain"]}}"#,
                "seed.machines[1].network.search[1]",
                "not a DNS domain",
            ),
        ] {
            let text = machines(&format!(
                r#"{{"mac": "02:00:00:00:00:01", "hostname": "ok"}}, {entry}"#
            ));
            let found = issues(&text);
            assert_eq!(found.len(), 1, "{entry}: {found:?}");
            assert_eq!(found[0].field, field, "{entry}");
            assert!(found[0].message.contains(needle), "{entry}: {found:?}");
        }
        // Fine: a point-to-point /31 and a /32 have no network or broadcast address.
        for a in [
            "10.0.0.0/31",
            "10.0.0.1/31",
            "10.0.0.255/32",
            "2001:db8::/64",
        ] {
            Config::from_json(&machines(&format!(
                r#"{{"mac": "02:00:00:00:00:09", "hostname": "a", "network": {{"address": "{a}"}}}}"#
            )))
            .unwrap();
        }
        // Fine: a gateway inside the subnet, a locally administered MAC, a trailing-dot domain.
        Config::from_json(&machines(
            r#"{"mac": "02:00:00:00:00:09", "hostname": "a",
                "network": {"address": "10.1.2.3/8", "gateway": "10.255.0.1",
                            "search": ["lab.example."]}}"#,
        ))
        .unwrap();
    }

    #[test]
    fn refuse_needs_a_machines_table() {
        let found = issues(r#"{"unknown_machines": "refuse"}"#);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "unknown_machines");
        assert!(found[0].message.contains("would refuse every machine"));
        let e = Config::from_json(r#"{"unknown_machines": "deny"}"#).unwrap_err();
        assert!(
            e.to_string().contains("expected `allow` or `refuse`"),
            "{e}"
        );
    }

    #[test]
    fn byte_sizes() {
        for (s, v) in [
            ("512", 512),
            ("4K", 4096),
            ("200G", 200 << 30),
            ("200 GiB", 200 << 30),
            ("256GB", 256_000_000_000),
            ("1t", 1 << 40),
        ] {
            assert_eq!(s.parse::<ByteSize>().unwrap(), ByteSize(v), "{s}");
        }
        for s in ["", "G", "1.5G", "-1", "99999999999T"] {
            assert!(s.parse::<ByteSize>().is_err(), "{s}");
        }
    }

    #[test]
    fn hostname_rules() {
        check_hostname("nuc-01.lab").unwrap();
        assert!(check_hostname("-a").is_err());
        assert!(check_hostname("a_b").is_err());
        assert!(check_hostname(&"a".repeat(64)).is_err());
        check_hostname_pattern("nuc-{serial}").unwrap();
        check_hostname_pattern("{mac}").unwrap();
        assert!(check_hostname_pattern("nuc-{nope}").is_err());
        assert!(check_hostname_pattern("nuc-{serial").is_err());
        assert!(check_hostname_pattern("nuc}").is_err());
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        fs::write(&p, "{\"after\": \"explode\"}").unwrap();
        let msg = Config::load(&p).unwrap_err().to_string();
        assert!(msg.contains("config.json: line 1"), "{msg}");
        assert!(msg.contains("after"), "{msg}");
        let missing = Config::load(&dir.path().join("nope.json")).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }));
        assert_eq!(
            Config::load_or_default(&dir.path().join("nope.json")).unwrap(),
            Config::default()
        );
        // A broken file is still an error, not silently the default.
        assert!(Config::load_or_default(&p).is_err());
    }

    #[test]
    fn weak_network_entries_are_refused() {
        let cfg = |mac: &str, network: &str| {
            format!(
                r#"{{"seed": {{"machines": [{{"mac": "{mac}", "hostname": "n1", "network": {network}}}]}}}}"#
            )
        };
        let got = issues(&cfg(
            "ff:ff:ff:ff:ff:ff",
            r#"{"address": "192.168.1.54/24", "gateway": "10.0.0.1", "search": ["lab", "bad_domain!"]}"#,
        ));
        let text: Vec<String> = got.iter().map(|i| i.to_string()).collect();
        assert!(
            text.iter().any(|t| t.contains("seed.machines[0].mac")
                && t.contains("ff:ff:ff:ff:ff:ff is a broadcast address")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("10.0.0.1 is outside the machine's subnet 192.168.1.0/24")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|t| t.contains("network.search[1]")),
            "{text:#?}"
        );
        assert!(
            !text.iter().any(|t| t.contains("network.search[0]")),
            "{text:#?}"
        );
        assert_eq!(got.len(), 3, "{text:#?}");
        let got = issues(&cfg(
            "01:00:5e:00:00:01",
            r#"{"address": "192.168.1.255/24", "interface": "33:33:00:00:00:01"}"#,
        ));
        assert_eq!(got.len(), 3, "{got:#?}");
        // Good entries pass: an IPv6 link-local gateway, a /32 with an on-link gateway.
        for network in [
            r#"{"address": "2001:db8::54/64", "gateway": "fe80::1"}"#,
            r#"{"address": "203.0.113.9/32", "gateway": "172.31.1.1"}"#,
            r#"{"address": "192.168.1.54/24", "gateway": "192.168.1.1", "search": ["lab.example.com."]}"#,
        ] {
            let c = Config::from_json(&cfg("aa:bb:cc:00:00:01", network));
            assert!(c.is_ok(), "{network}: {c:?}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_accepted_and_an_array_is_not_a_config() {
        let c = Config::from_json("\u{feff}{\"require_signature\": true}").unwrap();
        assert!(c.require_signature);
        for text in ["[]", "  \n [true]"] {
            let e = Config::from_json(text).unwrap_err();
            assert!(
                e.to_string()
                    .contains("the configuration must be a JSON object ({ ... }), not an array"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_fifo_or_huge_config_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Config::load(&fifo).unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains("FIFO"), "{chain}");
        let big = t.path().join("big.json");
        fs::write(
            &big,
            vec![b' '; (crate::input::limits::CONFIG + 1) as usize],
        )
        .unwrap();
        let e = Config::load(&big).unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains("limit"), "{chain}");
    }
}

/// Property tests: any text is parsed into a valid configuration or refused with an error
/// carrying a position; never a panic. `PROPTEST_CASES=100000` runs them longer.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::test_util::proptest_cases(512), ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            if let Ok(c) = Config::from_json(&text) {
                prop_assert!(c.validate().is_ok());
            }
        }

        #[test]
        fn json_shaped_text_never_panics(
            text in r#"\u{feff}?[ \n]*[\[{]("[a-z_]{0,12}"|[:,\[\]{} 0-9.-]|true|false|null){0,40}"#,
        ) {
            match Config::from_json(&text) {
                Ok(c) => prop_assert!(c.validate().is_ok()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
