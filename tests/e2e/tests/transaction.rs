//! The install as one transaction, and what comes after it, on the virtual NUC (Secure Boot
//! off; install.rs runs the whole story with it on): a failure where the seed goes leaves no
//! partition table and no reboot; a bare machine is named by its seed; a machine the stick
//! handed to its disk once and that comes back stops instead of looping. Each asserts the
//! disks' bytes, the report on the stick and what the console said.
//!
//! Needs root, build/boot, qemu + OVMF, gdisk, mtools. Run single-threaded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imprint_core::gpt_table::GptTable;
use imprint_e2e::fixtures::{old_disk, sha256_file, small_image, stick_reports, stick_with};
use imprint_e2e::{check_next_boot, run, Firmware, VmBuilder};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const NIC: &str = "52:54:00:5a:fe:02";

fn sha(p: &Path) -> String {
    sha256_file(p).unwrap()
}

/// A seed with its own `local-hostname` and a user-data holding a secret.
fn seed(d: &Path) -> PathBuf {
    let s = d.join("seed");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(
        s.join("user-data"),
        "#cloud-config\nusers:\n  - name: ops\n    passwd: $6$SECRETSALT$SECRETHASH\n",
    )
    .unwrap();
    std::fs::write(s.join("meta-data"), "local-hostname: bare-metal-7\n").unwrap();
    s
}

fn no_secrets(log: &str, stick: &Path) {
    // That the appliance ran is its report on the stick (a console line can be split by a
    // kernel message printed in the middle of it).
    let reports = stick_reports(stick).unwrap();
    assert!(!reports.is_empty(), "the appliance ran and wrote a report");
    assert!(
        !log.contains("SECRET"),
        "a user-data secret reached the console"
    );
    for r in reports {
        assert!(
            !r.to_string().contains("SECRET"),
            "a secret in the report: {r}"
        );
    }
}

/// The bytes of `file` on the FAT filesystem at `offset` of `image`.
fn fat_file(image: &Path, offset: u64, file: &str) -> String {
    run(Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", image.display()))
        .arg(format!("::{file}")))
    .unwrap()
}

/// A blkdebug rules file failing every write to `sector`.
fn write_fault(d: &Path, sector: u64) -> PathBuf {
    let p = d.join("faults.cfg");
    std::fs::write(
        &p,
        format!("[inject-error]\nevent = \"none\"\niotype = \"write\"\nerrno = \"5\"\nsector = \"{sector}\"\n"),
    )
    .unwrap();
    p
}

#[test]
fn a_write_error_where_the_seed_goes_leaves_no_partition_table_and_no_reboot() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_image(d, "small", 512, None).unwrap();
    // after=reboot: had the install "succeeded", qemu (-no-reboot) would exit.
    let stick = stick_with(
        d,
        "seedfail",
        &img,
        Some(&seed(d)),
        r#"{ "confirm": "never", "after": "reboot" }"#,
    )
    .unwrap();
    let nvme = old_disk(&d.join("nvme.img"), GIB).unwrap();
    // Where the CIDATA partition goes on this disk: the last 8 MiB of usable space, 1-MiB
    // aligned (2097152 sectors; the backup GPT takes the last 33).
    let cidata_first = (2_097_152 - 33 - 16_384) / 2048 * 2048;
    let mut v = VmBuilder::new(d.join("vm"), Firmware::NoSecureBoot)
        .stick(&stick)
        .nic(NIC)
        .nvme_with_faults(&nvme, "NVME0001", write_fault(d, cidata_first + 100))
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(400))
        .unwrap();
    // Still running some seconds later: no reboot, no power-off.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        v.is_running(),
        "the VM rebooted or powered off after a failure"
    );
    v.kill();
    let log = v.log();
    assert!(
        log.contains("verify done"),
        "the image itself was written and verified first: {log}"
    );
    // The failing write is the 4 MiB piece of the seed partition holding the faulty sector.
    let at = format!(
        "the CIDATA seed partition: writing 4194304 bytes at offset {}",
        cidata_first * 512
    );
    assert!(
        log.contains("FAILED") && log.contains(&at),
        "the error names the seed and where: {log}"
    );
    assert!(
        log.contains("target disk: the disk has no partition table at either end"),
        "{log}"
    );
    // The disk: the image's data is there (the failure came after it), but no table at
    // either end, and no seed.
    let bytes = std::fs::read(&nvme).unwrap();
    assert!(
        bytes[..MIB as usize].iter().all(|&b| b == 0),
        "no primary GPT"
    );
    assert!(
        bytes[bytes.len() - MIB as usize..].iter().all(|&b| b == 0),
        "no backup GPT"
    );
    assert!(
        bytes[(20 * MIB) as usize..(22 * MIB) as usize]
            .iter()
            .all(|&b| b == 0x5A),
        "the image's data was written before the seed failed"
    );
    let r = &stick_reports(&stick).unwrap()[0];
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains(&at), "{r}");
    no_secrets(&log, &stick);
}

