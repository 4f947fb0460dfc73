//! What the user sees (issue 12): `--quiet` leaves the result line alone, `--verbose` adds each
//! phase's time and where the boot files were looked for, every size and rate is in binary
//! units, and `--json` gives a parseable result on success and one JSON error object (with the
//! documented exit code) on failure, for every command that reports something. Runs the real
//! binary on files in temp dirs; no root needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{imprint, noise, run, stderr, stdout};

const MIB: usize = 1 << 20;

/// The one JSON object a command printed as its result: the last line of standard output
/// (progress events come before it).
fn json_result(o: &Output) -> Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    let out = stdout(o);
    let last = out.lines().last().expect("a result line");
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(v["event"], "result", "{v}");
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// The JSON error object of a failed command: exactly one line on standard error, nothing on
/// standard output; its exit code is the process's.
fn json_error(o: &Output, code: i32) -> Value {
    assert_eq!(o.status.code(), Some(code), "{}", stderr(o));
    assert_eq!(stdout(o), "", "no result on a failure");
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stderr: {err}");
    let v: Value = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["event"], "error");
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], code);
    assert!(v["causes"].is_array(), "{v}");
    v
}

/// A GPT disk of `len` bytes at `raw` (sgdisk, one partition): noise from `seed`, with zeros
/// over `zeros`.
fn gpt_raw(raw: &Path, len: usize, seed: u32, zeros: std::ops::Range<usize>) {
    let mut data = noise(len, seed);
    data[zeros].fill(0);
    std::fs::write(raw, data).unwrap();
    let o = run(Command::new("sgdisk")
        .args(["-Z", "-n1:2048:0", "-t1:8300"])
        .arg(raw));
    assert!(o.status.success(), "sgdisk: {}", stderr(&o));
}

/// A 4 MiB GPT disk (sgdisk, one partition) with noise and 2 MiB of zeros, prepared with
/// `--json`: the image's path.
fn image(dir: &Path) -> PathBuf {
    let raw = dir.join("os.raw");
    gpt_raw(&raw, 4 * MIB, 7, MIB..3 * MIB);
    let img = dir.join("os.img.zst");
    let v = json_result(&run(imprint()
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&img)
        .args(["--level", "1", "--name", "noise", "--json"])));
    assert_eq!(v["image"], img.to_str().unwrap());
    assert_eq!(v["input_format"], "raw disk image");
    assert_eq!(v["manifest"]["raw_size"], 4 * MIB);
    assert_eq!(v["manifest"]["name"], "noise");
    assert_eq!(v["manifest"]["version"], 2);
    assert_eq!(v["manifest"]["frame_size"], 4 * MIB);
    assert_eq!(
        v["manifest"]["frames"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    assert_eq!(v["signature"], Value::Null);
    assert!(img.is_file());
    img
}

/// The image's sha256 from `inspect --json`.
fn imprint_manifest_sha(img: &Path) -> String {
    let o = run(imprint().arg("inspect").arg(img).arg("--json"));
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value = serde_json::from_slice(&o.stdout).unwrap();
    m["sha256"].as_str().unwrap().to_string()
}

/// A boot folder shaped like image-build/build's output.
fn boot_dir(dir: &Path) -> PathBuf {
    let boot = dir.join("boot");
    for rel in [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/BOOT/grubx64.efi",
        "vmlinuz",
        "initrd.img",
    ] {
        let p = boot.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("contents of {rel}\n")).unwrap();
    }
    let grub = boot.join("EFI/debian/grub.cfg");
    std::fs::create_dir_all(grub.parent().unwrap()).unwrap();
    std::fs::write(&grub, "linux /vmlinuz imprint.esp=@ESP_PARTUUID@\n").unwrap();
    boot
}

/// Every size or rate in `text` (a number followed by a unit word): the unit words.
fn units_in(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    for w in words.windows(2) {
        let number = w[0].trim_start_matches('(');
        let unit = w[1].trim_end_matches([',', ')', ';', ':']);
        let looks_like_unit = unit
            .trim_end_matches("/s")
            .chars()
            .all(|c| c.is_ascii_alphabetic())
            && unit.trim_end_matches("/s").ends_with('B')
            && unit.len() <= 5;
        if !number.is_empty() && number.parse::<f64>().is_ok() && looks_like_unit {
            out.push(unit.to_string());
        }
    }
    out
}

