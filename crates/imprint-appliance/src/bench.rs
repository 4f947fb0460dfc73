//! Bench mode (`imprint.bench` on the kernel command line): how fast the appliance reads the
//! image off the stick, against a plain sequential `O_DIRECT` read of the same partition
//! (`dd if=PART of=/dev/null bs=4M iflag=direct`, which the live image does not carry), in the
//! same boot. The page cache is dropped before the image reader's pass; the plain read
//! bypasses it. Nothing is written; the install goes on afterwards.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use imprint_core::manifest::Image;
use imprint_core::report::StickRead;

/// The kernel command-line flag.
pub const PARAM: &str = "imprint.bench";
/// Read size of the plain pass (dd's `bs=4M`).
const BLOCK: usize = 4 << 20;
/// `O_DIRECT` wants buffers and offsets aligned to the logical block size; 4096 covers
/// 512- and 4096-byte devices.
const ALIGN: usize = 4096;

/// Both reads of the stick's payload partition (`image` opened on it).
pub fn stick_read(proc: &Path, image: &Image) -> Result<StickRead> {
    let partition = image.path();
    let t = Instant::now();
    let direct_bytes = direct_read(partition)
        .with_context(|| format!("reading {} with O_DIRECT", partition.display()))?;
    let direct_seconds = t.elapsed().as_secs_f64();

    drop_caches(proc)?;
    let t = Instant::now();
    let mut r = image
        .payload()
        .with_context(|| format!("opening the payload on {}", partition.display()))?;
    // The write engine's reads: a version 2 image frame by frame (up to 4 MiB each), a
    // version 1 image through a 1 MiB buffer (manifest::raw_reader).
    let piece = if image.manifest().frame_table().is_some() {
        imprint_core::manifest::MAX_FRAME_SIZE as usize
    } else {
        1 << 20
    };
    let mut buf = vec![0u8; piece];
    let mut payload_bytes = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => payload_bytes += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the payload on {}", partition.display()))
            }
        }
    }
    let payload_seconds = t.elapsed().as_secs_f64();
    // The install reads the stick next: it starts from a cold cache, as without bench mode.
    drop_caches(proc)?;
    Ok(StickRead {
        partition: partition.display().to_string(),
        payload_bytes,
        payload_seconds,
        direct_bytes,
        direct_seconds,
    })
}

/// Reads `path` from start to end with `O_DIRECT`, [`BLOCK`] bytes at a time; returns the
/// bytes read.
fn direct_read(path: &Path) -> io::Result<u64> {
    let f: File = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    let mut raw = vec![0u8; BLOCK + ALIGN];
    let skip = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[skip..skip + BLOCK];
    let mut off = 0u64;
    loop {
        match f.read_at(buf, off) {
            Ok(0) => return Ok(off),
            Ok(n) => {
                off += n as u64;
                // A short read is the device's end (its size is a multiple of the sector).
                if n % ALIGN != 0 {
                    return Ok(off);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Drops the page cache (`echo 3 > /proc/sys/vm/drop_caches`): clean pages only, nothing is
/// lost.
fn drop_caches(proc: &Path) -> Result<()> {
    let path = proc.join("sys/vm/drop_caches");
    fs::write(&path, "3\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_read_reads_every_byte_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("part");
        // 9 MiB + 4 KiB: two full blocks, one short one.
        let len = (9 << 20) + 4096;
        fs::write(&p, vec![7u8; len]).unwrap();
        match direct_read(&p) {
            Ok(n) => assert_eq!(n, len as u64),
            // tmpfs and some overlay filesystems refuse O_DIRECT.
            Err(e) => assert_eq!(e.raw_os_error(), Some(nix::libc::EINVAL), "{e}"),
        }
    }
}
