//! When the disks are all there: the rule early boot stops waiting by (docs/live-image.md,
//! "When PID 1 stops waiting for disks").
//!
//! The target policy must never choose a disk because another one had not appeared yet, so
//! "nothing new for a while" is not enough, and a fixed wait is slow. Instead every storage
//! controller says itself whether it is done, from what the kernel shows in sysfs:
//!
//! - a PCI mass-storage controller (class `0x01xxxx`, or an SD host `0x0805xx`) for which a
//!   driver exists must have it bound (`driver` link);
//! - NVMe: every controller under it is `live` and shows a namespace; a live controller without
//!   any is waited for up to [`NVME_EMPTY_GRACE`] (namespaces are scanned after it goes live);
//!   dead controllers give no disks;
//! - AHCI/libata: every ATA device slot has finished probing — its `class` is no longer
//!   `unknown`, or the kernel said the port's link is down (`ataN: SATA link down` in the kernel
//!   log: libata leaves an empty port's slot `unknown`) — and every slot that found a disk
//!   (`ata`, `zac`) has its block device;
//! - USB mass storage (never a target, but the stick is one and the screen lists them all):
//!   every mass-storage interface with a driver has its block device;
//! - a bound controller of any other kind (virtio, SCSI HBA, RAID, SD) cannot say it is done:
//!   then the old rule applies, nothing new for [`crate::boot::SETTLE_QUIET`].
//!
//! A controller without any driver (none in `modules.alias`, or its module failed to load)
//! gives no disks, now or later: it is listed, not waited for.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::boot::list_dir;

/// How long a live NVMe controller without a namespace is waited for before it counts as
/// empty.
pub const NVME_EMPTY_GRACE: Duration = Duration::from_secs(5);

/// What the storage controllers say, one pass over sysfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Storage {
    /// Controllers or devices still appearing, each with why (empty: all known ones are done).
    pub pending: Vec<String>,
    /// Bound controllers of a kind this rule cannot read: only a quiet period settles them.
    pub unknown: Vec<String>,
    /// Controllers that give no disks (no driver, dead), for the log.
    pub ignored: Vec<String>,
}

