//! `imprint netboot serve` through the real binary, as root, in a network namespace of its own:
//! a veth pair (server end `sv0` 10.77.0.1/24, client end `cl0` 10.77.0.2/24), serve on `sv0`
//! with the real dnsmasq as its child, and curl (inside the namespace) as the machines.
//! Needs root, dnsmasq-base and curl (scripts/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{fake_boot, make_image};

const ADDR: &str = "10.77.0.1";
const PORT: u16 = 8088;
const MAC: &str = "52-54-00-aa-bb-01";

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A network namespace with a veth pair, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the serve tests need root (run scripts/test as root, as CI does)"
        );
        let n = Netns(format!("imps{tag}{}", std::process::id() % 100_000));
        let _ = Command::new("ip").args(["netns", "del", &n.0]).status();
        let ip = |args: &[&str]| ok(Command::new("ip").args(args).output().unwrap());
        ip(&["netns", "add", &n.0]);
        ip(&["-n", &n.0, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &n.0, "link", "add", "sv0", "type", "veth", "peer", "name", "cl0",
        ]);
        ip(&[
            "-n",
            &n.0,
            "addr",
            "add",
            &format!("{ADDR}/24"),
            "dev",
            "sv0",
        ]);
        ip(&["-n", &n.0, "addr", "add", "10.77.0.2/24", "dev", "cl0"]);
        ip(&["-n", &n.0, "link", "set", "sv0", "up"]);
        ip(&["-n", &n.0, "link", "set", "cl0", "up"]);
        n
    }

    /// `curl` inside the namespace: (HTTP status, body).
    fn curl(&self, args: &[&str]) -> (u16, Vec<u8>) {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.0,
                "curl",
                "-sS",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
            ])
            .args(args)
            .output()
            .expect("curl (scripts/deps)");
        assert!(
            o.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = o.stdout;
        let nl = out.iter().rposition(|&b| b == b'\n').unwrap();
        let code = std::str::from_utf8(&out[nl + 1..])
            .unwrap()
            .parse()
            .unwrap();
        (code, out[..nl].to_vec())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// serve's standard output, line by line, read on a thread.
struct Lines(mpsc::Receiver<String>, Vec<String>);

impl Lines {
    fn new(out: ChildStdout) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Lines(rx, Vec::new())
    }

    /// Waits (at most 20 s) for a line containing every one of `want`.
    fn wait_for(&mut self, want: &[&str]) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self.1.iter().find(|l| want.iter().all(|w| l.contains(w))) {
                return l.clone();
            }
            let left = Duration::from_secs(20).saturating_sub(t.elapsed());
            match self.0.recv_timeout(left) {
                Ok(l) => self.1.push(l),
                Err(_) => panic!(
                    "no line with {want:?} in serve's output:\n{}",
                    self.1.join("\n")
                ),
            }
        }
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) {
            // pid (comm) state ppid …; comm may hold spaces, so split after the last ')'.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let ppid: u32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
            if ppid == pid {
                out.push(p);
            }
        }
    }
    out
}