fn assert_binary_units(what: &str, text: &str) {
    let units = units_in(text);
    assert!(!units.is_empty(), "{what}: no sizes found in {text}");
    for u in &units {
        assert!(
            ["B", "KiB", "MiB", "GiB", "TiB", "B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"]
                .contains(&u.as_str()),
            "{what}: {u:?} is not a binary unit in: {text}"
        );
    }
}

#[test]
fn quiet_prints_only_the_result_line_and_normal_prints_more() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    // An 8 MiB "disk" for the 4 MiB image: the backup GPT moves to its end.
    let disk = t.path().join("disk.bin");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--to-file", "--quiet"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "--quiet: no progress, no notes");
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "--quiet: one result line: {out}");
    // `wrote noise (4.0 MiB) to DISK in 0.0 s (… MiB/s), verified`
    let prefix = format!("wrote noise (4.0 MiB) to {} in ", disk.display());
    assert!(lines[0].starts_with(&prefix), "{}", lines[0]);
    assert!(lines[0].ends_with(", verified"), "{}", lines[0]);
    assert_binary_units("write -q", lines[0]);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 8 * MIB as u64);

    // The default: progress lines on stderr (not a terminal here), the result and its details.
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--to-file", "--yes"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.lines().count() >= 2, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("verified: read back alongside the write, done ")),
        "{out}"
    );
    assert!(
        stderr(&o).lines().any(|l| l == "write: 4.0 MiB to go"),
        "{}",
        stderr(&o)
    );
    assert_binary_units("write", &format!("{out}{}", stderr(&o)));

    // Verify says what the disk holds, then details; quiet, only the first line.
    let o = run(imprint().arg("verify").arg(&img).arg(&disk));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l == "  backup GPT at the disk's end"),
        "{}",
        stdout(&o)
    );
    let o = run(imprint().args(["verify", "-q"]).arg(&img).arg(&disk));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    let sha = imprint_manifest_sha(&img);
    assert_eq!(
        stdout(&o),
        format!("{} holds noise (sha256 {sha})\n", disk.display())
    );

    // Quiet keygen and build: one line each, nothing on stderr.
    let o = run(imprint()
        .arg("keygen")
        .arg("-o")
        .arg(t.path().join("k"))
        .arg("-q"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("key id:"), "{out}");
    let stick = t.path().join("stick.img");
    let o = run(imprint()
        .arg("-q")
        .arg("build")
        .arg("--image")
        .arg(&img)
        .arg("--boot")
        .arg(boot_dir(t.path()))
        .arg("-o")
        .arg(&stick));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    assert!(stdout(&o).starts_with(&format!("{} (", stick.display())));
}

#[test]
fn verbose_shows_phase_timings_and_where_the_boot_files_were_looked_for() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let disk = t.path().join("disk.bin");
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--to-file", "--verbose"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    // `phases: write 0.0 s, read-back 0.0 s, partition table 0.0 s`
    let phases = err
        .lines()
        .find_map(|l| l.strip_prefix("phases: "))
        .unwrap_or_else(|| panic!("no phases line: {err}"));
    let parts: Vec<&str> = phases.split(", ").collect();
    assert_eq!(parts.len(), 3, "{phases}");
    for (part, name) in parts
        .iter()
        .zip(["write ", "read-back ", "partition table "])
    {
        let secs = part.strip_prefix(name).unwrap().strip_suffix(" s").unwrap();
        assert!(secs.parse::<f64>().unwrap() >= 0.0, "{part}");
    }
    assert!(
        err.lines()
            .any(|l| l.starts_with("verify: done, 4.0 MiB in ")),
        "{err}"
    );
    assert_binary_units("write -v", &err);

    // The boot-file search, step by step: from a folder outside any checkout, with no --boot
    // and no $IMPRINT_BOOT, the folder next to the binary is looked at and passed over.
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_imprint"));
    let next_to = exe.parent().unwrap().join("../share/imprint/boot");
    let o = run(imprint()
        .current_dir(t.path())
        .arg("build")
        .arg("-v")
        .arg("--image")
        .arg(&img)
        .arg("-o")
        .arg(t.path().join("s.img")));
    let err = stderr(&o);
    let normalized = std::path::absolute(&next_to).unwrap();
    let want = "(next to the binary): no such folder";
    assert!(
        err.lines()
            .any(|l| l.starts_with("boot files: passed over ") && l.ends_with(want)),
        "{err} (looking for {})",
        normalized.display()
    );
    // Given, the folder is used as given, and said so.
    let boot = boot_dir(t.path());
    let o = run(imprint()
        .arg("build")
        .arg("--verbose")
        .arg("--image")
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg("-o")
        .arg(t.path().join("s.img")));
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.lines()
            .any(|l| l == format!("boot files: {} (--boot)", boot.display())),
        "{err}"
    );
    assert!(err.lines().any(|l| l.starts_with("ESP: LBA ")), "{err}");

    // --quiet and --verbose together are a usage error.
    let o = run(imprint().args(["-q", "-v", "disks"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn inspect_text_uses_words_and_binary_units() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let o = run(imprint().arg("inspect").arg(&img));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name}: {out}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("partitions"), "GPT, 512-byte sectors");
    assert_eq!(field("raw size"), "4.0 MiB (4194304 bytes)");
    assert!(field("chunks").ends_with(" MiB"), "{out}");
    // `prepare` writes a version 2 image: one frame per 4 MiB, this one's 4 MiB in one.
    assert_eq!(field("format"), "imprint-image v2");
    assert_eq!(field("frames"), "1 of 4.0 MiB (decoded in parallel)");
    assert_binary_units("inspect", &out);
}

