//! Netboot on a virtual NUC without a stick: a lab network ([`imprint_e2e::netlab`]: a "home
//! router" dnsmasq, imprint's proxy-DHCP dnsmasq.conf, nginx serving `imprint netboot render`'s
//! tree with PUT under reports/), and one qemu NUC with Secure Boot on whose only boot device is
//! its NIC (UEFI HTTP boot) and a blank NVMe disk. Firmware → shim → Debian 13 GRUB → kernel →
//! initramfs over HTTP; the appliance gets its own lease, fetches config and seed, streams the
//! image, installs it onto the NVMe and PUTs its report to the server.
//!
//! Needs root (namespaces, taps, loop devices), build/boot with netboot/grubx64.efi
//! (image-build/build), qemu, OVMF, dnsmasq, nginx, mtools (scripts/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use imprint_e2e::fixtures::small_image;
use imprint_e2e::netlab::{self, Lab};
use imprint_e2e::{boot_dir, imprint_bin, run, sparse_disk, workspace_root, Firmware, VmBuilder};

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

#[test]
fn a_nuc_without_a_stick_netboots_with_secure_boot_and_installs_over_http() {
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

    let started = Instant::now();
    let mut vm = VmBuilder::new(d.join("nuc"), Firmware::SecureBoot)
        .http_boot_nic(&tap, MAC)
        .netns(&lab.lan())
        .nvme(&nvme, "NUC-NVME-0001")
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    vm.wait_for("IMPRINT-DONE", Duration::from_secs(540))
        .unwrap();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    let secs = started.elapsed().as_secs();
    let log = vm.log();
    eprintln!("netboot to power-off: {secs} s");
    assert!(status.success(), "powered off by the appliance: {status}");

    // The boot chain came over HTTP, Secure Boot on.
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
    assert!(log.contains("secureboot: Secure boot enabled"), "{log}");
    let proxy = lab.log("proxy.log");
    assert!(
        proxy.contains("HTTPClient") && proxy.contains("bootx64.efi"),
        "the proxy-DHCP answered the HTTP boot client:\n{proxy}"
    );
    // The appliance's own lease from the router, and everything from the server.
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

    // The disk holds the image, and the seed its hostname.
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

    // The report is on the server, under the machine's MAC.
    let dir = tree.join("reports/52-54-00-12-34-56");
    let reports: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reports[0]).unwrap()).unwrap();
    assert_eq!(r["status"], "installed");
    assert_eq!(r["selection"]["chosen"], "nvme0n1");
    assert_eq!(r["write"]["verified"], true);
    assert_eq!(r["seed"]["summary"]["hostname"], "nuc-net-01");
    assert!(log.contains(&format!(
        "imprint: report sent to http://10.88.0.2:8080/reports/52-54-00-12-34-56/{}",
        reports[0].file_name().unwrap().to_string_lossy()
    )));
}
