//! The stick a user makes with the installed package boots and installs (issue 12):
//! scripts/release-test installs the `.deb` into a fresh mmdebstrap Debian root and runs
//! `imprint build` there with no `--boot` (the packaged boot files in /usr/share/imprint/boot);
//! this suite boots that very stick in the virtual NUC with Secure Boot on (the packaged signed
//! shim → GRUB → kernel), lets the appliance install its image onto a blank NVMe disk, and
//! checks the disk's bytes (`imprint verify --json`) and the report the stick keeps (`imprint
//! reports --json` and the report file itself).
//!
//! Needs build/release-test/deb-stick.img and deb-stick-image.img.zst (scripts/release-test;
//! `IMPRINT_RELEASE_TEST_DIR` names another folder), qemu + OVMF + mtools. One VM, about two
//! minutes under TCG.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imprint_e2e::fixtures::stick_reports;
use imprint_e2e::{copy, imprint_bin, sparse_disk, workspace_root, Firmware, VmBuilder};

const GIB: u64 = 1 << 30;
/// The MAC the demo config's machines table names (scripts/demo-seed/config.json).
const MAC: &str = "52:54:00:12:34:56";

fn release_test_dir() -> PathBuf {
    std::env::var_os("IMPRINT_RELEASE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/release-test"))
}

/// Runs imprint with `--json` and parses its standard output: the whole of it, or with
/// `last_line` only the result line after the progress events.
fn imprint_json(args: &[&std::ffi::OsStr], last_line: bool) -> serde_json::Value {
    let o = Command::new(imprint_bin().unwrap())
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "imprint {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let text = if last_line {
        out.lines().last().unwrap_or_default().to_string()
    } else {
        out.to_string()
    };
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn os(s: &Path) -> &std::ffi::OsStr {
    s.as_os_str()
}

#[test]
fn the_stick_the_deb_made_installs_onto_nvme_with_secure_boot() {
    let rt = release_test_dir();
    let deb_stick = rt.join("deb-stick.img");
    let image = rt.join("deb-stick-image.img.zst");
    assert!(
        deb_stick.is_file() && image.is_file(),
        "{} or {} is missing: run scripts/release-test first (scripts/test does)",
        deb_stick.display(),
        image.display()
    );
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // The VM writes its report onto the stick: work on a copy.
    let stick = d.join("stick.img");
    copy(&deb_stick, &stick).unwrap();
    let nvme = sparse_disk(&d.join("nvme.img"), GIB).unwrap();
    let name = imprint_json(&[os(Path::new("inspect")), os(&image)], false)["name"]
        .as_str()
        .unwrap()
        .to_string();

    let mut v = VmBuilder::new(d.join("vm"), Firmware::SecureBoot)
        .stick(&stick)
        .nvme(&nvme, "DEB-NVME-0001")
        .nic(MAC)
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    v.wait_for(
        "imprint: rebooting into the installed system",
        Duration::from_secs(540),
    )
    .unwrap();
    v.kill();
    let log = v.log();
    assert!(log.contains("imprint: target nvme0n1"), "{log}");
    assert!(
        log.contains("seed written and read back: hostname nuc-demo-01"),
        "{log}"
    );
    // The console's phase lines in the CLI's units: `imprint: write done: 6.0 MiB in 0.1 s
    // (60.0 MiB/s)`.
    // (It follows the cleared progress bar on the same console line.)
    let write_done = log
        .split("imprint: write done: ")
        .nth(1)
        .and_then(|rest| rest.split(['\r', '\n']).next())
        .unwrap_or_else(|| panic!("no write phase line: {log}"));
    let (size, rest) = write_done.split_once(" in ").unwrap();
    assert!(size.ends_with(" MiB"), "{write_done}");
    let rate = rest.split_once(" s (").unwrap().1.trim_end_matches(')');
    let unit = rate.split_once(' ').unwrap().1;
    assert!(
        ["B/s", "KiB/s", "MiB/s", "GiB/s"].contains(&unit),
        "{write_done}"
    );

    // The disk holds the image: every chunk read back and hashed against the manifest, the
    // backup GPT moved to the disk's end, the seed partition the only addition.
    let verify = imprint_json(&[os(Path::new("verify")), os(&image), os(&nvme)], true);
    assert_eq!(verify["event"], "result");
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["outcome"]["gpt_backup_at_end"], true, "{verify}");
    assert_eq!(
        verify["outcome"]["extra_partitions"],
        serde_json::json!(["CIDATA"]),
        "{verify}"
    );

    // The stick's record, as the report file and as `imprint reports` lists it.
    let reports = stick_reports(&stick).unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert_eq!(r["status"], "installed", "{r}");
    assert_eq!(r["selection"]["chosen"], "nvme0n1", "{r}");
    assert_eq!(r["write"]["verified"], true, "{r}");
    assert_eq!(r["seed"]["summary"]["hostname"], "nuc-demo-01", "{r}");
    let rows = imprint_json(&[os(Path::new("reports")), os(&stick)], false);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "installed");
    assert_eq!(rows[0]["hostname"], "nuc-demo-01");
    assert_eq!(rows[0]["image"], name.as_str());
    assert!(
        rows[0]["target_disk"]
            .as_str()
            .unwrap()
            .starts_with("nvme0n1"),
        "{rows:?}"
    );
}
