//! The verified write engine: puts an imprint image onto a target so that what is on the target
//! is provably the image, and so that nothing half-written can ever boot.
//!
//! An install is one transaction; the order of operations is the safety argument
//! (docs/write-engine.md draws the state machine):
//!
//! 1. **Plan** ([`plan`]): size, sector size and alignment are checked, and the image's own
//!    GPT is decoded from its first MiB, checked ([`GptTable`]) and laid out for the target —
//!    all before a single byte is written. The caller adds what the install brings besides the
//!    image ([`Addition`]: the cloud-init seed partition), checked against the plan too. The
//!    plan keeps the image's stream, so the write decodes on from there (one open, one decode).
//! 2. **Wipe**: the target's first and last MiB are zeroed and synced. From here on the target
//!    carries no partition table: not the old one (a half-overwritten old OS cannot boot), not a
//!    new one.
//! 3. **Stream**: the payload is decoded into aligned buffers (starting while the wipe runs) —
//!    a version 2 image's 4 MiB frames on one thread per core, each straight into its buffer
//!    and handed on in order, a version 1 image's one stream on one thread —, the calling
//!    thread routes them, a writer thread writes them with `O_DIRECT`.
//!    The image's first and last MiB — which hold the primary and backup GPT — are *held back
//!    in memory*. Runs of zeros are written with `BLKZEROOUT`. The stream must end exactly at
//!    `raw_size`, cleanly.
//! 4. **Verify**, alongside the stream: a reader follows the writer, flushes what it wrote,
//!    reads it back bypassing the page cache and compares it chunk by chunk with the
//!    manifest's digests (the held regions are spliced in from memory as the stream publishes
//!    them; see [`verify`]'s `Trail` for what "read back" means). A bad chunk stops the stream;
//!    of several failures the lowest offset is reported.
//! 5. **Final table, in memory**: the image's entries plus the additions' entries, the backup
//!    header at the disk's last sector, the protective MBR fitted to the disk; the image's own
//!    backup header is cleared from the held last MiB, which is then written and read back.
//! 6. **Additions and the caller's work**: the seed partition's content is written and read
//!    back; the caller's [`BeforeCommit`] work (the seed into the root filesystem) runs on the
//!    disk as it will be. Nothing refers to either yet.
//! 7. **Commit**: the backup entry array and header at the disk's end, then the primary region
//!    (protective MBR, header, entries and the rest of the first MiB), each synced and read
//!    back. A failure here zeroes both ends again (rollback). Then the kernel re-reads the
//!    table.
//!
//! Any failure in 1 leaves the target untouched; in 2–7 it leaves a target with no valid
//! partition table at either end ([`WriteError::disk_state`]), and the error names the step,
//! offset and chunk.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::blockdev::{AlignedBuf, Target, TargetError, TargetKind};
use crate::gpt_table::{GptTable, GptTableError};
use crate::manifest::{hex, read_full, Image, ImageError, Manifest, PartitionTable};
use crate::progress::{human_bytes, Phase, Progress};
use crate::verify::{self, Held, Trail, VerifyError};

/// Bytes held back in memory at each end of the image (covers a GPT's header and entry array
/// at 512- and 4096-byte sectors).
pub const HOLD: u64 = 1 << 20;
/// Size of one I/O buffer.
const BUF: usize = 4 << 20;
/// Buffers in flight between decoder, router and writer (bounds memory use: 16 MiB; the
/// read-back's pool runs beside them, so the two together stay well under 64 MiB).
const NBUF: usize = 4;
/// Buffers in flight at most without read-back: the written buffers wait for the chunk
/// hashers too, and two hashers working at once need about a chunk of buffers between them
/// (32 MiB; no read-back pool runs beside them, so peak RSS stays near the verified write's).
const NBUF_HASHED: usize = 8;
/// The read-back flushes and reads at least this much of what the writer wrote at a time:
/// about 16 device cache flushes per GiB, and at most this much left to read back when the
/// write ends.
const TRAIL_FLUSH: u64 = 64 << 20;

/// The engine's internal knobs (tests change them).
#[derive(Debug, Clone, Copy)]
struct Tuning {
    /// The read-back flushes and reads at least this much at a time ([`TRAIL_FLUSH`]).
    trail_flush: u64,
    /// Threads hashing the written chunks without read-back ([`verify::hash_workers`]).
    hashers: usize,
    /// Threads decoding a version 2 payload's frames ([`verify::hash_workers`]).
    decoders: usize,
}

impl Tuning {
    fn new() -> Tuning {
        Tuning {
            trail_flush: TRAIL_FLUSH,
            hashers: verify::hash_workers(),
            decoders: verify::hash_workers(),
        }
    }
}

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
    /// Where [`WriteReport::first_byte_seconds`] counts from (the start of `imprint`'s `main`,
    /// PID 1's); the plan's start when `None`.
    pub started: Option<Instant>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            verify: true,
            zeroout: true,
            precheck_payload: false,
            started: None,
        }
    }
}

/// What a successful write did, with timings (goes into reports).
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Seconds from the first payload byte written back to [`WriteOptions::started`] (or the
    /// plan's start): everything before the disk starts receiving the image.
    pub first_byte_seconds: f64,
    /// Seconds spent wiping the ends, decoding and writing (the read-back runs alongside).
    pub write_seconds: f64,
    /// Seconds the read-back took after the write ended: what the overlap did not hide (0 when
    /// not verified).
    pub verify_seconds: f64,
    /// Seconds spent committing the held regions and fixing up the GPT.
    pub commit_seconds: f64,
    /// Bytes made zero with `BLKZEROOUT` / hole punching instead of written.
    pub zeroed_bytes: u64,
    /// Whether the whole target was read back and matched.
    pub verified: bool,
    /// The partition table the commit wrote (GPT images).
    pub partition_table: Option<TableSummary>,
    /// Whether the kernel re-read the partition table.
    pub partitions_reread: bool,
}

/// The partition table the commit wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSummary {
    /// Where the image had its backup header (cleared there when it is not the disk's end).
    pub image_backup_lba: u64,
    /// Where the backup header is now: the disk's last sector.
    pub backup_lba: u64,
    /// The last usable sector now.
    pub last_usable_lba: u64,
    /// The protective MBR's size field, fitted to the disk.
    pub protective_mbr_sectors: u32,
    /// Partitions the install added (number, name): the seed.
    pub added: Vec<(u32, String)>,
}

/// What a failed write left on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Refused before the first write: the target is as it was.
    Untouched,
    /// The target was wiped and has no partition table at either end: it will not boot.
    NoPartitionTable,
    /// A failed commit could not be rolled back: the target may hold a partial table.
    Unknown,
}

