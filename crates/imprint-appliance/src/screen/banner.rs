//! The final banners, built from the run's report (the one typed record of what happened), so
//! the screen says exactly what the report on the stick says.

use imprint_core::config::After;
use imprint_core::report::{Report, Status};
use serde_json::Value;

use super::{clock, Banner};

/// A string at a JSON pointer of the report.
fn text(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer).and_then(|x| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// The address cloud-init will give the machine, in words.
fn address(v: &Value) -> String {
    match v.pointer("/seed/summary/network") {
        Some(Value::Object(o)) if o.contains_key("table-static") => {
            text(v, "/seed/summary/network/table-static/address")
                .unwrap_or_else(|| "static (machines table)".into())
        }
        Some(Value::String(s)) if s == "table-network-config" => {
            "static (machines table's network_config)".into()
        }
        Some(Value::String(s)) if s == "template" => "from the seed's network-config".into(),
        _ => "DHCP (see your DHCP server for the lease)".into(),
    }
}

/// The target disk as the report names it: `nvme0n1 (Samsung SSD 980, S/N S6B0…)`.
fn disk(v: &Value) -> Option<String> {
    let name = text(v, "/selection/chosen")?;
    let found = v
        .pointer("/disks")
        .and_then(Value::as_array)
        .and_then(|ds| {
            ds.iter()
                .find(|d| text(d, "/name").as_deref() == Some(&name))
        });
    Some(match found {
        Some(d) => format!(
            "{name} ({}, S/N {})",
            text(d, "/model").unwrap_or_else(|| "?".into()),
            text(d, "/serial").unwrap_or_else(|| "?".into())
        ),
        None => name,
    })
}

/// DONE: hostname, address, image, disk, time and what happens next.
pub fn done(rep: &Report, after: After) -> Banner {
    let v = serde_json::to_value(rep).unwrap_or_default();
    let mut lines = Vec::new();
    if rep.status == Status::AlreadyInstalled {
        lines.push((
            "Status".into(),
            "already installed by an earlier run: nothing written".into(),
        ));
    } else {
        lines.push((
            "Hostname".into(),
            text(&v, "/seed/summary/hostname").unwrap_or_else(|| "?".into()),
        ));
        lines.push(("Address".into(), address(&v)));
    }
    lines.push((
        "Image".into(),
        text(&v, "/image/name").unwrap_or_else(|| "?".into()),
    ));
    if let Some(d) = disk(&v) {
        lines.push(("Disk".into(), d));
    }
    if let Some(t) = rep.timings.get("total") {
        lines.push(("Time".into(), clock(*t)));
    }
    lines.push((
        "Next".into(),
        match after {
            After::Reboot => "rebooting into the installed system; the stick may stay in",
            After::Poweroff => "powering off; remove the stick, then power on",
            After::Wait => "waiting; remove the stick and power-cycle to boot the system",
        }
        .into(),
    ));
    Banner::Done(lines)
}

/// Stopped before writing: why, and what to do.
pub fn stopped(heading: &str, why: &str, next: &str) -> Banner {
    Banner::Stopped(
        heading.to_string(),
        vec![
            ("Why".into(), why.to_string()),
            ("Disks".into(), "nothing was written to any disk".into()),
            ("Next".into(), next.to_string()),
        ],
    )
}

/// FAILED: what, where, the disk's state and what to do.
pub fn failed(rep: &Report, error: &str, disk_state: &str) -> Banner {
    let v = serde_json::to_value(rep).unwrap_or_default();
    let where_ = disk(&v).unwrap_or_else(|| "before a target disk was chosen".into());
    let untouched = disk_state.contains("nothing was written");
    let todo = if untouched {
        "fix the cause above, then power-cycle to run again"
    } else {
        "power-cycle to run again: the install starts clean (check the disk if it repeats)"
    };
    Banner::Failed(vec![
        ("What".into(), error.to_string()),
        ("Where".into(), where_),
        (
            "Disk".into(),
            disk_state
                .strip_prefix("target disk: ")
                .unwrap_or(disk_state)
                .to_string(),
        ),
        ("Do".into(), todo.into()),
        (
            "Report".into(),
            "on the stick: imprint/reports/ (imprint reports STICK)".into(),
        ),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use imprint_core::report::SelectionInfo;

    use super::*;

    #[test]
    fn done_names_host_address_image_time_and_next() {
        let mut rep = Report::new("i1");
        rep.status = Status::Installed;
        rep.selection = Some(SelectionInfo {
            chosen: Some("nvme0n1".into()),
            reason: "only".into(),
            rejected: Vec::new(),
        });
        rep.timing("total", 125.0);
        let mut v = serde_json::to_value(&rep).unwrap();
        v["seed"] = serde_json::json!({"summary": {"instance_id": "imprint-i1", "hostname": "nuc-07",
            "hostname_source": {"rule": "machines-entry", "entry": 0},
            "matched": {"by": "mac", "entry": 0, "mac": "52:54:00:00:00:07"},
            "network": {"table-static": {"address": "10.0.0.7/24", "interface": "52:54:00:00:00:07"}},
            "user_data_kind": "cloud-config", "files": []},
            "placement": {"placement": "cidata-partition", "disk": "/dev/nvme0n1",
                "partition_number": 3, "partition_guid": "x", "first_lba": 1, "last_lba": 2,
                "sector_size": 512, "reused": false}});
        v["image"] = serde_json::json!({"name": "ubuntu-24.04", "sha256": "00", "raw_size": 1, "sector_size": 512});
        let rep: Report = serde_json::from_value(v).unwrap();
        assert!(rep.seed.is_some(), "the fixture is a whole seed section");
        let Banner::Done(lines) = done(&rep, After::Reboot) else {
            panic!()
        };
        let get = |k: &str| lines.iter().find(|(l, _)| l == k).unwrap().1.clone();
        assert_eq!(get("Hostname"), "nuc-07");
        assert_eq!(get("Address"), "10.0.0.7/24");
        assert_eq!(get("Image"), "ubuntu-24.04");
        assert_eq!(get("Disk"), "nvme0n1");
        assert_eq!(get("Time"), "2:05");
        assert!(get("Next").starts_with("rebooting"));
    }

    #[test]
    fn failed_says_what_where_the_disk_and_what_to_do() {
        let rep = Report::new("i2");
        let Banner::Failed(lines) = failed(
            &rep,
            "no target disk: no internal disk can hold the image",
            "target disk: nothing was written to any disk",
        ) else {
            panic!()
        };
        assert_eq!(lines[1].1, "before a target disk was chosen");
        assert_eq!(lines[2].1, "nothing was written to any disk");
        assert!(lines[3].1.starts_with("fix the cause above"));
    }
}
