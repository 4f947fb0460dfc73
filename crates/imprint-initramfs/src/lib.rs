//! imprint-initramfs writes Linux initramfs archives: the "newc" cpio format the kernel unpacks
//! into its root filesystem at boot.
//!
//! It exists so the live image builds without root: device nodes such as `/dev/console` (which
//! the kernel opens for PID 1 before anything can be mounted) are entries written into the
//! archive, never created with `mknod`. Archives are reproducible: entries are sorted by path,
//! inode numbers follow that order, owners are 0:0 and every mtime is the one given to
//! [`Archive::new`] (`SOURCE_DATE_EPOCH` in the build script).
//!
//! ```
//! let mut archive = imprint_initramfs::Archive::new(0);
//! archive.add_file("/init", 0o755, b"#!/bin/sh\n".to_vec())?;
//! archive.add_char_device("/dev/console", 0o600, 5, 1)?;
//! let bytes = archive.write_newc(Vec::new())?;
//! let entries = imprint_initramfs::parse_newc(&bytes)?;
//! assert_eq!(entries[0].path, "dev");
//! # Ok::<(), imprint_initramfs::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// File type bits of `st_mode`, as the newc header carries them.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFMT: u32 = 0o170_000;

const NEWC_MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Errors building, writing or reading an archive. Each names the archive path or source file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive")]
    Write(#[source] io::Error),
    #[error("invalid archive path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path} is added twice to the archive (as {existing} and as {new})")]
    Conflict {
        path: String,
        existing: &'static str,
        new: &'static str,
    },
    #[error("{path}: only directories, regular files and symlinks can be copied from a tree")]
    UnsupportedFileType { path: PathBuf },
    #[error("{path} is {size} bytes, more than the 4 GiB a newc entry can hold")]
    TooLarge { path: String, size: usize },
    #[error("malformed newc archive at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
}

/// What one archive path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Dir => "directory",
            Node::File(_) => "file",
            Node::Symlink(_) => "symlink",
            Node::CharDevice { .. } => "character device",
        }
    }

    fn type_bits(&self) -> u32 {
        match self {
            Node::Dir => S_IFDIR,
            Node::File(_) => S_IFREG,
            Node::Symlink(_) => S_IFLNK,
            Node::CharDevice { .. } => S_IFCHR,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    perm: u32,
    node: Node,
}

/// An initramfs under construction: paths (relative to the archive root) mapped to entries.
#[derive(Debug, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
    mtime: u32,
}

impl Archive {
    /// An empty archive whose entries all carry `mtime` (seconds since the epoch).
    pub fn new(mtime: u32) -> Self {
        Archive {
            entries: BTreeMap::new(),
            mtime,
        }
    }

    /// Number of entries, including directories added implicitly as parents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing has been added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a directory; adding an existing directory again sets its permissions.
    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<(), Error> {
        self.insert(path, perm, Node::Dir)
    }