impl DiskState {
    /// One sentence for the user.
    pub fn describe(self) -> &'static str {
        match self {
            DiskState::Untouched => "nothing was written: the disk is as it was",
            DiskState::NoPartitionTable => {
                "the disk has no partition table at either end: it will not boot a half-written image; a rerun starts clean"
            }
            DiskState::Unknown => {
                "the final partition table write failed and could not be undone: the disk may hold part of a table; rerun the install"
            }
        }
    }
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
    /// The image's own partition table is broken or does not fit the target.
    #[error("the image's partition table: {source}")]
    ImageTable {
        /// What is wrong.
        #[source]
        source: GptTableError,
    },
    /// Something the install adds (the seed partition) does not fit.
    #[error("{what} does not fit the disk: {reason}")]
    BadAddition {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
    /// Writing or reading back an addition (the seed partition) failed.
    #[error("{what}")]
    Addition {
        /// What.
        what: String,
        /// The failure.
        source: Box<WriteError>,
    },
    /// The caller's work before the commit failed.
    #[error("before the commit")]
    BeforeCommit {
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writing the final partition table failed; both headers were zeroed again when
    /// `rolled_back`.
    #[error("committing the partition table failed ({})", if *.rolled_back { "rolled back: no partition table" } else { "could not roll back" })]
    Commit {
        /// The failure.
        #[source]
        source: Box<WriteError>,
        /// Whether both header regions were zeroed again.
        rolled_back: bool,
    },
}

impl WriteError {
    /// What the failure left on the target.
    pub fn disk_state(&self) -> DiskState {
        match self {
            WriteError::Image(_)
            | WriteError::TooSmall { .. }
            | WriteError::SectorMismatch { .. }
            | WriteError::Unaligned { .. }
            | WriteError::ImageTable { .. }
            | WriteError::BadAddition { .. } => DiskState::Untouched,
            WriteError::Commit {
                rolled_back: false, ..
            } => DiskState::Unknown,
            _ => DiskState::NoPartitionTable,
        }
    }

    /// Whether the error is the image's fault (as opposed to the target's).
    pub fn is_image_fault(&self) -> bool {
        matches!(
            self,
            WriteError::Image(_)
                | WriteError::Decode { .. }
                | WriteError::ShortStream { .. }
                | WriteError::LongStream { .. }
                | WriteError::ChunkMismatch { .. }
                | WriteError::ImageTable { .. }
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

/// What the install adds to the disk besides the image: a partition (the cloud-init seed)
/// whose content is written and read back *before* the commit, and whose entry goes into the
/// one partition table the commit writes.
#[derive(Debug, Clone)]
pub struct Addition {
    /// What it is, for errors and reports ("the CIDATA seed partition").
    pub what: String,
    /// GPT entry number (1-based) it takes.
    pub number: u32,
    /// The entry.
    pub entry: gpt::partition::Partition,
    /// The partition's whole content (its length is the partition's).
    pub content: Vec<u8>,
}

/// Work the caller does on the disk after the image (and additions) were written and read
/// back, before the commit: the seed into the image's root filesystem. It must check what it
/// wrote; the image's first MiB is not on the disk yet, everything else is.
pub type BeforeCommit<'a> =
    dyn FnMut(&Target) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + 'a;

/// Everything checked about an image and a target before a byte is written: sizes, sector
/// sizes, and the image's own partition table, read from the image's first MiB and laid out
/// for the target (so a broken or lying table is refused with the target untouched).
///
/// The plan keeps the image's stream it decoded that first MiB from, and [`write_planned`]
/// goes on from there: the image is opened and decoded once (for a URL, one connection).
pub struct Plan {
    table: Option<GptTable>,
    lba0: Vec<u8>,
    target_size: u64,
    /// When the plan was made: where [`WriteReport::first_byte_seconds`] counts from unless
    /// the caller says otherwise.
    started: Instant,
    /// The decoded first MiB and the decoder positioned after it, for the first
    /// [`write_planned`] of this image; taken then.
    stream: Mutex<Option<PlannedStream>>,
}

/// The image's stream as the plan left it.
struct PlannedStream {
    /// sha256 of the raw image it belongs to.
    image: String,
    input: Input,
}

/// What the stream stage reads the raw image from.
enum Input {
    /// The decoded image from byte 0: a version 1 payload (one zstd stream) or a raw file.
    Decoded(Box<dyn Read + Send>),
    /// The compressed payload from its first byte: a version 2 payload, whose frames are
    /// decoded on several threads, each straight into the buffer that is written.
    Frames(Box<dyn Read + Send>),
}

impl Input {
    /// The image's input from its start, opened afresh.
    fn open(image: &Image) -> Result<Input, ImageError> {
        Ok(if image.manifest().frame_table().is_some() {
            Input::Frames(image.payload()?)
        } else {
            Input::Decoded(image.raw_reader()?)
        })
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("table", &self.table)
            .field("target_size", &self.target_size)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// The image's partition table (GPT images only), as it will be laid out on the target
    /// before additions.
    pub fn table(&self) -> Option<&GptTable> {
        self.table.as_ref()
    }

    /// The target's size in bytes.
    pub fn target_size(&self) -> u64 {
        self.target_size
    }

    /// The image's input from its start, continuing where the plan stopped reading; `None`
    /// when it was taken already or belongs to another image.
    fn take_stream(&self, image: &Image) -> Option<Input> {
        let mut slot = self.stream.lock().ok()?;
        let s = slot.take()?;
        if s.image != image.manifest().sha256 {
            return None;
        }
        Some(s.input)
    }
}

/// Checks `image` against `target` and reads the image's partition table. Writes nothing.
pub fn plan(image: &Image, target: &Target) -> Result<Plan, WriteError> {
    let started = Instant::now();
    let m = image.manifest();
    preflight(m, target)?;
    let lss = target.logical_sector_size();
    let mut lba0 = vec![0u8; (lss as u64).min(m.raw_size) as usize];
    // The first MiB is decoded for every image: its GPT is checked here, and an image that
    // cannot be read fails now, with the target untouched. The stream goes on in the write.
    let head_len = m.raw_size.min(HOLD) as usize;
    let (head, input) = read_head(image, head_len)?;
    let n = lba0.len();
    lba0.copy_from_slice(&head[..n]);
    let table = if m.partition_table == PartitionTable::Gpt {
        let table = GptTable::read(&mut std::io::Cursor::new(&head), lss)
            .map_err(|source| WriteError::ImageTable { source })?;
        // The primary region must lie in the held first MiB, and the table must fit the
        // target as it will be laid out.
        let h = table.header();
        if h.part_start * u64::from(lss) + table.array_len() > head_len as u64 {
            return Err(WriteError::ImageTable {
                source: GptTableError::Layout(format!(
                    "the entry array at sector {} reaches past the image's first MiB",
                    h.part_start
                )),
            });
        }
        if h.backup_lba * u64::from(lss) >= m.raw_size {
            return Err(WriteError::ImageTable {
                source: GptTableError::Layout(format!(
                    "its backup header at sector {} lies past the image's end",
                    h.backup_lba
                )),
            });
        }
        table
            .lay_out(target.size(), &lba0)
            .map_err(|source| WriteError::ImageTable { source })?;
        Some(table)
    } else {
        None
    };
    Ok(Plan {
        table,
        lba0,
        target_size: target.size(),
        started,
        stream: Mutex::new(Some(PlannedStream {
            image: m.sha256.clone(),
            input,
        })),
    })
}

/// Decodes the image's first `head_len` bytes, and returns them with the image's input
/// positioned to give the whole image again from byte 0: the decoded stream continuing after
/// them (version 1), or the compressed payload with the first frame, which holds them, put
/// back in front (version 2: the stream stage decodes that frame again, a few milliseconds).
fn read_head(image: &Image, head_len: usize) -> Result<(Vec<u8>, Input), WriteError> {
    let m = image.manifest();
    let mut head = vec![0u8; head_len];
    let decode_err = |source| decode_error(m, 0, source);
    match Input::open(image)? {
        Input::Decoded(mut dec) => {
            let n = read_full(&mut dec, &mut head).map_err(decode_err)?;
            if n < head_len {
                return Err(WriteError::ShortStream {
                    got: n as u64,
                    expected: m.raw_size,
                });
            }
            let again = std::io::Cursor::new(head.clone()).chain(dec);
            Ok((head, Input::Decoded(Box::new(again))))
        }
        Input::Frames(mut payload) => {
            // Frames are at least 1 MiB (or the whole image): the first holds the head.
            let (clen, (start, end)) = m
                .frame_table()
                .and_then(|mut t| t.next())
                .ok_or_else(|| decode_err(std::io::Error::other("the frame table is empty")))?;
            let mut frame = Vec::new();
            read_frame(&mut payload, m, (clen, start), &mut frame)?;
            let mut raw = vec![0u8; (end - start) as usize];
            let mut d = zstd::bulk::Decompressor::new().map_err(decode_err)?;
            decode_frame(&mut d, &frame, &mut raw, 0).map_err(decode_err)?;
            head.copy_from_slice(&raw[..head_len]);
            let again = std::io::Cursor::new(frame).chain(payload);
            Ok((head, Input::Frames(Box::new(again))))
        }
    }
}

/// The image could not be decoded at raw byte `offset`.
fn decode_error(m: &Manifest, offset: u64, source: std::io::Error) -> WriteError {
    WriteError::Decode {
        offset,
        chunk: offset / m.chunk_size,
        source,
    }
}

/// Checks that `input` is at its end after `offset` raw bytes (reading the end is also what
/// checks a whole file's `--sha256`).
fn expect_end(input: &mut dyn Read, m: &Manifest, offset: u64) -> Result<(), WriteError> {
    let mut probe = [0u8; 1];
    let more = read_full(input, &mut probe).map_err(|e| decode_error(m, offset, e))?;
    if more != 0 {
        return Err(WriteError::LongStream {
            expected: m.raw_size,
        });
    }
    Ok(())
}

/// Reads the `clen` compressed bytes of the frame whose raw part starts at `start` into the
/// front of `into` (grown if need be, never shrunk: a reused buffer is not cleared each time).
fn read_frame(
    payload: &mut dyn Read,
    m: &Manifest,
    (clen, start): (u64, u64),
    into: &mut Vec<u8>,
) -> Result<(), WriteError> {
    let clen = clen as usize;
    if into.len() < clen {
        into.resize(clen, 0);
    }
    let n = read_full(payload, &mut into[..clen]).map_err(|e| decode_error(m, start, e))?;
    if n < clen {
        let cut = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the payload ends {n} bytes into a frame of {clen}: truncated or cut off"),
        );
        return Err(decode_error(m, start, cut));
    }
    Ok(())
}

/// Decodes one frame, `src`, straight into `dst`, which it must fill exactly. `src` must be one
/// zstd frame: a table that lies about where frames end is refused here, and zstd checks the
/// frame's content checksum.
fn decode_frame(
    d: &mut zstd::bulk::Decompressor<'_>,
    src: &[u8],
    dst: &mut [u8],
    k: usize,
) -> std::io::Result<()> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    match zstd::zstd_safe::find_frame_compressed_size(src) {
        Ok(n) if n == src.len() => {}
        Ok(n) => {
            return Err(bad(format!(
                "frame {k} of the payload is {n} bytes of zstd, the frame table says {}",
                src.len()
            )))
        }
        Err(code) => {
            return Err(bad(format!(
                "frame {k} of the payload is not a zstd frame ({})",
                zstd::zstd_safe::get_error_name(code)
            )))
        }
    }
    let n = d
        .decompress_to_buffer(src, dst)
        .map_err(|e| bad(format!("frame {k} of the payload: {e}")))?;
    if n != dst.len() {
        return Err(bad(format!(
            "frame {k} of the payload decodes to {n} bytes, the frame table says {}",
            dst.len()
        )));
    }
    Ok(())
}

/// Writes `image` onto `target` with the guarantees described in the module documentation,
/// with nothing added.
pub fn write_image(
    image: &Image,
    target: &Target,
    opts: &WriteOptions,
    progress: &dyn Progress,
) -> Result<WriteReport, WriteError> {
    let plan = plan(image, target)?;
    write_planned(image, target, &plan, &[], None, opts, progress)
}

/// Checks that `additions` fit the plan: GPT image, sector-aligned, inside the usable area
/// of the laid-out table, clear of the image's held first and last MiB, content of the
/// partition's size, free or CIDATA-reusable slots.
fn check_additions(
    plan: &Plan,
    additions: &[Addition],
    raw: u64,
    ss: u64,
) -> Result<(), WriteError> {
    if additions.is_empty() {
        return Ok(());
    }
    let bad = |a: &Addition, reason: String| WriteError::BadAddition {
        what: a.what.clone(),
        reason,
    };
    let Some(table) = plan.table.as_ref() else {
        let a = &additions[0];
        return Err(bad(
            a,
            "the image has no GPT to add a partition to (an MBR or unpartitioned image)".into(),
        ));
    };
    let last_usable = table
        .last_usable_on(plan.target_size)
        .map_err(|source| WriteError::ImageTable { source })?;
    let tail_start = raw.saturating_sub(HOLD).max(raw.min(HOLD));
    for a in additions {
        let e = &a.entry;
        if e.first_lba > e.last_lba
            || e.first_lba < table.header().first_usable
            || e.last_lba > last_usable
        {
            return Err(bad(
                a,
                format!(
                    "sectors {}..={} lie outside the usable area {}..={last_usable}",
                    e.first_lba,
                    e.last_lba,
                    table.header().first_usable
                ),
            ));
        }
        let (start, end) = (e.first_lba * ss, (e.last_lba + 1) * ss);
        if a.content.len() as u64 != end - start {
            return Err(bad(
                a,
                format!(
                    "{} bytes of content for a {}-byte partition",
                    a.content.len(),
                    end - start
                ),
            ));
        }
        if start < HOLD || (start < raw && end > tail_start) {
            return Err(bad(
                a,
                "it overlaps the image's first or last MiB (its partition table regions)".into(),
            ));
        }
    }
    Ok(())
}

/// Writes `image` onto `target` as one transaction (module documentation), laying down
/// `additions` before the single commit of the final partition table.
pub fn write_planned(
    image: &Image,
    target: &Target,
    plan: &Plan,
    additions: &[Addition],
    before_commit: Option<&mut BeforeCommit<'_>>,
    opts: &WriteOptions,
    progress: &dyn Progress,
) -> Result<WriteReport, WriteError> {
    write_transaction(
        image,
        target,
        plan,
        additions,
        before_commit,
        opts,
        progress,
        Tuning::new(),
    )
}

/// [`write_planned`] with the engine's knobs as a parameter (tests change them).
#[allow(clippy::too_many_arguments)]
fn write_transaction(
    image: &Image,
    target: &Target,
    plan: &Plan,
    additions: &[Addition],
    before_commit: Option<&mut BeforeCommit<'_>>,
    opts: &WriteOptions,
    progress: &dyn Progress,
    tune: Tuning,
) -> Result<WriteReport, WriteError> {
    let m = image.manifest();
    preflight(m, target)?;
    let size = target.size();
    let ss = u64::from(target.logical_sector_size());
    if size != plan.target_size {
        return Err(WriteError::BadAddition {
            what: "the plan".into(),
            reason: format!(
                "it was made for a {}-byte target, this one has {size} bytes",
                plan.target_size
            ),
        });
    }
    check_additions(plan, additions, m.raw_size, ss)?;
    let mut report = WriteReport {
        image_name: m.name.clone(),
        image_sha256: m.sha256.clone(),
        raw_size: m.raw_size,
        target: target.path().display().to_string(),
        target_kind: target.kind(),
        target_size: target.size(),
        precheck_seconds: 0.0,
        first_byte_seconds: 0.0,
        write_seconds: 0.0,
        verify_seconds: 0.0,
        commit_seconds: 0.0,
        zeroed_bytes: 0,
        verified: false,
        partition_table: None,
        partitions_reread: false,
    };

    if opts.precheck_payload {
        let t = Instant::now();
        progress.begin(Phase::Precheck, m.compressed_size);
        image.check_payload_digest()?;
        report.precheck_seconds = t.elapsed().as_secs_f64();
        progress.end(Phase::Precheck, m.compressed_size, report.precheck_seconds);
    }
    // The plan's stream (its first MiB decoded already), or a new one when the plan's was
    // used; opened before the wipe: an image that cannot be read fails with the target
    // untouched.
    let decoder = match plan.take_stream(image) {
        Some(d) => d,
        None => Input::open(image)?,
    };

    // --- Wipe, stream and (alongside) read-back: from the wipe on, the target has no
    // partition table until the commit.
    let raw = m.raw_size;
    let tail_start = raw.saturating_sub(HOLD).max(raw.min(HOLD));
    let out =
        stream(image, decoder, target, opts, progress, tail_start, tune).map_err(|e| match e {
            WriteError::Verify(v @ VerifyError::Mismatch { .. }) => attribute_mismatch(image, v),
            e => e,
        })?;
    let (mut head, mut tail) = (out.head, out.tail);
    let head_end = head.len() as u64;
    report.zeroed_bytes = out.zeroed;
    report.write_seconds = out.write_seconds;
    report.verify_seconds = out.verify_seconds;
    report.verified = opts.verify;
    let started = opts.started.unwrap_or(plan.started);
    report.first_byte_seconds = out
        .first_byte
        .map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64());

    let t = Instant::now();
    let added: u64 = additions.iter().map(|a| a.content.len() as u64).sum();
    let table_bytes = plan
        .table
        .as_ref()
        .map_or(0, |t| 2 * (t.array_len() + ss) + ss);
    progress.begin(
        Phase::Commit,
        added + head_end + (raw - tail_start) + table_bytes,
    );
    let mut done = 0u64;

    // --- The final table, in memory: the image's entries plus the additions, the backup at
    // the disk's end, the protective MBR fitted, the image's own backup header cleared.
    let mut summary = None;
    let mut backup = None;
    if let Some(table) = plan.table.as_ref() {
        let mut t = table.clone();
        for a in additions {
            t.set_entry(a.number, &a.entry)
                .map_err(|source| WriteError::ImageTable { source })?;
        }
        let layout = t
            .lay_out(size, &plan.lba0)
            .map_err(|source| WriteError::ImageTable { source })?;
        let n = layout.primary_region.len();
        head.as_mut_slice()[..n].copy_from_slice(&layout.primary_region);
        let old = table.header().backup_lba * ss;
        if old >= tail_start && old + ss <= raw {
            let at = (old - tail_start) as usize;
            tail.as_mut_slice()[at..at + ss as usize].fill(0);
        }
        summary = Some(TableSummary {
            image_backup_lba: table.header().backup_lba,
            backup_lba: layout.primary.backup_lba,
            last_usable_lba: layout.primary.last_usable,
            protective_mbr_sectors: u32::try_from(size / ss - 1).unwrap_or(u32::MAX),
            added: additions
                .iter()
                .map(|a| (a.number, a.entry.name.clone()))
                .collect(),
        });
        backup = Some((layout.backup_offset, layout.backup_region));
    }

    // The image's last MiB: image data only now (its backup header cleared above).
    put_verified(target, &report.target, tail_start, tail.as_slice())?;
    done += tail.len() as u64;
    progress.advance(done);

    // --- Additions (the seed partition): written and read back; nothing refers to them yet.
    for a in additions {
        let offset = a.entry.first_lba * ss;
        put_verified(target, &report.target, offset, &a.content).map_err(|source| {
            WriteError::Addition {
                what: a.what.clone(),
                source: Box::new(source),
            }
        })?;
        done += a.content.len() as u64;
        progress.advance(done);
    }
    // --- The caller's work on the disk as it will be (the seed in the root filesystem).
    if let Some(work) = before_commit {
        work(target).map_err(|source| WriteError::BeforeCommit { source })?;
        target.sync()?;
    }

    // --- Commit: the backup table at the disk's end, then the primary region. Everything
    // they describe is on the disk and read back. A failure here rolls both headers back.
    let commit = (|| -> Result<(), WriteError> {
        if let Some((offset, region)) = &backup {
            put_verified(target, &report.target, *offset, region)?;
        }
        put_verified(target, &report.target, 0, head.as_slice())
    })();
    if let Err(e) = commit {
        let rolled_back = rollback(target, size, ss).is_ok();
        return Err(WriteError::Commit {
            source: Box::new(e),
            rolled_back,
        });
    }
    progress.advance(done + head_end + table_bytes);
    report.partition_table = summary;
    // After the commit only the kernel's re-read remains; it cannot undo the install.
    report.partitions_reread = target.reread_partitions().unwrap_or(false);
    report.commit_seconds = t.elapsed().as_secs_f64();
    progress.end(
        Phase::Commit,
        added + head_end + (raw - tail_start) + table_bytes,
        report.commit_seconds,
    );
    Ok(report)
}

/// Writes `data` at `offset` (direct I/O through an aligned copy), syncs, and reads it back
/// bypassing the cache.
fn put_verified(target: &Target, name: &str, offset: u64, data: &[u8]) -> Result<(), WriteError> {
    if data.is_empty() {
        return Ok(());
    }
    for (i, piece) in data.chunks(BUF).enumerate() {
        let at = offset + (i * BUF) as u64;
        let mut buf = AlignedBuf::new(piece.len());
        buf.as_mut_slice().copy_from_slice(piece);
        target
            .write_at(buf.as_slice(), at)
            .map_err(|source| WriteError::WriteIo {
                target: name.to_string(),
                offset: at,
                len: piece.len() as u64,
                source,
            })?;
    }
    target.sync()?;
    target.drop_caches()?;
    for (i, piece) in data.chunks(BUF).enumerate() {
        let at = offset + (i * BUF) as u64;
        let mut back = AlignedBuf::new(piece.len());
        target.read_at(back.as_mut_slice(), at).map_err(|source| {
            WriteError::Verify(VerifyError::ReadIo {
                target: name.to_string(),
                offset: at,
                source,
            })
        })?;
        if back.as_slice() != piece {
            return Err(WriteError::CommitMismatch {
                target: name.to_string(),
                offset: at,
            });
        }
    }
    Ok(())
}

/// After a failed commit: zero both header regions again, so the disk is left without a
/// partition table rather than with half of one.
fn rollback(target: &Target, size: u64, ss: u64) -> Result<(), WriteError> {
    let wipe = HOLD.min(size);
    let e = |source| WriteError::WriteIo {
        target: target.path().display().to_string(),
        offset: 0,
        len: ss,
        source,
    };
    target.zero_range(0, wipe).map_err(e)?;
    target.zero_range(size - wipe, wipe).map_err(e)?;
    target.sync()?;
    Ok(())
}

/// What the stream did.
struct Streamed {
    /// Bytes zeroed instead of written.
    zeroed: u64,
    /// The image's first MiB, held back.
    head: AlignedBuf,
    /// The image's last MiB (from `tail_start`), held back.
    tail: AlignedBuf,
    /// When the first payload byte went to the target.
    first_byte: Option<Instant>,
    /// Wipe, decode and write.
    write_seconds: f64,
    /// The read-back after the write ended.
    verify_seconds: f64,
}

/// The read-back's progress while it trails the writer, kept back until the write phase ends
/// (renderers show one phase at a time), then passed on as the verify phase.
struct Trailing<'a> {
    inner: &'a dyn Progress,
    /// (passing on, verified prefix so far)
    state: Mutex<(bool, u64)>,
}

impl Trailing<'_> {
    /// The write phase ended: show the verify phase from where it is.
    fn go_live(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = true;
            if st.1 > 0 {
                self.inner.advance(st.1);
            }
        }
    }
}

