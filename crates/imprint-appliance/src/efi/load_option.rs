//! The `EFI_LOAD_OPTION` format of `Boot####` variables and the few device path nodes imprint
//! makes (Hard Drive, File Path, End); any other node is kept as raw bytes so existing entries
//! round-trip untouched.

use super::{EfiError, EspLocation, LOAD_OPTION_ACTIVE};
use uuid::Uuid;

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
/// Payload of a Hard Drive node: number u32, start u64, size u64, signature [16], format u8,
/// signature type u8 (the node is 42 bytes with its 4-byte header).
const HARDDRIVE_DATA_LEN: usize = 38;
/// Hard Drive node partition format: GUID partition table.
const PARTITION_FORMAT_GPT: u8 = 0x02;
/// Hard Drive node signature type: GUID.
const SIGNATURE_TYPE_GUID: u8 = 0x02;

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

/// Fixtures shared by the EFI tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_util {
    use super::*;

    pub const GUID: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
    pub const LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

    pub fn esp() -> EspLocation {
        EspLocation {
            partition_number: 1,
            start_lba: 0x800,
            size_lba: 0x10_0000,
            partition_guid: Uuid::parse_str(GUID).unwrap(),
        }
    }

    pub fn ucs2(s: &str) -> Vec<u8> {
        s.encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect()
    }

    /// The bytes efibootmgr writes for
    /// `efibootmgr -c -d /dev/sda -p 1 -L imprint -l '\EFI\BOOT\BOOTX64.EFI'`
    /// = `HD(1,GPT,4f68bce3-…,0x800,0x100000)/\EFI\BOOT\BOOTX64.EFI`, laid out by hand.
    pub fn efibootmgr_bytes() -> Vec<u8> {
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_util::{efibootmgr_bytes, esp, ucs2, LOADER};
    use super::*;

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
}
