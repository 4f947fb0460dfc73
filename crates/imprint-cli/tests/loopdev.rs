//! Integration tests: the real `imprint` binary against real loop devices (needs root, which the
//! test suite and CI have). Each test asserts the target's exact state afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn imprint() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imprint"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running a command")
}

fn check(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the loop-device tests need root (run scripts/test as root, as CI does)"
    );
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(file: &Path, sector_size: u32) -> Loop {
        let out = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on", "--sector-size"])
            .arg(sector_size.to_string())
            .arg(file));
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
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

/// A real GPT disk image: an ESP and a data partition made by sgdisk, data in a few places,
/// long zero runs in between.
fn make_raw(dir: &Path, size: u64, ss: u32) -> PathBuf {
    let raw = dir.join(format!("os-{ss}.raw"));
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    // sgdisk has no sector-size switch for files; a loop device with that sector size does it.
    let lo = Loop::new(&raw, ss);
    check(
        Command::new("sgdisk")
            .args([
                "-n1:0:+8M",
                "-t1:ef00",
                "-c1:EFI",
                "-n2:0:0",
                "-t2:8300",
                "-c2:root",
            ])
            .arg(&lo.dev),
    );
    drop(lo);
    let mut data = std::fs::read(&raw).unwrap();
    for (i, at) in [3 * MIB, 20 * MIB, size - 5 * MIB].into_iter().enumerate() {
        let n = noise(MIB as usize + 4096, i as u32 + 7);
        data[at as usize..at as usize + n.len()].copy_from_slice(&n);
    }
    std::fs::write(&raw, &data).unwrap();
    raw
}

fn prepare(raw: &Path) -> PathBuf {
    let out = raw.with_extension("img.zst");
    check(
        imprint()
            .arg("prepare")
            .arg(raw)
            .arg("-o")
            .arg(&out)
            .args(["--level", "3"]),
    );
    out
}

fn fill(path: &Path, size: u64, byte: u8) {
    std::fs::write(path, vec![byte; size as usize]).unwrap();
}

fn sha(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn write(image: &Path, dev: &Path) -> Output {
    run(imprint().arg("write").arg(image).arg(dev).arg("--yes"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No GPT header at LBA 1 nor at the disk's last LBA, and a zeroed first MiB: nothing can boot.
fn assert_no_partition_table(disk: &[u8], ss: usize) {
    assert!(
        disk[..MIB as usize].iter().all(|&b| b == 0),
        "first MiB must be zero"
    );
    assert_ne!(&disk[ss..ss + 8], b"EFI PART");
    let last = disk.len() - ss;
    assert_ne!(&disk[last..last + 8], b"EFI PART");
}

#[test]
fn round_trip_moves_backup_gpt_and_verifies() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let disk = t.path().join("disk");
    fill(&disk, 100 * MIB, 0xAA);
    let lo = Loop::new(&disk, 512);
    let o = write(&img, &lo.dev);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(imprint().arg("verify").arg(&img).arg(&lo.dev));
    assert!(o.status.success(), "verify: {}", stderr(&o));
    check(Command::new("sgdisk").arg("-v").arg(&lo.dev));
    drop(lo);
    let got = std::fs::read(&disk).unwrap();
    let want = std::fs::read(&raw).unwrap();
    // Byte for byte the image, except: the protective MBR's size field (fitted to the disk),
    // LBA 1 (the primary header now points at the new backup) and the image's old backup
    // header in its last sector (cleared).
    assert_eq!(&got[..446 + 12], &want[..446 + 12]);
    let size_field = u32::from_le_bytes(got[446 + 12..446 + 16].try_into().unwrap());
    assert_eq!(u64::from(size_field), got.len() as u64 / 512 - 1);
    assert_eq!(&got[446 + 16..512], &want[446 + 16..512]);
    assert_eq!(&got[1024..want.len() - 512], &want[1024..want.len() - 512]);
    assert!(got[want.len() - 512..want.len()].iter().all(|&b| b == 0));
    // The backup header is at the disk's last LBA; past the image, the old bytes are untouched
    // except the backup entry array and header at the end.
    assert_eq!(&got[got.len() - 512..got.len() - 504], b"EFI PART");
    assert!(got[want.len()..got.len() - 2 * MIB as usize]
        .iter()
        .all(|&b| b == 0xAA));
}

#[test]
fn corrupt_payload_leaves_no_partition_table() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let mut bytes = std::fs::read(&img).unwrap();
    let mid = bytes.len() - bytes.len() / 3;
    bytes[mid] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();
    let disk = t.path().join("disk");
    fill(&disk, 80 * MIB, 0xAA);
    let lo = Loop::new(&disk, 512);
    let o = write(&img, &lo.dev);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let msg = stderr(&o);
    assert!(msg.contains("corrupt"), "{msg}");
    drop(lo);
    assert_no_partition_table(&std::fs::read(&disk).unwrap(), 512);
}

#[test]
fn truncated_image_is_refused_before_writing() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, &bytes[..bytes.len() - 1000]).unwrap();
    let disk = t.path().join("disk");
    fill(&disk, 80 * MIB, 0xAA);
    let before = sha(&disk);
    let lo = Loop::new(&disk, 512);
    let o = write(&img, &lo.dev);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    drop(lo);
    assert_eq!(sha(&disk), before, "the target must be untouched");
}

