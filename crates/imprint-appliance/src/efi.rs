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

// The install flow (flow.rs, written concurrently) is what calls this API; until it lands
// nothing outside the tests does.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

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

/// Media device path (type 4).
const MEDIA_DEVICE_PATH: u8 = 0x04;
/// Media / Hard Drive subtype.
const MEDIA_HARDDRIVE_DP: u8 = 0x01;
/// Media / File Path subtype.
const MEDIA_FILEPATH_DP: u8 = 0x04;
/// End of hardware device path (type 0x7f).
const END_DEVICE_PATH_TYPE: u8 = 0x7f;
/// End of the whole device path.
const END_ENTIRE_DEVICE_PATH_SUBTYPE: u8 = 0xff;
/// End of this instance; another instance follows.
const END_INSTANCE_DEVICE_PATH_SUBTYPE: u8 = 0x01;
/// Payload of a Hard Drive node: number u32, start u64, size u64, signature [16], format u8,
/// signature type u8 (the node is 42 bytes with its 4-byte header).
const HARDDRIVE_DATA_LEN: usize = 38;
/// Hard Drive node partition format: GUID partition table.
const PARTITION_FORMAT_GPT: u8 = 0x02;
/// Hard Drive node signature type: GUID.
const SIGNATURE_TYPE_GUID: u8 = 0x02;

/// `EFIVARFS_MAGIC` from `<linux/magic.h>`: tells the real efivarfs from a test directory.
const EFIVARFS_MAGIC: i128 = 0xde5e_81e4;

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

/// One variable's content: the attribute word and the data after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// `EFI_VARIABLE_*` bits.
    pub attributes: u32,
    /// The data, without the attribute word.
    pub data: Vec<u8>,
}

/// One device path node, kept as raw bytes so any node survives a parse/serialize round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePathNode {
    /// Node type (4 = media, 0x7f = end, …).
    pub node_type: u8,
    /// Node subtype.
    pub sub_type: u8,
    /// The node's payload, after its 4-byte header.
    pub data: Vec<u8>,
}

impl DevicePathNode {
    /// A Hard Drive media node for a GPT partition.
    pub fn hard_drive(esp: &EspLocation) -> Self {
        let mut data = Vec::with_capacity(HARDDRIVE_DATA_LEN);
        data.extend_from_slice(&esp.partition_number.to_le_bytes());
        data.extend_from_slice(&esp.start_lba.to_le_bytes());
        data.extend_from_slice(&esp.size_lba.to_le_bytes());
        // EFI_GUID is stored mixed-endian: the first three fields little-endian.
        data.extend_from_slice(&esp.partition_guid.to_bytes_le());
        data.push(PARTITION_FORMAT_GPT);
        data.push(SIGNATURE_TYPE_GUID);
        DevicePathNode {
            node_type: MEDIA_DEVICE_PATH,
            sub_type: MEDIA_HARDDRIVE_DP,
            data,
        }
    }

    /// A File Path media node (UCS-2, NUL-terminated).
    pub fn file_path(path: &str) -> Result<Self, EfiError> {
        Ok(DevicePathNode {
            node_type: MEDIA_DEVICE_PATH,
            sub_type: MEDIA_FILEPATH_DP,
            data: ucs2_nul("loader path", path)?,
        })
    }

    /// The End of Entire Device Path node.
    pub fn end() -> Self {
        DevicePathNode {
            node_type: END_DEVICE_PATH_TYPE,
            sub_type: END_ENTIRE_DEVICE_PATH_SUBTYPE,
            data: Vec::new(),
        }
    }

    /// The GPT partition this node names, if it is a Hard Drive node with a GUID signature.
    pub fn as_hard_drive(&self) -> Option<EspLocation> {
        if self.node_type != MEDIA_DEVICE_PATH
            || self.sub_type != MEDIA_HARDDRIVE_DP
            || self.data.len() != HARDDRIVE_DATA_LEN
            || self.data[36] != PARTITION_FORMAT_GPT
            || self.data[37] != SIGNATURE_TYPE_GUID
        {
            return None;
        }
        let d = &self.data;
        Some(EspLocation {
            partition_number: u32::from_le_bytes(d[0..4].try_into().ok()?),
            start_lba: u64::from_le_bytes(d[4..12].try_into().ok()?),
            size_lba: u64::from_le_bytes(d[12..20].try_into().ok()?),
            partition_guid: Uuid::from_bytes_le(d[20..36].try_into().ok()?),
        })
    }

