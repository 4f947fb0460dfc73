//! The imprint image format: a `.img.zst` file that plain `zstd -d` still decodes.
//!
//! ```text
//! +--------------------------------------------------+  offset 0
//! | zstd skippable frame, magic 0x184D2A5E           |
//! |   u32 LE frame size                              |
//! |   "IMPRINT\0" | manifest JSON (UTF-8)            |
//! +--------------------------------------------------+
//! | optional: zstd skippable frame, magic 0x184D2A5F |
//! |   u32 LE frame size                              |
//! |   "IMPRSIG\0" | minisign signature (text) of the |
//! |   exact manifest JSON bytes above                |
//! +--------------------------------------------------+  payload_offset
//! | zstd frames of the raw disk image, with content  |
//! | checksums: version 2, one independent frame per  |
//! | 4 MiB, listed in the manifest; version 1, one    |
//! | stream                                           |
//! +--------------------------------------------------+  payload_offset + compressed_size
//! ```
//!
//! The manifest carries everything needed to refuse a wrong or damaged image before a byte is
//! written, and to prove afterwards that a disk holds it: the raw size, the logical sector size
//! found in the image's GPT, the sha256 of the raw image, one sha256 per chunk (so verification
//! names the bad region), and the compressed payload's size and sha256 (so truncation is caught
//! before writing). The optional signature frame binds all of that to a signer's key; checking
//! it is [`crate::signature`]'s job. See `docs/image-format.md` and `docs/signing.md`.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Skippable-frame magic used for the manifest (any of 0x184D2A50..=0x184D2A5F is skippable).
pub const MANIFEST_FRAME_MAGIC: u32 = 0x184D_2A5E;
/// Skippable-frame magic of the optional signature frame that follows the manifest frame.
pub const SIGNATURE_FRAME_MAGIC: u32 = 0x184D_2A5F;
/// Bytes after the frame header that mark a skippable frame as imprint's signature.
pub const SIGNATURE_TAG: &[u8; 8] = b"IMPRSIG\0";
/// Largest signature frame accepted: a minisign signature is ~300 bytes of text plus its
/// trusted comment.
const MAX_SIGNATURE_LEN: u32 = 64 << 10;
/// Magic of a regular zstd frame.
pub const ZSTD_FRAME_MAGIC: u32 = 0xFD2F_B528;
/// Bytes after the frame header that mark the skippable frame as ours.
pub const MANIFEST_TAG: &[u8; 8] = b"IMPRINT\0";
/// The format name in the manifest.
pub const FORMAT_NAME: &str = "imprint-image";
/// The manifest version this code writes and the newest it reads. Version 2 adds the frame
/// table (`frame_size`, `frames`); version 1 (a payload of one stream, no table) is still read,
/// and is what [`Image::from_raw_file`] describes.
pub const FORMAT_VERSION: u32 = 2;
/// Raw bytes per payload frame `imprint prepare` writes: one write buffer of the engine, so each
/// frame decodes straight into the buffer that goes to the disk.
pub const DEFAULT_FRAME_SIZE: u64 = 4 << 20;
/// Largest frame (raw bytes) a manifest may declare: the write engine decodes a frame into one
/// buffer of this size.
pub const MAX_FRAME_SIZE: u64 = 4 << 20;
/// Default chunk size for chunk digests: verification runs and reports per chunk.
pub const DEFAULT_CHUNK_SIZE: u64 = 16 << 20;
/// Largest manifest frame accepted (a 2 TiB image at 16 MiB chunks is ~9 MiB of JSON).
const MAX_MANIFEST_LEN: u32 = 32 << 20;

/// Partition table found in the raw image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTable {
    /// GUID partition table; `sector_size` is the sector size it was laid out for.
    Gpt,
    /// MBR only (no GPT).
    Mbr,
    /// Neither: a bare filesystem or unknown content.
    None,
}

/// The manifest of an imprint image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version, [`FORMAT_VERSION`].
    pub version: u32,
    /// Human name of the image (e.g. "ubuntu-24.04-server-cloudimg-amd64").
    pub name: String,
    /// Size of the raw disk image in bytes.
    pub raw_size: u64,
    /// Partition table found in the image.
    pub partition_table: PartitionTable,
    /// Logical sector size the image's partition table was laid out for (512 or 4096).
    /// `None` for images without a GPT: they are written to disks of any sector size.
    pub sector_size: Option<u32>,
    /// sha256 of the raw image, lower-case hex.
    pub sha256: String,
    /// Size of each chunk covered by one entry of `chunks` (the last may be shorter).
    pub chunk_size: u64,
    /// sha256 of each chunk of the raw image, in order.
    pub chunks: Vec<String>,
    /// Size of the compressed payload (the zstd frames after the manifest frame).
    pub compressed_size: u64,
    /// sha256 of the compressed payload.
    pub compressed_sha256: String,
    /// Raw bytes each payload frame decodes to (version 2; the last frame may be shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_size: Option<u64>,
    /// Compressed size of each payload frame, in order (version 2): every frame is an
    /// independent zstd frame, so frames decode on several threads, each straight into its
    /// place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<Vec<u64>>,
    /// The tool and version that made the image.
    pub created_by: String,
}

/// Errors reading or validating an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image file could not be opened or read.
    #[error("reading image {path}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The file is a zstd stream but has no imprint manifest.
    #[error(
        "{path} is a plain zstd file without an imprint manifest; run `imprint prepare {path}` to make an imprint image"
    )]
    PlainZstd {
        /// The image file.
        path: PathBuf,
    },
    /// The file is not an imprint image at all.
    #[error(
        "{path} is not an imprint image (it does not start with an imprint manifest frame); run `imprint prepare` on the raw, qcow2, xz, gz or zst disk image first"
    )]
    NotAnImage {
        /// The image file.
        path: PathBuf,
    },
    /// The manifest frame is there but its content is damaged or unsupported.
    #[error("{path}: the image manifest is malformed: {reason}; re-create the image with `imprint prepare`")]
    BadManifest {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is shorter than the manifest says: a truncated download or copy.
    #[error(
        "{path} is truncated: the manifest promises {expected} bytes of payload but the file holds {actual}; copy or download the image again"
    )]
    Truncated {
        /// The image file.
        path: PathBuf,
        /// Payload bytes the manifest promises.
        expected: u64,
        /// Payload bytes present.
        actual: u64,
    },
}

