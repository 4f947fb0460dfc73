//! The one place imprint reads, changes and lays out GUID partition tables.
//!
//! Every caller — the write engine, the seed, `imprint verify`, the appliance's "already
//! installed" check, the stick builder's tests — opens a GPT through [`GptTable::read`]. It
//! checks what the `gpt` crate would otherwise assert on (entry sizes other than 128 bytes,
//! which UEFI allows; absurd entry counts) and returns an error instead of panicking, because a
//! panic in PID 1 on a NUC with a strange old disk would leave the machine stuck.
//!
//! The partition entry array is kept as the raw bytes the image carries, so an install never
//! renumbers, reorders or re-encodes the image's partitions: it only fills a free slot (the
//! seed) and rebuilds the two headers with the `gpt` crate's [`HeaderBuilder`], which computes
//! both CRCs. [`GptTable::lay_out`] renders the final primary region (protective MBR, header,
//! entries) and backup region (entries, header) for a disk of a given size, in memory: the
//! write engine puts them on the disk in its single commit.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom};

use gpt::disk::LogicalBlockSize;
use gpt::header::{Header, HeaderBuilder};
use gpt::partition::Partition;

/// Largest partition entry array accepted (UEFI's minimum is 16 KiB; 1 MiB is far beyond any
/// real table and keeps a hostile header from making us allocate gigabytes).
const MAX_ARRAY: u64 = 1 << 20;

/// Why a GPT could not be read or laid out.
#[derive(Debug, thiserror::Error)]
pub enum GptTableError {
    /// No `EFI PART` signature where the header should be.
    #[error("no GPT header at sector {lba} (no \"EFI PART\" signature)")]
    NoHeader {
        /// The sector looked at.
        lba: u64,
    },
    /// The header or its entry array fails its CRC32.
    #[error("the GPT header at sector {lba} is damaged: {what} CRC32 does not match")]
    BadCrc {
        /// The header's sector.
        lba: u64,
        /// "header" or "partition entry array".
        what: &'static str,
    },
    /// A field is out of what this disk or the UEFI specification allows.
    #[error("the GPT header at sector {lba} is not usable: {reason}")]
    Invalid {
        /// The header's sector.
        lba: u64,
        /// What is wrong.
        reason: String,
    },
    /// The sector size is not 512 or 4096.
    #[error("unsupported logical sector size {0} (GPT here supports 512 and 4096)")]
    SectorSize(u32),
    /// The new layout does not fit.
    #[error("the partition table cannot be laid out: {0}")]
    Layout(String),
    /// Reading failed.
    #[error("reading the GPT")]
    Io(#[source] std::io::Error),
    /// The `gpt` crate refused to build a header.
    #[error("building a GPT header: {0}")]
    Header(String),
}

/// A GPT as read from a disk or an image: its primary header and its raw entry array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptTable {
    sector_size: u32,
    header: Header,
    entries: Vec<u8>,
}

/// The rendered regions of a laid-out table, ready to be written.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The primary header as built (current LBA 1).
    pub primary: Header,
    /// Bytes from LBA 0 up to the end of the primary entry array: protective MBR, header,
    /// entries. The protective MBR keeps the image's boot code and disk signature; only the
    /// protective record's size is fitted to the disk.
    pub primary_region: Vec<u8>,
    /// Byte offset of the backup region on the disk.
    pub backup_offset: u64,
    /// The backup entry array followed by the backup header sector.
    pub backup_region: Vec<u8>,
}

fn lb(sector_size: u32) -> Result<LogicalBlockSize, GptTableError> {
    match sector_size {
        512 => Ok(LogicalBlockSize::Lb512),
        4096 => Ok(LogicalBlockSize::Lb4096),
        other => Err(GptTableError::SectorSize(other)),
    }
}

fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A GUID as stored on disk (mixed endian).
fn guid(b: &[u8]) -> uuid::Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    uuid::Uuid::from_bytes_le(a)
}

