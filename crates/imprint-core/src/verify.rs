//! Reading a target back and proving it holds an image.
//!
//! [`verify_chunks`] reads a target back: every chunk, read bypassing the page cache, must hash
//! to the manifest's chunk digest; regions still held in memory are spliced in as
//! [`Overlay`]s. A mismatch names the chunk and its byte range. The write engine runs the same
//! reader *behind* its writer (`Trail`): it reads back what the writer has written and
//! flushed while the writer goes on, and stops the writer at the first bad chunk.
//!
//! [`verify_image`] is `imprint verify`: a disk holding the image byte for byte (written by dd,
//! even on a larger disk) verifies, and so does one a successful install changed on purpose —
//! the GPT headers rebuilt for a backup at the disk's end, the protective MBR fitted to the
//! disk, the image's old backup header cleared, and extra partitions (the cloud-init `CIDATA`
//! seed) beyond the image's end — each change checked field by field ([`GptTable`]).

use std::io::{Cursor, Read, Seek, SeekFrom};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crossbeam_channel::{unbounded, Receiver};
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

/// Bytes the engine holds in memory and publishes once the stream has passed them: the
/// image's first and last MiB during an overlapped read-back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held<'a> {
    /// Where the bytes belong.
    pub offset: u64,
    /// How many there will be.
    pub len: u64,
    /// Set by the stream before any byte at or past `offset + len` is reported written.
    pub data: &'a OnceLock<AlignedBuf>,
}

/// What stands in for the target's content in a range: bytes known now, or held bytes
/// published later.
#[derive(Debug, Clone, Copy)]
enum Region<'a> {
    Now(Overlay<'a>),
    Later(Held<'a>),
}

impl<'a> Region<'a> {
    fn offset(&self) -> u64 {
        match self {
            Region::Now(o) => o.offset,
            Region::Later(h) => h.offset,
        }
    }
    fn len(&self) -> u64 {
        match self {
            Region::Now(o) => o.data.len() as u64,
            Region::Later(h) => h.len,
        }
    }
    /// The bytes, once known.
    fn data(&self) -> Option<&'a [u8]> {
        match self {
            Region::Now(o) => Some(o.data),
            Region::Later(h) => h.data.get().map(AlignedBuf::as_slice),
        }
    }
}

