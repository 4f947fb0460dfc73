//! Network mode (`imprint.url=URL` on the kernel command line, put there by the grub.cfg of
//! `imprint netboot render`): the machine booted from the network, not from a stick.
//!
//! [`Network::start`] picks the NIC (the one GRUB booted from, `imprint.mac=`, else the first
//! Ethernet with a link), brings it up, gets a lease from its own DHCP client ([`dhcp`]; the
//! kernel has no `CONFIG_IP_PNP`), sets address and default route ([`iface`]; no `ip` in the
//! initramfs), and fetches `config.json` and `seed/*` from URL into a local folder laid out like
//! the stick's ESP, so the install flow reads them as it reads a stick. The image streams from
//! `URL/image.img.zst` through the core's resumable reader; reports are `PUT` to
//! `URL/reports/<machine>/<install-id>.json`, and a successful install's report also to
//! `URL/reports/<machine>/installed.json`: fetched at the next netboot into the local reports
//! folder, it lets the flow's "already installed" check (report + the disk's own GPT) boot the
//! disk instead of reinstalling, as a stick's reports do. A tree rendered with `--s3` (an S3
//! bucket) carries presigned `PUT` URLs per machine instead ([`presigned`]).
//! While the install runs, progress events go to
//! `URL/reports/<machine>/progress.json` ([`events`]).

pub mod dhcp;
pub mod events;
pub mod iface;
pub mod presigned;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use imprint_core::manifest::Image;
use imprint_core::remote::{self, Remote, RemoteError, RemoteOptions};
use imprint_core::report::{Report, Status};
use imprint_core::seed::{META_DATA, NETWORK_CONFIG, USER_DATA};
use imprint_core::stick::{CONFIG_PATH, REPORTS_DIR, SEED_DIR};

use crate::boot::BootEnv;
use crate::console::Consoles;

/// The kernel command-line parameter naming the server's base URL.
pub const URL_PARAM: &str = "imprint.url";
/// The NIC the firmware booted from (GRUB's `$net_default_mac`).
pub const MAC_PARAM: &str = "imprint.mac";
/// The image's name under the base URL (`imprint netboot render` writes it).
pub const IMAGE_NAME: &str = "image.img.zst";
/// The name of a machine's last successful install report on the server.
pub const INSTALLED_REPORT: &str = "installed.json";
/// Where the fetched config and seed are kept, laid out like the stick's ESP.
const LOCAL: &str = "/run/imprint/net";
/// How long NICs may take to appear after their drivers loaded. Generous: on a loaded host
/// (three TCG NUCs on two shared cores) virtio_net bound more than 15 s after the device set
/// stopped being waited for; a NIC that never appears costs this once, before any write.
const NIC_WAIT: Duration = Duration::from_secs(60);
/// How long a link may take to come up.
const CARRIER_WAIT: Duration = Duration::from_secs(15);
/// How long DHCP may take.
const DHCP_WAIT: Duration = Duration::from_secs(60);
/// Config and seed files are small; a larger answer is refused.
const SMALL_FILE_MAX: u64 = 1 << 20;

/// The network source of an install: the server and the local copies of its config and seed.
#[derive(Debug, Clone)]
pub struct Network {
    base: String,
    mac: [u8; 6],
    local: PathBuf,
    uploads: presigned::Targets,
    events: events::Events,
}

