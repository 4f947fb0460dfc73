//! The verified write engine: puts an imprint image onto a target so that what is on the target
//! is provably the image, and so that nothing half-written can ever boot.
//!
//! The order of operations is the safety argument:
//!
//! 1. **Pre-flight** ([`preflight`]): size, sector size and alignment are checked before a single
//!    byte is written. The image was already validated when it was opened.
//! 2. **Wipe**: the target's first and last MiB are zeroed and synced. From here on the target
//!    carries no partition table: not the old one (a half-overwritten old OS cannot boot), not a
//!    new one.
//! 3. **Stream**: a decoder thread inflates the payload into aligned buffers, the calling thread
//!    hashes them (whole image and per chunk, compared with the manifest as each chunk
//!    completes), a writer thread writes them with `O_DIRECT`. The image's first and last MiB —
//!    which hold the primary and backup GPT — are *held back in memory* and not written. Runs of
//!    zeros are written with `BLKZEROOUT`. The stream must end exactly at `raw_size`, cleanly.
//! 4. **Verify**: everything written is read back bypassing the page cache and compared chunk by
//!    chunk with the manifest's digests (the held regions are spliced in from memory).
//! 5. **Commit**: only now the held last MiB, then the held first MiB are written, synced, read
//!    back and compared; the backup GPT is moved to the end of a larger disk; the kernel re-reads
//!    the partition table.
//!
//! Any failure in 1–4 — a corrupt byte, a truncated payload, an I/O error, a killed process —
//! leaves a target with no valid partition table (primary and backup both absent), and the error
//! names the step, offset and chunk.

use std::time::Instant;

use crossbeam_channel::bounded;
use serde::Serialize;
use std::io::Read;

use sha2::{Digest, Sha256};

use crate::blockdev::{AlignedBuf, Target, TargetError, TargetKind};
use crate::gpt_fixup::{self, GptFixup, GptFixupError};
use crate::manifest::{hex, read_full, ChunkHasher, Image, ImageError, Manifest, PartitionTable};
use crate::progress::{human_bytes, Phase, Progress};
use crate::verify::{self, Overlay, VerifyError};

/// Bytes held back in memory at each end of the image (covers a GPT's header and entry array
/// at 512- and 4096-byte sectors).
pub const HOLD: u64 = 1 << 20;
/// Size of one I/O buffer.
const BUF: usize = 4 << 20;
/// Buffers in flight between decoder, hasher and writer (bounds memory use: ~24 MiB).
const NBUF: usize = 6;

/// How to write.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Read the target back and compare (on by default; `--no-verify` turns it off).
    pub verify: bool,
    /// Write runs of zeros with `BLKZEROOUT` / hole punching instead of writing them.
    pub zeroout: bool,
    /// Before touching the target, read the whole compressed payload and check its sha256:
    /// a damaged payload is then refused with the target untouched.
    pub precheck_payload: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            verify: true,
            zeroout: true,
            precheck_payload: false,
        }
    }
}

/// What a successful write did, with timings (goes into reports).
#[derive(Debug, Clone, Serialize)]
pub struct WriteReport {
    /// Image name.
    pub image_name: String,
    /// sha256 of the raw image, as verified.
    pub image_sha256: String,
    /// Raw image size.
    pub raw_size: u64,
    /// Target path.
    pub target: String,
    /// Target kind.
    pub target_kind: TargetKind,
    /// Target size.
    pub target_size: u64,
    /// Seconds spent checking the payload before writing (0 when not done).
    pub precheck_seconds: f64,
    /// Seconds spent decoding and writing.
    pub write_seconds: f64,
    /// Seconds spent reading back (0 when not verified).
    pub verify_seconds: f64,
    /// Seconds spent committing the held regions and fixing up the GPT.
    pub commit_seconds: f64,
    /// Bytes made zero with `BLKZEROOUT` / hole punching instead of written.
    pub zeroed_bytes: u64,
    /// Whether the whole target was read back and matched.
    pub verified: bool,
    /// The backup GPT move, when one was needed.
    pub gpt_fixup: Option<GptFixup>,
    /// Whether the kernel re-read the partition table.
    pub partitions_reread: bool,
}

