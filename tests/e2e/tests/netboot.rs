//! Netboot on a virtual NUC without a stick: a lab network ([`imprint_e2e::netlab`]: a "home
//! router" dnsmasq, imprint's proxy-DHCP dnsmasq.conf, nginx serving `imprint netboot render`'s
//! tree with PUT under reports/), and one qemu NUC with Secure Boot on whose only boot device is
//! its NIC (UEFI HTTP boot) and a blank NVMe disk. Firmware → shim → Debian 13 GRUB → kernel →
//! initramfs over HTTP; the appliance gets its own lease, fetches config and seed, streams the
//! image, installs it onto the NVMe and PUTs its report to the server. A second power-on of
//! the same NUC netboots again and does not rewrite the disk. Firmware without HTTP boot (PXE
//! on) gets shim and GRUB over TFTP from the tree's tftp/ and the rest over HTTP.
//!
//! Needs root (namespaces, taps, loop devices), build/boot with netboot/grubx64.efi
//! (image-build/build), qemu, OVMF, dnsmasq, nginx, mtools (scripts/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use imprint_e2e::fixtures::{sha256_file, small_image};
use imprint_e2e::netlab::{self, Lab};
use imprint_e2e::{
    boot_dir, imprint_bin, run, sparse_disk, workspace_root, Firmware, Vm, VmBuilder,
};

const MAC: &str = "52:54:00:12:34:56";
const GIB: u64 = 1 << 30;

fn render(d: &Path, image: &Path) -> std::path::PathBuf {
    let config = d.join("fleet.json");
    std::fs::write(
        &config,
        format!(
            "{{\"target\": {{\"transports\": [\"nvme\"]}}, \"confirm\": \"never\", \"after\": \"poweroff\",\n\
             \"seed\": {{\"placement\": \"cidata-partition\", \"machines\": [{{\"mac\": \"{MAC}\", \"hostname\": \"nuc-net-01\"}}]}}}}\n"
        ),
    )
    .unwrap();
    let tree = d.join("tree");
    run(Command::new(imprint_bin().unwrap())
        .args(["netboot", "render", "--image"])
        .arg(image)
        .arg("--seed")
        .arg(workspace_root().join("scripts/demo-seed"))
        .arg("--config")
        .arg(&config)
        .arg("--boot")
        .arg(boot_dir().unwrap())
        .args([
            "--url",
            &format!("http://{}:{}/", netlab::SERVER, netlab::PORT),
            "-o",
        ])
        .arg(&tree))
    .unwrap();
    tree
}

/// A file of the FAT seed partition (CIDATA) on the installed disk.
fn seed_file(nvme: &Path, name: &str) -> String {
    let table =
        imprint_core::gpt_table::GptTable::read(&mut std::fs::File::open(nvme).unwrap(), 512)
            .unwrap();
    let (_, p) = table.find_by_name("CIDATA").expect("a CIDATA partition");
    run(Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", nvme.display(), p.first_lba * 512))
        .arg(format!("::{name}")))
    .unwrap()
}

/// Runs a VM until the appliance is done and the VM powered itself off; returns it and its log.
fn until_poweroff(vm: VmBuilder) -> (Vm, String) {
    let started = Instant::now();
    let mut vm = vm.timeout(Duration::from_secs(600)).start().unwrap();
    vm.wait_for("IMPRINT-DONE", Duration::from_secs(540))
        .unwrap();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    eprintln!("netboot to power-off: {} s", started.elapsed().as_secs());
    assert!(status.success(), "powered off by the appliance: {status}");
    let log = vm.log();
    (vm, log)
}