impl Progress for Trailing<'_> {
    fn begin(&self, _: Phase, _: u64) {}
    fn advance(&self, done: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.1 = done;
            if st.0 {
                self.inner.advance(done);
            }
        }
    }
    fn end(&self, _: Phase, _: u64, _: f64) {}
}

/// The offset an error of the stream or its read-back is about: when several stages fail,
/// the lowest is reported, as a sequential write-then-verify would have met it.
fn failed_at(e: &WriteError, raw: u64) -> u64 {
    match e {
        WriteError::Decode { offset, .. } | WriteError::WriteIo { offset, .. } => *offset,
        WriteError::ShortStream { got, .. } => *got,
        WriteError::LongStream { .. } => raw,
        WriteError::ChunkMismatch { start, .. } => *start,
        WriteError::Verify(v) => match v {
            VerifyError::Mismatch { start, .. } => *start,
            VerifyError::ReadIo { offset, .. } | VerifyError::Interrupted { offset, .. } => *offset,
            VerifyError::Flush { start, .. } => *start,
            _ => 0,
        },
        _ => 0,
    }
}

/// Wipes the target's ends, then decodes and writes everything but the held regions (the
/// image's first MiB and its last, from `tail_start`), which it returns. With verification
/// the read-back runs alongside, `tune.trail_flush` bytes behind the writer at most, and a
/// bad chunk stops the write; without, every decoded chunk is hashed on `tune.hashers`
/// threads once it is written, and a bad one stops the write the same way.
///
/// Threads: the decoder fills buffers; this thread routes them (held bytes copied out and
/// published); the writer wipes, then writes with `O_DIRECT` and reports each end offset it
/// reached to the read-back; the read-back ([`verify::verify_trailing`]) flushes what was
/// written, reads it with `O_DIRECT` and hashes it on every core. Without read-back the
/// writer hands each written buffer to the chunk hashers instead ([`HashPool`]). The decoder
/// starts while the writer wipes, so the first payload byte follows the wipe's flush without
/// waiting for a decode.
fn stream(
    image: &Image,
    decoder: Input,
    target: &Target,
    opts: &WriteOptions,
    progress: &dyn Progress,
    tail_start: u64,
    tune: Tuning,
) -> Result<Streamed, WriteError> {
    let m = image.manifest();
    let raw = m.raw_size;
    let size = target.size();
    let head_end = raw.min(HOLD);
    let target_name = target.path().display().to_string();
    let started = Instant::now();

    let hash = !opts.verify;
    let hashers = if hash { tune.hashers.max(1) } else { 0 };
    // Frames decoding on several threads hold a buffer each, with the router and the writer
    // holding one more each.
    let decoding = match decoder {
        Input::Frames(_) => tune.decoders.max(1),
        Input::Decoded(_) => 0,
    };
    let nbuf = buffer_count(hashers, m.chunk_size).max(decoding + 2);
    let (free_tx, free_rx) = bounded::<AlignedBuf>(nbuf);
    let (full_tx, full_rx) = bounded::<Block>(NBUF);
    let (job_tx, job_rx) = bounded::<WriteJob>(NBUF);
    for _ in 0..nbuf {
        // Cannot fail: the channel has room for nbuf and its receiver is alive.
        let _ = free_tx.send(AlignedBuf::new(BUF));
    }
    let pool = HashPool::new(m, hashers);
    // End offsets the writer reached, for the read-back (unbounded: one u64 per buffer).
    let (mark_tx, mark_rx) = unbounded::<u64>();
    // Set by the read-back when it fails: every stage of the stream stops.
    let stop = AtomicBool::new(false);
    let head_lock = OnceLock::<AlignedBuf>::new();
    let tail_lock = OnceLock::<AlignedBuf>::new();
    let trailing = Trailing {
        inner: progress,
        state: Mutex::new((false, 0)),
    };
    let mut write_seconds = 0.0;
    let mut verify_seconds = 0.0;

    let (results, first_byte) = std::thread::scope(|s| {
        let stop = &stop;
        let (head_lock, tail_lock) = (&head_lock, &tail_lock);
        // Chunk hashers (without read-back): each hashes the chunks dealt to it, in order.
        let (segments, hashed) = pool.start(s, stop);
        // Decoder: fills buffers in order; owns the clean-end checks.
        let decoder_thread = s.spawn(move || -> Result<(), WriteError> {
            match decoder {
                Input::Decoded(r) => decode_stream(r, m, &free_rx, &full_tx, stop),
                Input::Frames(p) => decode_frames(p, m, &free_rx, &full_tx, stop, decoding),
            }
        });

        // Writer: wipes both ends of the target, then puts each job on it, runs of zeros as
        // BLKZEROOUT / punched holes, returns its buffer and tells the read-back how far it
        // got.
        let writer_thread = s.spawn(move || -> (Result<u64, WriteError>, Option<Instant>) {
            let mut first_byte = None;
            let io_err = |offset: u64, len: u64| {
                let target = target_name.clone();
                move |source| WriteError::WriteIo {
                    target,
                    offset,
                    len,
                    source,
                }
            };
            // --- Wipe: from here on the target has no partition table until the commit.
            let t = Instant::now();
            let wipe = HOLD.min(size);
            progress.begin(Phase::Wipe, 2 * wipe);
            // Both ends at once (each is a zeroing request the device may take its time over),
            // then one flush: no payload byte is written before both are durable.
            let wiped = std::thread::scope(|w| {
                let tail = w.spawn(|| target.zero_range(size - wipe, wipe));
                let head = target.zero_range(0, wipe).map_err(io_err(0, wipe));
                let tail = tail
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("wipe thread panicked")))
                    .map_err(io_err(size - wipe, wipe));
                head.and(tail)?;
                target.sync()?;
                Ok::<(), WriteError>(())
            });
            if let Err(e) = wiped {
                return (Err(e), None);
            }
            progress.end(Phase::Wipe, 2 * wipe, t.elapsed().as_secs_f64());
            progress.begin(Phase::Write, raw);

            let mut zeroed = 0u64;
            for job in job_rx {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
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
                    if let Err(e) = res {
                        return (Err(io_err(off, len)(e)), first_byte);
                    }
                    first_byte.get_or_insert_with(Instant::now);
                }
                let end = job.block.offset + job.block.len as u64;
                progress.advance(end);
                // The read-back may have stopped (it failed, or there is none).
                let _ = mark_tx.send(end);
                if segments.is_empty() {
                    // The decoder may have finished and dropped its end: the buffer is not
                    // needed any more then, but the remaining jobs still are.
                    let _ = free_tx.send(job.block.buf);
                } else {
                    // The hashers hand it back to the decoder when they are done with it.
                    deal(job.block, m, &free_tx, &segments);
                }
            }
            (Ok(zeroed), first_byte)
        });

        // Read-back, behind the writer.
        let verify_thread = opts.verify.then(|| {
            let trailing = &trailing;
            s.spawn(move || -> Result<(), WriteError> {
                if let Err(e) = target.drop_caches() {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e.into());
                }
                let held = [
                    Held {
                        offset: 0,
                        len: head_end,
                        data: head_lock,
                    },
                    Held {
                        offset: tail_start,
                        len: raw - tail_start,
                        data: tail_lock,
                    },
                ];
                let trail = Trail {
                    written: mark_rx,
                    flush_every: tune.trail_flush,
                    stop,
                };
                verify::verify_trailing(target, m, &held, trail, trailing, verify::hash_workers())
                    .map_err(WriteError::Verify)
            })
        });

        // Router (this thread): held regions. With read-back verification the decoded stream
        // is not hashed: the read-back hashes what reached the disk, zstd's frame checksums
        // catch a damaged payload while decoding, and a read-back mismatch is attributed to
        // the image or the disk afterwards (see `attribute_mismatch`). That saves a full
        // SHA-256 pass. Without, the chunk hashers check what the writer wrote.
        let routed = (move || -> Result<(), WriteError> {
            let mut head = Some(AlignedBuf::new(head_end as usize));
            let mut tail = Some(AlignedBuf::new((raw - tail_start) as usize));
            // Publishes each held region once the stream has passed its end.
            let publish =
                |seen: u64, head: &mut Option<AlignedBuf>, tail: &mut Option<AlignedBuf>| {
                    if seen >= head_end {
                        if let Some(h) = head.take() {
                            let _ = head_lock.set(h);
                        }
                    }
                    if seen >= raw {
                        if let Some(t) = tail.take() {
                            let _ = tail_lock.set(t);
                        }
                    }
                };
            let mut seen = 0u64;
            publish(seen, &mut head, &mut tail);
            for block in full_rx.iter() {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let data = &block.buf.as_slice()[..block.len];
                // Held regions go to memory, published before the writer can report any
                // offset past them (the read-back splices them in from there).
                let b_start = block.offset;
                let b_end = block.offset + block.len as u64;
                if let Some(h) = head.as_mut().filter(|_| b_start < head_end) {
                    let e = b_end.min(head_end);
                    h.as_mut_slice()[b_start as usize..e as usize]
                        .copy_from_slice(&data[..(e - b_start) as usize]);
                }
                if let Some(t) = tail.as_mut().filter(|_| b_end > tail_start) {
                    let s0 = b_start.max(tail_start);
                    t.as_mut_slice()[(s0 - tail_start) as usize..(b_end - tail_start) as usize]
                        .copy_from_slice(&data[(s0 - b_start) as usize..]);
                }
                seen = b_end;
                publish(seen, &mut head, &mut tail);
                let w_start = b_start.max(head_end).min(b_end);
                let w_end = b_end.min(tail_start).max(w_start);
                let start = (w_start - b_start) as usize;
                let end = (w_end - b_start) as usize;
                if job_tx.send(WriteJob { block, start, end }).is_err() {
                    return Ok(());
                }
            }
            drop(job_tx);
            Ok(())
        })();

        let decoded = decoder_thread.join().unwrap_or_else(|_| {
            Err(WriteError::Decode {
                offset: 0,
                chunk: 0,
                source: std::io::Error::other("decoder thread panicked"),
            })
        });
        let (written, first_byte) = writer_thread.join().unwrap_or_else(|_| {
            (
                Err(WriteError::WriteIo {
                    target: target.path().display().to_string(),
                    offset: 0,
                    len: 0,
                    source: std::io::Error::other("writer thread panicked"),
                }),
                None,
            )
        });
        // The writer has let go of the hashers' queues: they finish what they were dealt.
        let hashed = hashed.join();
        // Stopped by the read-back or a chunk hasher: not a finished write phase.
        let streamed = decoded.is_ok()
            && routed.is_ok()
            && written.is_ok()
            && hashed.is_ok()
            && !stop.load(Ordering::Relaxed);
        let t = Instant::now();
        if streamed {
            write_seconds = started.elapsed().as_secs_f64();
            progress.end(Phase::Write, raw, write_seconds);
            if opts.verify {
                progress.begin(Phase::Verify, raw);
                trailing.go_live();
            }
        }
        let verified = verify_thread.map(|v| {
            v.join().unwrap_or_else(|_| {
                Err(WriteError::Verify(VerifyError::ReadIo {
                    target: target.path().display().to_string(),
                    offset: 0,
                    source: std::io::Error::other("read-back thread panicked"),
                }))
            })
        });
        if streamed && matches!(verified, Some(Ok(()))) {
            verify_seconds = t.elapsed().as_secs_f64();
            progress.end(Phase::Verify, raw, verify_seconds);
        }
        (
            (decoded, routed, written, hashed, verified, streamed),
            first_byte,
        )
    });
    let (decoded, routed, written, hashed, verified, streamed) = results;
    // Every stage that stopped because another failed returned Ok (or, the read-back,
    // `Interrupted`): of the real failures, the lowest offset wins.
    let mut errors: Vec<WriteError> = [decoded.err(), routed.err()]
        .into_iter()
        .flatten()
        .collect();
    match hashed {
        Err(e) => errors.push(e),
        // Every chunk was dealt once the whole stream was written: each must have been
        // checked (a guard; the hashers either check a chunk or report why not).
        Ok(n) if hash && streamed && n != m.chunk_count() => {
            errors.push(WriteError::Decode {
                offset: 0,
                chunk: 0,
                source: std::io::Error::other(format!(
                    "only {n} of the image's {} chunks were hashed",
                    m.chunk_count()
                )),
            });
        }
        Ok(_) => {}
    }
    let zeroed = match written {
        Ok(z) => z,
        Err(e) => {
            errors.push(e);
            0
        }
    };
    let stream_failed = !errors.is_empty();
    if let Some(Err(e)) = verified {
        let interrupted = matches!(e, WriteError::Verify(VerifyError::Interrupted { .. }));
        if !(interrupted && stream_failed) {
            errors.push(e);
        }
    }
    if let Some(e) = errors.into_iter().min_by_key(|e| failed_at(e, raw)) {
        return Err(e);
    }
    target.sync()?;
    let (Some(head), Some(tail)) = (head_lock.into_inner(), tail_lock.into_inner()) else {
        return Err(WriteError::ShortStream {
            got: 0,
            expected: raw,
        });
    };
    Ok(Streamed {
        zeroed,
        head,
        tail,
        first_byte,
        write_seconds,
        verify_seconds,
    })
}