impl Storage {
    /// True when every controller this rule can read is done.
    pub fn ready(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Reads the storage controllers under `sys`. `has_driver(modalias)` says whether a driver for
/// a device exists (built in, loaded, or about to load); `nvme_grace_over` whether a live NVMe
/// controller without namespaces may count as empty.
/// `links_down`: the ATA ports (`ata3`) the kernel log said have no link.
pub fn storage(
    sys: &Path,
    has_driver: &dyn Fn(&str) -> bool,
    nvme_grace_over: bool,
    links_down: &BTreeSet<String>,
) -> Storage {
    let mut s = Storage::default();
    let pci = sys.join("bus/pci/devices");
    for addr in list_dir(&pci) {
        let dir = match fs::canonicalize(pci.join(&addr)) {
            Ok(d) => d,
            Err(_) => continue,
        };
        let Some(class) = read_hex(&dir.join("class")) else {
            continue;
        };
        let kind = if class >> 16 == 0x01 {
            "storage"
        } else if class >> 8 == 0x0805 {
            "sd host"
        } else {
            continue;
        };
        let what = format!("PCI {addr} ({kind} {class:06x})");
        let Some(driver) = driver_name(&dir) else {
            let alias = read(&dir.join("modalias")).unwrap_or_default();
            if has_driver(&alias) {
                s.pending.push(format!("{what}: driver not bound yet"));
            } else {
                s.ignored.push(format!("{what}: no driver"));
            }
            continue;
        };
        if driver == "nvme" || dir.join("nvme").is_dir() {
            nvme(&dir, &what, nvme_grace_over, &mut s);
        } else if list_dir(&dir).iter().any(|n| is_numbered(n, "ata")) {
            ata(&dir, &what, links_down, &mut s);
        } else {
            s.unknown.push(format!("{what}: driver {driver}"));
        }
    }
    usb_storage(sys, has_driver, &mut s);
    s
}

fn nvme(dir: &Path, what: &str, grace_over: bool, s: &mut Storage) {
    let ctrls: Vec<String> = list_dir(&dir.join("nvme"))
        .into_iter()
        .filter(|n| is_numbered(n, "nvme"))
        .collect();
    if ctrls.is_empty() {
        s.pending
            .push(format!("{what}: NVMe controller not registered yet"));
        return;
    }
    for c in ctrls {
        let cdir = dir.join("nvme").join(&c);
        let state = read(&cdir.join("state")).unwrap_or_default();
        match state.as_str() {
            "live" => {
                // nvme0n1, or with native multipath the hidden path nvme0c0n1 (its visible
                // head lives under nvme-subsystem).
                let namespaces = list_dir(&cdir)
                    .into_iter()
                    .filter(|n| is_namespace(n))
                    .count();
                if namespaces == 0 {
                    if grace_over {
                        s.ignored
                            .push(format!("{what}: {c} is live with no namespace"));
                    } else {
                        s.pending
                            .push(format!("{what}: {c} is live, no namespace yet"));
                    }
                }
            }
            "dead" | "deleting" | "deleting (no IO)" => {
                s.ignored.push(format!("{what}: {c} is {state}"));
            }
            other => s.pending.push(format!("{what}: {c} is {other:?}")),
        }
    }
}

fn ata(dir: &Path, what: &str, links_down: &BTreeSet<String>, s: &mut Storage) {
    for port in list_dir(dir).into_iter().filter(|n| is_numbered(n, "ata")) {
        let pdir = dir.join(&port);
        let slots = ata_slots(&pdir);
        if slots.is_empty() {
            s.pending
                .push(format!("{what}: {port} has no device slots yet"));
            continue;
        }
        let mut disks = 0;
        for (slot, class) in slots {
            match class.as_str() {
                // An empty port's slot stays `unknown` after probing; the log says why.
                "unknown" | "" if links_down.contains(&port) => {}
                // Not probed yet: a disk may still come.
                "unknown" | "" => s
                    .pending
                    .push(format!("{what}: {port} {slot} still probing")),
                "ata" | "zac" => disks += 1,
                _ => {}
            }
        }
        if disks > 0 && block_devices_under(&pdir, 6) < disks {
            s.pending
                .push(format!("{what}: {port} found a disk, not registered yet"));
        }
    }
}

/// (slot name, class) of every ATA device slot of a port: `ataN/linkN[.P]/devN.D[.P]/
/// ata_device/devN.D[.P]/class`.
fn ata_slots(port: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for link in list_dir(port).into_iter().filter(|n| n.starts_with("link")) {
        let ldir = port.join(&link);
        for dev in list_dir(&ldir).into_iter().filter(|n| n.starts_with("dev")) {
            let class = read(&ldir.join(&dev).join("ata_device").join(&dev).join("class"))
                .unwrap_or_default();
            out.push((dev, class));
        }
    }
    out
}

fn usb_storage(sys: &Path, has_driver: &dyn Fn(&str) -> bool, s: &mut Storage) {
    let usb = sys.join("bus/usb/devices");
    for name in list_dir(&usb) {
        // Interfaces are `2-1:1.0`; devices and hubs have no colon.
        if !name.contains(':') {
            continue;
        }
        let Ok(dir) = fs::canonicalize(usb.join(&name)) else {
            continue;
        };
        if read(&dir.join("bInterfaceClass")).as_deref() != Some("08") {
            continue;
        }
        let what = format!("USB {name} (mass storage)");
        if driver_name(&dir).is_none() {
            let alias = read(&dir.join("modalias")).unwrap_or_default();
            if has_driver(&alias) {
                s.pending.push(format!("{what}: driver not bound yet"));
            } else {
                s.ignored.push(format!("{what}: no driver"));
            }
        } else if block_devices_under(&dir, 6) == 0 {
            s.pending.push(format!("{what}: disk not registered yet"));
        }
    }
}

/// The ATA ports a kernel log line says have no link: `ataN: SATA link down (…)`, from
/// `/dev/kmsg` records (`prio,seq,time,flags;text`) or plain lines.
pub fn ata_links_down<'a>(lines: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    lines
        .into_iter()
        .filter_map(|l| {
            let text = l.split_once(';').map_or(l, |(_, t)| t);
            let (port, rest) = text.split_once(": ")?;
            (is_numbered(port, "ata") && rest.starts_with("SATA link down"))
                .then(|| port.to_owned())
        })
        .collect()
}

/// Whole disks registered under `dir` (its `…/block/NAME` entries), at most `depth` levels
/// down; symlinks are not followed.
fn block_devices_under(dir: &Path, depth: usize) -> usize {
    let mut n = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        if e.file_name() == "block" {
            n += list_dir(&e.path()).len();
        } else if depth > 0 {
            n += block_devices_under(&e.path(), depth - 1);
        }
    }
    n
}

