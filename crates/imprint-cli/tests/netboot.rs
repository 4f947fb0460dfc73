//! Integration tests for `imprint netboot render` through the real binary: the tree is served by
//! a real nginx (WebDAV PUT under reports/) and by a real caddy (docs/netboot.md's Caddyfile),
//! and every file is fetched back over HTTP with `Range`, byte for byte; the generated
//! dnsmasq.conf is checked by the real dnsmasq (`dnsmasq --test`). Needs Debian's `nginx-light`,
//! `caddy` and `dnsmasq-base` (scripts/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fake_boot, free_port, imprint, make_image, ok, stderr};

fn seed(dir: &Path) -> PathBuf {
    let s = dir.join("seed");
    fs::create_dir_all(&s).unwrap();
    fs::write(s.join("user-data"), "#cloud-config\nruncmd:\n  - echo hi\n").unwrap();
    fs::write(s.join("meta-data"), "instance-id: x\n").unwrap();
    s
}

/// A real web server (a child with its own config folder), killed on drop.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Runs `cmd` (whose config lives in `dir`) and waits until 127.0.0.1:`port` answers.
    fn run(mut cmd: Command, dir: tempfile::TempDir, port: u16, package: &str) -> Server {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{name}: {e}; is it installed? run scripts/deps (Debian package {package})")
            });
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "{name} exited");
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name} not listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, _dir: dir }
    }

    /// Real nginx serving `root` on 127.0.0.1:`port`, PUT allowed under /reports/.
    fn nginx(root: &Path, port: u16) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = dir.path().join("nginx.conf");
        fs::write(
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
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(dir.path());
        Server::run(cmd, dir, port, "nginx-light")
    }

    /// Real caddy serving `root` on `port` with the Caddyfile docs/netboot.md gives (its site
    /// block as printed there; the admin endpoint off so tests can run side by side).
    fn caddy(root: &Path, port: u16) -> Server {
        let doc = fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/netboot.md"
        ))
        .unwrap();
        let site = doc
            .split("```")
            .skip(1)
            .step_by(2) // the fenced blocks
            .find(|b| b.contains("file_server"))
            .expect("docs/netboot.md's Caddyfile");
        let site = site
            .replace(":8080 {", &format!(":{port} {{"))
            .replace("/srv/imprint", &root.display().to_string());
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("Caddyfile");
        fs::write(&conf, format!("{{\n\tadmin off\n}}\n{site}")).unwrap();
        let mut cmd = Command::new("caddy");
        cmd.args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&conf)
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"));
        Server::run(cmd, dir, port, "caddy")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 request; returns (status, headers, body).
fn http(port: u16, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, all[split + 4..].to_vec())
}

fn files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            files(root, &r, out);
        } else {
            out.push(r);
        }
    }
}

/// Every file of the tree `out` from the server on `port`: whole, and three ranges each, byte
/// for byte; and a missing file — what shim asks for first — answered 404 with a body (an empty
/// one hangs shim under OVMF).
fn serves_the_tree(out: &Path, port: u16) {
    let mut all = Vec::new();
    files(out, Path::new(""), &mut all);
    assert_eq!(all.len(), 13, "{all:?}");
    for rel in &all {
        let want = fs::read(out.join(rel)).unwrap();
        let path = format!("/{}", rel.display());
        let (st, _, body) = http(port, "GET", &path, "", b"");
        assert_eq!((st, body.len()), (200, want.len()), "{path}");
        assert!(body == want, "{path}: whole body differs");
        let n = want.len();
        for (a, b) in [(0, 0), (1, n / 2), (n / 3, n - 1)] {
            let (st, head, body) = http(
                port,
                "GET",
                &path,
                &format!("Range: bytes={a}-{b}\r\n"),
                b"",
            );
            assert_eq!(st, 206, "{path} {a}-{b}: {head}");
            assert!(
                head.contains(&format!("Content-Range: bytes {a}-{b}/{n}")),
                "{head}"
            );
            assert!(body == want[a..=b], "{path} {a}-{b}: bytes differ");
        }
    }
    let (st, head, body) = http(port, "GET", "/revocations_sku.efi", "", b"");
    assert_eq!(st, 404, "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap_or_else(|| panic!("a Content-Length: {head}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        length > 0 && length == body.len(),
        "a 404 with a body: {head}"
    );
}

