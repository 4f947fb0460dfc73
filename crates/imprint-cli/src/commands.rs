//! The subcommands' work: each takes parsed arguments, runs the library, and reports to the
//! user (a bar on a terminal, plain lines in logs, JSON with `--json`).

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use imprint_core::blockdev::{OpenOptionsTarget, Target, TargetError, TargetKind};
use imprint_core::manifest::{Image, ImageError, Manifest};
use imprint_core::progress::{human_bytes, BarProgress, JsonProgress, LineProgress, Progress};
use imprint_core::signature::{self, SignatureError, TrustedKey};
use imprint_core::verify::{self, VerifyError};
use imprint_core::write::{self, WriteError, WriteOptions};

use crate::prepare::{self, PrepareArgs};

/// Exit status for an error (documented in `imprint --help`).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    // Download failures travel as `io::Error`s through the decoder: find them first, so a
    // lost server is not reported as a bad image.
    for cause in e.chain() {
        if let Some(inner) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if inner.is::<imprint_core::remote::RemoteError>() {
                return 6;
            }
            if inner.is::<imprint_core::manifest::FileDigestMismatch>() {
                return 3;
            }
        }
    }
    for cause in e.chain() {
        if let Some(w) = cause.downcast_ref::<WriteError>() {
            return match w {
                w if w.is_image_fault() => 3,
                WriteError::TooSmall { .. }
                | WriteError::SectorMismatch { .. }
                | WriteError::Unaligned { .. } => 4,
                WriteError::Target(t) => target_code(t),
                _ => 5,
            };
        }
        if cause.downcast_ref::<ImageError>().is_some() {
            return 3;
        }
        if let Some(s) = cause.downcast_ref::<SignatureError>() {
            return match s {
                SignatureError::BadKey { .. } | SignatureError::KeyFile { .. } => 1,
                _ => 3,
            };
        }
        if let Some(t) = cause.downcast_ref::<TargetError>() {
            return target_code(t);
        }
        if let Some(v) = cause.downcast_ref::<VerifyError>() {
            return match v {
                VerifyError::Image(_) => 3,
                VerifyError::Target(t) => target_code(t),
                _ => 5,
            };
        }
        if cause.downcast_ref::<Refused>().is_some() {
            return 4;
        }
    }
    1
}

fn target_code(t: &TargetError) -> u8 {
    match t {
        TargetError::Io { .. } => 5,
        _ => 4,
    }
}

/// The user declined, or confirmation was impossible.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

pub fn progress_for(json: bool) -> Box<dyn Progress> {
    if json {
        Box::new(JsonProgress::new(
            std::io::stdout(),
            Duration::from_millis(500),
        ))
    } else if std::io::stderr().is_terminal() {
        Box::new(BarProgress::stderr())
    } else {
        Box::new(LineProgress::new(std::io::stderr(), Duration::from_secs(5)))
    }
}

/// `imprint prepare`.
pub fn prepare(args: &PrepareArgs) -> Result<()> {
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "prepare [{bar:40}] {bytes}/{total_bytes} of input {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let mut last_line = std::time::Instant::now();
    let (out, m, kind) = prepare::prepare(args, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        } else if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = std::time::Instant::now();
            eprintln!(
                "prepare: {} of {} read",
                human_bytes(done),
                human_bytes(total)
            );
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    eprintln!("read {} ({})", args.input.display(), kind.name());
    println!("{}", out.display());
    print_manifest(&m, out.as_path());
    let img = Image::open(&out)?;
    print_signature(&img)?;
    Ok(())
}

/// `imprint keygen`.
pub fn keygen(name: &Path, password_file: Option<&Path>) -> Result<()> {
    let k = crate::sign::keygen(name, password_file)?;
    println!("key id:      {}", k.id);
    println!(
        "secret key:  {} ({})",
        k.secret.display(),
        if k.encrypted {
            "password-protected"
        } else {
            "NOT password-protected; keep it private"
        }
    );
    println!("public key:  {}", k.public.display());
    println!(
        "trust it with \"trusted_keys\": [\"{}\"] in the stick's config.json,",
        k.public_base64
    );
    println!(
        "or bake {} into the live image (docs/signing.md)",
        k.public.display()
    );
    Ok(())
}

/// Shows whether `img` is signed and by which key.
fn print_signature(img: &Image) -> Result<()> {
    match signature::signature_info(img)? {
        Some(info) => println!(
            "  signature:    key {} ({})",
            info.key_id,
            info.trusted_comment.replace('\t', ", ")
        ),
        None => println!("  signature:    none (unsigned)"),
    }
    Ok(())
}

