//! The subcommands' work: each takes parsed arguments, runs the library, and reports to the
//! user (a bar on a terminal, plain lines in logs, JSON with `--json`).

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use crate::output::{self, detail, note};
use crate::progress::{BarProgress, JsonProgress, LineProgress, NoProgress};
use crate::units;
use anyhow::{bail, Context, Result};
use imprint_core::blockdev::{OpenOptionsTarget, Target, TargetError, TargetKind};
use imprint_core::manifest::{Image, ImageError, Manifest, PartitionTable};
use imprint_core::progress::Progress;
use imprint_core::signature::{self, SignatureError, TrustedKey};
use imprint_core::verify::{self, VerifyError};
use imprint_core::write::{self, WriteError, WriteOptions};

use crate::prepare::{self, PrepareArgs};

/// `println!` that does not panic when standard output is gone (`imprint write --json | head
/// -c 10`): the work is done by then, and a closed pipe is the reader's choice, not a failure.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use outln;

/// Makes text from an untrusted file (an image's name, a signature's comment) safe to show on
/// a terminal: control characters, including the escape that starts terminal sequences, and
/// bidirectional overrides are shown escaped (`\u{1b}`) instead of acting on the terminal.
pub fn untrusted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Ctrl-C, `kill` and a closed terminal remove this run's temporary files (`.OUT.….partial`, the
/// flash folder, a target file `write --to-file` created) before the process ends. The signals
/// are blocked in every thread and taken by one thread with `sigwait`, where removing files is
/// safe (a signal handler could deadlock on the list's lock).
pub fn remove_temporaries_on_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            imprint_core::input::remove_temporaries();
            eprintln!("imprint: interrupted ({sig}); temporary files removed");
            std::process::exit(128 + sig as i32);
        }
    });
}

/// Prints `e` with its chain on standard error: plain lines, or with `json` one JSON object
/// (`{"event":"error","ok":false,"exit_code":…,"error":…,"causes":[…]}`) on one line. Error text
/// can quote untrusted files, so control characters are escaped (line breaks of our own kept).
pub fn print_error(e: &anyhow::Error, code: u8, json: bool) {
    use std::io::Write as _;
    let safe = |s: String| s.split('\n').map(untrusted).collect::<Vec<_>>().join("\n");
    let mut err = std::io::stderr().lock();
    if json {
        let v = serde_json::json!({
            "event": "error",
            "ok": false,
            "exit_code": code,
            "error": safe(e.to_string()),
            "causes": e.chain().skip(1).map(|c| safe(c.to_string())).collect::<Vec<_>>(),
        });
        let _ = writeln!(err, "{v}");
    } else {
        let _ = writeln!(err, "imprint: error: {}", safe(e.to_string()));
        for cause in e.chain().skip(1) {
            let _ = writeln!(err, "  caused by: {}", safe(cause.to_string()));
        }
    }
}

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
                return 7;
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
        if let Some(i) = cause.downcast_ref::<ImageError>() {
            return match i {
                // The file could not be opened at all (missing, no permission, a FIFO): that
                // says nothing about the image, which was never read.
                ImageError::Io { source, .. }
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound
                            | std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::IsADirectory
                            | std::io::ErrorKind::InvalidInput
                    ) =>
                {
                    1
                }
                _ => 3,
            };
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
                VerifyError::ReadIo { .. }
                | VerifyError::Flush { .. }
                | VerifyError::Interrupted { .. } => 5,
                _ => 6,
            };
        }
        if cause.downcast_ref::<Refused>().is_some() {
            return 4;
        }
    }
    1
}

fn target_code(t: &TargetError) -> u8 {
    if t.is_refusal() {
        4
    } else {
        5
    }
}

/// The user declined, or confirmation was impossible.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// How progress is shown: JSON events with `--json`, nothing with `--quiet`, a bar on a
/// terminal, plain lines every 5 s in logs.
pub fn progress_for(json: bool) -> Box<dyn Progress> {
    if json {
        Box::new(JsonProgress::new(
            std::io::stdout(),
            Duration::from_millis(500),
        ))
    } else if output::quiet() {
        Box::new(NoProgress)
    } else if std::io::stderr().is_terminal() {
        Box::new(BarProgress::stderr())
    } else {
        Box::new(LineProgress::new(std::io::stderr(), Duration::from_secs(5)))
    }
}