/// A tree `render` made in `out` from these inputs.
struct Rendered {
    out: PathBuf,
    img: PathBuf,
    boot: PathBuf,
    seed: PathBuf,
    config: PathBuf,
    stderr: String,
}

/// `render` into a new tree to be served at 127.0.0.1:`port`.
fn render_tree(d: &Path, port: u16) -> Rendered {
    let img = make_image(d);
    let boot = fake_boot(d);
    let seed = seed(d);
    let config = d.join("fleet.json");
    fs::write(&config, "{\"after\": \"poweroff\"}\n").unwrap();
    let out = d.join("tree");
    let o = ok(imprint()
        .args(["netboot", "render", "--image"])
        .arg(&img)
        .arg("--seed")
        .arg(&seed)
        .arg("--config")
        .arg(&config)
        .arg("--boot")
        .arg(&boot)
        .args(["--url", &format!("http://127.0.0.1:{port}/"), "-o"])
        .arg(&out)
        .output()
        .unwrap());
    Rendered {
        out,
        img,
        boot,
        seed,
        config,
        stderr: stderr(&o),
    }
}

#[test]
fn rendered_tree_is_served_by_caddy_as_documented_byte_for_byte_with_ranges() {
    let t = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = render_tree(t.path(), port).out;
    let _caddy = Server::caddy(&out, port);
    serves_the_tree(&out, port);
}

#[test]
fn rendered_tree_is_served_by_nginx_byte_for_byte_with_ranges_and_accepts_report_puts() {
    let t = tempfile::tempdir().unwrap();
    let port = free_port();
    let Rendered {
        out,
        img,
        boot,
        seed,
        config,
        stderr: said,
    } = render_tree(t.path(), port);
    assert!(said.contains("bootx64.efi"), "{said}");

    // What lands where.
    let same = |rel: &str, src: &Path| {
        assert_eq!(
            fs::read(out.join(rel)).unwrap(),
            fs::read(src).unwrap(),
            "{rel}"
        );
    };
    same("bootx64.efi", &boot.join("EFI/BOOT/BOOTX64.EFI"));
    same("grubx64.efi", &boot.join("netboot/grubx64.efi"));
    same("tftp/bootx64.efi", &boot.join("EFI/BOOT/BOOTX64.EFI"));
    same("tftp/grubx64.efi", &boot.join("netboot/grubx64.efi"));
    same("vmlinuz", &boot.join("vmlinuz"));
    same("initrd.img", &boot.join("initrd.img"));
    same("config.json", &config);
    same("seed/user-data", &seed.join("user-data"));
    same("seed/meta-data", &seed.join("meta-data"));
    same("image.img.zst", &img);
    assert!(!out.join("seed/network-config").exists());
    assert_eq!(fs::read_dir(out.join("reports")).unwrap().count(), 0);
    let grub = fs::read_to_string(out.join("grub/grub.cfg")).unwrap();
    assert!(
        grub.contains(&format!(
            "linux (http,127.0.0.1:{port})/vmlinuz console=tty0 console=ttyS0,115200 panic=0 imprint.url=http://127.0.0.1:{port} imprint.mac=$net_default_mac"
        )),
        "{grub}"
    );
    assert_eq!(
        fs::read_to_string(out.join("tftp/grub/grub.cfg")).unwrap(),
        grub
    );
    let dns = fs::read_to_string(out.join("dnsmasq.conf")).unwrap();
    assert!(
        dns.contains("dhcp-range=127.0.0.0,proxy,255.255.255.0\n"),
        "{dns}"
    );
    assert!(
        dns.contains(&format!(
            "dhcp-boot=tag:efihttp,http://127.0.0.1:{port}/bootx64.efi\n"
        )),
        "{dns}"
    );
    assert!(
        dns.contains(&format!("tftp-root={}\n", out.join("tftp").display())),
        "{dns}"
    );

    // dnsmasq itself accepts the file.
    let check = Command::new("dnsmasq")
        .arg("--test")
        .arg("-C")
        .arg(out.join("dnsmasq.conf"))
        .output()
        .expect("dnsmasq is not installed: run scripts/deps (Debian package dnsmasq-base)");
    assert!(check.status.success(), "dnsmasq --test: {}", stderr(&check));
    assert!(
        stderr(&check).contains("syntax check OK"),
        "{}",
        stderr(&check)
    );

    // Every file over HTTP: whole, and three ranges each; a 404 with a body.
    let _nginx = Server::nginx(&out, port);
    serves_the_tree(&out, port);
    // Reports go in by PUT under reports/ (and nowhere else).
    let (st, head, _) = http(
        port,
        "PUT",
        "/reports/aa-bb/1.json",
        "",
        b"{\"status\":\"installed\"}",
    );
    assert_eq!(st, 201, "{head}");
    assert_eq!(
        fs::read_to_string(out.join("reports/aa-bb/1.json")).unwrap(),
        "{\"status\":\"installed\"}"
    );
    let (st, _, _) = http(port, "PUT", "/config.json", "", b"{}");
    assert_eq!(st, 405);
    same("config.json", &config);
}