fn print_manifest(m: &Manifest, path: &Path) {
    let ratio = if m.compressed_size > 0 {
        m.raw_size as f64 / m.compressed_size as f64
    } else {
        0.0
    };
    println!("  image:        {}", path.display());
    println!("  name:         {}", m.name);
    println!("  format:       {} v{}", m.format, m.version);
    println!(
        "  raw size:     {} ({} bytes)",
        human_bytes(m.raw_size),
        m.raw_size
    );
    println!(
        "  compressed:   {} ({} bytes, {ratio:.1}x)",
        human_bytes(m.compressed_size),
        m.compressed_size
    );
    println!(
        "  partitions:   {:?}{}",
        m.partition_table,
        m.sector_size
            .map(|s| format!(", {s}-byte sectors"))
            .unwrap_or_default()
    );
    println!("  sha256:       {}", m.sha256);
    println!(
        "  chunks:       {} of {}",
        m.chunks.len(),
        human_bytes(m.chunk_size)
    );
    println!("  created by:   {}", m.created_by);
}

/// `imprint inspect`.
pub fn inspect(image: &Path, json: bool, check: bool, trust: &[std::path::PathBuf]) -> Result<()> {
    let img = crate::fetch::open_image(image, None)?;
    if check {
        img.check_payload_digest()?;
    }
    let keys = trust
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the public key {}", p.display()))?;
            Ok(TrustedKey::from_pub_file_text(
                &text,
                &p.display().to_string(),
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    let verified = if keys.is_empty() {
        None
    } else {
        Some(signature::verify_image_signature(&img, &keys)?)
    };
    if json {
        println!("{}", serde_json::to_string_pretty(img.manifest())?);
    } else {
        print_manifest(img.manifest(), img.path());
        print_signature(&img)?;
        if let Some(id) = verified {
            println!("  verified:     signature by trusted key {id} matches the manifest");
        }
        if check {
            println!("  payload:      sha256 matches the manifest");
        }
    }
    Ok(())
}

/// A few facts about a block device from sysfs, for the confirmation prompt.
fn describe_block_device(path: &Path) -> String {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let name = canon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = Path::new("/sys/class/block").join(&name);
    let read = |p: &str| {
        std::fs::read_to_string(sys.join(p))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let model = read("device/model");
    let serial = [read("device/serial"), read("serial")]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    let mut parts: Vec<String> = std::fs::read_dir(&sys)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&name) && n != &name)
                .collect()
        })
        .unwrap_or_default();
    parts.sort();
    format!(
        "model {:?}, serial {:?}, partitions: {}",
        if model.is_empty() { "unknown" } else { &model },
        if serial.is_empty() {
            "unknown"
        } else {
            &serial
        },
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(" ")
        }
    )
}

/// Shows `what` and asks `prompt` on the terminal; off a terminal, refuses (the caller's
/// `--yes` is the only way to skip the question).
pub fn confirm_overwrite(what: &str, prompt: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return Err(Refused(format!(
            "{what}\nrefusing without confirmation: not on a terminal; pass --yes"
        ))
        .into());
    }
    eprintln!("{what}");
    let ok = dialoguer::Confirm::new()
        .with_prompt(prompt)
        .default(false)
        .interact()
        .context("asking for confirmation")?;
    if !ok {
        return Err(Refused("not confirmed; nothing was written".into()).into());
    }
    Ok(())
}

