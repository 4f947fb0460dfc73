//! What every CLI integration test needs: the built `imprint` binary, its output as text, a
//! file's SHA-256, a free loopback port. (Each test file includes it with `mod common;` and
//! uses what it needs, hence the dead-code allowance.)
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// The `imprint` binary under test, without the appliance's boot-time environment.
pub fn imprint() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imprint"));
    c.env_remove("IMPRINT_BOOT");
    c
}

/// Runs `cmd` to completion, its output captured.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running a command")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `o`, after asserting it succeeded (its output shown if not).
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "failed: {}\n{}", stdout(&o), stderr(&o));
    o
}

/// The SHA-256 of a whole file (or block device), in hex.
pub fn sha(path: &Path) -> String {
    format!(
        "{:x}",
        Sha256::digest(std::fs::read(path).expect("reading a file to hash"))
    )
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a loopback port")
        .port()
}

/// Runs `imprint ARGS…` to completion, its output captured.
pub fn imprint_with(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = imprint();
    for a in args {
        cmd.arg(a);
    }
    run(&mut cmd)
}

/// A small imprint image: 2 MiB of patterned raw bytes with an MBR signature, prepared by the
/// real binary into `dir/os.img.zst` (the raw bytes stay in `dir/os.raw`).
pub fn make_image(dir: &Path) -> std::path::PathBuf {
    let mut raw: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    raw[510] = 0x55;
    raw[511] = 0xAA;
    let raw_path = dir.join("os.raw");
    std::fs::write(&raw_path, &raw).expect("writing the raw image");
    let img = dir.join("os.img.zst");
    ok(run(imprint()
        .arg("prepare")
        .arg(&raw_path)
        .arg("-o")
        .arg(&img)
        .args(["--threads", "1", "--level", "1"])));
    img
}

/// Boot files with distinct contents under `dir/boot` (render and build copy them; what they
/// are is the boot tests' business).
pub fn fake_boot(dir: &Path) -> std::path::PathBuf {
    let boot = dir.join("boot");
    for (rel, body) in [
        ("EFI/BOOT/BOOTX64.EFI", "shim"),
        ("EFI/BOOT/grubx64.efi", "bookworm grub"),
        ("EFI/debian/grub.cfg", "@ESP_PARTUUID@"),
        ("netboot/grubx64.efi", "trixie grubnet"),
        ("vmlinuz", "kernel"),
        ("initrd.img", "initramfs"),
    ] {
        let p = boot.join(rel);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("creating boot folders");
        std::fs::write(p, body.repeat(1000)).expect("writing a boot file");
    }
    boot
}

/// Deterministic pseudo-random bytes (xorshift32): the same `seed` gives the same bytes.
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Fails the test at once, saying why, unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the loop-device tests need root (run scripts/test as root, as CI does)"
    );
}

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn new(file: &Path) -> Loop {
        Loop::with(file, &[])
    }

    /// With more `losetup` options, e.g. `["--direct-io=on", "--sector-size", "4096"]`.
    pub fn with(file: &Path, options: &[&str]) -> Loop {
        let out = run(Command::new("losetup")
            .args(["--find", "--show"])
            .args(options)
            .arg(file));
        assert!(out.status.success(), "losetup: {}", stderr(&out));
        Loop {
            dev: PathBuf::from(stdout(&out).trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