/// The stream stage for a decoded input (a version 1 payload, a raw file): fills the free
/// buffers in order and checks the stream ends cleanly at `raw_size`.
fn decode_stream(
    mut decoder: Box<dyn Read + Send>,
    m: &Manifest,
    free_rx: &Receiver<AlignedBuf>,
    full_tx: &Sender<Block>,
    stop: &AtomicBool,
) -> Result<(), WriteError> {
    let raw = m.raw_size;
    let mut offset = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Ok(mut buf) = free_rx.recv() else {
            return Ok(());
        };
        let n =
            read_full(&mut decoder, buf.as_mut_slice()).map_err(|e| decode_error(m, offset, e))?;
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
            // A short read means the reader is at its end; confirm it.
            expect_end(&mut decoder, m, offset)?;
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
}

/// The stream stage for a version 2 payload: this thread reads the frames in order, each into
/// reused memory of its own, and takes a free buffer for each (in order, so the frame the router waits
/// for always has one); `threads` decoders decode each frame straight into its buffer; the
/// blocks go to the router in order. A frame's buffer holds exactly its raw bytes, so the
/// blocks are the frames.
fn decode_frames(
    mut payload: Box<dyn Read + Send>,
    m: &Manifest,
    free_rx: &Receiver<AlignedBuf>,
    full_tx: &Sender<Block>,
    stop: &AtomicBool,
    threads: usize,
) -> Result<(), WriteError> {
    let raw = m.raw_size;
    let Some(table) = m.frame_table() else {
        // `Input::open` gives a compressed payload only to images with a frame table.
        let none = std::io::Error::other("the image has no frame table");
        return Err(decode_error(m, 0, none));
    };
    let mut failed: Option<WriteError> = None;
    let mut read_failed: Option<WriteError> = None;
    let mut sent = 0u64;
    let payload_ref = &mut payload;
    // The compressed frames' memory, reused: one frame read ahead of those decoding (a frame
    // is never larger than zstd's bound for its raw size, about its raw size).
    let (spare_tx, spare_rx) = bounded::<Vec<u8>>(threads + 1);
    for _ in 0..=threads {
        let _ = spare_tx.send(Vec::new());
    }
    // Closed when the consumer below stops (a frame failed, the router stopped): frames in
    // flight then take their buffers with them, and no buffer this stage is waiting for may
    // ever come back.
    let (halt_tx, halt_rx) = bounded::<()>(0);
    let frames = table.enumerate().map_while(|(k, (clen, (start, end)))| {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let buf = crossbeam_channel::select! {
            recv(free_rx) -> buf => buf.ok()?,
            recv(halt_rx) -> _ => return None,
        };
        let mut frame = spare_rx.recv().ok()?;
        match read_frame(payload_ref, m, (clen, start), &mut frame) {
            Ok(()) => Some((k, frame, clen as usize, start, end, buf)),
            Err(e) => {
                read_failed = Some(e);
                None
            }
        }
    });
    crate::ordered::map_in_order(
        frames,
        threads,
        threads,
        zstd::bulk::Decompressor::new,
        |d, (k, frame, clen, start, end, mut buf)| {
            let len = (end - start) as usize;
            let decoded = match d {
                Ok(d) => decode_frame(d, &frame[..clen], &mut buf.as_mut_slice()[..len], k),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            // Cannot block: there are no more of them than the channel holds.
            let _ = spare_tx.send(frame);
            decoded
                .map(|()| Block {
                    offset: start,
                    len,
                    buf,
                })
                .map_err(|e| decode_error(m, start, e))
        },
        {
            let (failed, sent) = (&mut failed, &mut sent);
            // Owned by the consumer: dropped when it stops.
            let halt = halt_tx;
            move |block: Result<Block, WriteError>| {
                let _ = &halt;
                match block {
                    Ok(block) => {
                        let end = block.offset + block.len as u64;
                        let ok = full_tx.send(block).is_ok();
                        if ok {
                            *sent = end;
                        }
                        ok
                    }
                    Err(e) => {
                        *failed = Some(e);
                        false
                    }
                }
            }
        },
    );
    // The decoded frames are ahead of the read that failed: the lower offset wins.
    if let Some(e) = failed.or(read_failed) {
        return Err(e);
    }
    if sent != raw {
        // Stopped early without a failure of its own: another stage stopped the stream, and
        // says why.
        return Ok(());
    }
    // The payload must end here.
    expect_end(&mut payload, m, raw)
}

/// Buffers between the stages: [`NBUF`] with read-back; without, enough for each of
/// `hashers` threads to hold a whole chunk of written buffers while the decoder and the
/// writer go on with two more, within [`NBUF_HASHED`].
fn buffer_count(hashers: usize, chunk_size: u64) -> usize {
    if hashers == 0 {
        return NBUF;
    }
    let per_chunk = usize::try_from(chunk_size.div_ceil(BUF as u64)).unwrap_or(usize::MAX);
    hashers
        .saturating_mul(per_chunk)
        .saturating_add(2)
        .clamp(NBUF, NBUF_HASHED)
}

/// A written buffer the chunk hashers share: it goes back to the decoder when the last of
/// them lets go of it.
struct Shared {
    buf: Option<AlignedBuf>,
    len: usize,
    free: Sender<AlignedBuf>,
}

impl Shared {
    fn data(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.as_slice()[..self.len])
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // The channel has room for every buffer; the decoder may have finished.
            let _ = self.free.send(buf);
        }
    }
}

