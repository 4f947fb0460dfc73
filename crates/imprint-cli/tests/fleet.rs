//! Integration tests through the real `imprint` binary: `imprint build` refusing a broken,
//! misnamed or empty seed with the message the user sees and no output file left behind; and
//! `imprint reports` over several reports in a folder, a mounted-stick layout and a stick image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use imprint_core::config::Config;
use imprint_core::machine::{Dmi, MachineIdentity, Nic};
use imprint_core::seed;
use serde_json::{json, Value};

mod common;
use common::{imprint_with, ok, stderr, stdout};

/// A real imprint image made by `imprint prepare` from a small GPT-looking raw disk.
fn image(dir: &Path) -> PathBuf {
    let mut v = vec![0u8; 4 << 20];
    v[510] = 0x55;
    v[511] = 0xAA;
    v[512..520].copy_from_slice(b"EFI PART");
    let raw = dir.join("disk.raw");
    fs::write(&raw, &v).unwrap();
    let img = dir.join("os.img.zst");
    ok(imprint_with(&[&"prepare", &raw, &"-o", &img]));
    img
}

/// A boot folder shaped like image-build/build's output (the stick writer copies bytes).
fn boot_dir(dir: &Path) -> PathBuf {
    let boot = dir.join("boot");
    for rel in [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/BOOT/grubx64.efi",
        "vmlinuz",
        "initrd.img",
    ] {
        let p = boot.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("contents of {rel}\n")).unwrap();
    }
    let grub = boot.join("EFI/debian/grub.cfg");
    fs::create_dir_all(grub.parent().unwrap()).unwrap();
    fs::write(&grub, "linux /vmlinuz imprint.esp=@ESP_PARTUUID@\n").unwrap();
    boot
}

fn build(img: &Path, boot: &Path, seed: &Path, out: &Path) -> Output {
    imprint_with(&[
        &"build", &"--image", &img, &"--boot", &boot, &"--seed", &seed, &"-o", &out,
    ])
}

fn no_output_left(out: &Path) {
    assert!(!out.exists(), "{} was left", out.display());
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    assert!(!Path::new(&partial).exists(), "the .partial file was left");
}

/// The byte range of the stick's ESP (GPT partition `IMPRINT`).
fn esp_range(stick: &Path) -> (u64, u64) {
    let g = gpt::GptConfig::new().open(stick).unwrap();
    let esp = g
        .partitions()
        .values()
        .find(|p| p.name == "IMPRINT")
        .unwrap()
        .clone();
    (
        esp.first_lba * 512,
        (esp.last_lba + 1 - esp.first_lba) * 512,
    )
}

/// A file from the stick's ESP, read with the fatfs crate.
fn esp_file(stick: &Path, path: &str) -> Vec<u8> {
    let (start, len) = esp_range(stick);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(stick)
        .unwrap();
    let slice = imprint_core::blockdev::PartitionSlice::new(&mut f, start, len);
    let fat = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut fat.root_dir().open_file(path).unwrap(), &mut out).unwrap();
    out
}

#[test]
fn build_refuses_a_broken_seed_and_leaves_no_output() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let boot = boot_dir(t.path());
    let seed = t.path().join("seed");
    fs::create_dir(&seed).unwrap();
    let out = t.path().join("stick.img");
    let ud = seed.join("user-data");

    // A good seed builds, and its user-data lands on the stick byte for byte (a BOM, CRLF
    // line ends and comments included: checked, never rewritten).
    let exact = "\u{feff}#cloud-config\r\n# ops account\r\nusers:\r\n  - name: ops\r\n    \
                 lock_passwd: yes\r\n";
    fs::write(&ud, exact).unwrap();
    ok(build(&img, &boot, &seed, &out));
    assert_eq!(
        esp_file(&out, "imprint/seed/user-data"),
        exact.as_bytes(),
        "user-data on the stick"
    );
    fs::remove_file(&out).unwrap();
    let good = "#cloud-config\nusers:\n  - name: ops\n    lock_passwd: true\n";
    fs::write(&ud, good).unwrap();

    // Broken YAML, a wrong type and a misspelt key: every problem, file:line:column.
    fs::write(
        &ud,
        "#cloud-config\nusers:\n  - name: ops\n    lock_passwd: maybe\nssh_authorised_keys: [k]\n",
    )
    .unwrap();
    let o = build(&img, &boot, &seed, &out);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let u = ud.display();
    assert_eq!(
        stderr(&o),
        format!(
            "imprint: error: {u}:4:18: users[0].lock_passwd: expected boolean, found text\n\
             {u}:5:1: ssh_authorised_keys: no cloud-init module reads this key (it would be \
             ignored): did you mean ssh_authorized_keys?\n"
        )
    );
    no_output_left(&out);

    fs::write(&ud, "#cloud-config\nruncmd:\n  - ls\n packages: [vim]\n").unwrap();
    let o = build(&img, &boot, &seed, &out);
    assert!(
        stderr(&o).starts_with(&format!("imprint: error: {u}:4:2: not valid YAML")),
        "{}",
        stderr(&o)
    );
    no_output_left(&out);

    // A misnamed file next to a good user-data.
    fs::write(&ud, good).unwrap();
    fs::write(seed.join("network_config.yaml"), "version: 2\n").unwrap();
    let o = build(&img, &boot, &seed, &out);
    assert_eq!(
        stderr(&o),
        format!(
            "imprint: error: {}:1:1: cloud-init ignores a file of this name: did you mean \
             network-config? (rename it to exactly network-config)\n",
            seed.join("network_config.yaml").display()
        )
    );
    no_output_left(&out);

    // An empty seed folder.
    let empty = t.path().join("empty-seed");
    fs::create_dir(&empty).unwrap();
    let o = build(&img, &boot, &empty, &out);
    assert_eq!(
        stderr(&o),
        format!(
            "imprint: error: {}: the seed folder holds no user-data, meta-data or \
             network-config: put your #cloud-config in user-data there, or leave out --seed to \
             build without a seed\n",
            empty.display()
        )
    );
    no_output_left(&out);
}