    /// The path of a File Path node, if this is one and it decodes.
    pub fn as_file_path(&self) -> Option<String> {
        if self.node_type != MEDIA_DEVICE_PATH || self.sub_type != MEDIA_FILEPATH_DP {
            return None;
        }
        decode_ucs2_nul(&self.data).map(|(s, _)| s)
    }

    fn is_end(&self) -> bool {
        self.node_type == END_DEVICE_PATH_TYPE
    }

    fn is_end_entire(&self) -> bool {
        self.node_type == END_DEVICE_PATH_TYPE && self.sub_type == END_ENTIRE_DEVICE_PATH_SUBTYPE
    }

    fn encoded_len(&self) -> usize {
        4 + self.data.len()
    }

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let len = u16::try_from(self.encoded_len())
            .map_err(|_| format!("device path node of {} bytes", self.encoded_len()))?;
        out.push(self.node_type);
        out.push(self.sub_type);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.data);
        Ok(())
    }
}

/// An `EFI_LOAD_OPTION`: the content of a `Boot####` variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    /// `LOAD_OPTION_*` bits.
    pub attributes: u32,
    /// The name the firmware's boot menu shows.
    pub description: String,
    /// The device path list, End node(s) included, exactly as stored.
    pub file_path_list: Vec<DevicePathNode>,
    /// Whatever follows the device path list (often empty; shim and Windows put data here).
    pub optional_data: Vec<u8>,
}

impl LoadOption {
    /// An active option booting `loader` from the partition `esp`:
    /// `HD(n,GPT,guid,start,size)/File(loader)`, as `efibootmgr -c` creates it.
    pub fn new(esp: &EspLocation, loader: &str, description: &str) -> Result<Self, EfiError> {
        // Validate now so serialization cannot fail on the description later.
        ucs2_nul("description", description)?;
        Ok(LoadOption {
            attributes: LOAD_OPTION_ACTIVE,
            description: description.to_owned(),
            file_path_list: vec![
                DevicePathNode::hard_drive(esp),
                DevicePathNode::file_path(loader)?,
                DevicePathNode::end(),
            ],
            optional_data: Vec::new(),
        })
    }