/// Why a write failed. Every variant names what and where.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The target could not be opened, checked or synced.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The target is smaller than the image.
    #[error(
        "{target} is too small: it holds {} ({target_size} bytes) but the image needs {} ({raw_size} bytes); choose a larger disk",
        human_bytes(*.target_size), human_bytes(*.raw_size)
    )]
    TooSmall {
        /// Target path.
        target: String,
        /// Target size.
        target_size: u64,
        /// Image size.
        raw_size: u64,
    },
    /// The image's GPT was laid out for another sector size than the target's.
    #[error(
        "{target} has {target_sector}-byte logical sectors but the image's partition table is laid out for {image_sector}-byte sectors: it would not boot; use an image built for {target_sector}-byte sectors (`imprint prepare` reports the sector size)"
    )]
    SectorMismatch {
        /// Target path.
        target: String,
        /// The target's logical sector size.
        target_sector: u32,
        /// The image's sector size.
        image_sector: u32,
    },
    /// The image size is not a multiple of the target's sector size.
    #[error(
        "the image size {raw_size} is not a multiple of {target}'s {target_sector}-byte sectors"
    )]
    Unaligned {
        /// Target path.
        target: String,
        /// The target's logical sector size.
        target_sector: u32,
        /// Image size.
        raw_size: u64,
    },
    /// The compressed stream could not be decoded: corrupt or truncated payload.
    #[error(
        "the image payload is corrupt or truncated: decoding failed after {offset} bytes of the raw image (chunk {chunk}); nothing bootable was left on the target"
    )]
    Decode {
        /// Raw offset reached.
        offset: u64,
        /// Chunk index at that offset.
        chunk: u64,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// The stream ended before `raw_size`.
    #[error("the image payload ended after {got} bytes but the manifest promises {expected}: the payload is truncated")]
    ShortStream {
        /// Bytes decoded.
        got: u64,
        /// Bytes promised.
        expected: u64,
    },
    /// The stream holds more than `raw_size`.
    #[error("the image payload decodes to more than the {expected} bytes the manifest promises: the manifest does not belong to this payload")]
    LongStream {
        /// Bytes promised.
        expected: u64,
    },
    /// Decoded data differs from the manifest's chunk digest.
    #[error(
        "chunk {chunk} of the image (bytes {start}..{end}) decodes to sha256 {actual}, the manifest says {expected}: the image is corrupt"
    )]
    ChunkMismatch {
        /// Chunk index.
        chunk: u64,
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Digest in the manifest.
        expected: String,
        /// Digest of the decoded data.
        actual: String,
    },
    /// Writing to the target failed.
    #[error("writing {len} bytes at offset {offset} of {target}")]
    WriteIo {
        /// Target path.
        target: String,
        /// Offset of the failed write.
        offset: u64,
        /// Length of the failed write.
        len: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Read-back verification failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The committed partition-table regions did not read back as written.
    #[error("{target}: the partition table region at offset {offset} did not read back as written; the disk is failing")]
    CommitMismatch {
        /// Target path.
        target: String,
        /// Offset of the region.
        offset: u64,
    },
    /// Moving the backup GPT failed.
    #[error(transparent)]
    GptFixup(#[from] GptFixupError),
}

impl WriteError {
    /// Whether the error is the image's fault (as opposed to the target's).
    pub fn is_image_fault(&self) -> bool {
        matches!(
            self,
            WriteError::Image(_)
                | WriteError::Decode { .. }
                | WriteError::ShortStream { .. }
                | WriteError::LongStream { .. }
                | WriteError::ChunkMismatch { .. }
        )
    }
}

/// Checks that `manifest` fits `target`. Writes nothing.
pub fn preflight(manifest: &Manifest, target: &Target) -> Result<(), WriteError> {
    let name = target.path().display().to_string();
    if target.size() < manifest.raw_size {
        return Err(WriteError::TooSmall {
            target: name,
            target_size: target.size(),
            raw_size: manifest.raw_size,
        });
    }
    let lss = target.logical_sector_size();
    if manifest.partition_table == PartitionTable::Gpt {
        if let Some(iss) = manifest.sector_size {
            if iss != lss {
                return Err(WriteError::SectorMismatch {
                    target: name,
                    target_sector: lss,
                    image_sector: iss,
                });
            }
        }
    }
    if lss == 0 || !manifest.raw_size.is_multiple_of(u64::from(lss)) {
        return Err(WriteError::Unaligned {
            target: name,
            target_sector: lss,
            raw_size: manifest.raw_size,
        });
    }
    Ok(())
}

struct Block {
    offset: u64,
    len: usize,
    buf: AlignedBuf,
}

struct WriteJob {
    block: Block,
    /// Sub-range of the block to put on the target: [start, end) relative to the block.
    start: usize,
    end: usize,
}

/// Compares a decoded chunk's digest with the manifest.
fn check_chunk(m: &Manifest, chunk: u64, actual: String) -> Result<(), WriteError> {
    let expected = &m.chunks[chunk as usize];
    if &actual == expected {
        return Ok(());
    }
    let (start, end) = m.chunk_range(chunk);
    Err(WriteError::ChunkMismatch {
        chunk,
        start,
        end,
        expected: expected.clone(),
        actual,
    })
}

/// A read-back mismatch means the disk or the image is bad. Decode the image up to that chunk
/// again and hash it: if the image's own chunk differs from its manifest, the image is at fault
/// (a payload damaged in a way zstd's checksums did not catch), otherwise the disk is. Runs only
/// on the failure path.
fn attribute_mismatch(image: &Image, err: VerifyError) -> WriteError {
    let VerifyError::Mismatch { chunk, .. } = &err else {
        return WriteError::Verify(err);
    };
    let m = image.manifest();
    let chunk = *chunk;
    let (start, end) = m.chunk_range(chunk);
    let Ok(mut dec) = image.raw_reader() else {
        return WriteError::Verify(err);
    };
    if std::io::copy(&mut (&mut dec).take(start), &mut std::io::sink()).ok() != Some(start) {
        return WriteError::Verify(err);
    }
    let mut data = vec![0u8; (end - start) as usize];
    if read_full(&mut dec, &mut data).ok() != Some(data.len()) {
        return WriteError::Verify(err);
    }
    let actual = hex(&Sha256::digest(&data));
    match check_chunk(m, chunk, actual) {
        Err(image_fault) => image_fault,
        Ok(()) => WriteError::Verify(err),
    }
}

/// Granularity of zero-run detection: large enough that a zeroing ioctl is worth its call.
const ZERO_GRAN: usize = 1 << 20;

/// Splits `data[start..end]` into maximal runs `(start, end, is_zero)` at [`ZERO_GRAN`]
/// boundaries. Without `zeroout` it is one data run.
fn runs(data: &[u8], start: usize, end: usize, zeroout: bool) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    if start >= end {
        return out;
    }
    if !zeroout {
        out.push((start, end, false));
        return out;
    }
    let mut pos = start;
    while pos < end {
        let next = ((pos / ZERO_GRAN + 1) * ZERO_GRAN).min(end);
        let zero = is_zero(&data[pos..next]);
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 = next,
            _ => out.push((pos, next, zero)),
        }
        pos = next;
    }
    out
}