fn driver_name(dir: &Path) -> Option<String> {
    fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn read_hex(path: &Path) -> Option<u32> {
    let s = read(path)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// `prefix` followed by digits only (`ata1`, `nvme0`).
fn is_numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
}

/// `nvmeXnY` or `nvmeXcYnZ` (not a partition `nvmeXnYpZ`).
fn is_namespace(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let parts: Vec<&str> = rest.split(['c', 'n']).collect();
    (parts.len() == 2 || parts.len() == 3)
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Where a fake sysfs puts things, for the tests of this module and of boot.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    pub fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap_or(Path::new("/"))).ok();
        fs::write(path, text).ok();
    }

    /// A PCI device `addr` of `class` (e.g. 0x010802) under `sys`, optionally bound to `driver`.
    pub fn pci(sys: &Path, addr: &str, class: u32, driver: Option<&str>) -> PathBuf {
        let dir = sys.join("devices/pci0000:00").join(addr);
        write(&dir.join("class"), &format!("0x{class:06x}\n"));
        write(
            &dir.join("modalias"),
            &format!("pci:v00001B36bc{:02X}", class >> 16),
        );
        fs::create_dir_all(sys.join("bus/pci/devices")).ok();
        symlink(&dir, sys.join("bus/pci/devices").join(addr)).ok();
        if let Some(d) = driver {
            bind(sys, &dir, d);
        }
        dir
    }

    pub fn bind(sys: &Path, dir: &Path, driver: &str) {
        let drv = sys.join("bus/pci/drivers").join(driver);
        fs::create_dir_all(&drv).ok();
        symlink(&drv, dir.join("driver")).ok();
    }

    /// A disk `name` registered under `parent` (its `block/NAME`).
    pub fn block(sys: &Path, parent: &Path, name: &str) {
        let dir = parent.join("block").join(name);
        write(&dir.join("size"), "2097152\n");
        fs::create_dir_all(sys.join("class/block")).ok();
        symlink(&dir, sys.join("class/block").join(name)).ok();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fake::*;
    use super::*;

    fn check(sys: &Path, grace: bool) -> Storage {
        check_with(sys, grace, &BTreeSet::new())
    }

    fn check_with(sys: &Path, grace: bool, down: &BTreeSet<String>) -> Storage {
        storage(sys, &|alias: &str| !alias.contains("bc0C"), grace, down)
    }

    #[test]
    fn names_are_read_like_the_kernel_writes_them() {
        assert!(is_namespace("nvme0n1") && is_namespace("nvme1c1n2"));
        assert!(!is_namespace("nvme0n1p1") && !is_namespace("nvme0") && !is_namespace("nvmen1"));
        assert!(is_numbered("ata12", "ata") && !is_numbered("ata", "ata"));
        assert!(!is_numbered("ata1x", "ata"));
    }

    #[test]
    fn nvme_is_ready_only_when_live_with_a_namespace() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let dir = pci(sys, "0000:00:04.0", 0x010802, None);
        // A driver exists but has not bound: waiting.
        let s = check(sys, false);
        assert_eq!(
            s.pending,
            ["PCI 0000:00:04.0 (storage 010802): driver not bound yet"]
        );
        bind(sys, &dir, "nvme");
        assert!(check(sys, false).pending[0].contains("NVMe controller not registered yet"));
        let ctrl = dir.join("nvme/nvme0");
        write(&ctrl.join("state"), "connecting\n");
        assert!(check(sys, true).pending[0].contains("nvme0 is \"connecting\""));
        write(&ctrl.join("state"), "live\n");
        // Live without a namespace: waited for until the grace is over, then empty.
        assert!(check(sys, false).pending[0].contains("no namespace yet"));
        let s = check(sys, true);
        assert!(
            s.ready() && s.ignored[0].contains("live with no namespace"),
            "{s:?}"
        );
        block(sys, &ctrl, "nvme0n1");
        fs::create_dir_all(ctrl.join("nvme0n1")).unwrap();
        let s = check(sys, false);
        assert!(
            s.ready() && s.ignored.is_empty() && s.unknown.is_empty(),
            "{s:?}"
        );
    }

    #[test]
    fn a_second_controller_still_starting_keeps_everyone_waiting() {
        // The case the rule exists for: one disk is there, the other controller is still
        // starting. Stopping now would let the policy pick the first disk alone.
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let a = pci(sys, "0000:00:04.0", 0x010802, Some("nvme"));
        write(&a.join("nvme/nvme0/state"), "live\n");
        fs::create_dir_all(a.join("nvme/nvme0/nvme0n1")).unwrap();
        let b = pci(sys, "0000:00:05.0", 0x010802, Some("nvme"));
        write(&b.join("nvme/nvme1/state"), "new\n");
        let s = check(sys, true);
        assert_eq!(s.pending.len(), 1, "{s:?}");
        assert!(s.pending[0].contains("0000:00:05.0") && s.pending[0].contains("\"new\""));
        write(&b.join("nvme/nvme1/state"), "live\n");
        fs::create_dir_all(b.join("nvme/nvme1/nvme1n1")).unwrap();
        assert!(check(sys, false).ready());
        // A dead controller gives no disks: not waited for.
        write(&b.join("nvme/nvme1/state"), "dead\n");
        let s = check(sys, false);
        assert!(s.ready() && s.ignored[0].contains("nvme1 is dead"), "{s:?}");
    }

    #[test]
    fn ata_ports_must_finish_probing_and_register_what_they_found() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let c = pci(sys, "0000:00:1f.2", 0x010601, Some("ahci"));
        let slot = |port: u32, class: &str| {
            write(
                &c.join(format!(
                    "ata{port}/link{port}/dev{port}.0/ata_device/dev{port}.0/class"
                )),
                &format!("{class}\n"),
            );
        };
        slot(1, "unknown");
        slot(2, "none");
        slot(4, "unknown");
        let s = check(sys, false);
        assert_eq!(
            s.pending,
            [
                "PCI 0000:00:1f.2 (storage 010601): ata1 dev1.0 still probing",
                "PCI 0000:00:1f.2 (storage 010601): ata4 dev4.0 still probing"
            ]
        );
        // The kernel said ata4 has no link: its slot stays `unknown`, and that is final.
        let down = ata_links_down([
            "6,512,20514302,-;ata4: SATA link down (SStatus 0 SControl 300)",
            "6,513,20514303,-;ata1: SATA link up 1.5 Gbps (SStatus 113 SControl 300)",
            "ata12: SATA link down (SStatus 0 SControl 300)",
        ]);
        assert_eq!(down.iter().collect::<Vec<_>>(), ["ata12", "ata4"]);
        let s = check_with(sys, false, &down);
        assert_eq!(
            s.pending,
            ["PCI 0000:00:1f.2 (storage 010601): ata1 dev1.0 still probing"]
        );
        slot(1, "ata");
        assert!(check(sys, false).pending[0].contains("ata1 found a disk, not registered yet"));
        block(sys, &c.join("ata1/host0/target0:0:0/0:0:0:0"), "sda");
        assert!(check_with(sys, false, &down).ready());
        // A port without slots yet is still being set up.
        fs::create_dir_all(c.join("ata3")).unwrap();
        assert!(check_with(sys, false, &down).pending[0].contains("ata3 has no device slots yet"));
    }

    #[test]
    fn usb_disks_other_kinds_and_driverless_controllers() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        // An xhci controller is not storage; its mass-storage interface is.
        pci(sys, "0000:00:02.0", 0x0c0330, Some("xhci_hcd"));
        let intf = sys.join("devices/pci0000:00/0000:00:02.0/usb1/1-1/1-1:1.0");
        write(&intf.join("bInterfaceClass"), "08\n");
        write(&intf.join("modalias"), "usb:v46F4p0001ic08isc06ip50");
        fs::create_dir_all(sys.join("bus/usb/devices")).unwrap();
        symlink_to(&intf, &sys.join("bus/usb/devices/1-1:1.0"));
        assert!(check(sys, false).pending[0]
            .contains("USB 1-1:1.0 (mass storage): driver not bound yet"));
        bind(sys, &intf, "usb-storage");
        assert!(check(sys, false).pending[0].contains("disk not registered yet"));
        block(sys, &intf.join("host2/target2:0:0/2:0:0:0"), "sdb");
        assert!(check(sys, false).ready());
        // virtio-blk: bound, but nothing says it is done.
        pci(sys, "0000:00:06.0", 0x010000, Some("virtio-pci"));
        let s = check(sys, false);
        assert!(s.ready() && s.unknown == ["PCI 0000:00:06.0 (storage 010000): driver virtio-pci"]);
        // No driver anywhere (the test's has_driver says none for class 0x0c… aliases):
        // never waited for.
        let d = pci(sys, "0000:00:07.0", 0x010601, None);
        write(&d.join("modalias"), "pci:v00001B36bc0C");
        let s = check(sys, false);
        assert!(s.ready() && s.ignored[0].contains("0000:00:07.0"), "{s:?}");
    }

    #[test]
    fn the_policy_never_sees_one_disk_alone_while_the_other_controller_starts() {
        use imprint_core::config::TargetPolicy;
        use imprint_core::select::{choose, Selection};
        use imprint_core::test_util::{FakeDisk, FakeSys};
        // The machine as discovery sees it (core's fake sysfs): two equal NVMe disks on
        // 0000:00:04.0 and 0000:00:05.0. The second one's namespace is not there yet.
        let fake = FakeSys::new();
        let sys = fake.root();
        fake.add(&FakeDisk::nvme(0, 512, "S1"));
        for (addr, n) in [("0000:00:04.0", 0), ("0000:00:05.0", 1)] {
            let dir = pci(&sys, addr, 0x010802, Some("nvme"));
            write(&dir.join(format!("nvme/nvme{n}/state")), "live\n");
        }
        let storage_now = check(&sys, false);
        assert_eq!(
            storage_now.pending,
            ["PCI 0000:00:05.0 (storage 010802): nvme1 is live, no namespace yet"]
        );
        // Had boot stopped here, the policy would have taken the one disk it saw.
        let early = imprint_core::discover::scan(&sys).unwrap();
        let policy = TargetPolicy::default();
        assert!(matches!(
            choose(&early, &policy, 1 << 30, Some(512), None),
            Selection::Chosen { .. }
        ));
        // Once the namespace is there the rule is satisfied, and the policy sees both: it asks.
        fake.add(&FakeDisk::nvme(1, 512, "S2"));
        assert!(check(&sys, false).ready());
        let all = imprint_core::discover::scan(&sys).unwrap();
        assert!(matches!(
            choose(&all, &policy, 1 << 30, Some(512), None),
            Selection::Ambiguous { .. }
        ));
    }

    fn symlink_to(target: &Path, link: &Path) {
        std::os::unix::fs::symlink(target, link).unwrap();
    }
}
