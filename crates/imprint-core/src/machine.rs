//! The machine's identity as firmware and kernel report it: DMI strings
//! (`/sys/class/dmi/id/`) and the MAC addresses of its physical network interfaces
//! (`/sys/class/net/`). The seed uses it to find the machine in the config's `machines` table,
//! and it goes into the report so an operator can tell which NUC a report came from.
//!
//! The `/sys` root is a parameter so tests read fake trees.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet MAC address. Parsed case-insensitively with `:` or `-` separators (or none),
/// displayed as lower-case `aa:bb:cc:dd:ee:ff` — the form cloud-init and netplan expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a MAC address (expected six hex pairs like aa:bb:cc:dd:ee:ff)")]
pub struct MacParseError {
    /// The rejected text.
    pub input: String,
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError {
            input: s.to_string(),
        };
        let trimmed = s.trim();
        // Accept one consistent separator (or none): "aa:bb…", "AA-BB…", "aabb…".
        let hex: String = if trimmed.contains(':') || trimmed.contains('-') {
            let sep = if trimmed.contains(':') { ':' } else { '-' };
            let parts: Vec<&str> = trimmed.split(sep).collect();
            if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                return Err(err());
            }
            parts.concat()
        } else {
            trimmed.to_string()
        };
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl MacAddr {
    /// The twelve hex digits without separators, lower case (`{mac}` in hostname patterns).
    pub fn compact(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// All-zero addresses are what some NICs report before their firmware loaded.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// DMI strings from `/sys/class/dmi/id/`. Each is `None` when the file is missing, unreadable
/// or empty; values are trimmed but otherwise as the firmware wrote them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dmi {
    /// `sys_vendor`, e.g. "Intel(R) Client Systems".
    pub sys_vendor: Option<String>,
    /// `product_name`, e.g. "NUC11TNHi5".
    pub product_name: Option<String>,
    /// `product_serial` (readable by root only).
    pub product_serial: Option<String>,
    /// `product_uuid` (readable by root only).
    pub product_uuid: Option<String>,
    /// `board_serial` (readable by root only).
    pub board_serial: Option<String>,
}

/// A physical network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Kernel name (`eth0`, `enp0s31f6`, `wlan0`).
    pub name: String,
    /// Its MAC address (`address`).
    pub mac: MacAddr,
    /// A wireless interface (`wireless/` or `phy80211` present).
    pub wireless: bool,
}

/// What identifies this machine: DMI strings and physical NICs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineIdentity {
    /// Firmware-reported identity.
    pub dmi: Dmi,
    /// Physical NICs, wired before wireless, then by name.
    pub nics: Vec<Nic>,
}