/// `imprint write`.
pub fn write(
    image: &Path,
    target: &Path,
    verify: bool,
    precheck: bool,
    yes: bool,
    json: bool,
    sha256: Option<&str>,
) -> Result<()> {
    let img = crate::fetch::open_image(image, sha256)?;
    let m = img.manifest();
    let opts = OpenOptionsTarget {
        file_size_if_new: Some(m.raw_size),
        file_sector_size: m.sector_size.unwrap_or(512),
        ..Default::default()
    };
    let tgt = Target::open(target, &opts)?;
    write::preflight(m, &tgt)?;
    if tgt.kind() == TargetKind::BlockDevice && !yes {
        let what = format!(
            "{} ({}, {}) will be overwritten with {} ({}). Everything on it will be lost.",
            target.display(),
            human_bytes(tgt.size()),
            describe_block_device(target),
            m.name,
            human_bytes(m.raw_size)
        );
        confirm_overwrite(&what, &format!("Write {} to {}?", m.name, target.display()))?;
    }
    let progress = progress_for(json);
    let wopts = WriteOptions {
        verify,
        precheck_payload: precheck,
        ..Default::default()
    };
    let report = write::write_image(&img, &tgt, &wopts, progress.as_ref())
        .with_context(|| format!("writing {} to {}", img.path().display(), target.display()))?;
    drop(progress);
    if json {
        println!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({ "event": "result", "ok": true, "report": report })
            )?
        );
    } else {
        let mbps = |bytes: u64, secs: f64| {
            if secs > 0.0 {
                bytes as f64 / secs / 1e6
            } else {
                0.0
            }
        };
        println!(
            "wrote {} ({}) to {} in {:.1} s ({:.0} MB/s){}",
            report.image_name,
            human_bytes(report.raw_size),
            report.target,
            report.write_seconds,
            mbps(report.raw_size, report.write_seconds),
            if report.zeroed_bytes > 0 {
                format!(", {} of zeros offloaded", human_bytes(report.zeroed_bytes))
            } else {
                String::new()
            }
        );
        if report.verified {
            println!(
                "verified: read back in {:.1} s ({:.0} MB/s), sha256 {}",
                report.verify_seconds,
                mbps(report.raw_size, report.verify_seconds),
                report.image_sha256
            );
        } else {
            println!(
                "not read back (--no-verify); the decoded stream matched sha256 {}",
                report.image_sha256
            );
        }
        if let Some(f) = &report.gpt_fixup {
            println!(
                "moved the backup GPT from LBA {} to the disk's end, LBA {}",
                f.old_backup_lba, f.new_backup_lba
            );
        }
    }
    Ok(())
}

/// `imprint verify`.
pub fn verify(image: &Path, target: &Path, json: bool) -> Result<()> {
    let img = crate::fetch::open_image(image, None)?;
    let m = img.manifest();
    if !target.exists() {
        bail!("{} does not exist", target.display());
    }
    let opts = OpenOptionsTarget {
        read_only: true,
        file_sector_size: m.sector_size.unwrap_or(512),
        ..Default::default()
    };
    let tgt = Target::open(target, &opts)?;
    let progress = progress_for(json);
    let outcome = verify::verify_image(&img, &tgt, progress.as_ref()).with_context(|| {
        format!(
            "verifying {} against {}",
            target.display(),
            img.path().display()
        )
    })?;
    drop(progress);
    if json {
        println!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({ "event": "result", "ok": true, "outcome": outcome })
            )?
        );
    } else {
        println!(
            "{} holds {} (sha256 {})",
            target.display(),
            m.name,
            m.sha256
        );
        if outcome.gpt_backup_at_end {
            println!("  backup GPT at the disk's end");
        }
        if !outcome.extra_partitions.is_empty() {
            println!(
                "  extra partitions beyond the image: {}",
                outcome.extra_partitions.join(", ")
            );
        }
    }
    Ok(())
}

/// `imprint disks`: discovery and the target policy on this machine, touching nothing.
pub fn disks(config: Option<&Path>, image: Option<&Path>, json: bool) -> Result<()> {
    use imprint_core::discover::{self, DiskTable};
    use imprint_core::select;
    let cfg = match config {
        Some(p) => imprint_core::config::Config::load(p)?,
        None => imprint_core::config::Config::default(),
    };
    let (size, sector) = match image {
        Some(p) => {
            let img = Image::open(p)?;
            (img.manifest().raw_size, img.manifest().sector_size)
        }
        None => (0, None),
    };
    let disks = discover::scan(Path::new("/sys")).context("scanning /sys for disks")?;
    // The disk this system runs from is never a candidate, like the stick on the appliance.
    let root = root_disk();
    let sel = select::choose(&disks, &cfg.target, size, sector, root.as_deref());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "disks": disks, "selection": sel }))?
        );
        return Ok(());
    }
    print!("{}", DiskTable(&disks));
    if let Some(r) = &root {
        println!("({r} holds this system's root filesystem: it is treated like the appliance's own stick)");
    }
    for r in sel.rejected() {
        println!("not {}: {}", r.disk.name, r.why);
    }
    match sel.chosen() {
        Some(d) => println!("would choose {}: {}", d.name, sel.reason()),
        None => println!("would not install: {}", sel.reason()),
    }
    Ok(())
}

/// The whole disk holding `/` (from /proc/self/mountinfo and /sys), if any.
fn root_disk() -> Option<String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dev = mi.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == "/").then(|| f[2].to_string())
    })?;
    let sys = std::fs::canonicalize(Path::new("/sys/dev/block").join(&dev)).ok()?;
    let disk = if sys.join("partition").exists() {
        sys.parent()?
    } else {
        sys.as_path()
    };
    disk.file_name().map(|n| n.to_string_lossy().into_owned())
}
