//! Integration tests: the real `imprint` binary against real loop devices (needs root, which the
//! test suite and CI have). Each test asserts the target's exact state afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{imprint, noise, require_root, run, sha, stderr, Loop};

const MIB: u64 = 1 << 20;

/// A direct-I/O loop device with `sector_size`-byte sectors over `file`.
fn direct_loop(file: &Path, sector_size: u32) -> Loop {
    Loop::with(
        file,
        &["--direct-io=on", "--sector-size", &sector_size.to_string()],
    )
}

fn check(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real GPT disk image: an ESP and a data partition made by sgdisk, data in a few places,
/// long zero runs in between.
fn make_raw(dir: &Path, size: u64, ss: u32) -> PathBuf {
    let raw = dir.join(format!("os-{ss}.raw"));
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    // sgdisk has no sector-size switch for files; a loop device with that sector size does it.
    let lo = direct_loop(&raw, ss);
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

fn write(image: &Path, dev: &Path) -> Output {
    run(imprint().arg("write").arg(image).arg(dev).arg("--yes"))
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
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 4096);
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
    let lo = direct_loop(&disk, 4096);
    let o = write(&img4k, &lo.dev);
    assert!(o.status.success(), "{}", stderr(&o));
    check(Command::new("sgdisk").arg("-v").arg(&lo.dev));
    let on_disk = gpt_as_sgdisk_reads_it(&lo.dev);
    drop(lo);
    // The partition table read back off the 4Kn disk is the image's, read the same way.
    let src = direct_loop(&raw4k, 4096);
    let in_image = gpt_as_sgdisk_reads_it(&src.dev);
    drop(src);
    assert!(
        on_disk.contains("Sector size (logical/physical): 4096/"),
        "{on_disk}"
    );
    assert_eq!(on_disk, in_image);

    let got = std::fs::read(&disk).unwrap();
    let want = std::fs::read(&raw4k).unwrap();
    let ss = 4096;
    let last_lba = (got.len() / ss - 1) as u64;
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    // Byte for byte the image, except the protective MBR's size field (fitted to the disk),
    // LBA 1 (the primary header, rewritten for the moved backup) and the image's old backup
    // header in its last 4096-byte LBA (cleared) ...
    assert_eq!(&got[..446 + 12], &want[..446 + 12], "protective MBR");
    let size_field = u32::from_le_bytes(got[446 + 12..446 + 16].try_into().unwrap());
    assert_eq!(u64::from(size_field), last_lba, "protective MBR fitted");
    assert_eq!(&got[446 + 16..ss], &want[446 + 16..ss], "protective MBR");
    assert!(
        got[2 * ss..want.len() - ss] == want[2 * ss..want.len() - ss],
        "LBA 2 to the image's last LBA"
    );
    assert!(
        got[want.len() - ss..want.len()].iter().all(|&b| b == 0),
        "the image's old backup header is cleared"
    );
    // ... whose header points at a backup header on the disk's last 4096-byte LBA, which
    // points back at LBA 1.
    assert_eq!(&got[ss..ss + 8], b"EFI PART");
    assert_eq!(le64(&got, ss + 32), last_lba, "primary: backup LBA");
    let backup = got.len() - ss;
    assert_eq!(
        &got[backup..backup + 8],
        b"EFI PART",
        "backup GPT at the 4Kn disk's end"
    );
    assert_eq!(le64(&got, backup + 24), last_lba, "backup: its own LBA");
    assert_eq!(le64(&got, backup + 32), 1, "backup: the primary's LBA");
    // Past the image, the old bytes are untouched up to the wiped last MiB.
    assert!(got[want.len()..got.len() - MIB as usize]
        .iter()
        .all(|&b| b == 0x33));
}

/// The disk GUID, sector size and every partition's details as `sgdisk` prints them.
fn gpt_as_sgdisk_reads_it(dev: &Path) -> String {
    let p = run(Command::new("sgdisk").arg("-p").arg(dev));
    assert!(p.status.success(), "sgdisk -p: {}", stderr(&p));
    let p = String::from_utf8(p.stdout).unwrap();
    let mut out: Vec<String> = p
        .lines()
        .filter(|l| l.starts_with("Sector size") || l.starts_with("Disk identifier"))
        .map(str::to_owned)
        .collect();
    for n in 1..=2 {
        let i = run(Command::new("sgdisk").arg(format!("-i{n}")).arg(dev));
        assert!(i.status.success(), "sgdisk -i{n}: {}", stderr(&i));
        out.push(String::from_utf8(i.stdout).unwrap());
    }
    out.join("\n")
}

#[test]
fn zero_runs_read_back_as_zeros_over_old_data() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let raw = make_raw(t.path(), 64 * MIB, 512);
    let img = prepare(&raw);
    let disk = t.path().join("disk");
    fill(&disk, 64 * MIB, 0xFF);
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 512);
    assert!(write(&img, &lo.dev).status.success());
    drop(lo);
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[(20 * MIB + 100) as usize] ^= 1;
    std::fs::write(&disk, &bytes).unwrap();
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 512);
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
    let lo = direct_loop(&disk, 512);
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
    // The same refusal with --json: one error object with the exit code, nothing on stdout.
    let o = run(imprint()
        .args(["flash", "--yes", "--json", "--image"])
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg(&lo.dev));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e: serde_json::Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    assert_eq!(
        (e["ok"].clone(), e["exit_code"].clone()),
        (false.into(), 4.into())
    );
    drop(lo);
    assert_eq!(sha(&disk), before);

    let lo = direct_loop(&disk, 512);
    let o = run(imprint()
        .args(["flash", "--yes", "--force", "--json", "--image"])
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg(&lo.dev));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let result: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(result["event"], "result");
    assert_eq!(result["ok"], true);
    assert_eq!(result["device"], lo.dev.to_str().unwrap());
    assert_eq!(result["report"]["verified"], true);
    assert_eq!(result["report"]["target_size"], 256 * MIB);
    check(Command::new("sgdisk").arg("-v").arg(&lo.dev));
    // The PARTUUID the JSON names is the stick's ESP's.
    let esp = run(Command::new("sgdisk").args(["-i", "1"]).arg(&lo.dev));
    let esp = String::from_utf8_lossy(&esp.stdout).to_uppercase();
    let want = result["esp_partuuid"].as_str().unwrap().to_uppercase();
    assert!(
        esp.lines()
            .any(|l| l.starts_with("PARTITION UNIQUE GUID") && l.ends_with(&want)),
        "{esp} vs {want}"
    );
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