/// The whole life of `serve` on a veth: dnsmasq runs as its child, Range GETs are exact, PUTs
/// land only as reports, events show up as lines, and SIGTERM leaves nothing running.
#[test]
fn serve_runs_dnsmasq_serves_ranges_takes_reports_and_stops_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let image = make_image(d);
    let boot = fake_boot(d);
    let seed = d.join("seed");
    fs::create_dir_all(&seed).unwrap();
    fs::write(seed.join("user-data"), "#cloud-config\n").unwrap();
    let ns = Netns::new("a");
    let reports = d.join("reports");
    let tree = d.join("tree");
    let mut child: Child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_imprint"))
        .args(["netboot", "serve", "--image"])
        .arg(&image)
        .arg("--seed")
        .arg(&seed)
        .arg("--boot")
        .arg(&boot)
        .args([
            "--interface",
            "sv0",
            "--port",
            &PORT.to_string(),
            "--reports",
        ])
        .arg(&reports)
        .arg("--dir")
        .arg(&tree)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `ip netns exec` execs the command: this pid is serve's.
    let serve_pid = child.id();
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let mut err = child.stderr.take().unwrap();
    let (etx, erx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0
                || etx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut stderr = String::new();
    let t0 = Instant::now();
    while !stderr.contains("answers proxy-DHCP on sv0") {
        if let Ok(s) = erx.recv_timeout(Duration::from_millis(200)) {
            stderr.push_str(&s);
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "serve exited: {stderr}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "serve not up: {stderr}"
        );
    }
    assert!(
        stderr.contains(&format!("at http://{ADDR}:{PORT}/")),
        "{stderr}"
    );

    // dnsmasq is serve's child, with the rendered config, on sv0.
    let kids = children_of(serve_pid);
    assert_eq!(kids.len(), 1, "one child: {kids:?}");
    let dnsmasq = kids[0];
    assert_eq!(
        fs::read_to_string(format!("/proc/{dnsmasq}/comm"))
            .unwrap()
            .trim(),
        "dnsmasq"
    );
    let cmdline = fs::read_to_string(format!("/proc/{dnsmasq}/cmdline")).unwrap();
    assert!(cmdline.contains(&format!(
        "--conf-file={}",
        tree.join("dnsmasq.conf").display()
    )));
    assert!(cmdline.contains("--interface=sv0"), "{cmdline}");
    assert!(
        stderr.contains(&format!("dnsmasq (pid {dnsmasq})")),
        "{stderr}"
    );
    let conf = fs::read_to_string(tree.join("dnsmasq.conf")).unwrap();
    assert!(
        conf.contains("dhcp-range=10.77.0.0,proxy,255.255.255.0"),
        "{conf}"
    );
    assert!(conf.contains(&format!(
        "dhcp-boot=tag:efihttp,http://{ADDR}:{PORT}/bootx64.efi"
    )));

    // GET with Range: 206 and exactly those bytes.
    let img = fs::read(&image).unwrap();
    let url = |p: &str| format!("http://{ADDR}:{PORT}/{p}");
    let (code, body) = ns.curl(&["-r", "1000-5095", &url("image.img.zst")]);
    assert_eq!(code, 206);
    assert_eq!(body, &img[1000..5096]);
    // Header names in title case, as nginx sends them (UEFI HTTP clients parse them).
    let (code, head) = ns.curl(&["-I", &url("grubx64.efi")]);
    assert_eq!(code, 200);
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.contains("\r\nContent-Length: ") && head.contains("\r\nAccept-Ranges: bytes"),
        "{head}"
    );
    // A missing file: 404 with a body, as nginx answers (shim asks for revocations_sku.efi
    // first and OVMF's HTTP stack never completes an answer with Content-Length 0).
    let (code, body) = ns.curl(&[&url("revocations_sku.efi")]);
    assert_eq!((code, body.as_slice()), (404, &b"404 Not Found\n"[..]));
    let (code, body) = ns.curl(&[&url("grub/grub.cfg")]);
    assert_eq!(code, 200);
    assert!(String::from_utf8(body)
        .unwrap()
        .contains(&format!("imprint.url=http://{ADDR}:{PORT} ")));

    // A PUT under reports/ lands byte for byte in --reports (and is served back).
    let report = d.join("r.json");
    fs::write(
        &report,
        "{\"status\": \"installed\", \"seed\": {\"summary\": {\"hostname\": \"nuc-07\"}}, \"pad\": \"\u{e9}\"}\n",
    )
    .unwrap();
    let put = |rel: &str, file: &Path| -> u16 {
        ns.curl(&["--path-as-is", "-T", file.to_str().unwrap(), &url(rel)])
            .0
    };
    assert_eq!(put(&format!("reports/{MAC}/20261201-1.json"), &report), 201);
    let landed = reports.join(MAC).join("20261201-1.json");
    assert_eq!(fs::read(&landed).unwrap(), fs::read(&report).unwrap());
    assert_eq!(put(&format!("reports/{MAC}/20261201-1.json"), &report), 204);
    let (code, body) = ns.curl(&[&url(&format!("reports/{MAC}/20261201-1.json"))]);
    assert_eq!((code, body), (200, fs::read(&report).unwrap()));
    lines.wait_for(&[MAC, "nuc-07", "report 20261201-1.json: installed"]);

    // PUT anywhere else, or a path that climbs out, is refused and changes nothing.
    let before = fs::read(tree.join("image.img.zst")).unwrap();
    assert_eq!(put("image.img.zst", &report), 405);
    assert_eq!(put("reports/../image.img.zst", &report), 403);
    assert_eq!(
        put(&format!("reports/{MAC}/..%2f..%2fimage.img.zst"), &report),
        403
    );
    assert_eq!(put(&format!("reports/{MAC}/%2e%2e/x.json"), &report), 403);
    assert_eq!(put(&format!("reports/{MAC}/x.txt"), &report), 403);
    assert_eq!(put("reports/not-a-mac/x.json", &report), 403);
    assert_eq!(fs::read(tree.join("image.img.zst")).unwrap(), before);
    let mut stored: Vec<String> = walk(&reports);
    stored.sort();
    assert_eq!(stored, vec![format!("{MAC}/20261201-1.json")]);
    // Too big: refused, nothing stored.
    let big = d.join("big.json");
    fs::write(&big, vec![b' '; 2 << 20]).unwrap();
    assert_eq!(put(&format!("reports/{MAC}/big.json"), &big), 413);
    assert!(!reports.join(MAC).join("big.json").exists());

    // Progress events, as an appliance sends them, become lines.
    let ev = d.join("progress.json");
    fs::write(
        &ev,
        format!(
            "{{\"machine\":\"{MAC}\",\"install_id\":\"20261201-1\",\"hostname\":\"nuc-07\",\"phase\":\"writing\",\
             \"bytes_done\":1048576,\"bytes_total\":4194304,\"rate\":524288.0,\"elapsed_secs\":3.0,\
             \"result\":null,\"error\":null,\"seq\":4}}\n"
        ),
    )
    .unwrap();
    assert_eq!(put(&format!("reports/{MAC}/progress.json"), &ev), 201);
    let l = lines.wait_for(&[MAC, "nuc-07", "writing", "1.0 MiB/4.0 MiB", "512.0 KiB/s"]);
    assert!(!l.contains("installed"), "{l}");
    fs::write(
        &ev,
        format!(
            "{{\"machine\":\"{MAC}\",\"install_id\":\"20261201-1\",\"hostname\":\"nuc-07\",\"phase\":\"done\",\
             \"bytes_done\":0,\"bytes_total\":0,\"rate\":0.0,\"elapsed_secs\":9.0,\
             \"result\":\"installed\",\"error\":null,\"seq\":9}}\n"
        ),
    )
    .unwrap();
    assert_eq!(put(&format!("reports/{MAC}/progress.json"), &ev), 204);
    lines.wait_for(&[MAC, "nuc-07", "done", "installed"]);

    // SIGTERM: serve stops dnsmasq and exits; nothing of it is left.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "serve did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    while let Ok(s) = erx.recv_timeout(Duration::from_millis(500)) {
        stderr.push_str(&s);
    }
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains(&format!("stopped; dnsmasq (pid {dnsmasq}) ended")),
        "{stderr}"
    );

    // The access log on standard error: every request but the accepted PUTs, with the client,
    // the Range asked for, the status and the length sent.
    let access: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("imprint: 10.77.0."))
        .collect();
    for want in [
        " GET /image.img.zst (bytes=1000-5095) -> 206, 4.0 KiB".to_string(),
        " HEAD /grubx64.efi -> 200, ".to_string(),
        " GET /grub/grub.cfg -> 200, ".to_string(),
        " GET /revocations_sku.efi -> 404, ".to_string(),
        format!(" GET /reports/{MAC}/20261201-1.json -> 200, "),
        " PUT /image.img.zst -> 405".to_string(),
        " PUT /reports/../image.img.zst -> 403".to_string(),
        format!(" PUT /reports/{MAC}/x.txt -> 403"),
        format!(" PUT /reports/{MAC}/big.json -> 413"),
    ] {
        assert!(
            access.iter().any(|l| l.contains(&want)),
            "{want:?} in the access log:\n{}",
            access.join("\n")
        );
    }
    // The accepted PUTs show as the report and events they carried, not as requests.
    assert_eq!(
        access
            .iter()
            .filter(|l| l.contains(" PUT ") && (l.contains("-> 201") || l.contains("-> 204")))
            .count(),
        0,
        "{}",
        access.join("\n")
    );
    assert!(
        !Path::new(&format!("/proc/{dnsmasq}")).exists(),
        "dnsmasq {dnsmasq} still runs"
    );
    assert!(children_of(serve_pid).is_empty());
}

/// `serve` refuses a missing interface and one without IPv4 (a veth end without an address;
/// this kernel has no dummy interfaces), naming it, before anything runs.
#[test]
fn serve_names_a_bad_interface() {
    let ns = Netns::new("b");
    ok(Command::new("ip")
        .args([
            "-n", &ns.0, "link", "add", "dm0", "type", "veth", "peer", "name", "dm1",
        ])
        .output()
        .unwrap());
    let t = tempfile::tempdir().unwrap();
    for (iface, why) in [
        ("nope0", "--interface nope0: no such network interface"),
        ("dm0", "--interface dm0: it has no IPv4 address"),
    ] {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(env!("CARGO_BIN_EXE_imprint"))
            .args(["netboot", "serve", "--image", "x", "--seed"])
            .arg(t.path())
            .args(["--interface", iface])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(why), "{e}");
    }
    assert_eq!(
        fs::read_dir(t.path()).unwrap().count(),
        0,
        "nothing rendered"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            for f in walk(&p) {
                out.push(format!("{}/{f}", e.file_name().to_string_lossy()));
            }
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}
