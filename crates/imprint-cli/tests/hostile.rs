//! Hostile input and hostile hosts (issue 10): wrong targets, secrets, untrusted text, FIFOs
//! and endless files. Each test runs the real binary and asserts the exit code, the message the
//! user sees, and the exact bytes left on disk. Loop-device tests need root, which the test
//! suite and CI have.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{imprint, noise, require_root, run, sha, stderr, stdout, Loop};

const MIB: usize = 1 << 20;

/// A 4 MiB raw disk image (no partition table) and its prepared `.img.zst`.
fn image(dir: &Path, seed: u32) -> (PathBuf, PathBuf) {
    image_of(dir, seed, 4)
}

/// [`image`] of `mib` MiB (frames of 4 MiB: more than 4 MiB is several frames).
fn image_of(dir: &Path, seed: u32, mib: usize) -> (PathBuf, PathBuf) {
    let raw = dir.join(format!("os{seed}.raw"));
    std::fs::write(&raw, noise(mib * MIB, seed)).unwrap();
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
    let boot = fake_boot_dir(t.path());
    let seed = t.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    nix::unistd::mkfifo(&seed.join("user-data"), nix::sys::stat::Mode::S_IRWXU).unwrap();
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
        vec![
            "build".into(),
            "--image".into(),
            img.clone().into(),
            "--boot".into(),
            boot.clone().into(),
            "--config".into(),
            fifo.clone().into(),
            "-o".into(),
            out.clone().into(),
        ],
        vec![
            "build".into(),
            "--image".into(),
            img.clone().into(),
            "--boot".into(),
            boot.clone().into(),
            "--seed".into(),
            seed.clone().into(),
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

/// A boot folder shaped like image-build/build's output (contents do not matter to `build`).
fn fake_boot_dir(dir: &Path) -> PathBuf {
    let boot = dir.join("boot");
    for f in [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/BOOT/grubx64.efi",
        "vmlinuz",
        "initrd.img",
    ] {
        let p = boot.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, noise(4096, 3)).unwrap();
    }
    std::fs::create_dir_all(boot.join("EFI/debian")).unwrap();
    std::fs::write(
        boot.join("EFI/debian/grub.cfg"),
        "linux /vmlinuz imprint.esp=@ESP_PARTUUID@\ninitrd /initrd.img\n",
    )
    .unwrap();
    boot
}

/// Files in `dir` whose names end in `.partial` (temporary files left behind).
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

#[test]
fn prepare_refuses_an_output_that_is_its_input_by_identity() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("in.raw");
    std::fs::write(&raw, noise(MIB, 8)).unwrap();
    let before = sha(&raw);
    let link = t.path().join("link.raw");
    std::fs::hard_link(&raw, &link).unwrap();
    let sym = t.path().join("sym.img.zst");
    std::os::unix::fs::symlink(&raw, &sym).unwrap();
    for out in [PathBuf::from("./in.raw"), link, sym] {
        let o = run(imprint()
            .current_dir(t.path())
            .arg("prepare")
            .arg("in.raw")
            .arg("-o")
            .arg(&out));
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("is the input in.raw: it would be destroyed"),
            "{}",
            stderr(&o)
        );
        assert_eq!(sha(&raw), before);
    }
    assert!(partials(t.path()).is_empty());
}

