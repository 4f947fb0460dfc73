//! Which partition is the imprint stick's own ESP: the partition whose unique GUID is the
//! `imprint.esp=` PARTUUID `imprint build` put on the kernel command line.

use std::fs::{self, File};
use std::path::Path;

use imprint_core::gpt_table::GptTable;
use imprint_core::stick::ESP_LABEL;

use crate::boot::list_dir;

/// The stick's EFI System Partition as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspPartition {
    /// Partition device name, e.g. `sda1`.
    pub partition: String,
    /// Whole-disk device name, e.g. `sda`.
    pub disk: String,
}

/// Finds the partition whose PARTUUID is `partuuid`. The partition's `uevent` carries it on
/// newer kernels; otherwise (Debian's 6.1) the unique partition GUID is read from the GPT on
/// `<dev>/<disk>` for the partition number the kernel reports (`PARTN`). Only when neither
/// works is a partition named [`ESP_LABEL`] taken, and only if it is the one such partition
/// whose GUID is unknown.
pub fn find_esp(sys: &Path, dev: &Path, partuuid: &str) -> Option<EspPartition> {
    let mut by_name = Vec::new();
    let class = sys.join("class/block");
    for name in list_dir(&class) {
        let Ok(uevent) = fs::read_to_string(class.join(&name).join("uevent")) else {
            continue;
        };
        let var = |key: &str| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
        };
        if var("DEVTYPE").as_deref() != Some("partition") {
            continue;
        }
        let disk = fs::canonicalize(class.join(&name))
            .ok()
            .and_then(|p| p.parent().and_then(|d| d.file_name()).map(|d| d.to_owned()))
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        let guid = var("PARTUUID").or_else(|| {
            let partn = var("PARTN")?.parse().ok()?;
            let sector = fs::read_to_string(
                sys.join("block")
                    .join(&disk)
                    .join("queue/logical_block_size"),
            )
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512);
            gpt_partition_guid(&dev.join(&disk), sector, partn)
        });
        let part = EspPartition {
            partition: name.clone(),
            disk,
        };
        match guid {
            Some(guid) if guid.eq_ignore_ascii_case(partuuid) => return Some(part),
            Some(_) => {}
            None if var("PARTNAME").as_deref() == Some(ESP_LABEL) => by_name.push(part),
            None => {}
        }
    }
    if by_name.len() == 1 {
        by_name.pop()
    } else {
        None
    }
}

