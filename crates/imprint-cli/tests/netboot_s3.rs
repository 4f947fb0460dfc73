//! `imprint netboot render --s3` through the real binary against a real S3 server
//! (`tests/s3-server`: s3s over files, SigV4 checked, public read): the tree is uploaded with
//! signed PUTs, read back anonymously byte for byte, and the presigned report URLs in
//! `presigned/<machine>.json` accept uploads until they expire; tampered, unsigned and expired
//! uploads are refused. The keys never reach the output or the tree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use imprint_core::test_util::{S3Server, S3_ACCESS_KEY, S3_SECRET_KEY};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

mod common;
use common::{fake_boot, make_image};

const MACHINE: &str = "52-54-00-12-34-56";

fn imprint() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imprint"));
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "failed: {}", text(&o));
    o
}

/// Inputs: image, seed, a config with one machine by MAC and one by DMI serial, boot files.
fn inputs(dir: &Path) -> Vec<std::ffi::OsString> {
    let s = dir.join("seed");
    fs::create_dir_all(&s).unwrap();
    fs::write(s.join("user-data"), "#cloud-config\n").unwrap();
    let config = dir.join("fleet.json");
    fs::write(
        &config,
        format!(
            r#"{{"seed": {{"machines": [
                {{"mac": "{}", "hostname": "nuc-01"}},
                {{"dmi_serial": "G6BN1234", "hostname": "nuc-02"}}]}}}}"#,
            MACHINE.replace('-', ":")
        ),
    )
    .unwrap();
    let img = make_image(dir);
    let boot = fake_boot(dir);
    [
        "--image".into(),
        img.into_os_string(),
        "--seed".into(),
        s.into_os_string(),
        "--config".into(),
        config.into_os_string(),
        "--boot".into(),
        boot.into_os_string(),
    ]
    .into()
}

/// One HTTP/1.1 request to an absolute URL (`Host` as signed); returns (status, body).
fn http(method: &str, url: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = TcpStream::connect(authority).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = all[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        body = out;
    }
    (status, body)
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

fn render_s3(t: &Path, out: &Path, s3: &S3Server, extra: &[&str]) -> Output {
    let port = s3.endpoint.rsplit(':').next().unwrap();
    imprint()
        .args(["netboot", "render"])
        .args(inputs(t))
        .args(["--url", &format!("http://fleet.s3.test:{port}/")])
        .args([
            "--subnet",
            "127.0.0.0/8",
            "--s3",
            "--s3-endpoint",
            &s3.endpoint,
        ])
        .args(extra)
        .arg("-o")
        .arg(out)
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        .output()
        .unwrap()
}

#[test]
fn render_s3_tree_uploads_and_presigned_report_urls_work_against_a_real_s3_server() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("s3");
    fs::create_dir_all(root.join("fleet")).unwrap();
    let s3 = S3Server::start(&root);
    let out = t.path().join("tree");
    let before = jiff::Timestamp::now();
    let o = ok(render_s3(t.path(), &out, &s3, &["--expires", "2h"]));
    let said = text(&o);
    assert!(
        said.contains("presigned PUT URLs for 1 machine(s) in presigned/ (fleet at "),
        "{said}"
    );
    assert!(
        said.contains("valid until ") && said.contains("(2 hours)"),
        "{said}"
    );
    assert!(
        said.contains("1 machine(s) of seed.machines are keyed by DMI"),
        "{said}"
    );
    assert!(!said.contains(S3_SECRET_KEY), "the secret is never printed");

    let mut all = Vec::new();
    files(&out, Path::new(""), &mut all);
    for f in &all {
        let data = fs::read(out.join(f)).unwrap();
        assert!(
            !data
                .windows(S3_SECRET_KEY.len())
                .any(|w| w == S3_SECRET_KEY.as_bytes()),
            "{}: holds the secret key",
            f.display()
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("presigned/index.json")).unwrap()).unwrap();
    assert_eq!(index["machines"], 1);
    let mine: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join(format!("presigned/{MACHINE}.json"))).unwrap())
            .unwrap();
    assert_eq!(mine["expires"], index["expires"]);
    let expires: jiff::Timestamp = mine["expires"].as_str().unwrap().parse().unwrap();
    let left = expires.duration_since(before).as_secs();
    assert!(
        (7190..=7260).contains(&left),
        "expires in {left} s, not 2 h"
    );
    let put = mine["put"].as_object().unwrap();
    let keys: Vec<&str> = put.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "reports/52-54-00-12-34-56/installed.json",
            "reports/52-54-00-12-34-56/progress.json",
            "reports/52-54-00-12-34-56/report.json"
        ]
    );

    // Upload the tree with signed PUTs (as `aws s3 sync` does), then read it back anonymously.
    let bucket = Bucket::new(
        s3.endpoint.parse().unwrap(),
        UrlStyle::Path,
        "fleet",
        "us-east-1",
    )
    .unwrap();
    let creds = Credentials::new(S3_ACCESS_KEY, S3_SECRET_KEY);
    for f in &all {
        let key = f.to_str().unwrap();
        let url = bucket
            .put_object(Some(&creds), key)
            .sign(Duration::from_secs(60));
        let (status, body) = http("PUT", url.as_str(), &fs::read(out.join(f)).unwrap());
        assert_eq!(status, 200, "{key}: {}", String::from_utf8_lossy(&body));
    }
    for f in &all {
        let (status, body) = http(
            "GET",
            &format!("{}/fleet/{}", s3.endpoint, f.display()),
            b"",
        );
        assert_eq!(status, 200, "{}", f.display());
        assert_eq!(body, fs::read(out.join(f)).unwrap(), "{}", f.display());
    }

    // The presigned URLs accept the machine's uploads, byte for byte.
    for (key, url) in put {
        let url = url.as_str().unwrap();
        assert!(
            url.starts_with(&format!("{}/fleet/{key}?", s3.endpoint)),
            "{url}"
        );
        let body = format!("{{\"object\": \"{key}\"}}\n");
        let (status, answer) = http("PUT", url, body.as_bytes());
        assert_eq!(status, 200, "{key}: {}", String::from_utf8_lossy(&answer));
        assert_eq!(
            fs::read(root.join("fleet").join(key)).unwrap(),
            body.as_bytes()
        );
        // Tampered: the signature of one object for another, or a changed signature.
        let other = url
            .replace("/report.json?", "/x.json?")
            .replace("/installed.json?", "/x.json?")
            .replace("/progress.json?", "/x.json?");
        let (status, _) = http("PUT", &other, b"{}");
        assert_eq!(status, 403, "{key}: signed for another object");
        let i = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
        let flipped = format!(
            "{}{}{}",
            &url[..i],
            if &url[i..=i] == "0" { "1" } else { "0" },
            &url[i + 1..]
        );
        let (status, _) = http("PUT", &flipped, b"{}");
        assert_eq!(status, 403, "{key}: tampered signature");
    }
    let (status, _) = http(
        "PUT",
        &format!("{}/fleet/reports/{MACHINE}/report.json", s3.endpoint),
        b"{}",
    );
    assert_eq!(status, 403, "an unsigned PUT is refused");
    assert!(!root
        .join("fleet/reports")
        .join(MACHINE)
        .join("x.json")
        .exists());
    assert_eq!(
        fs::read(root.join("fleet/reports").join(MACHINE).join("report.json")).unwrap(),
        format!("{{\"object\": \"reports/{MACHINE}/report.json\"}}\n").as_bytes()
    );

    // Expired URLs are refused.
    let short = t.path().join("short");
    ok(render_s3(t.path(), &short, &s3, &["--expires", "1s"]));
    let mine: serde_json::Value =
        serde_json::from_slice(&fs::read(short.join(format!("presigned/{MACHINE}.json"))).unwrap())
            .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let url = mine["put"][format!("reports/{MACHINE}/progress.json")]
        .as_str()
        .unwrap();
    let (status, _) = http("PUT", url, b"late");
    assert_eq!(status, 403, "an expired URL is refused");
}

