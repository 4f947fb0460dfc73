//! `imprint prepare`: turns a disk image as vendors publish it — raw, zstd, xz, gzip or qcow2 —
//! into an imprint image (`.img.zst` with its manifest).
//!
//! Inputs are recognised by their magic bytes, not their names. qcow2 is read by [`qcow2`], a
//! streaming reader of the subset cloud images use (v2/v3, zlib or zstd compressed clusters, no
//! backing file, no encryption); anything else it refuses by name.

use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use imprint_core::manifest::{self, Manifest, PackOptions};

pub mod qcow2;

/// What an input file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A raw disk image.
    Raw,
    /// zstd-compressed raw image.
    Zstd,
    /// xz-compressed raw image.
    Xz,
    /// gzip-compressed raw image.
    Gzip,
    /// qcow2 image.
    Qcow2,
    /// Already an imprint image.
    Imprint,
}

impl InputKind {
    /// Recognises an input by its first bytes.
    pub fn sniff(head: &[u8]) -> InputKind {
        let starts = |m: &[u8]| head.len() >= m.len() && &head[..m.len()] == m;
        if starts(&manifest::MANIFEST_FRAME_MAGIC.to_le_bytes()) {
            InputKind::Imprint
        } else if starts(&manifest::ZSTD_FRAME_MAGIC.to_le_bytes()) {
            InputKind::Zstd
        } else if starts(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
            InputKind::Xz
        } else if starts(&[0x1F, 0x8B]) {
            InputKind::Gzip
        } else if starts(b"QFI\xfb") {
            InputKind::Qcow2
        } else {
            InputKind::Raw
        }
    }

    /// Human name.
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Raw => "raw disk image",
            InputKind::Zstd => "zstd-compressed raw image",
            InputKind::Xz => "xz-compressed raw image",
            InputKind::Gzip => "gzip-compressed raw image",
            InputKind::Qcow2 => "qcow2 image",
            InputKind::Imprint => "imprint image",
        }
    }
}

/// Counts bytes read from the input file, for progress.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<R: Seek> Seek for Counting<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Options of `imprint prepare`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    /// The disk image to convert: a file, or an http:// or https:// URL (downloaded next to
    /// the output first, resuming over dropped connections, then removed).
    pub input: PathBuf,
    /// Output file [default: NAME.img.zst next to the input].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// zstd compression level (1-19; higher is smaller and slower to make, not to write).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// Image name recorded in the manifest [default: the input's name without extensions].
    #[arg(long)]
    pub name: Option<String>,
    /// Compression threads [default: all cores; never more than the cores].
    #[arg(long, default_value_t = 0)]
    pub threads: u32,
    /// Compress the image as one zstd stream (image format version 1) instead of independent
    /// 4 MiB frames: a few percent smaller, but written with one decoding thread instead of
    /// one per core.
    #[arg(long)]
    pub one_stream: bool,
    /// Sign the image with this minisign secret key (made by `imprint keygen`).
    #[arg(long, value_name = "KEYFILE")]
    pub sign: Option<PathBuf>,
    /// The password of a password-protected secret key: the first line of this file.
    #[arg(long, requires = "sign")]
    pub password_file: Option<PathBuf>,
    /// The sha256 the input file must have (as the vendor publishes it, e.g. in SHA256SUMS);
    /// checked before anything is converted.
    #[arg(long, value_name = "HEX", value_parser = crate::fetch::parse_sha256)]
    pub sha256: Option<String>,
    /// Print the new image's path and manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Memory the xz decoder may use: `xz -9` needs 65 MiB, a 256 MiB dictionary about 260 MiB.
pub const XZ_MEMLIMIT: u64 = 320 << 20;

/// The xz decoder, with its memory-limit error explained.
struct XzBounded<R>(R);

