//! A provisioning network on one host, as root, with nothing leaving the machine: three network
//! namespaces joined by a bridge —
//!
//! ```text
//!  PREFIX-rtr  rtr0 10.88.0.1/24   the "home router": dnsmasq hands out 10.88.0.100-150
//!  PREFIX-srv  srv0 10.88.0.2/24   the imprint server: nginx (the rendered tree, PUT under
//!                                  reports/) and the rendered proxy-DHCP dnsmasq.conf, or
//!                                  `imprint netboot serve --interface srv0`
//!  PREFIX-lan  br0 + rtrp + srvp + tap0, tap1, …   the LAN; qemu runs here on a tap
//! ```
//!
//! Everything is torn down on drop (processes killed, namespaces deleted, which removes their
//! links). Logs stay in the lab's folder for the test to read.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{run, E2eError};

/// The server's address in the lab.
pub const SERVER: &str = "10.88.0.2";
/// nginx's port.
pub const PORT: u16 = 8080;
/// The router's address.
pub const ROUTER: &str = "10.88.0.1";

/// The running lab.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    children: Vec<Child>,
    taps: usize,
}

fn ip(args: &[&str]) -> Result<String, E2eError> {
    run(Command::new("ip").args(args))
}

impl Lab {
    /// Builds the namespaces, bridge and links, and starts the router's dnsmasq. `dir` holds
    /// the logs; namespace names start with `prefix` (keep it short: link names are not
    /// prefixed, namespaces are).
    pub fn new(prefix: &str, dir: &Path) -> Result<Lab, E2eError> {
        fs::create_dir_all(dir).map_err(|source| E2eError::Io {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut lab = Lab {
            prefix: prefix.to_string(),
            dir: dir.to_path_buf(),
            children: Vec::new(),
            taps: 0,
        };
        lab.teardown_namespaces();
        for n in ["lan", "rtr", "srv"] {
            let ns = lab.ns(n);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let lan = lab.ns("lan");
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan, "link", "set", "br0", "up"])?;
        for (n, addr) in [("rtr", ROUTER), ("srv", SERVER)] {
            let ns = lab.ns(n);
            let (inner, port) = (format!("{n}0"), format!("{n}p"));
            ip(&[
                "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &lan,
            ])?;
            ip(&["-n", &lan, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        }
        let d = lab.dir.clone();
        lab.spawn(
            "rtr",
            Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--port=0",
                    "--interface=rtr0",
                    "--bind-interfaces",
                    "--user=root",
                    "--pid-file=",
                    "--log-dhcp",
                    "--dhcp-range=10.88.0.100,10.88.0.150,255.255.255.0,1h",
                ])
                .arg(format!("--dhcp-option=option:router,{ROUTER}"))
                .arg(format!(
                    "--dhcp-leasefile={}",
                    d.join("router.leases").display()
                ))
                .arg(format!("--log-facility={}", d.join("router.log").display())),
        )?;
        Ok(lab)
    }

    /// The full name of namespace `short` (`lan`, `rtr`, `srv`).
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// The LAN namespace, where qemu runs.
    pub fn lan(&self) -> String {
        self.ns("lan")
    }

    fn spawn(&mut self, ns: &str, cmd: &mut Command) -> Result<(), E2eError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut full = Command::new("ip");
        full.args(["netns", "exec", &self.ns(ns)])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = full.spawn().map_err(|source| E2eError::Io {
            what: "starting",
            path: PathBuf::from(program),
            source,
        })?;
        self.children.push(child);
        Ok(())
    }

    /// Serves `tree` (a rendered netboot tree) with nginx at http://SERVER:PORT/ (WebDAV PUT
    /// under /reports/, as docs/netboot.md configures it) and runs its `dnsmasq.conf`.
    pub fn serve(&mut self, tree: &Path) -> Result<(), E2eError> {
        let d = self.dir.clone();
        let conf = d.join("nginx.conf");
        let dd = d.display();
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dd}/nginx.pid;\n\
                 error_log {dd}/nginx-error.log;\nevents {{ worker_connections 64; }}\n\
                 http {{\n  access_log {dd}/access.log;\n  client_body_temp_path {dd}/t;\n\
                 proxy_temp_path {dd}/t;\n  fastcgi_temp_path {dd}/t;\n  uwsgi_temp_path {dd}/t;\n\
                 scgi_temp_path {dd}/t;\n  server {{ listen {SERVER}:{PORT}; root {};\n\
                 location /reports/ {{ dav_methods PUT; create_full_put_path on; }} }}\n}}\n",
                tree.display()
            ),
        )
        .map_err(|source| E2eError::Io {
            what: "writing",
            path: conf.clone(),
            source,
        })?;
        self.spawn(
            "srv",
            Command::new("nginx").arg("-c").arg(&conf).arg("-p").arg(&d),
        )?;
        self.spawn(
            "srv",
            Command::new("dnsmasq")
                .arg("--keep-in-foreground")
                .arg("--user=root")
                .arg("--pid-file=")
                .arg(format!(
                    "--conf-file={}",
                    tree.join("dnsmasq.conf").display()
                ))
                .arg(format!("--log-facility={}", d.join("proxy.log").display())),
        )?;
        // nginx is up when its port answers (from inside the server's namespace).
        let t = Instant::now();
        loop {
            let probe = Command::new("ip")
                .args(["netns", "exec", &self.ns("srv"), "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{SERVER}/{PORT}"))
                .stderr(Stdio::null())
                .status();
            if probe.is_ok_and(|s| s.success()) {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(E2eError::Missing(format!(
                    "nginx did not listen on {SERVER}:{PORT}; see {}",
                    d.join("nginx-error.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `cmd` in namespace `short` (`srv`, …) with its standard output and error in the
    /// lab's `NAME.out` and `NAME.err` (read them with [`Lab::log`]); killed on drop.
    /// Returns its pid (`ip netns exec` execs the command, so it is the command's).
    pub fn run_logged(&mut self, short: &str, name: &str, cmd: &Command) -> Result<u32, E2eError> {
        let file = |ext: &str| {
            let path = self.dir.join(format!("{name}.{ext}"));
            fs::File::create(&path).map_err(|source| E2eError::Io {
                what: "creating",
                path,
                source,
            })
        };
        let (out, err) = (file("out")?, file("err")?);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(short)])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| E2eError::Io {
                what: "starting",
                path: PathBuf::from(cmd.get_program()),
                source,
            })?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// A new tap device on the bridge; returns its name.
    pub fn tap(&mut self) -> Result<String, E2eError> {
        let name = format!("tap{}", self.taps);
        self.taps += 1;
        let lan = self.lan();
        ip(&["-n", &lan, "tuntap", "add", "dev", &name, "mode", "tap"])?;
        ip(&["-n", &lan, "link", "set", &name, "master", "br0", "up"])?;
        Ok(name)
    }

    /// A log of the lab (`access.log`, `proxy.log`, `router.log`, …), empty if absent.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn teardown_namespaces(&self) {
        for n in ["lan", "rtr", "srv"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.teardown_namespaces();
    }
}
