//! Image signatures: checking that an image's manifest was signed by a trusted minisign key.
//!
//! A signed image carries, in a skippable frame right after the manifest frame, a minisign
//! signature (pre-hashed Ed25519) of the manifest's exact JSON bytes (see
//! [`crate::manifest`]). The manifest holds the compressed payload's sha256 and every chunk's
//! sha256, so a good signature binds the whole image: a changed payload byte fails the payload
//! digest or a chunk digest, a changed manifest byte fails the signature.
//!
//! Only verification lives here, on the small `minisign-verify` crate, so PID 1 stays small;
//! signing and key generation are the host CLI's (`imprint keygen`, `imprint prepare --sign`).
//! Keys are minisign public keys: the base64 line of a `.pub` file. See `docs/signing.md`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::Image;

/// Where the live image keeps the public keys baked into it (`buildroot-overlay/etc/imprint/
/// trusted-keys/*.pub` in this repository): the appliance trusts them besides the config's.
pub const BAKED_KEY_DIR: &str = "/etc/imprint/trusted-keys";

/// A minisign key id: 8 bytes, shown as minisign shows it (16 upper-case hex digits of the
/// little-endian number), e.g. in a `.pub` file's comment "minisign public key: 3F2A…".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

/// A public key the caller trusts to sign images.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    id: KeyId,
    key: minisign_verify::PublicKey,
    /// Where the key came from ("trusted_keys[0]", a `.pub` file's path), for messages.
    origin: String,
}

impl TrustedKey {
    /// Parses a minisign public key in its base64 form (the second line of a `.pub` file).
    /// `origin` names where it came from in error messages.
    pub fn from_base64(b64: &str, origin: &str) -> Result<TrustedKey, SignatureError> {
        let bad = |reason: String| SignatureError::BadKey {
            origin: origin.to_owned(),
            reason,
        };
        // The text is never echoed: a user who pastes the wrong line may have pasted a secret
        // key, and an error message ends up in terminals, logs and reports.
        let b64 = b64.trim();
        if base64_decode(b64).is_some_and(|raw| raw.len() > 42) {
            return Err(bad(
                "this is not a public key and looks like a minisign SECRET key; give the public \
                 key (the .pub file, or its second line) and keep the secret key private"
                    .into(),
            ));
        }
        let key = minisign_verify::PublicKey::from_base64(b64).map_err(|e| {
            bad(format!(
                "it is not a minisign public key (the second line of a .pub file): {e}"
            ))
        })?;
        // minisign-verify checked the length and algorithm; it does not expose the key id.
        let raw = base64_decode(b64).ok_or_else(|| bad("it is not base64".into()))?;
        let id = key_id_at(&raw, 2).ok_or_else(|| bad("too short for a key id".into()))?;
        Ok(TrustedKey {
            id,
            key,
            origin: origin.to_owned(),
        })
    }

    /// Parses the text of a minisign `.pub` file (an untrusted comment line, then the key).
    pub fn from_pub_file_text(text: &str, origin: &str) -> Result<TrustedKey, SignatureError> {
        if text
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("untrusted comment:") && l.contains("secret key"))
        {
            return Err(SignatureError::BadKey {
                origin: origin.to_owned(),
                reason: "this is a minisign SECRET key file, not a public key; give the .pub \
                         file and keep the secret key private"
                    .into(),
            });
        }
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| SignatureError::BadKey {
                origin: origin.to_owned(),
                reason: "no key line (a minisign .pub file has a comment line and a base64 line)"
                    .into(),
            })?;
        TrustedKey::from_base64(line, origin)
    }

    /// The key id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Where the key came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// Loads every `*.pub` file of `dir` (sorted by name) as a trusted key. A missing directory
