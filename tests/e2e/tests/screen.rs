//! The person at the NUC: a virtual NUC with a VGA monitor, a USB keyboard and a serial console.
//! What the monitor shows is read back by OCR (qemu `screendump`, Debian's `tesseract`) and
//! every screenshot is kept in `build/e2e-artefacts/` (docs/testing.md):
//!
//! - the question is on the monitor, 'y' + Enter typed on the USB keyboard installs, and the
//!   monitor shows the machine, the disk table with the choice, one progress bar, then DONE
//!   with hostname, address and image — with no kernel message and no test marker on it;
//! - a write error shows FAILED with what, where, the disk's state and what to do;
//! - inventory (`imprint.mode=inventory`) writes nothing and records the machine's facts.
//!
//! Needs build/boot (image-build/build), qemu + OVMF + mtools + tesseract (scripts/deps), root
//! (loop devices for the small image). Run single-threaded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use imprint_e2e::fixtures::{old_disk, sha256_file, small_image, stick_reports, stick_with};
use imprint_e2e::ocr::{reads, shot_until};
use imprint_e2e::{workspace_root, Firmware, VmBuilder};

const GIB: u64 = 1 << 30;
/// The demo seed's machines table names this MAC: hostname nuc-demo-01, 10.0.2.50/24.
const MAC: &str = "52:54:00:12:34:56";
const SERIAL: &str = "NUCSCREEN01";

fn demo_seed() -> PathBuf {
    workspace_root().join("scripts/demo-seed")
}

/// The demo's config with `after` and `mode` changed.
fn config(after: &str, mode: Option<&str>) -> String {
    let text = std::fs::read_to_string(demo_seed().join("config.json")).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
    c["after"] = after.into();
    if let Some(m) = mode {
        c["mode"] = m.into();
    }
    c.to_string()
}

/// Serial lines the kernel printed before the appliance's first line (what reached the
/// monitor too: before PID 1 one log level covers every console).
fn kernel_lines_before_imprint(log: &str) -> usize {
    log.lines()
        .take_while(|l| !l.contains("imprint:"))
        .filter(|l| l.trim_start().starts_with('['))
        .count()
}

fn vm(dir: &Path, stick: &Path) -> VmBuilder {
    VmBuilder::new(dir.join("vm"), Firmware::NoSecureBoot)
        .with_screen()
        .stick(stick)
        .nic(MAC)
        .arg("-smbios")
        .arg(format!("type=1,serial={SERIAL}"))
        .timeout(Duration::from_secs(900))
}