/// The reports of the NUC on the server, by file name.
fn server_reports(tree: &Path) -> Vec<(String, serde_json::Value)> {
    let dir = tree.join("reports/52-54-00-12-34-56");
    let mut out: Vec<(String, serde_json::Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// What every install over the network shows: lease from the router, files from the server,
/// the image on the disk with the seed's hostname, the report on the server.
fn check_install(log: &str, access: &str, image: &Path, nvme: &Path, tree: &Path) {
    assert!(log.contains("secureboot: Secure boot enabled"), "{log}");
    assert!(
        log.contains("from DHCP server 10.88.0.1 (lease 3600 s)"),
        "{log}"
    );
    assert!(log
        .contains("imprint: from http://10.88.0.2:8080: config.json, seed: user-data, meta-data"));
    assert!(
        access.contains("\"GET /image.img.zst HTTP/1.1\" 206"),
        "{access}"
    );
    assert!(log.contains("imprint: target nvme0n1"), "{log}");
    assert!(
        log.contains("seed written and read back: hostname nuc-net-01 (named by machines entry 0)")
    );
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(image)
        .arg(nvme)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "imprint verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(seed_file(nvme, "meta-data").contains("nuc-net-01"));
    let reports = server_reports(tree);
    let (name, r) = reports
        .iter()
        .find(|(n, _)| n != "installed.json")
        .expect("an install report on the server");
    assert_eq!(r["status"], "installed");
    assert_eq!(r["selection"]["chosen"], "nvme0n1");
    assert_eq!(r["write"]["verified"], true);
    assert_eq!(r["seed"]["summary"]["hostname"], "nuc-net-01");
    assert!(log.contains(&format!(
        "imprint: report sent to http://10.88.0.2:8080/reports/52-54-00-12-34-56/{name}"
    )));
}

#[test]
fn a_nuc_without_a_stick_netboots_with_secure_boot_installs_and_is_not_rewritten_next_time() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let image = small_image(d, "netos", 512, None).unwrap();
    let tree = render(d, &image);
    let nvme = sparse_disk(&d.join("nvme.img"), 4 * GIB).unwrap();
    let mut lab = Lab::new(
        &format!("imp{}", std::process::id() % 100_000),
        &d.join("lab"),
    )
    .unwrap();
    lab.serve(&tree).unwrap();
    let tap = lab.tap().unwrap();
    let nuc = |name: &str| {
        VmBuilder::new(d.join(name), Firmware::SecureBoot)
            .http_boot_nic(&tap, MAC)
            .netns(&lab.lan())
            .nvme(&nvme, "NUC-NVME-0001")
    };

    // Power-on 1: UEFI HTTP boot (PXE off), install.
    let (vm, log) = until_poweroff(nuc("boot1"));
    let access = lab.log("access.log");
    for file in [
        "bootx64.efi",
        "grubx64.efi",
        "grub/grub.cfg",
        "vmlinuz",
        "initrd.img",
    ] {
        assert!(
            // shim asks for "//grubx64.efi" (its folder "/" plus "/grubx64.efi").
            access.contains(&format!("/{file} HTTP/1.1\" 200")),
            "{file} fetched by the firmware/GRUB:\n{access}"
        );
    }
    let proxy = lab.log("proxy.log");
    assert!(
        proxy.contains("HTTPClient") && proxy.contains("bootx64.efi"),
        "the proxy-DHCP answered the HTTP boot client:\n{proxy}"
    );
    check_install(&log, &access, &image, &nvme, &tree);
    let installed = server_reports(&tree);
    assert_eq!(
        installed.len(),
        2,
        "the report and installed.json: {installed:?}"
    );
    assert_eq!(installed[1].0, "installed.json");
    assert_eq!(installed[0].1, installed[1].1);
    let vars = d.join("vars-after-install.fd");
    std::fs::copy(vm.vars_path(), &vars).unwrap();
    drop(vm);
    let disk_after_install = sha256_file(&nvme).unwrap();

    // Power-on 2: the small image boots nothing, so the firmware netboots again; the
    // appliance finds its last install on the server and the image on the disk: no rewrite.
    let (_vm, log2) = until_poweroff(nuc("boot2").vars_from(&vars));
    assert!(
        log2.contains(
            "imprint: this machine's last install: reports/52-54-00-12-34-56/installed.json"
        ),
        "{log2}"
    );
    assert!(
        log2.contains(
            "nvme0n1 already holds netos from an earlier successful install; not reinstalling"
        ),
        "{log2}"
    );
    assert!(!log2.contains("write done"), "{log2}");
    assert_eq!(
        sha256_file(&nvme).unwrap(),
        disk_after_install,
        "the disk is untouched"
    );
    let all = server_reports(&tree);
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[1].1["status"], "already-installed");
    assert_eq!(all[2].0, "installed.json");
    assert_eq!(
        all[2].1["status"], "installed",
        "installed.json still names the install"
    );
}

