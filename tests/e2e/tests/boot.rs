//! Boots the stick `imprint build` makes, with Secure Boot on and off, next to NVMe, SATA and
//! USB disks: PID 1 must list every disk with the right transport, recognise its own stick,
//! print IMPRINT-BOOT-OK and power the machine off. A second imprint stick is plugged in too. The stick boots in probe mode
//! (`imprint.probe` added to its kernel command line): it reports and touches nothing.
//!
//! Needs build/boot (image-build/build) and qemu + OVMF (scripts/deps). Run with
//! `cargo test -p imprint-e2e -- --test-threads=1`: two TCG guests on two cores only slow each
//! other down.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imprint_e2e::{
    add_kernel_args, boot_dir, imprint_bin, parse_disk_table, run, sparse_disk, Firmware, VmBuilder,
};

const GIB: u64 = 1 << 30;

/// A stick made by the real CLI: a small raw "OS" packed by `imprint prepare`, then `imprint
/// build` with a seed folder.
fn build_stick(dir: &Path) -> PathBuf {
    let boot = boot_dir().unwrap_or_else(|e| panic!("{e}"));
    let imprint = imprint_bin().unwrap();
    let raw = dir.join("os.raw");
    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&raw, data).unwrap();
    let image = dir.join("os.img.zst");
    run(Command::new(&imprint)
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&image))
    .unwrap();
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(
        seed.join("user-data"),
        "#cloud-config\nruncmd: [poweroff]\n",
    )
    .unwrap();
    let stick = dir.join("stick.img");
    run(Command::new(&imprint)
        .arg("build")
        .arg("--image")
        .arg(&image)
        .arg("--seed")
        .arg(&seed)
        .arg("--boot")
        .arg(&boot)
        .arg("-o")
        .arg(&stick))
    .unwrap();
    add_kernel_args(&stick, "imprint.probe").unwrap();
    stick
}

fn boot_and_list_disks(firmware: Firmware) -> String {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stick = build_stick(d);
    // A second imprint stick (same partition names, another PARTUUID) plugged in as well: PID 1
    // must still tell its own stick by the PARTUUID on its kernel command line.
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other_stick = build_stick(&other);
    let mut vm = VmBuilder::new(d.join("vm"), firmware)
        .stick(&stick)
        .nvme(
            sparse_disk(&d.join("nvme0.img"), 8 * GIB).unwrap(),
            "NVME0001",
        )
        .nvme_4kn(
            sparse_disk(&d.join("nvme1.img"), 4 * GIB).unwrap(),
            "NVME4KN1",
        )
        .sata(
            sparse_disk(&d.join("sata0.img"), 6 * GIB).unwrap(),
            "SATA0001",
        )
        .usb_disk(
            sparse_disk(&d.join("usbssd.img"), 2 * GIB).unwrap(),
            "USBSSD01",
        )
        .usb_disk(&other_stick, "OTHERSTK1")
        .timeout(Duration::from_secs(420))
        .start()
        .unwrap();
    vm.wait_for("IMPRINT-BOOT-OK", Duration::from_secs(360))
        .unwrap_or_else(|e| panic!("{firmware:?}: {e}"));
    let booted = vm.elapsed();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        status.success(),
        "qemu exited with {status} (powered off expected)"
    );
    let log = vm.log();
    assert!(
        log.contains("imprint.probe"),
        "the kernel did not get imprint.probe:\n{log}"
    );
    eprintln!(
        "{firmware:?}: IMPRINT-BOOT-OK after {:.1}s",
        booted.as_secs_f64()
    );

    let rows = parse_disk_table(&log);
    let by_serial = |serial: &str| {
        rows.iter()
            .find(|r| r.line.contains(serial))
            .unwrap_or_else(|| panic!("disk {serial} not listed in:\n{rows:#?}\n{log}"))
    };
    assert_eq!(by_serial("NVME0001").transport, "nvme");
    assert!(by_serial("NVME0001").line.contains("8.0 GiB"));
    assert_eq!(by_serial("NVME4KN1").transport, "nvme");
    assert_eq!(by_serial("SATA0001").transport, "sata");
    assert!(by_serial("SATA0001").line.contains("6.0 GiB"));
    // A USB SSD is usb, and it is not the stick.
    let ssd = by_serial("USBSSD01");
    assert_eq!(ssd.transport, "usb");
    assert!(!ssd.line.contains("imprint stick"));
    assert_eq!(by_serial("OTHERSTK1").transport, "usb");
    let stick: Vec<_> = rows
        .iter()
        .filter(|r| r.line.ends_with("imprint stick"))
        .collect();
    assert_eq!(stick.len(), 1, "exactly one disk is the stick: {rows:#?}");
    assert_eq!(stick[0].transport, "usb");
    assert!(
        !stick[0].line.contains("OTHERSTK1"),
        "the other stick was taken for ours: {rows:#?}"
    );
    assert_eq!(rows.len(), 6, "{rows:#?}");
    log
}

#[test]
fn stick_boots_with_secure_boot_off() {
    let log = boot_and_list_disks(Firmware::NoSecureBoot);
    assert!(log.contains("Secure boot disabled"), "{log}");
}

#[test]
fn stick_boots_with_secure_boot_on() {
    let log = boot_and_list_disks(Firmware::SecureBoot);
    // The whole chain was verified: shim by the firmware, GRUB and the kernel by shim.
    assert!(log.contains("Secure boot enabled"), "{log}");
}