impl GptTable {
    /// Reads the primary GPT of `dev` (a disk, or a cursor over an image's first MiB).
    pub fn read<D: Read + Seek>(dev: &mut D, sector_size: u32) -> Result<GptTable, GptTableError> {
        Self::read_at(dev, sector_size, 1)
    }

    /// Reads the GPT header at `lba` (1 for the primary, the primary's `backup_lba` for the
    /// backup) and its entry array, checking signature, sizes and both CRCs.
    pub fn read_at<D: Read + Seek>(
        dev: &mut D,
        sector_size: u32,
        lba: u64,
    ) -> Result<GptTable, GptTableError> {
        lb(sector_size)?;
        let ss = u64::from(sector_size);
        let mut sector = vec![0u8; sector_size as usize];
        dev.seek(SeekFrom::Start(lba * ss))
            .and_then(|_| dev.read_exact(&mut sector))
            .map_err(GptTableError::Io)?;
        if &sector[..8] != b"EFI PART" {
            return Err(GptTableError::NoHeader { lba });
        }
        let invalid = |reason: String| GptTableError::Invalid { lba, reason };
        let header_size = le_u32(&sector, 12);
        if !(92..=sector_size).contains(&header_size) {
            return Err(invalid(format!("header size {header_size}")));
        }
        let mut h = sector[..header_size as usize].to_vec();
        let stored_crc = le_u32(&h, 16);
        h[16..20].fill(0);
        if crc32(&h) != stored_crc {
            return Err(GptTableError::BadCrc {
                lba,
                what: "header",
            });
        }
        let current_lba = le_u64(&sector, 24);
        let part_start = le_u64(&sector, 72);
        let num_parts = le_u32(&sector, 80);
        let part_size = le_u32(&sector, 84);
        if current_lba != lba {
            return Err(invalid(format!("it says it is at sector {current_lba}")));
        }
        // UEFI: 128 × 2^n bytes per entry. The `gpt` crate asserts on anything but 128.
        if part_size < 128 || !part_size.is_power_of_two() {
            return Err(invalid(format!("partition entries of {part_size} bytes")));
        }
        let array_len = u64::from(num_parts) * u64::from(part_size);
        if num_parts == 0 || array_len > MAX_ARRAY {
            return Err(invalid(format!(
                "{num_parts} partition entries of {part_size} bytes"
            )));
        }
        let mut entries = vec![0u8; array_len as usize];
        let start = part_start
            .checked_mul(ss)
            .ok_or_else(|| invalid(format!("entry array at sector {part_start}")))?;
        dev.seek(SeekFrom::Start(start))
            .and_then(|_| dev.read_exact(&mut entries))
            .map_err(GptTableError::Io)?;
        if crc32(&entries) != le_u32(&sector, 88) {
            return Err(GptTableError::BadCrc {
                lba,
                what: "partition entry array",
            });
        }
        let header = Header {
            signature: "EFI PART".into(),
            revision: (le_u32(&sector, 8) as u16, (le_u32(&sector, 8) >> 16) as u16),
            header_size_le: header_size,
            crc32: stored_crc,
            reserved: 0,
            current_lba,
            backup_lba: le_u64(&sector, 32),
            first_usable: le_u64(&sector, 40),
            last_usable: le_u64(&sector, 48),
            disk_guid: guid(&sector[56..72]),
            part_start,
            num_parts,
            part_size,
            crc32_parts: le_u32(&sector, 88),
        };
        if header.first_usable > header.last_usable {
            return Err(invalid("first usable sector after the last".into()));
        }
        Ok(GptTable {
            sector_size,
            header,
            entries,
        })
    }

    /// The table's logical sector size.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The header as read (primary or backup).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The disk GUID.
    pub fn disk_guid(&self) -> uuid::Uuid {
        self.header.disk_guid
    }

    /// The raw partition entry array.
    pub fn entry_bytes(&self) -> &[u8] {
        &self.entries
    }

    /// Bytes the entry array takes, rounded up to whole sectors.
    pub fn array_len(&self) -> u64 {
        let ss = u64::from(self.sector_size);
        (self.entries.len() as u64).div_ceil(ss) * ss
    }

