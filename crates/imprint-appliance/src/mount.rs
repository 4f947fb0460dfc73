//! Mounts as guards: a [`Mount`] is unmounted when it is dropped, so no exit path of the flow
//! forgets the stick or the installed root filesystem. [`Mount::unmount`] does the same
//! explicitly and says whether it worked (the flow calls it before powering off or rebooting:
//! PID 1's endings never return, so a guard held across them would never drop).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{mount, umount, MsFlags};

/// A mounted filesystem, unmounted (after a sync) on drop.
#[derive(Debug)]
pub struct Mount {
    /// `None` once unmounted.
    target: Option<PathBuf>,
}

impl Mount {
    /// Mounts `source` (a block device) on `target` (created if missing) as `fstype`.
    pub fn new(
        source: &Path,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<Mount> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating {}", target.display()))?;
        mount(Some(source), target, Some(fstype), flags, data).with_context(|| {
            format!(
                "mounting {} ({fstype}) on {}",
                source.display(),
                target.display()
            )
        })?;
        Ok(Mount {
            target: Some(target.to_path_buf()),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.target.as_deref().unwrap_or(Path::new("/"))
    }

    /// Syncs and unmounts now, reporting a failure (a busy or vanished filesystem).
    pub fn unmount(mut self) -> Result<()> {
        match self.target.take() {
            Some(t) => {
                nix::unistd::sync();
                umount(&t).with_context(|| format!("unmounting {}", t.display()))
            }
            None => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            nix::unistd::sync();
            let _ = umount(&t);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mounted(target: &Path) -> bool {
        let target = target.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
    }

    #[test]
    fn a_mount_is_gone_when_its_guard_drops_or_is_unmounted() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("mnt");
        {
            let m = Mount::new(
                Path::new("tmpfs"),
                &target,
                "tmpfs",
                MsFlags::empty(),
                Some("size=1m"),
            )
            .unwrap();
            std::fs::write(m.path().join("f"), b"x").unwrap();
            assert!(mounted(&target));
        }
        assert!(!mounted(&target), "dropped: unmounted");
        assert!(!target.join("f").exists());
        let m = Mount::new(Path::new("tmpfs"), &target, "tmpfs", MsFlags::empty(), None).unwrap();
        m.unmount().unwrap();
        assert!(!mounted(&target), "unmounted explicitly");
        let err = Mount::new(
            Path::new("/nonexistent-dev"),
            &target,
            "ext4",
            MsFlags::empty(),
            None,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent-dev"), "{err:#}");
    }
}