/// A report as the appliance writes it: the machine and the seed summary are the real types'
/// JSON (MachineIdentity, RenderedSeed::summary), the rest in the appliance's field names.
fn report(id: &str, started: u64, serial: &str, mac: &str, status: &str, hostname: bool) -> Value {
    let identity = MachineIdentity {
        dmi: Dmi {
            sys_vendor: Some("Intel(R) Client Systems".into()),
            product_name: Some("NUC11TNHi5".into()),
            product_serial: Some(serial.into()),
            product_uuid: None,
            board_serial: None,
        },
        nics: vec![
            Nic {
                name: "wlan0".into(),
                mac: "02:00:00:00:99:99".parse().unwrap(),
                wireless: true,
            },
            Nic {
                name: "eno1".into(),
                mac: mac.parse().unwrap(),
                wireless: false,
            },
        ],
    };
    let config = Config::from_json(&format!(
        r#"{{"seed": {{"machines": [{{"mac": "{mac}", "hostname": "nuc-{id}"}}]}}}}"#
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let templates = seed::validate_seed_dir(dir.path()).unwrap();
    let rendered = seed::render(&templates, &config.seed, &identity, id).unwrap();
    json!({
        "version": 1,
        "install_id": id,
        "status": status,
        "started_at": started,
        "boot": null,
        "machine": identity,
        "hardware": {"cpu": "x"},
        "disks": [{"name": "nvme0n1", "serial": "S64DNX0T123456", "size": 512_110_190_592_u64}],
        "selection": {"chosen": "nvme0n1", "reason": "the only disk", "rejected": []},
        "image": {"name": "ubuntu-24.04"},
        "write": null,
        "seed": if hostname { json!({"summary": rendered.summary(), "placement": null}) } else { Value::Null },
        "next_boot": null,
        "timings": if status == "installed" { json!({"discover": 1.0, "total": 252.4}) } else { json!({"discover": 2.0}) },
        "error": if status == "failed" { json!("writing /dev/nvme0n1: I/O error\u{1b}[2J") } else { Value::Null },
        "a_field_from_a_newer_appliance": {"x": 1}
    })
}

/// Three reports whose file names are not in time order (the table is).
fn fleet(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let reports = [
        report(
            "a2",
            1_764_074_400,
            "BTTN0002",
            "aa:bb:cc:00:00:02",
            "failed",
            false,
        ),
        report(
            "b1",
            1_764_070_930,
            "BTTN0001",
            "aa:bb:cc:00:00:01",
            "installed",
            true,
        ),
        report(
            "c3",
            1_764_078_000,
            "To Be Filled By O.E.M.",
            "aa:bb:cc:00:00:03",
            "inventory",
            false,
        ),
    ];
    for r in &reports {
        fs::write(
            dir.join(format!("{}.json", r["install_id"].as_str().unwrap())),
            serde_json::to_vec_pretty(r).unwrap(),
        )
        .unwrap();
    }
    fs::write(dir.join("junk.json"), b"{not json").unwrap();
    fs::write(dir.join("notes.txt"), b"not a report").unwrap();
}

const TABLE: &str = "\
MACHINE            HOSTNAME  STATUS     IMAGE         WHEN (UTC)        TOOK        TARGET
BTTN0001           nuc-b1    installed  ubuntu-24.04  2025-11-25 11:42  4 min 12 s  nvme0n1 (S64DNX0T123456)
BTTN0002           -         failed     ubuntu-24.04  2025-11-25 12:40  2.0 s       nvme0n1 (S64DNX0T123456)
aa:bb:cc:00:00:03  -         inventory  ubuntu-24.04  2025-11-25 13:40  2.0 s       nvme0n1 (S64DNX0T123456)

a2 BTTN0002: writing /dev/nvme0n1: I/O error\\u{1b}[2J
";

#[test]
fn reports_table_json_and_machines() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("reports");
    fleet(&dir);

    let o = ok(imprint_with(&[&"reports", &dir]));
    assert_eq!(stdout(&o), TABLE);
    // The junk file is named, and skipped; the .txt is not a report file at all.
    assert!(stderr(&o).contains("skipping"), "{}", stderr(&o));
    assert!(stderr(&o).contains("junk.json"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("notes.txt"), "{}", stderr(&o));

    // A mounted stick: its imprint/reports/ is found.
    let stick = t.path().join("stick");
    fleet(&stick.join("imprint/reports"));
    assert_eq!(stdout(&ok(imprint_with(&[&"reports", &stick]))), TABLE);

    let rows: Value =
        serde_json::from_str(&stdout(&ok(imprint_with(&[&"reports", &dir, &"--json"])))).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["install_id"], "b1");
    assert_eq!(rows[0]["hostname"], "nuc-b1");
    assert_eq!(rows[0]["duration_secs"], 252.4);
    assert_eq!(rows[0]["started_at"], 1_764_070_930);
    assert_eq!(rows[1]["status"], "failed");
    assert_eq!(rows[2]["machine"], "aa:bb:cc:00:00:03");

    // The machines skeleton: one entry per machine, keyed by its wired MAC, loads as config
    // once the hostnames are filled in.
    let o = ok(imprint_with(&[&"reports", &dir, &"--machines"]));
    let frag: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let m = frag["seed"]["machines"].as_array().unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m[0]["mac"], "aa:bb:cc:00:00:01");
    assert_eq!(m[0]["hostname"], "nuc-b1");
    assert_eq!(m[1]["hostname"], "");
    assert_eq!(
        m[0]["note"],
        "Intel(R) Client Systems NUC11TNHi5; serial BTTN0001; NICs eno1 aa:bb:cc:00:00:01, \
         wlan0 02:00:00:00:99:99 (wireless); seen by report b1"
    );
    // Unfilled hostnames are refused by the config, so a skeleton cannot be used unfinished.
    let e = Config::from_json(&stdout(&o)).unwrap_err().to_string();
    assert!(e.contains("seed.machines[1].hostname"), "{e}");
    let mut filled = frag.clone();
    for (i, e) in filled["seed"]["machines"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        e["hostname"] = json!(format!("nuc-{i}"));
    }
    Config::from_json(&filled.to_string()).unwrap();

    // Nothing to list is an error, not an empty table.
    let empty = t.path().join("none");
    fs::create_dir(&empty).unwrap();
    let o = imprint_with(&[&"reports", &empty]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no reports in"), "{}", stderr(&o));
}

#[test]
fn reports_from_a_stick_image() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let boot = boot_dir(t.path());
    let seed = t.path().join("seed");
    fs::create_dir(&seed).unwrap();
    fs::write(seed.join("user-data"), "#cloud-config\n").unwrap();
    let out = t.path().join("stick.img");
    ok(build(&img, &boot, &seed, &out));

    // A fresh stick has an empty reports folder.
    let o = imprint_with(&[&"reports", &out]);
    assert!(stderr(&o).contains("no reports in"), "{}", stderr(&o));

    // Put the reports where the appliance writes them: imprint/reports/ on the stick's ESP.
    let src = t.path().join("src");
    fleet(&src);
    let (start, len) = esp_range(&out);
    {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        let slice = imprint_core::blockdev::PartitionSlice::new(&mut f, start, len);
        let fat = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
        let dir = fat.root_dir().open_dir("imprint/reports").unwrap();
        for e in fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            let mut file = dir.create_file(&e.file_name().to_string_lossy()).unwrap();
            std::io::Write::write_all(&mut file, &fs::read(e.path()).unwrap()).unwrap();
        }
    }
    let before = fs::read(&out).unwrap();
    let o = ok(imprint_with(&[&"reports", &out]));
    assert_eq!(stdout(&o), TABLE);
    // Read only: the stick image is unchanged.
    assert!(fs::read(&out).unwrap() == before);
}