/// The part of one chunk in a written buffer, for its hasher.
struct Segment {
    block: Arc<Shared>,
    chunk: u64,
    /// Its bytes in the buffer.
    start: usize,
    end: usize,
    /// The chunk ends here.
    last: bool,
}

/// Hands a written buffer to the chunk hashers: each chunk it holds (or part of one) goes to
/// hasher `chunk % n`, which receives the parts of its chunks in order.
fn deal(block: Block, m: &Manifest, free: &Sender<AlignedBuf>, to: &[Sender<Segment>]) {
    let b_start = block.offset;
    let b_end = block.offset + block.len as u64;
    let shared = Arc::new(Shared {
        buf: Some(block.buf),
        len: block.len,
        free: free.clone(),
    });
    let mut at = b_start;
    while at < b_end {
        let chunk = at / m.chunk_size;
        let chunk_end = m.chunk_range(chunk).1;
        let end = chunk_end.min(b_end);
        let seg = Segment {
            block: Arc::clone(&shared),
            chunk,
            start: (at - b_start) as usize,
            end: (end - b_start) as usize,
            last: end == chunk_end,
        };
        // A hasher that stopped (it panicked) drops its part: the stream stops anyway.
        let _ = to[(chunk % to.len() as u64) as usize].send(seg);
        at = end;
    }
}

/// Without read-back, the written chunks are hashed on several threads: hasher `k` takes
/// chunks `k`, `k + n`, `k + 2n` … ([`deal`]), so each hashes whole chunks on its own and `n`
/// chunks are hashed at once (memory allowing: [`buffer_count`]). A chunk that differs from
/// the manifest stops the stream; of several, the lowest is reported — every chunk below it
/// is still checked — as a sequential check would have found it. Before, one thread hashed
/// every byte: on a NUC without SHA extensions (about 0.4 GB/s a core) that bounded
/// `--no-verify` below what the read-back, hashing on every core, achieved.
struct HashPool<'m> {
    m: &'m Manifest,
    threads: usize,
    /// The lowest chunk found to differ (u64::MAX: none); only ever lowered.
    fail_at: AtomicU64,
    /// Its error.
    failed: Mutex<Option<WriteError>>,
}

