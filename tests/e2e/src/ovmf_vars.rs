//! A reader for OVMF's variable store file (`OVMF_VARS*.fd`), so tests can check what the
//! appliance left in the firmware's NVRAM (`BootNext`, `Boot####`, `BootOrder`) after qemu
//! exits.
//!
//! It owns the on-flash layout only: the firmware volume header, the (authenticated or plain)
//! variable store header, and the variable records (`StartId` 0x55AA, `State`, attributes,
//! name, vendor GUID, data, each record 4-byte aligned). It lives with the harness, not in
//! the appliance: nothing on the stick reads OVMF's files.

use std::io;
use std::path::{Path, PathBuf};

/// The EFI global variable vendor GUID, lower-case text.
pub const EFI_GLOBAL_VARIABLE: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// `"_FVH"` at offset 40 of a firmware volume header.
const FV_SIGNATURE: &[u8; 4] = b"_FVH";
/// Offset of the signature and of `HeaderLength` in `EFI_FIRMWARE_VOLUME_HEADER`.
const FV_SIGNATURE_OFFSET: usize = 40;
const FV_HEADER_LENGTH_OFFSET: usize = 48;
/// `gEfiAuthenticatedVariableGuid`, as stored (mixed-endian).
const AUTH_VARIABLE_STORE_GUID: [u8; 16] = guid_bytes(
    0xaaf3_2c78,
    0x947b,
    0x439a,
    [0xa1, 0x80, 0x2e, 0x14, 0x4e, 0xc3, 0x77, 0x92],
);
/// `gEfiVariableGuid` (a store without authentication fields), as stored.
const VARIABLE_STORE_GUID: [u8; 16] = guid_bytes(
    0xddcf_3616,
    0x3275,
    0x4164,
    [0x98, 0xb6, 0xfe, 0x85, 0x70, 0x7f, 0xfe, 0x7d],
);
/// `VARIABLE_STORE_HEADER`: GUID, Size u32, Format u8, State u8, two reserved fields.
const STORE_HEADER_LEN: usize = 28;
/// `VARIABLE_DATA`: the marker at the start of every variable record.
const START_ID: u16 = 0x55aa;
/// `AUTHENTICATED_VARIABLE_HEADER`: StartId, State, Reserved, Attributes, MonotonicCount,
/// TimeStamp (EFI_TIME, 16 bytes), PubKeyIndex, NameSize, DataSize, VendorGuid.
const AUTH_HEADER_LEN: usize = 60;
/// `VARIABLE_HEADER`: StartId, State, Reserved, Attributes, NameSize, DataSize, VendorGuid.
const PLAIN_HEADER_LEN: usize = 32;
/// A variable fully written and not deleted.
pub const VAR_ADDED: u8 = 0x3f;
/// `VAR_ADDED & VAR_IN_DELETED_TRANSITION`: being replaced; live only if no newer copy exists.
pub const VAR_ADDED_IN_DELETED_TRANSITION: u8 = 0x3e;

const fn guid_bytes(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Why a VARS file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OvmfVarsError {
    /// The file could not be read.
    #[error("reading OVMF variable store {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes are not a variable store we understand.
    #[error("OVMF variable store: {0}")]
    Format(String),
}

/// One variable record of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVariable {
    /// The variable name (decoded from UCS-2, without the NUL).
    pub name: String,
    /// The vendor GUID as lower-case text, e.g. [`EFI_GLOBAL_VARIABLE`].
    pub vendor_guid: String,
    /// `EFI_VARIABLE_*` bits.
    pub attributes: u32,
    /// The record's `State` byte ([`VAR_ADDED`] for a live variable).
    pub state: u8,
    /// The data.
    pub data: Vec<u8>,
}

/// A parsed variable store: every record in flash order, deleted ones included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarStore {
    /// Whether the store uses authenticated variable headers (OVMF's do).
    pub authenticated: bool,
    /// All records that have a valid header, in the order they are in flash.
    pub records: Vec<StoredVariable>,
}

