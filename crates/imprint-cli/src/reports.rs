//! `imprint reports`: the fleet at a glance from the appliance's JSON reports — in a folder, a
//! mounted stick (its `imprint/reports/`), a stick image file or the stick's block device (read
//! through its GPT and FAT, never written) — as a table, as JSON, or as a machines-table
//! skeleton for `config.json` built from the machines the reports saw.
//!
//! The reader is tolerant: it takes the fields it shows by their JSON names and ignores the
//! rest, so reports from older and newer appliances (and inventory runs) all list. A file that
//! is not a report is skipped with a warning; it never stops the listing.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use imprint_core::blockdev::PartitionSlice;
use imprint_core::machine::{is_placeholder_serial, MacAddr};
use imprint_core::stick::{ESP_LABEL, REPORTS_DIR};
use serde_json::{json, Map, Value};

use crate::commands::outln;
use crate::output::note;

/// One report file's contents, by name.
#[derive(Debug)]
struct ReportFile {
    /// Where it came from (a path, or `IMAGE:imprint/reports/NAME`).
    source: String,
    report: Value,
}

/// One row of the fleet table.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    install_id: String,
    machine: String,
    hostname: String,
    status: String,
    image: String,
    started_at: Option<u64>,
    when: String,
    duration_secs: Option<f64>,
    target_disk: String,
    error: Option<String>,
    file: String,
}

/// Runs `imprint reports SOURCE`.
pub fn reports(source: &Path, json: bool, machines: bool) -> Result<()> {
    let files = load(source)?;
    if files.is_empty() {
        bail!(
            "no reports in {}: the appliance writes them to imprint/reports/ on the stick",
            source.display()
        );
    }
    if machines {
        let fragment = machines_skeleton(&files);
        outln!("{}", serde_json::to_string_pretty(&fragment)?);
        return Ok(());
    }
    let rows: Vec<Row> = files.iter().map(row).collect();
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        outln!("{}", table(&rows).trim_end_matches('\n'));
    }
    Ok(())
}

/// Reads every `*.json` report from `source`, oldest first.
fn load(source: &Path) -> Result<Vec<ReportFile>> {
    let meta = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    let mut raw: Vec<(String, Vec<u8>)> = if meta.is_dir() {
        let stick = source.join(REPORTS_DIR);
        let dir = if stick.is_dir() {
            stick
        } else {
            source.to_path_buf()
        };
        read_dir_reports(&dir)?
    } else if meta.is_file() || meta.file_type().is_block_device() {
        read_stick_reports(source)?
    } else {
        bail!(
            "{}: give a folder of reports, a mounted stick, or a stick image",
            source.display()
        );
    };
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (name, bytes) in raw {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) if v.get("install_id").is_some() && v.get("status").is_some() => {
                out.push(ReportFile {
                    source: name,
                    report: v,
                })
            }
            Ok(_) => note!("imprint: skipping {}: not an imprint report", clean(&name)),
            Err(e) => note!("imprint: skipping {}: not JSON ({e})", clean(&name)),
        }
    }
    out.sort_by_key(|f| f.report["started_at"].as_u64().unwrap_or(0));
    Ok(out)
}

fn read_dir_reports(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|x| x == "json") && path.is_file() {
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.push((path.display().to_string(), bytes));
        }
    }
    Ok(out)
}

/// The reports on a stick image or device: its ESP (GPT partition `IMPRINT`), read only.
fn read_stick_reports(image: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let not_stick = || {
        format!(
            "{} is not an imprint stick (no GPT partition named {ESP_LABEL}); give a folder \
             of reports or a mounted stick instead",
            image.display()
        )
    };
    let (start, len) = {
        let g = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .open(image)
            .with_context(not_stick)?;
        let esp = g
            .partitions()
            .values()
            .find(|p| p.name == ESP_LABEL)
            .with_context(not_stick)?;
        (
            esp.first_lba * 512,
            (esp.last_lba + 1 - esp.first_lba) * 512,
        )
    };
    let mut file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let slice = PartitionSlice::new(&mut file, start, len);
    let fat = fatfs::FileSystem::new(slice, fatfs::FsOptions::new())
        .with_context(|| format!("reading the FAT file system of {}", image.display()))?;
    let dir = match fat.root_dir().open_dir(REPORTS_DIR) {
        Ok(d) => d,
        Err(_) => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for entry in dir.iter() {
        let entry = entry.with_context(|| format!("listing {REPORTS_DIR} on the stick"))?;
        let name = entry.file_name();
        if entry.is_file() && name.ends_with(".json") {
            let mut bytes = Vec::new();
            entry
                .to_file()
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading {REPORTS_DIR}/{name} on the stick"))?;
            out.push((format!("{}:{REPORTS_DIR}/{name}", image.display()), bytes));
        }
    }
    Ok(out)
}

/// Text from a report for a terminal: control characters escaped, never raw.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn text(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(clean)
}

/// The machine's real DMI serial, if the firmware has one.
fn serial(machine: &Value) -> Option<String> {
    ["product_serial", "board_serial"]
        .iter()
        .filter_map(|k| text(&machine["dmi"][k]))
        .find(|s| !is_placeholder_serial(s))
}

/// The machine's NICs as (name, MAC, wireless), wired first.
fn nics(machine: &Value) -> Vec<(String, MacAddr, bool)> {
    let mut out: Vec<(String, MacAddr, bool)> = machine["nics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let mac: MacAddr = n["mac"].as_str()?.parse().ok()?;
            Some((
                text(&n["name"]).unwrap_or_default(),
                mac,
                n["wireless"].as_bool().unwrap_or(false),
            ))
        })
        .filter(|(_, mac, _)| !mac.is_zero())
        .collect();
    out.sort_by_key(|n| n.2);
    out
}

