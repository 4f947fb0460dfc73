//! The monitor's view: one full screen, redrawn in place, made for a person standing two metres
//! from a NUC. The serial console stays a plain log ([`crate::console`]); this module owns what
//! the VT shows instead of that log.
//!
//! [`View`] is the state (machine, disks, progress, banner, the last messages and any open
//! question); [`render`] lays it out on an 80x25 [`Frame`] of styled cells, a pure function the
//! unit tests read as text; [`vt`] puts a frame on the VT with plain ANSI sequences the Linux
//! console understands, and keeps kernel messages off it. No TUI crate: ratatui would bring a
//! layout engine, unicode tables and a backend for a screen this module draws in ~300 lines
//! (and PID 1 must stay small); see docs/live-image.md.
//!
//! ```text
//!  imprint                                                        writing image
//!
//!  Machine  QEMU Standard PC (Q35 + ICH9, 2009)
//!  Serial   NUC-SCREEN-01
//!  MAC      52:54:00:12:34:56 (enp0s2)
//!
//!  DISK     BUS   SIZE      MODEL          SERIAL         DATA CHOICE
//!  nvme0n1  nvme    8.0 GiB QEMU NVMe Ctrl NVME0001       yes  >> TARGET <<
//!  sda      usb    47.0 MiB QEMU HARDDISK  1-0000:00:02.0 stick usb: never a target
//! ```

pub mod banner;
pub mod frame;
pub mod layout;
pub mod vt;

use std::collections::VecDeque;

use imprint_core::discover::{self, Disk};
use imprint_core::machine::MachineIdentity;
use imprint_core::progress::Phase;

pub use frame::{Frame, Style, COLS, ROWS};
pub use layout::{render, wrap};

/// How many message lines the view keeps.
const LOG_KEEP: usize = 32;

/// One disk as the screen shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLine {
    pub name: String,
    pub bus: String,
    pub size: String,
    pub model: String,
    pub serial: String,
    /// `yes`, `no`, `?` or `stick`.
    pub data: String,
    /// Empty until the policy ran; then `TARGET` or why not.
    pub choice: String,
    pub chosen: bool,
}

impl DiskLine {
    pub fn new(d: &Disk, data: &str) -> Self {
        DiskLine {
            name: d.name.clone(),
            bus: d.transport.to_string(),
            size: discover::human_bytes(d.size),
            model: d.model.clone().unwrap_or_else(|| "-".into()),
            serial: d.serial.clone().unwrap_or_else(|| "-".into()),
            data: data.to_string(),
            choice: String::new(),
            chosen: false,
        }
    }
}

/// The progress of one phase of the write engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
    /// Bytes per second so far.
    pub rate: f64,
    /// Seconds left at that rate.
    pub eta: Option<f64>,
}

impl Bar {
    /// Whole percent done, 0..=100.
    pub fn percent(&self) -> u64 {
        (self.done.min(self.total) * 100)
            .checked_div(self.total)
            .unwrap_or(100)
    }

    /// The phase as a heading: `Writing image`, `Verifying` …
    pub fn heading(&self) -> &'static str {
        phase_heading(self.phase)
    }

    /// One line of figures: `1.2 GiB of 2.0 GiB  120 MB/s  ETA 0:42`.
    pub fn figures(&self) -> String {
        format!(
            "{} of {}   {:.0} MB/s   ETA {}",
            discover::human_bytes(self.done),
            discover::human_bytes(self.total),
            self.rate / 1e6,
            self.eta.map(clock).unwrap_or_else(|| "--:--".into())
        )
    }
}

/// The heading for a write-engine phase.
pub fn phase_heading(p: Phase) -> &'static str {
    match p {
        Phase::Precheck => "Checking the image",
        Phase::Wipe => "Clearing the disk's ends",
        Phase::Write => "Writing image",
        Phase::Verify => "Verifying",
        Phase::Commit => "Committing",
        Phase::Compress => "Compressing",
    }
}

/// `m:ss` (or `h:mm:ss`).
pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The final banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Banner {
    /// Installed (or already installed): label/value lines.
    Done(Vec<(String, String)>),
    /// Stopped before writing (declined, refused, inventory): a heading and lines.
    Stopped(String, Vec<(String, String)>),
    /// Failed: label/value lines (what, where, the disk, what to do).
    Failed(Vec<(String, String)>),
}