#[test]
fn the_question_is_on_the_monitor_and_y_on_the_usb_keyboard_installs() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_image(d, "screen-demo", 512, None).unwrap();
    let stick = stick_with(d, "screen", &img, Some(&demo_seed()), &config("wait", None)).unwrap();
    // Old data on the NVMe disk: the default `confirm: if-not-empty` asks.
    let nvme = old_disk(&d.join("nvme.img"), GIB).unwrap();
    // Writes throttled to 1 MiB/s: the 64 MiB image takes a minute, long enough for several
    // screenshots and OCR passes on a loaded CI machine (at 3 MiB/s a CI run once saw the
    // install finish before its first OCR pass did).
    let mut v = vm(d, &stick)
        .nvme_throttled(&nvme, "NVME0001", 1 << 20)
        .start()
        .unwrap();
    v.wait_for("Type y and Enter", Duration::from_secs(400))
        .unwrap();

    let (_, q, ok) = shot_until(&mut v, "screen-question", Duration::from_secs(30), |t| {
        reads(t, "Erase nvme0n1 and install")
    })
    .unwrap();
    assert!(ok, "the question is on the monitor:\n{q}");
    for want in [SERIAL, MAC, "NVME0001", ">> TARGET <<"] {
        assert!(reads(&q, want), "{want:?} on the monitor:\n{q}");
    }
    assert!(
        !q.contains("IMPRINT-"),
        "test markers are not for the monitor:\n{q}"
    );

    v.type_keys("y\n").unwrap();
    v.wait_for("answered on tty", Duration::from_secs(60))
        .unwrap();
    let (_, p, ok) = shot_until(&mut v, "screen-progress", Duration::from_secs(150), |t| {
        (reads(t, "Writing image") || reads(t, "Verifying")) && reads(t, "ETA")
    })
    .unwrap();
    assert!(ok, "one progress bar with phase and ETA:\n{p}");

    v.wait_for("IMPRINT-DONE", Duration::from_secs(400))
        .unwrap();
    let (_, done, ok) = shot_until(&mut v, "screen-done", Duration::from_secs(30), |t| {
        reads(t, "DONE")
    })
    .unwrap();
    assert!(ok, "DONE on the monitor:\n{done}");
    for want in ["nuc-demo-01", "10.0.2.50/24", "screen-demo", "Next"] {
        assert!(reads(&done, want), "{want:?} in the DONE banner:\n{done}");
    }
    for screen in [&q, &p, &done] {
        assert!(
            !screen.contains("IMPRINT-"),
            "no marker on the monitor:\n{screen}"
        );
    }
    v.kill();

    let log = v.log();
    assert!(
        log.contains("answered on tty0: \"y\""),
        "the USB keyboard answered"
    );
    assert!(log.contains("IMPRINT-BOOT-OK") && log.contains("IMPRINT-DONE"));
    // From the appliance's first line on (firmware and GRUB draw with escapes before it).
    let ours = &log[log.find("imprint: kernel ").unwrap()..];
    assert!(!ours.contains('\x1b'), "the serial console is a plain log");
    assert!(
        ours.lines()
            .any(|l| l.starts_with("imprint: write ") && l.contains("% (") && l.contains("ETA"))
            && ours.contains("imprint: write done"),
        "periodic progress lines on serial:\n{ours}"
    );
    // Kernel messages: few before PID 1 (quiet), the rest copied to serial.
    let before = kernel_lines_before_imprint(&log);
    let held: usize = log
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("imprint: ")?
                .strip_suffix(" kernel messages held back from the screen by `quiet` (above)")?
                .parse()
                .ok()
        })
        .expect("the held-back kernel messages are on serial");
    eprintln!("kernel lines before imprint's first line: {before}; copied to serial: {held}");
    assert!(
        before < 20,
        "{before} kernel lines reached the monitor before imprint"
    );
    assert!(
        held > 100,
        "only {held} kernel messages reached the serial console"
    );
    assert!(log.contains("kernel messages go to tty2"));

    let reports = stick_reports(&stick).unwrap();
    assert_eq!(reports.last().unwrap()["status"], "installed");
}

#[test]
fn n_on_the_serial_console_declines_and_the_monitor_says_stopped() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_image(d, "screen-no", 512, None).unwrap();
    let stick = stick_with(d, "no", &img, Some(&demo_seed()), &config("reboot", None)).unwrap();
    let nvme = old_disk(&d.join("nvme.img"), GIB).unwrap();
    let before = sha256_file(&nvme).unwrap();
    let mut v = vm(d, &stick).nvme(&nvme, "NVME0001").start().unwrap();
    v.wait_for("Type y and Enter", Duration::from_secs(400))
        .unwrap();
    v.send("n\r").unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(60)).unwrap();
    let (_, s, ok) = shot_until(&mut v, "screen-stopped", Duration::from_secs(30), |t| {
        reads(t, "STOPPED")
    })
    .unwrap();
    assert!(ok, "STOPPED on the monitor:\n{s}");
    for want in [
        "declined; nothing was written",
        "nothing was written to any disk",
    ] {
        assert!(reads(&s, want), "{want:?} on the monitor:\n{s}");
    }
    v.kill();
    assert!(v.log().contains("answered on ttyS0: \"n\""));
    assert_eq!(sha256_file(&nvme).unwrap(), before, "declined, yet written");
}

/// A blkdebug rules file: every write at `sector` fails with EIO.
fn write_fault(dir: &Path, sector: u64) -> PathBuf {
    let p = dir.join("faults.cfg");
    std::fs::write(
        &p,
        format!("[inject-error]\nevent = \"none\"\niotype = \"write\"\nerrno = \"5\"\nsector = \"{sector}\"\n"),
    )
    .unwrap();
    p
}

#[test]
fn a_write_error_shows_failed_with_what_where_the_disk_and_what_to_do() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_image(d, "screen-fail", 512, None).unwrap();
    let cfg = r#"{ "confirm": "never", "after": "reboot", "target": { "transports": ["nvme"] } }"#;
    let stick = stick_with(d, "fail", &img, Some(&demo_seed()), cfg).unwrap();
    let nvme = old_disk(&d.join("nvme.img"), GIB).unwrap();
    // 20 MiB into the image: its data partition, written by the stream.
    let mut v = vm(d, &stick)
        .nvme_with_faults(&nvme, "NVME0001", write_fault(d, 20 * 2048 + 8))
        .start()
        .unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(400))
        .unwrap();
    let (_, f, ok) = shot_until(&mut v, "screen-failed", Duration::from_secs(30), |t| {
        reads(t, "FAILED")
    })
    .unwrap();
    assert!(ok, "FAILED on the monitor:\n{f}");
    for want in [
        "What",
        "Where",
        "nvme0n1",
        "NVME0001",
        "no partition table",
        "will not boot",
        "power-cycle",
    ] {
        assert!(reads(&f, want), "{want:?} in the FAILED banner:\n{f}");
    }
    assert!(!f.contains("IMPRINT-"), "no marker on the monitor:\n{f}");
    v.kill();
    let log = v.log();
    assert!(log.contains("imprint: FAILED: "), "{log}");
}