impl Manifest {
    /// Checks the manifest's internal consistency.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT_NAME {
            return Err(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                self.format
            ));
        }
        if self.version == 0 || self.version > FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this imprint reads up to {FORMAT_VERSION}); update imprint",
                self.version
            ));
        }
        if self.raw_size == 0 {
            return Err("raw_size is 0".into());
        }
        if !self.raw_size.is_multiple_of(512) {
            return Err(format!(
                "raw_size {} is not a multiple of 512",
                self.raw_size
            ));
        }
        match (self.partition_table, self.sector_size) {
            (PartitionTable::Gpt, Some(512 | 4096)) => {}
            (PartitionTable::Gpt, other) => {
                return Err(format!(
                    "a GPT image needs sector_size 512 or 4096, not {other:?}"
                ))
            }
            (_, None) => {}
            (_, Some(s)) => return Err(format!("sector_size {s} given for an image without GPT")),
        }
        if let Some(ss) = self.sector_size {
            if !self.raw_size.is_multiple_of(u64::from(ss)) {
                return Err(format!(
                    "raw_size {} is not a multiple of the sector size {ss}",
                    self.raw_size
                ));
            }
        }
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(1 << 20) {
            return Err(format!(
                "chunk_size {} is not a positive multiple of 1 MiB",
                self.chunk_size
            ));
        }
        let expect_chunks = self.raw_size.div_ceil(self.chunk_size);
        if self.chunks.len() as u64 != expect_chunks {
            return Err(format!(
                "{} chunk digests for {} chunks",
                self.chunks.len(),
                expect_chunks
            ));
        }
        for (what, d) in std::iter::once(("sha256", &self.sha256))
            .chain(std::iter::once((
                "compressed_sha256",
                &self.compressed_sha256,
            )))
            .chain(self.chunks.iter().map(|c| ("chunk digest", c)))
        {
            if !is_hex_digest(d) {
                return Err(format!("{what} {d:?} is not a sha256 hex digest"));
            }
        }
        if self.compressed_size == 0 {
            return Err("compressed_size is 0".into());
        }
        self.validate_frames()
    }

    /// The frame table: present exactly in version 2, one entry per `frame_size` bytes of the
    /// raw image, each within what zstd can make of a frame that size, adding up to the
    /// payload. (A table that lies about where frames end is caught while decoding.)
    fn validate_frames(&self) -> Result<(), String> {
        let (fs, frames) = match (self.version, self.frame_size, &self.frames) {
            (1, None, None) => return Ok(()),
            (1, _, _) => return Err("a version 1 manifest has no frame table".into()),
            (_, Some(fs), Some(frames)) => (fs, frames),
            _ => return Err("frame_size and frames are missing".into()),
        };
        if fs == 0 || !fs.is_multiple_of(1 << 20) || fs > MAX_FRAME_SIZE {
            return Err(format!(
                "frame_size {fs} is not a multiple of 1 MiB up to {MAX_FRAME_SIZE}"
            ));
        }
        let expect = self.raw_size.div_ceil(fs);
        if frames.len() as u64 != expect {
            return Err(format!(
                "{} frames listed for {expect} frames of {fs} bytes",
                frames.len()
            ));
        }
        let bound = zstd::zstd_safe::compress_bound(fs as usize) as u64;
        let mut total = 0u64;
        for (k, &len) in frames.iter().enumerate() {
            if len == 0 || len > bound {
                return Err(format!(
                    "frame {k} is {len} bytes, outside 1..={bound} for {fs} raw bytes"
                ));
            }
            total += len;
        }
        if total != self.compressed_size {
            return Err(format!(
                "the frames add up to {total} bytes, compressed_size says {}",
                self.compressed_size
            ));
        }
        Ok(())
    }

    /// The payload's frames as `(compressed length, raw range)`, in order; `None` for a
    /// version 1 payload (one stream).
    pub fn frame_table(&self) -> Option<impl Iterator<Item = (u64, (u64, u64))> + '_> {
        let fs = self.frame_size?;
        let raw = self.raw_size;
        Some(
            self.frames
                .as_ref()?
                .iter()
                .enumerate()
                .map(move |(k, &len)| {
                    let start = k as u64 * fs;
                    (len, (start, (start + fs).min(raw)))
                }),
        )
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Byte range `[start, end)` of chunk `i`.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        let start = i * self.chunk_size;
        (start, (start + self.chunk_size).min(self.raw_size))
    }

    /// The manifest's JSON, exactly as [`Manifest::to_frame`] stores it (and a signature
    /// covers it).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a plain struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Serialises the manifest as its skippable frame.
    pub fn to_frame(&self) -> Vec<u8> {
        skippable_frame(MANIFEST_FRAME_MAGIC, MANIFEST_TAG, &self.to_json())
    }
}

/// The signature frame for a minisign signature `text` of the manifest JSON: it goes right
/// after the manifest frame.
pub fn signature_frame(text: &str) -> Vec<u8> {
    skippable_frame(SIGNATURE_FRAME_MAGIC, SIGNATURE_TAG, text.as_bytes())
}