/// The unique GUID of GPT partition `partn` (1-based) on the disk at `path`, lower-case,
/// read through core's one GPT reader (CRCs checked; a damaged or strange table is `None`,
/// never a panic).
fn gpt_partition_guid(path: &Path, sector: u64, partn: u64) -> Option<String> {
    let mut disk = File::open(path).ok()?;
    let table = GptTable::read(&mut disk, u32::try_from(sector).ok()?).ok()?;
    let p = table.partitions().remove(&u32::try_from(partn).ok()?)?;
    Some(p.part_guid.hyphenated().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// A fake /sys with an NVMe disk, a SATA disk and a USB stick whose first partition is the
    /// imprint ESP.
    fn fake_sys() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        let devices = s.join("devices/pci0000:00");
        let disks = [
            (
                "nvme0n1",
                "0000:00:04.0/nvme/nvme0/nvme0n1",
                "0000:00:04.0/nvme/nvme0",
                41_943_040u64,
            ),
            (
                "sda",
                "0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
                "0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
                20_971_520,
            ),
            (
                "sdb",
                "0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb",
                "0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0",
                204_800,
            ),
        ];
        fs::create_dir_all(s.join("block")).unwrap();
        fs::create_dir_all(s.join("class/block")).unwrap();
        for (name, rel, device, sectors) in disks {
            let d = devices.join(rel);
            write(&d.join("size"), &format!("{sectors}\n"));
            write(
                &d.join("uevent"),
                &format!("DEVNAME={name}\nDEVTYPE=disk\n"),
            );
            std::os::unix::fs::symlink(&d, s.join("block").join(name)).unwrap();
            std::os::unix::fs::symlink(&d, s.join("class/block").join(name)).unwrap();
            std::os::unix::fs::symlink(devices.join(device), d.join("device")).unwrap();
        }
        write(
            &devices.join("0000:00:04.0/nvme/nvme0/model"),
            "QEMU NVMe Ctrl  \n",
        );
        write(
            &devices.join("0000:00:04.0/nvme/nvme0/serial"),
            "NVME0001\n",
        );
        let sata = devices.join("0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0");
        write(&sata.join("model"), "QEMU HARDDISK\n");
        fs::write(sata.join("vpd_pg80"), b"\x00\x80\x00\x08SATA0001").unwrap();
        write(&devices.join("0000:00:05.0/usb2/2-1/serial"), "STICK0001\n");
        let usb = devices.join("0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0");
        write(&usb.join("model"), "QEMU USB HARDDRIVE\n");
        let part = usb.join("block/sdb/sdb1");
        write(
            &part.join("uevent"),
            "MAJOR=8\nMINOR=17\nDEVNAME=sdb1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=IMPRINT\n",
        );
        std::os::unix::fs::symlink(&part, s.join("class/block/sdb1")).unwrap();
        dir
    }

    #[test]
    fn esp_is_found_by_partuuid_first() {
        let sys = fake_sys();
        let dev = tempfile::tempdir().unwrap();
        let part = sys.path().join("class/block/sdb1/uevent");
        let uevent = fs::read_to_string(&part).unwrap();
        fs::write(
            &part,
            format!("{uevent}PARTUUID=12345678-aaaa-bbbb-cccc-1234567890ab\n"),
        )
        .unwrap();
        assert_eq!(
            find_esp(
                sys.path(),
                dev.path(),
                "12345678-AAAA-bbbb-cccc-1234567890ab"
            )
            .unwrap()
            .disk,
            "sdb"
        );
        // A partition named IMPRINT with another PARTUUID is some other stick: not ours.
        assert_eq!(
            find_esp(
                sys.path(),
                dev.path(),
                "00000000-0000-0000-0000-000000000000"
            ),
            None
        );
        let sys2 = fake_sys();
        fs::remove_file(sys2.path().join("class/block/sdb1")).unwrap();
        assert_eq!(find_esp(sys2.path(), dev.path(), "x"), None);
    }

    /// A disk image with a GPT (CRCs and all, written by the `gpt` crate) whose partition 1
    /// has the unique GUID `guid`, with `sector`-byte sectors.
    fn gpt_disk(path: &Path, sector: u64, guid: uuid::Uuid) {
        let bytes = vec![0u8; (sector * 2048) as usize];
        let ss = u32::try_from(sector).unwrap();
        let disk = imprint_core::test_util::with_gpt(bytes, ss, None, |g| {
            g.add_partition("IMPRINT", sector * 64, gpt::partition_types::EFI, 0, None)
                .unwrap();
            let mut parts = g.partitions().clone();
            parts.get_mut(&1).unwrap().part_guid = guid;
            g.update_partitions(parts).unwrap();
        });
        fs::write(path, disk).unwrap();
    }

    #[test]
    fn esp_guid_is_read_from_the_gpt_when_uevent_lacks_it() {
        let guid = uuid::Uuid::parse_str("12345678-aaaa-bbbb-cccc-1234567890ab").unwrap();
        for sector in [512u64, 4096] {
            let sys = fake_sys();
            write(
                &sys.path().join("block/sdb/queue/logical_block_size"),
                &format!("{sector}\n"),
            );
            let dev = tempfile::tempdir().unwrap();
            gpt_disk(&dev.path().join("sdb"), sector, guid);
            let uuid = "12345678-aaaa-bbbb-cccc-1234567890ab";
            assert_eq!(
                gpt_partition_guid(&dev.path().join("sdb"), sector, 1).as_deref(),
                Some(uuid)
            );
            let esp = find_esp(sys.path(), dev.path(), &uuid.to_uppercase()).unwrap();
            assert_eq!((esp.partition.as_str(), esp.disk.as_str()), ("sdb1", "sdb"));
            // Its GUID is known and differs: the name IMPRINT does not make it ours.
            assert_eq!(
                find_esp(
                    sys.path(),
                    dev.path(),
                    "00000000-0000-0000-0000-000000000001"
                ),
                None
            );
            assert_eq!(gpt_partition_guid(&dev.path().join("sdb"), sector, 2), None);
            assert_eq!(
                gpt_partition_guid(&dev.path().join("sdb"), sector, 129),
                None
            );
            // A damaged entry array (its CRC no longer matches) is no GUID, not a panic and
            // not a guess: the partition's name decides, as when no GPT is readable.
            let path = dev.path().join("sdb");
            let mut bytes = fs::read(&path).unwrap();
            bytes[2 * sector as usize + 17] ^= 0xff;
            fs::write(&path, bytes).unwrap();
            assert_eq!(gpt_partition_guid(&path, sector, 1), None);
        }
    }

    #[test]
    fn esp_falls_back_to_a_unique_imprint_name_when_no_guid_is_readable() {
        let sys = fake_sys();
        let dev = tempfile::tempdir().unwrap();
        let esp = find_esp(
            sys.path(),
            dev.path(),
            "12345678-aaaa-bbbb-cccc-1234567890ab",
        );
        assert_eq!(esp.unwrap().disk, "sdb");
    }
}