/// Writes `image` onto `target` with the guarantees described in the module documentation.
pub fn write_image(
    image: &Image,
    target: &Target,
    opts: &WriteOptions,
    progress: &dyn Progress,
) -> Result<WriteReport, WriteError> {
    let m = image.manifest();
    preflight(m, target)?;
    let mut report = WriteReport {
        image_name: m.name.clone(),
        image_sha256: m.sha256.clone(),
        raw_size: m.raw_size,
        target: target.path().display().to_string(),
        target_kind: target.kind(),
        target_size: target.size(),
        precheck_seconds: 0.0,
        write_seconds: 0.0,
        verify_seconds: 0.0,
        commit_seconds: 0.0,
        zeroed_bytes: 0,
        verified: false,
        gpt_fixup: None,
        partitions_reread: false,
    };

    if opts.precheck_payload {
        let t = Instant::now();
        progress.begin(Phase::Precheck, m.compressed_size);
        image.check_payload_digest()?;
        report.precheck_seconds = t.elapsed().as_secs_f64();
        progress.end(Phase::Precheck, m.compressed_size, report.precheck_seconds);
    }

    // --- Wipe: from here on the target has no partition table until commit.
    let t = Instant::now();
    let size = target.size();
    let wipe = HOLD.min(size);
    progress.begin(Phase::Wipe, 2 * wipe);
    let zero_err = |offset: u64, len: u64| {
        let target = report.target.clone();
        move |source| WriteError::WriteIo {
            target,
            offset,
            len,
            source,
        }
    };
    target.zero_range(0, wipe).map_err(zero_err(0, wipe))?;
    target
        .zero_range(size - wipe, wipe)
        .map_err(zero_err(size - wipe, wipe))?;
    target.sync()?;
    progress.end(Phase::Wipe, 2 * wipe, t.elapsed().as_secs_f64());

    // --- Stream.
    let raw = m.raw_size;
    let head_end = raw.min(HOLD);
    let tail_start = raw.saturating_sub(HOLD).max(head_end);
    let mut head = AlignedBuf::new(head_end as usize);
    let mut tail = AlignedBuf::new((raw - tail_start) as usize);
    let t = Instant::now();
    progress.begin(Phase::Write, raw);
    report.zeroed_bytes = stream(
        image, target, opts, progress, &mut head, &mut tail, tail_start,
    )?;
    report.write_seconds = t.elapsed().as_secs_f64();
    progress.end(Phase::Write, raw, report.write_seconds);

    // --- Verify.
    if opts.verify {
        let t = Instant::now();
        target.drop_caches()?;
        let overlays = [
            Overlay {
                offset: 0,
                data: head.as_slice(),
            },
            Overlay {
                offset: tail_start,
                data: tail.as_slice(),
            },
        ];
        verify::verify_chunks(target, m, &overlays, progress)
            .map_err(|e| attribute_mismatch(image, e))?;
        report.verify_seconds = t.elapsed().as_secs_f64();
        report.verified = true;
    }

    // --- Commit: backup region first, then the primary; each synced and read back.
    let t = Instant::now();
    progress.begin(Phase::Commit, head_end + (raw - tail_start));
    for (offset, buf) in [(tail_start, &tail), (0, &head)] {
        if buf.is_empty() {
            continue;
        }
        target
            .write_at(buf.as_slice(), offset)
            .map_err(|source| WriteError::WriteIo {
                target: report.target.clone(),
                offset,
                len: buf.len() as u64,
                source,
            })?;
        target.sync()?;
        target.drop_caches()?;
        let mut back = AlignedBuf::new(buf.len());
        target
            .read_at(back.as_mut_slice(), offset)
            .map_err(|source| {
                WriteError::Verify(VerifyError::ReadIo {
                    target: report.target.clone(),
                    offset,
                    source,
                })
            })?;
        if back.as_slice() != buf.as_slice() {
            return Err(WriteError::CommitMismatch {
                target: report.target.clone(),
                offset,
            });
        }
    }
    if m.partition_table == PartitionTable::Gpt && size > raw {
        let mut f = target.reopen_buffered()?;
        report.gpt_fixup =
            gpt_fixup::move_backup_to_end(&mut f, size, target.logical_sector_size())?;
        drop(f);
        target.sync()?;
    }
    target.drop_caches()?;
    report.partitions_reread = target.reread_partitions()?;
    report.commit_seconds = t.elapsed().as_secs_f64();
    progress.end(
        Phase::Commit,
        head_end + (raw - tail_start),
        report.commit_seconds,
    );
    Ok(report)
}