/// holds no keys; a file that is not a minisign public key is an error naming it, so a broken
/// key is never silently dropped from the trusted set.
pub fn load_key_dir(dir: &Path) -> Result<Vec<TrustedKey>, SignatureError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SignatureError::KeyFile { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(dir)(e)),
    };
    let mut paths = Vec::new();
    for e in entries {
        let p = e.map_err(read_err(dir))?.path();
        if p.extension().is_some_and(|x| x == "pub") {
            paths.push(p);
        }
    }
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let text = crate::input::read_bounded_string(p, crate::input::limits::KEY)
                .map_err(read_err(p))?;
            TrustedKey::from_pub_file_text(&text, &p.display().to_string())
        })
        .collect()
}

/// The keys the appliance trusts: the config's `trusted_keys` and every `*.pub` in `key_dir`
/// (the live image's [`BAKED_KEY_DIR`]).
pub fn trusted_keys(
    config_keys: &[String],
    key_dir: &Path,
) -> Result<Vec<TrustedKey>, SignatureError> {
    let mut keys = config_keys
        .iter()
        .enumerate()
        .map(|(i, k)| TrustedKey::from_base64(k, &format!("trusted_keys[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    keys.extend(load_key_dir(key_dir)?);
    Ok(keys)
}

/// What the install policy found out about an image's signature; goes into the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureCheck {
    /// The image has a signature frame.
    pub signed: bool,
    /// The key id the signature names, if signed.
    pub key_id: Option<String>,
    /// The signature was checked against a trusted key and matches the manifest.
    pub verified: bool,
}

/// The appliance's signature policy, decided before any disk is touched:
///
/// - `require`: the image must be signed by one of `trusted` and the signature must match.
/// - otherwise, a signed image is checked whenever any key is trusted, and refused if the check
///   fails (trusting keys says whose images this stick installs; a signature that does not
///   match means the manifest was altered). An unsigned image, or a signed one with no key to
///   check it against, is installed as before, recorded as not verified.
pub fn check_policy(
    image: &Image,
    require: bool,
    trusted: &[TrustedKey],
) -> Result<SignatureCheck, SignatureError> {
    let info = signature_info(image)?;
    let key_id = info.as_ref().map(|i| i.key_id.to_string());
    if !require && (info.is_none() || trusted.is_empty()) {
        return Ok(SignatureCheck {
            signed: info.is_some(),
            key_id,
            verified: false,
        });
    }
    verify_image_signature(image, trusted)?;
    Ok(SignatureCheck {
        signed: true,
        key_id,
        verified: true,
    })
}

/// What an image's signature frame claims, before any key is involved: for showing
/// (`imprint inspect`) and for the report.
#[derive(Debug, Clone)]
pub struct SignatureInfo {
    /// The id of the key that made the signature.
    pub key_id: KeyId,
    /// The signature's trusted comment (signed too: `timestamp:…\timage:…` from imprint).
    pub trusted_comment: String,
}

/// Reads the signature frame of `image`: `None` if it is unsigned.
pub fn signature_info(image: &Image) -> Result<Option<SignatureInfo>, SignatureError> {
    let Some(text) = image.signature() else {
        return Ok(None);
    };
    let (sig, key_id) = decode_signature(image, text)?;
    Ok(Some(SignatureInfo {
        key_id,
        trusted_comment: sig.trusted_comment().to_owned(),
    }))
}

/// Checks that `image` is signed by one of the `trusted` keys and that the signature covers
/// its manifest; returns the signer's key id.
///
/// Errors: [`SignatureError::Unsigned`], [`SignatureError::Untrusted`] (naming the signer's key
/// id), [`SignatureError::BadSignature`] (the manifest was altered after signing),
/// [`SignatureError::Malformed`].
pub fn verify_image_signature(
    image: &Image,
    trusted: &[TrustedKey],
) -> Result<KeyId, SignatureError> {
    let path = image.path().to_owned();
    let text = image
        .signature()
        .ok_or_else(|| SignatureError::Unsigned { path: path.clone() })?;
    let (sig, key_id) = decode_signature(image, text)?;
    let candidates: Vec<&TrustedKey> = trusted.iter().filter(|k| k.id == key_id).collect();
    if candidates.is_empty() {
        return Err(SignatureError::Untrusted {
            path,
            key_id,
            trusted: trusted.iter().map(|k| k.id).collect(),
        });
    }
    let mut last = None;
    // Two trusted keys could share an id by accident; the signature decides which one it is.
    for k in candidates {
        // Legacy (not pre-hashed) signatures are refused: imprint never makes them.
        match k.key.verify(image.manifest_bytes(), &sig, false) {
            Ok(()) => return Ok(key_id),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(minisign_verify::Error::UnexpectedAlgorithm) => Err(SignatureError::Malformed {
            path,
            reason: "a legacy (not pre-hashed) minisign signature; re-sign the image with imprint"
                .into(),
        }),
        _ => Err(SignatureError::BadSignature { path, key_id }),
    }
}

fn decode_signature(
    image: &Image,
    text: &str,
) -> Result<(minisign_verify::Signature, KeyId), SignatureError> {
    let malformed = |reason: String| SignatureError::Malformed {
        path: image.path().to_owned(),
        reason,
    };
    let sig = minisign_verify::Signature::decode(text)
        .map_err(|e| malformed(format!("not a minisign signature: {e}")))?;
    // Line 2 is base64 of: algorithm (2 bytes), key id (8), signature (64).
    let key_id = text
        .lines()
        .nth(1)
        .and_then(|l| base64_decode(l.trim()))
        .and_then(|raw| key_id_at(&raw, 2))
        .ok_or_else(|| malformed("no key id in the signature".into()))?;
    Ok((sig, key_id))
}

fn key_id_at(raw: &[u8], at: usize) -> Option<KeyId> {
    let bytes: [u8; 8] = raw.get(at..at + 8)?.try_into().ok()?;
    Some(KeyId(bytes))
}

/// Decodes standard, padded base64 (what minisign writes). Used only to read the key id, which
/// `minisign-verify` keeps private; the key and signature themselves are parsed and checked
/// by `minisign-verify`.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let last = bytes.len() / 4 - 1;
    for (i, quad) in bytes.chunks_exact(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i != last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let [_, a, b, c] = n.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..3 - pad]);
    }
    Some(out)
}

