//! UEFI boot variables through efivarfs: what makes the next boot go to the installed disk.
//!
//! This module owns reading and writing the global boot variables (`BootOrder`, `BootCurrent`,
//! `BootNext`, `Boot####`), the `EFI_LOAD_OPTION` format and the few device path nodes we need
//! (Hard Drive, File Path, End; any other node is kept as raw bytes so existing entries
//! round-trip untouched). The efivarfs directory is a parameter, so the tests run against a
//! temporary directory. The policy (why `BootNext`, what `BootOrder` gets) is in
//! `docs/boot-order.md` and on [`set_boot_next`] and [`add_to_boot_order`].
//!
//! efivarfs rules this module follows:
//! - a file is `Name-GUID` and holds a 4-byte little-endian attribute word, then the data;
//! - existing files are usually immutable (`FS_IMMUTABLE_FL`): the flag is cleared before a
//!   rewrite and restored afterwards (as systemd does);
//! - the attribute word and the data go to the kernel in ONE `write()`: efivarfs turns each
//!   write into one `SetVariable()` call, so a split write would store half a variable;
//! - what was written is read back and compared: a firmware that silently refuses a variable
//!   is reported instead of trusted.

mod load_option;
pub mod next_boot;
mod vars;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use load_option::DevicePathNode;
pub use load_option::LoadOption;
pub use vars::boot_entry_name;
use vars::{read_u16_variable, read_variable, variable_path, write_variable, Variable};

/// The EFI global variable vendor GUID, as efivarfs spells it in file names.
pub const EFI_GLOBAL_VARIABLE: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// `EFI_VARIABLE_NON_VOLATILE`.
pub const EFI_VARIABLE_NON_VOLATILE: u32 = 0x1;
/// `EFI_VARIABLE_BOOTSERVICE_ACCESS`.
pub const EFI_VARIABLE_BOOTSERVICE_ACCESS: u32 = 0x2;
/// `EFI_VARIABLE_RUNTIME_ACCESS`.
pub const EFI_VARIABLE_RUNTIME_ACCESS: u32 = 0x4;
/// NV | BS | RT: the attributes the specification requires for the boot manager's variables.
pub const BOOT_VARIABLE_ATTRIBUTES: u32 =
    EFI_VARIABLE_NON_VOLATILE | EFI_VARIABLE_BOOTSERVICE_ACCESS | EFI_VARIABLE_RUNTIME_ACCESS;

/// `LOAD_OPTION_ACTIVE`: the boot manager only considers active options.
pub const LOAD_OPTION_ACTIVE: u32 = 0x1;

