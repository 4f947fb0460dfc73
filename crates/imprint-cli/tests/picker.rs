//! Integration tests: `imprint flash` with no device, through the real binary — off a terminal
//! it refuses and says how to name the stick; on a terminal (a pty from util-linux `script`)
//! it offers only USB/removable disks: here, with none plugged in, it says so; with one, Esc
//! cancels. Either way it exits 4 and writes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A boot folder the lookup accepts (the picker runs before anything reads the files).
fn boot_dir(root: &Path) -> PathBuf {
    let boot = root.join("boot");
    for rel in [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/BOOT/grubx64.efi",
        "EFI/debian/grub.cfg",
        "vmlinuz",
        "initrd.img",
    ] {
        let p = boot.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, rel).unwrap();
    }
    boot
}

/// Whether this machine has a disk the picker would offer (USB or removable, with media).
fn has_removable_disk() -> bool {
    std::fs::read_dir("/sys/block").unwrap().flatten().any(|e| {
        let p = e.path();
        let removable = std::fs::read_to_string(p.join("removable")).unwrap_or_default();
        let size = std::fs::read_to_string(p.join("size")).unwrap_or_default();
        let usb = std::fs::canonicalize(&p)
            .map(|c| c.to_string_lossy().contains("/usb"))
            .unwrap_or(false);
        (removable.trim() == "1" || usb) && size.trim() != "0"
    })
}

#[test]
fn no_device_off_a_terminal_is_refused_with_advice() {
    let t = tempfile::tempdir().unwrap();
    let boot = boot_dir(t.path());
    let out = Command::new(env!("CARGO_BIN_EXE_imprint"))
        .args(["flash", "--image", "x.img.zst", "--boot"])
        .arg(&boot)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("no device given and no terminal to choose one on"),
        "{err}"
    );
    assert!(err.contains("imprint disks"), "{err}");
}

#[test]
fn no_device_on_a_terminal_offers_only_usb_disks() {
    let t = tempfile::tempdir().unwrap();
    let boot = boot_dir(t.path());
    let cmd = format!(
        "{} flash --image x.img.zst --boot {}",
        env!("CARGO_BIN_EXE_imprint"),
        boot.display()
    );
    // `script` runs the command on a new pty; Esc on its input cancels a list if one shows.
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let _ = stdin.write_all(b"\x1b");
    }
    let out = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{screen}");
    assert!(!screen.contains("no terminal"), "{screen}");
    if has_removable_disk() {
        assert!(screen.contains("USB and removable disks only"), "{screen}");
        assert!(
            screen.contains("no disk chosen; nothing was written"),
            "{screen}"
        );
    } else {
        assert!(
            screen.contains("no USB or removable disk found: plug in the stick"),
            "{screen}"
        );
    }
}