/// Reading the identity failed in a way that is not just "this file is absent".
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Listing `/sys/class/net` failed.
    #[error("listing network interfaces in {}", path.display())]
    ListNet {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// DMI serials that firmware vendors leave in place of a real one. Such a value identifies
/// nothing, so it neither matches a table entry nor names a host.
const PLACEHOLDER_SERIALS: &[&str] = &[
    "to be filled by o.e.m.",
    "default string",
    "system serial number",
    "not specified",
    "not applicable",
    "none",
    "n/a",
    "0",
    "00000000",
    "0123456789",
    "123456789",
];

/// Whether a DMI serial is a vendor placeholder rather than an identity.
pub fn is_placeholder_serial(s: &str) -> bool {
    let t = s.trim().to_ascii_lowercase();
    t.is_empty()
        || PLACEHOLDER_SERIALS.contains(&t.as_str())
        || t.bytes().all(|b| b == b'0' || b == b'-' || b == b' ')
        || t.bytes().all(|b| b == b'f' || b == b'-')
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let t = s.trim().trim_matches('\0').trim();
    (!t.is_empty()).then(|| t.to_string())
}

impl MachineIdentity {
    /// Reads DMI and NICs below `sys_root` (normally `/sys`). Missing DMI files are `None`
    /// (VMs and some boards lack them); a NIC without a parseable or non-zero MAC is skipped.
    pub fn read(sys_root: &Path) -> Result<MachineIdentity, MachineError> {
        let dmi_dir = sys_root.join("class/dmi/id");
        let dmi = Dmi {
            sys_vendor: read_trimmed(&dmi_dir.join("sys_vendor")),
            product_name: read_trimmed(&dmi_dir.join("product_name")),
            product_serial: read_trimmed(&dmi_dir.join("product_serial")),
            product_uuid: read_trimmed(&dmi_dir.join("product_uuid")),
            board_serial: read_trimmed(&dmi_dir.join("board_serial")),
        };

        let net_dir = sys_root.join("class/net");
        let mut nics = Vec::new();
        let entries = match fs::read_dir(&net_dir) {
            Ok(e) => e,
            // A kernel without networking has no class/net: no NICs, not an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(MachineIdentity { dmi, nics });
            }
            Err(source) => {
                return Err(MachineError::ListNet {
                    path: net_dir,
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| MachineError::ListNet {
                path: net_dir.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            // Virtual interfaces (lo, bridges, veth, tun) have no `device` link: they do not
            // identify the hardware.
            if name == "lo" || !dir.join("device").exists() {
                continue;
            }
            let Some(mac) = read_trimmed(&dir.join("address")).and_then(|a| a.parse().ok()) else {
                continue;
            };
            let mac: MacAddr = mac;
            if mac.is_zero() {
                continue;
            }
            let wireless = dir.join("wireless").exists() || dir.join("phy80211").exists();
            nics.push(Nic {
                name,
                mac,
                wireless,
            });
        }
        nics.sort_by(|a, b| (a.wireless, &a.name).cmp(&(b.wireless, &b.name)));
        Ok(MachineIdentity { dmi, nics })
    }

    /// The DMI product serial if it is a real one, else the board serial if that is.
    pub fn serial(&self) -> Option<&str> {
        [&self.dmi.product_serial, &self.dmi.board_serial]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .find(|s| !is_placeholder_serial(s))
    }

    /// The DMI product UUID unless it is a placeholder (all zeros or all ones).
    pub fn uuid(&self) -> Option<&str> {
        self.dmi
            .product_uuid
            .as_deref()
            .filter(|u| !is_placeholder_serial(u))
    }

    /// The first wired NIC's MAC (the one an operator reads off the DHCP lease or the label),
    /// or the first wireless one's.
    pub fn primary_mac(&self) -> Option<MacAddr> {
        self.nics.first().map(|n| n.mac)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn mac_parse_forms() {
        let want = MacAddr([0xaa, 0xbb, 0xcc, 0x01, 0x02, 0x0f]);
        for s in [
            "aa:bb:cc:01:02:0f",
            "AA-BB-CC-01-02-0F",
            "aabbcc01020F",
            " aa:bb:cc:01:02:0f\n",
        ] {
            assert_eq!(s.parse::<MacAddr>().unwrap(), want, "{s}");
        }
        for bad in [
            "aa:bb:cc:01:02",
            "aa:bb-cc:01:02:0f",
            "gg:bb:cc:01:02:0f",
            "a:bb:cc:01:02:0ff",
            "",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(want.to_string(), "aa:bb:cc:01:02:0f");
        assert_eq!(want.compact(), "aabbcc01020f");
    }

    #[test]
    fn placeholders() {
        assert!(is_placeholder_serial("To Be Filled By O.E.M."));
        assert!(is_placeholder_serial("  "));
        assert!(is_placeholder_serial(
            "00000000-0000-0000-0000-000000000000"
        ));
        assert!(!is_placeholder_serial("BTTN12345678"));
    }

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn reads_dmi_and_physical_nics() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path();
        write(
            &sys.join("class/dmi/id/sys_vendor"),
            "Intel(R) Client Systems\n",
        );
        write(&sys.join("class/dmi/id/product_name"), "NUC11TNHi5\n");
        write(&sys.join("class/dmi/id/product_serial"), "Default string\n");
        write(&sys.join("class/dmi/id/board_serial"), "BTTN1234\n");
        // Physical wired + wireless NICs, lo and a bridge without a device link.
        for (name, mac, dev, wireless) in [
            ("wlan0", "aa:00:00:00:00:02", true, true),
            ("eth0", "AA:00:00:00:00:01", true, false),
            ("lo", "00:00:00:00:00:00", false, false),
            ("br0", "aa:00:00:00:00:09", false, false),
        ] {
            let d = sys.join("devices/virtual/net").join(name);
            write(&d.join("address"), &format!("{mac}\n"));
            if dev {
                fs::create_dir_all(sys.join("devices/pci0000:00").join(name)).unwrap();
                symlink(sys.join("devices/pci0000:00").join(name), d.join("device")).unwrap();
            }
            if wireless {
                fs::create_dir_all(d.join("wireless")).unwrap();
            }
            fs::create_dir_all(sys.join("class/net")).unwrap();
            symlink(&d, sys.join("class/net").join(name)).unwrap();
        }
        let id = MachineIdentity::read(sys).unwrap();
        assert_eq!(id.dmi.product_name.as_deref(), Some("NUC11TNHi5"));
        assert_eq!(id.dmi.product_uuid, None);
        // The placeholder product serial is skipped in favour of the board serial.
        assert_eq!(id.serial(), Some("BTTN1234"));
        let names: Vec<_> = id.nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["eth0", "wlan0"]);
        assert_eq!(id.primary_mac().unwrap().to_string(), "aa:00:00:00:00:01");
        let json = serde_json::to_string(&id).unwrap();
        assert!(json.contains("\"mac\":\"aa:00:00:00:00:01\""), "{json}");
    }

    #[test]
    fn empty_sys_is_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let id = MachineIdentity::read(tmp.path()).unwrap();
        assert_eq!(id, MachineIdentity::default());
        assert_eq!(id.serial(), None);
    }
}