/// What went wrong, naming the variable and the file.
#[derive(Debug, thiserror::Error)]
pub enum EfiError {
    /// A variable file could not be read.
    #[error("reading EFI variable {name} from {}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The efivarfs directory could not be listed.
    #[error("listing EFI variables in {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A variable's content does not have the layout its name promises.
    #[error("EFI variable {name} at {} is malformed: {reason}", path.display())]
    Malformed {
        name: String,
        path: PathBuf,
        reason: String,
    },
    /// The immutable flag of an existing variable could not be cleared.
    #[error("clearing the immutable flag of EFI variable {name} at {}", path.display())]
    Immutable {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Opening or writing the variable file failed (efivarfs reports the firmware's refusal
    /// here, e.g. EINVAL for a load option it does not accept, ENOSPC for a full store).
    #[error("writing EFI variable {name} to {}", path.display())]
    Write {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel took only part of the single write.
    #[error("writing EFI variable {name} to {}: only {written} of {len} bytes were taken", path.display())]
    ShortWrite {
        name: String,
        path: PathBuf,
        written: usize,
        len: usize,
    },
    /// Reading the variable back after writing it gave something else.
    #[error("EFI variable {name} at {} reads back differently from what was written", path.display())]
    Verify { name: String, path: PathBuf },
    /// A string cannot be encoded as UCS-2 (characters beyond U+FFFF, or an embedded NUL).
    #[error("{what} {value:?} cannot be stored in an EFI variable (UCS-2 without NUL only)")]
    NotUcs2 { what: &'static str, value: String },
    /// The loader path is not an absolute path on the ESP.
    #[error("loader path {0:?} must be absolute on the ESP, like \\EFI\\BOOT\\BOOTX64.EFI")]
    LoaderPath(String),
    /// All 65536 `Boot####` numbers are taken.
    #[error("no free Boot#### number left in {}", path.display())]
    NoFreeNumber { path: PathBuf },
}

/// Where the installed disk's EFI System Partition is, as its GPT says (what a Hard Drive
/// device path node carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EspLocation {
    /// 1-based GPT partition number.
    pub partition_number: u32,
    /// First LBA of the partition, in the disk's logical sectors.
    pub start_lba: u64,
    /// Size of the partition in logical sectors.
    pub size_lba: u64,
    /// The partition's unique GUID (not its type GUID); `gpt` gives it as `uuid::Uuid`.
    pub partition_guid: Uuid,
}

/// `BootCurrent`: the option the firmware booted this time.
pub fn boot_current(efivars: &Path) -> Result<Option<u16>, EfiError> {
    read_u16_variable(efivars, "BootCurrent")
}

/// `BootNext`: the option the firmware boots next time, once.
pub fn boot_next(efivars: &Path) -> Result<Option<u16>, EfiError> {
    read_u16_variable(efivars, "BootNext")
}

/// `BootOrder`: the options the firmware tries, in order.
pub fn boot_order(efivars: &Path) -> Result<Option<Vec<u16>>, EfiError> {
    let Some(var) = read_variable(efivars, "BootOrder")? else {
        return Ok(None);
    };
    if !var.data.len().is_multiple_of(2) {
        return Err(EfiError::Malformed {
            name: "BootOrder".to_owned(),
            path: variable_path(efivars, "BootOrder"),
            reason: format!("{} bytes of data, not a list of u16", var.data.len()),
        });
    }
    Ok(Some(
        var.data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Boot option `num`, parsed; `None` if it does not exist.
pub fn boot_entry(efivars: &Path, num: u16) -> Result<Option<LoadOption>, EfiError> {
    let name = boot_entry_name(num);
    let Some(var) = read_variable(efivars, &name)? else {
        return Ok(None);
    };
    LoadOption::parse(&var.data)
        .map(Some)
        .map_err(|reason| EfiError::Malformed {
            path: variable_path(efivars, &name),
            name,
            reason,
        })
}

/// The numbers of all `Boot####` variables present, sorted.
pub fn boot_entry_numbers(efivars: &Path) -> Result<Vec<u16>, EfiError> {
    let list_err = |source| EfiError::List {
        path: efivars.to_owned(),
        source,
    };
    let suffix = format!("-{EFI_GLOBAL_VARIABLE}");
    let mut numbers = BTreeSet::new();
    for entry in fs::read_dir(efivars).map_err(list_err)? {
        let file_name = entry.map_err(list_err)?.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let Some(name) = file_name
            .len()
            .checked_sub(suffix.len())
            .filter(|&cut| file_name.is_char_boundary(cut))
            .filter(|&cut| file_name[cut..].eq_ignore_ascii_case(&suffix))
            .map(|cut| &file_name[..cut])
        else {
            continue;
        };
        if let Some(hex) = name.strip_prefix("Boot") {
            if hex.len() == 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                if let Ok(num) = u16::from_str_radix(hex, 16) {
                    numbers.insert(num);
                }
            }
        }
    }
    Ok(numbers.into_iter().collect())
}

/// Normalizes a loader path to the form a File Path node carries: backslashes, absolute.
fn loader_path(loader: &str) -> Result<String, EfiError> {
    let path = loader.replace('/', "\\");
    if !path.starts_with('\\') || path.len() < 2 || path.ends_with('\\') {
        return Err(EfiError::LoaderPath(loader.to_owned()));
    }
    Ok(path)
}

/// Same file on FAT: case-insensitive, `/` and `\` alike.
fn same_loader(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.replace('/', "\\").to_ascii_uppercase();
    norm(a) == norm(b)
}

/// The existing option that boots `loader` from the partition `esp` (same partition GUID,
/// number, start, size and path), if any. Entries that do not parse are skipped: firmware
/// may keep odd options of its own, and they are none of ours.
pub fn find_boot_entry(
    efivars: &Path,
    esp: &EspLocation,
    loader: &str,
) -> Result<Option<u16>, EfiError> {
    let loader = loader_path(loader)?;
    for num in boot_entry_numbers(efivars)? {
        if let Ok(Some(option)) = boot_entry(efivars, num) {
            if let Some((_, hd, file)) = option.hard_drive_file() {
                if hd == *esp
                    && same_loader(&file, &loader)
                    && option.attributes & LOAD_OPTION_ACTIVE != 0
                {
                    return Ok(Some(num));
                }
            }
        }
    }
    Ok(None)
}

/// Returns the number of a `Boot####` option that boots `loader` from the partition `esp`,
/// creating it if needed.
///
/// - An active option with the same Hard Drive node and path is reused as is: reinstalling
///   does not pile up duplicates in the firmware's boot menu.
/// - An option with the same partition GUID and path whose start, size or number differ
///   (same image, changed layout) or that is inactive is repaired in place: its Hard Drive
///   node is replaced and it is made active; its description and any other node stay.
/// - Otherwise a new option `HD(…)/File(loader)` is written at the first number that is
///   neither a variable nor listed in `BootOrder`, with attributes NV|BS|RT and
///   `LOAD_OPTION_ACTIVE`.
///
/// `BootOrder` and `BootNext` are not touched: see [`set_boot_next`] and
/// [`add_to_boot_order`].
pub fn ensure_boot_entry(
    efivars: &Path,
    esp: &EspLocation,
    loader: &str,
    description: &str,
) -> Result<u16, EfiError> {
    let loader = loader_path(loader)?;
    if let Some(num) = find_boot_entry(efivars, esp, &loader)? {
        return Ok(num);
    }
    let numbers = boot_entry_numbers(efivars)?;
    for &num in &numbers {
        let Ok(Some(mut option)) = boot_entry(efivars, num) else {
            continue;
        };
        let Some((index, hd, file)) = option.hard_drive_file() else {
            continue;
        };
        if hd.partition_guid == esp.partition_guid && same_loader(&file, &loader) {
            option.file_path_list[index] = DevicePathNode::hard_drive(esp);
            option.attributes |= LOAD_OPTION_ACTIVE;
            write_boot_entry(efivars, num, &option)?;
            return Ok(num);
        }
    }

    let mut taken: BTreeSet<u16> = numbers.into_iter().collect();
    taken.extend(boot_order(efivars).ok().flatten().unwrap_or_default());
    let num =
        (0..=u16::MAX)
            .find(|n| !taken.contains(n))
            .ok_or_else(|| EfiError::NoFreeNumber {
                path: efivars.to_owned(),
            })?;
    let option = LoadOption::new(esp, &loader, description)?;
    write_boot_entry(efivars, num, &option)?;
    Ok(num)
}

/// Writes boot option `num` with the boot manager's attributes.
pub fn write_boot_entry(efivars: &Path, num: u16, option: &LoadOption) -> Result<(), EfiError> {
    let name = boot_entry_name(num);
    let data = option.to_bytes().map_err(|reason| EfiError::Malformed {
        path: variable_path(efivars, &name),
        name: name.clone(),
        reason,
    })?;
    write_variable(
        efivars,
        &name,
        &Variable {
            attributes: BOOT_VARIABLE_ATTRIBUTES,
            data,
        },
    )
}

/// Sets `BootNext`: the firmware boots option `num` on the next boot only, then deletes
/// `BootNext` and goes back to `BootOrder`.
///
/// This is imprint's primary mechanism: it changes nothing lasting, and a stick left in the
/// machine is still booted first afterwards, where the appliance sees the installed disk,
/// sets `BootNext` again and reboots (no reinstall loop). See `docs/boot-order.md`.
pub fn set_boot_next(efivars: &Path, num: u16) -> Result<(), EfiError> {
    write_variable(
        efivars,
        "BootNext",
        &Variable {
            attributes: BOOT_VARIABLE_ATTRIBUTES,
            data: num.to_le_bytes().to_vec(),
        },
    )
}

/// Whether the firmware ignored a `BootNext` we set on an earlier boot: a firmware that honours
/// it deletes `BootNext` before booting the option, so finding it still set to `num` when the
/// stick booted again means it was not taken. Call this before [`set_boot_next`]; on `true` the
/// appliance must not reboot into the same loop (see `docs/boot-order.md`).
pub fn boot_next_was_ignored(efivars: &Path, num: u16) -> Result<bool, EfiError> {
    Ok(boot_next(efivars)? == Some(num))
}

/// What [`add_to_boot_order`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootOrderChange {
    /// The option was already listed; `BootOrder` is untouched.
    AlreadyPresent { position: usize },
    /// The option was inserted at `position` (0 = first).
    Inserted { position: usize },
}

/// How the report and the console say it: plain words, 1-based like a boot menu.
impl std::fmt::Display for BootOrderChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootOrderChange::AlreadyPresent { position } => {
                write!(f, "already listed in BootOrder (position {})", position + 1)
            }
            BootOrderChange::Inserted { position } => {
                write!(f, "added to BootOrder at position {}", position + 1)
            }
        }
    }
}

/// Makes sure `BootOrder` lists option `num`, changing as little as possible.
///
/// Policy: an option already listed stays where it is. Otherwise it goes right after the
/// option we booted from (`BootCurrent`, the stick), so the stick keeps its place (the
/// operator can still reinstall by plugging it in) while the installed disk comes before
/// network boot, shells and stale entries once the stick is removed. When `BootCurrent` is
/// not in `BootOrder` (the stick was picked from a one-time boot menu, so it is not a default
/// boot device), the option goes first. A missing `BootOrder` is created with just `num`.
pub fn add_to_boot_order(efivars: &Path, num: u16) -> Result<BootOrderChange, EfiError> {
    let mut order = boot_order(efivars)?.unwrap_or_default();
    if let Some(position) = order.iter().position(|&n| n == num) {
        return Ok(BootOrderChange::AlreadyPresent { position });
    }
    let current = boot_current(efivars).ok().flatten();
    let position = current
        .and_then(|cur| order.iter().position(|&n| n == cur))
        .map_or(0, |i| i + 1);
    order.insert(position, num);
    write_variable(
        efivars,
        "BootOrder",
        &Variable {
            attributes: BOOT_VARIABLE_ATTRIBUTES,
            data: order.iter().flat_map(|n| n.to_le_bytes()).collect(),
        },
    )?;
    Ok(BootOrderChange::Inserted { position })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs;

    use super::*;
    use crate::efi::load_option::test_util::{efibootmgr_bytes, esp, ucs2, LOADER};
    use crate::efi::vars::test_util::{read_raw, write_raw};

    #[test]
    fn efi_ensure_creates_a_new_entry_at_the_first_free_number() {
        let dir = tempfile::tempdir().unwrap();
        // Firmware entries 0000 and 0001; 0002 only in BootOrder (stale); 0003 free.
        let mut pxe = vec![1, 0, 0, 0, 4, 0];
        pxe.extend(ucs2("UEFI PXE"));
        pxe.extend([0x7f, 0xff, 4, 0]);
        write_raw(dir.path(), "Boot0000", 7, &pxe);
        let mut usb = LoadOption::new(&esp(), "\\EFI\\BOOT\\BOOTX64.EFI", "UEFI USB").unwrap();
        usb.file_path_list[0].data[20] ^= 0xff; // another partition GUID
        write_raw(dir.path(), "Boot0001", 7, &usb.to_bytes().unwrap());
        write_raw(dir.path(), "BootOrder", 7, &[1, 0, 2, 0, 0, 0]);

        let num = ensure_boot_entry(dir.path(), &esp(), LOADER, "imprint").unwrap();
        assert_eq!(num, 3);
        let raw = read_raw(dir.path(), "Boot0003");
        assert_eq!(&raw[..4], &[7, 0, 0, 0]);
        assert_eq!(&raw[4..], efibootmgr_bytes().as_slice());
        assert_eq!(boot_entry_numbers(dir.path()).unwrap(), vec![0, 1, 3]);
    }

    #[test]
    fn efi_ensure_finds_an_existing_entry_without_duplicating() {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), "Boot0004", 7, &efibootmgr_bytes());
        // Different case and slashes still name the same file on FAT.
        let num = ensure_boot_entry(dir.path(), &esp(), "/efi/boot/bootx64.efi", "other").unwrap();
        assert_eq!(num, 4);
        let again = ensure_boot_entry(dir.path(), &esp(), LOADER, "imprint").unwrap();
        assert_eq!(again, 4);
        assert_eq!(boot_entry_numbers(dir.path()).unwrap(), vec![4]);
        assert_eq!(read_raw(dir.path(), "Boot0004")[4..], efibootmgr_bytes());
    }

    #[test]
    fn efi_ensure_repairs_an_entry_with_the_same_guid_but_old_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let old = EspLocation {
            start_lba: 2048 * 4,
            ..esp()
        };
        let mut option = LoadOption::new(&old, LOADER, "debian").unwrap();
        option.attributes = 0; // inactive
        option.optional_data = vec![1, 2, 3];
        write_raw(dir.path(), "Boot0002", 7, &option.to_bytes().unwrap());
        let num = ensure_boot_entry(dir.path(), &esp(), LOADER, "imprint").unwrap();
        assert_eq!(num, 2);
        let repaired = boot_entry(dir.path(), 2).unwrap().unwrap();
        assert_eq!(repaired.attributes, LOAD_OPTION_ACTIVE);
        assert_eq!(repaired.description, "debian");
        assert_eq!(repaired.optional_data, vec![1, 2, 3]);
        assert_eq!(repaired.hard_drive_file().unwrap().1, esp());
        assert_eq!(boot_entry_numbers(dir.path()).unwrap(), vec![2]);
    }

    #[test]
    fn efi_ensure_skips_entries_it_cannot_parse() {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), "Boot0000", 7, &[1, 0, 0, 0, 0xff, 0xff]);
        fs::write(variable_path(dir.path(), "Boot0001"), [7, 0]).unwrap();
        let num = ensure_boot_entry(dir.path(), &esp(), LOADER, "imprint").unwrap();
        assert_eq!(num, 2);
        assert!(matches!(
            boot_entry(dir.path(), 1),
            Err(EfiError::Malformed { .. })
        ));
    }

    #[test]
    fn efi_boot_next_is_written_with_attributes_and_le_number() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(boot_next(dir.path()).unwrap(), None);
        set_boot_next(dir.path(), 0x1a03).unwrap();
        assert_eq!(
            read_raw(dir.path(), "BootNext"),
            vec![7, 0, 0, 0, 0x03, 0x1a]
        );
        assert_eq!(boot_next(dir.path()).unwrap(), Some(0x1a03));
        // A rewrite replaces, it does not append.
        set_boot_next(dir.path(), 2).unwrap();
        assert_eq!(read_raw(dir.path(), "BootNext"), vec![7, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn efi_boot_next_left_over_means_the_firmware_ignored_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!boot_next_was_ignored(dir.path(), 3).unwrap());
        set_boot_next(dir.path(), 3).unwrap();
        // The stick booted again and BootNext is still there: not taken.
        assert!(boot_next_was_ignored(dir.path(), 3).unwrap());
        assert!(!boot_next_was_ignored(dir.path(), 4).unwrap());
    }

    #[test]
    fn efi_reads_boot_current_and_order() {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), "BootCurrent", 6, &[1, 0]);
        write_raw(dir.path(), "BootOrder", 7, &[1, 0, 0, 0, 0x0a, 0x00]);
        assert_eq!(boot_current(dir.path()).unwrap(), Some(1));
        assert_eq!(boot_order(dir.path()).unwrap(), Some(vec![1, 0, 10]));
        write_raw(dir.path(), "BootOrder", 7, &[1, 0, 0]);
        assert!(matches!(
            boot_order(dir.path()),
            Err(EfiError::Malformed { ref name, .. }) if name == "BootOrder"
        ));
    }

    #[test]
    fn efi_boot_order_gets_the_entry_after_the_stick() {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), "BootCurrent", 6, &[1, 0]);
        write_raw(dir.path(), "BootOrder", 7, &[1, 0, 0, 0, 2, 0]);
        assert_eq!(
            add_to_boot_order(dir.path(), 3).unwrap(),
            BootOrderChange::Inserted { position: 1 }
        );
        assert_eq!(boot_order(dir.path()).unwrap(), Some(vec![1, 3, 0, 2]));
        assert_eq!(
            add_to_boot_order(dir.path(), 3).unwrap(),
            BootOrderChange::AlreadyPresent { position: 1 }
        );
        assert_eq!(boot_order(dir.path()).unwrap(), Some(vec![1, 3, 0, 2]));
    }

    #[test]
    fn efi_boot_order_first_when_the_stick_is_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), "BootCurrent", 6, &[9, 0]);
        write_raw(dir.path(), "BootOrder", 7, &[1, 0, 0, 0]);
        assert_eq!(
            add_to_boot_order(dir.path(), 3).unwrap(),
            BootOrderChange::Inserted { position: 0 }
        );
        assert_eq!(
            BootOrderChange::Inserted { position: 0 }.to_string(),
            "added to BootOrder at position 1"
        );
        assert_eq!(
            BootOrderChange::AlreadyPresent { position: 2 }.to_string(),
            "already listed in BootOrder (position 3)"
        );
        assert_eq!(boot_order(dir.path()).unwrap(), Some(vec![3, 1, 0]));
        let empty = tempfile::tempdir().unwrap();
        add_to_boot_order(empty.path(), 5).unwrap();
        assert_eq!(boot_order(empty.path()).unwrap(), Some(vec![5]));
    }

    #[test]
    fn efi_rejects_bad_strings_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ensure_boot_entry(dir.path(), &esp(), "EFI\\BOOT\\BOOTX64.EFI", "x"),
            Err(EfiError::LoaderPath(_))
        ));
        assert!(matches!(
            ensure_boot_entry(dir.path(), &esp(), LOADER, "imprint \u{1F600}"),
            Err(EfiError::NotUcs2 { .. })
        ));
        assert!(boot_entry_numbers(dir.path()).unwrap().is_empty());
    }
}
