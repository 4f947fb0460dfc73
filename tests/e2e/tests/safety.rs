//! What the appliance refuses to do, scenario by scenario on the virtual NUC (Secure Boot off;
//! the boot chain itself is covered with Secure Boot on by boot.rs and install.rs). Each test
//! asserts the disks' exact state afterwards (sha256 of every disk file before and after) and
//! what the console and the report on the stick say.
//!
//! The payload here is a small real GPT disk image (sgdisk on a loop device), so each scenario
//! costs one appliance boot (~30 s under TCG), not an OS install. Needs root, build/boot,
//! qemu + OVMF, gdisk, mtools.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imprint_e2e::fixtures::{
    old_disk, run_until_done as done, sha256_file, small_image, stick_reports, stick_with,
};
use imprint_e2e::{check_next_boot, imprint_bin, Firmware, VmBuilder};

fn small_os(dir: &Path, sector_size: u32) -> PathBuf {
    small_image(dir, &format!("small-{sector_size}"), sector_size, None).unwrap()
}
fn disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    old_disk(&dir.join(name), size).unwrap()
}
fn sha(path: &Path) -> String {
    sha256_file(path).unwrap()
}
fn reports(stick: &Path) -> Vec<serde_json::Value> {
    stick_reports(stick).unwrap()
}
/// The virtual NUC with the stick and a NIC; each test adds its disks.
fn nuc(d: &Path, name: &str, stick: &Path) -> VmBuilder {
    VmBuilder::new(d.join(name), Firmware::NoSecureBoot)
        .stick(stick)
        .nic(NIC)
}
fn run_until_done(vm: VmBuilder) -> (imprint_e2e::Vm, String) {
    done(vm).unwrap()
}

const MIB: u64 = 1 << 20;
/// Every virtual NUC has a NIC: the default hostname pattern (`nuc-{serial}`) falls back to the
/// MAC where, as in qemu, the firmware has no DMI serial.
const NIC: &str = "52:54:00:5a:fe:01";
const GIB: u64 = 1 << 30;

/// A stick for `image` with `config` (JSON text) and a seed holding secrets.
fn stick(dir: &Path, name: &str, image: &Path, config: &str) -> PathBuf {
    let seed = dir.join(format!("seed-{name}"));
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(
        seed.join("user-data"),
        "#cloud-config\nusers:\n  - name: ops\n    passwd: $6$SECRETSALT$SECRETHASHVALUE\n    ssh_authorized_keys: [\"ssh-ed25519 AAAASECRETKEY ops@laptop\"]\n",
    )
    .unwrap();
    stick_with(dir, name, image, Some(&seed), config).unwrap()
}

fn no_secrets(log: &str, stick: &Path) {
    for r in reports(stick) {
        let t = r.to_string();
        assert!(
            !t.contains("SECRET"),
            "a secret from user-data is in the report: {t}"
        );
    }
    assert!(
        !log.contains("SECRET"),
        "a secret from user-data reached the console"
    );
}

const DEFAULT: &str = r#"{ "confirm": "never", "after": "poweroff" }"#;

#[test]
fn two_equal_nvme_disks_ask_and_stop_when_nobody_picks_one() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "amb", &img, DEFAULT);
    let a = disk(d, "a.img", GIB);
    let b = disk(d, "b.img", GIB);
    let (sa, sb) = (sha(&a), sha(&b));
    let mut v = nuc(d, "vm", &stick)
        .nvme(&a, "NVME-A")
        .nvme(&b, "NVME-B")
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_for(
        "Which disk should imprint overwrite?",
        Duration::from_secs(300),
    )
    .unwrap();
    assert!(v.log().contains("imprint: ambiguous"));
    // The default answer is "none": Enter stops without writing.
    v.send("\r").unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(60)).unwrap();
    v.kill();
    assert!(v.log().contains("no disk chosen; stopping"));
    assert_eq!((sha(&a), sha(&b)), (sa, sb), "nothing written");
    assert_eq!(reports(&stick)[0]["status"], "declined");
    no_secrets(&v.log(), &stick);
}