#[test]
fn firmware_without_http_boot_gets_shim_and_grub_over_tftp_and_the_rest_over_http() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let image = small_image(d, "netos", 512, None).unwrap();
    let tree = render(d, &image);
    let nvme = sparse_disk(&d.join("nvme.img"), 4 * GIB).unwrap();
    let mut lab = Lab::new(
        &format!("imq{}", std::process::id() % 100_000),
        &d.join("lab"),
    )
    .unwrap();
    lab.serve(&tree).unwrap();
    let tap = lab.tap().unwrap();
    // OVMF with PXEv4 on tries it first, as PXE-only firmware would.
    let (_vm, log) = until_poweroff(
        VmBuilder::new(d.join("pxe"), Firmware::SecureBoot)
            .pxe_boot_nic(&tap, MAC)
            .netns(&lab.lan())
            .nvme(&nvme, "NUC-NVME-0001"),
    );
    let proxy = lab.log("proxy.log");
    let tftp = tree.join("tftp");
    for file in ["bootx64.efi", "grubx64.efi", "grub/grub.cfg"] {
        assert!(
            proxy.contains(&format!("sent {}", tftp.join(file).display())),
            "{file} over TFTP from tftp/:\n{proxy}"
        );
    }
    let access = lab.log("access.log");
    assert!(!access.contains("bootx64.efi"), "{access}");
    for file in ["vmlinuz", "initrd.img"] {
        assert!(
            access.contains(&format!("\"GET /{file} HTTP/1.1\" 200"))
                && access.contains("GRUB 2.12"),
            "{file} over HTTP by GRUB:\n{access}"
        );
    }
    check_install(&log, &access, &image, &nvme, &tree);
}

