//! Image signing keys: `imprint keygen` and the signer behind `imprint prepare --sign`.
//!
//! Keys are ordinary minisign keys (the `minisign` crate), so `minisign -V` and other minisign
//! tools understand them. Verification is imprint-core's ([`imprint_core::signature`]).
//! See `docs/signing.md`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use imprint_core::manifest::Manifest;
use imprint_core::signature::TrustedKey;
use minisign::{KeyPair, PublicKey, SecretKey, SecretKeyBox};

/// Reads a password from the first line of `path` (trailing newline removed).
fn read_password(path: &Path) -> Result<String> {
    let text = imprint_core::input::read_bounded_string(path, imprint_core::input::limits::KEY)
        .with_context(|| format!("reading the password file {}", path.display()))?;
    let pw = text.lines().next().unwrap_or_default().to_string();
    if pw.is_empty() {
        bail!("the password file {} is empty", path.display());
    }
    Ok(pw)
}

fn with_ext(name: &Path, ext: &str) -> PathBuf {
    let mut s = name.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// Writes `contents` to a new file (never overwrites a key) with `mode`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                path.display()
            )
        })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// What `imprint keygen` made.
#[derive(Debug)]
pub struct NewKey {
    /// The secret key file (`NAME.key`).
    pub secret: PathBuf,
    /// The public key file (`NAME.pub`).
    pub public: PathBuf,
    /// The key id.
    pub id: String,
    /// The public key's base64 line (what `trusted_keys` takes).
    pub public_base64: String,
    /// Whether the secret key is password-protected.
    pub encrypted: bool,
}

/// `imprint keygen -o NAME`: writes a minisign key pair `NAME.key` (mode 0600; encrypted with
/// the password from `password_file`, else unencrypted) and `NAME.pub`.
pub fn keygen(name: &Path, password_file: Option<&Path>) -> Result<NewKey> {
    let secret = with_ext(name, ".key");
    let public = with_ext(name, ".pub");
    for p in [&secret, &public] {
        if p.exists() {
            bail!(
                "{} exists; an existing key is never overwritten",
                p.display()
            );
        }
    }
    let password = password_file.map(read_password).transpose()?;
    let encrypted = password.is_some();
    let KeyPair { pk, sk } = match password {
        Some(pw) => KeyPair::generate_encrypted_keypair(Some(pw)),
        None => KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| anyhow!("generating the key pair: {e}"))?;
    let comment = if encrypted {
        "imprint image signing secret key (password-protected)"
    } else {
        "imprint image signing secret key (NOT password-protected: keep this file private)"
    };
    let sk_box = sk
        .to_box(Some(comment))
        .map_err(|e| anyhow!("encoding the secret key: {e}"))?;
    let pk_box = pk
        .to_box()
        .map_err(|e| anyhow!("encoding the public key: {e}"))?;
    let public_base64 = pk.to_base64();
    let id = TrustedKey::from_base64(&public_base64, &public.display().to_string())?
        .id()
        .to_string();
    // The secret key first: if anything fails after it, no public key exists that would be
    // trusted without its secret.
    write_new(&secret, sk_box.into_string().as_bytes(), 0o600)?;
    write_new(&public, pk_box.into_string().as_bytes(), 0o644)?;
    Ok(NewKey {
        secret,
        public,
        id,
        public_base64,
        encrypted,
    })
}

/// A loaded secret key, ready to sign manifests.
#[derive(Debug)]
pub struct ImageSigner {
    sk: SecretKey,
    pk: PublicKey,
    /// The key id, as minisign shows it.
    pub id: String,
}

impl ImageSigner {
    /// Loads the secret key `key` (a minisign `.key` file); a password-protected key needs
    /// `password_file`. Each signature is checked against the key's public half right after
    /// it is made.
    pub fn load(key: &Path, password_file: Option<&Path>) -> Result<ImageSigner> {
        let text = imprint_core::input::read_bounded_string(key, imprint_core::input::limits::KEY)
            .with_context(|| format!("reading the secret key {}", key.display()))?;
        let sk_box = SecretKeyBox::from_string(&text)
            .map_err(|e| anyhow!("reading the secret key {}: {e}", key.display()))?;
        let sk = match password_file {
            Some(pf) => sk_box.into_secret_key(Some(read_password(pf)?)),
            None => sk_box.into_unencrypted_secret_key(),
        }
        .map_err(|e| {
            let hint = if password_file.is_none() {
                " (a password-protected key needs --password-file)"
            } else {
                ""
            };
            anyhow!("reading the secret key {}: {e}{hint}", key.display())
        })?;
        let pk = PublicKey::from_secret_key(&sk)
            .map_err(|e| anyhow!("deriving the public key of {}: {e}", key.display()))?;
        let id = TrustedKey::from_base64(&pk.to_base64(), &key.display().to_string())?
            .id()
            .to_string();
        Ok(ImageSigner { sk, pk, id })
    }

    /// Signs a manifest's exact JSON bytes; the trusted comment (signed too) names the image.
    pub fn sign(&self, manifest_json: &[u8]) -> Result<String> {
        let name = serde_json::from_slice::<Manifest>(manifest_json)
            .map(|m| m.name)
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Tabs and newlines would break the signature's line format.
        let name: String = name.chars().filter(|c| !c.is_control()).collect();
        let trusted = format!("timestamp:{now}\timage:{name}");
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            manifest_json,
            Some(&trusted),
            Some(&format!("imprint image signature, key {}", self.id)),
        )
        .map_err(|e| anyhow!("signing with key {}: {e}", self.id))?;
        Ok(sig.into_string())
    }
}