#[test]
fn too_small_target_is_refused_untouched() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let disk = t.path().join("disk");
    fill(&disk, 48 * MIB, 0x55);
    let before = sha(&disk);
    let lo = Loop::new(&disk, 512);
    let o = write(&img, &lo.dev);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("too small"), "{}", stderr(&o));
    drop(lo);
    assert_eq!(sha(&disk), before);
}

#[test]
fn mounted_target_is_refused_untouched() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let disk = t.path().join("disk");
    fill(&disk, 80 * MIB, 0);
    let lo = Loop::new(&disk, 512);
    check(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.dev));
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    check(Command::new("mount").arg(&lo.dev).arg(&mnt));
    let o = write(&img, &lo.dev);
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("is mounted on"), "{}", stderr(&o));
    // Still a clean ext4 filesystem: nothing was written.
    check(Command::new("e2fsck").args(["-fn"]).arg(&lo.dev));
}

#[test]
fn sector_size_mismatch_is_refused_and_matching_4k_image_installs() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw512 = make_raw(t.path(), 64 * MIB, 512);
    let img512 = prepare(&raw512);
    let disk = t.path().join("disk4k");
    fill(&disk, 96 * MIB, 0x33);
    let before = sha(&disk);
    let lo = Loop::new(&disk, 4096);
    let o = write(&img512, &lo.dev);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("4096-byte logical sectors"),
        "{}",
        stderr(&o)
    );
    drop(lo);
    assert_eq!(sha(&disk), before);

    let raw4k = make_raw(t.path(), 64 * MIB, 4096);
    let img4k = prepare(&raw4k);
    let o = run(imprint().args(["inspect", "--json"]).arg(&img4k));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["sector_size"], 4096);
    let lo = Loop::new(&disk, 4096);
    let o = write(&img4k, &lo.dev);
    assert!(o.status.success(), "{}", stderr(&o));
    check(Command::new("sgdisk").arg("-v").arg(&lo.dev));
    drop(lo);
    let got = std::fs::read(&disk).unwrap();
    assert_eq!(
        &got[got.len() - 4096..got.len() - 4088],
        b"EFI PART",
        "backup GPT at the 4Kn disk's end"
    );
}

#[test]
fn zero_runs_read_back_as_zeros_over_old_data() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let disk = t.path().join("disk");
    fill(&disk, 64 * MIB, 0xFF);
    let lo = Loop::new(&disk, 512);
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&lo.dev)
        .args(["--yes", "--json"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
        .expect("a JSON result line");
    assert!(
        result["report"]["zeroed_bytes"].as_u64().unwrap() > 30 * MIB,
        "{result}"
    );
    assert_eq!(result["report"]["verified"], true);
    drop(lo);
    // Same size as the image: every byte equals the image (no GPT move needed), zero runs included.
    assert_eq!(sha(&disk), sha(&raw));
}

#[test]
fn verify_names_the_damaged_chunk() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let disk = t.path().join("disk");
    fill(&disk, 64 * MIB, 0);
    let lo = Loop::new(&disk, 512);
    assert!(write(&img, &lo.dev).status.success());
    drop(lo);
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[(20 * MIB + 100) as usize] ^= 1;
    std::fs::write(&disk, &bytes).unwrap();
    let lo = Loop::new(&disk, 512);
    let o = run(imprint().arg("verify").arg(&img).arg(&lo.dev));
    // 6: the disk does not hold the image (not an I/O failure).
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("chunk 1 (bytes 16777216..33554432)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn refuses_without_confirmation_off_a_terminal() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let disk = t.path().join("disk");
    fill(&disk, 64 * MIB, 0x11);
    let before = sha(&disk);
    let lo = Loop::new(&disk, 512);
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&lo.dev)
        .stdin(std::process::Stdio::null()));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("--yes"));
    drop(lo);
    assert_eq!(sha(&disk), before);
}

