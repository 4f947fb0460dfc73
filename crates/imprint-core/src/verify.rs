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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::{bounded, unbounded};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::blockdev::{AlignedBuf, Target, TargetError};
use crate::gpt_table::{fit_protective_mbr, GptTable};
use crate::manifest::{hex, read_full, Image, ImageError, Manifest, PartitionTable};
use crate::progress::{Phase, Progress};
use crate::write::HOLD;

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
/// with the manifest.
///
/// One reader thread fills aligned buffers (O_DIRECT where the target allows it) and hands
/// each chunk to one of [`hash_workers`] hashing threads in turn, so reading overlaps hashing
/// and SHA-256 runs on every core. Memory stays bounded: the buffers are a fixed pool (see
/// [`pool_size`]), recycled as soon as a piece is hashed. A mismatch names the lowest chunk
/// that differs, as a sequential check would: chunks before it are always all checked.
pub fn verify_chunks(
    target: &Target,
    m: &Manifest,
    overlays: &[Overlay<'_>],
    progress: &dyn Progress,
) -> Result<(), VerifyError> {
    verify_chunks_with(target, m, overlays, progress, hash_workers(), PIECE)
}

/// Bytes read per `read_at`: large enough for a deep request on a disk, small enough that a
/// few per worker fit the memory budget.
const PIECE: usize = 4 << 20;
/// More hashing threads than this buys nothing on the disks imprint writes (8 cores hash
/// at least 3 GB/s even without SHA extensions) and would cost buffers.
const MAX_WORKERS: usize = 8;
/// The buffer pool never exceeds this many bytes (peak RSS of `imprint write` stays < 64 MiB).
const POOL_BUDGET: usize = 48 << 20;

/// Hashing threads: one per core the process may use, at most [`MAX_WORKERS`].
pub fn hash_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_WORKERS)
}

/// Buffers in the pool for `workers` hashing threads of `piece`-byte pieces: two per worker
/// (one being hashed, one queued) and two for the reader to fill ahead, within
/// [`POOL_BUDGET`] and never fewer than two.
fn pool_size(workers: usize, piece: usize) -> usize {
    (2 * workers + 2).min(POOL_BUDGET / piece).max(2)
}

/// A piece of one chunk, read into a pool buffer.
struct Piece {
    chunk: u64,
    offset: u64,
    len: usize,
    /// The piece ends its chunk: the worker finishes the digest.
    last: bool,
    buf: AlignedBuf,
}