#[test]
fn choosing_among_ambiguous_disks_installs_on_the_chosen_one_only() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "pick", &img, DEFAULT);
    let a = disk(d, "a.img", GIB);
    let b = disk(d, "b.img", GIB);
    let sa = sha(&a);
    let mut v = nuc(d, "vm", &stick)
        .nvme(&a, "NVME-A")
        .nvme(&b, "NVME-B")
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_for(
        "Which disk should imprint overwrite?",
        Duration::from_secs(300),
    )
    .unwrap();
    // Choices: 1) nvme0n1, 2) nvme1n1, 0) none (default). 2: the second NVMe, disk b.
    v.send("2\r").unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(300))
        .unwrap();
    v.kill();
    let log = v.log();
    assert!(
        log.contains("seed written and read back"),
        "install completed"
    );
    assert_eq!(sha(&a), sa, "the disk not chosen is untouched");
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(&img)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "the chosen disk holds the image: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(reports(&stick)[0]["status"], "installed");
    check_next_boot(v.vars_path(), &reports(&stick)[0]).unwrap();
    no_secrets(&log, &stick);
}

#[test]
fn no_internal_disk_stops_with_a_clear_message() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "none", &img, DEFAULT);
    let usb = disk(d, "usb.img", GIB);
    let su = sha(&usb);
    let (_v, log) = run_until_done(nuc(d, "vm", &stick).usb_disk(&usb, "USBSSD01"));
    assert!(log.contains("FAILED: no target disk"), "{log}");
    assert!(log.contains("usb: never a target"));
    assert_eq!(sha(&usb), su, "a USB disk is never written");
    let r = &reports(&stick)[0];
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains("no target disk"));
    no_secrets(&log, &stick);
}

#[test]
fn usb_ssd_next_to_the_internal_disk_is_never_chosen() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "usb", &img, DEFAULT);
    let nvme = disk(d, "nvme.img", GIB);
    let usb = disk(d, "usb.img", 2 * GIB);
    let su = sha(&usb);
    let (v, log) = run_until_done(
        nuc(d, "vm", &stick)
            .usb_disk(&usb, "USBSSD01")
            .nvme(&nvme, "NVME0001"),
    );
    assert!(log.contains("imprint: target nvme0n1"), "{log}");
    assert_eq!(sha(&usb), su, "the USB SSD is untouched");
    assert_eq!(reports(&stick)[0]["status"], "installed");
    check_next_boot(v.vars_path(), &reports(&stick)[0]).unwrap();
    no_secrets(&log, &stick);
}

#[test]
fn too_small_disk_and_4kn_mismatch_are_refused_untouched() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "small", &img, DEFAULT);
    let tiny = disk(d, "tiny.img", 32 * MIB);
    let k4 = disk(d, "4k.img", GIB);
    let (st, sk) = (sha(&tiny), sha(&k4));
    let mut b = nuc(d, "vm", &stick).nvme(&tiny, "TINY0001");
    b = b.nvme_4kn(&k4, "NVME4KN1");
    let (_v, log) = run_until_done(b);
    assert!(log.contains("FAILED: no target disk"), "{log}");
    assert!(log.contains("too small"), "{log}");
    assert!(log.contains("4096-byte"), "{log}");
    assert_eq!((sha(&tiny), sha(&k4)), (st, sk));
    no_secrets(&log, &stick);
}

#[test]
fn a_4096_byte_image_installs_on_a_4kn_disk() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 4096);
    let stick = stick(d, "4k", &img, DEFAULT);
    let k4 = disk(d, "4k.img", GIB);
    let (v, log) = run_until_done(nuc(d, "vm", &stick).nvme_4kn(&k4, "NVME4KN1"));
    assert!(log.contains("seed written and read back"), "{log}");
    let r = &reports(&stick)[0];
    assert_eq!(r["status"], "installed");
    check_next_boot(v.vars_path(), r).unwrap();
    assert_eq!(r["seed"]["placement"]["sector_size"], 4096);
    // The disk itself: verifies against the image, and its table (4096-byte sectors) has the
    // seed partition and the backup header at the disk's last sector.
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(&img)
        .arg(&k4)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let table =
        imprint_core::gpt_table::GptTable::read(&mut std::fs::File::open(&k4).unwrap(), 4096)
            .unwrap();
    assert_eq!(table.header().backup_lba, GIB / 4096 - 1);
    assert!(table.find_by_name("CIDATA").is_some());
    no_secrets(&log, &stick);
}

