//! Root-filesystem seed placement: the seed written into the image's root filesystem on the
//! target, through a loop device over the partition's range, inside the install transaction.

use std::path::Path;

use anyhow::{Context, Result};
use imprint_core::loopdev::LoopDevice;
use imprint_core::seed;
use nix::mount::MsFlags;

use crate::mount::Mount;

/// Where the target's root filesystem is mounted for root-filesystem seed placement.
const ROOT_MNT: &str = "/run/imprint/root";

/// Puts the seed into the root filesystem at bytes `offset..offset + len` of `disk` (before
/// the commit: the kernel knows no partition there yet), then reads it back through a fresh
/// read-only mount.
pub(crate) fn seed_into_root(
    dev: &Path,
    disk: &Path,
    offset: u64,
    len: u64,
    rendered: &seed::RenderedSeed,
) -> Result<seed::SeedPlacement> {
    let dir = Path::new(ROOT_MNT).join(seed::ROOTFS_SEED_DIR);
    let placement = {
        let lo = LoopDevice::attach(dev, disk, offset, len, false)?;
        let m = Mount::new(
            lo.path(),
            Path::new(ROOT_MNT),
            "ext4",
            MsFlags::MS_NOATIME,
            None,
        )
        .context("mounting the image's root filesystem")?;
        let placed = seed::inject_into_dir(&dir, rendered)?;
        m.unmount()?;
        placed
    };
    let lo = LoopDevice::attach(dev, disk, offset, len, true)?;
    let m = Mount::new(
        lo.path(),
        Path::new(ROOT_MNT),
        "ext4",
        MsFlags::MS_RDONLY,
        None,
    )
    .context("mounting the image's root filesystem read-only")?;
    seed::verify_dir(&dir, rendered).context("reading the seed back from the root filesystem")?;
    m.unmount()?;
    Ok(placement)
}
