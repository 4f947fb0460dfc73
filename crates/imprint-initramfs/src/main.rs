//! imprint-initramfs: writes a reproducible (optionally zstd-compressed) newc initramfs from
//! directory trees, single files, directories and character device nodes, without root.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use imprint_initramfs::Archive;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Compression {
    Zstd,
    None,
}

/// Write a newc cpio initramfs. Paths inside the archive are absolute ("/init"); sources cannot
/// contain ':'. Entries are sorted, owned by 0:0, and all carry the same mtime.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Archive to write (written to OUTPUT.partial, then renamed).
    #[arg(short, long)]
    output: PathBuf,
    /// Copy a directory tree: SRC:DEST.
    #[arg(long, value_name = "SRC:DEST")]
    tree: Vec<String>,
    /// Add one file: SRC:DEST[:MODE] (octal MODE, default 0644).
    #[arg(long, value_name = "SRC:DEST[:MODE]")]
    file: Vec<String>,
    /// Add a directory: DEST[:MODE] (octal MODE, default 0755).
    #[arg(long, value_name = "DEST[:MODE]")]
    dir: Vec<String>,
    /// Add a character device node: DEST:MAJOR:MINOR[:MODE] (octal MODE, default 0600).
    #[arg(long, value_name = "DEST:MAJOR:MINOR[:MODE]")]
    char_dev: Vec<String>,
    /// Timestamp of every entry; defaults to $SOURCE_DATE_EPOCH, else 0.
    #[arg(long)]
    mtime: Option<u32>,
    #[arg(long, value_enum, default_value = "zstd")]
    compression: Compression,
    /// zstd level; 19 keeps the stick small and still decompresses in milliseconds at boot.
    #[arg(long, default_value_t = 19)]
    level: i32,
}

fn octal(s: Option<&str>, default: u32) -> Result<u32> {
    match s {
        None => Ok(default),
        Some(s) => u32::from_str_radix(s, 8).with_context(|| format!("mode {s:?} is not octal")),
    }
}

fn build(args: &Args) -> Result<Archive> {
    let mtime = match args.mtime {
        Some(m) => m,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(s) => s
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH {s:?} is not a 32-bit number"))?,
            Err(_) => 0,
        },
    };
    let mut archive = Archive::new(mtime);
    for spec in &args.tree {
        let Some((src, dest)) = spec.split_once(':') else {
            bail!("--tree {spec:?}: expected SRC:DEST");
        };
        archive
            .add_tree(Path::new(src), dest)
            .with_context(|| format!("adding tree {src}"))?;
    }
    for spec in &args.file {
        let parts: Vec<&str> = spec.splitn(3, ':').collect();
        let [src, dest, rest @ ..] = parts.as_slice() else {
            bail!("--file {spec:?}: expected SRC:DEST[:MODE]");
        };
        let mode = octal(rest.first().copied(), 0o644)?;
        let data = fs::read(src).with_context(|| format!("reading {src}"))?;
        archive
            .add_file(dest, mode, data)
            .with_context(|| format!("adding {src}"))?;
    }
    for spec in &args.dir {
        let (dest, mode) = match spec.split_once(':') {
            Some((d, m)) => (d, octal(Some(m), 0o755)?),
            None => (spec.as_str(), 0o755),
        };
        archive
            .add_dir(dest, mode)
            .with_context(|| format!("adding directory {dest}"))?;
    }
    for spec in &args.char_dev {
        let parts: Vec<&str> = spec.split(':').collect();
        let [dest, major, minor, rest @ ..] = parts.as_slice() else {
            bail!("--char-dev {spec:?}: expected DEST:MAJOR:MINOR[:MODE]");
        };
        let major = major
            .parse()
            .with_context(|| format!("major in {spec:?}"))?;
        let minor = minor
            .parse()
            .with_context(|| format!("minor in {spec:?}"))?;
        let mode = octal(rest.first().copied(), 0o600)?;
        archive
            .add_char_device(dest, mode, major, minor)
            .with_context(|| format!("adding device node {dest}"))?;
    }
    Ok(archive)
}

fn run(args: &Args) -> Result<()> {
    let archive = build(args)?;
    let cpio = archive.write_newc(Vec::new())?;
    let bytes = match args.compression {
        Compression::None => cpio,
        // Single-threaded zstd: the output depends only on the input and the level.
        Compression::Zstd => zstd::stream::encode_all(cpio.as_slice(), args.level)
            .context("compressing the archive")?,
    };
    let mut partial = args.output.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file =
        fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, &args.output)
        .with_context(|| format!("renaming to {}", args.output.display()))?;
    eprintln!(
        "{}: {} entries, {} bytes",
        args.output.display(),
        archive.len(),
        bytes.len()
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("imprint-initramfs: {e:#}");
        std::process::exit(1);
    }
}