fn skippable_frame(magic: u32, tag: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let len = (tag.len() + body.len()) as u32;
    let mut frame = Vec::with_capacity(8 + len as usize);
    frame.extend_from_slice(&magic.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(tag);
    frame.extend_from_slice(body);
    frame
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Hashes a stream chunk by chunk: the one implementation of chunk digests, used to make them
/// (`pack`), to check a decoded stream (`write`) and to check a read-back (`verify`).
#[derive(Debug, Clone)]
pub struct ChunkHasher {
    chunk_size: u64,
    index: u64,
    fill: u64,
    hasher: Sha256,
}

impl ChunkHasher {
    /// A hasher for chunks of `chunk_size` bytes.
    pub fn new(chunk_size: u64) -> Self {
        ChunkHasher {
            chunk_size,
            index: 0,
            fill: 0,
            hasher: Sha256::new(),
        }
    }

    /// Feeds `data`; calls `done(index, hex digest)` for each chunk it completes.
    pub fn update<E>(
        &mut self,
        mut data: &[u8],
        done: &mut impl FnMut(u64, String) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            let take = ((self.chunk_size - self.fill) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            self.fill += take as u64;
            data = &data[take..];
            if self.fill == self.chunk_size {
                self.complete(done)?;
            }
        }
        Ok(())
    }

    /// Completes the last, shorter chunk, if any bytes of it were fed.
    pub fn finish<E>(
        mut self,
        done: &mut impl FnMut(u64, String) -> Result<(), E>,
    ) -> Result<u64, E> {
        if self.fill > 0 {
            self.complete(done)?;
        }
        Ok(self.index)
    }

    fn complete<E>(
        &mut self,
        done: &mut impl FnMut(u64, String) -> Result<(), E>,
    ) -> Result<(), E> {
        let digest = hex(&std::mem::take(&mut self.hasher).finalize());
        let i = self.index;
        self.index += 1;
        self.fill = 0;
        done(i, digest)
    }
}

/// An opened, validated imprint image.
#[derive(Debug)]
pub struct Image {
    /// The file's path, or the URL (redacted) of an image opened with `Image::open_url`.
    path: PathBuf,
    source: Source,
    manifest: Manifest,
    /// The manifest's JSON exactly as stored: what a signature covers.
    manifest_bytes: Vec<u8>,
    /// The minisign signature text from the signature frame, if the image is signed.
    signature: Option<String>,
    payload_offset: u64,
    /// The payload is the raw image itself, not zstd ([`Image::from_raw_file`]).
    raw: bool,
    /// The sha256 the whole image file must have ([`Image::expect_file_sha256`]).
    file_sha256: Option<String>,
}

/// Where an image's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    File,
    #[cfg(feature = "remote")]
    Remote(std::sync::Arc<crate::remote::Remote>),
}

/// What [`read_header`] found: everything before the payload.
struct Header {
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature: Option<String>,
    payload_offset: u64,
}

/// Reads and validates the manifest frame and the optional signature frame from the start of
/// an image of `file_len` bytes, strictly in order (a file and an HTTP stream read the same
/// way). `slack_ok`: bytes after the payload are allowed (a block device larger than its image).
fn read_header(
    file: &mut dyn Read,
    file_len: u64,
    slack_ok: bool,
    path: &Path,
) -> Result<Header, ImageError> {
    let io_err = |source| ImageError::Io {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 16];
    let got = read_full(file, &mut head).map_err(io_err)?;
    if got < 4 {
        return Err(ImageError::NotAnImage {
            path: path.to_owned(),
        });
    }
    let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if magic == ZSTD_FRAME_MAGIC {
        return Err(ImageError::PlainZstd {
            path: path.to_owned(),
        });
    }
    if magic != MANIFEST_FRAME_MAGIC || got < 16 || &head[8..16] != MANIFEST_TAG {
        return Err(ImageError::NotAnImage {
            path: path.to_owned(),
        });
    }
    let bad = |reason: String| ImageError::BadManifest {
        path: path.to_owned(),
        reason,
    };
    let frame_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(MANIFEST_TAG.len() as u32..=MAX_MANIFEST_LEN).contains(&frame_len) {
        return Err(bad(format!(
            "manifest frame length {frame_len} is out of range"
        )));
    }
    let mut payload_offset = 8 + u64::from(frame_len);
    if payload_offset > file_len {
        return Err(bad(format!(
            "manifest frame of {frame_len} bytes runs past the end of the {file_len}-byte file"
        )));
    }
    let mut json = vec![0u8; frame_len as usize - MANIFEST_TAG.len()];
    file.read_exact(&mut json).map_err(io_err)?;
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| bad(format!("manifest JSON: {e}")))?;
    manifest.validate().map_err(bad)?;
    // An optional signature frame follows. The payload starts with a regular zstd frame, so
    // its magic cannot be mistaken for ours; a frame of ours that is damaged is an error,
    // not silently skipped (that would turn a signed image into an unsigned one).
    let mut next = [0u8; 16];
    let got = read_full(file, &mut next).map_err(io_err)?;
    let signature = if got >= 4
        && u32::from_le_bytes([next[0], next[1], next[2], next[3]]) == SIGNATURE_FRAME_MAGIC
    {
        if got < 16 || &next[8..16] != SIGNATURE_TAG {
            return Err(bad(
                "a skippable frame after the manifest is not an imprint signature frame".into(),
            ));
        }
        let sig_len = u32::from_le_bytes([next[4], next[5], next[6], next[7]]);
        if !(SIGNATURE_TAG.len() as u32 + 1..=MAX_SIGNATURE_LEN).contains(&sig_len) {
            return Err(bad(format!(
                "signature frame length {sig_len} is out of range"
            )));
        }
        let sig_end = payload_offset + 8 + u64::from(sig_len);
        if sig_end > file_len {
            return Err(bad(format!(
                "signature frame of {sig_len} bytes runs past the end of the {file_len}-byte file"
            )));
        }
        // The 16 bytes just read are the frame's header and tag: the text follows.
        let mut text = vec![0u8; sig_len as usize - SIGNATURE_TAG.len()];
        file.read_exact(&mut text).map_err(io_err)?;
        let text = String::from_utf8(text)
            .map_err(|_| bad("the signature frame is not UTF-8 text".into()))?;
        payload_offset = sig_end;
        Some(text)
    } else {
        None
    };
    let actual = file_len - payload_offset;
    if actual < manifest.compressed_size {
        return Err(ImageError::Truncated {
            path: path.to_owned(),
            expected: manifest.compressed_size,
            actual,
        });
    }
    if actual > manifest.compressed_size && !slack_ok {
        return Err(bad(format!(
            "the file holds {} bytes after the manifest, {} more than its compressed_size; \
             the file was appended to or the manifest does not belong to it",
            actual,
            actual - manifest.compressed_size
        )));
    }
    Ok(Header {
        manifest,
        manifest_bytes: json,
        signature,
        payload_offset,
    })
}

