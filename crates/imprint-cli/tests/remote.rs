//! Integration tests: `imprint write URL` through the real binary against real HTTP servers on
//! 127.0.0.1 — nginx (Range, ETag), `python3 -m http.server` (ignores Range), and a
//! fault-injecting TCP proxy written here that cuts connections, lets the server vanish, or
//! lets the file change mid-transfer. Each test asserts the bytes on the target afterwards.
//! Needs root for the loop device and Debian's `nginx-light` and `python3` (scripts/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, imprint, noise, ok, stderr, Loop};

const MIB: usize = 1 << 20;

/// Deterministic pseudo-random bytes: they do not compress, so the compressed image is as
/// large as the raw one and a cut lands mid-payload.
/// A raw MBR-signed disk image of `mib` MiB and its imprint image in `dir/www/NAME`.
fn make_image(dir: &Path, name: &str, mib: usize, seed: u32) -> (Vec<u8>, PathBuf) {
    let mut raw = noise(mib * MIB, seed);
    raw[510] = 0x55;
    raw[511] = 0xAA;
    let raw_path = dir.join(format!("{name}.raw"));
    std::fs::write(&raw_path, &raw).unwrap();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let img = dir.join("www").join(name);
    ok(imprint()
        .arg("prepare")
        .arg(&raw_path)
        .arg("-o")
        .arg(&img)
        .args(["--threads", "1", "--level", "1"])
        .output()
        .unwrap());
    (raw, img)
}