    /// Adds a regular file with the given contents.
    pub fn add_file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), Error> {
        if u32::try_from(data.len()).is_err() {
            return Err(Error::TooLarge {
                path: path.to_owned(),
                size: data.len(),
            });
        }
        self.insert(path, perm, Node::File(data))
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        self.insert(path, 0o777, Node::Symlink(target.to_owned()))
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1) without `mknod`.
    pub fn add_char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), Error> {
        self.insert(path, perm, Node::CharDevice { major, minor })
    }

    /// Copies the directory tree `src` under `dest`. Permissions are normalised (0755 for
    /// directories and executables, 0644 otherwise) so the result does not depend on the umask
    /// of whoever checked out the sources.
    pub fn add_tree(&mut self, src: &Path, dest: &str) -> Result<(), Error> {
        let read = |source| Error::Read {
            path: src.to_owned(),
            source,
        };
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(read)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read)?;
        names.sort();
        if !dest.trim_matches('/').is_empty() {
            self.add_dir(dest, 0o755)?;
        }
        for name in names {
            let path = src.join(&name);
            let target = format!("{}/{}", dest.trim_end_matches('/'), name.to_string_lossy());
            let read = |source| Error::Read {
                path: path.clone(),
                source,
            };
            let meta = fs::symlink_metadata(&path).map_err(read)?;
            let ft = meta.file_type();
            if ft.is_dir() {
                self.add_tree(&path, &target)?;
            } else if ft.is_symlink() {
                let link = fs::read_link(&path).map_err(read)?;
                self.add_symlink(&target, &link.to_string_lossy())?;
            } else if ft.is_file() {
                let perm = if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                self.add_file(&target, perm, fs::read(&path).map_err(read)?)?;
            } else {
                return Err(Error::UnsupportedFileType { path });
            }
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, perm: u32, node: Node) -> Result<(), Error> {
        let path = normalize(path)?;
        // The kernel does not create missing parents while unpacking: add them.
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            perm: 0o755,
                            node: Node::Dir,
                        },
                    );
                }
                Some(Entry {
                    node: Node::Dir, ..
                }) => {}
                Some(other) => {
                    return Err(Error::Conflict {
                        path: parent,
                        existing: other.node.kind(),
                        new: "directory",
                    })
                }
            }
        }
        match self.entries.get(&path) {
            None => {}
            Some(Entry {
                node: Node::Dir, ..
            }) if node == Node::Dir => {}
            Some(other) => {
                return Err(Error::Conflict {
                    path,
                    existing: other.node.kind(),
                    new: node.kind(),
                })
            }
        }
        self.entries.insert(
            path,
            Entry {
                perm: perm & 0o7777,
                node,
            },
        );
        Ok(())
    }

    /// Writes the archive in newc format (sorted, then the trailer) and returns the writer.
    pub fn write_newc<W: Write>(&self, writer: W) -> Result<W, Error> {
        let mut out = Counting {
            inner: writer,
            written: 0,
        };
        // Inode 0 is the trailer's; number the entries from 1 in path order.
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (data, rdev): (&[u8], (u32, u32)) = match &entry.node {
                Node::Dir => (&[], (0, 0)),
                Node::File(data) => (data, (0, 0)),
                Node::Symlink(target) => (target.as_bytes(), (0, 0)),
                Node::CharDevice { major, minor } => (&[], (*major, *minor)),
            };
            let header = Header {
                ino,
                mode: entry.node.type_bits() | entry.perm,
                nlink: if entry.node == Node::Dir { 2 } else { 1 },
                mtime: self.mtime,
                rdev,
            };
            out.entry(&header, path, data).map_err(Error::Write)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            rdev: (0, 0),
        };
        out.entry(&trailer, TRAILER, &[]).map_err(Error::Write)?;
        out.inner.flush().map_err(Error::Write)?;
        Ok(out.inner)
    }
}

/// Archive paths are relative to the root, '/'-separated, with no empty, `.` or `..` parts.
fn normalize(path: &str) -> Result<String, Error> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let invalid = |reason| Error::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if trimmed.is_empty() {
        return Err(invalid("the archive root is implicit"));
    }
    if trimmed.contains('\0') {
        return Err(invalid("contains NUL"));
    }
    if trimmed
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid("empty, '.' or '..' component"));
    }
    Ok(trimmed.to_owned())
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
}

struct Counting<W> {
    inner: W,
    written: usize,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn entry(&mut self, h: &Header, name: &str, data: &[u8]) -> io::Result<()> {
        let too_big = |_| io::Error::new(io::ErrorKind::InvalidInput, "entry over 4 GiB");
        let filesize = u32::try_from(data.len()).map_err(too_big)?;
        let namesize = u32::try_from(name.len() + 1).map_err(too_big)?;
        // uid, gid, devmajor, devminor and check are always 0.
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            h.ino, h.mode, 0, 0, h.nlink, h.mtime, filesize, 0, 0, h.rdev.0, h.rdev.1, namesize, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }
}

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry {
    pub path: String,
    /// Full `st_mode`: type bits and permissions.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub ino: u32,
    pub node: Node,
}