impl Image {
    /// Opens an image, reads and validates its manifest, and checks that the payload is all
    /// there. Nothing about the target is touched here: a bad image is refused before any write.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let io_err = |source| ImageError::Io {
            path: path.to_owned(),
            source,
        };
        // A FIFO or character device would hang or never end: refused before reading.
        let mut file = crate::input::open_regular(path, true).map_err(io_err)?;
        // A block device (the stick's payload partition) reports length 0 in its metadata and
        // is usually larger than the image it holds: measure it by seeking, allow slack after.
        let is_block = {
            use std::os::unix::fs::FileTypeExt;
            file.metadata()
                .map_err(io_err)?
                .file_type()
                .is_block_device()
        };
        let file_len = file.seek(SeekFrom::End(0)).map_err(io_err)?;
        file.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let h = read_header(&mut file, file_len, is_block, path)?;
        Ok(Image {
            path: path.to_owned(),
            source: Source::File,
            manifest: h.manifest,
            manifest_bytes: h.manifest_bytes,
            signature: h.signature,
            payload_offset: h.payload_offset,
            raw: false,
            file_sha256: None,
        })
    }

    /// Opens an image at an `http://` (or with the `https` feature, `https://`) URL: reads
    /// and validates its manifest from the first bytes, like [`Image::open`]. The payload is
    /// fetched later, by [`Image::payload`] and [`Image::raw_reader`], through a resumable
    /// reader pinned to the same file ([`crate::remote`]). Errors name the URL with its
    /// credentials and query string redacted.
    #[cfg(feature = "remote")]
    pub fn open_url(url: &str, opts: crate::remote::RemoteOptions) -> Result<Image, ImageError> {
        use crate::remote::Remote;
        use std::sync::Arc;
        let shown = PathBuf::from(crate::remote::redact_url(url));
        let io_err = |source| ImageError::Io {
            path: shown.clone(),
            source,
        };
        let remote = Arc::new(Remote::new(url, opts).map_err(|e| io_err(io::Error::other(e)))?);
        let mut head = remote.reader(0, None);
        // The first read pins the file's length and validator.
        let mut first = [0u8; 16];
        let got = read_full(&mut head, &mut first).map_err(io_err)?;
        let file_len = remote.len().unwrap_or(got as u64);
        let h = read_header(&mut (&first[..got]).chain(head), file_len, false, &shown)?;
        Ok(Image {
            path: shown,
            source: Source::Remote(remote),
            manifest: h.manifest,
            manifest_bytes: h.manifest_bytes,
            signature: h.signature,
            payload_offset: h.payload_offset,
            raw: false,
            file_sha256: None,
        })
    }

    /// Requires the whole image file (manifest, signature and payload frames) to have this
    /// sha256 (as `sha256sum` prints it): every read of the payload to its end checks it
    /// before it reports the end, so a write fails before its commit on a mismatch.
    pub fn expect_file_sha256(&mut self, hex_digest: &str) -> Result<(), ImageError> {
        let d = hex_digest.trim().to_ascii_lowercase();
        if !is_hex_digest(&d) {
            return Err(ImageError::BadManifest {
                path: self.path.clone(),
                reason: format!(
                    "--sha256 {:?} is not a sha256 hex digest (64 hex digits)",
                    hex_digest.escape_debug().to_string()
                ),
            });
        }
        self.file_sha256 = Some(d);
        Ok(())
    }

    /// A reader of the image's bytes from `offset` to `end` (or the end of the file).
    fn open_range(
        &self,
        offset: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn Read + Send>, ImageError> {
        let io_err = |source| ImageError::Io {
            path: self.path.clone(),
            source,
        };
        match &self.source {
            Source::File => {
                let mut f = File::open(&self.path).map_err(io_err)?;
                f.seek(SeekFrom::Start(offset)).map_err(io_err)?;
                let r = BufReader::with_capacity(1 << 20, f);
                Ok(match end {
                    Some(e) => Box::new(r.take(e.saturating_sub(offset))),
                    None => Box::new(r),
                })
            }
            #[cfg(feature = "remote")]
            Source::Remote(remote) => Ok(Box::new(BufReader::with_capacity(
                1 << 20,
                remote.reader(offset, end),
            ))),
        }
    }

    /// Treats a raw disk image file as an image, computing its manifest by reading it once:
    /// lets the engine write files that never were prepared (`imprint flash` writes the stick
    /// image it just built) with every guarantee of a prepared image.
    pub fn from_raw_file(path: &Path, name: &str) -> Result<Image, ImageError> {
        let io_err = |source| ImageError::Io {
            path: path.to_owned(),
            source,
        };
        let mut f = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err)?);
        let mut seen = Seen::new(DEFAULT_CHUNK_SIZE);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = read_full(&mut f, &mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            seen.take(&buf[..n]);
        }
        let Digests {
            sha256: digest,
            chunks,
            raw_size,
            head,
        } = seen.finish();
        let (partition_table, sector_size) = detect_partition_table(&head);
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            version: 1,
            name: name.into(),
            raw_size,
            partition_table,
            sector_size,
            sha256: digest.clone(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunks,
            compressed_size: raw_size,
            compressed_sha256: digest,
            frame_size: None,
            frames: None,
            created_by: concat!("imprint ", env!("CARGO_PKG_VERSION")).into(),
        };
        manifest
            .validate()
            .map_err(|reason| ImageError::BadManifest {
                path: path.to_owned(),
                reason,
            })?;
        Ok(Image {
            path: path.to_owned(),
            source: Source::File,
            manifest_bytes: manifest.to_json(),
            manifest,
            signature: None,
            payload_offset: 0,
            raw: true,
            file_sha256: None,
        })
    }

    /// The image's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's JSON exactly as stored in the image: the bytes a signature covers.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The minisign signature text of a signed image, `None` for an unsigned one. Not checked
    /// here: [`crate::signature::verify_image_signature`] does that against trusted keys.
    pub fn signature(&self) -> Option<&str> {
        self.signature.as_deref()
    }

    /// The image file's path; for an image opened with `Image::open_url`, its URL with
    /// credentials and query string redacted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Offset of the first zstd frame of the payload (after the manifest and signature frames).
    pub fn payload_offset(&self) -> u64 {
        self.payload_offset
    }

    /// A reader of the compressed payload (exactly `compressed_size` bytes). With
    /// [`Image::expect_file_sha256`], reading it to its end fails instead of ending if the
    /// whole file's digest differs.
    pub fn payload(&self) -> Result<Box<dyn Read + Send>, ImageError> {
        let end = self.payload_offset + self.manifest.compressed_size;
        let payload = self.open_range(self.payload_offset, Some(end))?;
        let Some(expected) = &self.file_sha256 else {
            return Ok(payload);
        };
        // The frames before the payload are small: hash them now, the payload as it passes.
        let mut hasher = Sha256::new();
        let mut head = self.open_range(0, Some(self.payload_offset))?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = head.read(&mut buf).map_err(|source| ImageError::Io {
                path: self.path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Box::new(DigestCheck {
            inner: payload,
            hasher,
            expected: expected.clone(),
            shown: self.path.display().to_string(),
            done: false,
        }))
    }

    /// A reader of the decoded raw image. The caller must check it yields exactly `raw_size`
    /// bytes followed by a clean end (see [`crate::write`]); zstd checks each frame's checksum.
    pub fn raw_reader(&self) -> Result<Box<dyn Read + Send>, ImageError> {
        let payload = self.payload()?;
        if self.raw {
            return Ok(Box::new(payload));
        }
        // zstd decodes straight out of this buffer (`with_buffer`), not out of a buffer of its
        // own filled from ours: one copy of the whole payload fewer. The payload's own 1 MiB
        // buffer is bypassed for reads this large.
        let dec =
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(1 << 20, payload))
                .map_err(|source| ImageError::Io {
                    path: self.path.clone(),
                    source,
                })?;
        Ok(Box::new(dec))
    }

    /// Reads the whole compressed payload and checks its sha256 against the manifest: a fast
    /// pre-flight check (reading the stick, no decoding) that catches a damaged payload before
    /// the target is touched.
    pub fn check_payload_digest(&self) -> Result<(), ImageError> {
        let mut r = self.payload()?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(|source| ImageError::Io {
                path: self.path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = hex(&hasher.finalize());
        if got != self.manifest.compressed_sha256 {
            return Err(ImageError::BadManifest {
                path: self.path.clone(),
                reason: format!(
                    "the compressed payload's sha256 is {got}, the manifest says {}: the payload is corrupted",
                    self.manifest.compressed_sha256
                ),
            });
        }
        Ok(())
    }
}

/// The whole file's sha256 did not match `--sha256`.
#[derive(Debug, thiserror::Error)]
#[error("{shown}: the image file's sha256 is {actual}, expected {expected} (--sha256); it is not the file you meant, or it is damaged")]
pub struct FileDigestMismatch {
    /// The image (path or redacted URL).
    pub shown: String,
    /// The digest asked for.
    pub expected: String,
    /// The digest of what was read.
    pub actual: String,
}

/// Hashes what passes; at the end, fails unless the digest is the expected one.
struct DigestCheck {
    inner: Box<dyn Read + Send>,
    hasher: Sha256,
    expected: String,
    shown: String,
    done: bool,
}

impl Read for DigestCheck {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 || buf.is_empty() {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        if !self.done {
            let actual = hex(&self.hasher.clone().finalize());
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    FileDigestMismatch {
                        shown: self.shown.clone(),
                        expected: self.expected.clone(),
                        actual,
                    },
                ));
            }
            self.done = true;
        }
        Ok(0)
    }
}

