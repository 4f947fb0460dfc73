//! Where the live image's boot files (image-build/build's output: shim, GRUB, kernel, initrd,
//! grub.cfg template) are, for `imprint build` and `imprint flash`.
//!
//! Looked up in this order; the first folder holding every file of [`stick::BOOT_FILES`] wins:
//!
//! 1. `--boot DIR`
//! 2. `$IMPRINT_BOOT`
//! 3. next to the binary: `<dir of the imprint binary>/../share/imprint/boot` (the release
//!    tarball's `bin/` + `share/` layout; the binary's path is resolved through symlinks)
//! 4. `/usr/share/imprint/boot` (the .deb)
//! 5. `build/boot` in a checkout: under the current directory, then under the checkout the
//!    binary was built in (`target/…/imprint` of a tree holding `image-build/build`)
//!
//! `--boot` and `$IMPRINT_BOOT` are the user's word: the folder is used as given, with no silent
//! fall-back to another copy, and checked with the other inputs (config, seed and image first;
//! `stick::build` names a missing file). Otherwise the error lists every place looked at and
//! why each was passed over, and says how to get the files.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::output::detail;
use crate::stick::BOOT_FILES;

/// Environment variable naming the boot-file folder.
pub const ENV: &str = "IMPRINT_BOOT";
/// Where the .deb installs the boot files.
pub const SYSTEM_DIR: &str = "/usr/share/imprint/boot";
/// The boot-file folder relative to the binary's own folder (release tarball layout).
pub const NEXT_TO_BINARY: &str = "../share/imprint/boot";
/// Where image-build/build writes them, relative to a checkout.
pub const CHECKOUT_DIR: &str = "build/boot";

/// How to get the boot files, for error messages.
const HOW_TO_GET: &str = "get them with the imprint .deb (installs /usr/share/imprint/boot) or \
the release tarball (keeps share/imprint/boot next to bin/imprint), or build them in a checkout \
on Debian with image-build/build; then pass --boot DIR or set IMPRINT_BOOT=DIR if they live elsewhere";

/// The inputs of the lookup: the process's view of the world, as parameters so tests can
/// stand in for the environment, the binary's location and the system folder.
#[derive(Debug, Clone)]
pub struct Places {
    /// `--boot`.
    pub flag: Option<PathBuf>,
    /// `$IMPRINT_BOOT` (empty counts as unset).
    pub env: Option<OsString>,
    /// The running binary, symlinks resolved.
    pub exe: Option<PathBuf>,
    /// The system-wide folder ([`SYSTEM_DIR`] outside tests).
    pub system: PathBuf,
    /// The current directory.
    pub cwd: Option<PathBuf>,
}

impl Places {
    /// This process: its arguments' `--boot`, its environment, its binary, its current folder.
    pub fn of_this_process(flag: Option<PathBuf>) -> Self {
        Places {
            flag,
            env: std::env::var_os(ENV),
            exe: std::env::current_exe().ok(),
            system: PathBuf::from(SYSTEM_DIR),
            cwd: std::env::current_dir().ok(),
        }
    }
}

/// Finds the boot-file folder for `--boot` (or `None`) in this process.
pub fn locate(flag: Option<PathBuf>) -> Result<PathBuf> {
    locate_in(&Places::of_this_process(flag))
}

/// The lookup itself; see the module documentation for the order.
pub fn locate_in(places: &Places) -> Result<PathBuf> {
    if let Some(dir) = &places.flag {
        detail!("boot files: {} (--boot)", dir.display());
        return Ok(dir.clone());
    }
    if let Some(dir) = places.env.as_ref().filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        detail!("boot files: {} (${ENV})", dir.display());
        return Ok(dir);
    }
    let mut looked: Vec<(PathBuf, &str, String)> = Vec::new();
    for (dir, what) in fallbacks(places) {
        if looked.iter().any(|(d, _, _)| *d == dir) {
            continue;
        }
        match missing(&dir) {
            None => {
                detail!("boot files: {} ({what})", dir.display());
                return Ok(dir);
            }
            Some(why) => {
                detail!("boot files: passed over {} ({what}): {why}", dir.display());
                looked.push((dir, what, why))
            }
        }
    }
    let mut msg = String::from("no live-image boot files found; looked at:\n  --boot: not given\n");
    msg.push_str(&format!("  ${ENV}: not set\n"));
    for (dir, what, why) in &looked {
        msg.push_str(&format!("  {} ({what}): {why}\n", dir.display()));
    }
    msg.push_str(HOW_TO_GET);
    bail!(msg)
}

/// The places tried when neither `--boot` nor `$IMPRINT_BOOT` is given, in order.
fn fallbacks(places: &Places) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    let exe_dir = places.exe.as_deref().and_then(Path::parent);
    if let Some(bin) = exe_dir {
        out.push((normalize(&bin.join(NEXT_TO_BINARY)), "next to the binary"));
    }
    out.push((places.system.clone(), "system-wide, from the .deb"));
    if let Some(cwd) = &places.cwd {
        out.push((cwd.join(CHECKOUT_DIR), "checkout: current directory"));
    }
    // A binary built in a checkout lives in <checkout>/target/<profile>/ or
    // <checkout>/target/<triple>/<profile>/.
    if let Some(checkout) = exe_dir.and_then(|bin| {
        bin.ancestors()
            .skip(1)
            .take(3)
            .find(|d| d.join("image-build/build").is_file())
    }) {
        out.push((
            checkout.join(CHECKOUT_DIR),
            "checkout the binary was built in",
        ));
    }
    out
}

