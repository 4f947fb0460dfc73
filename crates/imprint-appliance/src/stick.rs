//! The stick as the install flow uses it: its ESP mounted read-write (config, seed, reports),
//! its payload partition (the image), and the reports written to it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use imprint_core::report::Report;
use imprint_core::stick::{PAYLOAD_TYPE_GUID, REPORTS_DIR};
use nix::mount::MsFlags;

use crate::boot::{BootEnv, Roots};
use crate::console::Consoles;
use crate::flow::{find_partition_by_type, read_gpt};
use crate::mount::Mount;

/// Where the stick's ESP is mounted.
const STICK_MNT: &str = "/run/imprint/stick";

/// Writes the report to the stick's `imprint/reports/` (whole on the medium when this returns)
/// and says where, or why not.
pub(crate) fn save_report(consoles: &mut Consoles, rep: &Report, stick: &Path) {
    match rep.save(&stick.join(REPORTS_DIR)) {
        Ok(p) => consoles.line(&format!(
            "imprint: report written to the stick: {}",
            p.strip_prefix(stick).unwrap_or(&p).display()
        )),
        Err(e) => consoles.line(&format!(
            "imprint: could not write the report to the stick: {e}"
        )),
    }
}

/// Mounts the stick's ESP read-write (reports go there).
pub(crate) fn mount_stick(env: &BootEnv) -> Result<Mount> {
    let esp = env.esp.as_ref().ok_or_else(|| {
        anyhow!("the stick's own partition was not found (kernel parameter imprint.esp missing or its disk never appeared); is this the imprint stick?")
    })?;
    let dev = env.roots.dev.join(&esp.partition);
    Mount::new(
        &dev,
        Path::new(STICK_MNT),
        "vfat",
        MsFlags::MS_NOATIME,
        Some("iocharset=utf8,shortname=mixed"),
    )
    .context("mounting the stick's ESP")
}

/// The stick's payload partition: the partition of the stick's disk with imprint's type GUID.
pub(crate) fn payload_partition(roots: &Roots, stick_disk: &str) -> Result<PathBuf> {
    let disk_dev = roots.dev.join(stick_disk);
    // USB sticks have 512-byte sectors; a 4Kn card reader would present 4096.
    let g = read_gpt(&disk_dev, 512)
        .or_else(|_| read_gpt(&disk_dev, 4096))
        .with_context(|| format!("reading the stick {}", disk_dev.display()))?;
    let (num, _) = find_partition_by_type(&g, PAYLOAD_TYPE_GUID).ok_or_else(|| {
        anyhow!(
            "the stick {} has no imprint payload partition (type {PAYLOAD_TYPE_GUID}); rebuild it with `imprint build` or `imprint flash`",
            disk_dev.display()
        )
    })?;
    partition_device(roots, stick_disk, num)
}

/// Read-ahead for the stick while the image streams off it, in KiB. The kernel's default for
/// a USB disk is 128 KiB: the engine's 1 MiB reads then reach the stick as one small request
/// after another, each waited for. 4 MiB keeps several requests in flight, as a plain
/// `dd bs=4M iflag=direct` of the partition does.
pub(crate) const STICK_READ_AHEAD_KB: u64 = 4096;

/// Raises `disk`'s read-ahead (`/sys/block/DISK/queue/read_ahead_kb`) to at least `kb`; never
/// lowers it. Returns the value in force afterwards.
pub(crate) fn raise_read_ahead(roots: &Roots, disk: &str, kb: u64) -> std::io::Result<u64> {
    let path = roots
        .sys
        .join("block")
        .join(disk)
        .join("queue/read_ahead_kb");
    let now: u64 = std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if now >= kb {
        return Ok(now);
    }
    std::fs::write(&path, format!("{kb}\n"))?;
    Ok(kb)
}

/// The device of partition `num` of `disk`. Partition devices are named by the kernel (sda2,
/// nvme0n1p2, mmcblk0p2): find it in sysfs rather than guess.
pub(crate) fn partition_device(roots: &Roots, disk: &str, num: u32) -> Result<PathBuf> {
    let sysdir = roots.sys.join("block").join(disk);
    for e in std::fs::read_dir(&sysdir)?.flatten() {
        if std::fs::read_to_string(e.path().join("partition"))
            .unwrap_or_default()
            .trim()
            .parse::<u32>()
            .ok()
            == Some(num)
        {
            return Ok(roots.dev.join(e.file_name()));
        }
    }
    bail!("the kernel shows no partition {num} on {disk} (partition table not re-read?)")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_sticks_read_ahead_is_raised_never_lowered() {
        let d = tempfile::tempdir().unwrap();
        let roots = Roots::under(d.path());
        let ra = |disk: &str| {
            roots
                .sys
                .join("block")
                .join(disk)
                .join("queue/read_ahead_kb")
        };
        for (disk, kb) in [("sda", "128\n"), ("sdb", "8192\n")] {
            std::fs::create_dir_all(ra(disk).parent().unwrap()).unwrap();
            std::fs::write(ra(disk), kb).unwrap();
        }
        assert_eq!(
            raise_read_ahead(&roots, "sda", STICK_READ_AHEAD_KB).unwrap(),
            4096
        );
        assert_eq!(std::fs::read_to_string(ra("sda")).unwrap(), "4096\n");
        assert_eq!(
            raise_read_ahead(&roots, "sdb", STICK_READ_AHEAD_KB).unwrap(),
            8192
        );
        assert_eq!(std::fs::read_to_string(ra("sdb")).unwrap(), "8192\n");
        assert!(raise_read_ahead(&roots, "sdz", STICK_READ_AHEAD_KB).is_err());
    }
}
