//! Signed images on the virtual NUC (Secure Boot off): with `require_signature` the appliance
//! refuses an unsigned image and a signed image whose manifest was altered, before any disk is
//! touched, and installs an image signed by a trusted key (checking the payload digest first).
//! Each test asserts the disk's exact state afterwards and what the console and the report on
//! the stick say (`image.signature`).
//!
//! The payload is a small real GPT disk image (sgdisk on a loop device), so each scenario costs
//! one appliance boot. Needs root, build/boot (built by image-build/build from this tree),
//! qemu + OVMF, gdisk, mtools.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use imprint_e2e::fixtures::{old_disk, run_until_done, sha256_file, small_image, stick_reports};
use imprint_e2e::{
    boot_dir, check_next_boot, imprint_bin, run, Firmware, Vm, VmBuilder, STICK_ESP_OFFSET,
};

const GIB: u64 = 1 << 30;
/// The default hostname pattern falls back to the MAC where qemu has no DMI serial.
const NIC: &str = "52:54:00:5a:fe:02";

fn imprint(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let mut cmd = Command::new(imprint_bin().unwrap());
    for a in args {
        cmd.arg(a);
    }
    run(&mut cmd).unwrap()
}

/// A signing key pair `dir/NAME.key`, `dir/NAME.pub`: returns (key id, public key base64).
fn keygen(dir: &Path, name: &str) -> (String, String) {
    let out = imprint(&[&"keygen", &"-o", &dir.join(name)]);
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("key id:"))
        .unwrap()
        .trim()
        .to_string();
    let b64 = std::fs::read_to_string(dir.join(format!("{name}.pub")))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    (id, b64)
}

/// A 64 MiB GPT disk image (ESP + data partition) with some data, prepared (and signed with
/// `key` if given) into an imprint image.
fn small_os(dir: &Path, name: &str, key: Option<&Path>) -> PathBuf {
    small_image(dir, name, 512, key).unwrap()
}

/// A stick for `image` with `config` (JSON text).
fn stick(dir: &Path, name: &str, image: &Path, config: &str) -> PathBuf {
    let cfg = dir.join(format!("config-{name}.json"));
    std::fs::write(&cfg, config).unwrap();
    let out = dir.join(format!("stick-{name}.img"));
    imprint(&[
        &"build",
        &"--image",
        &image,
        &"--config",
        &cfg,
        &"--boot",
        &boot_dir().unwrap(),
        &"-o",
        &out,
    ]);
    out
}

/// Replaces `imprint/config.json` on a built stick, as an operator editing it from any OS would.
fn put_config(dir: &Path, stick: &Path, config: &str) {
    let tmp = dir.join("edited-config.json");
    std::fs::write(&tmp, config).unwrap();
    let esp = format!("{}@@{STICK_ESP_OFFSET}", stick.display());
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-o", "-i", &esp])
        .arg(&tmp)
        .arg("::imprint/config.json"))
    .unwrap();
}

fn disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    old_disk(&dir.join(name), size).unwrap()
}

fn sha(path: &Path) -> String {
    sha256_file(path).unwrap()
}

/// The one report the run wrote to the stick.
fn report(stick: &Path) -> serde_json::Value {
    let mut all = stick_reports(stick).unwrap();
    assert_eq!(all.len(), 1, "one run, one report");
    all.remove(0)
}

/// Boots the stick with one NVMe disk until the appliance is done (it then waits or powers
/// off; the VM is killed).
fn boot(dir: &Path, stick: &Path, target: &Path) -> (Vm, String) {
    run_until_done(
        VmBuilder::new(dir.join("vm"), Firmware::NoSecureBoot)
            .stick(stick)
            .nic(NIC)
            .nvme(target, "NVME-SIG"),
    )
    .unwrap()
}

fn config(require: bool, key_b64: &str) -> String {
    format!(
        r#"{{ "confirm": "never", "after": "poweroff", "require_signature": {require},
             "trusted_keys": ["{key_b64}"] }}"#
    )
}

#[test]
fn unsigned_image_is_refused_when_a_signature_is_required() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (_, b64) = keygen(d, "release");
    let img = small_os(d, "unsigned", None);
    // `imprint build` refuses this combination, so the operator edits config.json on the stick.
    let stick = stick(d, "unsigned", &img, &config(false, &b64));
    put_config(d, &stick, &config(true, &b64));
    let target = disk(d, "nvme.img", GIB);
    let before = sha(&target);
    let (_v, log) = boot(d, &stick, &target);
    assert!(
        log.contains("imprint: FAILED: checking the image's signature"),
        "{log}"
    );
    assert!(
        log.contains("is not signed, and a signature is required"),
        "{log}"
    );
    assert!(!log.contains("wipe done"), "{log}");
    assert_eq!(sha(&target), before, "nothing written");
    let r = report(&stick);
    assert_eq!(r["status"], "failed");
    assert!(
        r["error"].as_str().unwrap().contains("is not signed"),
        "{r}"
    );
    assert_eq!(
        r["image"]["signature"],
        serde_json::json!({ "signed": false, "key_id": null, "verified": false })
    );
}

#[test]
fn altered_signed_image_is_refused_before_any_write() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (id, b64) = keygen(d, "release");
    let img = small_os(d, "signed", Some(&d.join("release.key")));
    // Rename the image inside its manifest: still valid JSON, no longer what was signed.
    let mut bytes = std::fs::read(&img).unwrap();
    let needle = b"\"name\":\"signed\"";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 8] = b'S';
    std::fs::write(&img, &bytes).unwrap();
    let stick = stick(d, "altered", &img, &config(true, &b64));
    let target = disk(d, "nvme.img", GIB);
    let before = sha(&target);
    let (_v, log) = boot(d, &stick, &target);
    assert!(
        log.contains(&format!("the signature by key {id} does not match")),
        "{log}"
    );
    assert!(log.contains("altered after signing"), "{log}");
    assert_eq!(sha(&target), before, "nothing written");
    let r = report(&stick);
    assert_eq!(r["status"], "failed");
    assert_eq!(
        r["image"]["signature"],
        serde_json::json!({ "signed": true, "key_id": id, "verified": false })
    );
}

#[test]
fn image_signed_by_a_trusted_key_installs() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (id, b64) = keygen(d, "release");
    let img = small_os(d, "signed", Some(&d.join("release.key")));
    let stick = stick(d, "good", &img, &config(true, &b64));
    let target = disk(d, "nvme.img", GIB);
    let (v, log) = boot(d, &stick, &target);
    assert!(
        log.contains(&format!("image signed by key {id}: signature verified")),
        "{log}"
    );
    // The signed manifest's payload digest is checked before the first write.
    let precheck = log.find("precheck done").expect("precheck ran");
    let wipe = log.find("wipe done").expect("wipe ran");
    assert!(precheck < wipe, "{log}");
    assert!(log.contains("seed written and read back"), "{log}");
    imprint(&[&"verify", &img, &target]);
    let r = report(&stick);
    assert_eq!(r["status"], "installed");
    check_next_boot(v.vars_path(), &r).unwrap();
    assert_eq!(
        r["image"]["signature"],
        serde_json::json!({ "signed": true, "key_id": id, "verified": true })
    );
}
