//! Where everything goes on the 80x25 frame: the title bar, the machine, the disk table, the
//! main area (a banner or the progress bar) and the newest messages. A pure function of the
//! [`View`]; the unit tests in the parent module read its frames as text.

use super::frame::{Frame, Style, COLS, ROWS};
use super::{Banner, View};

/// Splits `s` into lines of at most `width` columns, at spaces where it can.
pub fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in s.split(' ') {
        let mut word = word.to_string();
        while word.chars().count() > width {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            let head: String = word.chars().take(width).collect();
            word = word.chars().skip(width).collect();
            out.push(head);
        }
        if cur.is_empty() {
            cur = word;
        } else if cur.chars().count() + 1 + word.chars().count() <= width {
            cur.push(' ');
            cur.push_str(&word);
        } else {
            out.push(std::mem::replace(&mut cur, word));
        }
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

/// `s` cut to `max` columns, a cut marked with `~`.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

/// Rows of the fixed parts.
const MACHINE_ROW: usize = 2;
const DISK_ROW: usize = 6;
const MAX_DISKS: usize = 5;
pub(super) const MAIN_ROW: usize = 13;

/// Lays the view out on a frame; returns it and where the cursor belongs (row, col) when a
/// question waits for typing.
pub fn render(v: &View) -> (Frame, Option<(usize, usize)>) {
    let mut f = Frame::default();
    title(&mut f, v);
    machine(&mut f, v);
    disks(&mut f, v);
    let log_from = main_area(&mut f, v);
    let cursor = messages(&mut f, v, log_from);
    (f, cursor)
}

/// The title bar: `imprint` and, on the right, what is happening.
fn title(f: &mut Frame, v: &View) {
    f.put(0, 0, &format!("{:<COLS$}", " imprint"), Style::Title);
    let status = clip(&v.status, COLS - 12);
    f.put(0, COLS - 1 - status.len(), &status, Style::Title);
}

/// Vendor and model, DMI serial, the first MACs.
fn machine(f: &mut Frame, v: &View) {
    let m = v.machine.as_ref();
    let dmi = m.map(|m| &m.dmi);
    let vendor_model = [
        dmi.and_then(|d| d.sys_vendor.as_deref()),
        dmi.and_then(|d| d.product_name.as_deref()),
    ]
    .iter()
    .flatten()
    .copied()
    .collect::<Vec<_>>()
    .join(" ");
    let serial = m.and_then(|m| m.serial()).unwrap_or("-");
    let macs = m
        .map(|m| {
            m.nics
                .iter()
                .take(3)
                .map(|n| format!("{} ({})", n.mac, n.name))
                .collect::<Vec<_>>()
                .join("  ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    for (i, (label, value)) in [
        (
            "Machine",
            if m.is_some() {
                vendor_model
            } else {
                "-".into()
            },
        ),
        ("Serial", serial.to_string()),
        ("MAC", macs),
    ]
    .iter()
    .enumerate()
    {
        f.put(MACHINE_ROW + i, 1, label, Style::Label);
        f.put(MACHINE_ROW + i, 10, &clip(value, COLS - 11), Style::Normal);
    }
}

/// The disk table, the chosen one in green, why not for the others.
fn disks(f: &mut Frame, v: &View) {
    // NAME 8, BUS 5, SIZE 9, MODEL 14, SERIAL 14, DATA 5, CHOICE the rest.
    let row = |name: &str, bus: &str, size: &str, model: &str, serial: &str, data: &str| {
        format!(
            " {:<8} {:<5} {:>9} {:<14} {:<14} {:<5} ",
            clip(name, 8),
            clip(bus, 5),
            size,
            clip(model, 14),
            clip(serial, 14),
            clip(data, 5)
        )
    };
    let head = row("DISK", "BUS", "SIZE", "MODEL", "SERIAL", "DATA");
    let choice_col = head.len();
    f.put(DISK_ROW, 0, &format!("{head}CHOICE"), Style::Label);
    for (i, d) in v.disks.iter().take(MAX_DISKS).enumerate() {
        let r = DISK_ROW + 1 + i;
        f.put(
            r,
            0,
            &row(&d.name, &d.bus, &d.size, &d.model, &d.serial, &d.data),
            Style::Normal,
        );
        let style = if d.chosen { Style::Good } else { Style::Normal };
        f.put(r, choice_col, &clip(&d.choice, COLS - choice_col), style);
        if d.chosen {
            f.paint(r, 0, COLS, Style::Good);
        }
    }
    if v.disks.len() > MAX_DISKS {
        f.put(
            DISK_ROW + 1 + MAX_DISKS,
            1,
            &format!(
                "(+{} more disks: see the serial console)",
                v.disks.len() - MAX_DISKS
            ),
            Style::Normal,
        );
    }
    if v.disks.is_empty() {
        f.put(DISK_ROW + 1, 1, "no disks found yet", Style::Normal);
    }
}

/// The main area: the banner, else the progress bar. Returns the first row left for messages
/// (right under the disks while there is neither: a question gets the room).
fn main_area(f: &mut Frame, v: &View) -> usize {
    let mut log_from = DISK_ROW + 2 + v.disks.len().clamp(1, MAX_DISKS + 1);
    if let Some(b) = &v.banner {
        let (title, lines, style) = match b {
            Banner::Done(l) => ("DONE", l, Style::Good),
            Banner::Stopped(t, l) => (t.as_str(), l, Style::Label),
            Banner::Failed(l) => ("FAILED", l, Style::Bad),
        };
        // Values wrap under themselves; the banner keeps at least one message row below.
        let mut rows: Vec<(&str, String)> = Vec::new();
        for (label, value) in lines {
            for (i, part) in wrap(value, COLS - 15).into_iter().enumerate() {
                rows.push((if i == 0 { label } else { "" }, part));
            }
        }
        rows.truncate(ROWS - MAIN_ROW - 3);
        for r in MAIN_ROW..MAIN_ROW + rows.len() + 2 {
            f.paint(r, 0, COLS, style);
        }
        f.put(MAIN_ROW, 2, &format!("*** {title} ***"), style);
        for (i, (label, value)) in rows.iter().enumerate() {
            f.put(MAIN_ROW + 1 + i, 2, &clip(label, 10), style);
            f.put(MAIN_ROW + 1 + i, 13, value, style);
        }
        log_from = MAIN_ROW + rows.len() + 3;
    } else if let Some(bar) = &v.bar {
        let pct = bar.percent();
        f.put(MAIN_ROW, 1, bar.heading(), Style::Label);
        let p = format!("{pct:>3}%");
        f.put(MAIN_ROW, COLS - 1 - p.len(), &p, Style::Label);
        let width = COLS - 2;
        let filled = (width as u64 * pct / 100) as usize;
        for r in [MAIN_ROW + 1, MAIN_ROW + 2] {
            f.paint(r, 1, filled, Style::BarDone);
            f.paint(r, 1 + filled, width - filled, Style::BarLeft);
        }
        f.put(MAIN_ROW + 3, 1, &bar.figures(), Style::Normal);
        log_from = MAIN_ROW + 5;
    }
    log_from
}

/// The newest messages that fit from `log_from`, a waiting question last; returns where the
/// cursor belongs after it.
fn messages(f: &mut Frame, v: &View, log_from: usize) -> Option<(usize, usize)> {
    let room = ROWS.saturating_sub(log_from);
    let mut lines: Vec<(String, Style)> =
        v.log.iter().map(|l| (l.clone(), Style::Normal)).collect();
    if let Some(p) = &v.partial {
        lines.push((p.clone(), Style::Ask));
    }
    let start = lines.len().saturating_sub(room);
    let mut cursor = None;
    for (i, (l, style)) in lines[start..].iter().enumerate() {
        let r = log_from + i;
        f.put(r, 1, &clip(l, COLS - 2), *style);
        if *style == Style::Ask {
            cursor = Some((r, (1 + l.chars().count()).min(COLS - 1)));
        }
    }
    cursor
}