/// The running hashers.
struct Hashing<'scope, 'p> {
    pool: &'p HashPool<'p>,
    handles: Vec<std::thread::ScopedJoinHandle<'scope, u64>>,
}

impl<'m> HashPool<'m> {
    fn new(m: &'m Manifest, threads: usize) -> Self {
        HashPool {
            m,
            threads,
            fail_at: AtomicU64::new(u64::MAX),
            failed: Mutex::new(None),
        }
    }

    /// Starts the hashers in `s`: their queues (empty with no hashers), and the handle to
    /// join them. A bad chunk sets `stop`.
    fn start<'scope>(
        &'m self,
        s: &'scope std::thread::Scope<'scope, 'm>,
        stop: &'m AtomicBool,
    ) -> (Vec<Sender<Segment>>, Hashing<'scope, 'm>) {
        let mut queues = Vec::with_capacity(self.threads);
        let mut handles = Vec::with_capacity(self.threads);
        for _ in 0..self.threads {
            let (tx, rx) = unbounded::<Segment>();
            queues.push(tx);
            handles.push(s.spawn(move || {
                let run = || {
                    let mut checked = 0u64;
                    let mut current: Option<(u64, Sha256)> = None;
                    for seg in rx.iter() {
                        if seg.chunk > self.fail_at.load(Ordering::Relaxed) {
                            // A lower chunk differs: this one no longer matters.
                            continue;
                        }
                        let (chunk, last) = (seg.chunk, seg.last);
                        if current.as_ref().is_none_or(|(c, _)| *c != chunk) {
                            current = Some((chunk, Sha256::new()));
                        }
                        if let Some((_, h)) = current.as_mut() {
                            h.update(&seg.block.data()[seg.start..seg.end]);
                        }
                        // The buffer goes back as soon as every part of it is hashed.
                        drop(seg);
                        if let Some((_, h)) = current.take_if(|_| last) {
                            match check_chunk(self.m, chunk, hex(&h.finalize())) {
                                Ok(()) => checked += 1,
                                Err(e) => self.fail(chunk, e, stop),
                            }
                        }
                    }
                    checked
                };
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    Ok(n) => n,
                    Err(p) => {
                        stop.store(true, Ordering::Relaxed);
                        std::panic::resume_unwind(p)
                    }
                }
            }));
        }
        (
            queues,
            Hashing {
                pool: self,
                handles,
            },
        )
    }

    /// Records chunk `chunk`'s mismatch if it is the lowest so far, and stops the stream.
    fn fail(&self, chunk: u64, e: WriteError, stop: &AtomicBool) {
        let mut failed = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if chunk < self.fail_at.load(Ordering::Relaxed) {
            self.fail_at.store(chunk, Ordering::Relaxed);
            *failed = Some(e);
        }
        stop.store(true, Ordering::Relaxed);
    }
}

impl Hashing<'_, '_> {
    /// Waits for the hashers (their queues must be closed): how many chunks matched, or the
    /// lowest mismatch.
    fn join(self) -> Result<u64, WriteError> {
        let mut checked = 0;
        let mut panicked = false;
        for h in self.handles {
            match h.join() {
                Ok(n) => checked += n,
                Err(_) => panicked = true,
            }
        }
        let failed = self
            .pool
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(e) = failed {
            return Err(e);
        }
        if panicked {
            return Err(WriteError::Decode {
                offset: 0,
                chunk: 0,
                source: std::io::Error::other("a chunk hash thread panicked"),
            });
        }
        Ok(checked)
    }
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

    /// A seed-like addition: `len` bytes of a recognisable pattern in the last usable MiBs.
    fn addition(plan: &Plan, len: u64) -> Addition {
        let t = plan.table().unwrap();
        let ss = u64::from(t.sector_size());
        let last = t.last_usable_on(plan.target_size()).unwrap();
        let first = (last + 1 - len / ss) / (HOLD / ss) * (HOLD / ss);
        let content: Vec<u8> = (0..(last + 1 - first) * ss)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        Addition {
            what: "the test partition".into(),
            number: t.free_slot().unwrap(),
            entry: gpt::partition::Partition {
                part_type_guid: gpt::partition_types::BASIC,
                part_guid: uuid::Uuid::from_u128(42),
                first_lba: first,
                last_lba: last,
                flags: 0,
                name: "CIDATA".into(),
            },
            content,
        }
    }

    #[test]
    fn one_transaction_lays_image_addition_and_final_table_on_a_larger_disk() {
        for ss in [512usize, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let raw = fake_gpt_raw(6 << 20, ss);
            let img_path = dir.path().join("i.img.zst");
            pack_bytes(&raw, &img_path);
            let img = Image::open(&img_path).unwrap();
            let disk = dir.path().join("disk");
            let size = 16u64 << 20;
            let tgt = file_target(&disk, size, ss as u32);
            let plan = plan(&img, &tgt).unwrap();
            let add = addition(&plan, 4 << 20);
            let rep = write_planned(
                &img,
                &tgt,
                &plan,
                std::slice::from_ref(&add),
                None,
                &WriteOptions::default(),
                &NoProgress,
            )
            .unwrap();
            let got = std::fs::read(&disk).unwrap();
            let ssu = ss as u64;
            let last = size / ssu - 1;
            // The image's bytes, except the primary header + entries, the protective MBR's
            // size field, and its old backup header sector (cleared).
            let old_backup = (raw.len() / ss - 1) * ss;
            assert!(
                got[old_backup..old_backup + ss].iter().all(|&b| b == 0),
                "ss {ss}: old backup header not cleared"
            );
            assert_eq!(
                &got[64 << 10..old_backup],
                &raw[64 << 10..old_backup],
                "ss {ss}: image data"
            );
            assert_eq!(&got[..446], &raw[..446]);
            let size_field = u32::from_le_bytes(got[446 + 12..446 + 16].try_into().unwrap());
            assert_eq!(u64::from(size_field), last, "protective MBR fitted");
            // The addition's bytes where its entry says.
            let o = (add.entry.first_lba * ssu) as usize;
            assert_eq!(&got[o..o + add.content.len()], &add.content[..]);
            // Both headers valid, at LBA 1 and the disk's last sector, same entries, with the
            // addition and the image's partition.
            let g = gpt::GptConfig::new()
                .writable(false)
                .logical_block_size(gpt::disk::LogicalBlockSize::try_from(ssu).unwrap())
                .only_valid_headers(true)
                .open_from_device(std::io::Cursor::new(got.clone()))
                .unwrap();
            assert_eq!(g.primary_header().unwrap().backup_lba, last);
            assert_eq!(g.partitions()[&add.number], add.entry);
            assert_eq!(g.partitions()[&1].name, "data");
            let t = rep.partition_table.unwrap();
            assert_eq!((t.backup_lba, t.added.len()), (last, 1));
            // imprint verify accepts exactly this.
            let v = verify::verify_image(&img, &tgt, &NoProgress).unwrap();
            assert!(v.gpt_backup_at_end);
            assert_eq!(v.extra_partitions, vec!["CIDATA".to_string()]);
        }
    }

    #[test]
    fn verify_accepts_the_image_written_plainly_on_a_larger_disk_and_rejects_changes() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(6 << 20, 512);
        let img_path = dir.path().join("i.img.zst");
        pack_bytes(&raw, &img_path);
        let img = Image::open(&img_path).unwrap();
        let disk = dir.path().join("disk");
        // As dd leaves it: the image byte for byte, then whatever the disk held.
        let mut bytes = raw.clone();
        bytes.resize(16 << 20, 0xEE);
        std::fs::write(&disk, &bytes).unwrap();
        let tgt = Target::open(
            &disk,
            &OpenOptionsTarget {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let v = verify::verify_image(&img, &tgt, &NoProgress).unwrap();
        assert!(!v.gpt_backup_at_end);
        // One byte of image data changed: refused, naming the chunk.
        bytes[3 << 20] ^= 1;
        std::fs::write(&disk, &bytes).unwrap();
        let e = verify::verify_image(&img, &tgt, &NoProgress).unwrap_err();
        assert!(e.to_string().contains("chunk 3"), "{e}");
    }

    #[test]
    fn an_addition_that_does_not_fit_is_refused_before_the_wipe() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(6 << 20, 512);
        let img_path = dir.path().join("i.img.zst");
        pack_bytes(&raw, &img_path);
        let img = Image::open(&img_path).unwrap();
        let disk = dir.path().join("disk");
        let tgt = file_target(&disk, 16 << 20, 512);
        let plan = plan(&img, &tgt).unwrap();
        let before = std::fs::read(&disk).unwrap();
        // Inside the image's held last MiB.
        let mut a = addition(&plan, 4 << 20);
        a.entry.first_lba = (5 << 20) / 512;
        a.content.resize(
            ((a.entry.last_lba + 1 - a.entry.first_lba) * 512) as usize,
            1,
        );
        let refuse = |a: Addition| {
            write_planned(
                &img,
                &tgt,
                &plan,
                &[a],
                None,
                &WriteOptions::default(),
                &NoProgress,
            )
            .unwrap_err()
        };
        let e = refuse(a);
        assert_eq!(e.disk_state(), DiskState::Untouched, "{e}");
        // Past the usable area.
        let mut a = addition(&plan, 4 << 20);
        a.entry.last_lba += 1;
        let e = refuse(a);
        assert!(matches!(e, WriteError::BadAddition { .. }), "{e}");
        assert_eq!(
            std::fs::read(&disk).unwrap(),
            before,
            "the target was touched"
        );
    }

    #[test]
    fn a_broken_image_table_is_refused_before_the_wipe() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = fake_gpt_raw(6 << 20, 512);
        raw[512 + 40] ^= 1; // primary header CRC no longer matches
        let img_path = dir.path().join("i.img.zst");
        pack_bytes(&raw, &img_path);
        let img = Image::open(&img_path).unwrap();
        let disk = dir.path().join("disk");
        let tgt = file_target(&disk, 16 << 20, 512);
        let before = std::fs::read(&disk).unwrap();
        let e = write_image(&img, &tgt, &WriteOptions::default(), &NoProgress).unwrap_err();
        assert!(matches!(e, WriteError::ImageTable { .. }), "{e}");
        assert!(e.is_image_fault());
        assert_eq!(e.disk_state(), DiskState::Untouched);
        assert_eq!(std::fs::read(&disk).unwrap(), before);
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

