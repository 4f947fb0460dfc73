//! Integration tests: signed images through the real `imprint` binary — keygen, prepare
//! --sign, inspect (with and without --trust), tampering, password-protected keys, and
//! `imprint build` refusing an unsigned image when the config requires a signature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{imprint_with, ok, stderr, stdout};

/// A small GPT-looking raw disk image (protective MBR signature, "EFI PART" at LBA 1, data).
fn raw_image(dir: &Path) -> PathBuf {
    let mut v = vec![0u8; 4 << 20];
    v[510] = 0x55;
    v[511] = 0xAA;
    v[512..520].copy_from_slice(b"EFI PART");
    for (i, b) in v.iter_mut().enumerate().skip(1 << 20).take(1 << 20) {
        *b = (i * 7 % 251) as u8;
    }
    let p = dir.join("disk.raw");
    std::fs::write(&p, &v).unwrap();
    p
}

/// The key id `imprint keygen` printed.
fn key_id(keygen_out: &Output) -> String {
    stdout(keygen_out)
        .lines()
        .find_map(|l| l.strip_prefix("key id:"))
        .map(|s| s.trim().to_string())
        .expect("keygen prints the key id")
}

#[test]
fn keygen_prepare_sign_inspect() {
    let t = tempfile::tempdir().unwrap();
    let raw = raw_image(t.path());
    let name = t.path().join("release");
    let kg = ok(imprint_with(&[&"keygen", &"-o", &name]));
    let id = key_id(&kg);
    assert_eq!(id.len(), 16, "{id}");
    let key = t.path().join("release.key");
    let pubkey = t.path().join("release.pub");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The .pub file is minisign's: its comment names the same key id.
    let pub_text = std::fs::read_to_string(&pubkey).unwrap();
    assert!(pub_text.contains(&id), "{pub_text}");
    // Never overwrites a key.
    let again = imprint_with(&[&"keygen", &"-o", &name]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("never overwritten"),
        "{}",
        stderr(&again)
    );

    let img = t.path().join("signed.img.zst");
    let p = ok(imprint_with(&[
        &"prepare", &raw, &"-o", &img, &"--sign", &key,
    ]));
    assert!(
        stdout(&p).contains(&format!("signature:    key {id}")),
        "{}",
        stdout(&p)
    );
    // Plain zstd still decodes the signed image.
    let decoded = zstd::stream::decode_all(std::fs::File::open(&img).unwrap()).unwrap();
    assert_eq!(decoded, std::fs::read(&raw).unwrap());

    let i = ok(imprint_with(&[&"inspect", &"--check", &img]));
    assert!(stdout(&i).contains(&format!("key {id}")), "{}", stdout(&i));
    let i = ok(imprint_with(&[&"inspect", &img, &"--trust", &pubkey]));
    assert!(
        stdout(&i).contains(&format!("verified:     signature by trusted key {id}")),
        "{}",
        stdout(&i)
    );

    // Another key: untrusted, named, exit 3.
    let other = ok(imprint_with(&[&"keygen", &"-o", &t.path().join("other")]));
    let other_id = key_id(&other);
    let i = imprint_with(&[&"inspect", &img, &"--trust", &t.path().join("other.pub")]);
    assert_eq!(i.status.code(), Some(3), "{}", stderr(&i));
    assert!(
        stderr(&i).contains(&format!("signed by key {id}")),
        "{}",
        stderr(&i)
    );
    assert!(stderr(&i).contains(&other_id), "{}", stderr(&i));

    // An unsigned image says so.
    let unsigned = t.path().join("unsigned.img.zst");
    ok(imprint_with(&[&"prepare", &raw, &"-o", &unsigned]));
    let i = ok(imprint_with(&[&"inspect", &unsigned]));
    assert!(stdout(&i).contains("signature:    none"), "{}", stdout(&i));
    let i = imprint_with(&[&"inspect", &unsigned, &"--trust", &pubkey]);
    assert_eq!(i.status.code(), Some(3));
    assert!(stderr(&i).contains("is not signed"), "{}", stderr(&i));

    // The manifest's name changed after signing: still valid JSON, bad signature.
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes
        .windows(b"\"name\":\"disk\"".len())
        .position(|w| w == b"\"name\":\"disk\"")
        .unwrap();
    bytes[at + 8] = b'D';
    let tampered = t.path().join("tampered.img.zst");
    std::fs::write(&tampered, &bytes).unwrap();
    ok(imprint_with(&[&"inspect", &tampered]));
    let i = imprint_with(&[&"inspect", &tampered, &"--trust", &pubkey]);
    assert_eq!(i.status.code(), Some(3), "{}", stderr(&i));
    assert!(stderr(&i).contains("altered"), "{}", stderr(&i));
}