/// [`verify_chunks`] with the worker count and piece size as parameters (tests vary them).
fn verify_chunks_with(
    target: &Target,
    m: &Manifest,
    overlays: &[Overlay<'_>],
    progress: &dyn Progress,
    workers: usize,
    piece: usize,
) -> Result<(), VerifyError> {
    let name = target.path().display().to_string();
    let raw = m.raw_size;
    let chunks = m.chunk_count();
    let start_time = std::time::Instant::now();
    progress.begin(Phase::Verify, raw);
    let workers = workers.max(1);
    // Pieces never straddle a chunk, and stay a multiple of 4 KiB for O_DIRECT.
    let piece = (piece.min(m.chunk_size as usize) / 4096).max(1) * 4096;
    let nbuf = pool_size(workers, piece);

    // The lowest chunk known to differ (u64::MAX: none yet). Only ever lowered, so every chunk
    // below its final value is read and hashed; chunks above it are skipped.
    let fail_at = AtomicU64::new(u64::MAX);
    let (free_tx, free_rx) = bounded::<AlignedBuf>(nbuf);
    for _ in 0..nbuf {
        let _ = free_tx.send(AlignedBuf::new(piece));
    }
    let (done_tx, done_rx) = unbounded::<(u64, [u8; 32])>();
    let mut work_txs = Vec::with_capacity(workers);
    let mut work_rxs = Vec::with_capacity(workers);
    for _ in 0..workers {
        // Unbounded: the pool already bounds the pieces in flight.
        let (tx, rx) = unbounded::<Piece>();
        work_txs.push(tx);
        work_rxs.push(rx);
    }

    let hash_panicked = AtomicBool::new(false);
    let (read, mismatch, checked) = std::thread::scope(|s| {
        let fail_at = &fail_at;
        let hash_panicked = &hash_panicked;
        // Each stage owns its channel ends, so a stage that stops (done, failed or panicked)
        // unblocks the others instead of leaving them waiting forever.
        let reader = s.spawn(move || -> Result<(), (u64, std::io::Error)> {
            let mut offset = 0u64;
            while offset < raw {
                let chunk = offset / m.chunk_size;
                if chunk > fail_at.load(Ordering::Relaxed) || hash_panicked.load(Ordering::Relaxed)
                {
                    return Ok(());
                }
                let Ok(mut buf) = free_rx.recv() else {
                    return Ok(());
                };
                let chunk_end = m.chunk_range(chunk).1;
                let n = (chunk_end - offset).min(piece as u64) as usize;
                // O_DIRECT needs whole sectors: an image whose size is not a multiple of
                // 4 KiB ends in a partial read, rounded up as far as the target reaches.
                let room = target.size().saturating_sub(offset).max(n as u64);
                let span = (n.next_multiple_of(4096) as u64).min(room) as usize;
                target
                    .read_at(&mut buf.as_mut_slice()[..span], offset)
                    .map_err(|e| (offset, e))?;
                let p = Piece {
                    chunk,
                    offset,
                    len: n,
                    last: offset + n as u64 == chunk_end,
                    buf,
                };
                if work_txs[(chunk % workers as u64) as usize].send(p).is_err() {
                    return Ok(());
                }
                offset += n as u64;
            }
            Ok(())
        });
        let mut hashers = Vec::with_capacity(workers);
        for rx in work_rxs {
            let free_tx = free_tx.clone();
            let done_tx = done_tx.clone();
            hashers.push(s.spawn(move || {
                let hash_all = || {
                    let mut h = Sha256::new();
                    for mut p in rx.iter() {
                        if p.chunk <= fail_at.load(Ordering::Relaxed) {
                            if p.offset == m.chunk_range(p.chunk).0 {
                                h = Sha256::new();
                            }
                            let data = &mut p.buf.as_mut_slice()[..p.len];
                            splice(data, p.offset, overlays);
                            h.update(&*data);
                            if p.last {
                                let digest: [u8; 32] = std::mem::take(&mut h).finalize().into();
                                if done_tx.send((p.chunk, digest)).is_err() {
                                    return;
                                }
                            }
                        }
                        // The reader may be done and gone; that is fine.
                        let _ = free_tx.send(p.buf);
                    }
                };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(hash_all)).is_err() {
                    // Stop the reader and hand back what is queued here, so no stage waits
                    // for buffers this thread would never return.
                    hash_panicked.store(true, Ordering::Relaxed);
                    for p in rx.iter() {
                        let _ = free_tx.send(p.buf);
                    }
                }
            }));
        }
        drop(free_tx);
        drop(done_tx);

        // This thread compares digests and reports progress as a contiguous prefix.
        let mut ok = vec![false; chunks as usize];
        let mut prefix = 0u64;
        let mut checked = 0u64;
        let mut mismatch: Option<(u64, String)> = None;
        for (i, digest) in done_rx.iter() {
            let actual = hex(&digest);
            if actual != m.chunks[i as usize] {
                if mismatch.as_ref().is_none_or(|(j, _)| i < *j) {
                    mismatch = Some((i, actual));
                }
                fail_at.fetch_min(i, Ordering::Relaxed);
                continue;
            }
            checked += 1;
            ok[i as usize] = true;
            let before = prefix;
            while prefix < chunks && ok[prefix as usize] {
                prefix += 1;
            }
            if prefix != before {
                progress.advance(m.chunk_range(prefix - 1).1);
            }
        }
        let read = reader.join();
        for h in hashers {
            if h.join().is_err() {
                hash_panicked.store(true, Ordering::Relaxed);
            }
        }
        (read, mismatch, checked)
    });
    let hash_panicked = hash_panicked.load(Ordering::Relaxed);

    let read_err = |offset: u64, source: std::io::Error| VerifyError::ReadIo {
        target: name.clone(),
        offset,
        source,
    };
    let mismatch_err = |i: u64, actual: String| {
        let (start, end) = m.chunk_range(i);
        VerifyError::Mismatch {
            target: name.clone(),
            chunk: i,
            start,
            end,
            expected: m.chunks[i as usize].clone(),
            actual,
        }
    };
    let read = read.unwrap_or_else(|_| Err((0, std::io::Error::other("reader thread panicked"))));
    match (read, mismatch) {
        // Whichever lies first on the disk is what a sequential check would have met.
        (Err((offset, source)), Some((i, actual))) => {
            if m.chunk_range(i).0 < offset {
                return Err(mismatch_err(i, actual));
            }
            return Err(read_err(offset, source));
        }
        (Err((offset, source)), None) => return Err(read_err(offset, source)),
        (Ok(()), Some((i, actual))) => return Err(mismatch_err(i, actual)),
        (Ok(()), None) => {}
    }
    // Defence in depth: never report success for a partial read-back.
    if hash_panicked || checked != chunks {
        return Err(read_err(
            m.chunk_range(checked.min(chunks.saturating_sub(1))).0,
            std::io::Error::other(if hash_panicked {
                "a hashing thread panicked; verification is incomplete"
            } else {
                "the read-back ended early; verification is incomplete"
            }),
        ));
    }
    progress.end(Phase::Verify, raw, start_time.elapsed().as_secs_f64());
    Ok(())
}

