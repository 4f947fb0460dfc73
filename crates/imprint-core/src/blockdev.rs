//! Targets: block devices and regular files, opened so that nobody else writes to them while we
//! do, and the checks that decide whether a block device may be touched at all.
//!
//! The ioctls live in the private [`ioctl`] module and are reached only through the safe methods
//! of [`Target`]. Exclusivity is checked twice: from `/proc` and `/sys` (mounted, swap, holders —
//! so the error can say *what* holds the disk), then by the kernel itself with `O_EXCL`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Alignment of every buffer handed to the kernel: covers 512- and 4096-byte sectors and the
/// page size, which `O_DIRECT` needs.
pub const ALIGN: usize = 4096;

mod ioctl {
    //! Block-device ioctls, declared with nix's macros. Only the safe wrappers below call them.
    use nix::libc::c_int;
    use nix::libc::c_uint;

    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKSSZGET = _IO(0x12, 104) but takes an int*: logical sector size.
    nix::ioctl_read_bad!(blksszget, 0x1268, c_int);
    // BLKPBSZGET = _IO(0x12, 123) but takes an unsigned int*: physical sector size.
    nix::ioctl_read_bad!(blkpbszget, 0x127b, c_uint);
    // BLKRRPART = _IO(0x12, 95): re-read the partition table.
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    // BLKFLSBUF = _IO(0x12, 97): flush and drop the buffer cache.
    nix::ioctl_none!(blkflsbuf, 0x12, 97);
    // BLKZEROOUT = _IO(0x12, 127) but takes a uint64_t[2] {start, len}.
    nix::ioctl_write_ptr_bad!(blkzeroout, 0x127f, [u64; 2]);
}

/// What kind of thing a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A whole-disk block device.
    BlockDevice,
    /// A regular file standing in for a disk (a VM disk, a test fixture).
    File,
}

/// Errors opening or checking a target. Each names the target and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A syscall failed on the target.
    #[error("{step} {path}")]
    Io {
        /// The step that failed ("opening", "reading the size of", …).
        step: &'static str,
        /// The target.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The target is neither a block device nor a regular file.
    #[error("{path} is neither a block device nor a regular file")]
    NotADisk {
        /// The target.
        path: PathBuf,
    },
    /// The target is a partition, not a whole disk.
    #[error("{path} is a partition; give the whole disk ({disk}) — the image carries its own partition table")]
    Partition {
        /// The target.
        path: PathBuf,
        /// The disk the partition belongs to.
        disk: String,
    },
    /// The target or one of its partitions is in use.
    #[error("{path} is in use: {what}; unmount it, swapoff it or stop what holds it, then run imprint again")]
    InUse {
        /// The target.
        path: PathBuf,
        /// What uses it.
        what: String,
    },
    /// The kernel refused the exclusive open (or, for a file, the exclusive lock).
    #[error(
        "{path} is busy: another program holds it open exclusively (a mount, LVM, RAID, or another imprint); nothing was written"
    )]
    Busy {
        /// The target.
        path: PathBuf,
    },
    /// The target does not exist and may not be created.
    #[error("{path} does not exist; {hint}")]
    Missing {
        /// The target.
        path: PathBuf,
        /// What to do instead.
        hint: &'static str,
    },
    /// The image and the target are the same storage: writing would destroy the image.
    #[error("{target} would overwrite the image {image} itself: {why}; nothing was written")]
    SameAsImage {
        /// The target.
        target: PathBuf,
        /// The image.
        image: PathBuf,
        /// How they are the same.
        why: String,
    },
}

impl TargetError {
    /// Whether the error happened while opening and checking the target, before anything was
    /// written to it (a refusal), rather than during the write (a failure).
    pub fn is_refusal(&self) -> bool {
        match self {
            TargetError::Io { step, .. } => matches!(
                *step,
                "looking at"
                    | "creating"
                    | "opening"
                    | "locking"
                    | "reading the size of"
                    | "reading the sector size of"
                    | "finding the sysfs entry of"
            ),
            _ => true,
        }
    }
}

/// A disk (or file) opened for imaging.
#[derive(Debug)]
pub struct Target {
    path: PathBuf,
    file: File,
    kind: TargetKind,
    size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
    direct: bool,
    /// `(st_dev, st_ino)` of the opened file: its identity, whatever path named it.
    identity: (u64, u64),
    /// For a block device, its device number.
    rdev: Option<u64>,
    /// This open created the file (a file target that did not exist before).
    created: bool,
}