impl VarStore {
    /// The variables the firmware would see: `VAR_ADDED` records, plus a record in deleted
    /// transition when no `VAR_ADDED` copy of it exists (power lost mid-update).
    pub fn live(&self) -> Vec<&StoredVariable> {
        let added = |v: &StoredVariable| {
            self.records
                .iter()
                .any(|o| o.state == VAR_ADDED && o.name == v.name && o.vendor_guid == v.vendor_guid)
        };
        self.records
            .iter()
            .filter(|v| {
                v.state == VAR_ADDED || (v.state == VAR_ADDED_IN_DELETED_TRANSITION && !added(v))
            })
            .collect()
    }

    /// The live variable `name` of vendor `guid` (lower-case text).
    pub fn get(&self, name: &str, guid: &str) -> Option<&StoredVariable> {
        self.live()
            .into_iter()
            .find(|v| v.name == name && v.vendor_guid.eq_ignore_ascii_case(guid))
    }

    /// The data of the global variable `name` (`BootOrder`, `Boot0003`, …).
    pub fn global(&self, name: &str) -> Option<&[u8]> {
        self.get(name, EFI_GLOBAL_VARIABLE)
            .map(|v| v.data.as_slice())
    }

    /// `BootNext`, if set and two bytes long.
    pub fn boot_next(&self) -> Option<u16> {
        let data: [u8; 2] = self.global("BootNext")?.try_into().ok()?;
        Some(u16::from_le_bytes(data))
    }

    /// `BootOrder`, if set.
    pub fn boot_order(&self) -> Option<Vec<u16>> {
        let data = self.global("BootOrder")?;
        Some(
            data.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )
    }

    /// The data of `Boot####` option `num` (an `EFI_LOAD_OPTION`).
    pub fn boot_entry(&self, num: u16) -> Option<&[u8]> {
        self.global(&format!("Boot{num:04X}"))
    }
}

/// Reads and parses a VARS file (e.g. the per-run copy of `OVMF_VARS_4M.fd`).
pub fn read(path: &Path) -> Result<VarStore, OvmfVarsError> {
    let bytes = std::fs::read(path).map_err(|source| OvmfVarsError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&bytes)
}