    /// The used partitions by number (1-based), decoded from the first 128 bytes of each
    /// entry.
    pub fn partitions(&self) -> BTreeMap<u32, Partition> {
        let mut out = BTreeMap::new();
        for (i, e) in self
            .entries
            .chunks_exact(self.header.part_size as usize)
            .enumerate()
        {
            if e[..16].iter().all(|&b| b == 0) {
                continue;
            }
            let name: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            out.insert(
                i as u32 + 1,
                Partition {
                    part_type_guid: guid(&e[..16]).into(),
                    part_guid: guid(&e[16..32]),
                    first_lba: le_u64(e, 32),
                    last_lba: le_u64(e, 40),
                    flags: le_u64(e, 48),
                    name: String::from_utf16_lossy(&name),
                },
            );
        }
        out
    }

    /// The first used partition whose type GUID is `type_guid` (any case).
    pub fn find_by_type(&self, type_guid: &str) -> Option<(u32, Partition)> {
        self.partitions().into_iter().find(|(_, p)| {
            p.part_type_guid
                .guid
                .to_string()
                .eq_ignore_ascii_case(type_guid)
        })
    }

    /// The first used partition named `name` (any case).
    pub fn find_by_name(&self, name: &str) -> Option<(u32, Partition)> {
        self.partitions()
            .into_iter()
            .find(|(_, p)| p.name.eq_ignore_ascii_case(name))
    }

    /// The partition whose unique GUID is `guid`.
    pub fn find_by_guid(&self, guid: uuid::Uuid) -> Option<(u32, Partition)> {
        self.partitions()
            .into_iter()
            .find(|(_, p)| p.part_guid == guid)
    }

    /// The lowest free entry number.
    pub fn free_slot(&self) -> Option<u32> {
        let used = self.partitions();
        (1..=self.header.num_parts).find(|n| !used.contains_key(n))
    }

    /// The last sector used by any partition (0 when none).
    pub fn last_used_lba(&self) -> u64 {
        self.partitions()
            .values()
            .map(|p| p.last_lba)
            .max()
            .unwrap_or(0)
    }

    /// Puts `p` in entry `number` (1-based), over whatever was there.
    pub fn set_entry(&mut self, number: u32, p: &Partition) -> Result<(), GptTableError> {
        let size = self.header.part_size as usize;
        if number == 0 || number > self.header.num_parts {
            return Err(GptTableError::Layout(format!(
                "no partition entry {number} (the table has {})",
                self.header.num_parts
            )));
        }
        let at = (number as usize - 1) * size;
        let e = &mut self.entries[at..at + size];
        e.fill(0);
        e[..16].copy_from_slice(&p.part_type_guid.guid.to_bytes_le());
        e[16..32].copy_from_slice(&p.part_guid.to_bytes_le());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        e[48..56].copy_from_slice(&p.flags.to_le_bytes());
        for (i, c) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        Ok(())
    }

    /// The last usable sector the table gets on a disk of `disk_size` bytes: just before the
    /// backup entry array at the disk's end.
    pub fn last_usable_on(&self, disk_size: u64) -> Result<u64, GptTableError> {
        let ss = u64::from(self.sector_size);
        let backup_lba = (disk_size / ss)
            .checked_sub(1)
            .ok_or_else(|| GptTableError::Layout("empty disk".into()))?;
        let array_sectors = self.array_len() / ss;
        backup_lba
            .checked_sub(array_sectors + 1)
            .filter(|&l| l >= self.header.first_usable)
            .ok_or_else(|| GptTableError::Layout("the disk is too small for the table".into()))
    }