#[test]
fn a_pinned_serial_that_is_absent_stops_without_writing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(
        d,
        "pin",
        &img,
        r#"{ "confirm": "never", "target": { "serial": "NOT-HERE-123" } }"#,
    );
    let nvme = disk(d, "nvme.img", GIB);
    let sn = sha(&nvme);
    let (_v, log) = run_until_done(nuc(d, "vm", &stick).nvme(&nvme, "NVME0001"));
    assert!(log.contains("FAILED: no target disk"), "{log}");
    assert!(
        log.contains("NOT-HERE-123"),
        "the message names the pin: {log}"
    );
    assert_eq!(sha(&nvme), sn);
    no_secrets(&log, &stick);
}

#[test]
fn declining_the_confirmation_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "decline", &img, r#"{ "confirm": "always" }"#);
    let nvme = disk(d, "nvme.img", GIB);
    let sn = sha(&nvme);
    let mut v = nuc(d, "vm", &stick)
        .nvme(&nvme, "NVME0001")
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_for("Erase nvme0n1 and install", Duration::from_secs(300))
        .unwrap();
    v.send("n\r").unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(60)).unwrap();
    v.kill();
    assert!(v.log().contains("declined; nothing was written"));
    assert_eq!(sha(&nvme), sn);
    assert_eq!(reports(&stick)[0]["status"], "declined");
    no_secrets(&v.log(), &stick);
}

#[test]
fn a_corrupted_payload_leaves_no_partition_table_and_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "corrupt", &img, DEFAULT);
    // Flip one byte in the middle of the compressed payload on the stick (partition 2).
    let out = Command::new("sgdisk")
        .args(["-i", "2"])
        .arg(&stick)
        .output()
        .unwrap();
    let first: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("First sector"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .parse()
        .unwrap();
    let len = std::fs::metadata(&img).unwrap().len();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&stick)
            .unwrap();
        let at = first * 512 + len * 2 / 3;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    }
    let nvme = disk(d, "nvme.img", GIB);
    let (_v, log) = run_until_done(nuc(d, "vm", &stick).nvme(&nvme, "NVME0001"));
    assert!(log.contains("FAILED"), "{log}");
    assert!(
        log.contains("corrupt"),
        "the message names the fault: {log}"
    );
    let bytes = std::fs::read(&nvme).unwrap();
    assert!(
        bytes[..MIB as usize].iter().all(|&b| b == 0),
        "no primary GPT, no protective MBR"
    );
    assert!(
        bytes[bytes.len() - MIB as usize..].iter().all(|&b| b == 0),
        "no backup GPT"
    );
    let r = &reports(&stick)[0];
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains("corrupt"));
    no_secrets(&log, &stick);
}