/// `imprint prepare`.
pub fn prepare(args: &PrepareArgs) -> Result<()> {
    let bar = if args.json {
        None
    } else {
        crate::progress::terminal_bar("prepare")
    };
    let mut last_line = std::time::Instant::now();
    let start = std::time::Instant::now();
    let (out, m, kind) = prepare::prepare(args, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        } else if !args.json && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = std::time::Instant::now();
            note!(
                "prepare: {} of {} read ({})",
                units::size(done),
                units::size(total),
                units::rate(done, start.elapsed().as_secs_f64())
            );
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let img = Image::open(&out)?;
    if args.json {
        let signature = signature::signature_info(&img)?.map(|info| {
            serde_json::json!({ "key_id": info.key_id.to_string(), "trusted_comment": info.trusted_comment })
        });
        outln!(
            "{}",
            serde_json::json!({
                "event": "result",
                "ok": true,
                "image": out,
                "input": args.input,
                "input_format": kind.name(),
                "seconds": start.elapsed().as_secs_f64(),
                "manifest": m,
                "signature": signature,
            })
        );
        return Ok(());
    }
    note!("read {} ({})", args.input.display(), kind.name());
    detail!(
        "prepare: {} of disk image in {} ({})",
        units::size(m.raw_size),
        units::duration(start.elapsed().as_secs_f64()),
        units::rate(m.raw_size, start.elapsed().as_secs_f64())
    );
    outln!("{}", out.display());
    if !output::quiet() {
        print_manifest(&m, out.as_path());
        // Signed with the key just loaded, and checked against its public half (sign.rs).
        print_signature(&img, true)?;
    }
    Ok(())
}

/// `imprint keygen`.
pub fn keygen(name: &Path, password_file: Option<&Path>, json: bool) -> Result<()> {
    let k = crate::sign::keygen(name, password_file)?;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "event": "result",
                "ok": true,
                "key_id": k.id.to_string(),
                "secret_key": k.secret,
                "public_key": k.public,
                "encrypted": k.encrypted,
                "public_key_base64": k.public_base64,
            })
        );
        return Ok(());
    }
    outln!("key id:      {}", k.id);
    if output::quiet() {
        return Ok(());
    }
    outln!(
        "secret key:  {} ({})",
        k.secret.display(),
        if k.encrypted {
            "password-protected"
        } else {
            "NOT password-protected; keep it private"
        }
    );
    outln!("public key:  {}", k.public.display());
    outln!(
        "trust it with \"trusted_keys\": [\"{}\"] in the stick's config.json,",
        k.public_base64
    );
    outln!(
        "or bake {} into the live image (docs/signing.md)",
        k.public.display()
    );
    Ok(())
}

/// `imprint build`: the stick image file, then one result line (or JSON).
pub fn build(opts: &crate::stick::BuildOptions, json: bool) -> Result<()> {
    let start = std::time::Instant::now();
    let layout = crate::stick::build(opts)?;
    let secs = start.elapsed().as_secs_f64();
    let esp_bytes = (layout.esp_lba.1 - layout.esp_lba.0 + 1) * crate::stick::SECTOR;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "event": "result",
                "ok": true,
                "stick": opts.output,
                "size": layout.size,
                "esp_partuuid": layout.esp_partuuid.to_string(),
                "esp_bytes": esp_bytes,
                "esp_lba": [layout.esp_lba.0, layout.esp_lba.1],
                "payload_lba": [layout.payload_lba.0, layout.payload_lba.1],
                "image": opts.image,
                "image_name": layout.image_name,
                "image_bytes": layout.payload_len,
                "boot": opts.boot,
                "seconds": secs,
            })
        );
        return Ok(());
    }
    detail!(
        "ESP: LBA {}..{} ({}), PARTUUID {}; payload: LBA {}..{}",
        layout.esp_lba.0,
        layout.esp_lba.1,
        units::size(esp_bytes),
        layout.esp_partuuid,
        layout.payload_lba.0,
        layout.payload_lba.1
    );
    detail!("built in {}", units::duration(secs));
    outln!(
        "{} ({}): a stick with {} ({}) and boot files from {}",
        opts.output.display(),
        units::size(layout.size),
        untrusted(&layout.image_name),
        units::size(layout.payload_len),
        opts.boot.display()
    );
    Ok(())
}