#[test]
fn json_results_of_build_keygen_write_and_verify() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let img_len = std::fs::metadata(&img).unwrap().len();

    let key = t.path().join("k");
    let v = json_result(&run(imprint()
        .arg("keygen")
        .arg("-o")
        .arg(&key)
        .arg("--json")));
    let id = v["key_id"].as_str().unwrap();
    assert_eq!(id.len(), 16, "{v}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
    assert_eq!(v["secret_key"], t.path().join("k.key").to_str().unwrap());
    assert_eq!(v["public_key"], t.path().join("k.pub").to_str().unwrap());
    assert_eq!(v["encrypted"], false);
    let pub_text = std::fs::read_to_string(t.path().join("k.pub")).unwrap();
    assert_eq!(
        pub_text.lines().nth(1).unwrap(),
        v["public_key_base64"].as_str().unwrap()
    );

    let stick = t.path().join("stick.img");
    let boot = boot_dir(t.path());
    let v = json_result(&run(imprint()
        .arg("build")
        .arg("--image")
        .arg(&img)
        .arg("--boot")
        .arg(&boot)
        .arg("-o")
        .arg(&stick)
        .arg("--json")));
    assert_eq!(v["stick"], stick.to_str().unwrap());
    assert_eq!(v["size"], std::fs::metadata(&stick).unwrap().len());
    assert_eq!(v["image_bytes"], img_len);
    assert_eq!(v["image_name"], "noise");
    assert_eq!(v["boot"], boot.to_str().unwrap());
    let payload_first = v["payload_lba"][0].as_u64().unwrap();
    let on_stick = std::fs::read(&stick).unwrap();
    let start = (payload_first * 512) as usize;
    assert_eq!(
        &on_stick[start..start + img_len as usize],
        std::fs::read(&img).unwrap().as_slice(),
        "the payload LBA the JSON names holds the image"
    );
    assert!(v["esp_partuuid"].as_str().unwrap().len() == 36, "{v}");

    let disk = t.path().join("disk.bin");
    let o = run(imprint()
        .arg("write")
        .arg(&img)
        .arg(&disk)
        .args(["--to-file", "--json"]));
    let v = json_result(&o);
    assert_eq!(v["report"]["verified"], true);
    assert_eq!(v["report"]["raw_size"], 4 * MIB);
    assert_eq!(v["report"]["zeroed_bytes"].as_u64().unwrap() % 4096, 0);
    // Progress events before the result, each a JSON object.
    for line in stdout(&o).lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        assert!(e["event"].is_string(), "{line}");
    }
    let v = json_result(&run(imprint()
        .arg("verify")
        .arg(&img)
        .arg(&disk)
        .arg("--json")));
    assert!(v["outcome"].is_object(), "{v}");
}