#[test]
fn a_bare_machine_with_no_nic_and_no_serial_is_named_by_its_seed() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_image(d, "small", 512, None).unwrap();
    // The defaults, but for powering off at the end.
    let stick = stick_with(
        d,
        "bare",
        &img,
        Some(&seed(d)),
        r#"{ "after": "poweroff" }"#,
    )
    .unwrap();
    // An empty disk: the default `confirm: if-not-empty` does not ask.
    let nvme = d.join("nvme.img");
    File::create(&nvme).unwrap().set_len(GIB).unwrap();
    // No .nic(): qemu's -nic none; qemu has no DMI serial.
    let mut v = VmBuilder::new(d.join("vm"), Firmware::NoSecureBoot)
        .stick(&stick)
        .nvme(&nvme, "NVME-BARE-1")
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_exit(Duration::from_secs(500)).unwrap();
    let log = v.log();
    assert!(
        log.contains(
            "seed written and read back: hostname bare-metal-7 (named by the seed's meta-data local-hostname)"
        ),
        "{log}"
    );
    let r = &stick_reports(&stick).unwrap()[0];
    assert_eq!(r["status"], "installed");
    check_next_boot(v.vars_path(), r).unwrap();
    assert_eq!(r["seed"]["summary"]["hostname"], "bare-metal-7");
    assert_eq!(
        r["seed"]["summary"]["hostname_source"]["rule"],
        "seed-meta-data"
    );
    // The CIDATA partition on the disk carries that name.
    let table = GptTable::read(&mut File::open(&nvme).unwrap(), 512).unwrap();
    let (_, p) = table.find_by_name("CIDATA").expect("a CIDATA partition");
    let meta = fat_file(&nvme, p.first_lba * 512, "meta-data");
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["local-hostname"], "bare-metal-7");
    assert!(meta["instance-id"]
        .as_str()
        .unwrap()
        .starts_with("imprint-"));
    no_secrets(&log, &stick);
}

/// One power-on of the handover scenario: runs until qemu exits (a reboot) or the appliance
/// stops; returns the console log.
fn power_on(
    d: &Path,
    name: &str,
    stick: &Path,
    nvme: &Path,
    vars: Option<&Path>,
) -> (String, PathBuf) {
    let mut b = VmBuilder::new(d.join(name), Firmware::NoSecureBoot)
        .stick(stick)
        .nic(NIC)
        .nvme(nvme, "NVME-LOOP-1")
        .stick_only_bootindex()
        .timeout(Duration::from_secs(600));
    if let Some(v) = vars {
        b = b.vars_from(v);
    }
    let mut v = b.start().unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(400))
        .unwrap();
    let _ = v.wait_exit(Duration::from_secs(20));
    v.kill();
    let saved = d.join(format!("vars-{name}.fd"));
    std::fs::copy(v.vars_path(), &saved).unwrap();
    (v.log(), saved)
}

#[test]
fn a_machine_that_comes_back_after_the_handover_stops_instead_of_looping() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // The small image's ESP holds no loader: neither the firmware nor the stick's GRUB can
    // boot the installed disk, the worst case for a loop.
    let img = small_image(d, "small", 512, None).unwrap();
    let stick = stick_with(
        d,
        "loop",
        &img,
        Some(&seed(d)),
        r#"{ "confirm": "never", "after": "reboot" }"#,
    )
    .unwrap();
    let nvme = old_disk(&d.join("nvme.img"), GIB).unwrap();

    // 1: installs and reboots. The image's ESP holds no FAT with a loader: the stick cannot
    // record a handover for its GRUB, and says so.
    let (log1, vars1) = power_on(d, "p1", &stick, &nvme, None);
    assert!(
        log1.contains("rebooting into the installed system"),
        "{log1}"
    );
    assert!(
        log1.contains("no readable EFI System Partition the stick could hand over to"),
        "{log1}"
    );
    let installed = sha(&nvme);

    // 2: the firmware pruned the disk's entry and booted the stick; the appliance sees the
    // install, does not rewrite it and hands over once more (BootNext).
    let (log2, vars2) = power_on(d, "p2", &stick, &nvme, Some(&vars1));
    assert!(log2.contains("already holds small"), "{log2}");
    assert!(
        log2.contains("rebooting into the installed system"),
        "{log2}"
    );
    assert_eq!(sha(&nvme), installed, "not rewritten");

    // 3: back again: stop, do not reboot a third time.
    let (log3, _) = power_on(d, "p3", &stick, &nvme, Some(&vars2));
    assert!(
        log3.contains("came back to the stick after being handed to its disk; stopping"),
        "{log3}"
    );
    assert!(log3.contains("nothing was written"), "{log3}");
    assert_eq!(sha(&nvme), installed, "not rewritten");
    let statuses: Vec<String> = stick_reports(&stick)
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        statuses,
        ["installed", "already-installed", "already-installed"]
    );
}

