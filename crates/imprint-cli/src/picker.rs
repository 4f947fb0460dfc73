//! `imprint flash` with no device: a list of the disks a stick can be written to — USB or
//! removable, writable, not empty — with model, size and serial, to choose one from. The
//! choice then goes through every refusal and the confirmation of a named device.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use imprint_core::discover::{self, Disk, Transport};

use crate::commands::{untrusted, Refused};
use crate::units;

/// The disks offered: USB or removable, not read-only, with media (size > 0).
pub fn candidates(disks: &[Disk]) -> Vec<&Disk> {
    disks
        .iter()
        .filter(|d| (d.transport == Transport::Usb || d.removable) && !d.read_only && d.size > 0)
        .collect()
}

/// One line of the list: device, size, model, serial.
pub fn label(d: &Disk) -> String {
    format!(
        "{:<12} {:>10}  {}  serial {}",
        d.dev_path.display(),
        units::size(d.size),
        untrusted(d.model.as_deref().unwrap_or("(no model)")),
        untrusted(d.serial.as_deref().unwrap_or("(none)"))
    )
}

/// Asks which disk to write the stick to, from the disks under `sys_root` (`/sys`).
pub fn pick(sys_root: &Path) -> Result<PathBuf> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return Err(Refused(
            "no device given and no terminal to choose one on: name the USB stick, e.g. `imprint flash … /dev/sdX` (`imprint disks` lists them)".into(),
        )
        .into());
    }
    let disks = discover::scan(sys_root).context("listing disks")?;
    let offered = candidates(&disks);
    if offered.is_empty() {
        return Err(Refused(
            "no USB or removable disk found: plug in the stick, or name the device (one that is neither USB nor removable also needs --force)".into(),
        )
        .into());
    }
    let items: Vec<String> = offered.iter().map(|d| label(d)).collect();
    let chosen = dialoguer::Select::new()
        .with_prompt("Write the stick to which disk? (USB and removable disks only; Esc cancels)")
        .items(&items)
        .default(0)
        .interact_opt()
        .context("asking for the device")?;
    match chosen.and_then(|i| offered.get(i)) {
        Some(d) => Ok(d.dev_path.clone()),
        None => Err(Refused("no disk chosen; nothing was written".into()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, transport: Transport, removable: bool, read_only: bool, size: u64) -> Disk {
        Disk {
            name: name.into(),
            dev_path: PathBuf::from(format!("/dev/{name}")),
            major: 8,
            minor: 0,
            transport,
            sys_path: PathBuf::new(),
            size,
            logical_block_size: 512,
            physical_block_size: 512,
            model: Some("SanDisk Ultra".into()),
            serial: Some("4C530001230911117563".into()),
            wwid: None,
            removable,
            external: false,
            read_only,
            rotational: false,
            partitions: Vec::new(),
            holders: Vec::new(),
        }
    }

    #[test]
    fn only_writable_usb_or_removable_disks_with_media_are_offered() {
        let disks = [
            disk("nvme0n1", Transport::Nvme, false, false, 512 << 30),
            disk("sda", Transport::Sata, false, false, 256 << 30),
            disk("sdb", Transport::Usb, false, false, 31 << 30),
            disk("mmcblk0", Transport::Mmc, true, false, 64 << 30),
            disk("sdc", Transport::Usb, true, true, 8 << 30),
            disk("sdd", Transport::Usb, true, false, 0),
        ];
        let names: Vec<&str> = candidates(&disks).iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sdb", "mmcblk0"]);
    }

    #[test]
    fn a_line_shows_device_size_model_and_serial() {
        let d = disk("sdb", Transport::Usb, true, false, 31 << 30);
        assert_eq!(
            label(&d),
            "/dev/sdb       31.0 GiB  SanDisk Ultra  serial 4C530001230911117563"
        );
        let mut bare = d.clone();
        bare.model = None;
        bare.serial = None;
        assert_eq!(
            label(&bare),
            "/dev/sdb       31.0 GiB  (no model)  serial (none)"
        );
    }
}