/// Reads until `buf` is full or the reader ends; returns how much was read.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Finds the partition table of a raw image from its first 8 KiB: a GPT header ("EFI PART") at
/// LBA 1 of a 512-byte or a 4096-byte layout, else an MBR boot signature.
pub fn detect_partition_table(head: &[u8]) -> (PartitionTable, Option<u32>) {
    for ss in [512usize, 4096] {
        if head.len() >= ss + 8 && &head[ss..ss + 8] == b"EFI PART" {
            return (PartitionTable::Gpt, Some(ss as u32));
        }
    }
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA {
        return (PartitionTable::Mbr, None);
    }
    (PartitionTable::None, None)
}

/// Options for [`pack`].
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Image name recorded in the manifest.
    pub name: String,
    /// zstd level (1–22).
    pub level: i32,
    /// Compression threads (frames: 0 counts as 1; one stream: 0 = in the caller's thread).
    pub threads: u32,
    /// Chunk size of the chunk digests.
    pub chunk_size: u64,
    /// Raw bytes per payload frame ([`DEFAULT_FRAME_SIZE`]; up to [`MAX_FRAME_SIZE`]): a
    /// version 2 image whose frames decode in parallel. `None` writes a version 1 image, one
    /// zstd stream (`imprint prepare --one-stream`: smaller, decoded on one thread).
    pub frame_size: Option<u64>,
}