impl<R: Read> Read for XzBounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.to_string() == "memory limit reached" {
                std::io::Error::other(format!(
                    "the xz stream needs more than {} MiB of memory to decode (a very large \
                     dictionary); recompress it with `xz -9` or a smaller --lzma2=dict",
                    XZ_MEMLIMIT >> 20
                ))
            } else {
                e
            }
        })
    }
}

/// The default image name: the file name without its image/compression extensions.
pub fn default_name(input: &Path) -> String {
    let mut name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    loop {
        let lower = name.to_ascii_lowercase();
        let stripped = [".zst", ".xz", ".gz", ".qcow2", ".img", ".raw", ".bin"]
            .iter()
            .find(|ext| lower.ends_with(*ext))
            .map(|ext| name[..name.len() - ext.len()].to_string());
        match stripped {
            Some(s) if !s.is_empty() => name = s,
            _ => break,
        }
    }
    name
}

/// Runs `imprint prepare`; `progress` receives (input bytes read, input size).
pub fn prepare(
    args: &PrepareArgs,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Manifest, InputKind)> {
    if let Some(url) = crate::fetch::as_url(&args.input) {
        return prepare_url(url, args, progress);
    }
    if let Some(expected) = &args.sha256 {
        check_file_sha256(&args.input, expected)?;
    }
    let input = &args.input;
    // A FIFO or a character device (`/dev/zero`) would hang or never end: refused at once. A
    // block device is a disk image too (its size is known).
    let mut file = imprint_core::input::open_regular(input, true)
        .with_context(|| format!("opening {}", input.display()))?;
    let input_size = file
        .metadata()
        .with_context(|| format!("reading {}", input.display()))?
        .len();
    let mut head = [0u8; 8];
    let n = file
        .read(&mut head)
        .with_context(|| format!("reading {}", input.display()))?;
    file.seek(SeekFrom::Start(0))
        .with_context(|| format!("reading {}", input.display()))?;
    let kind = InputKind::sniff(&head[..n]);
    if kind == InputKind::Imprint {
        bail!(
            "{} is already an imprint image; `imprint inspect` shows its manifest",
            input.display()
        );
    }
    let name = args.name.clone().unwrap_or_else(|| default_name(input));
    let output = args.output.clone().unwrap_or_else(|| {
        input
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(format!("{name}.img.zst"))
    });
    // Compared by identity, not by path text: `./in.raw`, a hard link or a symbolic link to
    // the input are the input.
    if output == *input || imprint_core::input::same_file(&output, input) {
        bail!(
            "the output {} is the input {}: it would be destroyed; choose another output file",
            output.display(),
            input.display()
        );
    }
    // Load the key before the long compression, so a wrong password fails at once.
    let signer = args
        .sign
        .as_deref()
        .map(|k| crate::sign::ImageSigner::load(k, args.password_file.as_deref()))
        .transpose()?;
    let count = Arc::new(AtomicU64::new(0));
    let counted = Counting {
        inner: file,
        count: count.clone(),
    };
    let mut raw: Box<dyn Read> = match kind {
        InputKind::Raw => Box::new(BufReader::with_capacity(1 << 20, counted)),
        InputKind::Zstd => Box::new(
            zstd::stream::read::Decoder::new(counted)
                .with_context(|| format!("decoding {}", input.display()))?,
        ),
        // Bounded: an xz header may ask for a dictionary of up to 1.5 GiB; past the limit the
        // decoder stops with a clear error instead of taking the memory.
        InputKind::Xz => Box::new(XzBounded(liblzma::read::XzDecoder::new_stream(
            BufReader::new(counted),
            liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, liblzma::stream::CONCATENATED)
                .context("setting up the xz decoder")?,
        ))),
        InputKind::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(counted))),
        InputKind::Qcow2 => Box::new(
            qcow2::Qcow2Reader::new(BufReader::new(counted))
                .with_context(|| format!("reading the qcow2 image {}", input.display()))?,
        ),
        InputKind::Imprint => unreachable_imprint()?,
    };
    // More workers than cores only costs memory (each holds its own window and buffers).
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let threads = if args.threads == 0 {
        cores
    } else {
        args.threads.min(cores)
    };
    let opts = PackOptions {
        name,
        level: args.level,
        threads,
        chunk_size: manifest::DEFAULT_CHUNK_SIZE,
        frame_size: (!args.one_stream).then_some(manifest::DEFAULT_FRAME_SIZE),
    };
    let mut sign = |json: &[u8]| -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        match &signer {
            Some(s) => Ok(s.sign(json)?),
            None => Err("no signing key".into()),
        }
    };
    let sign: Option<manifest::Signer<'_>> = if signer.is_some() {
        Some(&mut sign)
    } else {
        None
    };
    let manifest = manifest::pack_signed(&mut raw, &output, &opts, sign, &mut |_| {
        progress(count.load(Ordering::Relaxed), input_size)
    })
    .with_context(|| format!("preparing {} ({})", input.display(), kind.name()))?;
    Ok((output, manifest, kind))
}

