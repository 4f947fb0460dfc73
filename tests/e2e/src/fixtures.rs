//! Fixtures the VM scenarios share: images, sticks and disks made by the real tools, and the
//! reports read back from a stick. Everything is generated in the test's temp dir; nothing is
//! committed.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{boot_dir, imprint_bin, run, E2eError, Vm, VmBuilder, STICK_ESP_OFFSET};

const MIB: u64 = 1 << 20;

/// sha256 of a file, hex (via `sha256sum`: disk files are gigabytes, sparse).
pub fn sha256_file(path: &Path) -> Result<String, E2eError> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A sparse disk file of `size` bytes with a little old data at 512 KiB and every 256 MiB,
/// so that "untouched" and "not empty" mean something.
pub fn old_disk(path: &Path, size: u64) -> Result<PathBuf, E2eError> {
    let io = |source| E2eError::Io {
        what: "creating",
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::create(path).map_err(io)?;
    f.set_len(size).map_err(io)?;
    f.write_all_at(b"OLD DATA", 512 * 1024).map_err(io)?;
    for off in (256 * MIB..size).step_by(256 << 20) {
        f.write_all_at(b"OLD DATA", off).map_err(io)?;
    }
    Ok(path.to_owned())
}

/// A 64 MiB GPT disk image (16 MiB ESP + a data partition holding 2 MiB of data), laid out for
/// `sector_size` (sgdisk on a loop device of that sector size: needs root), prepared into an
/// imprint image — signed with the minisign key `sign` if given.
pub fn small_image(
    dir: &Path,
    name: &str,
    sector_size: u32,
    sign: Option<&Path>,
) -> Result<PathBuf, E2eError> {
    let raw = dir.join(format!("{name}.raw"));
    let io = |source| E2eError::Io {
        what: "creating",
        path: raw.clone(),
        source,
    };
    let f = std::fs::File::create(&raw).map_err(io)?;
    f.set_len(64 * MIB).map_err(io)?;
    drop(f);
    let dev = run(Command::new("losetup")
        .args([
            "--find",
            "--show",
            "--sector-size",
            &sector_size.to_string(),
        ])
        .arg(&raw))?;
    let dev = dev.trim().to_string();
    let made =
        run(Command::new("sgdisk").args(["-n1:0:+16M", "-t1:ef00", "-n2:0:0", "-t2:8300", &dev]));
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    made?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .map_err(io)?;
    f.write_all_at(&vec![0x5Au8; 2 * MIB as usize], 20 * MIB)
        .map_err(io)?;
    let img = dir.join(format!("{name}.img.zst"));
    let mut cmd = Command::new(imprint_bin()?);
    cmd.arg("prepare").arg(&raw).arg("-o").arg(&img);
    if let Some(k) = sign {
        cmd.arg("--sign").arg(k);
    }
    run(&mut cmd)?;
    Ok(img)
}

/// `imprint build` of a stick for `image` with `config` (JSON text) and the seed folder `seed`.
pub fn stick_with(
    dir: &Path,
    name: &str,
    image: &Path,
    seed: Option<&Path>,
    config: &str,
) -> Result<PathBuf, E2eError> {
    let cfg = dir.join(format!("config-{name}.json"));
    std::fs::write(&cfg, config).map_err(|source| E2eError::Io {
        what: "writing",
        path: cfg.clone(),
        source,
    })?;
    let out = dir.join(format!("stick-{name}.img"));
    let mut cmd = Command::new(imprint_bin()?);
    cmd.arg("build")
        .arg("--image")
        .arg(image)
        .arg("--config")
        .arg(&cfg);
    if let Some(s) = seed {
        cmd.arg("--seed").arg(s);
    }
    cmd.arg("--boot").arg(boot_dir()?).arg("-o").arg(&out);
    run(&mut cmd)?;
    Ok(out)
}

/// The reports the appliance wrote to the stick (`imprint/reports/*.json`), oldest first.
pub fn stick_reports(stick: &Path) -> Result<Vec<serde_json::Value>, E2eError> {
    let esp = format!("{}@@{STICK_ESP_OFFSET}", stick.display());
    let list = run(Command::new("mdir").env("MTOOLS_SKIP_CHECK", "1").args([
        "-b",
        "-i",
        &esp,
        "::imprint/reports",
    ]))?;
    let mut names: Vec<&str> = list.lines().filter(|l| l.ends_with(".json")).collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let text = run(Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-i", &esp, n]))?;
            serde_json::from_str(&text)
                .map_err(|e| E2eError::Missing(format!("report {n} is not JSON: {e}")))
        })
        .collect()
}

/// Boots until the appliance prints `IMPRINT-DONE` (it then waits or powers off), then stops
/// the VM. Returns it (for its VARS) and the console log.
pub fn run_until_done(vm: VmBuilder) -> Result<(Vm, String), E2eError> {
    let mut v = vm.timeout(Duration::from_secs(600)).start()?;
    v.wait_for("IMPRINT-DONE", Duration::from_secs(400))?;
    std::thread::sleep(Duration::from_secs(1));
    v.kill();
    let log = v.log();
    Ok((v, log))
}
