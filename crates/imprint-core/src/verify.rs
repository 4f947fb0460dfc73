//! Reading a target back and proving it holds an image.
//!
//! [`verify_chunks`] is the engine's read-back: every chunk of the target, read bypassing the
//! page cache, must hash to the manifest's chunk digest; regions the engine still holds in
//! memory are spliced in as [`Overlay`]s. A mismatch names the chunk and its byte range.
//!
//! [`verify_image`] is `imprint verify`: a disk holding the image byte for byte (written by dd,
//! even on a larger disk) verifies, and so does one a successful install changed on purpose —
//! the GPT headers rebuilt for a backup at the disk's end, the protective MBR fitted to the
//! disk, the image's old backup header cleared, and extra partitions (the cloud-init `CIDATA`
//! seed) beyond the image's end — each change checked field by field ([`GptTable`]).

use std::io::{Cursor, Read, Seek, SeekFrom};

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::blockdev::{AlignedBuf, Target, TargetError};
use crate::gpt_table::{fit_protective_mbr, GptTable};
use crate::manifest::{read_full, ChunkHasher, Image, ImageError, Manifest, PartitionTable};
use crate::progress::{Phase, Progress};
use crate::write::HOLD;

const BUF: usize = 4 << 20;
const NBUF: usize = 4;

/// Bytes that stand in for the target's content at `offset` (held in memory, not yet written).
#[derive(Debug, Clone, Copy)]
pub struct Overlay<'a> {
    /// Where the bytes belong.
    pub offset: u64,
    /// The bytes.
    pub data: &'a [u8],
}

/// Why verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading the target failed.
    #[error("reading back {target} at offset {offset}")]
    ReadIo {
        /// Target path.
        target: String,
        /// Offset of the failed read.
        offset: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A chunk on the target differs from the image.
    #[error(
        "{target} does not hold the image: chunk {chunk} (bytes {start}..{end}) reads back as sha256 {actual}, the image has {expected}"
    )]
    Mismatch {
        /// Target path.
        target: String,
        /// Chunk index.
        chunk: u64,
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Digest of the image chunk.
        expected: String,
        /// Digest read back.
        actual: String,
    },
    /// The target's partition table is not the image's.
    #[error("{target} does not hold the image: its partition table {reason}")]
    Gpt {
        /// Target path.
        target: String,
        /// What differs.
        reason: String,
    },
    /// The target is smaller than the image.
    #[error("{target} is smaller than the image ({size} < {raw_size} bytes): it cannot hold it")]
    TooSmall {
        /// Target path.
        target: String,
        /// Target size.
        size: u64,
        /// Image size.
        raw_size: u64,
    },
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The target could not be opened.
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// Reads `[0, raw_size)` of `target` back, splices `overlays` in, and compares every chunk
/// with the manifest. Reading and hashing overlap (a reader thread feeds this one).
pub fn verify_chunks(
    target: &Target,
    m: &Manifest,
    overlays: &[Overlay<'_>],
    progress: &dyn Progress,
) -> Result<(), VerifyError> {
    let name = target.path().display().to_string();
    let raw = m.raw_size;
    let start_time = std::time::Instant::now();
    progress.begin(Phase::Verify, raw);
    let (free_tx, free_rx) = bounded::<AlignedBuf>(NBUF);
    let (full_tx, full_rx) = bounded::<(u64, usize, AlignedBuf)>(NBUF);
    for _ in 0..NBUF {
        let _ = free_tx.send(AlignedBuf::new(BUF));
    }
    std::thread::scope(|s| {
        // Each stage owns its channel ends, so a stage that stops (done or failed) unblocks
        // the other instead of leaving it waiting forever.
        let reader_name = name.clone();
        let reader = s.spawn(move || -> Result<(), VerifyError> {
            let mut offset = 0u64;
            while offset < raw {
                let Ok(mut buf) = free_rx.recv() else {
                    return Ok(());
                };
                let n = (raw - offset).min(BUF as u64) as usize;
                target
                    .read_at(&mut buf.as_mut_slice()[..n], offset)
                    .map_err(|source| VerifyError::ReadIo {
                        target: reader_name.clone(),
                        offset,
                        source,
                    })?;
                if full_tx.send((offset, n, buf)).is_err() {
                    return Ok(());
                }
                offset += n as u64;
            }
            Ok(())
        });
        let checker_name = name.clone();
        let checked = (move || -> Result<(), VerifyError> {
            let mut chunker = ChunkHasher::new(m.chunk_size);
            let mut check = |i: u64, actual: String| {
                let expected = &m.chunks[i as usize];
                if &actual == expected {
                    return Ok(());
                }
                let (start, end) = m.chunk_range(i);
                Err(VerifyError::Mismatch {
                    target: checker_name.clone(),
                    chunk: i,
                    start,
                    end,
                    expected: expected.clone(),
                    actual,
                })
            };
            let mut seen = 0u64;
            for (offset, n, mut buf) in full_rx.iter() {
                let data = &mut buf.as_mut_slice()[..n];
                let end = offset + n as u64;
                for o in overlays {
                    let o_end = o.offset + o.data.len() as u64;
                    if o.offset < end && o_end > offset {
                        let s0 = o.offset.max(offset);
                        let e0 = o_end.min(end);
                        data[(s0 - offset) as usize..(e0 - offset) as usize].copy_from_slice(
                            &o.data[(s0 - o.offset) as usize..(e0 - o.offset) as usize],
                        );
                    }
                }
                chunker.update(data, &mut check)?;
                seen = end;
                progress.advance(end);
                // The reader may be done and gone; every block it sent must still be checked.
                let _ = free_tx.send(buf);
            }
            // Defence in depth: never report success for a partial read-back.
            let done = if seen == raw {
                chunker.finish(&mut check)?
            } else {
                0
            };
            if done != m.chunk_count() {
                return Err(VerifyError::ReadIo {
                    target: checker_name.clone(),
                    offset: seen,
                    source: std::io::Error::other(
                        "the read-back ended early; verification is incomplete",
                    ),
                });
            }
            Ok(())
        })();
        let read = reader.join().unwrap_or_else(|_| {
            Err(VerifyError::ReadIo {
                target: name.clone(),
                offset: 0,
                source: std::io::Error::other("reader thread panicked"),
            })
        });
        read?;
        checked
    })?;
    progress.end(Phase::Verify, raw, start_time.elapsed().as_secs_f64());
    Ok(())
}

/// What [`verify_image`] found besides the image itself.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyOutcome {
    /// The backup GPT sits at the disk's last LBA (moved there by the install).
    pub gpt_backup_at_end: bool,
    /// Partitions on the disk that the image does not have (e.g. the `CIDATA` seed), by name.
    pub extra_partitions: Vec<String>,
}