/// How the engine's read-back trails its writer: what it may read, and how it stops the
/// stream when it finds a bad chunk.
///
/// "Read back from the disk" means here: the writer wrote with `O_DIRECT` (the bytes are not
/// in the page cache), the reader flushed the device's write cache over them (`fdatasync`, a
/// FLUSH to the device) and then reads them with `O_DIRECT`. That is what the sequential
/// read-back did too (sync, then read the whole disk). Neither can force a device to answer
/// a read from its media rather than from its own cache; the flush makes what is read back
/// what the device has acknowledged as durable, and a flush error is reported for the range
/// it covered.
#[derive(Debug)]
pub(crate) struct Trail<'a> {
    /// End offsets of the image written so far, in order, sent by the writer after each write
    /// returned; closed when the writer stops (done or failed). The writer publishes held
    /// bytes ([`Held`]) before it reports any offset past them.
    pub written: Receiver<u64>,
    /// Flush and read at least this many bytes at a time (where the image has them): a
    /// device cache flush per buffer would cost more than the overlap saves.
    pub flush_every: u64,
    /// Set when the read-back fails (a bad chunk, a read or flush error): the stream stops.
    pub stop: &'a AtomicBool,
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
    /// Flushing written bytes to the device before reading them back failed.
    #[error("flushing bytes {start}..{end} of {target} to the device before reading them back")]
    Flush {
        /// Target path.
        target: String,
        /// First byte written since the last flush.
        start: u64,
        /// End of what the flush covered.
        end: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The read-back stopped because the write stopped first (the write's error says why).
    #[error("the read-back of {target} stopped at offset {offset}: the write stopped before it")]
    Interrupted {
        /// Target path.
        target: String,
        /// How far the read-back got.
        offset: u64,
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
/// Two threads per core ([`hash_workers`]) each take the next chunk, read it into their own
/// aligned buffer (O_DIRECT where the target allows it) and hash it, so several reads are
/// outstanding, reading overlaps hashing and SHA-256 runs on every core. Memory stays
/// bounded: one buffer per thread, within a fixed budget (see [`thread_count`]). A mismatch
/// or read error names the lowest offset that fails, as a sequential check would: chunks
/// before it are always all checked.
pub fn verify_chunks(
    target: &Target,
    m: &Manifest,
    overlays: &[Overlay<'_>],
    progress: &dyn Progress,
) -> Result<(), VerifyError> {
    let regions: Vec<Region<'_>> = overlays.iter().copied().map(Region::Now).collect();
    verify_chunks_with(target, m, &regions, None, progress, hash_workers(), PIECE)
}

/// The engine's overlapped read-back: [`verify_chunks`] behind a writer ([`Trail`]), with the
/// held regions spliced in as the stream publishes them. Reports progress through `progress`
/// with no `begin`/`end` (the engine shows it as its verify phase once the write ends).
pub(crate) fn verify_trailing(
    target: &Target,
    m: &Manifest,
    held: &[Held<'_>],
    trail: Trail<'_>,
    progress: &dyn Progress,
    workers: usize,
) -> Result<(), VerifyError> {
    let regions: Vec<Region<'_>> = held.iter().copied().map(Region::Later).collect();
    verify_chunks_with(target, m, &regions, Some(trail), progress, workers, PIECE)
}

/// Bytes read per `read_at`: large enough for a deep request on a disk, small enough that a
/// few per core fit the memory budget.
const PIECE: usize = 4 << 20;
/// More hashing threads than this buys nothing on the disks imprint writes (8 cores hash
/// at least 3 GB/s even without SHA extensions) and would cost buffers.
const MAX_WORKERS: usize = 8;
/// The threads' buffers never exceed this many bytes (peak RSS of `imprint verify` stays
/// < 64 MiB).
const POOL_BUDGET: usize = 48 << 20;
/// The buffer budget while the read-back trails the writer, whose own buffers are in use at
/// the same time.
const TRAIL_POOL_BUDGET: usize = 16 << 20;

/// Cores to hash on: one per core the process may use, at most [`MAX_WORKERS`].
pub fn hash_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_WORKERS)
}

/// Reading threads for `workers` cores of `piece`-byte pieces: two per core (while one
/// waits for its read, the other hashes, so the cores stay busy and the device always has
/// reads outstanding), each with one buffer, within `budget` bytes and never fewer than one.
fn thread_count(workers: usize, piece: usize, budget: usize) -> usize {
    (2 * workers).min(budget / piece).max(1)
}

/// Where the read-back stands with a trailing writer: what has been written, and flushed.
struct Follow<'a> {
    trail: Trail<'a>,
    written: u64,
    flushed: u64,
    /// The writer stopped: nothing past `written` will come.
    closed: bool,
}

impl Follow<'_> {
    /// Waits until `[.., need)` is written and flushed. Flushes at least `flush_every` bytes
    /// at a time where the image has them. `Ok(false)`: the writer stopped before `need`.
    fn reach(&mut self, target: &Target, need: u64, raw: u64) -> Result<bool, (u64, VerifyError)> {
        if need <= self.flushed {
            return Ok(true);
        }
        let want = need.max(self.flushed.saturating_add(self.trail.flush_every).min(raw));
        while self.written < want && !self.closed {
            match self.trail.written.recv() {
                Ok(w) => self.written = self.written.max(w),
                Err(_) => self.closed = true,
            }
        }
        // Take whatever else the writer finished meanwhile: one flush covers it too.
        while let Ok(w) = self.trail.written.try_recv() {
            self.written = self.written.max(w);
        }
        if self.written < need {
            return Ok(false);
        }
        let end = self.written;
        target.flush_data().map_err(|source| {
            (
                self.flushed,
                VerifyError::Flush {
                    target: target.path().display().to_string(),
                    start: self.flushed,
                    end,
                    source,
                },
            )
        })?;
        self.flushed = end;
        Ok(true)
    }
}

/// The chunks still to hand out, in order, and the trailing writer they wait for.
struct Claims<'a> {
    next: u64,
    follow: Option<Follow<'a>>,
    /// No chunk is handed out any more (the writer stopped, or a flush failed).
    closed: bool,
}

