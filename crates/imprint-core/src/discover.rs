//! Disk discovery: every whole disk under `/sys/block`, with what the target policy needs to
//! decide on it (transport, size, sector sizes, identity, partitions, holders).
//!
//! The transport comes from the disk's RESOLVED sysfs path, never from `removable` or
//! `rotational`: USB SSDs report `removable=0`, and a USB-to-NVMe enclosure's disk is an `sdX`
//! whose path runs through `/usbN/`. USB is checked first so such a disk is never mistaken for
//! an internal one. The `/sys` root is a parameter so tests run against fake trees.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// NVMe over PCIe.
    Nvme,
    /// SATA (libata: the path has `/ataN/`).
    Sata,
    /// USB, including UAS: the provisioning stick and anything plugged in. Never a target.
    Usb,
    /// virtio-blk / virtio-scsi (virtual machines).
    Virtio,
    /// eMMC / SD (`mmcblk*`).
    Mmc,
    /// Anything else (SAS HBAs, RAID controllers, …).
    Other,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Nvme => "nvme",
            Transport::Sata => "sata",
            Transport::Usb => "usb",
            Transport::Virtio => "virtio",
            Transport::Mmc => "mmc",
            Transport::Other => "other",
        })
    }
}

/// A partition as `/sys` describes it. GPT type GUIDs are not in `/sys`; whoever needs them
/// reads the partition table from the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Kernel name (`nvme0n1p2`, `sda1`).
    pub name: String,
    /// Partition number (`partition`).
    pub number: u32,
    /// Start in bytes (`start` × 512).
    pub start: u64,
    /// Size in bytes (`size` × 512).
    pub size: u64,
    /// GPT partition name (`PARTNAME` in `uevent`), if any.
    pub label: Option<String>,
    /// Partition GUID (`PARTUUID` in `uevent`, Linux 6.1 and later), lower-case, if any.
    pub uuid: Option<String>,
    /// Devices built on this partition (dm, md).
    pub holders: Vec<String>,
}

/// A whole disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name (`nvme0n1`, `sda`).
    pub name: String,
    /// Device node (`/dev/NAME`).
    pub dev_path: PathBuf,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// How it is attached.
    pub transport: Transport,
    /// The resolved sysfs device path the transport was read from.
    pub sys_path: PathBuf,
    /// Size in bytes (`size` × 512, whatever the sector size).
    pub size: u64,
    /// Logical block (sector) size in bytes.
    pub logical_block_size: u32,
    /// Physical block size in bytes.
    pub physical_block_size: u32,
    /// Model string, trimmed.
    pub model: Option<String>,
    /// Serial number, trimmed.
    pub serial: Option<String>,
    /// World-wide identifier (`eui.…`, `naa.…`, `t10.…`).
    pub wwid: Option<String>,
    /// The kernel's `removable` flag (reported, never trusted for the decision).
    pub removable: bool,
    /// Behind an external-facing port: some ancestor device's `removable` attribute reads
    /// `removable` (Thunderbolt/USB4 PCIe tunnels, USB ports). Such a disk is never a target.
    pub external: bool,
    /// Read-only (`ro`).
    pub read_only: bool,
    /// Spinning disk (`queue/rotational`), for the operator's eyes only.
    pub rotational: bool,
    /// Partitions, by number.
    pub partitions: Vec<Partition>,
    /// Devices built on the whole disk (dm, md).
    pub holders: Vec<String>,
}

impl Disk {
    /// Whether `/sys` shows a partition on it: a sign of data, not proof of emptiness
    /// (a filesystem straight on the disk has no partitions).
    pub fn has_partitions(&self) -> bool {
        !self.partitions.is_empty()
    }

    /// Holders of the disk and of its partitions.
    pub fn all_holders(&self) -> Vec<&str> {
        self.holders
            .iter()
            .chain(self.partitions.iter().flat_map(|p| &p.holders))
            .map(String::as_str)
            .collect()
    }
}

/// Discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// `/sys/block` could not be listed.
    #[error("listing {}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A required attribute of a disk could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The attribute file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An attribute held something unexpected.
    #[error("{}: unexpected content {content:?}", path.display())]
    Parse {
        /// The attribute file.
        path: PathBuf,
        /// What it held.
        content: String,
    },
}