/// The machine as one short name: its DMI serial, else its first wired MAC.
fn machine_name(machine: &Value) -> String {
    serial(machine)
        .or_else(|| nics(machine).first().map(|n| n.1.to_string()))
        .unwrap_or_else(|| "?".into())
}

/// UTC `YYYY-MM-DD HH:MM` for seconds since the epoch.
fn utc(secs: u64) -> String {
    // Days to civil date (H. Hinnant's algorithm), as the appliance names its reports.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let t = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", t / 3600, (t / 60) % 60)
}

fn row(f: &ReportFile) -> Row {
    let r = &f.report;
    let started_at = r["started_at"].as_u64().filter(|&s| s > 0);
    // Timings per phase; `total` when the run got to the end, else the phases so far.
    let timings = r["timings"].as_object();
    let duration_secs = timings.and_then(|t| {
        t.get("total").and_then(Value::as_f64).or_else(|| {
            let sum: f64 = t.values().filter_map(Value::as_f64).sum();
            (!t.is_empty()).then_some(sum)
        })
    });
    let chosen = text(&r["selection"]["chosen"]);
    let target_disk = match &chosen {
        Some(name) => {
            let disk = r["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["name"].as_str() == Some(name.as_str()));
            match disk.and_then(|d| text(&d["serial"])) {
                Some(serial) => format!("{name} ({serial})"),
                None => name.clone(),
            }
        }
        None => String::new(),
    };
    Row {
        install_id: text(&r["install_id"]).unwrap_or_default(),
        machine: machine_name(&r["machine"]),
        hostname: text(&r["seed"]["summary"]["hostname"]).unwrap_or_default(),
        status: text(&r["status"]).unwrap_or_else(|| "?".into()),
        image: text(&r["image"]["name"]).unwrap_or_default(),
        started_at,
        when: started_at.map(utc).unwrap_or_default(),
        duration_secs,
        target_disk,
        error: text(&r["error"]),
        file: clean(&f.source),
    }
}

fn table(rows: &[Row]) -> String {
    let header = [
        "MACHINE",
        "HOSTNAME",
        "STATUS",
        "IMAGE",
        "WHEN (UTC)",
        "TOOK",
        "TARGET",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            [
                dash(&r.machine),
                dash(&r.hostname),
                dash(&r.status),
                dash(&r.image),
                dash(&r.when),
                r.duration_secs
                    .map(crate::units::duration)
                    .unwrap_or_else(|| "-".into()),
                dash(&r.target_disk),
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for c in &cells {
        for (w, cell) in width.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(width).enumerate() {
            if i + 1 == c.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&header.map(String::from));
    for c in &cells {
        out.push_str(&line(c));
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.error.is_some()).collect();
    if !failed.is_empty() {
        out.push('\n');
        for r in failed {
            out.push_str(&format!(
                "{} {}: {}\n",
                r.install_id,
                r.machine,
                r.error.as_deref().unwrap_or_default()
            ));
        }
    }
    out
}

/// A `config.json` fragment with one `seed.machines` entry per machine the reports saw (the
/// latest report of each wins), keyed by its first wired MAC — or its DMI serial when it has
/// no NIC — with the hostname it got, or `""` to fill in (the config refuses an empty
/// hostname, so a skeleton cannot be used unfinished).
fn machines_skeleton(files: &[ReportFile]) -> Value {
    let mut by_key: BTreeMap<String, Value> = BTreeMap::new();
    for f in files {
        let m = &f.report["machine"];
        let nics = nics(m);
        let serial = serial(m);
        let mut entry = Map::new();
        let key = match (nics.first(), &serial) {
            (Some((_, mac, _)), _) => {
                entry.insert("mac".into(), json!(mac.to_string()));
                format!("mac={mac}")
            }
            (None, Some(s)) => {
                entry.insert("dmi_serial".into(), json!(s));
                format!("serial={}", s.to_ascii_lowercase())
            }
            (None, None) => continue,
        };
        entry.insert(
            "hostname".into(),
            json!(text(&f.report["seed"]["summary"]["hostname"]).unwrap_or_default()),
        );
        let mut note = Vec::new();
        let model: Vec<String> = ["sys_vendor", "product_name"]
            .iter()
            .filter_map(|k| text(&m["dmi"][k]))
            .collect();
        if !model.is_empty() {
            note.push(model.join(" "));
        }
        if let Some(s) = &serial {
            note.push(format!("serial {s}"));
        }
        if !nics.is_empty() {
            let list: Vec<String> = nics
                .iter()
                .map(|(name, mac, wireless)| {
                    format!("{name} {mac}{}", if *wireless { " (wireless)" } else { "" })
                })
                .collect();
            note.push(format!("NICs {}", list.join(", ")));
        }
        note.push(format!(
            "seen by report {}",
            text(&f.report["install_id"]).unwrap_or_default()
        ));
        entry.insert("note".into(), json!(note.join("; ")));
        by_key.insert(key, Value::Object(entry));
    }
    json!({ "seed": { "machines": by_key.into_values().collect::<Vec<_>>() } })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(1_764_070_930), "2025-11-25 11:42");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00");
        assert_eq!(crate::units::duration(4.4), "4.4 s");
        assert_eq!(crate::units::duration(252.0), "4 min 12 s");
        assert_eq!(crate::units::duration(3_700.0), "1 h 01 min");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(clean("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
    }
}