/// Copies the parts of `overlays` that fall inside `[offset, offset + data.len())` over `data`.
fn splice(data: &mut [u8], offset: u64, overlays: &[Overlay<'_>]) {
    let end = offset + data.len() as u64;
    for o in overlays {
        let o_end = o.offset + o.data.len() as u64;
        if o.offset < end && o_end > offset {
            let s0 = o.offset.max(offset);
            let e0 = o_end.min(end);
            data[(s0 - offset) as usize..(e0 - offset) as usize]
                .copy_from_slice(&o.data[(s0 - o.offset) as usize..(e0 - o.offset) as usize]);
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::blockdev::OpenOptionsTarget;
    use crate::manifest::tests::{fake_gpt_raw, pack_bytes};
    use crate::progress::NoProgress;
    use std::path::Path;
    use std::sync::Mutex;

    /// Six 1 MiB chunks, the last one three sectors long: `(raw image, its manifest)`.
    fn image(dir: &Path, ss: usize) -> (Vec<u8>, Manifest) {
        let raw = fake_gpt_raw((5 << 20) + 3 * ss, ss);
        let m = pack_bytes(&raw, &dir.join("i.img.zst"));
        assert_eq!(m.chunk_count(), 6);
        (raw, m)
    }

    fn disk(dir: &Path, bytes: &[u8], ss: usize) -> Target {
        let p = dir.join("disk");
        std::fs::write(&p, bytes).unwrap();
        Target::open(
            &p,
            &OpenOptionsTarget {
                file_sector_size: ss as u32,
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// (workers, piece size): one and several workers; pieces as large as a chunk, a quarter
    /// of one, and three 4 KiB pages (so overlays and chunks straddle pieces).
    const SHAPES: [(usize, usize); 5] = [
        (1, PIECE),
        (2, PIECE),
        (3, 256 << 10),
        (4, 12288),
        (2, 12288),
    ];

    #[derive(Default)]
    struct Seen(Mutex<Vec<u64>>);
    impl Progress for Seen {
        fn begin(&self, _: Phase, _: u64) {}
        fn advance(&self, done: u64) {
            self.0.lock().unwrap().push(done);
        }
        fn end(&self, _: Phase, _: u64, _: f64) {}
    }

    #[test]
    fn an_intact_target_verifies_and_progress_reaches_the_end() {
        for ss in [512, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let (raw, m) = image(dir.path(), ss);
            // The disk is larger than the image: only the image's bytes are compared.
            let mut bytes = raw.clone();
            bytes.extend_from_slice(&[0xEE; 8192]);
            let t = disk(dir.path(), &bytes, ss);
            for (workers, piece) in SHAPES {
                let seen = Seen::default();
                verify_chunks_with(&t, &m, &[], &seen, workers, piece).unwrap();
                let seen = seen.0.into_inner().unwrap();
                assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
                assert_eq!(seen.last(), Some(&m.raw_size));
            }
            verify_chunks(&t, &m, &[], &NoProgress).unwrap();
        }
    }

    #[test]
    fn a_mismatch_names_the_chunk_and_its_byte_range() {
        for ss in [512, 4096] {
            for chunk in [0u64, 2, 5] {
                let dir = tempfile::tempdir().unwrap();
                let (mut raw, m) = image(dir.path(), ss);
                let (start, end) = m.chunk_range(chunk);
                // One flipped byte in the chunk's last sector.
                raw[end as usize - ss + 7] ^= 0x40;
                let t = disk(dir.path(), &raw, ss);
                for (workers, piece) in SHAPES {
                    let e =
                        verify_chunks_with(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
                    let VerifyError::Mismatch {
                        chunk: c,
                        start: s0,
                        end: e0,
                        ref expected,
                        ref actual,
                        ..
                    } = e
                    else {
                        panic!("{e}");
                    };
                    assert_eq!((c, s0, e0), (chunk, start, end), "{ss} {workers} {piece}");
                    assert_eq!(expected, &m.chunks[chunk as usize]);
                    assert_ne!(actual, expected);
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!("chunk {chunk} (bytes {start}..{end})")),
                        "{msg}"
                    );
                }
                // The engine's own entry point says the same.
                let e = verify_chunks(&t, &m, &[], &NoProgress).unwrap_err();
                assert!(matches!(e, VerifyError::Mismatch { chunk: c, .. } if c == chunk));
            }
        }
    }

    #[test]
    fn of_several_mismatches_the_lowest_chunk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (mut raw, m) = image(dir.path(), 512);
        for chunk in [1usize, 3, 4, 5] {
            raw[(chunk << 20) + 100] ^= 1;
        }
        let t = disk(dir.path(), &raw, 512);
        for _ in 0..5 {
            for (workers, piece) in SHAPES {
                let e = verify_chunks_with(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
                assert!(
                    matches!(e, VerifyError::Mismatch { chunk: 1, .. }),
                    "{workers} {piece}: {e}"
                );
            }
        }
    }

    #[test]
    fn overlays_stand_in_for_the_held_regions() {
        for ss in [512, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let (raw, m) = image(dir.path(), ss);
            let n = raw.len();
            // What the engine holds back: a head reaching into chunk 1 and a tail reaching
            // back into chunk 4. The disk has something else there.
            let head = 0..(1 << 20) + 3 * ss;
            let tail = n - 4 * ss - 4096..n;
            let mut on_disk = raw.clone();
            on_disk[head.clone()].fill(0);
            on_disk[tail.clone()].fill(0xEE);
            let t = disk(dir.path(), &on_disk, ss);
            let overlays = [
                Overlay {
                    offset: 0,
                    data: &raw[head.clone()],
                },
                Overlay {
                    offset: tail.start as u64,
                    data: &raw[tail.clone()],
                },
            ];
            for (workers, piece) in SHAPES {
                verify_chunks_with(&t, &m, &overlays, &NoProgress, workers, piece).unwrap();
                // Without them, the disk's own bytes are compared: chunk 0 differs.
                let e = verify_chunks_with(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
                assert!(matches!(e, VerifyError::Mismatch { chunk: 0, .. }), "{e}");
            }
            // A held byte that differs is caught where it lands: in chunk 1 for the head's
            // end, in chunk 4 for the tail's start (the engine compares what it will write).
            for (at, chunk) in [(head.end - 1, 1u64), (tail.start, 4)] {
                let mut wrong = raw.clone();
                wrong[at] ^= 0x80;
                let overlays = [
                    Overlay {
                        offset: 0,
                        data: &wrong[head.clone()],
                    },
                    Overlay {
                        offset: tail.start as u64,
                        data: &wrong[tail.clone()],
                    },
                ];
                for (workers, piece) in SHAPES {
                    let e = verify_chunks_with(&t, &m, &overlays, &NoProgress, workers, piece)
                        .unwrap_err();
                    assert!(
                        matches!(e, VerifyError::Mismatch { chunk: c, .. } if c == chunk),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_short_target_is_a_read_error_at_its_end_not_a_success() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, m) = image(dir.path(), 512);
        let t = disk(dir.path(), &raw[..3 << 20], 512);
        for (workers, piece) in SHAPES {
            let e = verify_chunks_with(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
            assert!(
                matches!(e, VerifyError::ReadIo { offset, .. } if offset == 3 << 20),
                "{e}"
            );
        }
        // A mismatch before the read error is what a sequential check meets first.
        let mut bad = raw[..3 << 20].to_vec();
        bad[(1 << 20) + 9] ^= 1;
        let t = disk(dir.path(), &bad, 512);
        let e = verify_chunks_with(&t, &m, &[], &NoProgress, 2, PIECE).unwrap_err();
        assert!(matches!(e, VerifyError::Mismatch { chunk: 1, .. }), "{e}");
    }

    #[test]
    fn the_buffer_pool_stays_within_its_budget() {
        for w in 1..=MAX_WORKERS {
            let n = pool_size(w, PIECE);
            assert!(n >= w.min(2) && n * PIECE <= POOL_BUDGET, "{w}: {n}");
        }
        assert!((1..=MAX_WORKERS).contains(&hash_workers()));
    }
}
