//! The product's whole story on a virtual NUC, with Secure Boot off and on: the stick boots,
//! the appliance installs the real Debian cloud image (image-build/os-image) onto the NVMe disk
//! and leaves the SATA disk alone, seeds cloud-init, writes its report to the stick, sets
//! BootNext and reboots; the next power-on boots the installed OS, where cloud-init applies the
//! seed (hostname and static address from the machines table, a marker file); a third power-on
//! with the stick still in does not reinstall.
//!
//! Needs build/boot (image-build/build), build/os/debian-bookworm-cloud.raw
//! (image-build/os-image), qemu + OVMF + mtools (scripts/deps). Run single-threaded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imprint_e2e::fixtures::{old_disk, sha256_file, stick_reports};
use imprint_e2e::{
    boot_dir, check_next_boot, imprint_bin, ovmf_vars, run, workspace_root, Firmware, VmBuilder,
};

fn sha(path: &Path) -> String {
    sha256_file(path).unwrap()
}
fn reports(stick: &Path) -> Vec<serde_json::Value> {
    stick_reports(stick).unwrap()
}

const GIB: u64 = 1 << 30;
const MAC: &str = "52:54:00:12:34:56";

fn os_image() -> PathBuf {
    let p = workspace_root().join("build/os/debian-bookworm-cloud.raw");
    assert!(
        p.exists(),
        "{} is missing: run image-build/os-image first (scripts/test does)",
        p.display()
    );
    p
}

/// Prepared once per test process: the OS image as an imprint image.
fn prepared(dir: &Path) -> PathBuf {
    let out = dir.join("os.img.zst");
    run(Command::new(imprint_bin().unwrap())
        .arg("prepare")
        .arg(os_image())
        .arg("-o")
        .arg(&out)
        .args(["--level", "3"]))
    .unwrap();
    out
}

fn stick(dir: &Path, image: &Path) -> PathBuf {
    let seed = workspace_root().join("scripts/demo-seed");
    let out = dir.join("stick.img");
    run(Command::new(imprint_bin().unwrap())
        .arg("build")
        .arg("--image")
        .arg(image)
        .arg("--seed")
        .arg(&seed)
        .arg("--config")
        .arg(seed.join("config.json"))
        .arg("--boot")
        .arg(boot_dir().unwrap())
        .arg("-o")
        .arg(&out))
    .unwrap();
    out
}

#[allow(clippy::too_many_arguments)]
fn vm(
    dir: &Path,
    name: &str,
    fw: Firmware,
    stick: &Path,
    nvme: &Path,
    sata: &Path,
    vars: Option<&Path>,
    prune: bool,
) -> VmBuilder {
    let mut b = VmBuilder::new(dir.join(name), fw)
        .stick(stick)
        .nvme(nvme, "NUC-NVME-0001")
        .sata(sata, "NUC-SATA-0001")
        .nic(MAC)
        .timeout(Duration::from_secs(900));
    if let Some(v) = vars {
        b = b.vars_from(v);
    }
    if prune {
        b = b.stick_only_bootindex();
    }
    b
}

/// The instance-id in the seed on the installed disk (changes with every install).
fn seed_instance_id(nvme: &Path) -> String {
    let table =
        imprint_core::gpt_table::GptTable::read(&mut std::fs::File::open(nvme).unwrap(), 512)
            .unwrap();
    let (_, p) = table.find_by_name("CIDATA").expect("a CIDATA partition");
    let meta = run(Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", nvme.display(), p.first_lba * 512))
        .arg("::meta-data"))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    v["instance-id"].as_str().unwrap().to_string()
}

