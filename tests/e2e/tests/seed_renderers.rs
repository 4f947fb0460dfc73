//! The seed's network-config through cloud-init's own renderers: the static address and the
//! default gateway imprint renders from a machines entry must come out of every renderer
//! cloud-init has — ENI (Debian's ifupdown), systemd-networkd, netplan, NetworkManager and
//! sysconfig — as that renderer's native gateway. (A `routes: to 0.0.0.0/0` form once came out
//! of the ENI renderer as `post-up route add … || true`, and Debian 12 has no `route`: the
//! machine booted without a default route.)
//!
//! Uses Debian's `cloud-init` package (bookworm, 22.4), downloaded with `apt-get download` and
//! unpacked into the test's temp dir, run by Debian's python3 with the libraries scripts/deps
//! installs. No VM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use imprint_core::config::Config;
use imprint_core::machine::MacAddr;
use imprint_core::seed::static_network_v2;
use imprint_e2e::run;

/// Unpacks Debian's cloud-init into `dir`; returns its python path.
fn cloud_init(dir: &Path) -> std::path::PathBuf {
    run(Command::new("apt-get")
        .args(["download", "cloud-init"])
        .current_dir(dir))
    .unwrap();
    let deb = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("apt-get download left a .deb");
    let root = dir.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)).unwrap();
    root.join("usr/lib/python3/dist-packages")
}

/// Every file cloud-init's `renderer` (for `distro`) writes for `network_config`, concatenated.
fn render(
    pythonpath: &Path,
    dir: &Path,
    network_config: &Path,
    distro: &str,
    renderer: &str,
) -> String {
    let out = dir.join(format!("out-{renderer}"));
    run(Command::new("/usr/bin/python3")
        .env("PYTHONPATH", pythonpath)
        .args(["-m", "cloudinit.cmd.devel.net_convert", "-k", "yaml", "-p"])
        .arg(network_config)
        .arg("-d")
        .arg(&out)
        .args(["-D", distro, "-O", renderer]))
    .unwrap();
    let mut text = String::new();
    let mut stack = vec![out];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else {
            text.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
    text
}

#[test]
fn every_cloud_init_renderer_yields_the_static_address_and_the_default_gateway() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let cfg = Config::from_json(
        r#"{"seed": {"machines": [{"mac": "52:54:00:12:34:56", "hostname": "nuc-01",
            "network": {"address": "10.0.2.50/24", "gateway": "10.0.2.2", "dns": ["10.0.2.3"]}}]}}"#,
    )
    .unwrap();
    let n = cfg.seed.machines[0].network.as_ref().unwrap();
    let nc = static_network_v2(n, MacAddr::from_str("52:54:00:12:34:56").unwrap());
    let path = d.join("network-config");
    std::fs::write(&path, serde_json::to_vec(&nc).unwrap()).unwrap();
    let py = cloud_init(d);

    let eni = render(&py, d, &path, "debian", "eni");
    assert!(eni.contains("address 10.0.2.50/24"), "{eni}");
    assert!(
        eni.contains("\n    gateway 10.0.2.2\n"),
        "ENI: ifupdown's own gateway line:\n{eni}"
    );
    assert!(
        !eni.contains("route add"),
        "ENI must not need the route command:\n{eni}"
    );
    let networkd = render(&py, d, &path, "debian", "networkd");
    assert!(networkd.contains("Address=10.0.2.50/24"), "{networkd}");
    assert!(networkd.contains("Gateway=10.0.2.2"), "{networkd}");
    let netplan = render(&py, d, &path, "ubuntu", "netplan");
    assert!(netplan.contains("10.0.2.50/24"), "{netplan}");
    assert!(netplan.contains("gateway4: 10.0.2.2"), "{netplan}");
    let nm = render(&py, d, &path, "debian", "network-manager");
    assert!(nm.contains("address1=10.0.2.50/24"), "{nm}");
    assert!(nm.contains("gateway=10.0.2.2"), "{nm}");
    let sysconfig = render(&py, d, &path, "centos", "sysconfig");
    assert!(sysconfig.contains("IPADDR=10.0.2.50"), "{sysconfig}");
    assert!(sysconfig.contains("GATEWAY=10.0.2.2"), "{sysconfig}");
}
