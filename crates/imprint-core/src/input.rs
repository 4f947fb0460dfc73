//! Opening files that come from the user: images, keys, configs, seed templates, `prepare`
//! inputs. A FIFO, socket, character device (`/dev/zero`) or directory where a file is
//! expected is refused at once instead of hanging or reading forever, and small inputs are read
//! with a size cap so a huge or endless file cannot exhaust memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Temporary files and folders of this process, removed by [`remove_temporaries`] when the
/// process is interrupted (the `imprint` binary calls it from its signal thread).
static TEMPORARIES: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Records `path` as a temporary to remove if the process is interrupted.
pub fn register_temporary(path: &Path) {
    if let Ok(mut t) = TEMPORARIES.lock() {
        t.push(path.to_owned());
    }
}

/// Forgets `path` (renamed into place, or already removed).
pub fn unregister_temporary(path: &Path) {
    if let Ok(mut t) = TEMPORARIES.lock() {
        t.retain(|p| p != path);
    }
}

/// Removes every registered temporary file or folder. Called on SIGINT/SIGTERM/SIGHUP, from
/// an ordinary thread (not a signal handler), so taking the lock is safe.
pub fn remove_temporaries() {
    if let Ok(mut t) = TEMPORARIES.lock() {
        for p in t.drain(..) {
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    let _ = std::fs::remove_dir_all(&p);
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(&p);
                }
                Err(_) => {}
            }
        }
    }
}

/// Creates a new file next to `out` (same folder, so a rename onto `out` is atomic), named
/// `.OUTNAME.<pid>-<n>.TAG` — with `O_CREAT | O_EXCL`, so an existing file or a planted symbolic
/// link at that name is never opened or followed: another name is tried instead. The file is
/// registered with [`register_temporary`]; the caller unregisters it once renamed or removed.
pub fn create_beside(out: &Path, tag: &str) -> io::Result<(std::path::PathBuf, File)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for _ in 0..100 {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            ".{name}.{}-{nanos:x}-{n}.{tag}",
            std::process::id()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                register_temporary(&path);
                return Ok((path, f));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary name")))
}

/// Whether `a` and `b` are the same file (device and inode), however they are named: a hard
/// link, a symbolic link, `dir/../file`. False when either does not exist.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// Size caps for the small files imprint reads whole.
pub mod limits {
    /// A minisign key file (public or secret) is a few hundred bytes.
    pub const KEY: u64 = 64 << 10;
    /// The appliance configuration.
    pub const CONFIG: u64 = 1 << 20;
    /// One cloud-init seed template: no more than the seed partition holds.
    pub const SEED_FILE: u64 = crate::seed::CIDATA_SIZE;
}

/// What a file's type is, in words, when it is not a regular file.
fn not_regular(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() {
        None
    } else if ft.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_block_device() {
        Some("a block device")
    } else if ft.is_dir() {
        Some("a folder")
    } else {
        Some("not a regular file")
    }
}

/// Opens `path` for reading, refusing anything but a regular file (and a block device when
/// `allow_block`). Opened non-blocking first, so a FIFO without a writer cannot hang the open.
pub fn open_regular(path: &Path, allow_block: bool) -> io::Result<File> {
    open_checked(path, allow_block, false)
}

fn open_checked(path: &Path, allow_block: bool, no_symlink: bool) -> io::Result<File> {
    let mut flags = nix::libc::O_NONBLOCK;
    if no_symlink {
        flags |= nix::libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            if no_symlink && e.raw_os_error() == Some(nix::libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it is a symbolic link, which is never followed here; copy the file itself",
                )
            } else {
                e
            }
        })?;
    let ft = file.metadata()?.file_type();
    if let Some(what) = not_regular(ft) {
        if !(allow_block && ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("it is {what}, not a regular file"),
            ));
        }
    }
    // Regular files and block devices ignore O_NONBLOCK for reads, but clear it anyway.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )?;
    Ok(file)
}

/// Reads the regular file `path` whole, refusing it when it holds more than `max` bytes (the
/// read itself stops at `max + 1`, should the file grow meanwhile).
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    read_file_bounded(open_regular(path, false)?, max)
}

/// [`read_bounded`] that also refuses a symbolic link at `path` (`O_NOFOLLOW`): for files
/// gathered from a folder onto a stick, where a planted link could copy `/etc/shadow`.
pub fn read_bounded_no_symlink(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    read_file_bounded(open_checked(path, false, true)?, max)
}

fn read_file_bounded(file: File, max: u64) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    let too_big = |len: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is {len} bytes, more than the {max}-byte limit for this file"),
        )
    };
    if len > max {
        return Err(too_big(len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_bounded_string(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn fifo_is_refused_without_hanging() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let start = Instant::now();
        let e = open_regular(&p, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is a FIFO (named pipe), not a regular file"
        );
        let e = read_bounded(&p, 10).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn dev_zero_and_folders_are_refused() {
        let e = read_bounded(Path::new("/dev/zero"), 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is a character device, not a regular file"
        );
        let t = tempfile::tempdir().unwrap();
        let e = read_bounded(t.path(), 10).unwrap_err();
        assert!(e.to_string().contains("folder"), "{e}");
    }

    #[test]
    fn symlinks_are_refused_when_asked() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("secret");
        std::fs::write(&target, b"root:$6$hash").unwrap();
        let link = t.path().join("meta-data");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = read_bounded_no_symlink(&link, 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is a symbolic link, which is never followed here; copy the file itself"
        );
        assert_eq!(read_bounded(&link, 100).unwrap(), b"root:$6$hash");
    }

    #[test]
    fn create_beside_never_follows_a_planted_symlink() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let out = t.path().join("out.img");
        // Plant links at every name the next few calls could pick: they are skipped, not used.
        let (p, _f) = create_beside(&out, "partial").unwrap();
        assert!(p.starts_with(t.path()));
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let (q, mut f) = create_beside(&out, "partial").unwrap();
        assert_ne!(p, q);
        std::io::Write::write_all(&mut f, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(same_file(&p, &victim));
        assert!(!same_file(&q, &victim));
    }

    #[test]
    fn size_cap_is_enforced_exactly() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, [7u8; 11]).unwrap();
        assert_eq!(read_bounded(&p, 11).unwrap(), vec![7u8; 11]);
        let e = read_bounded(&p, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is 11 bytes, more than the 10-byte limit for this file"
        );
    }
}