/// Everything the monitor shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The title bar's right side: what is happening.
    pub status: String,
    pub machine: Option<MachineIdentity>,
    pub disks: Vec<DiskLine>,
    pub bar: Option<Bar>,
    pub banner: Option<Banner>,
    /// The latest messages, oldest first.
    pub log: VecDeque<String>,
    /// A line being typed into (the prompt `> `): drawn last, the cursor after it.
    pub partial: Option<String>,
    /// The latest whole message, unwrapped (a stop's banner repeats why).
    pub last: String,
}

impl View {
    /// Adds a message line (the `imprint: ` prefix is the serial log's; the screen drops it).
    pub fn push_line(&mut self, line: &str) {
        let done = self.partial.take().unwrap_or_default();
        let line = format!("{done}{line}");
        let line = line.strip_prefix("imprint: ").unwrap_or(&line).to_string();
        if !line.trim().is_empty() {
            self.last = line.clone();
        }
        for l in wrap(&line, COLS - 2) {
            self.log.push_back(l);
        }
        while self.log.len() > LOG_KEEP {
            self.log.pop_front();
        }
    }

    /// Adds text without a line end (a prompt); a later [`View::push_line`] completes it.
    pub fn push_partial(&mut self, text: &str) {
        let mut p = self.partial.take().unwrap_or_default();
        for part in text.split_inclusive('\n') {
            match part.strip_suffix('\n') {
                Some(done) => {
                    p.push_str(done.trim_end_matches('\r'));
                    self.push_line(&p);
                    p.clear();
                }
                None => p.push_str(part),
            }
        }
        self.partial = (!p.is_empty()).then_some(p);
    }