#[test]
fn password_protected_key() {
    let t = tempfile::tempdir().unwrap();
    let raw = raw_image(t.path());
    let pw = t.path().join("pw");
    std::fs::write(&pw, "correct horse\n").unwrap();
    let kg = ok(imprint_with(&[
        &"keygen",
        &"-o",
        &t.path().join("k"),
        &"--password-file",
        &pw,
    ]));
    let id = key_id(&kg);
    let key = t.path().join("k.key");
    let img = t.path().join("x.img.zst");

    let no_pw = imprint_with(&[&"prepare", &raw, &"-o", &img, &"--sign", &key]);
    assert!(!no_pw.status.success());
    assert!(
        stderr(&no_pw).contains("--password-file"),
        "{}",
        stderr(&no_pw)
    );
    assert!(!img.exists());

    let wrong = t.path().join("wrong");
    std::fs::write(&wrong, "incorrect horse\n").unwrap();
    let bad = imprint_with(&[
        &"prepare",
        &raw,
        &"-o",
        &img,
        &"--sign",
        &key,
        &"--password-file",
        &wrong,
    ]);
    assert!(!bad.status.success());
    assert!(!img.exists());

    ok(imprint_with(&[
        &"prepare",
        &raw,
        &"-o",
        &img,
        &"--sign",
        &key,
        &"--password-file",
        &pw,
    ]));
    let i = ok(imprint_with(&[
        &"inspect",
        &img,
        &"--trust",
        &t.path().join("k.pub"),
    ]));
    assert!(
        stdout(&i).contains(&format!("trusted key {id}")),
        "{}",
        stdout(&i)
    );
}

#[test]
fn build_refuses_unsigned_image_when_config_requires_signature() {
    let t = tempfile::tempdir().unwrap();
    let raw = raw_image(t.path());
    let kg = ok(imprint_with(&[&"keygen", &"-o", &t.path().join("k")]));
    let pub_b64 = std::fs::read_to_string(t.path().join("k.pub"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    let config = t.path().join("config.json");
    std::fs::write(
        &config,
        format!(r#"{{"require_signature": true, "trusted_keys": ["{pub_b64}"]}}"#),
    )
    .unwrap();
    let unsigned = t.path().join("u.img.zst");
    ok(imprint_with(&[&"prepare", &raw, &"-o", &unsigned]));
    let no_boot = t.path().join("no-boot");
    let out = t.path().join("stick.img");
    let b = imprint_with(&[
        &"build",
        &"--image",
        &unsigned,
        &"--config",
        &config,
        &"--boot",
        &no_boot,
        &"-o",
        &out,
    ]);
    assert_eq!(b.status.code(), Some(3), "{}", stderr(&b));
    assert!(stderr(&b).contains("is not signed"), "{}", stderr(&b));
    assert!(!out.exists());

    // A signed image gets past that check (and stops at the missing boot files here).
    let signed = t.path().join("s.img.zst");
    ok(imprint_with(&[
        &"prepare",
        &raw,
        &"-o",
        &signed,
        &"--sign",
        &t.path().join("k.key"),
    ]));
    let b = imprint_with(&[
        &"build",
        &"--image",
        &signed,
        &"--config",
        &config,
        &"--boot",
        &no_boot,
        &"-o",
        &out,
    ]);
    assert!(!b.status.success());
    assert!(stderr(&b).contains("image-build/build"), "{}", stderr(&b));
    assert!(!stderr(&b).contains("not signed"), "{}", stderr(&b));

    // A config with a key that does not parse is refused, naming the key.
    std::fs::write(&config, r#"{"trusted_keys": ["RWQ-broken"]}"#).unwrap();
    let b = imprint_with(&[
        &"build",
        &"--image",
        &signed,
        &"--config",
        &config,
        &"--boot",
        &no_boot,
        &"-o",
        &out,
    ]);
    assert!(!b.status.success());
    assert!(stderr(&b).contains("trusted_keys[0]"), "{}", stderr(&b));
    let _ = key_id(&kg);
}
