//! After an install: does this disk already hold it (no reinstall), did this stick already hand
//! the machine over once (no loop), and the record on the stick that lets the stick's GRUB boot
//! a machine it provisioned from its disk (docs/boot-order.md).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use imprint_core::discover::Disk;
use imprint_core::gpt_table::GptTable;
use imprint_core::manifest::{Image, PartitionTable};
use imprint_core::report::{self, Report, Status};
use imprint_core::stick::REPORTS_DIR;

use crate::console::Consoles;
use crate::flow::read_gpt;

/// The stick's record of the machines it provisioned, read by its GRUB (grub.cfg.in).
pub(crate) const PROVISIONED_CFG: &str = "imprint/provisioned.cfg";

/// Whether `dev` already holds this image from a successful install recorded on this stick:
/// both the stick's report (same disk serial, same image digest, installed) and the disk's own
/// GPT (the image's disk GUID and partitions) must say so.
pub(crate) fn already_installed(
    consoles: &mut Consoles,
    image: &Image,
    dev: &Path,
    disk: &Disk,
    stick: &Path,
) -> bool {
    let m = image.manifest();
    let Some(serial) = disk.serial.as_deref().filter(|s| !s.is_empty()) else {
        return false;
    };
    let loaded = report::load_all(&stick.join(REPORTS_DIR));
    for s in &loaded.skipped {
        consoles.line(&format!(
            "imprint: skipping the unreadable report {}: {}",
            s.path.strip_prefix(stick).unwrap_or(&s.path).display(),
            s.why
        ));
    }
    let recorded = loaded
        .reports
        .iter()
        .any(|r| r.records_install_of(serial, &m.sha256));
    if !recorded || m.partition_table != PartitionTable::Gpt {
        return false;
    }
    let ss = m.sector_size.unwrap_or(512);
    // The image's own GPT, from the start of its stream.
    let mut head = vec![0u8; (m.raw_size.min(1 << 20)) as usize];
    let Ok(mut dec) = image.raw_reader() else {
        return false;
    };
    if dec.read_exact(&mut head).is_err() {
        return false;
    }
    let Ok(ig) = GptTable::read(&mut std::io::Cursor::new(head), ss) else {
        return false;
    };
    let Ok(dg) = read_gpt(dev, ss) else {
        return false;
    };
    // The installed OS may have grown its root partition (growpart) and the seed added one:
    // compare what identifies a partition — number, unique GUID, type, start — not its end.
    let dparts = dg.partitions();
    dg.disk_guid() == ig.disk_guid()
        && ig.partitions().iter().all(|(n, p)| {
            dparts.get(n).is_some_and(|d| {
                d.part_guid == p.part_guid
                    && d.part_type_guid == p.part_type_guid
                    && d.first_lba == p.first_lba
            })
        })
}

/// Whether the newest report on the stick for the disk with `serial` says this stick already
/// found the machine provisioned and handed it to its disk once: the firmware then ignored
/// that (or pruned the boot entry), and rebooting again would loop.
pub(crate) fn handed_over_before(stick: &Path, serial: Option<&str>) -> bool {
    let Some(serial) = serial.filter(|s| !s.is_empty()) else {
        return false;
    };
    let mut reports: Vec<Report> = report::load_all(&stick.join(REPORTS_DIR))
        .reports
        .into_iter()
        .filter(|r| {
            r.chosen_disk()
                .and_then(|d| d.serial.as_deref())
                .is_some_and(|s| s == serial)
        })
        .collect();
    reports.sort_by(|a, b| a.install_id.cmp(&b.install_id));
    reports
        .last()
        .is_some_and(|r| r.status == Status::AlreadyInstalled)
}