/// Why `dir` is not a boot-file folder, or `None` if it is one.
fn missing(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        return Some("no such folder".into());
    }
    let absent: Vec<&str> = BOOT_FILES
        .iter()
        .copied()
        .filter(|rel| !dir.join(rel).is_file())
        .collect();
    (!absent.is_empty()).then(|| format!("incomplete, missing {}", absent.join(", ")))
}

/// `a/bin/../share` → `a/share`, lexically (the binary's folder is already a resolved path).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs;

    /// A complete boot-file folder at `dir`.
    fn boot_dir(dir: &Path) -> PathBuf {
        for rel in BOOT_FILES {
            let p = dir.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, rel.as_bytes()).unwrap();
        }
        dir.to_path_buf()
    }

    /// A tree with an installed-tarball layout, a system folder and a current folder, none
    /// holding boot files yet.
    fn world(root: &Path) -> Places {
        fs::create_dir_all(root.join("opt/imprint/bin")).unwrap();
        fs::create_dir_all(root.join("cwd")).unwrap();
        Places {
            flag: None,
            env: None,
            exe: Some(root.join("opt/imprint/bin/imprint")),
            system: root.join("usr/share/imprint/boot"),
            cwd: Some(root.join("cwd")),
        }
    }

    #[test]
    fn order_is_flag_env_binary_system_checkout() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let mut p = world(r);
        let checkout = boot_dir(&r.join("cwd/build/boot"));
        assert_eq!(locate_in(&p).unwrap(), checkout);
        let system = boot_dir(&p.system);
        assert_eq!(locate_in(&p).unwrap(), system);
        let tarball = boot_dir(&r.join("opt/imprint/share/imprint/boot"));
        assert_eq!(locate_in(&p).unwrap(), tarball);
        let env = boot_dir(&r.join("env"));
        p.env = Some(env.clone().into_os_string());
        assert_eq!(locate_in(&p).unwrap(), env);
        let flag = boot_dir(&r.join("flag"));
        p.flag = Some(flag.clone());
        assert_eq!(locate_in(&p).unwrap(), flag);
    }

    #[test]
    fn checkout_of_the_binary_is_found_from_anywhere() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let mut p = world(r);
        let checkout = r.join("src/imprint");
        fs::create_dir_all(checkout.join("image-build")).unwrap();
        fs::write(checkout.join("image-build/build"), "#!/bin/sh\n").unwrap();
        let boot = boot_dir(&checkout.join("build/boot"));
        p.exe = Some(checkout.join("target/x86_64-unknown-linux-musl/release/imprint"));
        assert_eq!(locate_in(&p).unwrap(), boot);
    }

    #[test]
    fn incomplete_folders_are_passed_over_and_named() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let p = world(r);
        // The tarball folder exists but lacks the kernel; the system copy is whole.
        let tarball = boot_dir(&r.join("opt/imprint/share/imprint/boot"));
        fs::remove_file(tarball.join("vmlinuz")).unwrap();
        let system = boot_dir(&p.system);
        assert_eq!(locate_in(&p).unwrap(), system);

        fs::remove_dir_all(&system).unwrap();
        let err = format!("{:#}", locate_in(&p).unwrap_err());
        let tarball_line = format!(
            "{} (next to the binary): incomplete, missing vmlinuz",
            tarball.display()
        );
        assert!(err.contains(&tarball_line), "{err}");
        assert!(
            err.contains(&format!(
                "{} (system-wide, from the .deb): no such folder",
                p.system.display()
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "{} (checkout: current directory): no such folder",
                r.join("cwd/build/boot").display()
            )),
            "{err}"
        );
        assert!(err.contains("--boot: not given"), "{err}");
        assert!(err.contains("$IMPRINT_BOOT: not set"), "{err}");
        assert!(err.contains("image-build/build"), "{err}");
        assert!(err.contains(".deb"), "{err}");
    }

    #[test]
    fn an_explicit_folder_is_used_as_given_not_a_fallback() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let mut p = world(r);
        boot_dir(&p.system);
        // Incomplete, or missing: still the user's choice; `stick::build` says what is missing
        // after checking config, seed and image.
        let env = boot_dir(&r.join("env"));
        fs::remove_file(env.join("initrd.img")).unwrap();
        p.env = Some(env.clone().into_os_string());
        assert_eq!(locate_in(&p).unwrap(), env);
        p.flag = Some(r.join("nowhere"));
        assert_eq!(locate_in(&p).unwrap(), r.join("nowhere"));
        // An empty variable counts as unset.
        p.flag = None;
        p.env = Some(OsString::new());
        assert_eq!(locate_in(&p).unwrap(), p.system);
    }
}