    /// Writes to `out` the image at `good` with the manifest's digests of `chunks` replaced by
    /// zeros: a manifest that disagrees with its intact payload.
    fn with_wrong_chunk_digests(good: &Path, chunks: &[u64], out: &Path) {
        rewritten(good, out, |m, _| {
            for &i in chunks {
                m.chunks[i as usize] = "0".repeat(64);
            }
        });
    }

    /// An image whose manifest disagrees with its (intact) payload in chunk 2: with and without
    /// read-back, the error blames the image and names the chunk; no partition table is left.
    #[test]
    fn manifest_payload_disagreement_is_an_image_fault_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(6 << 20, 512);
        let good = dir.path().join("good.img.zst");
        pack_bytes(&raw, &good);
        let bad = dir.path().join("bad.img.zst");
        with_wrong_chunk_digests(&good, &[2], &bad);
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

    /// Both payload layouts write the image byte for byte: one zstd stream (version 1, one
    /// decoding thread) and frames of one buffer and of 1 MiB (version 2, decoded by 1, 2 and 3
    /// threads straight into the buffers, the last frame shorter), with and without read-back.
    #[test]
    fn one_stream_and_frames_decoded_on_several_threads_write_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(21 << 20, 512);
        for frame_size in [None, Some(4 << 20), Some(1 << 20)] {
            let path = dir.path().join("i.img.zst");
            let m = crate::manifest::tests::pack_bytes_framed(&raw, &path, frame_size);
            assert_eq!(m.version, if frame_size.is_some() { 2 } else { 1 });
            let img = Image::open(&path).unwrap();
            for decoders in [1, 2, 3] {
                for verify in [true, false] {
                    let what =
                        format!("frames {frame_size:?}, {decoders} decoders, verify {verify}");
                    let disk = dir.path().join("disk");
                    let tgt = file_target(&disk, raw.len() as u64, 512);
                    let p = plan(&img, &tgt).unwrap();
                    let opts = WriteOptions {
                        verify,
                        ..Default::default()
                    };
                    let tune = Tuning {
                        trail_flush: TRAIL_FLUSH,
                        hashers: 2,
                        decoders,
                    };
                    write_transaction(&img, &tgt, &p, &[], None, &opts, &NoProgress, tune)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let got = std::fs::read(&disk).unwrap();
                    let pos = got.iter().zip(&raw).position(|(a, b)| a != b);
                    assert_eq!((got.len(), pos), (raw.len(), None), "{what}");
                }
            }
        }
    }

    /// Where each frame of `m`'s payload starts in the payload, and its length.
    fn frame_spans(m: &Manifest) -> Vec<(usize, usize)> {
        let mut at = 0;
        let frames = m.frames.as_ref().unwrap();
        frames
            .iter()
            .map(|&len| {
                at += len as usize;
                (at - len as usize, len as usize)
            })
            .collect()
    }

    /// `good`'s payload under a changed manifest (and payload) at `out`.
    fn rewritten(good: &Path, out: &Path, change: impl FnOnce(&mut Manifest, &mut Vec<u8>)) {
        let bytes = std::fs::read(good).unwrap();
        let img = Image::open(good).unwrap();
        let mut m = img.manifest().clone();
        let mut payload = bytes[bytes.len() - m.compressed_size as usize..].to_vec();
        change(&mut m, &mut payload);
        m.compressed_size = payload.len() as u64;
        m.compressed_sha256 = hex(&Sha256::digest(&payload));
        let mut image = m.to_frame();
        image.extend_from_slice(&payload);
        std::fs::write(out, image).unwrap();
    }

    /// A damaged version 2 payload is refused as a corrupt image, naming the frame and where
    /// its part of the image starts, and leaves no partition table: a flipped byte in frame 3
    /// (decoded by one of several threads), a frame table whose entries are off by a byte (same
    /// total), a frame that decodes to less than its part. Damage in frame 0 is found by the
    /// plan, before the target is touched.
    #[test]
    fn a_damaged_frame_is_refused_by_number_and_no_partition_table_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(8 << 20, 512);
        let good = dir.path().join("good.img.zst");
        let spans = frame_spans(&pack_bytes(&raw, &good));
        let at = |k: usize| spans[k].0;
        let flip = |k: usize| {
            let pos = at(k) + spans[k].1 / 2;
            move |_: &mut Manifest, p: &mut Vec<u8>| p[pos] ^= 0x10
        };
        let short_frame_1 = |m: &mut Manifest, p: &mut Vec<u8>| {
            let half = zstd::bulk::compress(&raw[1 << 20..(1 << 20) + (512 << 10)], 3).unwrap();
            let f = m.frames.as_mut().unwrap();
            p.splice(at(1)..at(2), half.iter().copied());
            f[1] = half.len() as u64;
        };
        let shifted = |m: &mut Manifest, _: &mut Vec<u8>| {
            let f = m.frames.as_mut().unwrap();
            f[1] += 1;
            f[2] -= 1;
        };
        type Change<'a> = Box<dyn Fn(&mut Manifest, &mut Vec<u8>) + 'a>;
        let cases: Vec<(Change, u64, &str)> = vec![
            (Box::new(flip(3)), 3 << 20, "frame 3 of the payload"),
            (Box::new(shifted), 1 << 20, "frame 1 of the payload is"),
            (
                Box::new(short_frame_1),
                1 << 20,
                "frame 1 of the payload decodes to 524288 bytes, the frame table says 1048576",
            ),
            (Box::new(flip(0)), 0, "frame 0 of the payload"),
        ];
        for (change, offset, want) in cases {
            let bad = dir.path().join("bad.img.zst");
            rewritten(&good, &bad, |m, p| change(m, p));
            let img = Image::open(&bad).unwrap();
            let disk = dir.path().join("disk");
            let tgt = file_target(&disk, raw.len() as u64, 512);
            let e = plan(&img, &tgt).and_then(|p| {
                let tune = Tuning {
                    decoders: 3,
                    ..Tuning::new()
                };
                let opts = WriteOptions::default();
                write_transaction(&img, &tgt, &p, &[], None, &opts, &NoProgress, tune)
            });
            let e = e.unwrap_err();
            assert!(
                matches!(e, WriteError::Decode { offset: o, chunk, .. } if o == offset && chunk == offset >> 20),
                "{want}: {e:?}"
            );
            assert!(e.is_image_fault(), "{want}");
            let shown = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(shown.contains(want), "{shown}");
            let got = std::fs::read(&disk).unwrap();
            let left = if offset == 0 { 0xEE } else { 0 };
            assert!(
                got[..1 << 20].iter().all(|&b| b == left),
                "{want}: the first MiB must be untouched (frame 0) or wiped"
            );
        }
    }

    /// With every frame from the third on damaged, the frames in flight all fail and take
    /// their buffers with them: the write stops at the first of them, for 1, 2 and 4 decoders
    /// (within 30 s: the stage reading frames stops waiting for buffers once the decoding has
    /// stopped; with at least decoders + 2 buffers one also always comes back from the writer,
    /// so removing either alone did not make it hang here).
    #[test]
    fn a_stream_of_damaged_frames_stops_at_the_first_with_every_number_of_decoders() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(40 << 20, 512);
        let good = dir.path().join("good.img.zst");
        let spans = frame_spans(&pack_bytes(&raw, &good));
        let bad = dir.path().join("bad.img.zst");
        rewritten(&good, &bad, |_, p| {
            for &(at, _) in &spans[2..] {
                // The frame's first byte: its magic number.
                p[at] ^= 0xFF;
            }
        });
        for decoders in [1, 2, 4] {
            let img = Image::open(&bad).unwrap();
            let disk = dir.path().join(format!("disk-{decoders}"));
            let tgt = file_target(&disk, raw.len() as u64, 512);
            let p = plan(&img, &tgt).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let tune = Tuning {
                    decoders,
                    ..Tuning::new()
                };
                let opts = WriteOptions::default();
                let r = write_transaction(&img, &tgt, &p, &[], None, &opts, &NoProgress, tune);
                let _ = tx.send(r.map(|_| ()));
            });
            let r = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{decoders} decoders: the write hung"));
            let e = r.unwrap_err();
            assert!(
                matches!(e, WriteError::Decode { offset, .. } if offset == 2 << 20),
                "{decoders} decoders: {e}"
            );
        }
    }

    /// Without read-back the written chunks are hashed on several threads: for chunks that
    /// straddle the 4 MiB buffers (3 MiB), fill several per buffer (1 MiB) or span several
    /// (8 MiB), and for 1, 2 and 5 hashers, a good image is written byte for byte, and a manifest
    /// that disagrees with its payload in three chunks is refused naming the lowest of them,
    /// with no partition table left.
    #[test]
    fn without_read_back_chunks_are_hashed_on_several_threads_and_the_lowest_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(18 << 20, 512);
        // One stream, 4 MiB frames (a buffer each) and 1 MiB frames (blocks of a frame).
        for (chunk_size, frame_size) in [
            (1u64 << 20, None),
            (3 << 20, None),
            (8 << 20, None),
            (1 << 20, Some(4 << 20)),
            (3 << 20, Some(1 << 20)),
            (8 << 20, Some(4 << 20)),
        ] {
            let good = dir.path().join(format!("good-{chunk_size}.img.zst"));
            let opts = crate::manifest::PackOptions {
                name: "hashers".into(),
                level: 1,
                threads: 0,
                chunk_size,
                frame_size,
            };
            let m = crate::manifest::pack(&mut &raw[..], &good, &opts, &mut |_| {}).unwrap();
            let n = m.chunk_count();
            // Three bad chunks (with 8 MiB chunks, two), the lowest dealt to the second hasher.
            let bad_path = dir.path().join(format!("bad-{chunk_size}.img.zst"));
            with_wrong_chunk_digests(&good, &[n - 1, 1, n / 2], &bad_path);
            let opts = WriteOptions {
                verify: false,
                ..Default::default()
            };
            for hashers in [1, 2, 5] {
                let tune = Tuning {
                    trail_flush: TRAIL_FLUSH,
                    hashers,
                    decoders: hashers,
                };
                let what =
                    format!("chunk size {chunk_size}, frames {frame_size:?}, {hashers} hashers");
                let img = Image::open(&good).unwrap();
                let disk = dir.path().join("disk-good");
                let tgt = file_target(&disk, 24 << 20, 512);
                let p = plan(&img, &tgt).unwrap();
                write_transaction(&img, &tgt, &p, &[], None, &opts, &NoProgress, tune)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = std::fs::read(&disk).unwrap();
                // The image's own GPT is rebuilt for the larger disk: compare past it.
                assert!(
                    got[1 << 20..raw.len() - (1 << 20)] == raw[1 << 20..raw.len() - (1 << 20)],
                    "{what}: the written bytes differ from the image"
                );

                let img = Image::open(&bad_path).unwrap();
                let disk = dir.path().join("disk-bad");
                let tgt = file_target(&disk, 24 << 20, 512);
                let p = plan(&img, &tgt).unwrap();
                let e = write_transaction(&img, &tgt, &p, &[], None, &opts, &NoProgress, tune)
                    .unwrap_err();
                assert!(
                    matches!(e, WriteError::ChunkMismatch { chunk: 1, .. }),
                    "{what}: {e}"
                );
                let got = std::fs::read(&disk).unwrap();
                assert!(
                    got[..1 << 20].iter().all(|&b| b == 0),
                    "{what}: no partition table may be left"
                );
            }
        }
    }

    /// The hashers may find bad chunks in any order (each runs at its own pace): the lowest
    /// is the one reported, and the stream is told to stop at the first.
    #[test]
    fn the_lowest_mismatch_wins_whatever_order_the_hashers_find_them_in() {
        let dir = tempfile::tempdir().unwrap();
        let m = pack_bytes(&fake_gpt_raw(8 << 20, 512), &dir.path().join("i.img.zst"));
        for order in [[5u64, 1, 3], [1, 3, 5], [3, 5, 1]] {
            let pool = HashPool::new(&m, 0);
            let stop = AtomicBool::new(false);
            for (k, &c) in order.iter().enumerate() {
                let e = check_chunk(&m, c, "0".repeat(64)).unwrap_err();
                pool.fail(c, e, &stop);
                assert!(stop.load(Ordering::Relaxed), "{order:?}: not stopped");
                let lowest = order[..=k].iter().min().copied();
                assert_eq!(Some(pool.fail_at.load(Ordering::Relaxed)), lowest);
            }
            let r = std::thread::scope(|s| pool.start(s, &stop).1.join());
            assert!(
                matches!(r, Err(WriteError::ChunkMismatch { chunk: 1, .. })),
                "{order:?}: {r:?}"
            );
        }
    }

    #[test]
    fn buffers_without_read_back_give_each_hasher_a_chunk_within_the_budget() {
        assert_eq!(buffer_count(0, 16 << 20), NBUF);
        assert_eq!(buffer_count(1, 1 << 20), NBUF);
        assert_eq!(buffer_count(1, 16 << 20), 6);
        assert_eq!(buffer_count(2, 16 << 20), NBUF_HASHED);
        assert_eq!(buffer_count(8, 1 << 30), NBUF_HASHED);
        const { assert!(NBUF_HASHED * BUF <= 32 << 20) };
    }

    /// Damages the target behind the engine's back: once the writer reports `at` bytes
    /// written, flips a byte at each of `flips` (inside the block just written, which the
    /// read-back has not reached: the writer reports the block to it only after this) and
    /// notes whether both ends of the target were still zero then. Every later buffer of the
    /// write phase is slowed down, so a write that runs to its end is plain to see.
    struct Saboteur {
        disk: std::path::PathBuf,
        at: u64,
        flips: Vec<u64>,
        /// (current phase, damage done, both ends zero while streaming)
        state: std::sync::Mutex<(Option<Phase>, bool, Option<bool>)>,
    }

    impl Progress for Saboteur {
        fn begin(&self, phase: Phase, _: u64) {
            self.state.lock().unwrap().0 = Some(phase);
        }
        fn advance(&self, done: u64) {
            use std::os::unix::fs::FileExt;
            let mut st = self.state.lock().unwrap();
            if st.0 != Some(Phase::Write) {
                return;
            }
            if st.1 {
                drop(st);
                std::thread::sleep(std::time::Duration::from_millis(250));
                return;
            }
            if done < self.at {
                return;
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.disk)
                .unwrap();
            for &o in &self.flips {
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, o).unwrap();
                f.write_all_at(&[b[0] ^ 0x5A], o).unwrap();
            }
            f.sync_all().unwrap();
            let len = f.metadata().unwrap().len();
            let mut end = vec![0u8; HOLD as usize];
            let mut zero = true;
            for o in [0, len - HOLD] {
                f.read_exact_at(&mut end, o).unwrap();
                zero &= end.iter().all(|&b| b == 0);
            }
            st.1 = true;
            st.2 = Some(zero);
        }
        fn end(&self, _: Phase, _: u64, _: f64) {}
    }

    /// A 40 MiB image (1 MiB chunks) damaged on the target while it is being written, read
    /// back 4 MiB behind the writer: `(error, target bytes, both ends zero mid-stream)`.
    fn damaged_mid_stream(
        dir: &Path,
        ss: usize,
        at: u64,
        flips: &[u64],
    ) -> (WriteError, Vec<u8>, Option<bool>) {
        let raw = fake_gpt_raw(40 << 20, ss);
        let img_path = dir.join("i.img.zst");
        // Frames of one buffer, as `prepare` makes them: the writer reports 4 MiB at a time.
        crate::manifest::tests::pack_bytes_framed(&raw, &img_path, Some(4 << 20));
        let img = Image::open(&img_path).unwrap();
        let disk = dir.join("disk");
        let tgt = file_target(&disk, 48 << 20, ss as u32);
        let plan = plan(&img, &tgt).unwrap();
        let sab = Saboteur {
            disk: disk.clone(),
            at,
            flips: flips.to_vec(),
            state: Default::default(),
        };
        let e = write_transaction(
            &img,
            &tgt,
            &plan,
            &[],
            None,
            &WriteOptions::default(),
            &sab,
            Tuning {
                trail_flush: 4 << 20,
                ..Tuning::new()
            },
        )
        .unwrap_err();
        let zero_ends = sab.state.lock().unwrap().2;
        (e, std::fs::read(&disk).unwrap(), zero_ends)
    }

    #[test]
    fn the_read_back_trails_the_write_and_stops_it_at_a_chunk_damaged_mid_stream() {
        for ss in [512usize, 4096] {
            let dir = tempfile::tempdir().unwrap();
            // Damaged once 16 MiB are written: a byte in chunk 14 (a data MiB).
            let (e, got, zero_ends) =
                damaged_mid_stream(dir.path(), ss, 16 << 20, &[(14 << 20) + 99]);
            let WriteError::Verify(VerifyError::Mismatch {
                chunk, start, end, ..
            }) = &e
            else {
                panic!("ss {ss}: {e}");
            };
            assert_eq!((*chunk, *start, *end), (14, 14 << 20, 15 << 20), "ss {ss}");
            assert!(
                e.to_string()
                    .contains("chunk 14 (bytes 14680064..15728640)"),
                "{e}"
            );
            // The image's chunk 14 is fine: the disk is blamed.
            assert!(!e.is_image_fault(), "{e}");
            assert_eq!(e.disk_state(), DiskState::NoPartitionTable);
            // While the payload streamed, neither end held a partition table; nor after.
            assert_eq!(zero_ends, Some(true), "ss {ss}");
            assert!(got[..HOLD as usize].iter().all(|&b| b == 0), "ss {ss}");
            let last = got.len() - HOLD as usize;
            assert!(got[last..].iter().all(|&b| b == 0), "ss {ss}");
            // Found during the stream: the write stopped before the image's last data MiB
            // (still the disk's old 0xEE bytes), which it would have reached without the
            // read-back.
            assert!(
                got[36 << 20..37 << 20].iter().all(|&b| b == 0xEE),
                "ss {ss}: the write ran on to the end"
            );
        }
    }

    #[test]
    fn of_two_chunks_damaged_mid_stream_the_lower_offset_is_named() {
        for ss in [512usize, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let (e, _, _) = damaged_mid_stream(
                dir.path(),
                ss,
                16 << 20,
                &[(14 << 20) + 5, (12 << 20) + 4 * ss as u64],
            );
            assert!(
                matches!(
                    e,
                    WriteError::Verify(VerifyError::Mismatch {
                        chunk: 12,
                        start: 12582912,
                        ..
                    })
                ),
                "ss {ss}: {e}"
            );
        }
    }

    #[test]
    fn the_plan_hands_its_decoded_stream_to_the_write() {
        for ss in [512usize, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let raw = fake_gpt_raw(6 << 20, ss);
            let img_path = dir.path().join("i.img.zst");
            pack_bytes(&raw, &img_path);
            let img = Image::open(&img_path).unwrap();
            let disk = dir.path().join("disk");
            let tgt = file_target(&disk, raw.len() as u64, ss as u32);
            let plan = plan(&img, &tgt).unwrap();
            // The image file is gone after the plan: a write that opened it again would fail.
            std::fs::remove_file(&img_path).unwrap();
            let opts = WriteOptions::default();
            let rep = write_planned(&img, &tgt, &plan, &[], None, &opts, &NoProgress).unwrap();
            assert!(rep.verified);
            assert_eq!(std::fs::read(&disk).unwrap(), raw, "ss {ss}");
            assert!(rep.first_byte_seconds > 0.0, "{}", rep.first_byte_seconds);
            // The plan's stream is used once; a second write opens the image again (and here
            // cannot), before touching the target.
            let e = write_planned(&img, &tgt, &plan, &[], None, &opts, &NoProgress).unwrap_err();
            assert!(matches!(e, WriteError::Image(_)), "{e}");
            assert_eq!(e.disk_state(), DiskState::Untouched);
            assert_eq!(std::fs::read(&disk).unwrap(), raw, "ss {ss}");
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