#[test]
fn render_s3_refuses_bad_options_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let base = inputs(t.path());
    let out = t.path().join("tree");
    let run = |args: &[&str], keys: bool| {
        let mut c = imprint();
        c.args(["netboot", "render"])
            .args(&base)
            .args(args)
            .arg("-o")
            .arg(&out);
        if keys {
            c.env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
        }
        c.output().unwrap()
    };
    for (args, keys, why) in [
        (
            &[
                "--url",
                "http://fleet.s3.lan:9000/",
                "--subnet",
                "10.0.0.0/24",
                "--s3",
            ][..],
            false,
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        (
            &["--url", "http://10.0.0.5:9000/", "--s3"][..],
            true,
            "BUCKET.HOST",
        ),
        (
            &[
                "--url",
                "http://10.0.0.5:9000/",
                "--s3",
                "--s3-endpoint",
                "http://10.0.0.5:9000",
            ][..],
            true,
            "--s3-bucket",
        ),
        (
            &[
                "--url",
                "http://fleet.s3.lan:9000/",
                "--subnet",
                "10.0.0.0/24",
                "--s3",
                "--expires",
                "8d",
            ][..],
            true,
            "at most 7 days",
        ),
        (
            &[
                "--url",
                "http://fleet.s3.lan:9000/",
                "--subnet",
                "10.0.0.0/24",
                "--s3",
                "--s3-endpoint",
                "https://s3.lan",
            ][..],
            true,
            "only http://",
        ),
        (
            &["--url", "http://10.0.0.5/", "--expires", "1d"][..],
            true,
            "--s3",
        ),
    ] {
        let o = run(args, keys);
        let said = text(&o);
        assert!(!o.status.success(), "{args:?}: {said}");
        assert!(said.contains(why), "{args:?}: {said}");
        assert!(!said.contains(S3_SECRET_KEY), "{args:?}: {said}");
        assert!(!out.exists(), "{args:?}: wrote the output");
        let partial: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("partial")
            })
            .collect();
        assert!(partial.is_empty(), "{args:?}");
    }
}
