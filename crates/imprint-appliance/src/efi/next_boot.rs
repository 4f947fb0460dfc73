//! Glue between the installed disk and the boot variables: finds the EFI System Partition in the
//! installed disk's GPT and makes it the firmware's next boot (`BootNext`).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use imprint_core::discover::Disk;
use imprint_core::report::NextBoot;

use crate::efi;
use crate::flow::{find_partition_by_type, read_gpt};

/// GPT type of an EFI System Partition.
const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// The removable-media loader path every UEFI firmware boots, which the images we install use.
const LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";
/// Where efivarfs is mounted by early boot.
const EFIVARS: &str = "/sys/firmware/efi/efivars";

/// Creates (or finds) a boot entry for the ESP of `dev`, sets `BootNext` to it and makes sure
/// it is in `BootOrder` (right after the stick, so the disk boots once the stick is out).
/// `ignored_before` in the result is true when a `BootNext` we set on an earlier run was still
/// pending: the firmware ignores `BootNext`, and rebooting would only boot the stick again.
pub fn set_next_boot_to_disk(dev: &Path, disk: &Disk) -> Result<NextBoot> {
    let g = read_gpt(dev, disk.logical_block_size)?;
    let (num, part) = find_partition_by_type(&g, ESP_TYPE).ok_or_else(|| {
        anyhow!(
            "the installed disk {} has no EFI System Partition",
            dev.display()
        )
    })?;
    let esp = efi::EspLocation {
        partition_number: num,
        start_lba: part.first_lba,
        size_lba: part.last_lba - part.first_lba + 1,
        partition_guid: part.part_guid,
    };
    let description = format!(
        "imprint: {} {}",
        disk.model.as_deref().unwrap_or(&disk.name),
        disk.serial.as_deref().unwrap_or("")
    )
    .trim()
    .to_string();
    let efivars = Path::new(EFIVARS);
    let entry = efi::ensure_boot_entry(efivars, &esp, LOADER, &description)
        .context("creating the boot entry")?;
    let ignored_before = efi::boot_next_was_ignored(efivars, entry).context("reading BootNext")?;
    efi::set_boot_next(efivars, entry).context("setting BootNext")?;
    let order = efi::add_to_boot_order(efivars, entry).context("updating BootOrder")?;
    Ok(NextBoot {
        set: true,
        why: None,
        boot_entry: Some(efi::boot_entry_name(entry)),
        description: Some(description),
        esp_partition: Some(num),
        esp_partuuid: Some(part.part_guid.to_string()),
        loader: Some(LOADER.to_string()),
        boot_order: Some(order.to_string()),
        ignored_before,
        stick_handover: None,
    })
}