/// The columns `cols` that `lsblk -d` prints for `dev`, or for every disk: one row per disk.
fn lsblk(cols: &str, dev: Option<&str>) -> Vec<Vec<String>> {
    let mut cmd = Command::new("lsblk");
    cmd.args(["-dnb", "-r", "-o", cols]);
    if let Some(d) = dev {
        cmd.arg(d);
    }
    let o = run(&mut cmd);
    assert!(o.status.success(), "lsblk: {}", stderr(&o));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(str::to_owned).collect())
        .collect()
}

/// The whole disk `/` lives on, found without imprint (findmnt + lsblk), or None when `/` is
/// not on a block device (a container's overlay).
fn root_disk() -> Option<String> {
    let o = run(Command::new("findmnt").args(["-n", "-o", "SOURCE", "/"]));
    let src = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    if !src.starts_with("/dev/") {
        return None;
    }
    let o = run(Command::new("lsblk").args(["-n", "-o", "PKNAME"]).arg(&src));
    let parent = String::from_utf8(o.stdout).unwrap();
    let parent = parent.lines().next().unwrap_or("").trim();
    if !parent.is_empty() {
        return Some(parent.to_owned());
    }
    Some(lsblk("NAME", Some(&src))[0][0].clone())
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
    // The same disks lsblk and sysfs see: every real disk (one with a device behind it, not
    // a loop, zram or RAM disk), with its size and logical sector size.
    let mut want: Vec<Vec<String>> = lsblk("NAME,TYPE,SIZE,LOG-SEC", None)
        .into_iter()
        .filter(|r| r[1] == "disk" && Path::new(&format!("/sys/block/{}/device", r[0])).exists())
        .collect();
    want.sort();
    let mut got: Vec<Vec<String>> = disks
        .iter()
        .map(|d| {
            assert!(d["transport"].is_string(), "{d}");
            vec![
                d["name"].as_str().unwrap().to_owned(),
                "disk".to_owned(),
                d["size"].to_string(),
                d["logical_block_size"].to_string(),
            ]
        })
        .collect();
    got.sort();
    assert_eq!(
        got, want,
        "imprint disks against lsblk (name, type, size, sector)"
    );
    assert!(!got.is_empty(), "this machine has at least its root disk");
    assert!(v["selection"]["outcome"].is_string() && v["selection"]["reason"].is_string());

    // The disk the running system lives on is found, rejected and never chosen.
    let Some(root) = root_disk() else {
        eprintln!(
            "/ is not on a block device here: the root-disk half of this test has nothing to check"
        );
        return;
    };
    assert!(got.iter().any(|r| r[0] == root), "root disk {root} listed");
    let sel = &v["selection"];
    assert_ne!(sel["disk"]["name"].as_str(), Some(root.as_str()), "{sel}");
    // Rejected as the appliance rejects its own stick, not merely for its bus or size.
    let why = sel["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["disk"]["name"].as_str() == Some(root.as_str()))
        .map(|r| r["why"].as_str().unwrap_or_default().to_owned());
    assert!(
        why.as_deref().is_some_and(|w| w.contains("stick")),
        "the root disk {root} is rejected as the stick: {sel}"
    );
    let text = String::from_utf8_lossy(&run(imprint().arg("disks")).stdout).into_owned();
    assert!(
        text.contains(&format!("({root} holds this system's root filesystem")),
        "{text}"
    );
}