/// Shows whether `img` is signed and by which key. Unless `checked`, a signature is shown as
/// not verified: anyone can sign with a key of their own, and the comment is the signer's text.
fn print_signature(img: &Image, checked: bool) -> Result<()> {
    match signature::signature_info(img)? {
        Some(info) => {
            outln!(
                "  signature:    key {} ({})",
                info.key_id,
                untrusted(&info.trusted_comment.replace('\t', ", "))
            );
            if !checked {
                outln!(
                    "  verified:     no: signature not verified (pass --trust KEY.pub to check it)"
                );
            }
        }
        None => outln!("  signature:    none (unsigned)"),
    }
    Ok(())
}

fn print_manifest(m: &Manifest, path: &Path) {
    let ratio = if m.compressed_size > 0 {
        m.raw_size as f64 / m.compressed_size as f64
    } else {
        0.0
    };
    outln!("  image:        {}", path.display());
    outln!("  name:         {}", untrusted(&m.name));
    outln!("  format:       {} v{}", untrusted(&m.format), m.version);
    outln!("  raw size:     {}", units::size_exact(m.raw_size));
    outln!(
        "  compressed:   {} ({} bytes, {ratio:.1}x)",
        units::size(m.compressed_size),
        m.compressed_size
    );
    outln!(
        "  partitions:   {}{}",
        partition_table_name(m.partition_table),
        m.sector_size
            .map(|s| format!(", {s}-byte sectors"))
            .unwrap_or_default()
    );
    outln!("  sha256:       {}", m.sha256);
    outln!(
        "  chunks:       {} of {}",
        m.chunks.len(),
        units::size(m.chunk_size)
    );
    match (&m.frames, m.frame_size) {
        (Some(frames), Some(fs)) => outln!(
            "  frames:       {} of {} (decoded in parallel)",
            frames.len(),
            units::size(fs)
        ),
        _ => outln!("  frames:       one stream (decoded on one thread)"),
    }
    outln!("  created by:   {}", untrusted(&m.created_by));
}

/// The partition table kind as users name it.
fn partition_table_name(t: PartitionTable) -> &'static str {
    match t {
        PartitionTable::Gpt => "GPT",
        PartitionTable::Mbr => "MBR",
        PartitionTable::None => "none",
    }
}

/// Text from a device or a file, in double quotes and made safe for a terminal.
pub fn quoted(s: &str) -> String {
    format!("\"{}\"", untrusted(s))
}