/// A 64 MiB GPT image whose partition 2 (17 MiB .. end) holds an ext4 root filesystem.
fn ext4_image(d: &Path) -> PathBuf {
    let raw = d.join("ext4.raw");
    File::create(&raw).unwrap().set_len(64 * MIB).unwrap();
    run(Command::new("sgdisk")
        .args(["-n1:0:+16M", "-t1:ef00", "-n2:0:0", "-t2:8304", "-c2:root"])
        .arg(&raw))
    .unwrap();
    let table = GptTable::read(&mut File::open(&raw).unwrap(), 512).unwrap();
    let p = &table.partitions()[&2];
    let blocks = (p.last_lba + 1 - p.first_lba) * 512 / 4096;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "root"])
        .arg("-E")
        .arg(format!("offset={}", p.first_lba * 512))
        .arg(&raw)
        .arg(blocks.to_string()))
    .unwrap();
    let img = d.join("ext4.img.zst");
    run(Command::new(imprint_e2e::imprint_bin().unwrap())
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&img))
    .unwrap();
    img
}

/// A file of the ext4 filesystem on `dev`, read with debugfs (its standard output only).
fn debugfs_cat(dev: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(dev)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn root_filesystem_placement_lands_inside_the_transaction() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = ext4_image(d);
    let stick = stick_with(
        d,
        "rootfs",
        &img,
        Some(&seed(d)),
        r#"{ "confirm": "never", "after": "poweroff",
             "seed": { "placement": "root-filesystem" } }"#,
    )
    .unwrap();
    let nvme = old_disk(&d.join("nvme.img"), GIB).unwrap();
    let mut v = VmBuilder::new(d.join("vm"), Firmware::NoSecureBoot)
        .stick(&stick)
        .nic(NIC)
        .nvme(&nvme, "NVME-ROOT-1")
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_exit(Duration::from_secs(500)).unwrap();
    let log = v.log();
    assert!(
        log.contains("seed written and read back: hostname bare-metal-7"),
        "{log}"
    );
    let r = &stick_reports(&stick).unwrap()[0];
    assert_eq!(r["status"], "installed");
    check_next_boot(v.vars_path(), r).unwrap();
    assert_eq!(r["seed"]["placement"]["placement"], "directory", "{r}");
    // The seed files inside the installed root filesystem, read with debugfs through a loop
    // device over the partition (the disk's table is the image's, plus nothing).
    let table = GptTable::read(&mut File::open(&nvme).unwrap(), 512).unwrap();
    assert!(
        table.find_by_name("CIDATA").is_none(),
        "no seed partition with this placement"
    );
    let p = &table.partitions()[&2];
    let lo = imprint_core::loopdev::LoopDevice::attach(
        Path::new("/dev"),
        &nvme,
        p.first_lba * 512,
        (p.last_lba + 1 - p.first_lba) * 512,
        true,
    )
    .unwrap();
    let meta = debugfs_cat(lo.path(), "/var/lib/cloud/seed/nocloud/meta-data");
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["local-hostname"], "bare-metal-7");
    let ud = debugfs_cat(lo.path(), "/var/lib/cloud/seed/nocloud/user-data");
    assert!(ud.starts_with("#cloud-config\nusers:"), "{ud}");
    drop(lo);
    // And the committed table is clean: both headers, backup at the disk's end.
    let g = Command::new("sgdisk")
        .arg("-v")
        .arg(&nvme)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&g.stdout).contains("No problems found"),
        "{}",
        String::from_utf8_lossy(&g.stdout)
    );
    no_secrets(&log, &stick);
}