/// A 64 MiB GPT image whose partition 2 holds 40 MiB of a non-zero pattern (at 20..60 MiB),
/// prepared; returns the image and the pattern.
fn dense_image(d: &Path) -> (PathBuf, Vec<u8>) {
    let raw = d.join("dense.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let ok = Command::new("sgdisk")
        .args(["-n1:0:+16M", "-t1:ef00", "-n2:0:0", "-t2:8300"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let pattern: Vec<u8> = (0..40 * MIB).map(|i| (i % 251) as u8 + 1).collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.write_all_at(&pattern, 20 * MIB).unwrap();
    }
    let img = d.join("dense.img.zst");
    let ok = Command::new(imprint_bin().unwrap())
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    (img, pattern)
}

/// MiB of `pattern` (compared MiB by MiB) that the disk file holds at 20 MiB.
fn payload_mib_on_disk(disk: &Path, pattern: &[u8]) -> usize {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).unwrap();
    let mut buf = vec![0u8; pattern.len()];
    f.read_exact_at(&mut buf, 20 * MIB).unwrap();
    buf.chunks(MIB as usize)
        .zip(pattern.chunks(MIB as usize))
        .filter(|(a, b)| a == b)
        .count()
}

#[test]
fn a_power_cut_mid_write_leaves_no_partition_table_and_the_next_boot_installs() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (img, pattern) = dense_image(d);
    let stick = stick(d, "cut", &img, DEFAULT);
    let nvme = disk(d, "nvme.img", GIB);
    // Writes at 2 MB/s: the 40 MiB payload takes about 20 s to reach the disk.
    let mut v = nuc(d, "vm1", &stick)
        .nvme_throttled(&nvme, "NVME0001", 2_000_000)
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_for("imprint: wipe done", Duration::from_secs(300))
        .unwrap();
    // Pull the plug once at least a quarter of the payload is on the disk, and before all of it.
    let total = pattern.len() / MIB as usize;
    let start = std::time::Instant::now();
    let mut seen = 0;
    while seen < total / 4 {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the payload never reached the disk"
        );
        std::thread::sleep(Duration::from_millis(200));
        seen = payload_mib_on_disk(&nvme, &pattern);
    }
    v.kill();
    let at_cut = payload_mib_on_disk(&nvme, &pattern);
    eprintln!("power cut with {at_cut} of {total} MiB of the payload on the disk");
    assert!(
        at_cut >= total / 4 && at_cut < total,
        "the cut must land mid-write: {at_cut} of {total} MiB written"
    );
    assert!(
        !v.log().contains("verify done"),
        "cut before the read-back finished"
    );
    let vars = d.join("vars-after-cut.fd");
    std::fs::copy(v.vars_path(), &vars).unwrap();
    drop(v);
    let bytes = std::fs::read(&nvme).unwrap();
    assert!(
        bytes[..MIB as usize].iter().all(|&b| b == 0),
        "no partition table after the cut"
    );
    assert!(bytes[bytes.len() - MIB as usize..].iter().all(|&b| b == 0));
    drop(bytes);
    // Power on again: the disk looks empty (no partition table), the install runs to the end.
    let (v, log) = run_until_done(
        nuc(d, "vm2", &stick)
            .nvme(&nvme, "NVME0001")
            .vars_from(&vars),
    );
    assert!(log.contains("seed written and read back"), "{log}");
    assert_eq!(payload_mib_on_disk(&nvme, &pattern), total);
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(&img)
        .arg(&nvme)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(reports(&stick).last().unwrap()["status"], "installed");
    check_next_boot(v.vars_path(), reports(&stick).last().unwrap()).unwrap();
    no_secrets(&log, &stick);
}

/// A blkdebug rules file failing every `iotype` I/O that touches the sector at 20 MiB (inside
/// the small image's data, which is written, not zeroed out).
fn faults(d: &Path, iotype: &str) -> PathBuf {
    let p = d.join(format!("faults-{iotype}.cfg"));
    std::fs::write(
        &p,
        format!("[inject-error]\nevent = \"none\"\niotype = \"{iotype}\"\nerrno = \"5\"\nsector = \"{}\"\n", 20 * MIB / 512),
    )
    .unwrap();
    p
}

/// Runs until `IMPRINT-DONE`, then checks the machine neither reboots nor powers off (the
/// config says power off after an install: a failure must wait for the operator instead).
fn run_until_done_and_still_up(vm: VmBuilder) -> String {
    let mut v = vm.timeout(Duration::from_secs(600)).start().unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(400))
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        v.is_running(),
        "the machine rebooted or powered off after a failure"
    );
    v.kill();
    v.log()
}

/// The disk after a failed install: no table at either end.
fn no_partition_table(disk: &Path) {
    let bytes = std::fs::read(disk).unwrap();
    assert!(
        bytes[..MIB as usize].iter().all(|&b| b == 0),
        "no primary GPT"
    );
    assert!(
        bytes[bytes.len() - MIB as usize..].iter().all(|&b| b == 0),
        "no backup GPT"
    );
}