impl Network {
    /// Brings the network up and fetches config and seed from `base`.
    pub fn start(env: &BootEnv, consoles: &mut Consoles, base: &str) -> Result<Network> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!(
                "{URL_PARAM}={}: only http:// URLs are supported in network mode",
                remote::redact_url(&base)
            );
        }
        let want = env.cmdline.get(MAC_PARAM).filter(|m| !m.is_empty());
        let want_mac = match want {
            Some(m) => Some(
                iface::parse_mac(m).ok_or_else(|| anyhow!("{MAC_PARAM}={m}: not a MAC address"))?,
            ),
            None => None,
        };
        let (name, mac) = pick_nic(env, consoles, want_mac)?;
        iface::up(&name).with_context(|| format!("bringing up {name}"))?;
        if !iface::wait_carrier(&env.roots.sys, &name, CARRIER_WAIT) {
            bail!(
                "{name}: no link after {} s: is the cable plugged in?",
                CARRIER_WAIT.as_secs()
            );
        }
        consoles.line(&format!(
            "imprint: network: {name} ({}) is up; asking DHCP",
            mac_text(&mac, ':')
        ));
        let lease = dhcp::lease(&name, mac, DHCP_WAIT)?;
        iface::configure(&name, &lease).with_context(|| format!("configuring {name}"))?;
        consoles.line(&format!(
            "imprint: network: {name} {}/{} router {} from DHCP server {} (lease {} s)",
            lease.address,
            lease.prefix,
            lease
                .router
                .map_or_else(|| "none".to_string(), |r| r.to_string()),
            lease.server,
            lease.lease_secs
        ));
        // Hold the lease for the rest of the boot (an install can outlast it).
        let notes = std::sync::Mutex::new(consoles.handle());
        let kept = dhcp::keep(name.clone(), mac, lease, iface::configure, move |k| {
            let line = match k {
                dhcp::Kept::Renewed(l) => format!(
                    "imprint: network: DHCP lease on {} renewed ({} s)",
                    l.address, l.lease_secs
                ),
                dhcp::Kept::Replaced(l) => format!(
                    "imprint: network: the DHCP lease was lost; now {}/{} (downloads resume)",
                    l.address, l.prefix
                ),
                dhcp::Kept::Trouble(e) => format!("imprint: network: renewing the DHCP lease: {e}"),
            };
            if let Ok(mut c) = notes.lock() {
                c.line(&line);
            }
        });
        if let Err(e) = kept {
            consoles.line(&format!(
                "imprint: network: cannot keep the DHCP lease ({e}); it may run out during a long install"
            ));
        }
        let mut net = Network {
            base,
            mac,
            local: PathBuf::from(LOCAL),
            uploads: presigned::Targets::Direct,
            events: events::Events::off(),
        };
        // Events go through the same PUT (and path mapping) as the reports, bounded, once.
        let sink = net.clone();
        net.events = events::Events::start(
            &mac_text(&mac, '-'),
            Box::new(move |rel, body| sink.put_with(rel, body, events::PUT_TIMEOUT, 1).map(|_| ())),
        );
        net.events.phase(events::EventPhase::Config);
        net.fetch_config_and_seed(consoles)?;
        net.uploads = presigned::Targets::load(|rel| net.fetch(rel), &net.machine(), consoles)?;
        Ok(net)
    }

    /// The local folder laid out like the stick's ESP (`imprint/config.json`, `imprint/seed/`).
    pub fn path(&self) -> &Path {
        &self.local
    }

    /// This run's progress events.
    pub fn events(&self) -> &events::Events {
        &self.events
    }

    /// The server's base URL, as it may be shown.
    pub fn shown(&self) -> String {
        remote::redact_url(&self.base)
    }

    fn options() -> RemoteOptions {
        RemoteOptions {
            on_notice: Some(Arc::new(|msg: &str| eprintln!("imprint: {msg}"))),
            ..RemoteOptions::default()
        }
    }

    /// Fetches `rel` under the base URL; `Ok(None)` for a 404.
    fn fetch(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let url = format!("{}/{rel}", self.base);
        let r = Arc::new(Remote::new(&url, Self::options())?);
        let mut out = Vec::new();
        let mut limited = std::io::Write::by_ref(&mut out);
        match std::io::copy(
            &mut std::io::Read::take(r.reader(0, None), SMALL_FILE_MAX + 1),
            &mut limited,
        ) {
            Ok(n) if n > SMALL_FILE_MAX => bail!(
                "{}: larger than {SMALL_FILE_MAX} bytes; not a config or seed file",
                r.shown_url()
            ),
            Ok(_) => Ok(Some(out)),
            Err(e) => match RemoteError::from_io(&e) {
                Some(RemoteError::Status { status: 404, .. }) => Ok(None),
                _ => Err(e).with_context(|| format!("fetching {}", r.shown_url())),
            },
        }
    }

    fn fetch_config_and_seed(&self, consoles: &mut Consoles) -> Result<()> {
        let seed_dir = self.local.join(SEED_DIR);
        std::fs::create_dir_all(&seed_dir)
            .with_context(|| format!("creating {}", seed_dir.display()))?;
        match self.fetch("config.json")? {
            Some(c) => write_new(&self.local.join(CONFIG_PATH), &c)?,
            None => consoles.line(&format!(
                "imprint: {}/config.json: not found (404)",
                self.shown()
            )),
        }
        let mut got = Vec::new();
        for name in [USER_DATA, META_DATA, NETWORK_CONFIG] {
            if let Some(data) = self.fetch(&format!("seed/{name}"))? {
                write_new(&seed_dir.join(name), &data)?;
                got.push(name);
            }
        }
        // The last install on this machine, for the "already installed" check; a bad one is
        // skipped by that check (and said so), never fatal.
        let installed = format!("reports/{}/{INSTALLED_REPORT}", mac_text(&self.mac, '-'));
        if let Some(data) = self.fetch(&installed)? {
            let dir = self.local.join(REPORTS_DIR);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            write_new(&dir.join(INSTALLED_REPORT), &data)?;
            consoles.line(&format!(
                "imprint: this machine's last install: {installed}"
            ));
        }
        consoles.line(&format!(
            "imprint: from {}: config.json, seed: {}",
            self.shown(),
            if got.is_empty() {
                "none".to_string()
            } else {
                got.join(", ")
            }
        ));
        Ok(())
    }

    /// The image, streamed from the server through the resumable reader.
    pub fn image(&self) -> Result<Image> {
        let url = format!("{}/{IMAGE_NAME}", self.base);
        Image::open_url(&url, Self::options())
            .with_context(|| format!("opening the image {}", remote::redact_url(&url)))
    }

    /// This machine's folder name under `reports/` (the booting NIC's MAC, `aa-bb-…`).
    fn machine(&self) -> String {
        mac_text(&self.mac, '-')
    }

    /// `reports/<machine>/<install-id>.json` for `rep`: the machine is the booting NIC's MAC.
    pub fn report_path(&self, rep: &Report) -> String {
        format!(
            "reports/{}/{}.json",
            mac_text(&self.mac, '-'),
            rep.install_id
        )
    }

    /// PUTs the report to the server (a successful install's also as `installed.json`);
    /// returns the URL it went to (as it may be shown).
    pub fn put_report(&self, rep: &Report) -> Result<String> {
        let mut body = serde_json::to_vec_pretty(rep).context("serializing the report")?;
        body.push(b'\n');
        let shown = self.put(&self.report_path(rep), &body)?;
        if rep.status == Status::Installed {
            let rel = format!("reports/{}/{INSTALLED_REPORT}", mac_text(&self.mac, '-'));
            self.put(&rel, &body)?;
        }
        Ok(shown)
    }

    /// PUTs `body` to `rel` under the base URL (or through its presigned URL), retrying
    /// server errors.
    fn put(&self, rel: &str, body: &[u8]) -> Result<String> {
        self.put_with(rel, body, Duration::from_secs(30), 4)
    }

    /// PUTs `body` to `rel` under the base URL: `attempts` tries (server errors and transport
    /// errors are retried), each bounded by `timeout`.
    fn put_with(&self, rel: &str, body: &[u8], timeout: Duration, attempts: u32) -> Result<String> {
        let url = self.uploads.url(&self.base, rel, &self.machine())?;
        let shown = remote::redact_url(&url);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .user_agent(concat!("imprint/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1 << attempt));
            }
            match agent
                .put(&url)
                .header("Content-Type", "application/json")
                .send(body)
            {
                Ok(r) if r.status().is_success() => return Ok(shown),
                Ok(r) if r.status().is_server_error() => {
                    last = format!("HTTP {}", r.status().as_u16());
                }
                Ok(r) => bail!(
                    "{shown}: the server answered HTTP {} to the report PUT ({})",
                    r.status().as_u16(),
                    match self.uploads {
                        presigned::Targets::Presigned(ref up) => format!(
                            "a presigned URL, valid until {}: expired, or the clock is off?",
                            up.expires
                        ),
                        _ => "does it allow PUT under reports/?".to_string(),
                    }
                ),
                Err(e) => last = e.to_string(),
            }
        }
        bail!("{shown}: could not PUT the report: {last}")
    }
}

fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// `aa:bb:…` (or with `-`).
pub fn mac_text(mac: &[u8; 6], sep: char) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(&sep.to_string())
}

/// The NIC to use: the one with `want` as MAC, else the first Ethernet whose link comes up.
fn pick_nic(
    env: &BootEnv,
    consoles: &mut Consoles,
    want: Option<[u8; 6]>,
) -> Result<(String, [u8; 6])> {
    let t = std::time::Instant::now();
    loop {
        let nics = iface::ethernets(&env.roots.sys);
        if let Some(w) = want {
            if let Some(n) = nics.iter().find(|(_, m)| *m == w) {
                return Ok(n.clone());
            }
        } else if !nics.is_empty() {
            // Bring them all up; take the first with a link.
            for (name, _) in &nics {
                let _ = iface::up(name);
            }
            for (name, mac) in &nics {
                if iface::wait_carrier(&env.roots.sys, name, Duration::from_secs(3)) {
                    return Ok((name.clone(), *mac));
                }
            }
        }
        if t.elapsed() >= NIC_WAIT {
            let seen: Vec<String> = nics
                .iter()
                .map(|(n, m)| format!("{n} ({})", mac_text(m, ':')))
                .collect();
            let seen = if seen.is_empty() {
                "none (no driver for this NIC in the live image?)".to_string()
            } else {
                seen.join(", ")
            };
            return Err(match want {
                Some(w) => anyhow!(
                    "no network interface with MAC {} ({MAC_PARAM}); interfaces: {seen}",
                    mac_text(&w, ':')
                ),
                None => anyhow!("no network interface with a link; interfaces: {seen}"),
            });
        }
        if want.is_some() || nics.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        } else {
            consoles.line("imprint: network: waiting for a link");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};

    /// A real nginx serving `root` on a loopback port, PUT allowed under /reports/ (as
    /// docs/netboot.md configures it); stopped on drop.
    struct Nginx {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Nginx {
        fn start(root: &Path) -> Nginx {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display();
            let conf = dir.path().join("nginx.conf");
            std::fs::write(
                &conf,
                format!(
                    "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                     error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
                     http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/t;\n\
                     proxy_temp_path {d}/t;\n  fastcgi_temp_path {d}/t;\n  uwsgi_temp_path {d}/t;\n\
                     scgi_temp_path {d}/t;\n  server {{ listen 127.0.0.1:{port}; root {};\n\
                     location /reports/ {{ dav_methods PUT; create_full_put_path on; }} }}\n}}\n",
                    root.display()
                ),
            )
            .unwrap();
            let child = Command::new("nginx")
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx (scripts/deps: nginx-light)");
            let t = std::time::Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(t.elapsed() < Duration::from_secs(10), "nginx not listening");
                std::thread::sleep(Duration::from_millis(50));
            }
            Nginx {
                child,
                port,
                _dir: dir,
            }
        }
    }

    impl Drop for Nginx {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn network(base: String, local: &Path) -> Network {
        Network {
            base,
            mac: [0x52, 0x54, 0, 0xab, 0xcd, 0x01],
            local: local.to_path_buf(),
            uploads: presigned::Targets::Direct,
            events: events::Events::off(),
        }
    }

    /// What a server holds for the tests: `config.json` (power off after), `seed/user-data`
    /// (no meta-data or network-config) and a 1 MiB image named "test-os".
    pub(super) fn server_tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("seed")).unwrap();
        std::fs::write(dir.join("config.json"), "{\"after\": \"poweroff\"}\n").unwrap();
        std::fs::write(dir.join("seed/user-data"), "#cloud-config\n").unwrap();
        let mut raw = vec![7u8; 1 << 20];
        raw[510] = 0x55;
        raw[511] = 0xAA;
        imprint_core::manifest::pack(
            &mut &raw[..],
            &dir.join(IMAGE_NAME),
            &imprint_core::manifest::PackOptions {
                name: "test-os".into(),
                level: 1,
                threads: 0,
                chunk_size: 1 << 20,
                frame_size: Some(1 << 20),
            },
            &mut |_| {},
        )
        .unwrap();
    }

    /// Config, seed and image come from the server, a missing seed file is no error, and the
    /// report lands at reports/<mac>/<install-id>.json through nginx's WebDAV PUT.
    #[test]
    fn files_image_and_report_through_a_real_nginx() {
        let t = tempfile::tempdir().unwrap();
        let www = t.path().join("www");
        server_tree(&www);
        std::fs::create_dir_all(www.join("reports")).unwrap();
        let nginx = Nginx::start(&www);
        let net = network(
            format!("http://127.0.0.1:{}/", nginx.port),
            &t.path().join("local"),
        );
        let net = Network {
            base: net.base.trim_end_matches('/').to_string(),
            ..net
        };

        assert_eq!(
            net.fetch("config.json").unwrap().unwrap(),
            b"{\"after\": \"poweroff\"}\n"
        );
        assert_eq!(net.fetch("seed/meta-data").unwrap(), None, "404 is absent");
        let image = net.image().unwrap();
        assert_eq!(image.manifest().name, "test-os");
        assert_eq!(image.manifest().raw_size, 1 << 20);

        let rep = Report::new("20261201-054900-abcd");
        assert_eq!(
            net.report_path(&rep),
            "reports/52-54-00-ab-cd-01/20261201-054900-abcd.json"
        );
        let url = net.put_report(&rep).unwrap();
        assert!(url.ends_with("/reports/52-54-00-ab-cd-01/20261201-054900-abcd.json"));
        assert!(
            !www.join("reports/52-54-00-ab-cd-01/installed.json")
                .exists(),
            "only a successful install is the machine's installed.json"
        );
        let mut done = Report::new("20261201-055000-beef");
        done.status = Status::Installed;
        net.put_report(&done).unwrap();
        assert_eq!(
            std::fs::read(www.join("reports/52-54-00-ab-cd-01/installed.json")).unwrap(),
            std::fs::read(www.join("reports/52-54-00-ab-cd-01/20261201-055000-beef.json")).unwrap()
        );
        // The next netboot of this machine finds it.
        assert_eq!(
            net.fetch("reports/52-54-00-ab-cd-01/installed.json")
                .unwrap()
                .map(|b| b.len()),
            Some(
                std::fs::metadata(www.join("reports/52-54-00-ab-cd-01/installed.json"))
                    .unwrap()
                    .len() as usize
            )
        );
        let stored: serde_json::Value = serde_json::from_slice(
            &std::fs::read(www.join("reports/52-54-00-ab-cd-01/20261201-054900-abcd.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(stored["install_id"], "20261201-054900-abcd");

        // A server that refuses PUT says so, naming the URL.
        let bad = Network {
            base: format!("{}/nowhere", net.base),
            ..network(String::new(), t.path())
        };
        let e = format!("{:#}", bad.put_report(&rep).unwrap_err());
        assert!(e.contains("HTTP 405") && e.contains("allow PUT"), "{e}");
        // A missing image is an error naming its URL, not a panic or a hang.
        let e = format!("{:#}", bad.image().unwrap_err());
        assert!(
            e.contains("/nowhere/image.img.zst") && e.contains("404"),
            "{e}"
        );
    }
}