/// Proves that `target` holds `image`, accepting the changes a successful install makes on
/// purpose (see the module documentation).
pub fn verify_image(
    image: &Image,
    target: &Target,
    progress: &dyn Progress,
) -> Result<VerifyOutcome, VerifyError> {
    let m = image.manifest();
    let name = target.path().display().to_string();
    if target.size() < m.raw_size {
        return Err(VerifyError::TooSmall {
            target: name,
            size: target.size(),
            raw_size: m.raw_size,
        });
    }
    let mut outcome = VerifyOutcome::default();
    let mut overlays_owned: Vec<(u64, Vec<u8>)> = Vec::new();
    if m.partition_table == PartitionTable::Gpt {
        let ss = u64::from(m.sector_size.unwrap_or(512));
        // The image's first MiB: cheap to decode, it is the start of the stream.
        let head_len = m.raw_size.min(HOLD) as usize;
        let mut head = vec![0u8; head_len];
        let mut dec = image.raw_reader()?;
        read_full(&mut dec, &mut head).map_err(|source| ImageError::Io {
            path: image.path().to_owned(),
            source,
        })?;
        let gpt_err = |reason: String| VerifyError::Gpt {
            target: name.clone(),
            reason,
        };
        let img = GptTable::read(&mut Cursor::new(&head), ss as u32).map_err(|e| {
            gpt_err(format!(
                "could not be compared: the image's own GPT does not read: {e}"
            ))
        })?;
        let mut f = std::fs::File::open(target.path()).map_err(|source| TargetError::Io {
            step: "opening",
            path: target.path().to_owned(),
            source,
        })?;
        let disk = GptTable::read(&mut f, ss as u32)
            .map_err(|e| gpt_err(format!("is not a valid GPT: {e}")))?;
        let ih = img.header();
        let dh = disk.header();
        let last_lba = target.size() / ss - 1;
        if disk != img {
            // Not the image's table byte for byte: it must be what an install makes of it.
            if dh.disk_guid != ih.disk_guid {
                return Err(gpt_err(format!(
                    "has disk GUID {}, the image {}",
                    dh.disk_guid, ih.disk_guid
                )));
            }
            if (dh.first_usable, dh.part_start, dh.num_parts, dh.part_size)
                != (ih.first_usable, ih.part_start, ih.num_parts, ih.part_size)
            {
                return Err(gpt_err(
                    "has a different layout (first usable LBA, entry array) from the image's"
                        .into(),
                ));
            }
            if dh.backup_lba != last_lba {
                return Err(gpt_err(format!(
                    "puts its backup header at LBA {}, not at the disk's end ({last_lba})",
                    dh.backup_lba
                )));
            }
            let backup = GptTable::read_at(&mut f, ss as u32, last_lba)
                .map_err(|e| gpt_err(format!("has no valid backup header: {e}")))?;
            if backup.entry_bytes() != disk.entry_bytes() {
                return Err(gpt_err(
                    "has backup partition entries that differ from the primary's".into(),
                ));
            }
            outcome.gpt_backup_at_end = true;
            let (ip, dp) = (img.partitions(), disk.partitions());
            for (idx, p) in &ip {
                if dp.get(idx) != Some(p) {
                    return Err(gpt_err(format!(
                        "lacks or changed the image's partition {idx} ({:?})",
                        p.name
                    )));
                }
            }
            let image_lbas = m.raw_size / ss;
            for (idx, d) in &dp {
                if ip.contains_key(idx) {
                    continue;
                }
                if d.first_lba < image_lbas {
                    return Err(gpt_err(format!(
                        "has an extra partition {idx} ({:?}) inside the image's area",
                        d.name
                    )));
                }
                outcome.extra_partitions.push(d.name.clone());
            }
            // The header and entry array were checked field by field; the protective MBR
            // may differ only in its size field, and the image's old backup header (when not
            // at the disk's end) must have been cleared. Stand in the image's own bytes for
            // exactly those, and compare everything else byte for byte.
            let mut lba0 = vec![0u8; ss as usize];
            let mut old = vec![0u8; ss as usize];
            f.seek(SeekFrom::Start(0))
                .and_then(|_| f.read_exact(&mut lba0))
                .map_err(|source| VerifyError::ReadIo {
                    target: name.clone(),
                    offset: 0,
                    source,
                })?;
            let fitted = fit_protective_mbr(&head[..ss as usize], target.size(), ss)
                .map_err(|e| gpt_err(e.to_string()))?;
            if lba0 != fitted && lba0 != head[..ss as usize] {
                return Err(gpt_err("has a protective MBR unlike the image's".into()));
            }
            let arr = (ih.part_start * ss) as usize;
            let arr_end = arr + img.array_len() as usize;
            for (s0, e0) in [
                (0, ss as usize),
                (ss as usize, 2 * ss as usize),
                (arr, arr_end),
            ] {
                if e0 <= head.len() {
                    overlays_owned.push((s0 as u64, head[s0..e0].to_vec()));
                }
            }
            if ih.backup_lba != last_lba && (ih.backup_lba + 1) * ss <= m.raw_size {
                let at = ih.backup_lba * ss;
                f.seek(SeekFrom::Start(at))
                    .and_then(|_| f.read_exact(&mut old))
                    .map_err(|source| VerifyError::ReadIo {
                        target: name.clone(),
                        offset: at,
                        source,
                    })?;
                if old.iter().any(|&b| b != 0) {
                    return Err(gpt_err(format!(
                        "still has a header at the image's backup sector {}",
                        ih.backup_lba
                    )));
                }
                // The image's bytes there: its old backup header.
                let tail_hdr = image_sector(image, ih.backup_lba * ss, ss as usize)?;
                overlays_owned.push((at, tail_hdr));
            }
        }
    }
    target.drop_caches()?;
    let overlays: Vec<Overlay<'_>> = overlays_owned
        .iter()
        .map(|(o, d)| Overlay {
            offset: *o,
            data: d.as_slice(),
        })
        .collect();
    verify_chunks(target, m, &overlays, progress)?;
    Ok(outcome)
}

/// `len` bytes of the raw image at `offset`, decoded (only on `verify`'s GPT path: one sector).
fn image_sector(image: &Image, offset: u64, len: usize) -> Result<Vec<u8>, VerifyError> {
    let io = |source| {
        VerifyError::Image(ImageError::Io {
            path: image.path().to_owned(),
            source,
        })
    };
    let mut dec = image.raw_reader()?;
    std::io::copy(&mut (&mut dec).take(offset), &mut std::io::sink()).map_err(io)?;
    let mut buf = vec![0u8; len];
    dec.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}