#[test]
fn a_write_error_names_the_offset_and_leaves_no_partition_table() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "wio", &img, DEFAULT);
    let nvme = disk(d, "nvme.img", GIB);
    let log = run_until_done_and_still_up(nuc(d, "vm", &stick).nvme_with_faults(
        &nvme,
        "NVME0001",
        faults(d, "write"),
    ));
    assert!(log.contains("FAILED"), "{log}");
    assert!(
        log.contains(&format!("writing 1048576 bytes at offset {}", 20 * MIB))
            || log.contains(&format!("at offset {}", 20 * MIB)),
        "the error names where: {log}"
    );
    assert!(
        log.contains("target disk: the disk has no partition table at either end"),
        "{log}"
    );
    no_partition_table(&nvme);
    let r = &reports(&stick)[0];
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains("writing"), "{r}");
    no_secrets(&log, &stick);
}

#[test]
fn a_read_back_error_names_the_offset_and_leaves_no_partition_table() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "rio", &img, DEFAULT);
    let nvme = disk(d, "nvme.img", GIB);
    let log = run_until_done_and_still_up(nuc(d, "vm", &stick).nvme_with_faults(
        &nvme,
        "NVME0001",
        faults(d, "read"),
    ));
    assert!(log.contains("FAILED"), "{log}");
    assert!(log.contains("reading back /dev/nvme0n1 at offset"), "{log}");
    assert!(
        log.contains("target disk: the disk has no partition table at either end"),
        "{log}"
    );
    no_partition_table(&nvme);
    let r = &reports(&stick)[0];
    assert!(r["error"].as_str().unwrap().contains("reading back"), "{r}");
    no_secrets(&log, &stick);
}

#[test]
fn a_sata_only_machine_installs_on_the_sata_disk() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "sata", &img, DEFAULT);
    let sata = disk(d, "sata.img", GIB);
    let (_v, log) = run_until_done(nuc(d, "vm", &stick).sata(&sata, "SATA0001"));
    assert!(log.contains("imprint: target sda"), "{log}");
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(&img)
        .arg(&sata)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    no_secrets(&log, &stick);
}

/// Byte offset of partition `n` in an image file.
fn partition_offset(image: &Path, n: u32) -> u64 {
    let out = Command::new("sgdisk")
        .args(["-i", &n.to_string()])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("First sector"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 512
}

#[test]
fn a_truncated_payload_leaves_no_partition_table() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "trunc", &img, DEFAULT);
    // The copy on the stick lost its last quarter (zeros where the end of the stream was):
    // the manifest still promises the full payload.
    let len = std::fs::metadata(&img).unwrap().len();
    let lost = len / 4;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&stick)
            .unwrap();
        f.write_all_at(
            &vec![0u8; lost as usize],
            partition_offset(&stick, 2) + len - lost,
        )
        .unwrap();
    }
    let nvme = disk(d, "nvme.img", GIB);
    let (_v, log) = run_until_done(nuc(d, "vm", &stick).nvme(&nvme, "NVME0001"));
    assert!(
        log.contains("FAILED") && log.contains("corrupt or truncated"),
        "{log}"
    );
    let bytes = std::fs::read(&nvme).unwrap();
    assert!(
        bytes[..MIB as usize].iter().all(|&b| b == 0),
        "no partition table"
    );
    no_secrets(&log, &stick);
}

#[test]
fn a_corrupted_manifest_is_refused_before_any_write() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_os(d, 512);
    let stick = stick(d, "manifest", &img, DEFAULT);
    {
        // Byte 40 of the image is inside the manifest's JSON.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&stick)
            .unwrap();
        let at = partition_offset(&stick, 2) + 40;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    }
    let nvme = disk(d, "nvme.img", GIB);
    let before = sha(&nvme);
    let (_v, log) = run_until_done(nuc(d, "vm", &stick).nvme(&nvme, "NVME0001"));
    assert!(log.contains("FAILED") && log.contains("manifest"), "{log}");
    assert_eq!(sha(&nvme), before, "refused before any write");
    no_secrets(&log, &stick);
}