/// Decodes, hashes and writes everything but the held regions, which are copied into `head`
/// and `tail`. Returns the number of bytes zeroed instead of written.
fn stream(
    image: &Image,
    target: &Target,
    opts: &WriteOptions,
    progress: &dyn Progress,
    head: &mut AlignedBuf,
    tail: &mut AlignedBuf,
    tail_start: u64,
) -> Result<u64, WriteError> {
    let m = image.manifest();
    let raw = m.raw_size;
    let head_end = head.len() as u64;
    let mut decoder = image.raw_reader()?;
    let target_name = target.path().display().to_string();

    let (free_tx, free_rx) = bounded::<AlignedBuf>(NBUF);
    let (full_tx, full_rx) = bounded::<Block>(NBUF);
    let (job_tx, job_rx) = bounded::<WriteJob>(NBUF);
    for _ in 0..NBUF {
        // Cannot fail: the channel has room for NBUF and its receiver is alive.
        let _ = free_tx.send(AlignedBuf::new(BUF));
    }

    std::thread::scope(|s| {
        // Decoder: fills buffers in order; owns the clean-end checks.
        let decoder_thread = s.spawn(move || -> Result<(), WriteError> {
            let mut offset = 0u64;
            loop {
                let Ok(mut buf) = free_rx.recv() else {
                    return Ok(());
                };
                let n = read_full(&mut decoder, buf.as_mut_slice()).map_err(|source| {
                    WriteError::Decode {
                        offset,
                        chunk: offset / m.chunk_size,
                        source,
                    }
                })?;
                if n == 0 {
                    break;
                }
                if offset + n as u64 > raw {
                    return Err(WriteError::LongStream { expected: raw });
                }
                if full_tx
                    .send(Block {
                        offset,
                        len: n,
                        buf,
                    })
                    .is_err()
                {
                    return Ok(());
                }
                offset += n as u64;
                if n < BUF {
                    // A short read means the reader is at its end; confirm below.
                    let mut probe = [0u8; 1];
                    let more = read_full(&mut decoder, &mut probe).map_err(|source| {
                        WriteError::Decode {
                            offset,
                            chunk: offset / m.chunk_size,
                            source,
                        }
                    })?;
                    if more != 0 {
                        return Err(WriteError::LongStream { expected: raw });
                    }
                    break;
                }
            }
            if offset != raw {
                return Err(WriteError::ShortStream {
                    got: offset,
                    expected: raw,
                });
            }
            Ok(())
        });

        // Writer: puts each job on the target, runs of zeros as BLKZEROOUT / punched holes,
        // and returns its buffer.
        let writer_thread = s.spawn(move || -> Result<u64, WriteError> {
            let mut zeroed = 0u64;
            for job in job_rx {
                let data = job.block.buf.as_slice();
                for (start, end, zero) in runs(data, job.start, job.end, opts.zeroout) {
                    let off = job.block.offset + start as u64;
                    let len = (end - start) as u64;
                    let res = if zero {
                        zeroed += len;
                        target.zero_range(off, len)
                    } else {
                        target.write_at(&data[start..end], off)
                    };
                    res.map_err(|source| WriteError::WriteIo {
                        target: target_name.clone(),
                        offset: off,
                        len,
                        source,
                    })?;
                }
                progress.advance(job.block.offset + job.block.len as u64);
                // The decoder may have finished and dropped its end: the buffer is not needed
                // any more then, but the remaining jobs still are.
                let _ = free_tx.send(job.block.buf);
            }
            Ok(zeroed)
        });

        // Hasher (this thread): chunk checks, held regions. With read-back verification on, the
        // decoded stream is not hashed here: the read-back hashes what reached the disk, zstd's
        // frame checksums catch a damaged payload while decoding, and a read-back mismatch is
        // attributed to the image or the disk afterwards (see `attribute_mismatch`). That saves
        // a full SHA-256 pass. Without verification, every chunk is checked here.
        let hash = !opts.verify;
        let hashed = (move || -> Result<(), WriteError> {
            let mut chunker = ChunkHasher::new(m.chunk_size);
            let mut check = |i: u64, actual: String| check_chunk(m, i, actual);
            let mut seen = 0u64;
            for block in full_rx.iter() {
                let data = &block.buf.as_slice()[..block.len];
                if hash {
                    chunker.update(data, &mut check)?;
                }
                // Held regions go to memory.
                let b_start = block.offset;
                let b_end = block.offset + block.len as u64;
                if b_start < head_end {
                    let e = b_end.min(head_end);
                    head.as_mut_slice()[b_start as usize..e as usize]
                        .copy_from_slice(&data[..(e - b_start) as usize]);
                }
                if b_end > tail_start {
                    let s0 = b_start.max(tail_start);
                    tail.as_mut_slice()[(s0 - tail_start) as usize..(b_end - tail_start) as usize]
                        .copy_from_slice(&data[(s0 - b_start) as usize..]);
                }
                let w_start = b_start.max(head_end).min(b_end);
                let w_end = b_end.min(tail_start).max(w_start);
                let start = (w_start - b_start) as usize;
                let end = (w_end - b_start) as usize;
                seen = b_end;
                if job_tx.send(WriteJob { block, start, end }).is_err() {
                    return Ok(());
                }
            }
            drop(job_tx);
            if hash && seen == raw {
                chunker.finish(&mut check)?;
            }
            Ok(())
        })();

        let decoded = decoder_thread.join().unwrap_or_else(|_| {
            Err(WriteError::Decode {
                offset: 0,
                chunk: 0,
                source: std::io::Error::other("decoder thread panicked"),
            })
        });
        let written = writer_thread.join().unwrap_or_else(|_| {
            Err(WriteError::WriteIo {
                target: target.path().display().to_string(),
                offset: 0,
                len: 0,
                source: std::io::Error::other("writer thread panicked"),
            })
        });
        // The first real failure wins: a stage that stopped because another failed returns Ok.
        decoded?;
        hashed?;
        let zeroed = written?;
        target.sync()?;
        Ok(zeroed)
    })
}