fn wait_listening(port: u16, child: &mut Child) {
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the server exited before listening: {status}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "server not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real nginx serving `root` on a loopback port with its own config in a temp dir; stopped
/// on drop.
struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Nginx {
    fn start(root: &Path) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log;\nevents {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/t;\n\
                 proxy_temp_path {d}/t;\n  fastcgi_temp_path {d}/t;\n  uwsgi_temp_path {d}/t;\n\
                 scgi_temp_path {d}/t;\n  server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
                root.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is not installed: run scripts/deps (Debian package nginx-light)");
        wait_listening(port, &mut child);
        Nginx {
            child,
            port,
            log: dir.path().join("access.log"),
            _dir: dir,
        }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Requests in the access log with this status.
    fn count_status(&self, status: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\" {status} ")))
            .count()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python3 -m http.server` (answers 200 to Range requests), stopped on drop.
struct PyServer {
    child: Child,
    port: u16,
}

impl PyServer {
    fn start(root: &Path) -> PyServer {
        let port = free_port();
        let mut child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(root)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is not installed (scripts/deps)");
        wait_listening(port, &mut child);
        PyServer { child, port }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of `upstream`. The first `skip` connections (the manifest read) pass
/// untouched; then the k-th of `cuts` faulty connections (k = 0, 1, ...) is cut after
/// `(k + 1) * after` bytes of response — growing, so a server that resends from byte 0 still
/// gets further — with both directions shut down, as a dropped link looks. Each cut's number
/// (1, 2, ...) is sent on the returned channel. With `vanish`, the proxy closes its listening
/// socket after the first cut: the server is gone. Runs on detached threads until the test ends.
fn fault_proxy(
    upstream: u16,
    after: u64,
    skip: u32,
    cuts: u32,
    vanish: bool,
) -> (u16, Arc<AtomicU32>, mpsc::Receiver<u32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let done = Arc::new(AtomicU32::new(0));
    let (tx, rx) = mpsc::channel();
    let count = done.clone();
    std::thread::spawn(move || {
        for (index, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let k = count.load(Ordering::SeqCst);
            let cut = index as u32 >= skip && k < cuts;
            let after = after * u64::from(k + 1);
            // Requests go up untouched.
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(Shutdown::Write);
            });
            // Responses come down, cut after `after` bytes on the faulty connections.
            let (mut s_in, mut c_out) = (server, client);
            let count = count.clone();
            let tx = tx.clone();
            let mut relay = move || {
                let mut sent = 0u64;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let want = if cut {
                        buf.len().min((after - sent) as usize)
                    } else {
                        buf.len()
                    };
                    if want == 0 {
                        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                        let _ = c_out.shutdown(Shutdown::Both);
                        let _ = s_in.shutdown(Shutdown::Both);
                        let _ = tx.send(n);
                        return;
                    }
                    match s_in.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => {
                            let _ = c_out.shutdown(Shutdown::Write);
                            return;
                        }
                        Ok(n) => {
                            if c_out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            sent += n as u64;
                        }
                    }
                }
            };
            if vanish && cut {
                // Serve this connection to its cut, then drop the listener with the thread.
                relay();
                return;
            }
            std::thread::spawn(relay);
        }
    });
    (port, done, rx)
}

fn write_url(url: &str, target: &Path) -> Output {
    // Block devices as they are; a file target is asked for explicitly (--to-file).
    let is_file = !target.starts_with("/dev");
    imprint()
        .arg("write")
        .arg(url)
        .arg(target)
        .arg("--yes")
        .args(is_file.then_some("--to-file"))
        .output()
        .unwrap()
}

/// The first MiB of a failed target must hold no partition table (all zeros). A file target
/// this run created is removed on failure (`--to-file`): then nothing is left at all.
fn assert_no_partition_table(target: &Path) {
    if !target.starts_with("/dev") && !target.exists() {
        return;
    }
    let mut head = vec![0u8; MIB];
    std::fs::File::open(target)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(
        head.iter().all(|&b| b == 0),
        "a failed write must leave no partition table"
    );
}

#[test]
fn nginx_to_loop_device_with_sha256() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root for the loop device (run scripts/test as root, as CI does)"
    );
    let t = tempfile::tempdir().unwrap();
    let (raw, img) = make_image(t.path(), "x.img.zst", 6, 1);
    let nginx = Nginx::start(&t.path().join("www"));
    let disk = t.path().join("disk");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let lo = Loop::new(&disk);
    let file_sha = {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(std::fs::read(&img).unwrap());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    // A wrong --sha256: the write fails before its commit, exit 3, no partition table.
    let bad = imprint()
        .arg("write")
        .arg(nginx.url("x.img.zst"))
        .arg(&lo.dev)
        .args(["--yes", "--sha256", &"0".repeat(64)])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(3), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("sha256"), "{}", stderr(&bad));
    assert_no_partition_table(&lo.dev);
    // The right one: exact bytes on the device.
    ok(imprint()
        .arg("write")
        .arg(nginx.url("x.img.zst"))
        .arg(&lo.dev)
        .args(["--yes", "--sha256", &file_sha])
        .output()
        .unwrap());
    let got = std::fs::read(&disk).unwrap();
    assert_eq!(&got[..raw.len()], &raw[..]);
    // verify and inspect take the URL too.
    ok(imprint()
        .arg("verify")
        .arg(nginx.url("x.img.zst"))
        .arg(&lo.dev)
        .output()
        .unwrap());
    let o = ok(imprint()
        .args(["inspect", "--check"])
        .arg(nginx.url("x.img.zst"))
        .output()
        .unwrap());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("sha256 matches the manifest"), "{out}");
    assert!(out.contains(&nginx.url("x.img.zst")), "{out}");
}

#[test]
fn resumes_through_cut_connections() {
    let t = tempfile::tempdir().unwrap();
    let (raw, _) = make_image(t.path(), "x.img.zst", 8, 2);
    let nginx = Nginx::start(&t.path().join("www"));
    // Cut the payload's connection three times (after 1, 2 and 3 MiB).
    let (port, cuts, _rx) = fault_proxy(nginx.port, MIB as u64, 1, 3, false);
    let target = t.path().join("out.img");
    let o = ok(write_url(
        &format!("http://127.0.0.1:{port}/x.img.zst"),
        &target,
    ));
    assert_eq!(cuts.load(Ordering::SeqCst), 3);
    assert_eq!(std::fs::read(&target).unwrap(), raw);
    let resumed = stderr(&o).matches("resumed at byte").count();
    assert_eq!(resumed, 3, "{}", stderr(&o));
    // The manifest read, the payload, and three resumptions: all ranged. nginx logs an
    // aborted request when it notices the abort: give it a moment.
    let t = Instant::now();
    while nginx.count_status("206") < 5 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(nginx.count_status("206"), 5, "nginx answered with 206s");
    assert_eq!(
        nginx.count_status("200"),
        0,
        "no request was answered in full"
    );
}

#[test]
fn range_ignoring_server_restarts_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let (raw, _) = make_image(t.path(), "x.img.zst", 6, 3);
    let py = PyServer::start(&t.path().join("www"));
    // Plain: the payload request gets a 200 and the reader skips the manifest's bytes.
    let target = t.path().join("plain.img");
    ok(write_url(
        &format!("http://127.0.0.1:{}/x.img.zst", py.port),
        &target,
    ));
    assert_eq!(std::fs::read(&target).unwrap(), raw);
    // Cut twice mid-payload: each reconnection gets the whole file again (same
    // Last-Modified) and goes on where it was.
    let (port, cuts, _rx) = fault_proxy(py.port, MIB as u64, 1, 2, false);
    let target = t.path().join("cut.img");
    let o = ok(write_url(
        &format!("http://127.0.0.1:{port}/x.img.zst"),
        &target,
    ));
    assert_eq!(cuts.load(Ordering::SeqCst), 2);
    assert_eq!(std::fs::read(&target).unwrap(), raw);
    assert_eq!(
        stderr(&o).matches("ignores Range").count(),
        2,
        "{}",
        stderr(&o)
    );
}

#[test]
fn not_found_is_clear_and_leaves_target_untouched() {
    let t = tempfile::tempdir().unwrap();
    let (_, _) = make_image(t.path(), "x.img.zst", 2, 4);
    let nginx = Nginx::start(&t.path().join("www"));
    let target = t.path().join("disk.img");
    std::fs::write(&target, vec![0xEEu8; 4 * MIB]).unwrap();
    let url = format!(
        "http://user:hunter2@127.0.0.1:{}/missing.img.zst?X-Amz-Signature=s3cr3t",
        nginx.port
    );
    let o = write_url(&url, &target);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("HTTP 404"), "{err}");
    assert!(err.contains("/missing.img.zst"), "{err}");
    assert!(
        !err.contains("hunter2") && !err.contains("s3cr3t"),
        "credentials leaked: {err}"
    );
    assert!(std::fs::read(&target).unwrap().iter().all(|&b| b == 0xEE));
}

#[test]
fn vanished_server_fails_clearly_without_partition_table() {
    let t = tempfile::tempdir().unwrap();
    let (_, _) = make_image(t.path(), "x.img.zst", 8, 5);
    let nginx = Nginx::start(&t.path().join("www"));
    // The manifest read goes through a healthy proxy connection; the payload's connection
    // is cut after 3 MiB and the proxy stops listening.
    let (port, _, _rx) = fault_proxy(nginx.port, 3 * MIB as u64, 1, 1, true);
    let target = t.path().join("out.img");
    let o = write_url(&format!("http://127.0.0.1:{port}/x.img.zst"), &target);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let err = stderr(&o);
    // Mid-stream: past the 3 MiB the proxy let through (minus what was still in flight).
    let offset: u64 = err
        .split("giving up at byte ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in: {err}"));
    assert!(offset > 2 * MIB as u64, "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}/x.img.zst")),
        "{err}"
    );
    assert_no_partition_table(&target);
}

#[test]
fn image_changed_mid_transfer_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = make_image(t.path(), "x.img.zst", 8, 6);
    let (_, other) = make_image(t.path(), "y.img.zst", 8, 7);
    let nginx = Nginx::start(&t.path().join("www"));
    // The payload's connection is cut after 3 MiB; at once another image takes the file's
    // place (the reader waits before it reconnects).
    let (port, _, rx) = fault_proxy(nginx.port, 3 * MIB as u64, 1, 1, false);
    let swap = std::thread::spawn(move || {
        while let Ok(n) = rx.recv_timeout(Duration::from_secs(120)) {
            if n == 1 {
                let tmp = img.with_extension("new");
                std::fs::copy(&other, &tmp).unwrap();
                // nginx's ETag is the mtime in seconds and the size, and both images have the
                // same size: give the new one a later mtime, as any real update has.
                std::fs::File::options()
                    .write(true)
                    .open(&tmp)
                    .unwrap()
                    .set_modified(std::time::SystemTime::now() + Duration::from_secs(60))
                    .unwrap();
                std::fs::rename(&tmp, &img).unwrap();
                return;
            }
        }
    });
    let target = t.path().join("out.img");
    let o = write_url(&format!("http://127.0.0.1:{port}/x.img.zst"), &target);
    swap.join().unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("changed on the server"),
        "{}",
        stderr(&o)
    );
    assert_no_partition_table(&target);
}

#[test]
fn prepare_from_url_checks_sha256() {
    let t = tempfile::tempdir().unwrap();
    let mut raw = noise(3 * MIB, 8);
    raw[510] = 0x55;
    raw[511] = 0xAA;
    let www = t.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let gz = www.join("vendor.raw.zst");
    std::fs::write(&gz, zstd::stream::encode_all(&raw[..], 1).unwrap()).unwrap();
    let sha = {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(std::fs::read(&gz).unwrap());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let nginx = Nginx::start(&www);
    let out = t.path().join("vendor.img.zst");
    // Wrong digest: nothing is kept.
    let bad = imprint()
        .arg("prepare")
        .arg(nginx.url("vendor.raw.zst"))
        .arg("-o")
        .arg(&out)
        .args(["--sha256", &"1".repeat(64)])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("sha256"), "{}", stderr(&bad));
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        1,
        "only www/ remains"
    );
    ok(imprint()
        .arg("prepare")
        .arg(nginx.url("vendor.raw.zst"))
        .arg("-o")
        .arg(&out)
        .args(["--sha256", &sha])
        .output()
        .unwrap());
    // Only the image remains next to www/, and it decodes to the vendor's raw bytes.
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 2);
    let target = t.path().join("disk.img");
    ok(imprint()
        .arg("write")
        .arg(&out)
        .arg(&target)
        .arg("--to-file")
        .output()
        .unwrap());
    assert_eq!(std::fs::read(&target).unwrap(), raw);
}

#[test]
fn replaced_file_with_the_same_etag_is_caught_by_the_digests() {
    let t = tempfile::tempdir().unwrap();
    let (_, img) = make_image(t.path(), "x.img.zst", 8, 9);
    let (_, other) = make_image(t.path(), "y.img.zst", 8, 10);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        std::fs::metadata(&other).unwrap().len(),
        "the test needs two images of the same size"
    );
    let nginx = Nginx::start(&t.path().join("www"));
    // Same size and same mtime: nginx's ETag does not change, so the validator cannot tell.
    let (port, _, rx) = fault_proxy(nginx.port, 3 * MIB as u64, 1, 1, false);
    let swap = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(120)) == Ok(1) {
            let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
            let tmp = img.with_extension("new");
            std::fs::copy(&other, &tmp).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&tmp)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
            std::fs::rename(&tmp, &img).unwrap();
        }
    });
    let target = t.path().join("out.img");
    let o = write_url(&format!("http://127.0.0.1:{port}/x.img.zst"), &target);
    swap.join().unwrap();
    // Resumed onto the other file's bytes: zstd or the chunk digests refuse the mixed stream.
    assert!(stderr(&o).contains("resumed at byte"), "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_no_partition_table(&target);
}
