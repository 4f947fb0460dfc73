//! Time to first byte on the virtual NUC, for `scripts/bench-boot` (ignored by default: it is a
//! measurement, not a test, and asserts nothing about speed).
//!
//! One run: `imprint build` a stick for a 192 MiB GPT image whose data partition is
//! incompressible (the payload on the stick is as large as the data) with `imprint.bench` on
//! the kernel command line, boot it in the virtual NUC (NVMe + SATA, Secure Boot off) and
//! install. The host stamps every serial line with the time since qemu started
//! (polling the serial log every 10 ms); the appliance's report brings its own phases.
//!
//! - power-on to first byte (host): qemu start → the `imprint: write:` line, printed just
//!   before the first payload byte is written. Works for any appliance version.
//! - firmware (host and guest): the `imprint: timing: uptime U s` line seen at host time H
//!   means the kernel's clock started at H − U: firmware, shim, GRUB and loading the kernel
//!   and initrd come before it.
//! - the report's `phases` (kernel, modules, settle, stick and image, choosing, first write)
//!   and `stick_read` (bench mode), when the appliance writes them.
//!
//! Writes one JSON object to `$IMPRINT_BENCH_BOOT_OUT` (default: stdout only). The live image
//! is `$IMPRINT_BUILD_DIR/boot` (default build/boot), as for every e2e test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imprint_e2e::fixtures::{old_disk, stick_reports, stick_with};
use imprint_e2e::VmBuilder;
use imprint_e2e::{add_kernel_args, boot_dir, imprint_bin, run, Firmware};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// The bench image: big enough that the stick's read rate means something, small enough that
/// one run stays a few minutes under TCG.
const RAW_MIB: u64 = 192;

/// A GPT disk image of [`RAW_MIB`]: a 16 MiB ESP and a data partition filled with
/// incompressible bytes (xorshift), so the payload on the stick is as large as the data.
fn bench_raw(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("bench.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(RAW_MIB * MIB).unwrap();
    drop(f);
    run(Command::new("sgdisk")
        .args(["-n1:0:+16M", "-t1:ef00", "-n2:0:0", "-t2:8300"])
        .arg(&raw))
    .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<u8> = (0..(RAW_MIB - 20) * MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&raw).unwrap(),
        &data,
        18 * MIB,
    )
    .unwrap();
    raw
}

/// Host seconds since qemu started at which each serial line was first seen.
fn stamp_lines(log: &Path, t0: Instant, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<(f64, String)>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = lines.clone();
    let log = log.to_owned();
    std::thread::spawn(move || {
        let mut seen = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let now = t0.elapsed().as_secs_f64();
            let text = std::fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            // Only complete lines.
            let complete = text.rfind('\n').map_or("", |i| &text[..i]);
            let all: Vec<&str> = complete.lines().collect();
            if all.len() > seen {
                let mut l = out.lock().unwrap();
                for line in &all[seen..] {
                    l.push((now, line.trim_end_matches('\r').to_string()));
                }
                seen = all.len();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    lines
}

fn first(lines: &[(f64, String)], needle: &str) -> Option<(f64, String)> {
    lines.iter().find(|(_, l)| l.contains(needle)).cloned()
}

#[test]
#[ignore = "a measurement for scripts/bench-boot (minutes under TCG)"]
fn time_to_first_byte_on_the_virtual_nuc() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let raw = bench_raw(d);
    let image = d.join("bench.img.zst");
    run(Command::new(imprint_bin().unwrap())
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&image))
    .unwrap();
    // Nobody answers in a measurement: no confirmation; power off when done.
    let stick = stick_with(
        d,
        "bench",
        &image,
        None,
        r#"{ "confirm": "never", "after": "poweroff" }"#,
    )
    .unwrap();
    add_kernel_args(&stick, "imprint.bench").unwrap();
    let nvme = old_disk(&d.join("nvme.img"), 4 * GIB).unwrap();
    let sata = old_disk(&d.join("sata.img"), 2 * GIB).unwrap();

    let builder = VmBuilder::new(d.join("vm"), Firmware::NoSecureBoot)
        .stick(&stick)
        .nvme(&nvme, "NUC-NVME-0001")
        .sata(&sata, "NUC-SATA-0001")
        .nic("52:54:00:12:34:56")
        .timeout(Duration::from_secs(1200));
    let t0 = Instant::now();
    let mut vm = builder.start().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let lines = stamp_lines(vm.serial_log_path(), t0, stop.clone());
    vm.wait_for("IMPRINT-DONE", Duration::from_secs(1100))
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    vm.kill();
    let lines = lines.lock().unwrap().clone();

    let host = |needle: &str| first(&lines, needle).map(|(t, _)| t);
    let write_line = host("imprint: write: ");
    // "imprint: timing: uptime 12.34s; …"
    let timing = first(&lines, "imprint: timing: uptime ");
    let firmware = timing.as_ref().and_then(|(h, l)| {
        let u: f64 = l.split("uptime ").nth(1)?.split('s').next()?.parse().ok()?;
        Some(h - u)
    });
    let reports = stick_reports(&stick).unwrap();
    let rep = reports.last().cloned().unwrap_or_default();
    let out = serde_json::json!({
        "boot_dir": boot_dir().unwrap(),
        "status": rep["status"],
        "host": {
            "pid1_first_line": host("imprint: kernel "),
            "boot_ok": host("IMPRINT-BOOT-OK"),
            "first_byte": write_line,
            "done": host("IMPRINT-DONE"),
            "firmware": firmware,
        },
        "boot": rep["boot"],
        "phases": rep["phases"],
        "stick_read": rep["stick_read"],
        "first_byte_seconds": rep["write"]["first_byte_seconds"],
        "image_compressed_bytes": std::fs::metadata(&image).unwrap().len(),
    });
    let text = serde_json::to_string_pretty(&out).unwrap();
    println!("BENCH-BOOT {text}");
    if let Some(p) = std::env::var_os("IMPRINT_BENCH_BOOT_OUT") {
        std::fs::write(p, &text).unwrap();
    }
    std::fs::write(d.join("serial.log"), vm.log()).unwrap();
    if let Some(keep) = std::env::var_os("IMPRINT_BENCH_BOOT_LOG") {
        std::fs::copy(d.join("serial.log"), keep).unwrap();
    }
    assert!(write_line.is_some(), "no write began:\n{}", vm.log());
}
