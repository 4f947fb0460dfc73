//! Hostile input and hostile hosts (issue 10): wrong targets, secrets, untrusted text, FIFOs
//! and endless files. Each test runs the real binary and asserts the exit code, the message the
//! user sees, and the exact bytes left on disk. Loop-device tests need root, which the test
//! suite and CI have.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

fn imprint() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imprint"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running a command")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the loop-device tests need root (run scripts/test as root, as CI does)"
    );
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u32) -> Vec<u8> {
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

/// A 4 MiB raw disk image (no partition table) and its prepared `.img.zst`.
fn image(dir: &Path, seed: u32) -> (PathBuf, PathBuf) {
    let raw = dir.join(format!("os{seed}.raw"));
    std::fs::write(&raw, noise(4 * MIB, seed)).unwrap();
    let img = dir.join(format!("os{seed}.img.zst"));
    let o = run(imprint()
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&img)
        .args(["--level", "1"]));
    assert!(o.status.success(), "prepare: {}", stderr(&o));
    (raw, img)
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(file: &Path) -> Loop {
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(file));
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

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn write_to_a_missing_device_creates_nothing_and_fails() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 1);
    for dev in ["/dev/sdzz9", "/dev/loop999p1"] {
        for extra in [&[][..], &["--to-file"][..]] {
            let o = run(imprint()
                .arg("write")
                .arg(&img)
                .arg(dev)
                .arg("--yes")
                .args(extra));
            assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
            assert!(
                stderr(&o).contains(&format!("{dev} does not exist")),
                "{}",
                stderr(&o)
            );
            assert!(!Path::new(dev).exists(), "{dev} was created");
            assert!(!stdout(&o).contains("wrote"), "{}", stdout(&o));
        }
    }
}

#[test]
fn a_regular_file_target_needs_to_file() {
    let t = tempfile::tempdir().unwrap();
    let (raw, img) = image(t.path(), 2);
    let out = t.path().join("disk.bin");
    // Missing, without --to-file: refused, nothing created.
    let o = run(imprint().arg("write").arg(&img).arg(&out).arg("--yes"));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("--to-file"), "{}", stderr(&o));
    assert!(!out.exists());
    // Existing, without --to-file: refused, untouched.
    std::fs::write(&out, vec![0x5Au8; 5 * MIB]).unwrap();
    let before = sha(&out);
    let o = run(imprint().arg("write").arg(&img).arg(&out).arg("--yes"));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is a regular file, not a disk; pass --to-file"),
        "{}",
        stderr(&o)
    );
    assert_eq!(sha(&out), before);
    // With --to-file: written, and the first 4 MiB are the image byte for byte.
    std::fs::remove_file(&out).unwrap();
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&out)
        .args(["--yes", "--to-file"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha(&out), sha(&raw));
}

#[test]
fn write_onto_the_image_itself_is_refused_by_identity() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 3);
    let before = sha(&img);
    let link = t.path().join("hardlink");
    std::fs::hard_link(&img, &link).unwrap();
    let sub = t.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let dotted = sub.join("..").join(img.file_name().unwrap());
    for target in [img.clone(), link, dotted] {
        let o = run(imprint()
            .arg("write")
            .arg(&img)
            .arg(&target)
            .args(["--yes", "--to-file"]));
        assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("they are the same file; nothing was written"),
            "{}",
            stderr(&o)
        );
        assert_eq!(sha(&img), before);
    }
}

#[test]
fn write_to_a_loop_device_backed_by_the_image_is_refused() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 4);
    // Big enough for the image: the loop device is the image file itself.
    let before = sha(&img);
    let lo = Loop::new(&img);
    let o = run(imprint().arg("write").arg(&img).arg(&lo.dev).arg("--yes"));
    drop(lo);
    // Either the size check or the identity check refuses; the identity check comes first.
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is a loop device backed by the image"),
        "{}",
        stderr(&o)
    );
    assert_eq!(sha(&img), before);
}

#[test]
fn a_file_behind_a_mounted_loop_device_is_refused_untouched() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 5);
    let disk = t.path().join("fs.bin");
    std::fs::write(&disk, vec![0u8; 8 * MIB]).unwrap();
    assert!(run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk))
        .status
        .success());
    let lo = Loop::new(&disk);
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(run(Command::new("mount").arg(&lo.dev).arg(&mnt))
        .status
        .success());
    let m = Mount(mnt.clone());
    std::fs::write(mnt.join("precious"), b"keep me").unwrap();
    run(&mut Command::new("sync"));
    let before = sha(&disk);
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--yes", "--to-file"]));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let name = lo.dev.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stderr(&o).contains(&format!("it is the backing file of /dev/{name}")),
        "{}",
        stderr(&o)
    );
    assert_eq!(sha(&disk), before);
    assert_eq!(std::fs::read(mnt.join("precious")).unwrap(), b"keep me");
    drop(m);
    drop(lo);
}

#[test]
fn two_writes_to_one_file_never_both_succeed_concurrently() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 6);
    let out = t.path().join("disk.bin");
    std::fs::write(&out, vec![0u8; 4 * MIB]).unwrap();
    // Hold the lock the way a running imprint does; a second writer must be refused, untouched.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&out)
        .unwrap();
    let lock = nix::fcntl::Flock::lock(holder, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    let before = sha(&out);
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&out)
        .args(["--yes", "--to-file"]));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("is busy"), "{}", stderr(&o));
    assert_eq!(sha(&out), before);
    // verify takes a shared lock: it refuses to read a file mid-write too.
    let o = run(imprint().arg("verify").arg(&img).arg(&out));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    drop(lock);
}

#[test]
fn a_fifo_is_refused_at_once_wherever_a_file_is_expected() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 7);
    let fifo = t.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = t.path().join("x.img.zst");
    let cases: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["inspect".into(), fifo.clone().into()],
        vec![
            "write".into(),
            fifo.clone().into(),
            t.path().join("d").into(),
            "--to-file".into(),
        ],
        vec![
            "inspect".into(),
            img.clone().into(),
            "--trust".into(),
            fifo.clone().into(),
        ],
        vec![
            "prepare".into(),
            fifo.clone().into(),
            "-o".into(),
            out.clone().into(),
        ],
    ];
    for args in cases {
        let start = Instant::now();
        let mut child = imprint()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = loop {
            if child.try_wait().unwrap().is_some() {
                break child.wait_with_output().unwrap();
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("imprint {args:?} hangs on a FIFO");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("it is a FIFO (named pipe), not a regular file"),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(!out.exists());
    }
}