#[test]
fn prepare_never_follows_a_symlink_planted_at_the_partial_name() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("in.raw");
    std::fs::write(&raw, noise(MIB, 9)).unwrap();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let out = t.path().join("out.img.zst");
    // The names 0.1.0 used: a local attacker could point them at any file root can write.
    for name in ["out.img.zst.partial", "out.img.zst.payload.partial"] {
        std::os::unix::fs::symlink(&victim, t.path().join(name)).unwrap();
    }
    let o = run(imprint().arg("prepare").arg(&raw).arg("-o").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let o = run(imprint().arg("inspect").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    // Only the planted links remain; no temporary file of ours.
    let mut left = partials(t.path());
    left.sort();
    assert_eq!(left, ["out.img.zst.partial", "out.img.zst.payload.partial"]);
}

#[test]
fn build_refuses_an_output_that_is_one_of_its_inputs() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 10);
    let boot = fake_boot_dir(t.path());
    let seed = t.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    std::fs::write(seed.join("user-data"), "#cloud-config\n{}\n").unwrap();
    let config = t.path().join("config.json");
    std::fs::write(&config, "{}\n").unwrap();
    let sums: Vec<String> = [&img, &config, &seed.join("user-data")]
        .iter()
        .map(|p| sha(p))
        .collect();
    let sub = t.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    for out in [
        sub.join("..").join(img.file_name().unwrap()),
        config.clone(),
        seed.join("user-data"),
    ] {
        let o = run(imprint()
            .arg("build")
            .arg("--image")
            .arg(&img)
            .arg("--boot")
            .arg(&boot)
            .arg("--seed")
            .arg(&seed)
            .arg("--config")
            .arg(&config)
            .arg("-o")
            .arg(&out));
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(": it would be destroyed; choose another output file"),
            "{}",
            stderr(&o)
        );
    }
    let after: Vec<String> = [&img, &config, &seed.join("user-data")]
        .iter()
        .map(|p| sha(p))
        .collect();
    assert_eq!(sums, after);
}

#[test]
fn build_refuses_seed_symlinks_and_never_prints_the_file() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 11);
    let boot = fake_boot_dir(t.path());
    let secret = t.path().join("shadow");
    std::fs::write(&secret, "root:$6$SECRETHASH:19000:0:99999:7:::\n").unwrap();
    let out = t.path().join("stick.img");
    let build = |seed: &Path| {
        run(imprint()
            .arg("build")
            .arg("--image")
            .arg(&img)
            .arg("--boot")
            .arg(&boot)
            .arg("--seed")
            .arg(seed)
            .arg("-o")
            .arg(&out))
    };
    // A link in the seed folder: refused, whatever it points to.
    let seed = t.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    std::os::unix::fs::symlink(&secret, seed.join("meta-data")).unwrap();
    let o = build(&seed);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("SECRETHASH"), "{}", stderr(&o));
    assert!(!out.exists());
    // The same file copied in as user-data: refused as not cloud-init, its line not shown.
    let seed2 = t.path().join("seed2");
    std::fs::create_dir(&seed2).unwrap();
    std::fs::copy(&secret, seed2.join("user-data")).unwrap();
    let o = build(&seed2);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("its first line is not a kind cloud-init runs"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("SECRETHASH"), "{}", stderr(&o));
    assert!(!out.exists());
    assert!(partials(t.path()).is_empty());
}

#[test]
fn build_refuses_a_seed_larger_than_the_seed_partition() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 12);
    let boot = fake_boot_dir(t.path());
    let seed = t.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    let mut ud = b"#cloud-config\n# ".to_vec();
    ud.resize(7 * MIB, b'x');
    ud.push(b'\n');
    std::fs::write(seed.join("user-data"), &ud).unwrap();
    let out = t.path().join("stick.img");
    let o = run(imprint()
        .arg("build")
        .arg("--image")
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg("--seed")
        .arg(&seed)
        .arg("-o")
        .arg(&out));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "the seed is {} bytes; the 7274496-byte CIDATA partition cannot hold it",
            ud.len()
        )),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // A 1 GiB user-data (sparse) is refused by its size, without reading it into memory.
    let f = std::fs::File::create(seed.join("user-data")).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let start = Instant::now();
    let o = run(imprint()
        .arg("build")
        .arg("--image")
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg("--seed")
        .arg(&seed)
        .arg("-o")
        .arg(&out));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("it is 1073741824 bytes, more than the 8388608-byte limit"),
        "{}",
        stderr(&o)
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!out.exists());
}