/// Errors while packing an image.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading the raw input failed.
    #[error("reading the raw image")]
    Read(#[source] io::Error),
    /// Writing the output failed.
    #[error("writing {path}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The raw input is not a disk image imprint can write.
    #[error("the raw image is not usable: {0}")]
    Input(String),
    /// The signer could not sign the manifest.
    #[error("signing the manifest")]
    Sign(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Signs a manifest: given its exact JSON bytes, returns the minisign signature text that
/// [`pack_signed`] stores in the signature frame.
pub type Signer<'a> =
    &'a mut dyn FnMut(&[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>>;

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What reading a raw image learns from its bytes as they pass (packing it, or taking a raw
/// file as an image): the digests and the first sectors.
struct Seen {
    total: Sha256,
    chunker: ChunkHasher,
    chunks: Vec<String>,
    raw_size: u64,
    /// The first 8 KiB, for [`detect_partition_table`].
    head: Vec<u8>,
}

impl Seen {
    fn new(chunk_size: u64) -> Seen {
        Seen {
            total: Sha256::new(),
            chunker: ChunkHasher::new(chunk_size),
            chunks: Vec::new(),
            raw_size: 0,
            head: Vec::with_capacity(8192),
        }
    }

    fn take(&mut self, data: &[u8]) {
        if self.head.len() < 8192 {
            let take = (8192 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
        }
        self.total.update(data);
        let chunks = &mut self.chunks;
        let _ = self.chunker.update(data, &mut |_, d| {
            chunks.push(d);
            Ok::<(), ()>(())
        });
        self.raw_size += data.len() as u64;
    }

    /// The digests once every byte went through [`Seen::take`].
    fn finish(self) -> Digests {
        let Seen {
            total,
            chunker,
            mut chunks,
            raw_size,
            head,
        } = self;
        let _ = chunker.finish(&mut |_, d| {
            chunks.push(d);
            Ok::<(), ()>(())
        });
        Digests {
            sha256: hex(&total.finalize()),
            chunks,
            raw_size,
            head,
        }
    }
}

/// What [`Seen`] learnt from a whole raw image.
struct Digests {
    /// sha256 of the whole image, hex.
    sha256: String,
    /// sha256 of each chunk, hex.
    chunks: Vec<String>,
    raw_size: u64,
    /// The first 8 KiB.
    head: Vec<u8>,
}

/// A version 1 payload: one zstd stream (multithreaded zstd with `opts.threads`).
fn compress_stream<W: Write>(
    raw: &mut dyn Read,
    (out, path): (W, &Path),
    opts: &PackOptions,
    seen: &mut Seen,
    on_progress: &mut dyn FnMut(u64),
) -> Result<(), PackError> {
    let werr = |source| PackError::Write {
        path: path.to_owned(),
        source,
    };
    let mut enc = zstd::stream::write::Encoder::new(out, opts.level).map_err(werr)?;
    enc.include_checksum(true).map_err(werr)?;
    if opts.threads > 0 {
        enc.multithread(opts.threads).map_err(werr)?;
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_full(raw, &mut buf).map_err(PackError::Read)?;
        if n == 0 {
            break;
        }
        seen.take(&buf[..n]);
        enc.write_all(&buf[..n]).map_err(werr)?;
        on_progress(seen.raw_size);
    }
    enc.finish().map_err(werr)?;
    Ok(())
}

/// A version 2 payload: one independent zstd frame (content size and checksum in it) per
/// `frame_size` raw bytes, compressed on `opts.threads` threads (at least one) and written in
/// order. Returns each frame's compressed size.
fn compress_frames<W: Write + Send>(
    raw: &mut dyn Read,
    (out, path): (&mut W, &Path),
    frame_size: u64,
    opts: &PackOptions,
    seen: &mut Seen,
    on_progress: &mut dyn FnMut(u64),
) -> Result<Vec<u64>, PackError> {
    let werr = |source| PackError::Write {
        path: path.to_owned(),
        source,
    };
    let threads = (opts.threads as usize).max(1);
    let mut read_error = None;
    let mut write_error = None;
    let mut sizes = Vec::new();
    let items = std::iter::from_fn(|| {
        let mut buf = vec![0u8; frame_size as usize];
        match read_full(raw, &mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                seen.take(&buf);
                on_progress(seen.raw_size);
                Some(buf)
            }
            Err(e) => {
                read_error = Some(e);
                None
            }
        }
    });
    let level = opts.level;
    crate::ordered::map_in_order(
        items,
        threads,
        threads,
        || -> io::Result<zstd::bulk::Compressor<'static>> {
            let mut c = zstd::bulk::Compressor::new(level)?;
            c.include_checksum(true)?;
            c.include_contentsize(true)?;
            Ok(c)
        },
        |c, data: Vec<u8>| match c {
            Ok(c) => c.compress(&data),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        },
        |frame| match frame.and_then(|f| {
            out.write_all(&f)?;
            Ok(f.len() as u64)
        }) {
            Ok(n) => {
                sizes.push(n);
                true
            }
            Err(e) => {
                write_error = Some(e);
                false
            }
        },
    );
    if let Some(e) = read_error {
        return Err(PackError::Read(e));
    }
    if let Some(e) = write_error {
        return Err(werr(e));
    }
    out.flush().map_err(werr)?;
    Ok(sizes)
}

/// Compresses a raw disk image into an imprint image at `out`, returning its manifest.
///
/// The payload is compressed into a fresh `.OUT.…payload.partial` beside it first (the manifest needs its size and
/// digests), then a fresh `.OUT.…partial` gets the manifest frame and the payload, and is renamed to `OUT`
/// only when complete: an interrupted run never leaves a file that looks like a finished image.
/// `on_progress` is called with the raw bytes consumed so far.
pub fn pack(
    raw: &mut dyn Read,
    out: &Path,
    opts: &PackOptions,
    on_progress: &mut dyn FnMut(u64),
) -> Result<Manifest, PackError> {
    pack_signed(raw, out, opts, None, on_progress)
}

/// Like [`pack`], and with a `signer` the manifest JSON is signed and the signature frame
/// written right after the manifest frame, before the partial file is renamed: a signed image
/// never exists unsigned under its final name.
pub fn pack_signed(
    raw: &mut dyn Read,
    out: &Path,
    opts: &PackOptions,
    signer: Option<Signer<'_>>,
    on_progress: &mut dyn FnMut(u64),
) -> Result<Manifest, PackError> {
    // Fresh, exclusively created names in the output's folder: a file or a symbolic link
    // someone put at `OUT.partial` is never opened, let alone followed.
    let werr = |source| PackError::Write {
        path: out.to_owned(),
        source,
    };
    let (payload_path, payload_file) =
        crate::input::create_beside(out, "payload.partial").map_err(werr)?;
    let (partial_path, partial_file) = match crate::input::create_beside(out, "partial") {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&payload_path);
            crate::input::unregister_temporary(&payload_path);
            return Err(werr(e));
        }
    };
    let result = pack_inner(
        raw,
        out,
        (&payload_path, payload_file),
        (&partial_path, partial_file),
        opts,
        signer,
        on_progress,
    );
    let _ = std::fs::remove_file(&payload_path);
    if result.is_err() {
        let _ = std::fs::remove_file(&partial_path);
    }
    crate::input::unregister_temporary(&payload_path);
    crate::input::unregister_temporary(&partial_path);
    result
}