/// Whether `data` is all zeros: OR-folds 4 KiB at a time (which the compiler vectorises) and
/// stops at the first block holding data.
fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::blockdev::OpenOptionsTarget;
    use crate::manifest::tests::{fake_gpt_raw, pack_bytes};
    use crate::progress::NoProgress;
    use std::path::Path;

    fn file_target(p: &Path, size: u64, ss: u32) -> Target {
        std::fs::write(p, vec![0xEEu8; size as usize]).unwrap();
        Target::open(
            p,
            &OpenOptionsTarget {
                file_sector_size: ss,
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn runs_split_and_merge() {
        let mut d = vec![0u8; 4 * ZERO_GRAN];
        d[ZERO_GRAN + 5] = 1;
        d[2 * ZERO_GRAN] = 1;
        let r = runs(&d, 4096, 4 * ZERO_GRAN, true);
        assert_eq!(
            r,
            vec![
                (4096, ZERO_GRAN, true),
                (ZERO_GRAN, 3 * ZERO_GRAN, false),
                (3 * ZERO_GRAN, 4 * ZERO_GRAN, true)
            ]
        );
        assert_eq!(
            runs(&d, 0, 4 * ZERO_GRAN, false),
            vec![(0, 4 * ZERO_GRAN, false)]
        );
        assert!(runs(&d, 10, 10, true).is_empty());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[7] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn writes_exact_image_512_and_4k() {
        for ss in [512usize, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let raw = fake_gpt_raw(6 << 20, ss);
            let img_path = dir.path().join("i.img.zst");
            pack_bytes(&raw, &img_path);
            let img = Image::open(&img_path).unwrap();
            let disk = dir.path().join("disk");
            let tgt = file_target(&disk, raw.len() as u64, ss as u32);
            let rep = write_image(&img, &tgt, &WriteOptions::default(), &NoProgress).unwrap();
            assert!(rep.verified);
            assert!(
                rep.zeroed_bytes > 0,
                "zero runs should be punched, not written"
            );
            let got = std::fs::read(&disk).unwrap();
            assert_eq!(got.len(), raw.len());
            let pos = got.iter().zip(&raw).position(|(a, b)| a != b);
            assert_eq!(
                pos,
                None,
                "first differing byte, ss {ss}: got {:?} want {:?}",
                pos.map(|p| &got[p..p + 8]),
                pos.map(|p| &raw[p..p + 8])
            );
        }
    }

    /// An image whose manifest disagrees with its (intact) payload in chunk 2: with and without
    /// read-back, the error blames the image and names the chunk; no partition table is left.
    #[test]
    fn manifest_payload_disagreement_is_an_image_fault_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(6 << 20, 512);
        let good = dir.path().join("good.img.zst");
        let mut m = pack_bytes(&raw, &good);
        let bytes = std::fs::read(&good).unwrap();
        let payload = &bytes[bytes.len() - m.compressed_size as usize..];
        m.chunks[2] = "0".repeat(64);
        let bad = dir.path().join("bad.img.zst");
        let mut out = m.to_frame();
        out.extend_from_slice(payload);
        std::fs::write(&bad, out).unwrap();
        let img = Image::open(&bad).unwrap();
        for verify in [true, false] {
            let disk = dir.path().join(format!("disk-{verify}"));
            let tgt = file_target(&disk, raw.len() as u64, 512);
            let opts = WriteOptions {
                verify,
                ..Default::default()
            };
            let e = write_image(&img, &tgt, &opts, &NoProgress).unwrap_err();
            assert!(
                matches!(e, WriteError::ChunkMismatch { chunk: 2, .. }),
                "verify={verify}: {e}"
            );
            assert!(e.is_image_fault());
            let got = std::fs::read(&disk).unwrap();
            assert!(
                got[..1 << 20].iter().all(|&b| b == 0),
                "no partition table may be left"
            );
        }
    }

    #[test]
    fn too_small_and_sector_mismatch_leave_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(4 << 20, 512);
        let img_path = dir.path().join("i.img.zst");
        pack_bytes(&raw, &img_path);
        let img = Image::open(&img_path).unwrap();
        let disk = dir.path().join("small");
        let tgt = file_target(&disk, 3 << 20, 512);
        let e = write_image(&img, &tgt, &WriteOptions::default(), &NoProgress).unwrap_err();
        assert!(matches!(e, WriteError::TooSmall { .. }), "{e}");
        assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0xEE));
        let disk4k = dir.path().join("4k");
        let tgt = file_target(&disk4k, 8 << 20, 4096);
        let e = write_image(&img, &tgt, &WriteOptions::default(), &NoProgress).unwrap_err();
        assert!(matches!(e, WriteError::SectorMismatch { .. }), "{e}");
        assert!(std::fs::read(&disk4k).unwrap().iter().all(|&b| b == 0xEE));
    }
}
