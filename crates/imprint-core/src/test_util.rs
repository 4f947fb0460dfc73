//! Fixtures shared by the tests of this crate and (feature `test-util`) of the appliance: fake
//! `/sys` trees and GPT disks written by the `gpt` crate. Never in a binary.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Cursor;

pub use crate::discover::fixture::{FakeDisk, FakeSys};

/// The `gpt` crate's view of a disk held in memory, as [`with_gpt`] hands it out.
pub type MemGpt<'a> = gpt::GptDisk<&'a mut Cursor<Vec<u8>>>;

/// `bytes` (a whole number of `ss`-byte sectors) with a protective MBR and an empty GPT
/// (disk GUID `disk_guid`, random when `None`) written over them; `add` adds the partitions
/// before both headers and entry arrays are written.
pub fn with_gpt(
    bytes: Vec<u8>,
    ss: u32,
    disk_guid: Option<uuid::Uuid>,
    add: impl FnOnce(&mut MemGpt<'_>),
) -> Vec<u8> {
    let sectors = bytes.len() as u64 / u64::from(ss);
    let mut disk = Cursor::new(bytes);
    gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX))
        .overwrite_lba0(&mut disk)
        .unwrap();
    {
        let mut g = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(gpt::disk::LogicalBlockSize::try_from(u64::from(ss)).unwrap())
            .create_from_device(&mut disk, disk_guid)
            .unwrap();
        add(&mut g);
        g.write().unwrap();
    }
    disk.into_inner()
}

/// How many cases a property test runs: `PROPTEST_CASES` when set (the long runs
/// docs/testing.md describes), else `default` (what fits `cargo test`). An explicit `cases` in
/// a `ProptestConfig` would otherwise override the variable.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