fn pack_inner(
    raw: &mut dyn Read,
    out: &Path,
    (payload_path, payload_file): (&Path, File),
    (partial_path, mut outf): (&Path, File),
    opts: &PackOptions,
    signer: Option<Signer<'_>>,
    on_progress: &mut dyn FnMut(u64),
) -> Result<Manifest, PackError> {
    let werr = |path: &Path| {
        let path = path.to_owned();
        move |source| PackError::Write { path, source }
    };
    let mut hw = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, payload_file),
        hasher: Sha256::new(),
        count: 0,
    };
    let mut seen = Seen::new(opts.chunk_size);
    let frames = match opts.frame_size {
        Some(fs) => Some(compress_frames(
            raw,
            (&mut hw, payload_path),
            fs,
            opts,
            &mut seen,
            on_progress,
        )?),
        None => {
            compress_stream(raw, (&mut hw, payload_path), opts, &mut seen, on_progress)?;
            None
        }
    };
    let Digests {
        sha256,
        chunks,
        raw_size,
        head,
    } = seen.finish();
    if raw_size == 0 {
        return Err(PackError::Input("the input is empty".into()));
    }
    let (partition_table, sector_size) = detect_partition_table(&head);
    let unit = u64::from(sector_size.unwrap_or(512));
    if !raw_size.is_multiple_of(unit) {
        return Err(PackError::Input(format!(
            "its size, {raw_size} bytes, is not a multiple of its {unit}-byte sector size: not a disk image, or truncated"
        )));
    }
    let HashingWriter {
        inner,
        hasher,
        count,
    } = hw;
    let payload_file = inner.into_inner().map_err(|e| PackError::Write {
        path: payload_path.to_owned(),
        source: e.into_error(),
    })?;
    payload_file.sync_all().map_err(werr(payload_path))?;
    drop(payload_file);

    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: if frames.is_some() { FORMAT_VERSION } else { 1 },
        name: opts.name.clone(),
        raw_size,
        partition_table,
        sector_size,
        sha256,
        chunk_size: opts.chunk_size,
        chunks,
        compressed_size: count,
        compressed_sha256: hex(&hasher.finalize()),
        frame_size: frames.as_ref().and(opts.frame_size),
        frames,
        created_by: concat!("imprint ", env!("CARGO_PKG_VERSION")).into(),
    };
    manifest.validate().map_err(PackError::Input)?;
    // Sign the very bytes the frame stores.
    let json = manifest.to_json();
    let sig_frame = match signer {
        Some(sign) => Some(signature_frame(&sign(&json).map_err(PackError::Sign)?)),
        None => None,
    };

    outf.write_all(&skippable_frame(MANIFEST_FRAME_MAGIC, MANIFEST_TAG, &json))
        .map_err(werr(partial_path))?;
    if let Some(frame) = &sig_frame {
        outf.write_all(frame).map_err(werr(partial_path))?;
    }
    let mut payload = File::open(payload_path).map_err(werr(payload_path))?;
    // std::io::copy uses copy_file_range between files on Linux.
    io::copy(&mut payload, &mut outf).map_err(werr(partial_path))?;
    outf.sync_all().map_err(werr(partial_path))?;
    drop(outf);
    std::fs::rename(partial_path, out).map_err(werr(out))?;
    Ok(manifest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// Builds a GPT-looking raw image: a protective MBR, "EFI PART" at LBA 1 of the given sector
    /// size, some data and some zero runs.
    pub(crate) fn fake_gpt_raw(size: usize, ss: usize) -> Vec<u8> {
        let mut v = vec![0u8; size];
        v[510] = 0x55;
        v[511] = 0xAA;
        v[ss..ss + 8].copy_from_slice(b"EFI PART");
        let mut x = 0x1234_5678u32;
        for (i, b) in v.iter_mut().enumerate().skip(2 * ss) {
            // Alternate 1 MiB of pseudo-random data and 1 MiB of zeros.
            if (i >> 20) % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
        }
        // A real GPT over it (protective MBR, both headers, one partition), as the write
        // engine checks the image's table before writing.
        let first = if size >= 4 << 20 {
            1u64 << 20
        } else {
            64 << 10
        } / ss as u64;
        let len = (size / ss) as u64 - first - (64 << 10) / ss as u64;
        let disk_guid = Some(uuid::Uuid::from_u128(0x1234));
        crate::test_util::with_gpt(v, ss as u32, disk_guid, |g| {
            g.add_partition_at("data", 1, first, len, gpt::partition_types::LINUX_FS, 0)
                .unwrap();
        })
    }

    /// Packs `raw` as a version 2 image with 1 MiB frames.
    pub(crate) fn pack_bytes(raw: &[u8], out: &Path) -> Manifest {
        pack_bytes_framed(raw, out, Some(1 << 20))
    }

    /// Packs `raw` with frames of `frame_size` (version 2), or as one stream (`None`,
    /// version 1).
    pub(crate) fn pack_bytes_framed(raw: &[u8], out: &Path, frame_size: Option<u64>) -> Manifest {
        let opts = PackOptions {
            name: "test".into(),
            level: 3,
            threads: 2,
            chunk_size: 1 << 20,
            frame_size,
        };
        pack(&mut &raw[..], out, &opts, &mut |_| {}).unwrap()
    }

    #[test]
    fn round_trip_with_plain_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(5 << 20, 512);
        let out = dir.path().join("a.img.zst");
        let m = pack_bytes(&raw, &out);
        assert_eq!(m.raw_size, raw.len() as u64);
        assert_eq!(m.sector_size, Some(512));
        assert_eq!(m.partition_table, PartitionTable::Gpt);
        assert_eq!(m.chunks.len(), 5);
        // Plain zstd decoding skips the manifest frame and yields the raw image.
        let decoded = zstd::stream::decode_all(File::open(&out).unwrap()).unwrap();
        assert_eq!(decoded, raw);
        let img = Image::open(&out).unwrap();
        assert_eq!(img.manifest(), &m);
        img.check_payload_digest().unwrap();
        let mut back = Vec::new();
        img.raw_reader().unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, raw);
    }

    /// `prepare`'s payload is one independent zstd frame per `frame_size` raw bytes (the last
    /// shorter), each with its content size, listed in the manifest; each decodes on its own
    /// to its part of the image, plain zstd decodes them all as one, and the bytes do not
    /// depend on how many threads compressed them.
    #[test]
    fn frames_decode_on_their_own_to_their_part_and_together_to_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw((5 << 20) + (512 << 10), 512);
        for (frame_size, count) in [(1u64 << 20, 6usize), (4 << 20, 2)] {
            let mut files = Vec::new();
            for threads in [1, 3] {
                let out = dir.path().join(format!("f-{frame_size}-{threads}.img.zst"));
                let opts = PackOptions {
                    name: "frames".into(),
                    level: 3,
                    threads,
                    chunk_size: 1 << 20,
                    frame_size: Some(frame_size),
                };
                let m = pack(&mut &raw[..], &out, &opts, &mut |_| {}).unwrap();
                assert_eq!(m.version, 2);
                assert_eq!(m.frame_size, Some(frame_size));
                let table: Vec<_> = m.frame_table().unwrap().collect();
                assert_eq!(table.len(), count);
                let bytes = std::fs::read(&out).unwrap();
                let mut at = bytes.len() - m.compressed_size as usize;
                for (k, (len, (start, end))) in table.into_iter().enumerate() {
                    let frame = &bytes[at..at + len as usize];
                    assert_eq!(
                        zstd::zstd_safe::find_frame_compressed_size(frame),
                        Ok(len as usize),
                        "frame {k}"
                    );
                    assert_eq!(
                        zstd::zstd_safe::get_frame_content_size(frame).ok(),
                        Some(Some(end - start)),
                        "frame {k}"
                    );
                    let alone = zstd::bulk::decompress(frame, (end - start) as usize).unwrap();
                    assert!(alone == raw[start as usize..end as usize], "frame {k}");
                    at += len as usize;
                }
                assert_eq!(at, bytes.len());
                let decoded = zstd::stream::decode_all(&bytes[..]).unwrap();
                assert!(decoded == raw);
                files.push(bytes);
            }
            assert!(
                files[0] == files[1],
                "1 and 3 threads made different images"
            );
        }
        // Without frames: version 1, one stream, no table.
        let out = dir.path().join("v1.img.zst");
        let m = pack_bytes_framed(&raw, &out, None);
        assert_eq!((m.version, &m.frame_size, &m.frames), (1, &None, &None));
        assert!(m.frame_table().is_none());
        assert!(!String::from_utf8(m.to_json()).unwrap().contains("frame"));
        assert!(zstd::stream::decode_all(File::open(&out).unwrap()).unwrap() == raw);
    }

    #[test]
    fn frame_tables_that_cannot_describe_the_payload_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(5 << 20, 512);
        let good = pack_bytes(&raw, &dir.path().join("a.img.zst"));
        good.validate().unwrap();
        let bound = zstd::zstd_safe::compress_bound(1 << 20) as u64;
        type Change = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "a version 1 manifest has no frame table",
                Box::new(|m| m.version = 1),
            ),
            (
                "format version 3 is not supported (this imprint reads up to 2); update imprint",
                Box::new(|m| m.version = 3),
            ),
            (
                "frame_size and frames are missing",
                Box::new(|m| m.frames = None),
            ),
            (
                "frame_size and frames are missing",
                Box::new(|m| m.frame_size = None),
            ),
            (
                "frame_size 1572864 is not a multiple of 1 MiB",
                Box::new(|m| m.frame_size = Some(3 << 19)),
            ),
            (
                "frame_size 8388608 is not a multiple of 1 MiB up to 4194304",
                Box::new(|m| m.frame_size = Some(8 << 20)),
            ),
            (
                "4 frames listed for 5 frames",
                Box::new(|m| {
                    m.frames.as_mut().unwrap().pop();
                }),
            ),
            (
                "frame 0 is 0 bytes",
                Box::new(|m| m.frames.as_mut().unwrap()[0] = 0),
            ),
            (
                "outside 1..=",
                Box::new(move |m| m.frames.as_mut().unwrap()[1] = bound + 1),
            ),
            (
                "the frames add up to",
                Box::new(|m| m.frames.as_mut().unwrap()[2] += 1),
            ),
        ];
        for (want, change) in cases {
            let mut m = good.clone();
            change(&mut m);
            let e = m.validate().unwrap_err();
            assert!(e.contains(want), "{want:?}: {e}");
        }
    }

    #[test]
    fn detects_4k_gpt() {
        let dir = tempfile::tempdir().unwrap();
        let raw = fake_gpt_raw(3 << 20, 4096);
        let m = pack_bytes(&raw, &dir.path().join("b.img.zst"));
        assert_eq!(m.sector_size, Some(4096));
    }

    #[test]
    fn refuses_plain_zstd_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let z = dir.path().join("plain.zst");
        std::fs::write(&z, zstd::stream::encode_all(&[0u8; 4096][..], 3).unwrap()).unwrap();
        assert!(matches!(Image::open(&z), Err(ImageError::PlainZstd { .. })));
        let g = dir.path().join("garbage.img");
        std::fs::write(&g, b"hello world, not an image").unwrap();
        let e = Image::open(&g).unwrap_err();
        assert!(matches!(e, ImageError::NotAnImage { .. }));
        assert!(e.to_string().contains("imprint prepare"));
    }

    #[test]
    fn refuses_truncated_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.img.zst");
        pack_bytes(&fake_gpt_raw(2 << 20, 512), &out);
        let full = std::fs::read(&out).unwrap();
        std::fs::write(&out, &full[..full.len() - 10]).unwrap();
        assert!(matches!(
            Image::open(&out),
            Err(ImageError::Truncated { .. })
        ));
        let mut longer = full.clone();
        longer.extend_from_slice(b"junk");
        std::fs::write(&out, &longer).unwrap();
        assert!(matches!(
            Image::open(&out),
            Err(ImageError::BadManifest { .. })
        ));
    }

    #[test]
    fn refuses_corrupt_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.img.zst");
        pack_bytes(&fake_gpt_raw(2 << 20, 512), &out);
        let mut bytes = std::fs::read(&out).unwrap();
        // Flip a byte inside the JSON.
        bytes[20] ^= 0x55;
        std::fs::write(&out, &bytes).unwrap();
        assert!(matches!(
            Image::open(&out),
            Err(ImageError::BadManifest { .. })
        ));
    }

    #[test]
    fn payload_digest_catches_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("e.img.zst");
        let m = pack_bytes(&fake_gpt_raw(4 << 20, 512), &out);
        let mut bytes = std::fs::read(&out).unwrap();
        let off = bytes.len() - (m.compressed_size as usize) / 2;
        bytes[off] ^= 0x01;
        std::fs::write(&out, &bytes).unwrap();
        let img = Image::open(&out).unwrap();
        assert!(img.check_payload_digest().is_err());
    }

    #[test]
    fn refuses_unaligned_raw() {
        let dir = tempfile::tempdir().unwrap();
        let raw = vec![1u8; 1000];
        for frame_size in [None, Some(1 << 20)] {
            let opts = PackOptions {
                name: "x".into(),
                level: 1,
                threads: 0,
                chunk_size: 1 << 20,
                frame_size,
            };
            let out = dir.path().join("f.img.zst");
            let e = pack(&mut &raw[..], &out, &opts, &mut |_| {}).unwrap_err();
            assert!(e.to_string().contains("multiple"), "{e}");
            // Nothing left behind: no image, no temporary file.
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }
}