fn format_err(msg: impl Into<String>) -> OvmfVarsError {
    OvmfVarsError::Format(msg.into())
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses a VARS image: firmware volume header, variable store header, variable records.
pub fn parse(fd: &[u8]) -> Result<VarStore, OvmfVarsError> {
    if fd.get(FV_SIGNATURE_OFFSET..FV_SIGNATURE_OFFSET + 4) != Some(FV_SIGNATURE) {
        return Err(format_err(
            "no firmware volume signature \"_FVH\" at offset 40",
        ));
    }
    let store_start = le_u16(fd, FV_HEADER_LENGTH_OFFSET)
        .map(usize::from)
        .ok_or_else(|| format_err("truncated firmware volume header"))?;
    let store_guid = fd
        .get(store_start..store_start + 16)
        .ok_or_else(|| format_err("no variable store header after the firmware volume header"))?;
    let authenticated = if store_guid == AUTH_VARIABLE_STORE_GUID {
        true
    } else if store_guid == VARIABLE_STORE_GUID {
        false
    } else {
        return Err(format_err(format!(
            "unknown variable store signature at offset {store_start:#x}"
        )));
    };
    let store_size = le_u32(fd, store_start + 16)
        .and_then(|s| usize::try_from(s).ok())
        .ok_or_else(|| format_err("truncated variable store header"))?;
    let store_end = store_start
        .checked_add(store_size)
        .filter(|&end| end <= fd.len() && store_size >= STORE_HEADER_LEN)
        .ok_or_else(|| {
            format_err(format!(
                "variable store of {store_size:#x} bytes at {store_start:#x} does not fit in {:#x}",
                fd.len()
            ))
        })?;
    let header_len = if authenticated {
        AUTH_HEADER_LEN
    } else {
        PLAIN_HEADER_LEN
    };
    // Where NameSize, DataSize and VendorGuid sit in the header.
    let sizes_at = header_len - 24;

    let mut records = Vec::new();
    let mut at = align4(store_start + STORE_HEADER_LEN);
    while at + header_len <= store_end && le_u16(fd, at) == Some(START_ID) {
        let state = fd[at + 2];
        let field = |off: usize| {
            le_u32(fd, at + off)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format_err(format!("truncated variable header at {at:#x}")))
        };
        let attributes = le_u32(fd, at + 4)
            .ok_or_else(|| format_err(format!("truncated variable header at {at:#x}")))?;
        let name_size = field(sizes_at)?;
        let data_size = field(sizes_at + 4)?;
        let guid = &fd[at + sizes_at + 8..at + header_len];
        let name_at = at + header_len;
        let data_at = name_at.checked_add(name_size);
        let end = data_at.and_then(|d| d.checked_add(data_size));
        let (Some(data_at), Some(end)) = (data_at, end) else {
            return Err(format_err(format!("variable sizes overflow at {at:#x}")));
        };
        if end > store_end {
            return Err(format_err(format!(
                "variable at {at:#x} (name {name_size} bytes, data {data_size} bytes) runs past \
                 the store's end {store_end:#x}"
            )));
        }
        let name_units: Vec<u16> = fd[name_at..data_at]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        records.push(StoredVariable {
            name: String::from_utf16_lossy(&name_units),
            vendor_guid: guid_text(guid),
            attributes,
            state,
            data: fd[data_at..end].to_vec(),
        });
        at = align4(end);
    }
    Ok(VarStore {
        authenticated,
        records,
    })
}

/// Formats a stored (mixed-endian) GUID as lower-case text.
fn guid_text(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    for (i, idx) in [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
        .iter()
        .enumerate()
    {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{:02x}", b.get(*idx).copied().unwrap_or(0)));
    }
    s
}

/// A `Boot####` option (`EFI_LOAD_OPTION`), decoded as far as the tests need: where it
/// boots (the hard-drive node's partition and GUID, the file path) and how it is labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    /// `LOAD_OPTION_*` bits (1 = active).
    pub attributes: u32,
    /// The description shown in the firmware's boot menu.
    pub description: String,
    /// The GPT partition number of the first hard-drive node.
    pub partition: Option<u32>,
    /// That node's partition GUID, lower-case text.
    pub partition_guid: Option<String>,
    /// The file path node's path, e.g. `\EFI\BOOT\BOOTX64.EFI`.
    pub file_path: Option<String>,
}

fn utf16z(b: &[u8]) -> (String, usize) {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    (String::from_utf16_lossy(&units), (units.len() + 1) * 2)
}

