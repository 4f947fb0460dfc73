//! Images and inputs given as `http://` or `https://` URLs: opening an imprint image from a
//! URL for `write`, `verify` and `inspect`, and downloading a vendor image for `prepare`.
//! The resumable reader itself is `imprint_core::remote`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::output::note;
use crate::units;
use anyhow::{bail, Context, Result};
use imprint_core::manifest::{hex, Image};
use imprint_core::remote::{self, Remote, RemoteOptions};
use sha2::{Digest, Sha256};

/// The image argument as a URL, if it is one.
pub fn as_url(arg: &Path) -> Option<&str> {
    arg.to_str().filter(|s| remote::is_url(s))
}

/// Reader options for the command line: resumes and restarts are told on standard error.
fn options() -> RemoteOptions {
    RemoteOptions {
        on_notice: Some(Arc::new(|msg: &str| note!("imprint: {msg}"))),
        ..Default::default()
    }
}

/// Opens an imprint image from a path or a URL; with `sha256`, the whole image file must
/// have that digest (checked as the payload is read, before any commit).
pub fn open_image(arg: &Path, sha256: Option<&str>) -> Result<Image> {
    let mut img = match as_url(arg) {
        Some(url) => Image::open_url(url, options())?,
        None => Image::open(arg)?,
    };
    if let Some(d) = sha256 {
        img.expect_file_sha256(d)?;
    }
    Ok(img)
}

/// Parses a `--sha256` value: 64 hex digits, returned in lower case (a usage error otherwise).
pub fn parse_sha256(s: &str) -> Result<String, String> {
    let d = s.trim().to_ascii_lowercase();
    if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(d)
    } else {
        Err("expected a sha256 digest: 64 hex digits, as sha256sum prints it".into())
    }
}

/// The file name a URL points at (its last path segment), for default output names.
pub fn url_file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let after_host = path.split_once("://").map_or(path, |(_, rest)| rest);
    after_host
        .split_once('/')
        .map(|(_, p)| p)
        .unwrap_or("")
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && !n.starts_with('.'))
        .unwrap_or("download")
        .to_string()
}

/// Downloads `url` to `dest` (through `dest.partial`, renamed when complete and checked), with
/// resumption and, with `sha256`, the file's digest checked. Shows progress on standard error.
pub fn download(url: &str, dest: &Path, sha256: Option<&str>) -> Result<()> {
    let expected = sha256
        .map(|d| {
            let d = d.trim().to_ascii_lowercase();
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("--sha256 must be 64 hex digits");
            }
            Ok(d)
        })
        .transpose()?;
    let remote = Arc::new(Remote::new(url, options())?);
    let shown = remote.shown_url().to_string();
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = (|| -> Result<()> {
        let mut out = io::BufWriter::with_capacity(
            1 << 20,
            File::create(&partial).with_context(|| format!("creating {}", partial.display()))?,
        );
        let mut reader = remote.reader(0, None);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        let bar = crate::progress::terminal_bar("download");
        let start = Instant::now();
        let mut last_line = Instant::now();
        loop {
            let n = reader
                .read(&mut buf)
                .with_context(|| format!("downloading {shown}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", partial.display()))?;
            done += n as u64;
            let total = remote.len().unwrap_or(0);
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            } else if last_line.elapsed() >= Duration::from_secs(5) {
                last_line = Instant::now();
                note!(
                    "download: {} of {} ({})",
                    units::size(done),
                    units::size(total),
                    units::rate(done, start.elapsed().as_secs_f64())
                );
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let actual = hex(&hasher.finalize());
        if let Some(expected) = &expected {
            if actual != *expected {
                bail!("{shown}: the downloaded file's sha256 is {actual}, expected {expected} (--sha256); it was not kept");
            }
        }
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", partial.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", partial.display()))?;
        std::fs::rename(&partial, dest)
            .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
        note!(
            "downloaded {shown} ({} in {}, {}, sha256 {actual}){}",
            units::size(done),
            units::duration(start.elapsed().as_secs_f64()),
            units::rate(done, start.elapsed().as_secs_f64()),
            if remote.resumes() + remote.restarts() > 0 {
                format!(
                    ", {} resumed, {} restarted",
                    remote.resumes(),
                    remote.restarts()
                )
            } else {
                String::new()
            }
        );
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn file_names_from_urls() {
        assert_eq!(
            url_file_name("https://cloud.example/x/noble.img?sig=1"),
            "noble.img"
        );
        assert_eq!(url_file_name("http://host/"), "download");
        assert_eq!(url_file_name("http://host"), "download");
        assert_eq!(url_file_name("http://host/a/..#x"), "download");
    }

    #[test]
    fn sha256_arguments() {
        assert_eq!(parse_sha256(&"AB".repeat(32)), Ok("ab".repeat(32)));
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"g".repeat(64)).is_err());
    }

    #[test]
    fn urls_and_paths() {
        assert_eq!(as_url(Path::new("http://h/x")), Some("http://h/x"));
        assert_eq!(as_url(Path::new("./http:/h")), None);
    }
}