/// Records on the stick that this machine's disk holds an install from it, for the stick's
/// GRUB: `imprint/provisioned.cfg` gets a block that looks for the install's seed partition
/// by its FAT serial (unique per install) and, when that disk is present, boots the disk's own
/// loader instead of provisioning again. A stick moved to the next machine finds no such disk
/// there and provisions it. Returns the block written.
pub(crate) fn record_provisioned(
    stick: &Path,
    seed_serial: &str,
    esp_serial: &str,
    label: &str,
) -> Result<String> {
    let path = stick.join(PROVISIONED_CFG);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    // GRUB strings: keep the label to characters that need no quoting.
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " .:-_()".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    // Every step that can fail is an `if` condition: GRUB prints no error for those, and an
    // error printed while a menu entry runs makes it wait for a key — on a NUC without one,
    // forever.
    // The seed partition's serial is unique to this install: finding it proves this machine is
    // the one provisioned. Its ESP is then found by the ESP's own FAT serial (the image's, so
    // the same on every machine of a fleet, but on this machine the installed disk's).
    let loader = "($imprint_esp)/EFI/BOOT/BOOTX64.EFI";
    let block = format!(
        "if [ -z \"$imprint_installed\" ]; then\n  if search --no-floppy --fs-uuid --set=imprint_seed {seed_serial}; then\n    if search --no-floppy --fs-uuid --set=imprint_esp {esp_serial}; then\n      if [ -f \"{loader}\" ]; then\n        set imprint_installed=\"{loader}\"\n        set imprint_installed_name=\"{label}\"\n      fi\n    fi\n  fi\nfi\n"
    );
    if old.contains(&block) {
        return Ok(block);
    }
    let mut text = if old.is_empty() {
        "# Written by imprint: the installs this stick made. The stick's grub.cfg reads it and\n# boots an installed disk it finds instead of provisioning the machine again.\n".to_string()
    } else {
        old
    };
    text.push_str(&block);
    imprint_core::durable::replace_file(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(block)
}

/// The FAT volume serial (`XXXX-XXXX`, as GRUB's `search --fs-uuid` takes it) of the
/// installed disk's EFI System Partition `esp`, read with `fatfs`; `None` when it holds no FAT
/// filesystem with the removable-media loader.
pub(crate) fn esp_volume_serial(
    dev: &Path,
    esp: &gpt::partition::Partition,
    ss: u64,
) -> Option<String> {
    let mut f = File::open(dev).ok()?;
    let slice = imprint_core::blockdev::PartitionSlice::new(
        &mut f,
        esp.first_lba * ss,
        (esp.last_lba + 1 - esp.first_lba) * ss,
    );
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).ok()?;
    fs.root_dir().open_file("EFI/BOOT/BOOTX64.EFI").ok()?;
    let id = fs.volume_id();
    Some(format!("{:04X}-{:04X}", id >> 16, id & 0xffff))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use imprint_core::discover::Disk;
    use imprint_core::report::SelectionInfo;

    fn report(dir: &Path, id: &str, status: Status, serial: &str) {
        let mut r = Report::new(id);
        r.status = status;
        r.selection = Some(SelectionInfo {
            chosen: Some("nvme0n1".into()),
            ..Default::default()
        });
        let disk: Disk = serde_json::from_value(serde_json::json!({
            "name": "nvme0n1", "dev_path": "/dev/nvme0n1", "major": 259, "minor": 0,
            "transport": "nvme", "sys_path": "/sys/block/nvme0n1", "size": 1,
            "logical_block_size": 512, "physical_block_size": 512, "model": null,
            "serial": serial, "wwid": null, "removable": false, "external": false,
            "read_only": false, "rotational": false, "partitions": [], "holders": []
        }))
        .unwrap();
        r.disks = Some(vec![disk]);
        r.save(&dir.join(REPORTS_DIR)).unwrap();
    }

    #[test]
    fn a_second_pass_after_a_handover_is_the_last() {
        let t = tempfile::tempdir().unwrap();
        let stick = t.path();
        assert!(!handed_over_before(stick, Some("S1")), "no reports at all");
        report(stick, "20261201-100000-aaaa", Status::Installed, "S1");
        assert!(
            !handed_over_before(stick, Some("S1")),
            "installed: hand over once"
        );
        report(
            stick,
            "20261201-100100-bbbb",
            Status::AlreadyInstalled,
            "S1",
        );
        assert!(
            handed_over_before(stick, Some("S1")),
            "handed over once: stop now"
        );
        // Another machine's disk, and a disk without a serial, never count.
        assert!(!handed_over_before(stick, Some("S2")));
        assert!(!handed_over_before(stick, None));
        // A reinstall after that starts over.
        report(stick, "20261201-100200-cccc", Status::Installed, "S1");
        assert!(!handed_over_before(stick, Some("S1")));
    }

    #[test]
    fn the_stick_records_each_install_once_for_its_grub() {
        let t = tempfile::tempdir().unwrap();
        let stick = t.path();
        std::fs::create_dir_all(stick.join("imprint")).unwrap();
        let b = record_provisioned(
            stick,
            "1A2B-3C4D",
            "5C58-61AC",
            "nuc-01 (debian \"12\"; rm)",
        )
        .unwrap();
        record_provisioned(
            stick,
            "1A2B-3C4D",
            "5C58-61AC",
            "nuc-01 (debian \"12\"; rm)",
        )
        .unwrap();
        record_provisioned(stick, "5E6F-7A8B", "5C58-61AC", "nuc-02").unwrap();
        let text = std::fs::read_to_string(stick.join(PROVISIONED_CFG)).unwrap();
        assert_eq!(
            text.matches(&b).count(),
            1,
            "the same install is recorded once"
        );
        assert!(text.contains("if search --no-floppy --fs-uuid --set=imprint_seed 1A2B-3C4D"));
        assert!(text.contains("if search --no-floppy --fs-uuid --set=imprint_esp 5C58-61AC"));
        assert!(text.contains("if [ -f \"($imprint_esp)/EFI/BOOT/BOOTX64.EFI\" ]"));
        // The label cannot break out of GRUB's quoting.
        assert!(text.contains("set imprint_installed_name=\"nuc-01 (debian _12__ rm)\""));
        assert!(!stick.join("imprint/provisioned.cfg.new").exists());
    }
}
