//! Global EFI variables as efivarfs files: reading, writing in one `write()` with the attribute
//! word, read-back check, and the immutable flag efivarfs sets on existing files.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{EfiError, BOOT_VARIABLE_ATTRIBUTES, EFI_GLOBAL_VARIABLE};

/// `EFIVARFS_MAGIC` from `<linux/magic.h>`: tells the real efivarfs from a test directory.
const EFIVARFS_MAGIC: i128 = 0xde5e_81e4;

/// One variable's content: the attribute word and the data after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// `EFI_VARIABLE_*` bits.
    pub attributes: u32,
    /// The data, without the attribute word.
    pub data: Vec<u8>,
}

/// The efivarfs file of a global variable.
pub(super) fn variable_path(efivars: &Path, name: &str) -> PathBuf {
    efivars.join(format!("{name}-{EFI_GLOBAL_VARIABLE}"))
}

/// The name of boot option `num`: `Boot` and four upper-case hex digits, as the spec requires.
pub fn boot_entry_name(num: u16) -> String {
    format!("Boot{num:04X}")
}

/// Reads a global variable; `None` if it does not exist.
pub fn read_variable(efivars: &Path, name: &str) -> Result<Option<Variable>, EfiError> {
    let path = variable_path(efivars, name);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EfiError::Read {
                name: name.to_owned(),
                path,
                source,
            })
        }
    };
    let Some((attributes, data)) = bytes.split_first_chunk::<4>() else {
        return Err(EfiError::Malformed {
            name: name.to_owned(),
            path,
            reason: format!("{} bytes, no room for the attribute word", bytes.len()),
        });
    };
    Ok(Some(Variable {
        attributes: u32::from_le_bytes(*attributes),
        data: data.to_vec(),
    }))
}

/// Writes a global variable in one `write()`, over an existing (immutable) file or as a new
/// one, then reads it back to check the firmware stored it.
pub fn write_variable(efivars: &Path, name: &str, var: &Variable) -> Result<(), EfiError> {
    let path = variable_path(efivars, name);
    let mut buf = Vec::with_capacity(4 + var.data.len());
    buf.extend_from_slice(&var.attributes.to_le_bytes());
    buf.extend_from_slice(&var.data);

    let immutable = ImmutableGuard::clear(&path).map_err(|source| EfiError::Immutable {
        name: name.to_owned(),
        path: path.clone(),
        source,
    })?;
    let write_err = |source| EfiError::Write {
        name: name.to_owned(),
        path: path.clone(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create(true).mode(0o644);
    // efivarfs replaces the variable with what one write() carries and has no truncate; a
    // plain directory (the tests) needs O_TRUNC to drop a longer old content.
    if !is_efivarfs(efivars) {
        options.truncate(true);
    }
    let mut file = options.open(&path).map_err(write_err)?;
    let written = loop {
        match file.write(&buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(write_err(e)),
        }
    };
    drop(file);
    drop(immutable);
    if written != buf.len() {
        return Err(EfiError::ShortWrite {
            name: name.to_owned(),
            path,
            written,
            len: buf.len(),
        });
    }
    match read_variable(efivars, name)? {
        Some(back)
            if back.data == var.data
                && back.attributes & BOOT_VARIABLE_ATTRIBUTES
                    == var.attributes & BOOT_VARIABLE_ATTRIBUTES =>
        {
            Ok(())
        }
        _ => Err(EfiError::Verify {
            name: name.to_owned(),
            path,
        }),
    }
}

fn is_efivarfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        // f_type is a signed long on glibc and an unsigned one on musl.
        .map(|s| i128::from(s.filesystem_type().0) == EFIVARFS_MAGIC)
        .unwrap_or(false)
}

/// Reads a variable holding one `u16` (`BootCurrent`, `BootNext`).
pub(super) fn read_u16_variable(efivars: &Path, name: &str) -> Result<Option<u16>, EfiError> {
    let Some(var) = read_variable(efivars, name)? else {
        return Ok(None);
    };
    match <[u8; 2]>::try_from(var.data.as_slice()) {
        Ok(bytes) => Ok(Some(u16::from_le_bytes(bytes))),
        Err(_) => Err(EfiError::Malformed {
            name: name.to_owned(),
            path: variable_path(efivars, name),
            reason: format!("{} bytes of data, expected 2", var.data.len()),
        }),
    }
}

/// Clears `FS_IMMUTABLE_FL` on an existing variable file and puts it back when dropped.
struct ImmutableGuard {
    path: Option<PathBuf>,
}

impl ImmutableGuard {
    fn clear(path: &Path) -> io::Result<Self> {
        let none = ImmutableGuard { path: None };
        let file = match fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(none),
            Err(e) => return Err(e),
        };
        let Some(flags) = ioctl::get_flags(&file)? else {
            // The filesystem has no inode flags (a test directory): nothing to clear.
            return Ok(none);
        };
        if flags & ioctl::FS_IMMUTABLE_FL == 0 {
            return Ok(none);
        }
        ioctl::set_flags(&file, flags & !ioctl::FS_IMMUTABLE_FL)?;
        Ok(ImmutableGuard {
            path: Some(path.to_owned()),
        })
    }
}