    /// Lays the table out for a disk of `disk_size` bytes: the backup header at the disk's last
    /// sector, its entry array just before it, the last usable sector just before that, and
    /// the protective MBR (taken from `lba0`, the image's first sector) fitted to the disk.
    /// Every used partition must end within the usable area.
    pub fn lay_out(&self, disk_size: u64, lba0: &[u8]) -> Result<Layout, GptTableError> {
        let lbs = lb(self.sector_size)?;
        let ss = u64::from(self.sector_size);
        let header_err = |e: gpt::header::HeaderError| GptTableError::Header(e.to_string());
        let backup_lba = disk_size / ss - 1;
        let last_usable = self.last_usable_on(disk_size)?;
        if self.last_used_lba() > last_usable {
            return Err(GptTableError::Layout(format!(
                "a partition ends at sector {}, after the last usable sector {last_usable}",
                self.last_used_lba()
            )));
        }
        let array_len = self.array_len();
        let primary_end = self.header.part_start * ss + array_len;
        if self.header.part_start < 2 || primary_end > self.header.first_usable * ss {
            return Err(GptTableError::Layout(format!(
                "the entry array at sector {} overlaps the usable area",
                self.header.part_start
            )));
        }
        let mut primary = HeaderBuilder::from_header(&self.header)
            .primary(true)
            .backup_lba(backup_lba)
            .last_usable(last_usable)
            .build(lbs)
            .map_err(header_err)?;
        // HeaderBuilder keeps the entry array where the image had it.
        primary.part_start = self.header.part_start;
        let mut backup = HeaderBuilder::from_header(&primary)
            .primary(false)
            .build(lbs)
            .map_err(header_err)?;
        backup.part_start = backup_lba - array_len / ss;

        // Primary region: LBA 0 .. end of the entry array.
        let mut region = Cursor::new(vec![0u8; primary_end as usize]);
        region.get_mut()[..ss as usize].copy_from_slice(&fit_protective_mbr(lba0, disk_size, ss)?);
        let at = (self.header.part_start * ss) as usize;
        region.get_mut()[at..at + self.entries.len()].copy_from_slice(&self.entries);
        primary
            .write_primary(&mut region, lbs)
            .map_err(header_err)?;

        // Backup region: entry array, then the header at the last sector. The gpt crate writes
        // by absolute LBA, so build it in a cursor positioned as if it were the disk's tail.
        let backup_offset = backup.part_start * ss;
        let mut tail = OffsetCursor {
            base: backup_offset,
            inner: Cursor::new(vec![0u8; (array_len + ss) as usize]),
        };
        tail.inner.get_mut()[..self.entries.len()].copy_from_slice(&self.entries);
        backup.write_backup(&mut tail, lbs).map_err(header_err)?;
        Ok(Layout {
            primary,
            primary_region: region.into_inner(),
            backup_offset,
            backup_region: tail.inner.into_inner(),
        })
    }
}

/// The image's sector 0 with the protective (0xEE) record's size set to cover `disk_size`
/// (capped at 0xFFFFFFFF as UEFI says). Boot code, disk signature and other records stay.
pub fn fit_protective_mbr(lba0: &[u8], disk_size: u64, ss: u64) -> Result<Vec<u8>, GptTableError> {
    let mut out = vec![0u8; ss as usize];
    let n = lba0.len().min(out.len());
    out[..n].copy_from_slice(&lba0[..n]);
    if out[510..512] != [0x55, 0xAA] {
        // No MBR at all: write a plain protective one.
        let pmbr = gpt::mbr::ProtectiveMBR::with_lb_size(
            u32::try_from(disk_size / ss - 1).unwrap_or(u32::MAX),
        );
        out[..512].copy_from_slice(&pmbr.to_bytes());
        return Ok(out);
    }
    let sectors = u32::try_from(disk_size / ss - 1).unwrap_or(u32::MAX);
    let mut found = false;
    for i in 0..4 {
        let rec = 446 + 16 * i;
        if out[rec + 4] == 0xEE {
            out[rec + 12..rec + 16].copy_from_slice(&sectors.to_le_bytes());
            found = true;
        }
    }
    if !found {
        return Err(GptTableError::Layout(
            "sector 0 holds an MBR without a protective (0xEE) record".into(),
        ));
    }
    Ok(out)
}

