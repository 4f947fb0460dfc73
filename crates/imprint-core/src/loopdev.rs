//! A loop device over a byte range of a disk, released on drop.
//!
//! The install transaction puts the seed into the image's root filesystem *before* it commits
//! the partition table, when the kernel knows no partition on the target yet: the appliance
//! mounts the root partition through a loop device over that partition's byte range of the
//! disk instead. The loop device reads and writes the disk itself (not a copy), and the guard
//! detaches it on every exit path.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

mod ioctl {
    //! Loop-device ioctls (linux/loop.h), declared with nix's macros. Only [`super`] calls them.

    /// `struct loop_info64`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct LoopInfo64 {
        pub lo_device: u64,
        pub lo_inode: u64,
        pub lo_rdevice: u64,
        pub lo_offset: u64,
        pub lo_sizelimit: u64,
        pub lo_number: u32,
        pub lo_encrypt_type: u32,
        pub lo_encrypt_key_size: u32,
        pub lo_flags: u32,
        pub lo_file_name: [u8; 64],
        pub lo_crypt_name: [u8; 64],
        pub lo_encrypt_key: [u8; 32],
        pub lo_init: [u64; 2],
    }

    /// `struct loop_config` (LOOP_CONFIGURE, Linux 5.8+).
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct LoopConfig {
        pub fd: u32,
        pub block_size: u32,
        pub info: LoopInfo64,
        pub reserved: [u64; 8],
    }

    /// `LO_FLAGS_READ_ONLY`.
    pub const LO_FLAGS_READ_ONLY: u32 = 1;
    /// `LO_FLAGS_AUTOCLEAR`: the kernel detaches the device when its last user closes it.
    pub const LO_FLAGS_AUTOCLEAR: u32 = 4;

    // LOOP_CTL_GET_FREE = 0x4C82: the number of a free loop device (allocated if needed).
    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
    // LOOP_CONFIGURE = 0x4C0A: bind a backing fd with offset, size limit and flags.
    nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
    // LOOP_CLR_FD = 0x4C01: unbind.
    nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
}

/// Errors setting up a loop device.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// A step failed.
    #[error("{step} (loop device over {backing}, bytes {offset}..{end})")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The backing disk.
        backing: PathBuf,
        /// First byte.
        offset: u64,
        /// End (exclusive).
        end: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A loop device bound to `len` bytes of a disk at `offset`; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    file: File,
}

impl LoopDevice {
    /// Binds a free loop device to bytes `offset..offset + len` of `backing` (read-only when
    /// `read_only`). `dev` is the device directory (`/dev`). The backing is opened without
    /// `O_EXCL`, so it works while the write engine holds the disk exclusively.
    pub fn attach(
        dev: &Path,
        backing: &Path,
        offset: u64,
        len: u64,
        read_only: bool,
    ) -> Result<LoopDevice, LoopError> {
        let err = |step| {
            let backing = backing.to_path_buf();
            move |source| LoopError::Io {
                step,
                backing,
                offset,
                end: offset + len,
                source,
            }
        };
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev.join("loop-control"))
            .map_err(err("opening loop-control (is the loop module loaded?)"))?;
        let back = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(backing)
            .map_err(err("opening the backing disk"))?;
        // A free device can be taken by someone else between GET_FREE and CONFIGURE (EBUSY):
        // try a few times.
        let mut last = None;
        for _ in 0..8 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is an open loop-control fd.
            let n = unsafe { ioctl::loop_ctl_get_free(control.as_raw_fd()) }
                .map_err(|e| err("finding a free loop device")(std::io::Error::from(e)))?;
            let path = dev.join(format!("loop{n}"));
            let file = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(&path)
                .map_err(err("opening the loop device"))?;
            let mut flags = ioctl::LO_FLAGS_AUTOCLEAR;
            if read_only {
                flags |= ioctl::LO_FLAGS_READ_ONLY;
            }
            let cfg = ioctl::LoopConfig {
                fd: back.as_raw_fd() as u32,
                block_size: 0,
                info: ioctl::LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: offset,
                    lo_sizelimit: len,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: flags,
                    lo_file_name: [0; 64],
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: `cfg` is a fully initialised `struct loop_config` that lives across the
            // call; the kernel only reads it. `file` is an open loop device fd.
            match unsafe { ioctl::loop_configure(file.as_raw_fd(), &cfg) } {
                Ok(_) => return Ok(LoopDevice { path, file }),
                Err(nix::errno::Errno::EBUSY) => last = Some(nix::errno::Errno::EBUSY),
                Err(e) => return Err(err("binding the loop device")(e.into())),
            }
        }
        Err(err("binding a loop device (all busy)")(
            std::io::Error::from(last.unwrap_or(nix::errno::Errno::EBUSY)),
        ))
    }

    /// The loop device node (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // With AUTOCLEAR the kernel also detaches when the last user (a mount) goes away;
        // clearing explicitly makes it immediate. An error means it is detached already.
        // SAFETY: LOOP_CLR_FD takes no argument; `file` is an open loop device fd.
        let _ = unsafe { ioctl::loop_clr_fd(self.file.as_raw_fd()) };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn a_loop_device_reads_and_writes_its_range_of_the_backing_disk() {
        if !nix::unistd::Uid::effective().is_root() || !Path::new("/dev/loop-control").exists() {
            // Loop devices need root; scripts/test runs as root, where this test is real.
            panic!("this test needs root and /dev/loop-control (scripts/test runs it as root)");
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![0x11u8; 8 << 20]).unwrap();
        {
            let lo = LoopDevice::attach(Path::new("/dev"), &disk, 2 << 20, 1 << 20, false).unwrap();
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(lo.path())
                .unwrap();
            // Its size is the range, and it starts at the offset.
            assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 1 << 20);
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(b"SEED").unwrap();
            f.sync_all().unwrap();
            let ro = LoopDevice::attach(Path::new("/dev"), &disk, 2 << 20, 1 << 20, true).unwrap();
            let mut g = File::open(ro.path()).unwrap();
            let mut b = [0u8; 4];
            g.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"SEED");
            let written = OpenOptions::new()
                .write(true)
                .open(ro.path())
                .and_then(|mut w| w.write_all(b"x").and_then(|_| w.sync_all()));
            assert!(written.is_err(), "a read-only loop device took a write");
        }
        let bytes = std::fs::read(&disk).unwrap();
        assert_eq!(&bytes[2 << 20..(2 << 20) + 4], b"SEED");
        assert!(bytes[..2 << 20].iter().all(|&b| b == 0x11));
        assert!(bytes[(2 << 20) + 4..].iter().all(|&b| b == 0x11));
    }
}