/// Checks `img`'s signature against the public key files `trust`: `None` when none are given,
/// the signer's key id when one matches, an error (exit 3) otherwise.
fn check_trust(img: &Image, trust: &[std::path::PathBuf]) -> Result<Option<signature::KeyId>> {
    if trust.is_empty() {
        return Ok(None);
    }
    let keys = trust
        .iter()
        .map(|p| {
            let text =
                imprint_core::input::read_bounded_string(p, imprint_core::input::limits::KEY)
                    .with_context(|| format!("reading the public key {}", p.display()))?;
            Ok(TrustedKey::from_pub_file_text(
                &text,
                &p.display().to_string(),
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(signature::verify_image_signature(img, &keys)?))
}

/// `imprint inspect`.
pub fn inspect(image: &Path, json: bool, check: bool, trust: &[std::path::PathBuf]) -> Result<()> {
    let img = crate::fetch::open_image(image, None)?;
    if check {
        img.check_payload_digest()?;
    }
    let verified = check_trust(&img, trust)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(img.manifest())?);
    } else {
        print_manifest(img.manifest(), img.path());
        print_signature(&img, verified.is_some())?;
        if let Some(id) = verified {
            outln!("  verified:     signature by trusted key {id} matches the manifest");
        }
        if check {
            outln!("  payload:      sha256 matches the manifest");
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
        "model {}, serial {}, partitions: {}",
        quoted(if model.is_empty() { "unknown" } else { &model }),
        quoted(if serial.is_empty() {
            "unknown"
        } else {
            &serial
        }),
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
#[allow(clippy::too_many_arguments)]
pub fn write(
    image: &Path,
    target: &Path,
    verify: bool,
    precheck: bool,
    yes: bool,
    json: bool,
    to_file: bool,
    trust: &[std::path::PathBuf],
    sha256: Option<&str>,
) -> Result<()> {
    let img = crate::fetch::open_image(image, sha256)?;
    let m = img.manifest();
    // With --trust, a signature that does not check out stops here, before the target is
    // even opened.
    let signer = check_trust(&img, trust)?;
    // A regular file only when asked for: a mistyped disk name must not "succeed" as a new
    // file, nor an image file be overwritten by a slip of the argument order.
    if !to_file {
        if let Ok(meta) = std::fs::metadata(target) {
            if meta.is_file() {
                return Err(Refused(format!(
                    "{} is a regular file, not a disk; pass --to-file to write the image into a file",
                    target.display()
                ))
                .into());
            }
        } else if !target.starts_with("/dev") && target.symlink_metadata().is_err() {
            return Err(Refused(format!(
                "{} does not exist; give an existing whole-disk block device (see `lsblk`), \
                 or pass --to-file to write the image into a new file",
                target.display()
            ))
            .into());
        }
    }
    let opts = OpenOptionsTarget {
        file_size_if_new: to_file.then_some(m.raw_size),
        file_sector_size: m.sector_size.unwrap_or(512),
        ..Default::default()
    };
    let tgt = Target::open(target, &opts)?;
    if tgt.created() {
        // Interrupted, the new file goes too (see main.rs).
        imprint_core::input::register_temporary(target);
    }
    let result = write_opened(&img, image, target, &tgt, verify, precheck, yes, json);
    if result.is_ok() && !json && !output::quiet() {
        match (signer, img.signature().is_some()) {
            (Some(id), _) => outln!("signature: verified, by trusted key {id}"),
            (None, true) => {
                outln!("signature: not verified (pass --trust KEY.pub to check it before writing)")
            }
            (None, false) => {}
        }
    }
    if tgt.created() {
        imprint_core::input::unregister_temporary(target);
        if result.is_err() {
            // Nothing of value is in a file this run created: leave no half-written file.
            let _ = std::fs::remove_file(target);
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn write_opened(
    img: &Image,
    image: &Path,
    target: &Path,
    tgt: &Target,
    verify: bool,
    precheck: bool,
    yes: bool,
    json: bool,
) -> Result<()> {
    let m = img.manifest();
    tgt.check_not_image(image, Path::new("/sys"))?;
    write::preflight(m, tgt)?;
    if tgt.kind() == TargetKind::BlockDevice && !yes {
        let what = format!(
            "{} ({}, {}) will be overwritten with {} ({}). Everything on it will be lost.",
            target.display(),
            units::size(tgt.size()),
            describe_block_device(target),
            untrusted(&m.name),
            units::size(m.raw_size)
        );
        confirm_overwrite(
            &what,
            &format!("Write {} to {}?", untrusted(&m.name), target.display()),
        )?;
    }
    let progress = progress_for(json);
    let wopts = WriteOptions {
        verify,
        precheck_payload: precheck,
        started: Some(crate::started()),
        ..Default::default()
    };
    let report = write::write_image(img, tgt, &wopts, progress.as_ref())
        .with_context(|| format!("writing {} to {}", img.path().display(), target.display()))?;
    drop(progress);
    if json {
        outln!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({ "event": "result", "ok": true, "report": report })
            )?
        );
    } else {
        print_write_report(&report);
    }
    Ok(())
}

/// The text result of `imprint write`: one line (all `--quiet` shows), then details.
fn print_write_report(report: &write::WriteReport) {
    outln!(
        "wrote {} ({}) to {} in {} ({}), {}",
        untrusted(&report.image_name),
        units::size(report.raw_size),
        report.target,
        units::duration(report.write_seconds),
        units::rate(report.raw_size, report.write_seconds),
        if report.verified {
            "verified"
        } else {
            "not read back (--no-verify)"
        }
    );
    if output::quiet() {
        return;
    }
    if report.zeroed_bytes > 0 {
        outln!(
            "zeros: {} offloaded to the disk, not written",
            units::size(report.zeroed_bytes)
        );
    }
    if report.verified {
        outln!(
            "verified: read back alongside the write, done {} after it, sha256 {}",
            units::duration(report.verify_seconds),
            report.image_sha256
        );
    } else {
        outln!(
            "not read back (--no-verify); the decoded stream matched sha256 {}",
            report.image_sha256
        );
    }
    if let Some(t) = &report.partition_table {
        if t.backup_lba != t.image_backup_lba {
            outln!(
                "partition table laid out for the disk: backup GPT at its last sector (LBA {}, the image had it at {})",
                t.backup_lba, t.image_backup_lba
            );
        }
    }
    detail!(
        "phases: write {}, read-back {}, partition table {}",
        units::duration(report.write_seconds),
        units::duration(report.verify_seconds),
        units::duration(report.commit_seconds)
    );
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
        outln!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({ "event": "result", "ok": true, "outcome": outcome })
            )?
        );
    } else {
        outln!(
            "{} holds {} (sha256 {})",
            target.display(),
            untrusted(&m.name),
            m.sha256
        );
        if output::quiet() {
            return Ok(());
        }
        if outcome.gpt_backup_at_end {
            outln!("  backup GPT at the disk's end");
        }
        if !outcome.extra_partitions.is_empty() {
            outln!(
                "  extra partitions beyond the image: {}",
                untrusted(&outcome.extra_partitions.join(", "))
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
    // Like the appliance, which stops without writing: no candidate is exit 4 (a script
    // checking a machine before the visit sees it without parsing the text).
    let would_not = || -> Result<()> {
        match &sel {
            select::Selection::NoCandidate { reason, .. } => {
                Err(Refused(format!("would not install: {reason}")).into())
            }
            _ => Ok(()),
        }
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "disks": disks, "selection": sel }))?
        );
        return would_not();
    }
    if !output::quiet() {
        outln!("{}", DiskTable(&disks).to_string().trim_end_matches('\n'));
        if let Some(r) = &root {
            outln!("({r} holds this system's root filesystem: it is treated like the appliance's own stick)");
        }
        for r in sel.rejected() {
            outln!("not {}: {}", r.disk.name, r.why);
        }
    }
    match sel.chosen() {
        Some(d) => outln!("would choose {}: {}", d.name, sel.reason()),
        None => outln!("would not install: {}", sel.reason()),
    }
    would_not()
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io;

    fn io_err(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "x")
    }

    #[test]
    fn exit_codes_say_whose_fault_it_is() {
        let target = |step, kind| -> anyhow::Error {
            TargetError::Io {
                step,
                path: "/dev/sdz".into(),
                source: io_err(kind),
            }
            .into()
        };
        // Refused while opening (nothing written): 4, permission denied included.
        assert_eq!(
            exit_code(&target("opening", io::ErrorKind::PermissionDenied)),
            4
        );
        assert_eq!(exit_code(&target("locking", io::ErrorKind::Other)), 4);
        // Failed while writing: 5.
        assert_eq!(
            exit_code(&target("syncing data to", io::ErrorKind::Other)),
            5
        );
        // The image file could not be opened: 1, not "the image is bad".
        for kind in [
            io::ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput,
        ] {
            let e: anyhow::Error = ImageError::Io {
                path: "x.img.zst".into(),
                source: io_err(kind),
            }
            .into();
            assert_eq!(exit_code(&e), 1, "{kind:?}");
        }
        let e: anyhow::Error = ImageError::NotAnImage { path: "x".into() }.into();
        assert_eq!(exit_code(&e), 3);
        let e: anyhow::Error = TargetError::Missing {
            path: "/dev/sdz".into(),
            hint: "h",
        }
        .into();
        assert_eq!(exit_code(&e), 4);
    }

    #[test]
    fn untrusted_text_loses_its_control_characters() {
        assert_eq!(untrusted("debian 12"), "debian 12");
        assert_eq!(
            untrusted("a\u{1b}[2K\r\nb\u{7}\u{9b}\u{202e}"),
            "a\\u{1b}[2K\\u{d}\\u{a}b\\u{7}\\u{9b}\\u{202e}"
        );
    }
}