/// `prune`: the second power-on runs on firmware that drops the boot entry the appliance made
/// (a `bootindex` on the stick only), so only the stick's own GRUB can hand the machine over.
fn whole_story(fw: Firmware, prune: bool) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let image = prepared(d);
    let stick = stick(d, &image);
    let nvme = old_disk(&d.join("nvme.img"), 8 * GIB).unwrap();
    let sata = old_disk(&d.join("sata.img"), 4 * GIB).unwrap();
    let sata_before = sha(&sata);

    // Power-on 1: install.
    let mut v1 = vm(d, "boot1", fw, &stick, &nvme, &sata, None, false)
        .start()
        .unwrap();
    // The NVMe disk holds old data and the demo config says `confirm: if-not-empty`: the
    // appliance shows the disk and asks on the console; answer it like an operator would.
    v1.wait_for(
        "Erase nvme0n1 and install debian-bookworm-cloud?",
        Duration::from_secs(300),
    )
    .unwrap();
    assert!(v1
        .log()
        .contains("partitions: none — will be overwritten with debian-bookworm-cloud"));
    v1.send("y\r").unwrap();
    v1.wait_for(
        "imprint: rebooting into the installed system",
        Duration::from_secs(600),
    )
    .unwrap();
    v1.wait_exit(Duration::from_secs(60)).unwrap();
    let log1 = v1.log();
    assert!(
        log1.contains("imprint: target nvme0n1"),
        "the NVMe disk is the target"
    );
    assert!(
        log1.contains("nvme is preferred over sata"),
        "and the console says why"
    );
    assert!(log1
        .contains("seed written and read back: hostname nuc-demo-01 (named by machines entry 0)"));
    assert!(log1.contains("imprint: recorded on the stick"), "{log1}");
    assert!(
        !log1.contains("IMPRINT-OS-OK"),
        "user-data must not be printed on the console"
    );
    let vars1 = d.join("vars-after-install.fd");
    std::fs::copy(v1.vars_path(), &vars1).unwrap();
    drop(v1);

    // The disks afterwards.
    assert_eq!(sha(&sata), sata_before, "the SATA disk is untouched");
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(&image)
        .arg(&nvme)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "imprint verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(out.contains("backup GPT at the disk's end"), "{out}");
    assert!(
        out.contains("extra partitions beyond the image: CIDATA"),
        "{out}"
    );
    let sg = Command::new("sgdisk")
        .arg("-v")
        .arg(&nvme)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&sg.stdout).contains("No problems found"),
        "sgdisk -v"
    );
    // The report on the stick: what was chosen and why, verified, the seed summary — and no secrets.
    let r = reports(&stick);
    assert_eq!(r.len(), 1);
    let r = &r[0];
    assert_eq!(r["status"], "installed");
    assert_eq!(r["selection"]["chosen"], "nvme0n1");
    assert_eq!(r["write"]["verified"], true);
    assert_eq!(r["seed"]["summary"]["hostname"], "nuc-demo-01");
    assert_eq!(r["seed"]["summary"]["matched"]["by"], "mac");
    // What the firmware holds: BootNext and a Boot#### for the installed disk's ESP, listed
    // in BootOrder, exactly as the report says.
    check_next_boot(&vars1, r).unwrap();
    let text = r.to_string();
    assert!(
        !text.contains("provisioned by imprint") && !text.contains("runcmd"),
        "seed contents leaked into the report"
    );

    let instance = seed_instance_id(&nvme);

    // Power-on 2, stick still in: BootNext takes the firmware to the NVMe disk — or, where the
    // firmware pruned that entry, the stick's GRUB finds the installed disk and chainloads its
    // loader. Either way the installed OS boots and cloud-init applies the seed.
    let mut v2 = vm(d, "boot2", fw, &stick, &nvme, &sata, Some(&vars1), prune)
        .start()
        .unwrap();
    v2.wait_for(
        "IMPRINT-OS-OK hostname=nuc-demo-01 marker=provisioned_by_imprint",
        Duration::from_secs(600),
    )
    .unwrap();
    v2.wait_for("IMPRINT-OS-ADDR", Duration::from_secs(60))
        .unwrap();
    let log2 = v2.log();
    assert!(
        log2.contains("inet 10.0.2.50/24"),
        "static address from the machines table"
    );
    if prune {
        assert!(
            log2.contains("Boot the installed system: nuc-demo-01 (debian-bookworm-cloud)"),
            "the stick's GRUB handed over: {log2}"
        );
    }
    assert!(
        !log2.contains("imprint: install "),
        "the appliance did not run"
    );
    v2.wait_exit(Duration::from_secs(120)).unwrap();
    let vars2 = d.join("vars-after-os.fd");
    std::fs::copy(v2.vars_path(), &vars2).unwrap();
    drop(v2);
    assert_eq!(
        ovmf_vars::read(&vars2).unwrap().boot_next(),
        None,
        "the firmware consumed BootNext"
    );
    assert_eq!(reports(&stick).len(), 1, "no second run of the appliance");

    // Power-on 3, stick still in: the stick's GRUB boots the installed system (the default
    // entry), which comes up with its seeded hostname; the appliance never runs.
    let mut v3 = vm(d, "boot3", fw, &stick, &nvme, &sata, Some(&vars2), false)
        .start()
        .unwrap();
    v3.wait_for(
        "Boot the installed system: nuc-demo-01 (debian-bookworm-cloud)",
        Duration::from_secs(300),
    )
    .unwrap();
    v3.wait_for("nuc-demo-01 login:", Duration::from_secs(600))
        .unwrap();
    v3.kill();
    assert!(
        !v3.log().contains("imprint: install "),
        "the appliance did not run"
    );
    drop(v3);
    assert_eq!(reports(&stick).len(), 1, "no reinstall");
    assert_eq!(
        seed_instance_id(&nvme),
        instance,
        "the same install, not a new one"
    );
}

#[test]
fn provisions_a_virtual_nuc_secure_boot_off() {
    whole_story(Firmware::NoSecureBoot, false);
}

#[test]
fn provisions_a_virtual_nuc_secure_boot_on_with_firmware_that_prunes_boot_entries() {
    whole_story(Firmware::SecureBoot, true);
}
