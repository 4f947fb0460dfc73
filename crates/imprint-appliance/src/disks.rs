//! The boot screen's disk table. It is built from core discovery ([`discover::scan`]), the same
//! model the target policy and `imprint disks` use, so the screen lists exactly the disks the
//! policy considers. One line per disk, at most 78 columns (80 with the console indent):
//!
//! ```text
//! NAME          SIZE BUS    MODEL            SERIAL               DATA
//! nvme0n1    8.0 GiB nvme   QEMU NVMe Ctrl   NVME0001             yes
//! sdb       47.0 MiB usb    QEMU HARDDISK    1-0000:00:02.0-1     imprint stick
//! ```
//!
//! DATA says whether the disk holds data (partitions, or anything but zeros in its first MiB),
//! which is what the `confirm: if-data` policy asks about; the stick is marked instead.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use imprint_core::discover::{self, Disk};

use crate::screen::DiskLine;

/// Whether the disk holds data: it has partitions, or its first MiB (at `<dev>/<name>`) is not
/// all zeros. `None` when it cannot be read.
pub fn holds_data(dev: &Path, disk: &Disk) -> Option<bool> {
    if disk.has_partitions() {
        return Some(true);
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut f = File::open(dev.join(&disk.name)).ok()?;
    let mut filled = 0;
    // A disk smaller than 1 MiB ends early: what was read is what there is.
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(buf[..filled].iter().any(|&b| b != 0))
}

/// The table: a header, then one line per disk; `stick` is the stick's disk name.
pub fn table(disks: &[Disk], stick: Option<&str>, dev: &Path) -> Vec<String> {
    let row = |name: &str, size: &str, bus: &str, model: &str, serial: &str, data: &str| {
        format!(
            "{:<8} {:>9} {:<6} {:<16} {:<20} {}",
            name,
            size,
            bus,
            clip(model, 16),
            clip(serial, 20),
            data
        )
        .trim_end()
        .to_string()
    };
    let mut lines = vec![row("NAME", "SIZE", "BUS", "MODEL", "SERIAL", "DATA")];
    for d in disks {
        let data = if stick == Some(d.name.as_str()) {
            "imprint stick"
        } else {
            match holds_data(dev, d) {
                Some(true) => "yes",
                Some(false) => "no",
                None => "?",
            }
        };
        lines.push(row(
            &clip(&d.name, 16),
            &discover::human_bytes(d.size),
            &d.transport.to_string(),
            d.model.as_deref().unwrap_or("-"),
            d.serial.as_deref().unwrap_or("-"),
            data,
        ));
    }
    lines
}

/// The disks as the screen's table shows them ([`crate::screen::DiskLine`]).
pub fn screen_lines(disks: &[Disk], stick: Option<&str>, dev: &Path) -> Vec<DiskLine> {
    disks
        .iter()
        .map(|d| {
            let data = if stick == Some(d.name.as_str()) {
                "stick"
            } else {
                match holds_data(dev, d) {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "?",
                }
            };
            DiskLine::new(d, data)
        })
        .collect()
}

/// `s` shown safely in at most `max` columns: control and non-ASCII characters (firmware
/// strings are not trusted) become `?`, and a cut is marked with `~`.
fn clip(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if clean.len() <= max {
        clean
    } else {
        let mut t = clean[..max - 1].to_string();
        t.push('~');
        t
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    fn write(path: &Path, text: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// Adds a disk to a fake `/sys` the way the kernel lays it out: `block/NAME` links to the
    /// device directory, `device` to its parent (which holds model and serial).
    fn disk(sys: &Path, name: &str, devpath: &str, bytes: u64, model: &str, serial: &str) {
        let dir = sys.join("devices").join(devpath);
        write(&dir.join("size"), format!("{}\n", bytes / 512).as_bytes());
        write(&dir.join("dev"), b"259:0\n");
        write(&dir.join("queue/logical_block_size"), b"512\n");
        write(&dir.join("queue/physical_block_size"), b"512\n");
        let parent = dir.parent().unwrap();
        write(&parent.join("model"), format!("{model:<40}\n").as_bytes());
        write(&parent.join("serial"), format!("{serial}\n").as_bytes());
        symlink(parent, dir.join("device")).unwrap();
        fs::create_dir_all(sys.join("block")).unwrap();
        symlink(&dir, sys.join("block").join(name)).unwrap();
    }

    #[test]
    fn the_table_lists_what_discovery_lists_in_80_columns_with_data_and_the_stick() {
        let t = tempfile::tempdir().unwrap();
        let (sys, dev) = (t.path().join("sys"), t.path().join("dev"));
        disk(
            &sys,
            "nvme0n1",
            "pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1",
            8 << 30,
            "Samsung SSD 980 PRO with Heatsink 2TB",
            "S6B0NL0T123456789012",
        );
        disk(
            &sys,
            "sda",
            "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
            6 << 30,
            "QEMU HARDDISK",
            "SATA0001\x1b[2J",
        );
        disk(
            &sys,
            "sdb",
            "pci0000:00/0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb",
            47 << 20,
            "QEMU USB HARDDRIVE",
            "1-0000:00:02.0-1",
        );
        // Not disks the policy would consider: the old screen table listed dm and md devices.
        disk(&sys, "dm-0", "virtual/block/dm-0", 1 << 30, "", "");
        disk(&sys, "md127", "virtual/block/md127", 1 << 30, "", "");
        // A partition on sda: sda holds data without reading it.
        let p = sys
            .join("devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1");
        write(&p.join("partition"), b"1\n");
        write(&p.join("start"), b"2048\n");
        write(&p.join("size"), b"2048\n");
        // nvme0n1 is all zeros (a sparse file stands in for the device); sdb is unreadable.
        fs::create_dir_all(&dev).unwrap();
        File::create(dev.join("nvme0n1"))
            .unwrap()
            .set_len(8 << 30)
            .unwrap();

        let disks = discover::scan(&sys).unwrap();
        let lines = table(&disks, Some("sdb"), &dev);
        for l in &lines {
            assert!(l.len() <= 78, "{} columns: {l:?}", l.len());
            assert!(l.bytes().all(|b| (0x20..0x7f).contains(&b)), "{l:?}");
        }
        assert_eq!(
            lines,
            [
                "NAME          SIZE BUS    MODEL            SERIAL               DATA",
                "nvme0n1    8.0 GiB nvme   Samsung SSD 980~ S6B0NL0T123456789012 no",
                "sda        6.0 GiB sata   QEMU HARDDISK    SATA0001?[2J         yes",
                "sdb       47.0 MiB usb    QEMU USB HARDDR~ 1-0000:00:02.0-1     imprint stick",
            ]
        );
        // Data anywhere in the first MiB counts.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dev.join("nvme0n1"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"x", (1 << 20) - 1).unwrap();
        assert_eq!(holds_data(&dev, &disks[0]), Some(true));
        assert_eq!(holds_data(&dev, &disks[2]), None, "sdb cannot be read");
    }
}