    /// Parses a `Boot####` variable's data (after the attribute word).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 6 {
            return Err(format!(
                "{} bytes, shorter than a load option header",
                bytes.len()
            ));
        }
        let attributes = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let path_len = usize::from(u16::from_le_bytes([bytes[4], bytes[5]]));
        let rest = &bytes[6..];
        let (description, desc_len) = decode_ucs2_nul(rest)
            .ok_or_else(|| "description is not NUL-terminated UTF-16".to_owned())?;
        let rest = &rest[desc_len..];
        if rest.len() < path_len {
            return Err(format!(
                "device path list of {path_len} bytes but only {} bytes follow the description",
                rest.len()
            ));
        }
        let (mut paths, optional_data) = rest.split_at(path_len);
        let mut file_path_list = Vec::new();
        while !paths.is_empty() {
            if paths.len() < 4 {
                return Err(format!(
                    "{} stray bytes at the end of the device path list",
                    paths.len()
                ));
            }
            let node_len = usize::from(u16::from_le_bytes([paths[2], paths[3]]));
            if node_len < 4 || node_len > paths.len() {
                return Err(format!(
                    "device path node {:#04x}/{:#04x} claims {node_len} bytes, {} left",
                    paths[0],
                    paths[1],
                    paths.len()
                ));
            }
            file_path_list.push(DevicePathNode {
                node_type: paths[0],
                sub_type: paths[1],
                data: paths[4..node_len].to_vec(),
            });
            paths = &paths[node_len..];
        }
        if !file_path_list.iter().any(DevicePathNode::is_end_entire) {
            return Err("device path list has no End node".to_owned());
        }
        Ok(LoadOption {
            attributes,
            description,
            file_path_list,
            optional_data: optional_data.to_vec(),
        })
    }

    /// Serializes to a `Boot####` variable's data (after the attribute word).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let description = ucs2_nul("description", &self.description).map_err(|e| e.to_string())?;
        let mut paths = Vec::new();
        for node in &self.file_path_list {
            node.encode_into(&mut paths)?;
        }
        let path_len = u16::try_from(paths.len())
            .map_err(|_| format!("device path list of {} bytes", paths.len()))?;
        let mut out =
            Vec::with_capacity(6 + description.len() + paths.len() + self.optional_data.len());
        out.extend_from_slice(&self.attributes.to_le_bytes());
        out.extend_from_slice(&path_len.to_le_bytes());
        out.extend_from_slice(&description);
        out.extend_from_slice(&paths);
        out.extend_from_slice(&self.optional_data);
        Ok(out)
    }

    /// The Hard Drive node of the first device path instance and the File Path that follows
    /// it, if the option boots a file from a GPT partition (a full path such as
    /// `PciRoot(0)/…/NVMe(…)/HD(…)/File(…)` counts too).
    pub fn hard_drive_file(&self) -> Option<(usize, EspLocation, String)> {
        let first_instance = self
            .file_path_list
            .iter()
            .position(DevicePathNode::is_end)
            .map_or(&self.file_path_list[..], |end| &self.file_path_list[..end]);
        let (index, hd) = first_instance
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, node)| node.as_hard_drive().map(|hd| (i, hd)))?;
        let file = first_instance.get(index + 1)?.as_file_path()?;
        Some((index, hd, file))
    }
}

/// Whether the machine booted through UEFI (`<sys_root>/firmware/efi` exists).
pub fn efi_booted(sys_root: &Path) -> bool {
    sys_root.join("firmware/efi").is_dir()
}

/// The efivarfs file of a global variable.
fn variable_path(efivars: &Path, name: &str) -> PathBuf {
    efivars.join(format!("{name}-{EFI_GLOBAL_VARIABLE}"))
}

/// The name of boot option `num`: `Boot` and four upper-case hex digits, as the spec requires.
pub fn boot_entry_name(num: u16) -> String {
    format!("Boot{num:04X}")
}

/// Reads a global variable; `None` if it does not exist.
pub fn read_variable(efivars: &Path, name: &str) -> Result<Option<Variable>, EfiError> {
    let path = variable_path(efivars, name);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EfiError::Read {
                name: name.to_owned(),
                path,
                source,
            })
        }
    };
    let Some((attributes, data)) = bytes.split_first_chunk::<4>() else {
        return Err(EfiError::Malformed {
            name: name.to_owned(),
            path,
            reason: format!("{} bytes, no room for the attribute word", bytes.len()),
        });
    };
    Ok(Some(Variable {
        attributes: u32::from_le_bytes(*attributes),
        data: data.to_vec(),
    }))
}