/// A cursor whose positions are disk offsets starting at `base`.
struct OffsetCursor {
    base: u64,
    inner: Cursor<Vec<u8>>,
}

impl Read for OffsetCursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for OffsetCursor {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for OffsetCursor {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let p = match pos {
            SeekFrom::Start(p) => SeekFrom::Start(p.checked_sub(self.base).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the region")
            })?),
            other => other,
        };
        self.inner.seek(p).map(|p| p + self.base)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A GPT image made by the `gpt` crate's writer: `size` bytes, one partition.
    pub(super) fn image(size: u64, ss: u32) -> Vec<u8> {
        crate::test_util::with_gpt(vec![0u8; size as usize], ss, None, |g| {
            g.add_partition("root", 1 << 20, gpt::partition_types::LINUX_FS, 0, None)
                .unwrap();
        })
    }

    #[test]
    fn reads_what_the_gpt_crate_wrote_and_lays_it_out_on_a_larger_disk() {
        for ss in [512u32, 4096] {
            let img = image(8 << 20, ss);
            let t = GptTable::read(&mut Cursor::new(&img), ss).unwrap();
            assert_eq!(t.partitions().len(), 1);
            assert_eq!(t.find_by_name("ROOT").unwrap().0, 1);
            // Lay out on a 16 MiB disk and check the gpt crate reads both headers there.
            let disk_size = 16u64 << 20;
            let l = t.lay_out(disk_size, &img[..ss as usize]).unwrap();
            let mut disk = vec![0u8; disk_size as usize];
            disk[..l.primary_region.len()].copy_from_slice(&l.primary_region);
            let o = l.backup_offset as usize;
            disk[o..o + l.backup_region.len()].copy_from_slice(&l.backup_region);
            let g = gpt::GptConfig::new()
                .writable(false)
                .logical_block_size(lb(ss).unwrap())
                .only_valid_headers(true)
                .open_from_device(Cursor::new(disk.clone()))
                .unwrap();
            assert_eq!(g.partitions(), &t.partitions());
            let last = disk_size / u64::from(ss) - 1;
            assert_eq!(g.primary_header().unwrap().backup_lba, last);
            assert_eq!(g.backup_header().unwrap().current_lba, last);
            // Our reader agrees, at both places.
            let b = GptTable::read_at(&mut Cursor::new(&disk), ss, last).unwrap();
            assert_eq!(b.entry_bytes(), t.entry_bytes());
            // Protective MBR fitted to the disk.
            let size_field = u32::from_le_bytes(disk[446 + 12..446 + 16].try_into().unwrap());
            assert_eq!(u64::from(size_field), last);
        }
    }

    #[test]
    fn a_new_entry_lands_in_a_free_slot_without_renumbering() {
        let img = image(8 << 20, 512);
        let mut t = GptTable::read(&mut Cursor::new(&img), 512).unwrap();
        let n = t.free_slot().unwrap();
        assert_eq!(n, 2);
        let p = Partition {
            part_type_guid: gpt::partition_types::BASIC,
            part_guid: uuid::Uuid::from_u128(7),
            first_lba: 20480,
            last_lba: 22527,
            flags: 0,
            name: "CIDATA".into(),
        };
        t.set_entry(n, &p).unwrap();
        assert_eq!(t.partitions()[&2], p);
        assert_eq!(t.find_by_name("cidata").unwrap().0, 2);
        assert!(t.set_entry(0, &p).is_err());
        assert!(t.set_entry(129, &p).is_err());
    }

    #[test]
    fn damaged_and_hostile_headers_are_errors_not_panics() {
        let img = image(8 << 20, 512);
        // Entry array damaged.
        let mut bad = img.clone();
        bad[1024] ^= 1;
        assert!(matches!(
            GptTable::read(&mut Cursor::new(&bad), 512),
            Err(GptTableError::BadCrc {
                what: "partition entry array",
                ..
            })
        ));
        // Header damaged.
        let mut bad = img.clone();
        bad[512 + 40] ^= 1;
        assert!(matches!(
            GptTable::read(&mut Cursor::new(&bad), 512),
            Err(GptTableError::BadCrc { what: "header", .. })
        ));
        // No header.
        assert!(matches!(
            GptTable::read(&mut Cursor::new(vec![0u8; 4096]), 512),
            Err(GptTableError::NoHeader { lba: 1 })
        ));
        // A header field set to `value` (with a valid header CRC) is refused, not trusted:
        // 2^32-1 entries of 128 bytes (refused before any allocation), an odd entry size.
        for (at, value) in [(80, u32::MAX), (84, 200)] {
            let mut bad = img.clone();
            bad[512 + at..512 + at + 4].copy_from_slice(&value.to_le_bytes());
            let mut h = bad[512..512 + 92].to_vec();
            h[16..20].fill(0);
            let c = crc32(&h);
            bad[512 + 16..512 + 20].copy_from_slice(&c.to_le_bytes());
            assert!(matches!(
                GptTable::read(&mut Cursor::new(&bad), 512),
                Err(GptTableError::Invalid { .. })
            ));
        }
        assert!(matches!(
            GptTable::read(&mut Cursor::new(vec![0u8; 4096]), 1000),
            Err(GptTableError::SectorSize(1000))
        ));
    }

    #[test]
    fn entries_of_256_bytes_are_read_and_laid_out() {
        // Rewrite a 128-byte table as 64 entries of 256 bytes (same 16 KiB array).
        let img = image(8 << 20, 512);
        let t = GptTable::read(&mut Cursor::new(&img), 512).unwrap();
        let mut wide = vec![0u8; 64 * 256];
        for (i, e) in t.entry_bytes().chunks_exact(128).take(64).enumerate() {
            wide[i * 256..i * 256 + 128].copy_from_slice(e);
        }
        let mut img2 = img.clone();
        img2[1024..1024 + wide.len()].copy_from_slice(&wide);
        let h = &mut img2[512..512 + 92];
        h[80..84].copy_from_slice(&64u32.to_le_bytes());
        h[84..88].copy_from_slice(&256u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&wide).to_le_bytes());
        h[16..20].fill(0);
        let c = crc32(h);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        let t2 = GptTable::read(&mut Cursor::new(&img2), 512).unwrap();
        assert_eq!(t2.partitions(), t.partitions());
        let l = t2.lay_out(16 << 20, &img2[..512]).unwrap();
        let back = &l.backup_region;
        let hdr_at = back.len() - 512;
        assert_eq!(&back[hdr_at..hdr_at + 8], b"EFI PART");
        assert_eq!(le_u32(&back[hdr_at..], 84), 256);
    }
}