/// Errors checking an image's signature or reading trusted keys.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The image has no signature frame.
    #[error(
        "{path} is not signed, and a signature is required (require_signature); sign it with `imprint prepare --sign KEY`"
    )]
    Unsigned {
        /// The image file.
        path: PathBuf,
    },
    /// The image is signed, by a key that is not trusted.
    #[error(
        "{path} is signed by key {key_id}, which is not trusted (trusted: {}); add its public key to trusted_keys in the config, or sign the image with a trusted key",
        list_ids(trusted)
    )]
    Untrusted {
        /// The image file.
        path: PathBuf,
        /// The key that signed it.
        key_id: KeyId,
        /// The keys that are trusted.
        trusted: Vec<KeyId>,
    },
    /// The signature does not match the manifest: the manifest was changed after signing.
    #[error(
        "{path}: the signature by key {key_id} does not match the image's manifest: the manifest was altered after signing; do not install this image"
    )]
    BadSignature {
        /// The image file.
        path: PathBuf,
        /// The key the signature names.
        key_id: KeyId,
    },
    /// The signature frame holds no usable minisign signature.
    #[error("{path}: the image's signature is malformed: {reason}")]
    Malformed {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A trusted key does not parse.
    #[error("trusted key {origin}: {reason}")]
    BadKey {
        /// Where the key came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// A key file or directory could not be read.
    #[error("reading trusted keys from {path}")]
    KeyFile {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

fn list_ids(ids: &[KeyId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::fs::File;

    use super::*;
    use crate::manifest::tests::fake_gpt_raw;
    use crate::manifest::{pack_signed, ImageError, PackOptions, MANIFEST_FRAME_MAGIC};

    /// A fresh unencrypted key pair: (secret key, trusted public key, its .pub file text).
    pub(crate) fn keypair() -> (minisign::SecretKey, TrustedKey, String) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let pub_text = kp.pk.to_box().unwrap().into_string();
        let trusted = TrustedKey::from_base64(&kp.pk.to_base64(), "test").unwrap();
        (kp.sk, trusted, pub_text)
    }

    #[test]
    fn a_secret_key_given_as_trusted_is_refused_without_echoing_it() {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let sk_text = kp.sk.to_box(None).unwrap().into_string();
        let sk_b64 = sk_text.lines().nth(1).unwrap();
        for e in [
            TrustedKey::from_pub_file_text(&sk_text, "k.key").unwrap_err(),
            TrustedKey::from_base64(sk_b64, "trusted_keys[0]").unwrap_err(),
            TrustedKey::from_base64(&sk_b64[..60], "trusted_keys[0]").unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(!msg.contains(&sk_b64[..20]), "{msg}");
            assert!(
                msg.contains("SECRET key") || msg.contains("not a minisign public key"),
                "{msg}"
            );
        }
        let msg = TrustedKey::from_base64(sk_b64, "trusted_keys[0]")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("looks like a minisign SECRET key"), "{msg}");
    }

    fn pack_with(raw: &[u8], out: &Path, sk: Option<&minisign::SecretKey>) {
        let opts = PackOptions {
            name: "signed-test".into(),
            level: 3,
            threads: 0,
            chunk_size: 1 << 20,
            frame_size: Some(1 << 20),
        };
        let mut sign = |json: &[u8]| -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
            let sk = sk.ok_or("no key")?;
            Ok(
                minisign::sign(None, sk, json, Some("timestamp:0\timage:signed-test"), None)?
                    .into_string(),
            )
        };
        let signer: Option<crate::manifest::Signer<'_>> = match sk {
            Some(_) => Some(&mut sign),
            None => None,
        };
        pack_signed(&mut &raw[..], out, &opts, signer, &mut |_| {}).unwrap();
    }

    #[test]
    fn sign_verify_round_trip_and_plain_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, key, pub_text) = keypair();
        let raw = fake_gpt_raw(3 << 20, 512);
        let out = dir.path().join("s.img.zst");
        pack_with(&raw, &out, Some(&sk));
        // Plain zstd still decodes a signed image: both frames are skippable.
        let decoded = zstd::stream::decode_all(File::open(&out).unwrap()).unwrap();
        assert_eq!(decoded, raw);
        let img = Image::open(&out).unwrap();
        assert!(img.signature().is_some());
        img.check_payload_digest().unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut img.raw_reader().unwrap(), &mut back).unwrap();
        assert_eq!(back, raw);
        assert_eq!(
            verify_image_signature(&img, std::slice::from_ref(&key)).unwrap(),
            key.id()
        );
        // The key id is the one minisign writes into the .pub comment.
        assert!(
            pub_text.contains(&key.id().to_string()),
            "{pub_text} / {}",
            key.id()
        );
        let info = signature_info(&img).unwrap().unwrap();
        assert_eq!(info.key_id, key.id());
        assert_eq!(info.trusted_comment, "timestamp:0\timage:signed-test");
        // The .pub file form parses to the same key.
        let from_file = TrustedKey::from_pub_file_text(&pub_text, "f").unwrap();
        assert_eq!(from_file.id(), key.id());
    }

    #[test]
    fn tampered_manifest_is_a_bad_signature() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, key, _) = keypair();
        let out = dir.path().join("t.img.zst");
        pack_with(&fake_gpt_raw(2 << 20, 512), &out, Some(&sk));
        let mut bytes = std::fs::read(&out).unwrap();
        // Change the name inside the JSON, keeping it valid JSON of the same length.
        let at = bytes.windows(11).position(|w| w == b"signed-test").unwrap();
        bytes[at] = b'S';
        std::fs::write(&out, &bytes).unwrap();
        let img = Image::open(&out).unwrap();
        assert_eq!(img.manifest().name, "Signed-test");
        let e = verify_image_signature(&img, std::slice::from_ref(&key)).unwrap_err();
        assert!(
            matches!(e, SignatureError::BadSignature { key_id, .. } if key_id == key.id()),
            "{e:?}"
        );
        assert!(e.to_string().contains("altered"), "{e}");
    }

    #[test]
    fn wrong_key_is_untrusted_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, signer_key, _) = keypair();
        let (_, other, _) = keypair();
        let out = dir.path().join("w.img.zst");
        pack_with(&fake_gpt_raw(2 << 20, 512), &out, Some(&sk));
        let img = Image::open(&out).unwrap();
        let e = verify_image_signature(&img, std::slice::from_ref(&other)).unwrap_err();
        match &e {
            SignatureError::Untrusted {
                key_id, trusted, ..
            } => {
                assert_eq!(*key_id, signer_key.id());
                assert_eq!(trusted, &[other.id()]);
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&signer_key.id().to_string()), "{msg}");
        // No keys at all: untrusted too, and the message says none is trusted.
        let e = verify_image_signature(&img, &[]).unwrap_err();
        assert!(e.to_string().contains("trusted: none"), "{e}");
    }

    #[test]
    fn unsigned_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key, _) = keypair();
        let out = dir.path().join("u.img.zst");
        pack_with(&fake_gpt_raw(2 << 20, 512), &out, None);
        let img = Image::open(&out).unwrap();
        assert!(img.signature().is_none());
        assert!(signature_info(&img).unwrap().is_none());
        let e = verify_image_signature(&img, &[key]).unwrap_err();
        assert!(matches!(e, SignatureError::Unsigned { .. }), "{e:?}");
        assert!(e.to_string().contains("--sign"), "{e}");
    }

    #[test]
    fn signed_image_truncated_or_appended_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, _, _) = keypair();
        let out = dir.path().join("c.img.zst");
        pack_with(&fake_gpt_raw(2 << 20, 512), &out, Some(&sk));
        let full = std::fs::read(&out).unwrap();
        std::fs::write(&out, &full[..full.len() - 10]).unwrap();
        assert!(matches!(
            Image::open(&out),
            Err(ImageError::Truncated { .. })
        ));
        let mut longer = full.clone();
        longer.extend_from_slice(b"junk");
        std::fs::write(&out, &longer).unwrap();
        assert!(matches!(
            Image::open(&out),
            Err(ImageError::BadManifest { .. })
        ));
        // A signature frame cut short is refused, not read as an unsigned image.
        let mlen = u32::from_le_bytes(full[4..8].try_into().unwrap()) as usize + 8;
        assert_eq!(
            u32::from_le_bytes(full[mlen..mlen + 4].try_into().unwrap()),
            crate::manifest::SIGNATURE_FRAME_MAGIC
        );
        std::fs::write(&out, &full[..mlen + 20]).unwrap();
        assert!(matches!(
            Image::open(&out),
            Err(ImageError::BadManifest { .. })
        ));
        // A damaged tag is refused too.
        let mut bad_tag = full.clone();
        bad_tag[mlen + 8] ^= 0x20;
        std::fs::write(&out, &bad_tag).unwrap();
        let e = Image::open(&out).unwrap_err();
        assert!(e.to_string().contains("signature frame"), "{e}");
        assert_eq!(
            u32::from_le_bytes(full[0..4].try_into().unwrap()),
            MANIFEST_FRAME_MAGIC
        );
    }

    #[test]
    fn garbage_signature_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key, _) = keypair();
        let out = dir.path().join("g.img.zst");
        pack_with(&fake_gpt_raw(2 << 20, 512), &out, None);
        let full = std::fs::read(&out).unwrap();
        let mlen = u32::from_le_bytes(full[4..8].try_into().unwrap()) as usize + 8;
        let mut bytes = full[..mlen].to_vec();
        bytes.extend_from_slice(&crate::manifest::signature_frame("not a signature"));
        bytes.extend_from_slice(&full[mlen..]);
        std::fs::write(&out, &bytes).unwrap();
        let img = Image::open(&out).unwrap();
        let e = verify_image_signature(&img, &[key]).unwrap_err();
        assert!(matches!(e, SignatureError::Malformed { .. }), "{e:?}");
    }

    #[test]
    fn install_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, key, _) = keypair();
        let (_, other, _) = keypair();
        let signed = dir.path().join("s.img.zst");
        pack_with(&fake_gpt_raw(2 << 20, 512), &signed, Some(&sk));
        let unsigned = dir.path().join("u.img.zst");
        pack_with(&fake_gpt_raw(2 << 20, 512), &unsigned, None);
        let (signed, unsigned) = (
            Image::open(&signed).unwrap(),
            Image::open(&unsigned).unwrap(),
        );
        let id = Some(key.id().to_string());

        // Required: only a good signature by a trusted key passes.
        let ok = check_policy(&signed, true, &[other.clone(), key.clone()]).unwrap();
        assert_eq!(
            ok,
            SignatureCheck {
                signed: true,
                key_id: id.clone(),
                verified: true
            }
        );
        assert!(matches!(
            check_policy(&unsigned, true, std::slice::from_ref(&key)),
            Err(SignatureError::Unsigned { .. })
        ));
        assert!(matches!(
            check_policy(&unsigned, true, &[]),
            Err(SignatureError::Unsigned { .. })
        ));
        assert!(matches!(
            check_policy(&signed, true, std::slice::from_ref(&other)),
            Err(SignatureError::Untrusted { .. })
        ));
        assert!(matches!(
            check_policy(&signed, true, &[]),
            Err(SignatureError::Untrusted { .. })
        ));

        // Not required: unsigned passes unverified; signed is checked when keys are trusted.
        assert_eq!(
            check_policy(&unsigned, false, std::slice::from_ref(&key)).unwrap(),
            SignatureCheck {
                signed: false,
                key_id: None,
                verified: false
            }
        );
        assert_eq!(
            check_policy(&signed, false, &[]).unwrap(),
            SignatureCheck {
                signed: true,
                key_id: id.clone(),
                verified: false
            }
        );
        assert!(
            check_policy(&signed, false, std::slice::from_ref(&key))
                .unwrap()
                .verified
        );
        assert!(matches!(
            check_policy(&signed, false, std::slice::from_ref(&other)),
            Err(SignatureError::Untrusted { .. })
        ));
    }

    #[test]
    fn trusted_keys_from_config_and_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (_, a, a_pub) = keypair();
        let (_, b, b_pub) = keypair();
        std::fs::write(dir.path().join("b.pub"), &b_pub).unwrap();
        let a_b64 = a_pub.lines().nth(1).unwrap().to_owned();
        let keys = trusted_keys(&[a_b64], dir.path()).unwrap();
        assert_eq!(
            keys.iter().map(TrustedKey::id).collect::<Vec<_>>(),
            [a.id(), b.id()]
        );
        assert_eq!(keys[0].origin(), "trusted_keys[0]");
        assert!(keys[1].origin().ends_with("b.pub"));
        let e = trusted_keys(&["nope".into()], dir.path()).unwrap_err();
        assert!(e.to_string().contains("trusted_keys[0]"), "{e}");
    }

    #[test]
    fn keys_parse_or_are_named() {
        let (_, key, pub_text) = keypair();
        let e = TrustedKey::from_base64("RWQnotakey", "trusted_keys[1]").unwrap_err();
        assert!(
            e.to_string().starts_with("trusted key trusted_keys[1]:"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(load_key_dir(&dir.path().join("absent")).unwrap().is_empty());
        std::fs::write(dir.path().join("a.pub"), &pub_text).unwrap();
        std::fs::write(dir.path().join("README"), "not a key").unwrap();
        let keys = load_key_dir(dir.path()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].id(), key.id());
        std::fs::write(dir.path().join("b.pub"), "untrusted comment: x\nAAAA\n").unwrap();
        let e = load_key_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("b.pub"), "{e}");
    }

    #[test]
    fn base64_decoder() {
        assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
        assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
        assert_eq!(base64_decode("TQ==").unwrap(), b"M");
        assert!(base64_decode("TQ=").is_none());
        assert!(base64_decode("T===").is_none());
        assert!(base64_decode("TQ==TWFu").is_none());
        assert!(base64_decode("TW!u").is_none());
    }
}