/// `imprint prepare URL`: downloads the input next to the output (checked against --sha256),
/// prepares it, and removes the download.
fn prepare_url(
    url: &str,
    args: &PrepareArgs,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Manifest, InputKind)> {
    let file_name = crate::fetch::url_file_name(url);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(Path::new(&file_name)));
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.img.zst")));
    let mut download = output.as_os_str().to_owned();
    download.push(".download");
    let download = PathBuf::from(download);
    crate::fetch::download(url, &download, args.sha256.as_deref())?;
    let local = PrepareArgs {
        input: download.clone(),
        output: Some(output),
        name: Some(name),
        sha256: None,
        ..args.clone()
    };
    let result = prepare(&local, progress);
    let _ = std::fs::remove_file(&download);
    result
}

/// Refuses a local input whose sha256 is not `expected`.
fn check_file_sha256(input: &Path, expected: &str) -> Result<()> {
    use sha2::{Digest, Sha256};
    let expected = expected.trim().to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--sha256 must be 64 hex digits");
    }
    let mut f = imprint_core::input::open_regular(input, false)
        .with_context(|| format!("opening {}", input.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut f, &mut hasher).with_context(|| format!("reading {}", input.display()))?;
    let actual = manifest::hex(&hasher.finalize());
    if actual != expected {
        bail!(
            "{}: its sha256 is {actual}, expected {expected} (--sha256); nothing was prepared",
            input.display()
        );
    }
    Ok(())
}

// `Imprint` inputs were refused above; this keeps the match exhaustive without a panic.
fn unreachable_imprint() -> Result<Box<dyn Read>> {
    bail!("internal: imprint input reached the decoder")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_magic() {
        assert_eq!(InputKind::sniff(b"QFI\xfb\0\0\0\x03"), InputKind::Qcow2);
        assert_eq!(InputKind::sniff(&[0x28, 0xB5, 0x2F, 0xFD]), InputKind::Zstd);
        assert_eq!(
            InputKind::sniff(&[0xFD, b'7', b'z', b'X', b'Z', 0]),
            InputKind::Xz
        );
        assert_eq!(InputKind::sniff(&[0x1F, 0x8B, 8]), InputKind::Gzip);
        assert_eq!(
            InputKind::sniff(&[0x5E, 0x2A, 0x4D, 0x18]),
            InputKind::Imprint
        );
        assert_eq!(InputKind::sniff(&[0; 8]), InputKind::Raw);
    }

    #[test]
    fn names() {
        assert_eq!(
            default_name(Path::new("/x/ubuntu-24.04.qcow2")),
            "ubuntu-24.04"
        );
        assert_eq!(default_name(Path::new("disk.img.xz")), "disk");
        assert_eq!(default_name(Path::new("debian.raw.zst")), "debian");
        assert_eq!(default_name(Path::new(".img")), ".img");
    }
}