    /// Marks the policy's decision in the disk table.
    pub fn mark_choice(&mut self, chosen: Option<&str>, rejected: &[(String, String)]) {
        for d in &mut self.disks {
            if Some(d.name.as_str()) == chosen {
                d.chosen = true;
                d.choice = ">> TARGET <<".into();
            } else if let Some((_, why)) = rejected.iter().find(|(n, _)| *n == d.name) {
                d.chosen = false;
                d.choice = why.clone();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use imprint_core::machine::{Dmi, MacAddr, Nic};

    use super::layout::MAIN_ROW;
    use super::*;

    fn view() -> View {
        let mut v = View {
            status: "choosing a disk".into(),
            ..Default::default()
        };
        v.machine = Some(MachineIdentity {
            dmi: Dmi {
                sys_vendor: Some("Intel(R) Client Systems".into()),
                product_name: Some("NUC11TNHi5".into()),
                product_serial: Some("G6TN123400AB".into()),
                ..Default::default()
            },
            nics: vec![Nic {
                name: "enp88s0".into(),
                mac: "1c:69:7a:0a:0b:0c".parse::<MacAddr>().unwrap(),
                wireless: false,
            }],
        });
        v.disks = vec![
            DiskLine {
                name: "nvme0n1".into(),
                bus: "nvme".into(),
                size: "476.9 GiB".into(),
                model: "Samsung SSD 980 PRO with Heatsink".into(),
                serial: "S6B0NL0T123456789012".into(),
                data: "yes".into(),
                choice: String::new(),
                chosen: false,
            },
            DiskLine {
                name: "sda".into(),
                bus: "usb".into(),
                size: "57.3 GiB".into(),
                model: "Cruzer".into(),
                serial: "4C530001".into(),
                data: "stick".into(),
                choice: String::new(),
                chosen: false,
            },
        ];
        v
    }

    #[test]
    fn the_view_shows_the_machine_and_the_disks_with_the_choice_in_80x25() {
        let mut v = view();
        v.mark_choice(
            Some("nvme0n1"),
            &[("sda".into(), "usb: never a target".into())],
        );
        let (f, cursor) = render(&v);
        let t = f.text();
        assert_eq!(t.len(), ROWS);
        assert!(t.iter().all(|l| l.chars().count() == COLS));
        assert!(t[0].starts_with(" imprint") && t[0].trim_end().ends_with("choosing a disk"));
        assert_eq!(
            t[2].trim_end(),
            " Machine  Intel(R) Client Systems NUC11TNHi5"
        );
        assert_eq!(t[3].trim_end(), " Serial   G6TN123400AB");
        assert_eq!(t[4].trim_end(), " MAC      1c:69:7a:0a:0b:0c (enp88s0)");
        assert_eq!(
            t[6].trim_end(),
            " DISK     BUS        SIZE MODEL          SERIAL         DATA  CHOICE"
        );
        assert_eq!(
            t[7].trim_end(),
            " nvme0n1  nvme  476.9 GiB Samsung SSD 9~ S6B0NL0T12345~ yes   >> TARGET <<"
        );
        assert_eq!(
            t[8].trim_end(),
            " sda      usb    57.3 GiB Cruzer         4C530001       stick usb: never a targ~"
        );
        assert_eq!(f.style(7, 0), Style::Good, "the chosen disk stands out");
        assert_eq!(f.style(8, 0), Style::Normal);
        assert_eq!(cursor, None);
    }

    #[test]
    fn a_question_is_on_screen_with_the_cursor_after_it() {
        let mut v = view();
        for i in 0..40 {
            v.push_line(&format!("imprint: message {i}"));
        }
        v.push_line("imprint: nvme0n1 Samsung SSD 980 PRO serial S6B0 476.9 GiB — partitions: nvme0n1p1 (512 MiB), nvme0n1p2 (476 GiB) — will be overwritten with ubuntu (3.5 GiB)");
        v.push_line(
            "Erase nvme0n1 and install ubuntu? Type y and Enter to install, n or Enter to stop [n]",
        );
        v.push_partial("> ");
        let (f, cursor) = render(&v);
        let t = f.text();
        let last = t.iter().rposition(|l| !l.trim().is_empty()).unwrap();
        assert_eq!(t[last].trim_end(), " >");
        assert_eq!(cursor, Some((last, 3)));
        assert_eq!(t[last - 1].trim_end(), " stop [n]", "{t:#?}");
        assert!(
            t[last - 2].starts_with(" Erase nvme0n1 and install ubuntu? Type y and Enter"),
            "{t:#?}"
        );
        assert!(
            t[last - 4].contains("476.9 GiB - partitions"),
            "dashes kept: {t:#?}"
        );
        assert!(
            t.iter()
                .any(|l| l.contains("Erase nvme0n1 and install ubuntu?")),
            "{t:#?}"
        );
        assert!(
            t.iter().all(|l| !l.contains("imprint: message")),
            "prefix dropped"
        );
        // The answer completes the line; the question stays readable above.
        v.push_partial("y\n");
        assert_eq!(v.partial, None);
        assert_eq!(v.log.back().unwrap(), "> y");
        v.push_line("imprint: declined; nothing was written");
        v.push_line("");
        assert_eq!(v.last, "declined; nothing was written");
    }

    #[test]
    fn progress_is_one_large_bar_with_phase_rate_and_eta() {
        let mut v = view();
        v.bar = Some(Bar {
            phase: Phase::Write,
            done: 3 << 29,
            total: 3 << 30,
            rate: 120e6,
            eta: Some(42.4),
        });
        let (f, _) = render(&v);
        let t = f.text();
        assert!(t[MAIN_ROW].starts_with(" Writing image"), "{t:#?}");
        assert!(t[MAIN_ROW].trim_end().ends_with("50%"));
        for r in [MAIN_ROW + 1, MAIN_ROW + 2] {
            assert_eq!(f.style(r, 1), Style::BarDone);
            assert_eq!(f.style(r, 39), Style::BarDone);
            assert_eq!(f.style(r, 40), Style::BarLeft);
            assert_eq!(f.style(r, 78), Style::BarLeft);
        }
        assert_eq!(
            t[MAIN_ROW + 3].trim_end(),
            " 1.5 GiB of 3.0 GiB   120 MB/s   ETA 0:42"
        );
    }

    #[test]
    fn banners_name_the_outcome() {
        let mut v = view();
        v.banner = Some(Banner::Failed(vec![
            (
                "What".into(),
                "writing ubuntu to /dev/nvme0n1: I/O error".into(),
            ),
            ("Disk".into(), "no partition table: will not boot".into()),
            (
                "Do".into(),
                "replace the disk or check its cable, then power-cycle".into(),
            ),
        ]));
        let (f, _) = render(&v);
        let t = f.text();
        assert!(t[MAIN_ROW].contains("*** FAILED ***"));
        assert!(t[MAIN_ROW + 2].contains("no partition table: will not boot"));
        assert_eq!(f.style(MAIN_ROW, 0), Style::Bad);
        v.banner = Some(Banner::Done(vec![("Hostname".into(), "nuc-01".into())]));
        let (f, _) = render(&v);
        assert!(f.text()[MAIN_ROW].contains("*** DONE ***"));
        assert!(f.text()[MAIN_ROW + 1].contains("Hostname   nuc-01"));
        assert_eq!(f.style(MAIN_ROW + 1, 40), Style::Good);
    }

    #[test]
    fn wrap_and_clock() {
        assert_eq!(wrap("a bb ccc", 4), ["a bb", "ccc"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4), [""]);
        assert_eq!(clock(42.4), "0:42");
        assert_eq!(clock(3725.0), "1:02:05");
    }
}