/// Writes a global variable in one `write()`, over an existing (immutable) file or as a new
/// one, then reads it back to check the firmware stored it.
pub fn write_variable(efivars: &Path, name: &str, var: &Variable) -> Result<(), EfiError> {
    let path = variable_path(efivars, name);
    let mut buf = Vec::with_capacity(4 + var.data.len());
    buf.extend_from_slice(&var.attributes.to_le_bytes());
    buf.extend_from_slice(&var.data);

    let immutable = ImmutableGuard::clear(&path).map_err(|source| EfiError::Immutable {
        name: name.to_owned(),
        path: path.clone(),
        source,
    })?;
    let write_err = |source| EfiError::Write {
        name: name.to_owned(),
        path: path.clone(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create(true).mode(0o644);
    // efivarfs replaces the variable with what one write() carries and has no truncate; a
    // plain directory (the tests) needs O_TRUNC to drop a longer old content.
    if !is_efivarfs(efivars) {
        options.truncate(true);
    }
    let mut file = options.open(&path).map_err(write_err)?;
    let written = loop {
        match file.write(&buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(write_err(e)),
        }
    };
    drop(file);
    drop(immutable);
    if written != buf.len() {
        return Err(EfiError::ShortWrite {
            name: name.to_owned(),
            path,
            written,
            len: buf.len(),
        });
    }
    match read_variable(efivars, name)? {
        Some(back)
            if back.data == var.data
                && back.attributes & BOOT_VARIABLE_ATTRIBUTES
                    == var.attributes & BOOT_VARIABLE_ATTRIBUTES =>
        {
            Ok(())
        }
        _ => Err(EfiError::Verify {
            name: name.to_owned(),
            path,
        }),
    }
}

fn is_efivarfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        // f_type is a signed long on glibc and an unsigned one on musl.
        .map(|s| i128::from(s.filesystem_type().0) == EFIVARFS_MAGIC)
        .unwrap_or(false)
}

/// Reads a variable holding one `u16` (`BootCurrent`, `BootNext`).
fn read_u16_variable(efivars: &Path, name: &str) -> Result<Option<u16>, EfiError> {
    let Some(var) = read_variable(efivars, name)? else {
        return Ok(None);
    };
    match <[u8; 2]>::try_from(var.data.as_slice()) {
        Ok(bytes) => Ok(Some(u16::from_le_bytes(bytes))),
        Err(_) => Err(EfiError::Malformed {
            name: name.to_owned(),
            path: variable_path(efivars, name),
            reason: format!("{} bytes of data, expected 2", var.data.len()),
        }),
    }
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

/// UCS-2 little-endian with the terminating NUL.
fn ucs2_nul(what: &'static str, s: &str) -> Result<Vec<u8>, EfiError> {
    let mut out = Vec::with_capacity(2 * (s.len() + 1));
    for c in s.chars() {
        let unit = u16::try_from(u32::from(c))
            .ok()
            .filter(|&u| u != 0)
            .ok_or_else(|| EfiError::NotUcs2 {
                what,
                value: s.to_owned(),
            })?;
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out.extend_from_slice(&[0, 0]);
    Ok(out)
}

/// Decodes a NUL-terminated UTF-16LE string; returns it and the bytes it used, NUL included.
fn decode_ucs2_nul(bytes: &[u8]) -> Option<(String, usize)> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let used = 2 * (units.len() + 1);
    if used > bytes.len() {
        return None;
    }
    String::from_utf16(&units).ok().map(|s| (s, used))
}

/// Clears `FS_IMMUTABLE_FL` on an existing variable file and puts it back when dropped.
struct ImmutableGuard {
    path: Option<PathBuf>,
}

impl ImmutableGuard {
    fn clear(path: &Path) -> io::Result<Self> {
        let none = ImmutableGuard { path: None };
        let file = match fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(none),
            Err(e) => return Err(e),
        };
        let Some(flags) = ioctl::get_flags(&file)? else {
            // The filesystem has no inode flags (a test directory): nothing to clear.
            return Ok(none);
        };
        if flags & ioctl::FS_IMMUTABLE_FL == 0 {
            return Ok(none);
        }
        ioctl::set_flags(&file, flags & !ioctl::FS_IMMUTABLE_FL)?;
        Ok(ImmutableGuard {
            path: Some(path.to_owned()),
        })
    }
}

impl Drop for ImmutableGuard {
    fn drop(&mut self) {
        // Best effort: the flag only protects against accidental deletion by root; a variable
        // left mutable is still correct.
        if let Some(path) = &self.path {
            if let Ok(file) = fs::File::open(path) {
                if let Ok(Some(flags)) = ioctl::get_flags(&file) {
                    let _ = ioctl::set_flags(&file, flags | ioctl::FS_IMMUTABLE_FL);
                }
            }
        }
    }
}

/// `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS`, reached only through the safe functions below.
mod ioctl {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::libc::{c_int, c_long};

    /// `FS_IMMUTABLE_FL` from `<linux/fs.h>`.
    pub const FS_IMMUTABLE_FL: c_int = 0x10;

    // The request numbers encode sizeof(long) (`_IOR('f', 1, long)`), but the kernel reads and
    // writes an int, as chattr and systemd pass it.
    nix::ioctl_read_bad!(
        fs_ioc_getflags,
        nix::request_code_read!(b'f', 1, std::mem::size_of::<c_long>()),
        c_int
    );
    nix::ioctl_write_ptr_bad!(
        fs_ioc_setflags,
        nix::request_code_write!(b'f', 2, std::mem::size_of::<c_long>()),
        c_int
    );

    fn unsupported(e: Errno) -> bool {
        matches!(e, Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::ENOSYS)
    }

    /// The inode flags, or `None` where the filesystem has none (ENOTTY/EOPNOTSUPP).
    pub fn get_flags(file: &File) -> io::Result<Option<c_int>> {
        let mut flags: c_int = 0;
        // SAFETY: the fd is open for the lifetime of `file`; the kernel writes one int to
        // `flags`, which is a live, properly aligned c_int.
        match unsafe { fs_ioc_getflags(file.as_raw_fd(), &mut flags) } {
            Ok(_) => Ok(Some(flags)),
            Err(e) if unsupported(e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the inode flags; a filesystem without flags is not an error.
    pub fn set_flags(file: &File, flags: c_int) -> io::Result<()> {
        // SAFETY: the fd is open for the lifetime of `file`; the kernel only reads one int
        // from `&flags`, which lives across the call.
        match unsafe { fs_ioc_setflags(file.as_raw_fd(), &flags) } {
            Ok(_) => Ok(()),
            Err(e) if unsupported(e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GUID: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
    const LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

    fn esp() -> EspLocation {
        EspLocation {
            partition_number: 1,
            start_lba: 0x800,
            size_lba: 0x10_0000,
            partition_guid: Uuid::parse_str(GUID).unwrap(),
        }
    }

    fn ucs2(s: &str) -> Vec<u8> {
        s.encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect()
    }

    /// The bytes efibootmgr writes for
    /// `efibootmgr -c -d /dev/sda -p 1 -L imprint -l '\EFI\BOOT\BOOTX64.EFI'`
    /// = `HD(1,GPT,4f68bce3-…,0x800,0x100000)/\EFI\BOOT\BOOTX64.EFI`, laid out by hand.
    fn efibootmgr_bytes() -> Vec<u8> {
        let mut b = vec![
            0x01, 0x00, 0x00, 0x00, // LOAD_OPTION_ACTIVE
            0x5e, 0x00, // FilePathListLength = 42 + 48 + 4 = 94
        ];
        b.extend(ucs2("imprint"));
        b.extend([0x04, 0x01, 0x2a, 0x00]); // HD node, 42 bytes
        b.extend([0x01, 0x00, 0x00, 0x00]); // partition 1
        b.extend([0x00, 0x08, 0, 0, 0, 0, 0, 0]); // start 0x800
        b.extend([0x00, 0x00, 0x10, 0x00, 0, 0, 0, 0]); // size 0x100000
        b.extend([
            0xe3, 0xbc, 0x68, 0x4f, 0xcd, 0xe8, 0xb1, 0x4d, // mixed-endian GUID
            0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09,
        ]);
        b.extend([0x02, 0x02]); // GPT, GUID signature
        b.extend([0x04, 0x04, 0x30, 0x00]); // File node, 4 + 22 * 2 = 48 bytes
        b.extend(ucs2(LOADER));
        b.extend([0x7f, 0xff, 0x04, 0x00]); // End
        b
    }

    fn write_raw(dir: &Path, name: &str, attributes: u32, data: &[u8]) {
        let mut bytes = attributes.to_le_bytes().to_vec();
        bytes.extend_from_slice(data);
        fs::write(variable_path(dir, name), bytes).unwrap();
    }

    fn read_raw(dir: &Path, name: &str) -> Vec<u8> {
        fs::read(variable_path(dir, name)).unwrap()
    }

    #[test]
    fn efi_load_option_matches_efibootmgr_layout() {
        let option = LoadOption::new(&esp(), LOADER, "imprint").unwrap();
        assert_eq!(option.to_bytes().unwrap(), efibootmgr_bytes());
        let parsed = LoadOption::parse(&efibootmgr_bytes()).unwrap();
        assert_eq!(parsed, option);
        let (index, hd, file) = parsed.hard_drive_file().unwrap();
        assert_eq!((index, hd, file.as_str()), (0, esp(), LOADER));
    }

    #[test]
    fn efi_unknown_nodes_and_optional_data_round_trip() {
        // PciRoot(0x0)/Pci(0x2,0x0)/NVMe(0x1,…)/HD(…)/File(…)/End, plus shim-style optional
        // data, plus a vendor node with odd padding after an End Instance.
        let mut paths = vec![
            0x02, 0x01, 0x0c, 0x00, 0xd0, 0x41, 0x03, 0x0a, 0x00, 0x00, 0x00, 0x00, // ACPI
            0x01, 0x01, 0x06, 0x00, 0x00, 0x02, // PCI
            0x03, 0x17, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, // NVMe
        ];
        let hd_and_file = &efibootmgr_bytes()[6 + 16..6 + 16 + 90];
        paths.extend_from_slice(hd_and_file);
        paths.extend([0x7f, 0x01, 0x04, 0x00]); // End Instance
        paths.extend([0x01, 0x04, 0x15, 0x00]); // vendor node, 21 bytes
        paths.extend([0xaa; 17]);
        paths.extend([0x7f, 0xff, 0x04, 0x00]);
        let mut bytes = vec![0x01, 0, 0, 0];
        bytes.extend((paths.len() as u16).to_le_bytes());
        bytes.extend(ucs2("UEFI NVMe: Samsung"));
        bytes.extend(&paths);
        bytes.extend(ucs2("\\grubx64.efi")); // optional data
        let option = LoadOption::parse(&bytes).unwrap();
        assert_eq!(option.file_path_list.len(), 8);
        assert_eq!(option.to_bytes().unwrap(), bytes);
        let (index, hd, file) = option.hard_drive_file().unwrap();
        assert_eq!((index, hd, file.as_str()), (3, esp(), LOADER));
    }

    #[test]
    fn efi_malformed_load_options_are_errors_not_panics() {
        let good = efibootmgr_bytes();
        for cut in 0..good.len() {
            assert!(LoadOption::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut zero_len_node = good.clone();
        zero_len_node[6 + 16 + 2] = 0; // HD node length 0
        assert!(LoadOption::parse(&zero_len_node).is_err());
    }

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

    #[test]
    fn efi_write_over_an_immutable_file_restores_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), "BootNext", 7, &[1, 0]);
        let path = variable_path(dir.path(), "BootNext");
        let file = fs::File::open(&path).unwrap();
        let Some(flags) = ioctl::get_flags(&file).unwrap() else {
            return; // no inode flags on this filesystem
        };
        if ioctl::set_flags(&file, flags | ioctl::FS_IMMUTABLE_FL).is_err() {
            return; // not root (CAP_LINUX_IMMUTABLE)
        }
        let set = ioctl::get_flags(&file).unwrap().unwrap_or(0) & ioctl::FS_IMMUTABLE_FL != 0;
        let result = set_boot_next(dir.path(), 4);
        let after = ioctl::get_flags(&file).unwrap().unwrap_or(0);
        // Clear it so the temp dir can be removed whatever happened.
        ioctl::set_flags(&file, after & !ioctl::FS_IMMUTABLE_FL).unwrap();
        result.unwrap();
        assert_eq!(read_raw(dir.path(), "BootNext"), vec![7, 0, 0, 0, 4, 0]);
        if set {
            assert_ne!(after & ioctl::FS_IMMUTABLE_FL, 0, "flag restored");
        }
    }

    #[test]
    fn efi_booted_checks_firmware_efi() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!efi_booted(dir.path()));
        fs::create_dir_all(dir.path().join("firmware/efi/efivars")).unwrap();
        assert!(efi_booted(dir.path()));
    }
}