/// Device names that are never disks we could install to.
const SKIPPED_PREFIXES: &[&str] = &["loop", "ram", "zram", "dm-", "md", "sr", "nbd", "fd"];

fn read_opt(path: &Path) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_string())
}

fn read_req(path: &Path) -> Result<String, DiscoverError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| DiscoverError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read_num<T: std::str::FromStr>(path: &Path) -> Result<T, DiscoverError> {
    let s = read_req(path)?;
    s.parse().map_err(|_| DiscoverError::Parse {
        path: path.to_path_buf(),
        content: s,
    })
}

fn read_flag(path: &Path) -> bool {
    read_opt(path).as_deref() == Some("1")
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Classifies a disk by its name and resolved sysfs path. USB first: a USB bridge may front a
/// SATA or NVMe drive, and the bus it hangs off is what makes it removable.
pub fn classify(name: &str, resolved: &Path) -> Transport {
    let comps: Vec<String> = resolved
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let numbered = |prefix: &str| {
        comps.iter().any(|c| {
            c.strip_prefix(prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    if numbered("usb") {
        Transport::Usb
    } else if name.starts_with("nvme") || comps.iter().any(|c| c == "nvme") {
        Transport::Nvme
    } else if numbered("ata") {
        Transport::Sata
    } else if comps.iter().any(|c| c.starts_with("virtio")) {
        Transport::Virtio
    } else if name.starts_with("mmcblk") {
        Transport::Mmc
    } else {
        Transport::Other
    }
}

/// VPD page 0x80 (unit serial number): a 4-byte header, then the serial in ASCII.
fn vpd_serial(path: &Path) -> Option<String> {
    let raw = fs::read(path).ok()?;
    let body = raw.get(4..)?;
    let s = String::from_utf8_lossy(body);
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_string())
}

fn read_partition(disk_dir: &Path, name: &str) -> Result<Option<Partition>, DiscoverError> {
    let dir = disk_dir.join(name);
    if !dir.join("partition").exists() {
        return Ok(None);
    }
    let uevent = fs::read_to_string(dir.join("uevent")).unwrap_or_default();
    let var = |key: &str| {
        uevent
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    let label = var("PARTNAME");
    let uuid = var("PARTUUID").map(|u| u.to_ascii_lowercase());
    Ok(Some(Partition {
        name: name.to_string(),
        number: read_num(&dir.join("partition"))?,
        start: read_num::<u64>(&dir.join("start"))?.saturating_mul(512),
        size: read_num::<u64>(&dir.join("size"))?.saturating_mul(512),
        label,
        uuid,
        holders: list_names(&dir.join("holders")),
    }))
}

fn read_disk(sys_root: &Path, name: &str) -> Result<Disk, DiscoverError> {
    let link = sys_root.join("block").join(name);
    let resolved = fs::canonicalize(&link).map_err(|source| DiscoverError::Read {
        path: link.clone(),
        source,
    })?;
    let dir = link;
    let transport = classify(name, &resolved);

    let dev = read_req(&dir.join("dev"))?;
    let (major, minor) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| DiscoverError::Parse {
            path: dir.join("dev"),
            content: dev.clone(),
        })?;

    // NVMe: the namespace's `device` is the controller, which carries model and serial.
    // SCSI (sd): `device` is the SCSI device; libata emulates VPD page 0x80 for the serial.
    let device = dir.join("device");
    let model = read_opt(&device.join("model"));
    let serial = read_opt(&device.join("serial"))
        .or_else(|| vpd_serial(&device.join("vpd_pg80")))
        .or_else(|| read_opt(&dir.join("serial")));
    let wwid = read_opt(&dir.join("wwid")).or_else(|| read_opt(&device.join("wwid")));
    // USB bridges rarely answer VPD 0x80; the USB device (the ancestor with `idVendor`)
    // carries the serial the operator can match against the stick's label or `lsusb`.
    let sys_root = fs::canonicalize(sys_root).unwrap_or_else(|_| sys_root.to_path_buf());
    let ancestors = || {
        resolved
            .ancestors()
            .skip(1)
            .take_while(|p| p.starts_with(&sys_root))
    };
    // PCI and USB devices (not block devices, whose `removable` is 0/1) say "removable" when
    // they sit behind an external-facing port; an NVMe drive in a Thunderbolt enclosure looks
    // internal in every other respect.
    let external =
        ancestors().any(|p| read_opt(&p.join("removable")).as_deref() == Some("removable"));
    let serial = serial.or_else(|| {
        if transport != Transport::Usb {
            return None;
        }
        ancestors()
            .find(|p| p.join("idVendor").exists())
            .and_then(|p| read_opt(&p.join("serial")))
    });

    let mut partitions = Vec::new();
    for child in list_names(&dir) {
        if child.starts_with(name) {
            if let Some(p) = read_partition(&dir, &child)? {
                partitions.push(p);
            }
        }
    }
    partitions.sort_by_key(|p| p.number);

    Ok(Disk {
        name: name.to_string(),
        dev_path: PathBuf::from("/dev").join(name),
        major,
        minor,
        transport,
        sys_path: resolved,
        size: read_num::<u64>(&dir.join("size"))?.saturating_mul(512),
        logical_block_size: read_num(&dir.join("queue/logical_block_size"))?,
        physical_block_size: read_num(&dir.join("queue/physical_block_size"))?,
        model,
        serial,
        wwid,
        removable: read_flag(&dir.join("removable")),
        external,
        read_only: read_flag(&dir.join("ro")),
        rotational: read_flag(&dir.join("queue/rotational")),
        partitions,
        holders: list_names(&dir.join("holders")),
    })
}

/// Lists every whole disk under `sys_root/block`, sorted by name. Loop, RAM, zram, dm, md,
/// optical, nbd and floppy devices are skipped, and so are hidden NVMe multipath paths.
pub fn scan(sys_root: &Path) -> Result<Vec<Disk>, DiscoverError> {
    let block = sys_root.join("block");
    let rd = fs::read_dir(&block).map_err(|source| DiscoverError::List {
        path: block.clone(),
        source,
    })?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| DiscoverError::List {
            path: block.clone(),
            source,
        })?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let mut disks = Vec::new();
    for name in names {
        if SKIPPED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        // nvmeXcYnZ: one path of a multipath namespace; the kernel hides it, so do we.
        if read_flag(&block.join(&name).join("hidden")) {
            continue;
        }
        disks.push(read_disk(sys_root, &name)?);
    }
    Ok(disks)
}

/// Sizes for people ("8.0 GiB"), shared with the progress reports.
pub use crate::progress::human_bytes;

impl fmt::Display for Disk {
    /// One console line: name, transport, size, sector sizes, model, serial, partitions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut flags = Vec::new();
        if self.read_only {
            flags.push("ro".to_string());
        }
        if self.removable {
            flags.push("removable".to_string());
        }
        if self.external {
            flags.push("external".to_string());
        }
        let holders = self.all_holders();
        if !holders.is_empty() {
            flags.push(format!("held by {}", holders.join(",")));
        }
        write!(
            f,
            "{:<10} {:<6} {:>10} {:>9} {:<28} {:<20} {:>5}",
            self.name,
            self.transport.to_string(),
            human_bytes(self.size),
            format!("{}/{}", self.logical_block_size, self.physical_block_size),
            truncate(self.model.as_deref().unwrap_or("-"), 28),
            truncate(self.serial.as_deref().unwrap_or("-"), 20),
            self.partitions.len(),
        )?;
        if !flags.is_empty() {
            write!(f, "  [{}]", flags.join(", "))?;
        }
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// The console table: a header line, then one line per disk.
#[derive(Debug)]
pub struct DiskTable<'a>(pub &'a [Disk]);

impl fmt::Display for DiskTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:<6} {:>10} {:>9} {:<28} {:<20} {:>5}",
            "DISK", "BUS", "SIZE", "SECTOR", "MODEL", "SERIAL", "PARTS"
        )?;
        for d in self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Builds fake `/sys` trees shaped like the real one (whole-disk symlinks from `block/` into
/// `devices/…`), shared by the discover and select tests and (feature `test-util`) the
/// appliance's flow tests.
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
#[allow(clippy::unwrap_used, clippy::new_without_default, missing_docs)]
pub mod fixture {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    /// A fake disk to add to a [`FakeSys`].
    #[derive(Debug, Clone)]
    pub struct FakeDisk {
        pub name: String,
        /// Device directory relative to `sys/devices/`, ending in the disk's name.
        pub devpath: String,
        pub size: u64,
        pub lbs: u32,
        pub model: String,
        pub serial: String,
        pub wwid: Option<String>,
        pub removable: bool,
        pub ro: bool,
        /// (number, start bytes, size bytes, PARTNAME)
        pub partitions: Vec<(u32, u64, u64, Option<String>)>,
        pub holders: Vec<String>,
        /// Whether the serial sits in `device/serial` (NVMe) or VPD page 0x80 (ATA/SCSI).
        pub vpd_serial: bool,
        /// A USB disk: the serial sits on the USB device (`…/2-N/serial`), as with most
        /// bridges, and VPD page 0x80 is absent.
        pub usb: bool,
        /// The PCI device (second path component) sits behind an external-facing port.
        pub external_pci: bool,
    }

    const GIB: u64 = 1 << 30;

    impl FakeDisk {
        fn new(name: &str, devpath: String, size_gib: u64, serial: &str, vpd: bool) -> Self {
            FakeDisk {
                name: name.to_string(),
                devpath,
                size: size_gib * GIB,
                lbs: 512,
                model: format!("Model {name}"),
                serial: serial.to_string(),
                wwid: None,
                removable: false,
                ro: false,
                partitions: Vec::new(),
                holders: Vec::new(),
                vpd_serial: vpd,
                usb: false,
                external_pci: false,
            }
        }

        /// An NVMe namespace `nvmeNn1` on controller `nvmeN`.
        pub fn nvme(n: u32, size_gib: u64, serial: &str) -> Self {
            let name = format!("nvme{n}n1");
            let devpath = format!("pci0000:00/0000:00:0{}.0/nvme/nvme{n}/{name}", 4 + n);
            let mut d = Self::new(&name, devpath, size_gib, serial, false);
            d.wwid = Some(format!("eui.00000000000000{n:02}"));
            d
        }

        /// A SATA disk on port `ataN`.
        pub fn sata(name: &str, port: u32, size_gib: u64, serial: &str) -> Self {
            let devpath = format!(
                "pci0000:00/0000:00:1f.2/ata{port}/host{h}/target{h}:0:0/{h}:0:0:0/block/{name}",
                h = port - 1
            );
            let mut d = Self::new(name, devpath, size_gib, serial, true);
            d.wwid = Some(format!("naa.5000c500{port:08x}"));
            d
        }

        /// A USB mass-storage (or UAS) disk.
        pub fn usb(name: &str, size_gib: u64, serial: &str, removable: bool) -> Self {
            // One USB port and SCSI host per disk, so fake attributes never collide.
            let h = 6 + u32::from(name.bytes().last().unwrap_or(b'a') - b'a');
            let devpath = format!(
                "pci0000:00/0000:00:14.0/usb2/2-{h}/2-{h}:1.0/host{h}/target{h}:0:0/{h}:0:0:0/block/{name}"
            );
            let mut d = Self::new(name, devpath, size_gib, serial, true);
            d.removable = removable;
            d.usb = true;
            d
        }

        pub fn with_lbs(mut self, lbs: u32) -> Self {
            self.lbs = lbs;
            self
        }

        pub fn with_bytes(mut self, size: u64) -> Self {
            self.size = size;
            self
        }

        pub fn with_partition(mut self, number: u32, label: Option<&str>) -> Self {
            let start = (1 << 20) * u64::from(number);
            self.partitions
                .push((number, start, 1 << 20, label.map(str::to_string)));
            self
        }
    }

    /// A temp dir holding `sys/`.
    #[derive(Debug)]
    pub struct FakeSys {
        pub dir: tempfile::TempDir,
    }

    fn write(p: &Path, s: impl AsRef<[u8]>) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    impl FakeSys {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("sys/block")).unwrap();
            FakeSys { dir }
        }

        pub fn root(&self) -> PathBuf {
            self.dir.path().join("sys")
        }

        /// Adds a block device entry that is not a disk (loop, zram, …).
        pub fn add_virtual(&self, name: &str) {
            let d = FakeDisk::new(name, format!("virtual/block/{name}"), 1, "", false);
            self.add(&d);
        }

        pub fn add(&self, d: &FakeDisk) -> &Self {
            let sys = self.root();
            let dev = sys.join("devices").join(&d.devpath);
            write(&dev.join("size"), format!("{}\n", d.size / 512));
            write(&dev.join("dev"), format!("259:{}\n", d.name.len()));
            write(&dev.join("ro"), if d.ro { "1\n" } else { "0\n" });
            write(
                &dev.join("removable"),
                if d.removable { "1\n" } else { "0\n" },
            );
            write(
                &dev.join("queue/logical_block_size"),
                format!("{}\n", d.lbs),
            );
            write(
                &dev.join("queue/physical_block_size"),
                format!("{}\n", d.lbs),
            );
            write(&dev.join("queue/rotational"), "0\n");
            fs::create_dir_all(dev.join("holders")).unwrap();
            for h in &d.holders {
                write(&dev.join("holders").join(h), "");
            }
            // `device` is the parent (NVMe controller or SCSI device), as in sysfs.
            let parent = if d.devpath.contains("/nvme/") {
                dev.parent().unwrap().to_path_buf()
            } else {
                dev.parent().unwrap().parent().unwrap().to_path_buf()
            };
            write(
                &parent.join("model"),
                format!("{:<40}\n", d.model), // sysfs pads models with spaces
            );
            if d.usb {
                // …/usb2/2-N/2-N:1.0/hostH/targetH:0:0/H:0:0:0/block/NAME: the USB device
                // is five levels above the SCSI device.
                let usb_dev = parent.ancestors().nth(4).unwrap().to_path_buf();
                write(&usb_dev.join("idVendor"), "0781\n");
                write(&usb_dev.join("serial"), format!("{}\n", d.serial));
            } else if d.vpd_serial {
                let mut vpd = vec![0, 0x80, 0, d.serial.len() as u8];
                vpd.extend_from_slice(d.serial.as_bytes());
                write(&parent.join("vpd_pg80"), vpd);
            } else if !d.serial.is_empty() {
                write(&parent.join("serial"), format!("{}   \n", d.serial));
            }
            if let Some(w) = &d.wwid {
                if d.vpd_serial {
                    write(&parent.join("wwid"), format!("{w}\n"));
                } else {
                    write(&dev.join("wwid"), format!("{w}\n"));
                }
            }
            symlink(&parent, dev.join("device")).unwrap();
            let pci: PathBuf = sys
                .join("devices")
                .join(d.devpath.split('/').take(2).collect::<PathBuf>());
            write(
                &pci.join("removable"),
                if d.external_pci {
                    "removable\n"
                } else {
                    "fixed\n"
                },
            );
            for (n, start, size, label) in &d.partitions {
                let pname = if d.name.starts_with("nvme") || d.name.starts_with("mmcblk") {
                    format!("{}p{n}", d.name)
                } else {
                    format!("{}{n}", d.name)
                };
                let p = dev.join(&pname);
                write(&p.join("partition"), format!("{n}\n"));
                write(&p.join("start"), format!("{}\n", start / 512));
                write(&p.join("size"), format!("{}\n", size / 512));
                let mut uevent =
                    format!("MAJOR=259\nMINOR=1\nDEVNAME={pname}\nDEVTYPE=partition\nPARTN={n}\n");
                if let Some(l) = label {
                    uevent.push_str(&format!("PARTNAME={l}\n"));
                }
                uevent.push_str(&format!(
                    "PARTUUID=0000000{n}-AAAA-4BBB-8CCC-{:012}\n",
                    d.name.len()
                ));
                write(&p.join("uevent"), uevent);
                fs::create_dir_all(p.join("holders")).unwrap();
            }
            // Real sysfs links are relative: block/NAME -> ../devices/…/NAME.
            symlink(
                Path::new("../devices").join(&d.devpath),
                sys.join("block").join(&d.name),
            )
            .unwrap();
            self
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fixture::{FakeDisk, FakeSys};
    use super::*;

    #[test]
    fn classify_paths() {
        let p = |s: &str| PathBuf::from(s);
        let nvme = "/sys/devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1";
        assert_eq!(classify("nvme0n1", &p(nvme)), Transport::Nvme);
        let sata = "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda";
        assert_eq!(classify("sda", &p(sata)), Transport::Sata);
        // A UAS USB-NVMe enclosure: an sd disk behind usb, whatever else the path says.
        let uas = "/sys/devices/pci0000:00/0000:00:14.0/usb4/4-1/4-1:1.0/host5/target5:0:0/5:0:0:0/block/sdb";
        assert_eq!(classify("sdb", &p(uas)), Transport::Usb);
        // Native NVMe multipath (Debian's default): the head disk lives under the subsystem.
        let head = "/sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1";
        assert_eq!(classify("nvme0n1", &p(head)), Transport::Nvme);
        let virtio = "/sys/devices/pci0000:00/0000:00:05.0/virtio2/block/vda";
        assert_eq!(classify("vda", &p(virtio)), Transport::Virtio);
        let mmc = "/sys/devices/pci0000:00/0000:00:1c.0/mmc_host/mmc0/mmc0:0001/block/mmcblk0";
        assert_eq!(classify("mmcblk0", &p(mmc)), Transport::Mmc);
        let sas = "/sys/devices/pci0000:00/0000:00:02.0/host0/port-0:0/end_device-0:0/target0:0:0/0:0:0:0/block/sdc";
        assert_eq!(classify("sdc", &p(sas)), Transport::Other);
        // "usbmon" or a component merely starting with "ata" must not count.
        assert_eq!(
            classify("sdd", &p("/sys/devices/platform/usbfoo/atapi/block/sdd")),
            Transport::Other
        );
    }

    #[test]
    fn scan_reads_every_attribute() {
        let sys = FakeSys::new();
        sys.add(
            &FakeDisk::nvme(0, 512, "S64DNX0T123456")
                .with_partition(1, Some("EFI System"))
                .with_partition(2, None),
        );
        let mut sata = FakeDisk::sata("sda", 1, 1000, "WD-WX12").with_lbs(4096);
        sata.holders = vec!["dm-0".into()];
        sys.add(&sata);
        sys.add(&FakeDisk::usb("sdb", 16, "STICK1", true));
        for v in ["loop0", "zram0", "dm-0", "md127", "sr0", "ram0"] {
            sys.add_virtual(v);
        }

        let disks = scan(&sys.root()).unwrap();
        let names: Vec<_> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "sda", "sdb"]);

        let n = &disks[0];
        assert_eq!(n.transport, Transport::Nvme);
        assert_eq!(n.dev_path, PathBuf::from("/dev/nvme0n1"));
        assert_eq!(n.size, 512 << 30);
        assert_eq!((n.logical_block_size, n.physical_block_size), (512, 512));
        assert_eq!(n.model.as_deref(), Some("Model nvme0n1"));
        assert_eq!(n.serial.as_deref(), Some("S64DNX0T123456"));
        assert_eq!(n.wwid.as_deref(), Some("eui.0000000000000000"));
        assert_eq!(n.major, 259);
        assert!(
            n.sys_path.ends_with("nvme/nvme0/nvme0n1"),
            "{:?}",
            n.sys_path
        );
        assert_eq!(n.partitions.len(), 2);
        assert_eq!(n.partitions[0].name, "nvme0n1p1");
        assert_eq!(n.partitions[0].label.as_deref(), Some("EFI System"));
        assert_eq!(n.partitions[0].start, 1 << 20);
        assert_eq!(n.partitions[1].label, None);
        assert_eq!(
            n.partitions[1].uuid.as_deref(),
            Some("00000002-aaaa-4bbb-8ccc-000000000007")
        );

        let s = &disks[1];
        assert_eq!(s.transport, Transport::Sata);
        assert_eq!(s.logical_block_size, 4096);
        assert_eq!(s.serial.as_deref(), Some("WD-WX12"));
        assert_eq!(s.wwid.as_deref(), Some("naa.5000c50000000001"));
        assert_eq!(s.holders, ["dm-0"]);

        let u = &disks[2];
        assert_eq!(u.transport, Transport::Usb);
        assert!(u.removable);
        assert!(!n.external && !s.external);

        // The report carries disks as JSON.
        let json = serde_json::to_value(&disks).unwrap();
        assert_eq!(json[0]["transport"], "nvme");
    }

    #[test]
    fn table_has_one_line_per_disk() {
        let sys = FakeSys::new();
        sys.add(&FakeDisk::nvme(0, 512, "S1"));
        sys.add(&FakeDisk::usb("sdb", 16, "STICK1", false));
        let disks = scan(&sys.root()).unwrap();
        let table = DiskTable(&disks).to_string();
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("DISK"));
        assert!(lines[1].contains("nvme0n1") && lines[1].contains("512.0 GiB"));
        assert!(lines[2].contains("usb") && lines[2].contains("STICK1"));
    }

    #[test]
    fn missing_sys_block_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = scan(dir.path()).unwrap_err();
        assert!(err.to_string().contains("block"), "{err}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(8 << 30), "8.0 GiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }
}