/// Property tests: whatever bytes stand where a GPT should be, reading them gives a table whose
/// entry array is within its bounds, or an error — never a panic (PID 1 reads old disks'
/// tables). `PROPTEST_CASES=100000` runs them longer.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn valid(ss: u32) -> Vec<u8> {
        super::tests::image(4 << 20, ss)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::test_util::proptest_cases(256), ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40_000)) {
            for ss in [512u32, 4096] {
                if let Ok(t) = GptTable::read(&mut Cursor::new(&bytes), ss) {
                    prop_assert!(t.entry_bytes().len() as u64 <= MAX_ARRAY);
                }
            }
        }

        #[test]
        fn corrupted_tables_are_refused_or_consistent(
            ss in prop_oneof![Just(512u32), Just(4096u32)],
            flips in proptest::collection::vec((0usize..4 * 4096 + 16_384, any::<u8>()), 1..8),
            disk_mib in 4u64..64,
        ) {
            let mut img = valid(ss);
            for (at, x) in flips {
                img[at] ^= x | 1;
            }
            if let Ok(t) = GptTable::read(&mut Cursor::new(&img), ss) {
                // A table that reads is laid out or refused for any disk size, never a panic.
                let _ = t.lay_out(disk_mib << 20, &img[..ss as usize]);
                let _ = t.partitions();
                let _ = t.free_slot();
            }
        }
    }
}