impl Drop for ImmutableGuard {
    fn drop(&mut self) {
        // Best effort: the flag only protects against accidental deletion by root; a variable
        // left mutable is still correct.
        if let Some(path) = &self.path {
            if let Ok(file) = fs::File::open(path) {
                if let Ok(Some(flags)) = ioctl::get_flags(&file) {
                    let _ = ioctl::set_flags(&file, flags | ioctl::FS_IMMUTABLE_FL);
                }
            }
        }
    }
}

/// `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS`, reached only through the safe functions below.
mod ioctl {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::libc::{c_int, c_long};

    /// `FS_IMMUTABLE_FL` from `<linux/fs.h>`.
    pub const FS_IMMUTABLE_FL: c_int = 0x10;

    // The request numbers encode sizeof(long) (`_IOR('f', 1, long)`), but the kernel reads and
    // writes an int, as chattr and systemd pass it.
    nix::ioctl_read_bad!(
        fs_ioc_getflags,
        nix::request_code_read!(b'f', 1, std::mem::size_of::<c_long>()),
        c_int
    );
    nix::ioctl_write_ptr_bad!(
        fs_ioc_setflags,
        nix::request_code_write!(b'f', 2, std::mem::size_of::<c_long>()),
        c_int
    );

    fn unsupported(e: Errno) -> bool {
        matches!(e, Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::ENOSYS)
    }

    /// The inode flags, or `None` where the filesystem has none (ENOTTY/EOPNOTSUPP).
    pub fn get_flags(file: &File) -> io::Result<Option<c_int>> {
        let mut flags: c_int = 0;
        // SAFETY: the fd is open for the lifetime of `file`; the kernel writes one int to
        // `flags`, which is a live, properly aligned c_int.
        match unsafe { fs_ioc_getflags(file.as_raw_fd(), &mut flags) } {
            Ok(_) => Ok(Some(flags)),
            Err(e) if unsupported(e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the inode flags; a filesystem without flags is not an error.
    pub fn set_flags(file: &File, flags: c_int) -> io::Result<()> {
        // SAFETY: the fd is open for the lifetime of `file`; the kernel only reads one int
        // from `&flags`, which lives across the call.
        match unsafe { fs_ioc_setflags(file.as_raw_fd(), &flags) } {
            Ok(_) => Ok(()),
            Err(e) if unsupported(e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_util {
    //! Raw variable files in a fake efivarfs folder, for the EFI modules' tests.
    use super::*;

    /// Writes variable `name` as efivarfs stores it: attribute word, then the data.
    pub fn write_raw(dir: &Path, name: &str, attributes: u32, data: &[u8]) {
        let mut bytes = attributes.to_le_bytes().to_vec();
        bytes.extend_from_slice(data);
        fs::write(variable_path(dir, name), bytes).unwrap();
    }

    /// Variable `name`'s file, attribute word included.
    pub fn read_raw(dir: &Path, name: &str) -> Vec<u8> {
        fs::read(variable_path(dir, name)).unwrap()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_util::{read_raw, write_raw};
    use super::*;

    #[test]
    fn efi_write_over_an_immutable_file_restores_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), "BootNext", 7, &[1, 0]);
        let path = variable_path(dir.path(), "BootNext");
        let file = fs::File::open(&path).unwrap();
        let Some(flags) = ioctl::get_flags(&file).unwrap() else {
            return; // no inode flags on this filesystem
        };
        if ioctl::set_flags(&file, flags | ioctl::FS_IMMUTABLE_FL).is_err() {
            return; // not root (CAP_LINUX_IMMUTABLE)
        }
        let set = ioctl::get_flags(&file).unwrap().unwrap_or(0) & ioctl::FS_IMMUTABLE_FL != 0;
        let result = crate::efi::set_boot_next(dir.path(), 4);
        let after = ioctl::get_flags(&file).unwrap().unwrap_or(0);
        // Clear it so the temp dir can be removed whatever happened.
        ioctl::set_flags(&file, after & !ioctl::FS_IMMUTABLE_FL).unwrap();
        result.unwrap();
        assert_eq!(read_raw(dir.path(), "BootNext"), vec![7, 0, 0, 0, 4, 0]);
        if set {
            assert_ne!(after & ioctl::FS_IMMUTABLE_FL, 0, "flag restored");
        }
    }
}