/// A boot folder shaped like image-build/build's output. The files' contents do not matter to
/// `imprint flash` (the live-image tests boot the real ones); grub.cfg carries the PARTUUID token.
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

#[test]
fn flash_writes_a_verified_stick_and_refuses_non_usb_without_force() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let boot = fake_boot_dir(t.path());
    let disk = t.path().join("stick");
    fill(&disk, 256 * MIB, 0x77);
    let before = sha(&disk);
    let lo = Loop::new(&disk, 512);
    // A loop device is not a USB disk: refused untouched without --force.
    let o = run(imprint()
        .args(["flash", "--yes", "--image"])
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg(&lo.dev));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--force") || stderr(&o).contains("whole USB"),
        "{}",
        stderr(&o)
    );
    drop(lo);
    assert_eq!(sha(&disk), before);

    let lo = Loop::new(&disk, 512);
    let o = run(imprint()
        .args(["flash", "--yes", "--force", "--image"])
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg(&lo.dev));
    assert!(o.status.success(), "{}", stderr(&o));
    check(Command::new("sgdisk").arg("-v").arg(&lo.dev));
    let info = run(Command::new("sgdisk").args(["-i", "2"]).arg(&lo.dev));
    let info = String::from_utf8_lossy(&info.stdout).to_uppercase();
    assert!(
        info.contains("4011D3E2-18E9-46FA-BA24-210466D1720F"),
        "payload type: {info}"
    );
    let first: u64 = info
        .lines()
        .find(|l| l.starts_with("FIRST SECTOR"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .parse()
        .unwrap();
    drop(lo);
    let got = std::fs::read(&disk).unwrap();
    let image = std::fs::read(&img).unwrap();
    let at = (first * 512) as usize;
    assert!(
        got[at..at + image.len()] == image[..],
        "the payload partition holds the image byte for byte"
    );
    assert_eq!(
        &got[got.len() - 512..got.len() - 504],
        b"EFI PART",
        "backup GPT at the stick's end"
    );
}

#[test]
fn disks_lists_this_machine_and_never_chooses_the_running_system() {
    let o = run(imprint().args(["disks", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Exit 4 exactly when the appliance would not install here (no candidate), else 0.
    let expected = if v["selection"]["outcome"] == "no-candidate" {
        4
    } else {
        0
    };
    assert_eq!(o.status.code(), Some(expected), "{}", stderr(&o));
    let disks = v["disks"].as_array().unwrap();
    assert!(!disks.is_empty(), "this machine has at least its root disk");
    assert!(disks
        .iter()
        .all(|d| d["name"].is_string() && d["transport"].is_string()));
    // Whatever is chosen, it is not the disk the running system lives on.
    let text = String::from_utf8_lossy(&run(imprint().arg("disks")).stdout).into_owned();
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("holds this system's root filesystem"))
    {
        let root = line
            .trim_start_matches('(')
            .split_whitespace()
            .next()
            .unwrap();
        let sel = &v["selection"];
        assert_ne!(sel["disk"]["name"].as_str(), Some(root), "{text}");
        let rejected: Vec<&str> = sel["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["disk"]["name"].as_str())
            .collect();
        assert!(
            rejected.contains(&root),
            "the root disk is listed as rejected: {sel}"
        );
    }
    assert!(v["selection"]["outcome"].is_string() && v["selection"]["reason"].is_string());
}