#[test]
fn json_errors_carry_the_documented_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let boot = boot_dir(t.path());

    // 1: a missing input.
    let v = json_error(
        &run(imprint()
            .arg("build")
            .arg("--image")
            .arg(t.path().join("missing.img.zst"))
            .arg("--boot")
            .arg(&boot)
            .arg("-o")
            .arg(t.path().join("s.img"))
            .arg("--json")),
        1,
    );
    assert!(
        v["error"].as_str().unwrap().contains("missing.img.zst"),
        "{v}"
    );
    assert!(!t.path().join("s.img").exists());

    // 1: keygen never overwrites a key.
    std::fs::write(t.path().join("k.key"), b"mine").unwrap();
    let v = json_error(
        &run(imprint()
            .arg("keygen")
            .arg("-o")
            .arg(t.path().join("k"))
            .arg("--json")),
        1,
    );
    assert!(v["error"].as_str().unwrap().contains("k.key"), "{v}");
    assert_eq!(std::fs::read(t.path().join("k.key")).unwrap(), b"mine");

    // 2: usage errors, after or before the subcommand's --json.
    let v = json_error(&run(imprint().args(["build", "--json", "--bogus"])), 2);
    assert!(v["error"].as_str().unwrap().contains("--bogus"), "{v}");
    let v = json_error(&run(imprint().args(["write", "--json"])), 2);
    assert!(v["error"].as_str().unwrap().contains("required"), "{v}");

    // 3: not an imprint image.
    let fake = t.path().join("fake.img.zst");
    std::fs::write(&fake, noise(MIB, 3)).unwrap();
    let v = json_error(
        &run(imprint()
            .arg("build")
            .arg("--image")
            .arg(&fake)
            .arg("--boot")
            .arg(&boot)
            .arg("-o")
            .arg(t.path().join("s.img"))
            .arg("--json")),
        3,
    );
    assert!(v["error"].as_str().unwrap().contains("fake.img.zst"), "{v}");
    let v = json_error(
        &run(imprint()
            .arg("prepare")
            .arg(t.path().join("nope.raw"))
            .arg("--json")),
        1,
    );
    assert!(v["error"].as_str().unwrap().contains("nope.raw"), "{v}");

    // 4: flash refuses a target that is not a block device, before building anything.
    let file = t.path().join("not-a-stick");
    std::fs::write(&file, b"keep").unwrap();
    let v = json_error(
        &run(imprint()
            .arg("flash")
            .arg("--image")
            .arg(&img)
            .arg("--boot")
            .arg(&boot)
            .arg(&file)
            .args(["--yes", "--json"])),
        4,
    );
    assert!(
        v["error"].as_str().unwrap().contains("not a block device"),
        "{v}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    // 7: the image cannot be downloaded (nothing listens on port 1).
    let v = json_error(
        &run(imprint().args(["inspect", "http://127.0.0.1:1/x.img.zst", "--json"])),
        7,
    );
    assert!(v["error"].as_str().unwrap().contains("127.0.0.1"), "{v}");
}

/// `prepare --one-stream` writes a version 1 image (one zstd stream, no frame table), the
/// default a version 2 one; both hold the same raw disk and `write` puts the same bytes on a
/// target from either.
#[test]
fn prepare_one_stream_makes_version_1_and_both_versions_write_the_same_disk() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("disk.raw");
    gpt_raw(&raw, 9 * MIB, 11, 2 * MIB..5 * MIB);
    let want = std::fs::read(&raw).unwrap();
    for (flag, version, frames) in [(None, 2, Some(3)), (Some("--one-stream"), 1, None)] {
        let img = t.path().join(format!("v{version}.img.zst"));
        let mut cmd = imprint();
        cmd.arg("prepare")
            .arg(&raw)
            .arg("-o")
            .arg(&img)
            .arg("--json");
        cmd.args(flag);
        let v = json_result(&run(&mut cmd));
        assert_eq!(v["manifest"]["version"], version, "{v}");
        assert_eq!(
            v["manifest"]["frames"].as_array().map(Vec::len),
            frames,
            "{v}"
        );
        let disk = t.path().join(format!("disk-v{version}"));
        std::fs::write(&disk, vec![0xA5u8; want.len()]).unwrap();
        let o = run(imprint()
            .arg("write")
            .arg(&img)
            .arg(&disk)
            .args(["--to-file", "--yes"]));
        assert!(o.status.success(), "v{version}: {}", stderr(&o));
        let got = std::fs::read(&disk).unwrap();
        assert!(
            got == want,
            "v{version}: the disk differs from the raw image"
        );
    }
}
