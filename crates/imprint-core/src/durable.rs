//! Replacing a small file so that it is on the medium, whole, before the caller goes on.
//!
//! The appliance writes its report and the stick's record of installs to a FAT filesystem and
//! then prints DONE, reboots or powers off; a person may pull the stick or the power at any
//! moment after that. The usual write-to-temporary, `fsync`, `rename`, `fsync(dir)` is not
//! enough on FAT: Linux's vfat `rename` creates the new directory entry with size 0 and no first
//! cluster, and only the renamed file's own inode write-back fills them in. Syncing the
//! directory writes the empty entry; the file's size reaches the medium with the next
//! write-back of its inode — or never, when the power goes first. So after the rename the file
//! itself is synced again (which writes its directory entry), then the directory.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through `<path>.tmp` and a rename, and returns once the new
/// contents, size and name are on the medium (file, renamed entry and directory synced). A
/// crash at any point leaves the old file or the new one, never a mix; an old `.tmp` left
/// by such a crash is replaced.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // On FAT the renamed entry holds size 0 until the file's inode is written back.
    File::open(path)?.sync_all()?;
    File::open(&dir)?.sync_all()?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // The FAT half of the promise (the renamed entry's size on the medium without an unmount)
    // needs a kernel with vfat; this machine's has none, so it is not shown here. The appliance
    // also unmounts the stick before it prints DONE (safety.rs kills the VM at DONE and reads
    // the report), so the console never announces what is not on the stick.

    #[test]
    fn a_replaced_file_holds_the_new_bytes_and_no_temporary_is_left() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("report.json");
        replace_file(&path, b"first").unwrap();
        replace_file(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["report.json"]);
    }

    #[test]
    fn a_stale_temporary_from_a_crash_is_replaced() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("provisioned.cfg");
        std::fs::write(t.path().join("provisioned.cfg.tmp"), b"half a file").unwrap();
        replace_file(&path, b"whole\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole\n");
        assert!(!t.path().join("provisioned.cfg.tmp").exists());
    }
}