#[test]
fn inventory_writes_nothing_and_records_the_machine() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = small_image(d, "screen-inv", 512, None).unwrap();
    let stick = stick_with(
        d,
        "inv",
        &img,
        Some(&demo_seed()),
        &config("reboot", Some("inventory")),
    )
    .unwrap();
    // The stick's menu offers inventory too.
    let grub = imprint_e2e::run(
        std::process::Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!(
                "{}@@{}",
                stick.display(),
                imprint_e2e::STICK_ESP_OFFSET
            ))
            .arg("::EFI/debian/grub.cfg"),
    )
    .unwrap();
    assert!(
        grub.contains("inventory only (write nothing, power off)")
            && grub.contains("imprint.mode=inventory"),
        "{grub}"
    );
    let nvme = old_disk(&d.join("nvme.img"), GIB).unwrap();
    let sata = old_disk(&d.join("sata.img"), GIB).unwrap();
    let before = (sha256_file(&nvme).unwrap(), sha256_file(&sata).unwrap());
    let mut v = vm(d, &stick)
        .nvme(&nvme, "NVME0001")
        .sata(&sata, "SATA0001")
        .start()
        .unwrap();
    v.wait_for("IMPRINT-DONE", Duration::from_secs(400))
        .unwrap();
    // The facts stay on the monitor for a while before the power-off.
    let (_, inv, ok) = shot_until(&mut v, "screen-inventory", Duration::from_secs(10), |t| {
        reads(t, "INVENTORY RECORDED")
    })
    .unwrap();
    assert!(ok, "the inventory banner on the monitor:\n{inv}");
    for want in [
        SERIAL,
        MAC,
        "nothing was written to any disk",
        "powering off",
    ] {
        assert!(reads(&inv, want), "{want:?} on the monitor:\n{inv}");
    }
    let status = v.wait_exit(Duration::from_secs(60)).unwrap();
    let log = v.log();
    assert!(status.success(), "powered off: {status:?}\n{log}");
    assert!(log.contains("IMPRINT-DONE"), "{log}");
    assert_eq!(
        (sha256_file(&nvme).unwrap(), sha256_file(&sata).unwrap()),
        before,
        "inventory wrote to a disk"
    );

    let reports = stick_reports(&stick).unwrap();
    let r = reports.last().unwrap();
    assert_eq!(r["status"], "inventory", "{r:#}");
    assert_eq!(r["machine"]["dmi"]["product_serial"], SERIAL, "{r:#}");
    assert_eq!(r["machine"]["nics"][0]["mac"], MAC, "{r:#}");
    let disks = r["disks"].as_array().unwrap();
    for (serial, transport) in [("NVME0001", "nvme"), ("SATA0001", "sata")] {
        let d = disks
            .iter()
            .find(|d| d["serial"] == serial)
            .unwrap_or_else(|| panic!("{serial} not in {r:#}"));
        assert_eq!(d["transport"], transport);
        assert_eq!(d["size"], GIB);
    }
    assert_eq!(r["hardware"]["cpus"], 2, "{r:#}");
    assert!(r["hardware"]["memory_bytes"].as_u64().unwrap() > 512 << 20);
    assert!(
        r["seed"].is_null() && r["image"].is_null(),
        "nothing installed"
    );

    // The machines-table skeleton comes from it.
    let out = imprint_e2e::run(
        std::process::Command::new(imprint_e2e::imprint_bin().unwrap())
            .arg("reports")
            .arg(&stick)
            .arg("--machines"),
    )
    .unwrap();
    let frag: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = &frag["seed"]["machines"][0];
    assert_eq!(m["mac"], MAC, "{frag:#}");
    assert!(
        m["note"]
            .as_str()
            .unwrap()
            .contains(&format!("serial {SERIAL}")),
        "{frag:#}"
    );
}