/// How to open a target.
#[derive(Debug, Clone)]
pub struct OpenOptionsTarget {
    /// For a regular file that does not exist yet or is empty: make it this size (sparse).
    /// Never creates anything under `/dev` (a mistyped disk name is not a new file).
    pub file_size_if_new: Option<u64>,
    /// Sector size a regular file pretends to have (files have none; the image's is used).
    pub file_sector_size: u32,
    /// Root of sysfs (normally `/sys`), a parameter for tests.
    pub sys_root: PathBuf,
    /// Root of procfs (normally `/proc`).
    pub proc_root: PathBuf,
    /// Open read-only (for `verify`).
    pub read_only: bool,
}

impl Default for OpenOptionsTarget {
    fn default() -> Self {
        OpenOptionsTarget {
            file_size_if_new: None,
            file_sector_size: 512,
            sys_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            read_only: false,
        }
    }
}

impl Target {
    /// Opens `path` for imaging after checking it is not in use. A block device is opened
    /// `O_EXCL | O_DIRECT`; a regular file `O_DIRECT` where its filesystem allows it.
    pub fn open(path: &Path, opts: &OpenOptionsTarget) -> Result<Target, TargetError> {
        let io_err = |step: &'static str| {
            let path = path.to_owned();
            move |source| TargetError::Io { step, path, source }
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if opts.file_size_if_new.is_none() {
                    return Err(TargetError::Missing {
                        path: path.to_owned(),
                        hint: "give an existing whole-disk block device (see `lsblk`)",
                    });
                }
                if under_dev(path) {
                    return Err(TargetError::Missing {
                        path: path.to_owned(),
                        hint: "no such disk; imprint never creates files under /dev (see `lsblk` for the disks)",
                    });
                }
                None
            }
            Err(e) => return Err(io_err("looking at")(e)),
        };
        let is_block = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        if is_block {
            let meta = meta.as_ref().ok_or_else(|| TargetError::NotADisk {
                path: path.to_owned(),
            })?;
            check_block_device_free(path, meta.rdev(), &opts.sys_root, &opts.proc_root)?;
            let mut oo = OpenOptions::new();
            oo.read(true).write(!opts.read_only);
            let flags = if opts.read_only {
                nix::libc::O_DIRECT
            } else {
                nix::libc::O_DIRECT | nix::libc::O_EXCL
            };
            oo.custom_flags(flags);
            let file = oo.open(path).map_err(|e| {
                if e.raw_os_error() == Some(nix::libc::EBUSY) {
                    TargetError::Busy {
                        path: path.to_owned(),
                    }
                } else {
                    io_err("opening")(e)
                }
            })?;
            let size = ioctl_size(&file).map_err(io_err("reading the size of"))?;
            let (lss, pss) =
                ioctl_sector_sizes(&file).map_err(io_err("reading the sector size of"))?;
            let fm = file.metadata().map_err(io_err("looking at"))?;
            return Ok(Target {
                path: path.to_owned(),
                file,
                kind: TargetKind::BlockDevice,
                size,
                logical_sector_size: lss,
                physical_sector_size: pss,
                direct: true,
                identity: (fm.dev(), fm.ino()),
                rdev: Some(fm.rdev()),
                created: false,
            });
        }
        if meta.as_ref().is_some_and(|m| !m.file_type().is_file()) {
            return Err(TargetError::NotADisk {
                path: path.to_owned(),
            });
        }
        // A regular file: try O_DIRECT (bypasses the page cache like a disk), fall back where the
        // filesystem refuses it (tmpfs answers EINVAL).
        if meta.is_none() {
            // Created exclusively (`O_EXCL`): a dangling symbolic link or a file that appeared
            // meanwhile is never followed or taken over.
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_err("creating"))?;
        }
        let open = |direct: bool| {
            let mut oo = OpenOptions::new();
            oo.read(true).write(!opts.read_only);
            if direct {
                oo.custom_flags(nix::libc::O_DIRECT);
            }
            oo.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                (open(false).map_err(io_err("opening"))?, false)
            }
            Err(e) => return Err(io_err("opening")(e)),
        };
        let created = meta.is_none();
        let fm = file.metadata().map_err(io_err("looking at"))?;
        // The block device's O_EXCL, for files: an exclusive lock for a writer (shared for a
        // reader), so two imprints never write one file at once, nor verify it mid-write.
        let lock = if opts.read_only {
            nix::fcntl::FlockArg::LockSharedNonblock
        } else {
            nix::fcntl::FlockArg::LockExclusiveNonblock
        };
        #[allow(deprecated)] // nix's Flock guard owns the fd; the plain call keeps `File`.
        if let Err(e) = nix::fcntl::flock(file.as_raw_fd(), lock) {
            return Err(if e == nix::errno::Errno::EWOULDBLOCK {
                TargetError::Busy {
                    path: path.to_owned(),
                }
            } else {
                io_err("locking")(e.into())
            });
        }
        // A file behind a loop device is that device's disk: writing it under the loop device
        // (and any filesystem mounted from it) corrupts what the kernel has cached and mounted.
        if !opts.read_only {
            let loops = loops_backed_by(&opts.sys_root, (fm.dev(), fm.ino()));
            if !loops.is_empty() {
                return Err(TargetError::InUse {
                    path: path.to_owned(),
                    what: format!(
                        "it is the backing file of {}",
                        loops
                            .iter()
                            .map(|l| format!("/dev/{l}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        let mut size = fm.len();
        if size == 0 {
            if let Some(new) = opts.file_size_if_new {
                file.set_len(new).map_err(io_err("sizing"))?;
                size = new;
            }
        }
        Ok(Target {
            path: path.to_owned(),
            file,
            kind: TargetKind::File,
            size,
            logical_sector_size: opts.file_sector_size,
            physical_sector_size: opts.file_sector_size,
            direct,
            identity: (fm.dev(), fm.ino()),
            rdev: None,
            created,
        })
    }

    /// Whether this open created the target file (so a failed write can remove it again).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Refuses when writing this target would overwrite the image file `image` itself: the
    /// same file (any path, hard link), a loop device backed by it, or the block device (or a
    /// partition of it) whose filesystem holds it. Compared by device and inode numbers, not
    /// by path text.
    pub fn check_not_image(&self, image: &Path, sys_root: &Path) -> Result<(), TargetError> {
        let Ok(im) = std::fs::metadata(image) else {
            return Ok(());
        };
        let same = |why: String| {
            Err(TargetError::SameAsImage {
                target: self.path.clone(),
                image: image.to_owned(),
                why,
            })
        };
        if im.file_type().is_block_device() && Some(im.rdev()) == self.rdev {
            return same("they are the same block device".into());
        }
        if (im.dev(), im.ino()) == self.identity {
            return same("they are the same file".into());
        }
        let Some(rdev) = self.rdev else {
            return Ok(());
        };
        let Ok(sysdir) = std::fs::canonicalize(sys_root.join("dev/block").join(dev_string(rdev)))
        else {
            return Ok(());
        };
        let name = sysdir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if loops_backed_by(sys_root, (im.dev(), im.ino())).contains(&name) {
            return same(format!("/dev/{name} is a loop device backed by the image"));
        }
        // The filesystem holding the image lives on the disk or one of its partitions.
        let mut devs = vec![rdev];
        if let Ok(entries) = std::fs::read_dir(&sysdir) {
            for e in entries.flatten() {
                if let Ok(d) = std::fs::read_to_string(e.path().join("dev")) {
                    if let Some((ma, mi)) = d.trim().split_once(':') {
                        if let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse()) {
                            devs.push(nix::sys::stat::makedev(ma, mi));
                        }
                    }
                }
            }
        }
        if devs.contains(&im.dev()) {
            return same(format!(
                "the image is stored on /dev/{name} (device {})",
                dev_string(im.dev())
            ));
        }
        Ok(())
    }

    /// The target's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Block device or file.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Logical sector size (what partition tables are laid out in).
    pub fn logical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }
    /// Physical sector size.
    pub fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }
    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn err(&self, step: &'static str) -> impl FnOnce(io::Error) -> TargetError + '_ {
        move |source| TargetError::Io {
            step,
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `buf` at `offset`. With `O_DIRECT`, `buf` must be [`ALIGN`]-aligned and offset and
    /// length multiples of the logical sector size; the engine only passes such buffers.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (same alignment rules as [`Self::write_at`]).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Makes `[offset, offset+len)` read as zeros: `BLKZEROOUT` on a block device (the kernel
    /// guarantees zeros, offloaded where the device can — never a discard that may not zero),
    /// a punched hole in a file.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            TargetKind::BlockDevice => {
                let range = [offset, len];
                // SAFETY: the fd is an open block device and `range` is a valid [u64; 2] that
                // outlives the call; BLKZEROOUT only reads it.
                unsafe { ioctl::blkzeroout(self.file.as_raw_fd(), &range) }
                    .map_err(io::Error::from)?;
                Ok(())
            }
            TargetKind::File => {
                use nix::fcntl::{fallocate, FallocateFlags};
                let flags =
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                match fallocate(&self.file, flags, offset as i64, len as i64) {
                    Ok(()) => Ok(()),
                    Err(nix::errno::Errno::EOPNOTSUPP) => self.write_zeros(offset, len),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = AlignedBuf::new(len.min(4 << 20) as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk.as_slice()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Flushes written data to stable storage.
    pub fn sync(&self) -> Result<(), TargetError> {
        self.file.sync_all().map_err(self.err("syncing data to"))
    }

    /// Flushes written data to stable storage (`fdatasync`: on a block device a cache FLUSH),
    /// returning the bare error so callers can name the range it covered.
    pub fn flush_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Drops the kernel's cached pages of the device so later reads come from the disk.
    pub fn drop_caches(&self) -> Result<(), TargetError> {
        if self.kind == TargetKind::BlockDevice {
            // SAFETY: the fd is an open block device; BLKFLSBUF takes no argument.
            unsafe { ioctl::blkflsbuf(self.file.as_raw_fd()) }.map_err(|e| TargetError::Io {
                step: "flushing buffers of",
                path: self.path.clone(),
                source: e.into(),
            })?;
        }
        Ok(())
    }

    /// Asks the kernel to re-read the partition table. Returns `Ok(false)` where the device
    /// does not support it (a loop device without partition scanning).
    pub fn reread_partitions(&self) -> Result<bool, TargetError> {
        if self.kind != TargetKind::BlockDevice {
            return Ok(false);
        }
        // SAFETY: the fd is an open block device; BLKRRPART takes no argument.
        match unsafe { ioctl::blkrrpart(self.file.as_raw_fd()) } {
            Ok(_) => Ok(true),
            Err(nix::errno::Errno::EINVAL) => Ok(false),
            Err(e) => Err(TargetError::Io {
                step: "re-reading the partition table of",
                path: self.path.clone(),
                source: e.into(),
            }),
        }
    }

    /// The open file, for crates (gpt, fatfs) that take `Read + Write + Seek`. Such I/O must use
    /// aligned buffers when the target is direct; prefer [`Self::reopen_buffered`].
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A second, buffered (non-`O_DIRECT`) handle on the same target for small metadata
    /// updates (GPT, FAT) done with crates that use unaligned buffers. The exclusive claim of
    /// the first handle stays in place; call [`Self::drop_caches`] before reading back directly.
    pub fn reopen_buffered(&self) -> Result<File, TargetError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(self.err("reopening"))
    }
}

fn ioctl_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: the fd is an open block device and `size` is a valid u64 the kernel writes into.
    unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

fn ioctl_sector_sizes(file: &File) -> io::Result<(u32, u32)> {
    let mut lss: nix::libc::c_int = 0;
    let mut pss: nix::libc::c_uint = 0;
    // SAFETY: the fd is an open block device and `lss` is a valid int the kernel writes into.
    unsafe { ioctl::blksszget(file.as_raw_fd(), &mut lss) }.map_err(io::Error::from)?;
    // SAFETY: as above, `pss` is a valid unsigned int.
    unsafe { ioctl::blkpbszget(file.as_raw_fd(), &mut pss) }.map_err(io::Error::from)?;
    Ok((lss as u32, pss))
}

/// Whether `path` names something under `/dev` (where only the kernel makes nodes).
fn under_dev(path: &Path) -> bool {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    // The parent exists (the target does not): resolve it, so `/dev/../dev/x` and symlinks
    // into /dev count too.
    let parent = abs
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .unwrap_or_else(|| abs.clone());
    parent.starts_with("/dev") || abs.starts_with("/dev")
}

/// Names of the loop devices (`loop3`) whose backing file is the file with identity
/// `(st_dev, st_ino)`, from `/sys/block/loop*/loop/backing_file`.
pub fn loops_backed_by(sys_root: &Path, identity: (u64, u64)) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(sys_root.join("block")) else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(backing.trim_end_matches('\n')) {
            if (m.dev(), m.ino()) == identity {
                found.push(name);
            }
        }
    }
    found.sort();
    found
}

/// `major:minor` of a device number.
fn dev_string(rdev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}

/// Checks, from sysfs and procfs, that the whole disk `path` (device number `rdev`) and its
/// partitions are not mounted, not used as swap, and not held by device-mapper, md or similar.
pub fn check_block_device_free(
    path: &Path,
    rdev: u64,
    sys_root: &Path,
    proc_root: &Path,
) -> Result<(), TargetError> {
    let devno = dev_string(rdev);
    let sysdir = sys_root.join("dev/block").join(&devno);
    let sysdir = std::fs::canonicalize(&sysdir).map_err(|source| TargetError::Io {
        step: "finding the sysfs entry of",
        path: path.to_owned(),
        source,
    })?;
    if sysdir.join("partition").exists() {
        let disk = sysdir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| format!("/dev/{}", n.to_string_lossy()))
            .unwrap_or_else(|| "the parent disk".into());
        return Err(TargetError::Partition {
            path: path.to_owned(),
            disk,
        });
    }
    // The disk and its partitions: (name, major:minor, sysfs dir).
    let disk_name = sysdir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut members = vec![(disk_name.clone(), devno, sysdir.clone())];
    if let Ok(entries) = std::fs::read_dir(&sysdir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&disk_name) && e.path().join("partition").exists() {
                if let Ok(d) = std::fs::read_to_string(e.path().join("dev")) {
                    members.push((name, d.trim().to_owned(), e.path()));
                }
            }
        }
    }
    let mut uses = Vec::new();
    // Holders: device-mapper (LVM, LUKS), md RAID, bcache… anything stacked on top.
    for (name, _, dir) in &members {
        if let Ok(h) = std::fs::read_dir(dir.join("holders")) {
            for e in h.flatten() {
                uses.push(format!(
                    "/dev/{name} is held by {}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    // Mounts: field 3 of mountinfo is major:minor, field 10 the source.
    let mountinfo = std::fs::read_to_string(proc_root.join("self/mountinfo")).unwrap_or_default();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 {
            continue;
        }
        let source = line
            .split(" - ")
            .nth(1)
            .and_then(|r| r.split(' ').nth(1))
            .unwrap_or("");
        for (name, dev, _) in &members {
            if f[2] == dev || source == format!("/dev/{name}") {
                uses.push(format!("/dev/{name} is mounted on {}", f[4]));
            }
        }
    }
    // Swap: /proc/swaps lists paths.
    let swaps = std::fs::read_to_string(proc_root.join("swaps")).unwrap_or_default();
    for line in swaps.lines().skip(1) {
        let Some(dev) = line.split_whitespace().next() else {
            continue;
        };
        let canon = std::fs::canonicalize(dev).unwrap_or_else(|_| PathBuf::from(dev));
        for (name, _, _) in &members {
            if canon == Path::new("/dev").join(name) {
                uses.push(format!("/dev/{name} is used as swap"));
            }
        }
    }
    uses.dedup();
    if uses.is_empty() {
        Ok(())
    } else {
        Err(TargetError::InUse {
            path: path.to_owned(),
            what: uses.join("; "),
        })
    }
}

/// A window onto one partition of a disk image or device: `Read + Write + Seek` confined to
/// `[start, start + len)`, so code that formats or fills a partition (`fatfs` for the stick's
/// ESP and the `CIDATA` seed) cannot touch anything outside it.
#[derive(Debug)]
pub struct PartitionSlice<'a> {
    file: &'a mut File,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'a> PartitionSlice<'a> {
    /// The window `[start, start + len)` of `file`.
    pub fn new(file: &'a mut File, start: u64, len: u64) -> Self {
        PartitionSlice {
            file,
            start,
            len,
            pos: 0,
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }
}

impl io::Read for PartitionSlice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::{Seek, SeekFrom};
        let n = (buf.len() as u64).min(self.remaining()) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl io::Write for PartitionSlice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::io::{Seek, SeekFrom};
        let n = (buf.len() as u64).min(self.remaining()) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.file.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl io::Seek for PartitionSlice<'_> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let new = match to {
            io::SeekFrom::Start(o) => Some(o),
            io::SeekFrom::End(o) => self.len.checked_add_signed(o),
            io::SeekFrom::Current(o) => self.pos.checked_add_signed(o),
        };
        match new {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}

/// A heap buffer whose data starts on an [`ALIGN`] boundary, as `O_DIRECT` needs. Built from a
/// plain `Vec` with slack, so no unsafe allocation code is needed.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + ALIGN];
        let addr = storage.as_ptr() as usize;
        let offset = (ALIGN - addr % ALIGN) % ALIGN;
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }
    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer has no capacity.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The aligned bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }
    /// The aligned bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [512, 4096, 1 << 20] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.as_slice().len(), len);
        }
    }

    fn fake_tree(mounted: bool, holder: bool, swap: bool) -> (tempfile::TempDir, u64) {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        let disk = sys.join("devices/pci0000:00/nvme/nvme0/nvme0n1");
        std::fs::create_dir_all(disk.join("holders")).unwrap();
        std::fs::create_dir_all(disk.join("nvme0n1p1/holders")).unwrap();
        std::fs::write(disk.join("dev"), "259:0\n").unwrap();
        std::fs::write(disk.join("nvme0n1p1/dev"), "259:1\n").unwrap();
        std::fs::write(disk.join("nvme0n1p1/partition"), "1\n").unwrap();
        if holder {
            std::fs::create_dir_all(disk.join("nvme0n1p1/holders/dm-0")).unwrap();
        }
        std::fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&disk, sys.join("dev/block/259:0")).unwrap();
        std::os::unix::fs::symlink(disk.join("nvme0n1p1"), sys.join("dev/block/259:1")).unwrap();
        let proc_ = t.path().join("proc");
        std::fs::create_dir_all(proc_.join("self")).unwrap();
        let mut mi = String::from("22 1 0:21 / /proc rw - proc proc rw\n");
        if mounted {
            mi.push_str("30 1 259:1 / /mnt rw,relatime - ext4 /dev/nvme0n1p1 rw\n");
        }
        std::fs::write(proc_.join("self/mountinfo"), mi).unwrap();
        let mut sw = String::from("Filename Type Size Used Priority\n");
        if swap {
            sw.push_str("/dev/nvme0n1p1 partition 100 0 -2\n");
        }
        std::fs::write(proc_.join("swaps"), sw).unwrap();
        (t, nix::sys::stat::makedev(259, 0))
    }

    /// The exclusivity check of `dev` (device number `rdev`) against the fake tree `t`.
    fn check_in(t: &tempfile::TempDir, dev: &str, rdev: u64) -> Result<(), TargetError> {
        check_block_device_free(
            Path::new(dev),
            rdev,
            &t.path().join("sys"),
            &t.path().join("proc"),
        )
    }

    #[test]
    fn free_disk_passes() {
        let (t, rdev) = fake_tree(false, false, false);
        check_in(&t, "/dev/nvme0n1", rdev).unwrap();
    }

    #[test]
    fn mounted_partition_is_refused() {
        let (t, rdev) = fake_tree(true, false, false);
        let e = check_in(&t, "/dev/nvme0n1", rdev).unwrap_err();
        assert!(
            e.to_string().contains("nvme0n1p1 is mounted on /mnt"),
            "{e}"
        );
    }

    #[test]
    fn swap_partition_is_refused() {
        let (t, rdev) = fake_tree(false, false, true);
        let e = check_in(&t, "/dev/nvme0n1", rdev).unwrap_err();
        assert!(e.to_string().contains("nvme0n1p1 is used as swap"), "{e}");
    }

    #[test]
    fn held_partition_is_refused() {
        let (t, rdev) = fake_tree(false, true, false);
        let e = check_in(&t, "/dev/nvme0n1", rdev).unwrap_err();
        assert!(e.to_string().contains("held by dm-0"), "{e}");
    }

    #[test]
    fn partition_is_refused() {
        let (t, _) = fake_tree(false, false, false);
        let e = check_in(&t, "/dev/nvme0n1p1", nix::sys::stat::makedev(259, 1)).unwrap_err();
        assert!(matches!(e, TargetError::Partition { .. }), "{e}");
    }

    #[test]
    fn file_target_zero_range_reads_zero() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("disk");
        std::fs::write(&p, vec![0xAAu8; 3 << 20]).unwrap();
        let tgt = Target::open(&p, &OpenOptionsTarget::default()).unwrap();
        tgt.zero_range(1 << 20, 1 << 20).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert!(data[..1 << 20].iter().all(|&b| b == 0xAA));
        assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert!(data[2 << 20..].iter().all(|&b| b == 0xAA));
    }
}
