//! Moving the backup GPT to the end of a disk larger than the image.
//!
//! A GPT image puts its backup header in the image's last sector. Written to a larger disk, that
//! header is no longer at the disk's end, where firmware and kernels look for it, and the space
//! after it is unusable. We rebuild both headers with the `gpt` crate's header builder (the
//! backup at the last LBA, `last_usable` grown to just before the backup partition array), copy
//! the partition entry array next to the new backup header, and write backup first, primary
//! last: an interruption in between leaves the old, still valid primary. The image's old backup
//! sectors are left as they are: they are image data now, inside the usable area.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use gpt::disk::LogicalBlockSize;
use gpt::header::{Header, HeaderBuilder};

/// Errors while moving the backup GPT.
#[derive(Debug, thiserror::Error)]
pub enum GptFixupError {
    /// The disk's GPT could not be read.
    #[error("reading the GPT written to the disk")]
    Read(#[source] gpt::GptError),
    /// The headers could not be built or written.
    #[error("writing the moved GPT headers")]
    Header(#[source] gpt::header::HeaderError),
    /// Copying the partition entry array failed.
    #[error("copying the GPT partition entry array")]
    Io(#[source] std::io::Error),
    /// The sector size is not one GPT supports.
    #[error("unsupported logical sector size {0}")]
    SectorSize(u32),
}

/// What the fix-up did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GptFixup {
    /// LBA of the backup header before.
    pub old_backup_lba: u64,
    /// LBA of the backup header now.
    pub new_backup_lba: u64,
    /// Last usable LBA now.
    pub last_usable_lba: u64,
}

fn lb(sector_size: u32) -> Result<LogicalBlockSize, GptFixupError> {
    LogicalBlockSize::try_from(u64::from(sector_size))
        .map_err(|_| GptFixupError::SectorSize(sector_size))
}

/// Reads the primary GPT header of `dev`.
pub fn read_primary(dev: &mut File, sector_size: u32) -> Result<Header, GptFixupError> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb(sector_size)?)
        .open_from_device(&mut *dev)
        .map_err(GptFixupError::Read)?;
    Ok(disk
        .primary_header()
        .map_err(GptFixupError::Header)?
        .clone())
}

/// Moves the backup GPT of `dev` (a buffered handle on a disk of `disk_size` bytes) to the
/// disk's last LBA. Returns `None` when it is already there.
pub fn move_backup_to_end(
    dev: &mut File,
    disk_size: u64,
    sector_size: u32,
) -> Result<Option<GptFixup>, GptFixupError> {
    let lbs = lb(sector_size)?;
    let ss = u64::from(sector_size);
    let h1 = read_primary(dev, sector_size)?;
    let new_backup_lba = disk_size / ss - 1;
    if h1.backup_lba == new_backup_lba {
        return Ok(None);
    }
    let mut primary = HeaderBuilder::from_header(&h1)
        .backup_lba(new_backup_lba)
        .primary(true)
        .build(lbs)
        .map_err(GptFixupError::Header)?;
    let mut backup = HeaderBuilder::from_header(&primary)
        .primary(false)
        .build(lbs)
        .map_err(GptFixupError::Header)?;

    // Copy the entry array verbatim: the partitions stay exactly as the image defines them.
    let array_len = (u64::from(h1.num_parts) * u64::from(h1.part_size)).div_ceil(ss) * ss;
    let mut array = vec![0u8; array_len as usize];
    dev.seek(SeekFrom::Start(h1.part_start * ss))
        .map_err(GptFixupError::Io)?;
    dev.read_exact(&mut array).map_err(GptFixupError::Io)?;
    dev.seek(SeekFrom::Start(backup.part_start * ss))
        .map_err(GptFixupError::Io)?;
    dev.write_all(&array).map_err(GptFixupError::Io)?;
    dev.flush().map_err(GptFixupError::Io)?;

    backup
        .write_backup(dev, lbs)
        .map_err(GptFixupError::Header)?;
    dev.sync_data().map_err(GptFixupError::Io)?;
    primary
        .write_primary(dev, lbs)
        .map_err(GptFixupError::Header)?;
    dev.sync_all().map_err(GptFixupError::Io)?;
    Ok(Some(GptFixup {
        old_backup_lba: h1.backup_lba,
        new_backup_lba,
        last_usable_lba: primary.last_usable,
    }))
}