#[test]
fn terminal_escapes_in_an_image_name_are_shown_escaped() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("in.raw");
    std::fs::write(&raw, noise(MIB, 13)).unwrap();
    let img = t.path().join("evil.img.zst");
    // Erase the line and pretend to be another device.
    let name = "\u{1b}[2K\rdebian\u{202e}";
    let o = run(imprint()
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&img)
        .arg("--name")
        .arg(name));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains('\u{1b}'), "{:?}", stdout(&o));
    let o = run(imprint().arg("inspect").arg(&img));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains('\u{1b}') && !out.contains('\r') && !out.contains('\u{202e}'));
    assert!(
        out.contains("name:         \\u{1b}[2K\\u{d}debian\\u{202e}"),
        "{out}"
    );
    let disk = t.path().join("disk.bin");
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--yes", "--to-file"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("wrote \\u{1b}[2K\\u{d}debian\\u{202e} "),
        "{}",
        stdout(&o)
    );
    assert_eq!(sha(&disk), sha(&raw));
}

#[test]
fn inspect_says_a_signature_is_not_verified_unless_checked() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("k");
    let o = run(imprint().arg("keygen").arg("-o").arg(&key));
    assert!(o.status.success(), "{}", stderr(&o));
    let raw = t.path().join("in.raw");
    std::fs::write(&raw, noise(MIB, 14)).unwrap();
    let img = t.path().join("s.img.zst");
    let o = run(imprint()
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&img)
        .arg("--sign")
        .arg(t.path().join("k.key")));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(imprint().arg("inspect").arg(&img));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("verified:     no: signature not verified (pass --trust KEY.pub"),
        "{}",
        stdout(&o)
    );
    let o = run(imprint()
        .arg("inspect")
        .arg(&img)
        .arg("--trust")
        .arg(t.path().join("k.pub")));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("not verified"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("matches the manifest"),
        "{}",
        stdout(&o)
    );
    // The secret key given as a trusted key: refused (exit 1), and none of it is printed.
    let secret = std::fs::read_to_string(t.path().join("k.key")).unwrap();
    let o = run(imprint()
        .arg("inspect")
        .arg(&img)
        .arg("--trust")
        .arg(t.path().join("k.key")));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("SECRET key"), "{}", stderr(&o));
    let b64 = secret.lines().nth(1).unwrap();
    for window in b64.as_bytes().windows(12) {
        let w = std::str::from_utf8(window).unwrap();
        assert!(
            !stderr(&o).contains(w),
            "secret key text in: {}",
            stderr(&o)
        );
    }
}

#[test]
fn a_closed_stdout_does_not_make_write_panic() {
    let t = tempfile::tempdir().unwrap();
    let (raw, img) = image(t.path(), 15);
    let disk = t.path().join("disk.bin");
    let mut child = imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--yes", "--to-file", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -c 0`: the reader is gone before the first line.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert_eq!(sha(&disk), sha(&raw));
}