#[test]
fn render_refuses_bad_input_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let img = make_image(t.path());
    let boot = fake_boot(t.path());
    let seed = seed(t.path());
    let render = |url: &str, image: &Path, seed: &Path, boot: &Path, out: &Path| {
        imprint()
            .args(["netboot", "render", "--image"])
            .arg(image)
            .arg("--seed")
            .arg(seed)
            .arg("--boot")
            .arg(boot)
            .args(["--url", url, "-o"])
            .arg(out)
            .output()
            .unwrap()
    };
    let url = "http://10.0.0.1:8080/";
    let out = t.path().join("tree");
    let refused = |o: Output, why: &str| {
        assert!(!o.status.success(), "{why}: succeeded");
        let e = stderr(&o);
        assert!(e.contains(why), "wanted {why:?} in: {e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(!out.exists(), "{why}: {} was created", out.display());
        let leftovers: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "{why}: {leftovers:?}");
    };
    refused(
        render("https://10.0.0.1/", &img, &seed, &boot, &out),
        "https is not possible",
    );
    refused(
        render("http://ops:s3cr3t@10.0.0.1/", &img, &seed, &boot, &out),
        "user names and passwords",
    );
    refused(
        render("http://10.0.0.1/x?sig=s3cr3t", &img, &seed, &boot, &out),
        "query",
    );
    refused(
        render("http://10.0.0.1/imprint/", &img, &seed, &boot, &out),
        "server's root",
    );
    refused(
        render("http://boot.lan/", &img, &seed, &boot, &out),
        "--subnet",
    );
    refused(
        render(url, &t.path().join("nope.img.zst"), &seed, &boot, &out),
        "nope.img.zst",
    );
    let junk = t.path().join("junk.img.zst");
    fs::write(&junk, b"not an image at all, just text").unwrap();
    refused(render(url, &junk, &seed, &boot, &out), "junk.img.zst");
    let bad_seed = t.path().join("badseed");
    fs::create_dir_all(&bad_seed).unwrap();
    fs::write(
        bad_seed.join("user-data"),
        "#cloud-config\nruncmd:\n  - ls\n packages: [vim]\n",
    )
    .unwrap();
    refused(render(url, &img, &bad_seed, &boot, &out), "user-data");
    let old_boot = t.path().join("oldboot");
    fs::create_dir_all(old_boot.join("EFI/BOOT")).unwrap();
    for f in ["EFI/BOOT/BOOTX64.EFI", "vmlinuz", "initrd.img"] {
        fs::copy(boot.join(f), old_boot.join(f)).unwrap();
    }
    refused(
        render(url, &img, &seed, &old_boot, &out),
        "netboot/grubx64.efi is missing",
    );

    // An existing, non-empty folder is never touched; an empty one is filled.
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("keep"), "mine").unwrap();
    let o = render(url, &img, &seed, &boot, &out);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not empty"), "{}", stderr(&o));
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
    fs::remove_file(out.join("keep")).unwrap();
    ok(render(url, &img, &seed, &boot, &out));
    assert!(out.join("bootx64.efi").is_file());
}