/// Reads a newc archive (uncompressed) back into its entries, without the trailer. Used by the
/// tests and to inspect built images.
pub fn parse_newc(bytes: &[u8]) -> Result<Vec<ParsedEntry>, Error> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    let align = |n: usize| n.div_ceil(4) * 4;
    loop {
        let offset = at;
        let malformed = |reason| Error::Malformed { offset, reason };
        let header = bytes
            .get(at..at + HEADER_LEN)
            .ok_or_else(|| malformed("truncated header (no trailer)"))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(malformed("bad magic"));
        }
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .map_err(|_| malformed("non-ASCII header field"))?;
            *field = u32::from_str_radix(hex, 16).map_err(|_| malformed("non-hex header field"))?;
        }
        let [ino, mode, uid, gid, _nlink, mtime, filesize, _, _, rmaj, rmin, namesize, _] = fields;
        let name_start = at + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let name = bytes
            .get(name_start..name_end.saturating_sub(1))
            .ok_or_else(|| malformed("truncated name"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| malformed("non-UTF-8 name"))?;
        let data_start = align(name_end);
        let data_end = data_start + filesize as usize;
        let data = bytes
            .get(data_start..data_end)
            .ok_or_else(|| malformed("truncated data"))?;
        at = align(data_end);
        if name == TRAILER {
            return Ok(entries);
        }
        let node = match mode & S_IFMT {
            S_IFDIR => Node::Dir,
            S_IFREG => Node::File(data.to_vec()),
            S_IFLNK => Node::Symlink(String::from_utf8_lossy(data).into_owned()),
            S_IFCHR => Node::CharDevice {
                major: rmaj,
                minor: rmin,
            },
            _ => return Err(malformed("unsupported file type")),
        };
        entries.push(ParsedEntry {
            path: name,
            mode,
            uid,
            gid,
            mtime,
            ino,
            node,
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new(1_700_000_000);
        a.add_char_device("/dev/console", 0o600, 5, 1).unwrap();
        a.add_file("/init", 0o755, b"ELF".to_vec()).unwrap();
        a.add_file("etc/imprint-release", 0o644, b"NAME=imprint\n".to_vec())
            .unwrap();
        a.add_symlink("/bin/sh", "/init").unwrap();
        a.add_dir("/tmp", 0o1777).unwrap();
        a
    }

    #[test]
    fn round_trip_keeps_every_entry_sorted_with_parents() {
        let bytes = sample().write_newc(Vec::new()).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse_newc(&bytes).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/imprint-release",
                "init",
                "tmp"
            ]
        );
        let console = &entries[3];
        assert_eq!(console.node, Node::CharDevice { major: 5, minor: 1 });
        assert_eq!(console.mode, 0o020_600);
        let init = &entries[6];
        assert_eq!(init.node, Node::File(b"ELF".to_vec()));
        assert_eq!(init.mode, 0o100_755);
        assert_eq!(entries[7].mode, 0o041_777);
        assert_eq!(entries[1].node, Node::Symlink("/init".into()));
        assert!(entries
            .iter()
            .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == 1_700_000_000));
        let inos: Vec<_> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn header_layout_matches_newc() {
        let mut a = Archive::new(0);
        a.add_file("a", 0o644, b"xyz".to_vec()).unwrap();
        let bytes = a.write_newc(Vec::new()).unwrap();
        // 110-byte header, "a\0" padded to 112, 3 data bytes padded to 4.
        let fields = [1, 0o100_644, 0, 0, 1, 0, 3, 0, 0, 0, 0, 2, 0];
        let expected_header: String = std::iter::once("070701".to_owned())
            .chain(fields.iter().map(|f: &u32| format!("{f:08X}")))
            .collect();
        assert!(expected_header.contains("000081A4"));
        assert_eq!(&bytes[..110], expected_header.as_bytes());
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..116], b"xyz\0");
        assert_eq!(&bytes[116..122], b"070701");
        assert_eq!(&bytes[116 + 110..116 + 121], b"TRAILER!!!\0");
    }

    #[test]
    fn identical_input_gives_identical_bytes() {
        let a = sample().write_newc(Vec::new()).unwrap();
        let b = sample().write_newc(Vec::new()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn conflicts_and_bad_paths_are_refused() {
        let mut a = sample();
        assert!(matches!(
            a.add_file("/init", 0o644, vec![]),
            Err(Error::Conflict { .. })
        ));
        assert!(matches!(
            a.add_file("/init/x", 0o644, vec![]),
            Err(Error::Conflict { .. })
        ));
        assert!(matches!(
            a.add_file("../etc/x", 0o644, vec![]),
            Err(Error::InvalidPath { .. })
        ));
        assert!(matches!(
            a.add_dir("/", 0o755),
            Err(Error::InvalidPath { .. })
        ));
        // The same directory twice is a merge, not a conflict.
        a.add_dir("/etc", 0o700).unwrap();
    }

    #[test]
    fn tree_copy_normalises_permissions_and_keeps_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc/sub")).unwrap();
        fs::write(dir.path().join("etc/sub/conf"), "x").unwrap();
        fs::set_permissions(
            dir.path().join("etc/sub/conf"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::write(dir.path().join("run.sh"), "#!").unwrap();
        fs::set_permissions(dir.path().join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("run.sh", dir.path().join("link")).unwrap();
        let mut a = Archive::new(0);
        a.add_tree(dir.path(), "/").unwrap();
        let entries = parse_newc(&a.write_newc(Vec::new()).unwrap()).unwrap();
        let modes: Vec<_> = entries.iter().map(|e| (e.path.as_str(), e.mode)).collect();
        assert_eq!(
            modes,
            [
                ("etc", 0o040_755),
                ("etc/sub", 0o040_755),
                ("etc/sub/conf", 0o100_644),
                ("link", 0o120_777),
                ("run.sh", 0o100_755)
            ]
        );
    }

    #[test]
    fn truncated_archive_is_malformed() {
        let bytes = sample().write_newc(Vec::new()).unwrap();
        assert!(matches!(
            parse_newc(&bytes[..bytes.len() - 130]),
            Err(Error::Malformed { .. })
        ));
    }
}