/// `imprint netboot serve` instead of nginx and a hand-run dnsmasq: serve renders the tree for
/// srv0's address, runs dnsmasq for proxy-DHCP and serves HTTP; the NUC (Secure Boot on)
/// netboots from it, installs, and its report and progress events reach serve, whose output
/// shows the machine's row from `network` through `writing` (bytes > 0) to `done installed`.
#[test]
fn a_nuc_netboots_from_imprint_netboot_serve_and_serve_shows_its_progress() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let image = small_image(d, "netos", 512, None).unwrap();
    let config = d.join("serve-fleet.json");
    std::fs::write(
        &config,
        format!(
            "{{\"target\": {{\"transports\": [\"nvme\"]}}, \"confirm\": \"never\", \"after\": \"poweroff\",\n\
             \"seed\": {{\"placement\": \"cidata-partition\", \"machines\": [{{\"mac\": \"{MAC}\", \"hostname\": \"nuc-net-01\"}}]}}}}\n"
        ),
    )
    .unwrap();
    let nvme = sparse_disk(&d.join("nvme.img"), 4 * GIB).unwrap();
    let mut lab = Lab::new(
        &format!("ims{}", std::process::id() % 100_000),
        &d.join("lab"),
    )
    .unwrap();
    let reports = d.join("reports");
    let tree = d.join("tree");
    let mut serve = Command::new(imprint_bin().unwrap());
    serve
        .args(["netboot", "serve", "--image"])
        .arg(&image)
        .arg("--seed")
        .arg(workspace_root().join("scripts/demo-seed"))
        .arg("--config")
        .arg(&config)
        .arg("--boot")
        .arg(boot_dir().unwrap())
        .args(["--interface", "srv0", "--port", &netlab::PORT.to_string()])
        .arg("--reports")
        .arg(&reports)
        .arg("--dir")
        .arg(&tree);
    let serve_pid = lab.run_logged("srv", "serve", &serve).unwrap();
    let started = Instant::now();
    while !lab.log("serve.err").contains("answers proxy-DHCP on srv0") {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "serve did not come up:\n{}",
            lab.log("serve.err")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let tap = lab.tap().unwrap();
    let (_vm, log) = until_poweroff(
        VmBuilder::new(d.join("serve"), Firmware::SecureBoot)
            .http_boot_nic(&tap, MAC)
            .netns(&lab.lan())
            .nvme(&nvme, "NUC-NVME-0001"),
    );

    // The install, as over nginx.
    assert!(log.contains("secureboot: Secure boot enabled"), "{log}");
    assert!(log.contains("from DHCP server 10.88.0.1"), "{log}");
    assert!(
        log.contains("seed written and read back: hostname nuc-net-01 (named by machines entry 0)")
    );
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(&image)
        .arg(&nvme)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "imprint verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(seed_file(&nvme, "meta-data").contains("nuc-net-01"));
    // The report landed under --reports (the tree's reports/ links there).
    let machine = reports.join("52-54-00-12-34-56");
    let mut names: Vec<String> = std::fs::read_dir(&machine)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names.len(),
        3,
        "report, installed.json, progress.json: {names:?}"
    );
    let id = names
        .iter()
        .find(|n| n.starts_with("20"))
        .expect("the install report");
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(machine.join(id)).unwrap()).unwrap();
    assert_eq!(rep["status"], "installed");
    assert_eq!(rep["write"]["verified"], true);
    assert_eq!(
        std::fs::read(machine.join("installed.json")).unwrap(),
        std::fs::read(machine.join(id)).unwrap()
    );
    assert!(log.contains(&format!(
        "imprint: report sent to http://10.88.0.2:8080/reports/52-54-00-12-34-56/{id}"
    )));
    let last: serde_json::Value =
        serde_json::from_slice(&std::fs::read(machine.join("progress.json")).unwrap()).unwrap();
    assert_eq!(last["phase"], "done");
    assert_eq!(last["result"], "installed");
    assert_eq!(last["hostname"], "nuc-net-01");
    assert_eq!(
        format!("{}.json", last["install_id"].as_str().unwrap()),
        *id
    );

    // What serve showed: the machine's row through its phases, bytes while writing, the end.
    let out = lab.log("serve.out");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("52-54-00-12-34-56  "))
        .collect();
    assert!(
        rows.iter().any(|l| l.contains("  network")),
        "the first event:\n{out}"
    );
    let writing: Vec<&str> = rows
        .iter()
        .copied()
        .filter(|l| l.contains("nuc-net-01") && l.contains(" writing ") && l.contains("MiB/"))
        .filter(|l| !l.contains("  0 B/"))
        .collect();
    assert!(
        !writing.is_empty(),
        "a writing event with bytes > 0:\n{out}"
    );
    assert!(
        rows.iter()
            .any(|l| l.contains("nuc-net-01") && l.contains(" done ") && l.ends_with("installed")),
        "the row reached done/installed:\n{out}"
    );
    assert!(
        rows.iter()
            .any(|l| l.contains(&format!("report {id}: installed"))),
        "{out}"
    );
    let err = lab.log("serve.err");
    assert!(
        err.contains("dnsmasq: ") && err.contains("HTTPClient"),
        "{err}"
    );

    // SIGTERM: serve stops and takes dnsmasq with it.
    run(Command::new("kill").args(["-TERM", &serve_pid.to_string()])).unwrap();
    let t0 = Instant::now();
    while !lab
        .log("serve.err")
        .contains("imprint: stopped; dnsmasq (pid")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{}",
            lab.log("serve.err")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
