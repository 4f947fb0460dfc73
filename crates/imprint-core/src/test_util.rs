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

/// A real S3 server for tests (`tests/s3-server`: s3s over files, SigV4 checked, anonymous
/// read of objects, signed everything else), on a loopback port, stopped on drop. Buckets are
/// the folders of its root. Built by `scripts/deps` into `target/s3-server/` (or
/// `$IMPRINT_S3_SERVER`).
#[derive(Debug)]
pub struct S3Server {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

/// The access key [`S3Server`] accepts.
pub const S3_ACCESS_KEY: &str = "imprint-test-key";
/// The secret key [`S3Server`] accepts.
pub const S3_SECRET_KEY: &str = "imprint-test-secret-do-not-print";

impl S3Server {
    /// Starts the server over `root`; panics (a test helper) when it cannot.
    #[allow(clippy::expect_used, clippy::unwrap_used, clippy::missing_panics_doc)]
    pub fn start(root: &std::path::Path) -> S3Server {
        use std::io::BufRead;
        let bin = std::env::var_os("IMPRINT_S3_SERVER").map_or_else(
            || {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../target/s3-server/bin/imprint-s3-server")
            },
            std::path::PathBuf::from,
        );
        let mut child = std::process::Command::new(&bin)
            .arg("127.0.0.1:0")
            .arg(root)
            .arg(S3_ACCESS_KEY)
            .arg(S3_SECRET_KEY)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/deps builds it from tests/s3-server)",
                    bin.display()
                )
            });
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("the S3 server says where it listens");
        S3Server {
            child,
            endpoint: format!("http://{addr}"),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
