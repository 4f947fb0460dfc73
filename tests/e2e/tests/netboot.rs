//! Netboot on virtual NUCs without a stick: a lab network ([`imprint_e2e::netlab`]: a "home
//! router" dnsmasq, imprint's proxy-DHCP dnsmasq.conf, nginx serving `imprint netboot render`'s
//! tree with PUT under reports/), and qemu NUCs whose only boot device is their NIC (UEFI HTTP
//! boot) and a blank NVMe disk. Firmware → shim → Debian 13 GRUB → kernel → initramfs over
//! HTTP; the appliance gets its own lease, finds its machines-table entry by MAC, streams the
//! image, installs it onto the NVMe with a seed carrying that machine's hostname and static
//! address, and PUTs its report to the server.
//!
//! - A shelf of three NUCs (two with Secure Boot on, one off) powered on at once installs the
//!   Debian test OS; one of them then boots it (cloud-init applies its own hostname and
//!   address), and its next power-on netboots again and does not rewrite the disk.
//! - Firmware without HTTP boot (PXE on) gets shim and GRUB over TFTP from the tree's tftp/
//!   and the rest over HTTP.
//!
//! Needs root (namespaces, taps, loop devices), build/boot with netboot/grubx64.efi
//! (image-build/build), build/os/debian-bookworm-cloud.raw (image-build/os-image), qemu, OVMF,
//! dnsmasq, nginx, mtools (scripts/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use imprint_e2e::fixtures::{sha256_file, small_image};
use imprint_e2e::netlab::{self, Lab};
use imprint_e2e::{
    boot_dir, check_next_boot, imprint_bin, ovmf_vars, run, sparse_disk, workspace_root, Firmware,
    Vm, VmBuilder,
};

const GIB: u64 = 1 << 30;

/// A virtual NUC of the lab and its entry in the config's machines table.
#[derive(Debug, Clone, Copy)]
struct Nuc {
    mac: &'static str,
    hostname: &'static str,
    /// The static address its seed gives the installed OS.
    address: &'static str,
    firmware: Firmware,
    nvme_serial: &'static str,
}

impl Nuc {
    /// Its folder on the server: `reports/<aa-bb-cc-dd-ee-ff>/`.
    fn reports_dir(&self) -> String {
        format!("reports/{}", self.mac.replace(':', "-"))
    }

    /// Its next power-on: the NIC on `tap` first in the boot order, its NVMe disk `nvme`.
    fn vm(&self, dir: &Path, run: &str, lab: &Lab, tap: &str, nvme: &Path) -> VmBuilder {
        VmBuilder::new(dir.join(format!("{}-{run}", self.hostname)), self.firmware)
            .http_boot_nic(tap, self.mac)
            .netns(&lab.lan())
            .nvme(nvme, self.nvme_serial)
    }
}

/// The shelf: distinct MACs, hostnames, addresses and disk serials; Secure Boot on, on, off.
const SHELF: [Nuc; 3] = [
    Nuc {
        mac: "52:54:00:12:34:56",
        hostname: "nuc-net-01",
        address: "10.88.0.51/24",
        firmware: Firmware::SecureBoot,
        nvme_serial: "NUC-NVME-0001",
    },
    Nuc {
        mac: "52:54:00:12:34:57",
        hostname: "nuc-net-02",
        address: "10.88.0.52/24",
        firmware: Firmware::SecureBoot,
        nvme_serial: "NUC-NVME-0002",
    },
    Nuc {
        mac: "52:54:00:12:34:58",
        hostname: "nuc-net-03",
        address: "10.88.0.53/24",
        firmware: Firmware::NoSecureBoot,
        nvme_serial: "NUC-NVME-0003",
    },
];