/// Property tests: whatever bytes an image file holds, opening it never panics, never
/// allocates more than the format allows, and anything it accepts is a consistent manifest.
/// `PROPTEST_CASES=100000 cargo test -p imprint-core proptests` runs them longer.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proptests {
    use super::tests::{fake_gpt_raw, pack_bytes};
    use super::*;
    use proptest::prelude::*;

    fn valid_image() -> Vec<u8> {
        static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        IMAGE
            .get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let out = dir.path().join("p.img.zst");
                pack_bytes(&fake_gpt_raw(1 << 20, 512), &out);
                std::fs::read(&out).unwrap()
            })
            .clone()
    }

    fn open_bytes(bytes: &[u8]) -> Result<Image, ImageError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.img.zst");
        std::fs::write(&p, bytes).unwrap();
        Image::open(&p)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::test_util::proptest_cases(256), ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = open_bytes(&bytes);
        }

        #[test]
        fn arbitrary_manifest_frames_are_refused_or_consistent(
            len in 0u32..u32::MAX,
            json in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut b = MANIFEST_FRAME_MAGIC.to_le_bytes().to_vec();
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(MANIFEST_TAG);
            b.extend_from_slice(&json);
            if let Ok(img) = open_bytes(&b) {
                prop_assert!(img.manifest().validate().is_ok());
            }
        }

        #[test]
        fn corrupted_valid_images_are_refused_or_consistent(
            flips in proptest::collection::vec((0usize..2048, any::<u8>()), 1..8),
        ) {
            let mut b = valid_image();
            for (at, x) in flips {
                let i = at % b.len();
                b[i] ^= x | 1;
            }
            if let Ok(img) = open_bytes(&b) {
                prop_assert!(img.manifest().validate().is_ok());
                // The payload digest then decides; it must not panic either.
                let _ = img.check_payload_digest();
            }
        }
    }
}
