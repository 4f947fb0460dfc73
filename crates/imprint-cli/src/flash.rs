//! `imprint flash`: builds the provisioning stick and writes it straight to a USB device with
//! the same verified engine as `imprint write` (partition table last, read back, backup GPT
//! moved to the stick's end).
//!
//! It refuses anything that is not a USB or removable disk unless `--force`, and anything
//! mounted, used as swap or held (the engine's checks), and asks before overwriting.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imprint_core::blockdev::{OpenOptionsTarget, Target, TargetKind};
use imprint_core::discover::{self, Transport};
use imprint_core::manifest::Image;
use imprint_core::write::{self, WriteOptions};

use crate::commands::{confirm_overwrite, outln, progress_for, quoted, Refused};
use crate::output::detail;
use crate::stick;
use crate::units;

/// What `imprint flash` is asked to do.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    /// The stick's contents, as for `imprint build` (its `output` is ignored).
    pub build: stick::BuildOptions,
    /// The USB device.
    pub device: PathBuf,
    /// Do not ask.
    pub yes: bool,
    /// Allow a device that is neither USB nor removable.
    pub force: bool,
    /// JSON progress events and result on standard output.
    pub json: bool,
}

/// Runs `imprint flash`.
pub fn flash(opts: &FlashOptions) -> Result<()> {
    let dev = &opts.device;
    let meta = std::fs::metadata(dev).with_context(|| format!("looking at {}", dev.display()))?;
    {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_block_device() {
            return Err(Refused(format!(
                "{} is not a block device; to make a stick image file use `imprint build -o FILE`",
                dev.display()
            ))
            .into());
        }
    }
    let name = std::fs::canonicalize(dev)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let disks = discover::scan(Path::new("/sys")).context("listing disks")?;
    let what = match disks.iter().find(|d| d.name == name) {
        Some(disk) => {
            if disk.transport != Transport::Usb && !disk.removable && !opts.force {
                return Err(Refused(format!(
                    "{} is a {} disk, neither USB nor removable: refusing to turn it into a stick (pass --force if you really mean it)",
                    dev.display(),
                    disk.transport
                ))
                .into());
            }
            format!(
                "{} ({}, model {}, serial {}, partitions: {})",
                dev.display(),
                units::size(disk.size),
                quoted(disk.model.as_deref().unwrap_or("unknown")),
                quoted(disk.serial.as_deref().unwrap_or("unknown")),
                if disk.partitions.is_empty() {
                    "none".to_string()
                } else {
                    disk.partitions.iter().map(|p| p.name.clone()).collect::<Vec<_>>().join(" ")
                }
            )
        }
        // Partitions, loop and device-mapper devices are not disks discovery lists.
        None if opts.force => format!("{} (not a disk imprint classifies, e.g. a loop device)", dev.display()),
        None => {
            return Err(Refused(format!(
                "{} is not a whole USB or removable disk (a partition, loop or device-mapper device?); give the stick's whole disk, e.g. /dev/sdb",
                dev.display()
            ))
            .into())
        }
    };
    // Open (and with it, check exclusivity) before building: a busy device is refused early.
    let target = Target::open(dev, &OpenOptionsTarget::default())?;
    debug_assert_eq!(target.kind(), TargetKind::BlockDevice);
    if !opts.yes {
        confirm_overwrite(
            &format!("{what} will become an imprint stick. Everything on it will be lost."),
            &format!("Overwrite {}?", dev.display()),
        )?;
    }

    let tmp = tempdir_for_stick()?;
    imprint_core::input::register_temporary(tmp.path());
    let stick_file = tmp.path().join("stick.img");
    let mut build = opts.build.clone();
    build.output = stick_file.clone();
    let result = (|| -> Result<()> {
        let layout = stick::build(&build)?;
        if layout.size > target.size() {
            bail!(
                "{} holds {} but the stick needs {}; use a larger stick",
                dev.display(),
                units::size(target.size()),
                units::size(layout.size)
            );
        }
        let image = Image::from_raw_file(&stick_file, "imprint stick")
            .context("reading the built stick image")?;
        let progress = progress_for(opts.json);
        let report =
            write::write_image(&image, &target, &WriteOptions::default(), progress.as_ref())
                .with_context(|| format!("writing the stick to {}", dev.display()))?;
        drop(progress);
        let secs = report.write_seconds + report.verify_seconds + report.commit_seconds;
        if opts.json {
            outln!(
                "{}",
                serde_json::json!({
                    "event": "result",
                    "ok": true,
                    "device": dev,
                    "image": opts.build.image,
                    "image_name": layout.image_name,
                    "esp_partuuid": layout.esp_partuuid.to_string(),
                    "report": report,
                })
            );
        } else {
            detail!(
                "phases: write {}, read-back {}, partition table {}",
                units::duration(report.write_seconds),
                units::duration(report.verify_seconds),
                units::duration(report.commit_seconds)
            );
            outln!(
                "{} is an imprint stick with {}: {} written and read back in {} ({})",
                dev.display(),
                quoted(&layout.image_name),
                units::size(report.raw_size),
                units::duration(secs),
                units::rate(report.raw_size, secs)
            );
        }
        Ok(())
    })();
    imprint_core::input::unregister_temporary(tmp.path());
    drop(tmp); // removes the folder and the stick image
    result
}

/// A private folder for the stick image under `$TMPDIR` (or /var/tmp: a stick image can be
/// larger than a RAM-backed /tmp): a fresh, unpredictable name made with mode 0700, never an
/// existing folder, so nobody can plant a link where root writes the stick image.
fn tempdir_for_stick() -> Result<tempfile::TempDir> {
    let base = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    tempdir_in(&base)
}

fn tempdir_in(base: &std::path::Path) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("imprint-flash-")
        // Explicit: tempfile makes folders with the umask's mode (0755) unless told.
        .permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700))
        .tempdir_in(base)
        .with_context(|| format!("creating a private folder in {}", base.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stick_tempdir_is_private_fresh_and_ignores_planted_names() {
        let base = tempfile::tempdir().unwrap();
        let victim = base.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // What 0.1.0 would have used (`imprint-flash-<pid>`), planted as a link to a folder
        // the attacker controls.
        let planted = base
            .path()
            .join(format!("imprint-flash-{}", std::process::id()));
        std::os::unix::fs::symlink(base.path(), &planted).unwrap();
        let a = tempdir_in(base.path()).unwrap();
        let b = tempdir_in(base.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert_ne!(a.path(), planted.as_path());
        let meta = std::fs::symlink_metadata(a.path()).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        std::fs::write(a.path().join("stick.img"), b"stick").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let pa = a.path().to_owned();
        drop(a);
        assert!(!pa.exists());
    }
}