/// Why a thread stopped before the image's end: a read or flush error at an offset, or the
/// writer stopping first.
#[derive(Default)]
struct Stopped {
    /// The lowest offset of a failed read or flush, and its error.
    error: Option<(u64, VerifyError)>,
    /// The writer stopped before the read-back reached the end.
    interrupted: bool,
}

impl Stopped {
    fn error(&mut self, offset: u64, e: VerifyError) {
        if self.error.as_ref().is_none_or(|(o, _)| offset < *o) {
            self.error = Some((offset, e));
        }
    }
}

/// [`verify_chunks`] with the regions held in memory, the trailing writer (if any), the
/// core count and piece size as parameters (tests vary them).
///
/// Every thread takes the next chunk (in order: behind a writer, once the writer has written
/// and flushed it), reads it piece by piece into its own aligned buffer and hashes it; a
/// digest goes to this thread, which compares it and reports progress as a contiguous
/// prefix. So there are as many reads outstanding as threads, reading overlaps hashing
/// across threads, and no single thread handles every byte.
fn verify_chunks_with(
    target: &Target,
    m: &Manifest,
    regions: &[Region<'_>],
    trail: Option<Trail<'_>>,
    progress: &dyn Progress,
    workers: usize,
    piece: usize,
) -> Result<(), VerifyError> {
    let name = target.path().display().to_string();
    let raw = m.raw_size;
    let chunks = m.chunk_count();
    let start_time = std::time::Instant::now();
    let trailing = trail.is_some();
    if !trailing {
        progress.begin(Phase::Verify, raw);
    }
    let stop = trail.as_ref().map(|t| t.stop);
    let workers = workers.max(1);
    // Pieces never straddle a chunk, and stay a multiple of 4 KiB for O_DIRECT.
    let piece = (piece.min(m.chunk_size as usize) / 4096).max(1) * 4096;
    let budget = if trailing {
        TRAIL_POOL_BUDGET
    } else {
        POOL_BUDGET
    };
    let threads = thread_count(workers, piece, budget).min(chunks.max(1) as usize);

    // The lowest chunk known to differ or to fail to read (u64::MAX: none yet). Only ever
    // lowered, so every chunk below its final value is read and hashed; chunks above it are
    // skipped.
    let fail_at = AtomicU64::new(u64::MAX);
    let claims = Mutex::new(Claims {
        next: 0,
        follow: trail.map(|trail| Follow {
            trail,
            written: 0,
            flushed: 0,
            closed: false,
        }),
        closed: false,
    });
    let stopped = Mutex::new(Stopped::default());
    let (done_tx, done_rx) = unbounded::<(u64, [u8; 32])>();
    // Stops the trailing writer (when there is one).
    let halt = || {
        if let Some(s) = stop {
            s.store(true, Ordering::Relaxed);
        }
    };
    // A thread that panicked leaves its lock usable: what it guarded is plain data.
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    let hash_panicked = AtomicBool::new(false);
    let (mismatch, checked) = std::thread::scope(|s| {
        let fail_at = &fail_at;
        let hash_panicked = &hash_panicked;
        let halt = &halt;
        let claims = &claims;
        let stopped = &stopped;
        let name = &name;
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            s.spawn(move || {
                let run = || {
                    let mut buf = AlignedBuf::new(piece);
                    loop {
                        // Take the next chunk, once it is on the target (and the held bytes
                        // overlapping it are published).
                        let chunk = {
                            let mut c = lock(claims);
                            let chunk = c.next;
                            if c.closed
                                || chunk >= chunks
                                || chunk > fail_at.load(Ordering::Relaxed)
                                || hash_panicked.load(Ordering::Relaxed)
                            {
                                return;
                            }
                            if let Some(f) = c.follow.as_mut() {
                                let (start, end) = m.chunk_range(chunk);
                                let need = regions
                                    .iter()
                                    .filter(|r| r.offset() < end && r.offset() + r.len() > start)
                                    .map(|r| r.offset() + r.len())
                                    .fold(end, u64::max);
                                let reached = f.reach(target, need.min(raw), raw);
                                match reached {
                                    Ok(true) => {}
                                    Ok(false) => {
                                        c.closed = true;
                                        lock(stopped).interrupted = true;
                                        return;
                                    }
                                    Err((offset, e)) => {
                                        c.closed = true;
                                        fail_at.fetch_min(chunk, Ordering::Relaxed);
                                        lock(stopped).error(offset, e);
                                        halt();
                                        return;
                                    }
                                }
                            }
                            c.next += 1;
                            chunk
                        };
                        let (start, end) = m.chunk_range(chunk);
                        let mut h = Sha256::new();
                        // A held region that was not published in time spoils its chunk: no
                        // digest is sent, and the read-back reports itself incomplete.
                        let mut spoiled = false;
                        let mut offset = start;
                        while offset < end {
                            if chunk > fail_at.load(Ordering::Relaxed) {
                                // A lower chunk failed: this one no longer matters.
                                return;
                            }
                            let n = (end - offset).min(piece as u64) as usize;
                            // O_DIRECT needs whole sectors: an image whose size is not a
                            // multiple of 4 KiB ends in a partial read, rounded up as far as
                            // the target reaches.
                            let room = target.size().saturating_sub(offset).max(n as u64);
                            let span = (n.next_multiple_of(4096) as u64).min(room) as usize;
                            if let Err(source) =
                                target.read_at(&mut buf.as_mut_slice()[..span], offset)
                            {
                                fail_at.fetch_min(chunk, Ordering::Relaxed);
                                lock(stopped).error(
                                    offset,
                                    VerifyError::ReadIo {
                                        target: name.clone(),
                                        offset,
                                        source,
                                    },
                                );
                                halt();
                                return;
                            }
                            let data = &mut buf.as_mut_slice()[..n];
                            spoiled |= !splice(data, offset, regions);
                            h.update(&*data);
                            offset += n as u64;
                        }
                        if !spoiled && done_tx.send((chunk, h.finalize().into())).is_err() {
                            return;
                        }
                    }
                };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                    // The others stop taking chunks; the result reports itself incomplete.
                    hash_panicked.store(true, Ordering::Relaxed);
                    halt();
                }
            });
        }
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
                halt();
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
        // The scope joins the threads; a panic was caught inside each.
        (mismatch, checked)
    });
    let hash_panicked = hash_panicked.load(Ordering::Relaxed);
    if hash_panicked {
        halt();
    }
    let Stopped { error, interrupted } = stopped
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);

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
    match (error, mismatch) {
        // Whichever lies first on the disk is what a sequential check would have met.
        (Some((offset, e)), Some((i, actual))) => {
            if m.chunk_range(i).0 < offset {
                return Err(mismatch_err(i, actual));
            }
            return Err(e);
        }
        (Some((_, e)), None) => return Err(e),
        (None, Some((i, actual))) => return Err(mismatch_err(i, actual)),
        // The writer stopped before the read-back reached the end: the write's error says why.
        (None, None) if interrupted => {
            return Err(VerifyError::Interrupted {
                target: name.clone(),
                offset: m.chunk_range(checked.min(chunks.saturating_sub(1))).0,
            })
        }
        (None, None) => {}
    }
    // Defence in depth: never report success for a partial read-back.
    if hash_panicked || checked != chunks {
        halt();
        return Err(read_err(
            m.chunk_range(checked.min(chunks.saturating_sub(1))).0,
            std::io::Error::other(if hash_panicked {
                "a hashing thread panicked; verification is incomplete"
            } else {
                "the read-back ended early; verification is incomplete"
            }),
        ));
    }
    if !trailing {
        progress.end(Phase::Verify, raw, start_time.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Copies the parts of `regions` that fall inside `[offset, offset + data.len())` over `data`.
/// `false` when one of them is not published yet (the chunk cannot be checked).
fn splice(data: &mut [u8], offset: u64, regions: &[Region<'_>]) -> bool {
    let end = offset + data.len() as u64;
    let mut complete = true;
    for r in regions {
        let r_end = r.offset() + r.len();
        if r.offset() < end && r_end > offset {
            let Some(src) = r.data().filter(|d| d.len() as u64 == r.len()) else {
                complete = false;
                continue;
            };
            let s0 = r.offset().max(offset);
            let e0 = r_end.min(end);
            data[(s0 - offset) as usize..(e0 - offset) as usize]
                .copy_from_slice(&src[(s0 - r.offset()) as usize..(e0 - r.offset()) as usize]);
        }
    }
    complete
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

    /// [`verify_chunks_with`] without a trailing writer, with these overlays.
    fn check(
        t: &Target,
        m: &Manifest,
        overlays: &[Overlay<'_>],
        progress: &dyn Progress,
        workers: usize,
        piece: usize,
    ) -> Result<(), VerifyError> {
        let regions: Vec<Region<'_>> = overlays.iter().copied().map(Region::Now).collect();
        verify_chunks_with(t, m, &regions, None, progress, workers, piece)
    }

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
                check(&t, &m, &[], &seen, workers, piece).unwrap();
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
                    let e = check(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
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
                let e = check(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
                assert!(
                    matches!(e, VerifyError::Mismatch { chunk: 1, .. }),
                    "{workers} {piece}: {e}"
                );
            }
        }
    }

    /// The last chunk is three sectors long: read at the same time as chunk 4, it is hashed
    /// long before it. Neither the digest that arrives first nor its progress may win.
    #[test]
    fn a_shorter_later_chunk_finishing_first_neither_hides_a_lower_mismatch_nor_jumps_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, m) = image(dir.path(), 512);
        let t = disk(dir.path(), &raw, 512);
        for _ in 0..10 {
            let seen = Seen::default();
            check(&t, &m, &[], &seen, 4, 4096).unwrap();
            let seen = seen.0.into_inner().unwrap();
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
            assert_eq!(seen.last(), Some(&m.raw_size), "{seen:?}");
        }
        let mut bad = raw.clone();
        bad[(4 << 20) + 5] ^= 1;
        let n = bad.len();
        bad[n - 1] ^= 1;
        let t = disk(dir.path(), &bad, 512);
        for _ in 0..10 {
            let seen = Seen::default();
            let e = check(&t, &m, &[], &seen, 4, 4096).unwrap_err();
            assert!(matches!(e, VerifyError::Mismatch { chunk: 4, .. }), "{e}");
            // Chunks 0..4 verified: progress stops at the first bad chunk's start.
            assert_eq!(seen.0.into_inner().unwrap().last(), Some(&(4 << 20)));
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
                check(&t, &m, &overlays, &NoProgress, workers, piece).unwrap();
                // Without them, the disk's own bytes are compared: chunk 0 differs.
                let e = check(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
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
                    let e = check(&t, &m, &overlays, &NoProgress, workers, piece).unwrap_err();
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
            let e = check(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
            assert!(
                matches!(e, VerifyError::ReadIo { offset, .. } if offset == 3 << 20),
                "{e}"
            );
        }
        // A mismatch before the read error is what a sequential check meets first.
        let mut bad = raw[..3 << 20].to_vec();
        bad[(1 << 20) + 9] ^= 1;
        let t = disk(dir.path(), &bad, 512);
        for (workers, piece) in SHAPES {
            let e = check(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
            assert!(matches!(e, VerifyError::Mismatch { chunk: 1, .. }), "{e}");
        }
        // The target ends inside chunk 3: chunks 3, 4 and 5 all fail to read, at the same
        // time, and the last one (three sectors past the end) fails first. The lowest offset
        // is named.
        let cut = (3 << 20) + (1 << 19);
        let t = disk(dir.path(), &raw[..cut], 512);
        for _ in 0..10 {
            for (workers, piece) in SHAPES {
                let e = check(&t, &m, &[], &NoProgress, workers, piece).unwrap_err();
                let VerifyError::ReadIo { offset, .. } = e else {
                    panic!("{workers} {piece}: {e}");
                };
                // The failing read is the piece holding the cut.
                let p = (piece.min(1 << 20) / 4096).max(1) * 4096;
                assert_eq!(
                    offset,
                    (3 << 20) + ((1 << 19) / p * p) as u64,
                    "{workers} {piece}"
                );
            }
        }
    }

    #[test]
    fn the_buffer_pool_stays_within_its_budget() {
        for budget in [POOL_BUDGET, TRAIL_POOL_BUDGET] {
            for w in 1..=MAX_WORKERS {
                let n = thread_count(w, PIECE, budget);
                assert!(n >= w.min(2) && n * PIECE <= budget, "{w}: {n}");
            }
        }
        assert!((1..=MAX_WORKERS).contains(&hash_workers()));
    }
}