/// Decodes an `EFI_LOAD_OPTION`: attributes, the UCS-2 description, then the device path
/// (nodes of type, subtype, 16-bit length; media/hard-drive = 4/1, media/file-path = 4/4).
pub fn load_option(data: &[u8]) -> Result<LoadOption, OvmfVarsError> {
    if data.len() < 8 {
        return Err(format_err("load option shorter than its header"));
    }
    let attributes = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let path_len = usize::from(u16::from_le_bytes([data[4], data[5]]));
    let (description, used) = utf16z(&data[6..]);
    let start = 6 + used;
    let path = data
        .get(start..start + path_len)
        .ok_or_else(|| format_err("load option's device path runs past its data"))?;
    let mut opt = LoadOption {
        attributes,
        description,
        partition: None,
        partition_guid: None,
        file_path: None,
    };
    let mut at = 0;
    while at + 4 <= path.len() {
        let (ty, sub) = (path[at], path[at + 1]);
        let len = usize::from(u16::from_le_bytes([path[at + 2], path[at + 3]]));
        if len < 4 || at + len > path.len() {
            return Err(format_err(format!(
                "device path node at {at} has length {len}"
            )));
        }
        let node = &path[at + 4..at + len];
        match (ty, sub) {
            (0x7f, 0xff) => break,
            (4, 1) if node.len() >= 38 && opt.partition.is_none() => {
                opt.partition = Some(u32::from_le_bytes([node[0], node[1], node[2], node[3]]));
                opt.partition_guid = Some(guid_text(&node[20..36]));
            }
            (4, 4) => opt.file_path = Some(utf16z(node).0),
            _ => {}
        }
        at += len;
    }
    Ok(opt)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
    const OVMF_VARS_MS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

    fn ucs2(s: &str) -> Vec<u8> {
        s.encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect()
    }

    /// A firmware volume with an authenticated store holding `vars` (name, state, data).
    pub(crate) fn synthetic_store(vars: &[(&str, u8, &[u8])]) -> Vec<u8> {
        let mut fd = vec![0u8; 0x48];
        fd[40..44].copy_from_slice(FV_SIGNATURE);
        fd[48..50].copy_from_slice(&0x48u16.to_le_bytes());
        let store_size = 0x1000u32;
        fd.extend_from_slice(&AUTH_VARIABLE_STORE_GUID);
        fd.extend_from_slice(&store_size.to_le_bytes());
        fd.extend_from_slice(&[0x5a, 0xfe, 0, 0, 0, 0, 0, 0]);
        let global = guid_bytes(
            0x8be4_df61,
            0x93ca,
            0x11d2,
            [0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c],
        );
        for (name, state, data) in vars {
            while !fd.len().is_multiple_of(4) {
                fd.push(0xff);
            }
            let name = ucs2(name);
            fd.extend_from_slice(&START_ID.to_le_bytes());
            fd.extend_from_slice(&[*state, 0]);
            fd.extend_from_slice(&7u32.to_le_bytes());
            fd.extend_from_slice(&[0; 8 + 16 + 4]); // count, timestamp, key index
            fd.extend_from_slice(&(name.len() as u32).to_le_bytes());
            fd.extend_from_slice(&(data.len() as u32).to_le_bytes());
            fd.extend_from_slice(&global);
            fd.extend_from_slice(&name);
            fd.extend_from_slice(data);
        }
        fd.resize(0x48 + store_size as usize, 0xff);
        fd
    }

    /// An `EFI_LOAD_OPTION` as the appliance writes one: active, `description`,
    /// HD(`partition`, GPT, `guid` as stored, 2048, 4096)/`loader`.
    pub(crate) fn load_option_bytes(
        description: &str,
        partition: u32,
        guid: [u8; 16],
        loader: &str,
    ) -> Vec<u8> {
        let mut hd = vec![4u8, 1, 42, 0];
        hd.extend_from_slice(&partition.to_le_bytes());
        hd.extend_from_slice(&2048u64.to_le_bytes());
        hd.extend_from_slice(&4096u64.to_le_bytes());
        hd.extend_from_slice(&guid);
        hd.extend_from_slice(&[2, 2]);
        let file = ucs2(loader);
        let mut fp = vec![4u8, 4];
        fp.extend_from_slice(&u16::try_from(file.len() + 4).unwrap().to_le_bytes());
        fp.extend_from_slice(&file);
        let path: Vec<u8> = [hd, fp, vec![0x7f, 0xff, 4, 0]].concat();
        let mut data = 1u32.to_le_bytes().to_vec();
        data.extend_from_slice(&u16::try_from(path.len()).unwrap().to_le_bytes());
        data.extend_from_slice(&ucs2(description));
        data.extend_from_slice(&path);
        data
    }

    /// 12345678-aaaa-bbbb-cccc-1234567890ab as GPT and device paths store it.
    pub(crate) const GUID: [u8; 16] = [
        0x78, 0x56, 0x34, 0x12, 0xaa, 0xaa, 0xbb, 0xbb, 0xcc, 0xcc, 0x12, 0x34, 0x56, 0x78, 0x90,
        0xab,
    ];

    #[test]
    fn load_options_decode_to_partition_guid_and_loader() {
        let data = load_option_bytes(
            "imprint: QEMU NVMe Ctrl NVME0001",
            2,
            GUID,
            "\\EFI\\BOOT\\BOOTX64.EFI",
        );
        let o = load_option(&data).unwrap();
        assert_eq!(o.attributes, 1);
        assert_eq!(o.description, "imprint: QEMU NVMe Ctrl NVME0001");
        assert_eq!(o.partition, Some(2));
        assert_eq!(
            o.partition_guid.as_deref(),
            Some("12345678-aaaa-bbbb-cccc-1234567890ab")
        );
        assert_eq!(o.file_path.as_deref(), Some("\\EFI\\BOOT\\BOOTX64.EFI"));
        // Truncated: an error, not a panic.
        assert!(load_option(&data[..data.len() - 10]).is_err());
        assert!(load_option(&data[..5]).is_err());
    }

    #[test]
    fn ovmf_vars_synthetic_store() {
        let fd = synthetic_store(&[
            ("BootOrder", 0x3c, &[0, 0]),     // deleted
            ("BootNext", VAR_ADDED, &[3, 0]), // odd-length name pads the next record
            ("BootOrder", VAR_ADDED, &[3, 0, 0, 0]),
            ("Boot0003", VAR_ADDED_IN_DELETED_TRANSITION, &[1, 2, 3]),
            ("Boot0001", VAR_ADDED_IN_DELETED_TRANSITION, &[9]),
            ("Boot0001", VAR_ADDED, &[1]),
        ]);
        let store = parse(&fd).unwrap();
        assert!(store.authenticated);
        assert_eq!(store.records.len(), 6);
        assert_eq!(store.records[0].vendor_guid, EFI_GLOBAL_VARIABLE);
        assert_eq!(store.boot_next(), Some(3));
        assert_eq!(store.boot_order(), Some(vec![3, 0]));
        assert_eq!(store.boot_entry(3), Some(&[1u8, 2, 3][..]));
        assert_eq!(store.boot_entry(1), Some(&[1u8][..]));
        assert_eq!(store.live().len(), 4);
    }

    #[test]
    fn ovmf_vars_rejects_damage_without_panicking() {
        let fd = synthetic_store(&[("BootNext", VAR_ADDED, &[3, 0])]);
        assert!(parse(&fd[..0x50]).is_err());
        let mut bad_sig = fd.clone();
        bad_sig[40] = b'X';
        assert!(parse(&bad_sig).is_err());
        let mut huge = fd.clone();
        let record = 0x48 + STORE_HEADER_LEN;
        let data_size_at = record + AUTH_HEADER_LEN - 24 + 4;
        huge[data_size_at..data_size_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
        for cut in 0..fd.len().min(0x100) {
            let _ = parse(&fd[..cut]);
        }
    }

    #[test]
    fn ovmf_vars_reads_the_installed_ovmf_files() {
        if !Path::new(OVMF_VARS).exists() {
            eprintln!("{OVMF_VARS} not installed (package ovmf); skipping");
            return;
        }
        let blank = read(Path::new(OVMF_VARS)).unwrap();
        assert!(blank.authenticated);
        assert_eq!(blank.boot_next(), None);
        assert!(blank.live().iter().all(|v| !v.name.starts_with("Boot")));
        if Path::new(OVMF_VARS_MS).exists() {
            // The Microsoft-keys store has enrolled keys: PK, KEK, db, dbx live.
            let ms = read(Path::new(OVMF_VARS_MS)).unwrap();
            let names: Vec<&str> = ms.live().iter().map(|v| v.name.as_str()).collect();
            for key in ["PK", "KEK", "db", "dbx"] {
                assert!(names.contains(&key), "{key} in {names:?}");
            }
            assert!(ms.get("PK", EFI_GLOBAL_VARIABLE).is_some());
        }
    }
}