/// `imprint netboot render` of `image` with a machines table naming `nucs` (hostname and
/// static address each).
fn render(d: &Path, image: &Path, nucs: &[Nuc]) -> PathBuf {
    let machines: Vec<serde_json::Value> = nucs
        .iter()
        .map(|n| {
            serde_json::json!({
                "mac": n.mac,
                "hostname": n.hostname,
                "network": {"address": n.address, "gateway": netlab::ROUTER, "dns": [netlab::ROUTER]},
            })
        })
        .collect();
    let config = d.join("fleet.json");
    let json = serde_json::json!({
        "target": {"transports": ["nvme"]},
        "confirm": "never",
        "after": "poweroff",
        "seed": {"placement": "cidata-partition", "machines": machines},
    });
    std::fs::write(&config, json.to_string()).unwrap();
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

/// The Debian test OS (image-build/os-image) prepared into an imprint image.
fn os_image(d: &Path) -> PathBuf {
    let raw = workspace_root().join("build/os/debian-bookworm-cloud.raw");
    assert!(
        raw.exists(),
        "{} is missing: run image-build/os-image first (scripts/test does)",
        raw.display()
    );
    let out = d.join("os.img.zst");
    run(Command::new(imprint_bin().unwrap())
        .arg("prepare")
        .arg(&raw)
        .arg("-o")
        .arg(&out)
        .args(["--level", "3"]))
    .unwrap();
    out
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

/// Waits (at most `within`) until the appliance of `vm` is done and the VM powered itself
/// off; returns its console log. A hang fails naming the machine, with the console's tail.
fn powered_off(vm: &mut Vm, name: &str, within: Duration) -> String {
    vm.wait_for("IMPRINT-DONE", within)
        .unwrap_or_else(|e| panic!("{name}: the appliance did not finish: {e}"));
    // A failed run waits for a person instead of powering off: say why at once.
    let log = vm.log();
    if let Some(failed) = log.lines().find(|l| l.contains("imprint: FAILED")) {
        panic!("{name}: {failed}\n{log}");
    }
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        status.success(),
        "{name} powered off by the appliance: {status}"
    );
    vm.log()
}

/// Runs one power-on until the appliance powered the VM off; returns it and its log.
fn until_poweroff(vm: VmBuilder, name: &str) -> (Vm, String) {
    let started = Instant::now();
    let mut vm = vm.timeout(Duration::from_secs(600)).start().unwrap();
    let log = powered_off(&mut vm, name, Duration::from_secs(540));
    eprintln!(
        "{name}: netboot to power-off {} s",
        started.elapsed().as_secs()
    );
    (vm, log)
}

/// The latest progress event `nuc` sent (`reports/<mac>/progress.json`).
fn server_progress(tree: &Path, nuc: &Nuc) -> serde_json::Value {
    let p = tree.join(nuc.reports_dir()).join("progress.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// The reports of `nuc` on the server, by file name (its progress events aside).
fn server_reports(tree: &Path, nuc: &Nuc) -> Vec<(String, serde_json::Value)> {
    let dir = tree.join(nuc.reports_dir());
    let mut out: Vec<(String, serde_json::Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter(|e| {
            e.as_ref()
                .map_or(true, |e| e.file_name() != "progress.json")
        })
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

/// What every install over the network shows: the firmware's Secure Boot state, the lease
/// from the router, files from the server, the image on the disk (`imprint verify`) with a
/// seed carrying this machine's hostname and static address (read from the disk), and this
/// machine's report on the server — naming it and its disk — with `installed.json` beside it.
/// Returns the report.
fn check_install(
    log: &str,
    access: &str,
    image: &Path,
    nvme: &Path,
    tree: &Path,
    nuc: &Nuc,
) -> serde_json::Value {
    let h = nuc.hostname;
    let sb = match nuc.firmware {
        Firmware::SecureBoot => "secureboot: Secure boot enabled",
        Firmware::NoSecureBoot => "secureboot: Secure boot disabled",
    };
    assert!(log.contains(sb), "{h}: {sb}\n{log}");
    assert!(
        log.contains("from DHCP server 10.88.0.1 (lease 3600 s)"),
        "{h}: {log}"
    );
    assert!(
        log.contains(
            "imprint: from http://10.88.0.2:8080: config.json, seed: user-data, meta-data"
        ),
        "{h}: {log}"
    );
    assert!(
        access.contains("\"GET /image.img.zst HTTP/1.1\" 206"),
        "{access}"
    );
    assert!(log.contains("imprint: target nvme0n1"), "{h}: {log}");
    assert!(
        log.contains(&format!(
            "seed written and read back: hostname {h} (named by machines entry"
        )),
        "{h}: {log}"
    );
    let verify = Command::new(imprint_bin().unwrap())
        .arg("verify")
        .arg(image)
        .arg(nvme)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{h}: imprint verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The seed on the disk, read back from its bytes.
    let meta: serde_json::Value = serde_json::from_str(&seed_file(nvme, "meta-data")).unwrap();
    assert_eq!(meta["local-hostname"], h, "{meta}");
    let net: serde_json::Value = serde_json::from_str(&seed_file(nvme, "network-config")).unwrap();
    let eth = &net["ethernets"]["lan0"];
    assert_eq!(eth["match"]["macaddress"], nuc.mac, "{h}: {net}");
    assert_eq!(
        eth["addresses"],
        serde_json::json!([nuc.address]),
        "{h}: {net}"
    );
    assert_eq!(eth["gateway4"], netlab::ROUTER, "{h}: {net}");

    let reports = server_reports(tree, nuc);
    assert_eq!(
        reports.len(),
        2,
        "{h}: the report and installed.json: {reports:?}"
    );
    let (name, r) = &reports[0];
    assert_eq!(reports[1].0, "installed.json");
    // The last progress event: this install, done.
    let last = server_progress(tree, nuc);
    assert_eq!(
        (&last["phase"], &last["result"], &last["hostname"]),
        (
            &serde_json::json!("done"),
            &serde_json::json!("installed"),
            &serde_json::json!(nuc.hostname)
        ),
        "{h}: {last}"
    );
    assert_eq!(
        format!("{}.json", last["install_id"].as_str().unwrap_or_default()),
        *name,
        "{h}: {last}"
    );
    assert_eq!(
        &reports[1].1, r,
        "{h}: installed.json is the install's report"
    );
    assert_eq!(r["status"], "installed");
    assert_eq!(r["selection"]["chosen"], "nvme0n1");
    assert_eq!(r["write"]["verified"], true);
    assert_eq!(r["seed"]["summary"]["hostname"], h);
    assert_eq!(r["seed"]["summary"]["matched"]["by"], "mac");
    let disks = r["disks"].as_array().expect("disks in the report");
    assert!(
        disks
            .iter()
            .any(|d| d["name"] == "nvme0n1" && d["serial"] == nuc.nvme_serial),
        "{h}: the report names its disk {}: {disks:?}",
        nuc.nvme_serial
    );
    let nics = r["machine"]["nics"].as_array().expect("nics in the report");
    assert!(
        nics.iter().any(|n| n["mac"] == nuc.mac),
        "{h}: the report names its NIC: {nics:?}"
    );
    assert!(
        log.contains(&format!(
            "imprint: report sent to http://10.88.0.2:8080/{}/{name}",
            nuc.reports_dir()
        )),
        "{h}: {log}"
    );
    r.clone()
}

#[test]
fn a_shelf_of_three_nucs_netboots_at_once_installs_each_its_own_seed_and_one_boots_and_is_not_rewritten(
) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let image = os_image(d);
    let tree = render(d, &image, &SHELF);
    let mut lab = Lab::new(
        &format!("imp{}", std::process::id() % 100_000),
        &d.join("lab"),
    )
    .unwrap();
    lab.serve(&tree).unwrap();
    let taps: Vec<String> = SHELF.iter().map(|_| lab.tap().unwrap()).collect();
    let nvmes: Vec<PathBuf> = SHELF
        .iter()
        .map(|n| sparse_disk(&d.join(format!("{}.nvme", n.hostname)), 4 * GIB).unwrap())
        .collect();

    // Power-on 1 of all three at once: UEFI HTTP boot (PXE off), install. Three TCG VMs share
    // the machine's cores: each gets 20 minutes, then fails naming itself.
    let started = Instant::now();
    let mut vms: Vec<Vm> = SHELF
        .iter()
        .zip(&taps)
        .zip(&nvmes)
        .map(|((n, tap), nvme)| {
            n.vm(d, "install", &lab, tap, nvme)
                .timeout(Duration::from_secs(1500))
                .start()
                .unwrap()
        })
        .collect();
    let mut logs = Vec::new();
    for (vm, n) in vms.iter_mut().zip(&SHELF) {
        let left = Duration::from_secs(1200).saturating_sub(started.elapsed());
        logs.push(powered_off(vm, n.hostname, left));
        eprintln!(
            "{}: powered off {} s after the shelf's power-on",
            n.hostname,
            started.elapsed().as_secs()
        );
    }
    eprintln!(
        "three NUCs netbooted and installed at once in {} s",
        started.elapsed().as_secs()
    );

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
        "the proxy-DHCP answered the HTTP boot clients:\n{proxy}"
    );
    let leases = lab.log("router.leases");
    let mut vars_after_install = Vec::new();
    for (i, n) in SHELF.iter().enumerate() {
        assert!(
            leases.contains(n.mac),
            "{}: a lease from the router:\n{leases}",
            n.hostname
        );
        let report = check_install(&logs[i], &access, &image, &nvmes[i], &tree, n);
        // What the firmware holds: BootNext and a Boot#### for the installed disk's ESP.
        check_next_boot(vms[i].vars_path(), &report)
            .unwrap_or_else(|e| panic!("{}: {e}", n.hostname));
        let vars = d.join(format!("{}-vars-after-install.fd", n.hostname));
        std::fs::copy(vms[i].vars_path(), &vars).unwrap();
        vars_after_install.push(vars);
    }
    drop(vms);

    // The first NUC's power-on 2: BootNext takes it to its disk; the OS's first boot, where
    // cloud-init applies the seed: its own hostname and static address.
    let (nuc, tap, nvme) = (&SHELF[0], &taps[0], &nvmes[0]);
    let os_started = Instant::now();
    let mut os = nuc
        .vm(d, "os", &lab, tap, nvme)
        .vars_from(&vars_after_install[0])
        .timeout(Duration::from_secs(900))
        .start()
        .unwrap();
    os.wait_for(
        &format!(
            "IMPRINT-OS-OK hostname={} marker=provisioned_by_imprint",
            nuc.hostname
        ),
        Duration::from_secs(780),
    )
    .unwrap();
    os.wait_for("IMPRINT-OS-ADDR", Duration::from_secs(60))
        .unwrap();
    os.wait_exit(Duration::from_secs(120)).unwrap();
    eprintln!(
        "{}: the installed OS's first boot to power-off {} s",
        nuc.hostname,
        os_started.elapsed().as_secs()
    );
    let os_log = os.log();
    assert!(
        os_log.contains(&format!("inet {}", nuc.address)),
        "the static address from the machines table: {os_log}"
    );
    assert!(
        !os_log.contains("imprint: install "),
        "the appliance did not run"
    );
    let vars_after_os = d.join("vars-after-os.fd");
    std::fs::copy(os.vars_path(), &vars_after_os).unwrap();
    drop(os);
    assert_eq!(
        ovmf_vars::read(&vars_after_os).unwrap().boot_next(),
        None,
        "the firmware consumed BootNext"
    );
    let disk_after_os = sha256_file(nvme).unwrap();

    // Power-on 3: the NIC is first in the boot order, so the firmware netboots again; the
    // appliance finds its last install on the server and the image on the disk (the OS grew
    // its root partition): no rewrite, BootNext to the disk again.
    let (vm, log) = until_poweroff(
        nuc.vm(d, "again", &lab, tap, nvme)
            .vars_from(&vars_after_os),
        nuc.hostname,
    );
    assert!(
        log.contains(&format!(
            "imprint: this machine's last install: {}/installed.json",
            nuc.reports_dir()
        )),
        "{log}"
    );
    assert!(
        log.contains(
            "nvme0n1 already holds debian-bookworm-cloud from an earlier successful install; not reinstalling"
        ),
        "{log}"
    );
    assert!(!log.contains("write done"), "{log}");
    assert_eq!(
        sha256_file(nvme).unwrap(),
        disk_after_os,
        "the disk is untouched"
    );
    let all = server_reports(&tree, nuc);
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[1].1["status"], "already-installed");
    check_next_boot(vm.vars_path(), &all[1].1).unwrap();
    assert_eq!(all[2].0, "installed.json");
    assert_eq!(
        all[2].1["status"], "installed",
        "installed.json still names the install"
    );
    // The other two machines' reports are untouched.
    for n in &SHELF[1..] {
        assert_eq!(server_reports(&tree, n).len(), 2, "{}", n.hostname);
    }
}

#[test]
fn firmware_without_http_boot_gets_shim_and_grub_over_tftp_and_the_rest_over_http() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let image = small_image(d, "netos", 512, None).unwrap();
    let nuc = &SHELF[0];
    let tree = render(d, &image, std::slice::from_ref(nuc));
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
        nuc.vm(d, "pxe", &lab, &tap, &nvme)
            .pxe_boot_nic(&tap, nuc.mac),
        nuc.hostname,
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
    check_install(&log, &access, &image, &nvme, &tree, nuc);
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
             \"seed\": {{\"placement\": \"cidata-partition\", \"machines\": [{{\"mac\": \"{}\", \"hostname\": \"nuc-net-01\"}}]}}}}\n",
            SHELF[0].mac
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
            .http_boot_nic(&tap, SHELF[0].mac)
            .netns(&lab.lan())
            .nvme(&nvme, "NUC-NVME-0001"),
        "serve",
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
    // serve's access log, from the machine's address: the firmware's GET of shim, shim's look
    // for revocations (404, with a body: an empty 404 hangs it), GRUB, then the appliance's
    // image in ranges.
    let peer = log
        .lines()
        .filter(|l| l.contains(" from DHCP server "))
        .find_map(|l| l.split("imprint: network: ").nth(1))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("the NUC's address on its console:\n{log}"));
    for want in [
        "GET /bootx64.efi -> 200, ",
        "GET /revocations_sku.efi -> 404, ",
        "/grubx64.efi -> 200, ", // shim asks for `//grubx64.efi`
        "GET /image.img.zst (bytes=",
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("imprint: {peer} ")) && l.contains(want)),
            "{want:?} from {peer} in serve's access log:\n{err}"
        );
    }

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