#[test]
fn json_errors_are_one_object_on_stderr_with_the_documented_exit_code() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 16);
    // A missing image file: 1 (the image was never read, so it is not "bad").
    let o = run(imprint()
        .arg("write")
        .arg(t.path().join("nope.img.zst"))
        .arg(t.path().join("d"))
        .args(["--to-file", "--json"]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines: Vec<&str> = std::str::from_utf8(&o.stderr).unwrap().lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["event"], "error");
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], 1);
    assert!(v["error"].as_str().unwrap().contains("nope.img.zst"), "{v}");
    assert_eq!(v["causes"][0], "No such file or directory (os error 2)");
    // verify against another image: 6, "does not hold the image".
    let disk = t.path().join("disk.bin");
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--yes", "--to-file"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, other) = image(t.path(), 21);
    let o = run(imprint().arg("verify").arg(&other).arg(&disk).arg("--json"));
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    assert_eq!(v["exit_code"], 6);
    let o = run(imprint().arg("verify").arg(&img).arg(&disk));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn an_xz_input_asking_for_a_huge_dictionary_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("in.raw");
    std::fs::write(&raw, noise(MIB, 22)).unwrap();
    let xz = t.path().join("in.raw.xz");
    let o = run(Command::new("sh").arg("-c").arg(format!(
        "xz -T1 --lzma2=dict=1GiB -c {} > {}",
        raw.display(),
        xz.display()
    )));
    assert!(o.status.success(), "xz: {}", stderr(&o));
    let out = t.path().join("out.img.zst");
    let o = run(imprint().arg("prepare").arg(&xz).arg("-o").arg(&out));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the xz stream needs more than 320 MiB of memory to decode"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    assert!(partials(t.path()).is_empty(), "{:?}", partials(t.path()));
    // An ordinary xz -9 stream still works.
    let o = run(Command::new("sh").arg("-c").arg(format!(
        "xz -T1 -9 -c {} > {}",
        raw.display(),
        xz.display()
    )));
    assert!(o.status.success());
    let o = run(imprint().arg("prepare").arg(&xz).arg("-o").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn an_interrupted_prepare_leaves_no_temporary_files() {
    let t = tempfile::tempdir().unwrap();
    // 8 GiB of (sparse) zeros: long enough to be caught mid-way.
    let raw = t.path().join("big.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8 << 30).unwrap();
    drop(f);
    let out = t.path().join("big.img.zst");
    let child = imprint()
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&out)
        .args(["--level", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while partials(t.path()).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no temporary file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("interrupted (SIGINT); temporary files removed"),
        "{}",
        stderr(&o)
    );
    assert!(partials(t.path()).is_empty(), "{:?}", partials(t.path()));
    assert!(!out.exists());
}

#[test]
fn write_checks_the_signature_with_trust_before_touching_the_target() {
    let t = tempfile::tempdir().unwrap();
    for k in ["k", "other"] {
        let o = run(imprint().arg("keygen").arg("-o").arg(t.path().join(k)));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let raw = t.path().join("in.raw");
    std::fs::write(&raw, noise(MIB, 23)).unwrap();
    let img = t.path().join("s.img.zst");
    let o = run(imprint()
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&img)
        .arg("--sign")
        .arg(t.path().join("k.key")));
    assert!(o.status.success(), "{}", stderr(&o));
    let disk = t.path().join("disk.bin");
    let write = |extra: &[&Path]| {
        let mut c = imprint();
        c.arg("write")
            .arg(&img)
            .arg(&disk)
            .args(["--yes", "--to-file"]);
        for k in extra {
            c.arg("--trust").arg(k);
        }
        run(&mut c)
    };
    // Another key: refused as a bad image (3), the target file never created.
    let o = write(&[&t.path().join("other.pub")]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(!disk.exists());
    // No --trust: written, and the result says the signature was not checked.
    let o = write(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("signature: not verified (pass --trust KEY.pub"),
        "{}",
        stdout(&o)
    );
    std::fs::remove_file(&disk).unwrap();
    // The signer's key: verified and written.
    let o = write(&[&t.path().join("k.pub")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("signature: verified, by trusted key"),
        "{}",
        stdout(&o)
    );
    assert_eq!(sha(&disk), sha(&raw));
}

#[test]
fn a_failed_write_to_a_new_file_leaves_no_file() {
    let t = tempfile::tempdir().unwrap();
    // 12 MiB: three 4 MiB frames, so damage at the end is found while writing, after the wipe
    // (damage in the first frame is found by the plan, before the target is created).
    let (raw, img) = image_of(t.path(), 24, 12);
    // Damage the payload's end: the manifest still opens, the stream fails while writing.
    let mut bytes = std::fs::read(&img).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xFF;
    std::fs::write(&img, &bytes).unwrap();
    let disk = t.path().join("new-disk.bin");
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--yes", "--to-file"]));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(!disk.exists(), "the half-written new file was left behind");
    // An existing file is not removed (it was the user's): it is left without a partition
    // table, as a disk would be.
    std::fs::write(&disk, vec![0x77u8; 12 * MIB]).unwrap();
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--yes", "--to-file"]));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(disk.exists());
    let got = std::fs::read(&disk).unwrap();
    assert!(got[..MIB].iter().all(|&b| b == 0), "no partition table");
    // The first two frames were written before the third failed.
    assert!(got[4 * MIB..8 * MIB] == std::fs::read(&raw).unwrap()[4 * MIB..8 * MIB]);
}

#[test]
fn write_to_file_never_follows_a_dangling_symlink() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = image(t.path(), 25);
    let victim = t.path().join("victim-not-yet");
    let link = t.path().join("disk.bin");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&link)
        .args(["--yes", "--to-file"]));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("creating"), "{}", stderr(&o));
    assert!(!victim.exists(), "the link was followed");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
}
