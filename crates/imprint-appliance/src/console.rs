//! The consoles: the serial console (and any other non-VT console) is a plain log, one line per
//! event, markers for the tests, periodic progress lines; the monitor (the VT in front) shows the
//! designed full-screen view of [`crate::screen`], fed by the same calls. Whatever is written as
//! a line reaches both — the screen shows the latest lines under its fixed parts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use imprint_core::discover;
use imprint_core::progress::{Phase, Progress};

use crate::screen::{self, vt, Bar, View};

/// The monitor: the VT the view is drawn on, and the view.
#[derive(Debug)]
pub struct Screen {
    /// Console name (`tty0`).
    pub name: String,
    vt: File,
    view: View,
    /// Drawing failed once: stop trying (a VT with no display behind it).
    broken: bool,
}

impl Screen {
    fn open(dev: &Path, name: &str) -> io::Result<Self> {
        let mut vt = open_console(&dev.join(name))?;
        vt.write_all(vt::SETUP.as_bytes())?;
        Ok(Screen {
            name: name.to_string(),
            vt,
            view: View::default(),
            broken: false,
        })
    }

    /// Changes the view and redraws it.
    pub fn update(&mut self, change: impl FnOnce(&mut View)) {
        change(&mut self.view);
        if !self.broken && vt::draw(&mut self.vt, &self.view).is_err() {
            self.broken = true;
        }
    }

    /// The VT's size, when it is a terminal.
    pub fn size(&self) -> Option<(u16, u16)> {
        vt::size(&self.vt).ok()
    }

    /// Makes the view fit: when the large font leaves fewer than 80x25 cells (a firmware
    /// framebuffer smaller than 1280x800), falls back to the kernel's 8x16 font. Returns what
    /// it did.
    pub fn fit(&mut self) -> Option<String> {
        let (cols, rows) = self.size()?;
        if usize::from(cols) >= screen::COLS && usize::from(rows) >= screen::ROWS {
            return Some(format!("screen {cols}x{rows}"));
        }
        let done = match vt::set_font(&self.vt, "VGA8x16") {
            Ok(()) => {
                let (c, r) = self.size().unwrap_or((cols, rows));
                format!("screen {cols}x{rows} is smaller than the view: 8x16 font, {c}x{r}")
            }
            Err(e) => {
                format!("screen {cols}x{rows} is smaller than the view; no smaller font: {e}")
            }
        };
        let _ = self.vt.write_all(vt::SETUP.as_bytes());
        self.update(|_| {});
        Some(done)
    }
}

/// Every console an operator might watch: the kernel's active consoles (`console=` on the
/// command line, e.g. `tty0 ttyS0`), plus `tty0` (the screen) and `ttyS0` (serial) when they
/// exist, each once. The first VT becomes the [`Screen`]; the others take lines. Falls back to
/// `/dev/console`. A console whose write fails is dropped, so an absent serial port cannot
/// stall the flow.
#[derive(Debug, Default)]
pub struct Consoles {
    outputs: Vec<(String, File)>,
    screen: Option<Arc<Mutex<Screen>>>,
}

impl Consoles {
    /// Opens the consoles. Before `/dev` is mounted only `/dev/console` (from the initramfs)
    /// exists; [`crate::boot::init`] calls [`Consoles::reopen`] once it is.
    pub fn open(sys: &Path, dev: &Path) -> Self {
        let mut c = Consoles::default();
        c.reopen(sys, dev);
        c
    }

    /// Names of the consoles to write to, in order, deduplicated.
    pub fn names(sys: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_to_string(sys.join("class/tty/console/active"))
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        for extra in ["tty0", "ttyS0"] {
            // tty1..N are VTs shown on the screen, as tty0 is: writing both doubles lines.
            let screen = extra == "tty0" && names.iter().any(|n| is_vt(n));
            if !screen && !names.iter().any(|n| n == extra) {
                names.push(extra.to_owned());
            }
        }
        names
    }

    /// (Re)opens the consoles, e.g. after `/dev` became a devtmpfs. The view survives.
    pub fn reopen(&mut self, sys: &Path, dev: &Path) {
        let view = self
            .screen
            .take()
            .and_then(|s| s.lock().ok().map(|s| s.view.clone()));
        self.outputs.clear();
        for name in Self::names(sys) {
            if is_vt(&name) && self.screen.is_none() {
                if let Ok(mut s) = Screen::open(dev, &name) {
                    if let Some(v) = &view {
                        s.update(|now| *now = v.clone());
                    }
                    self.screen = Some(Arc::new(Mutex::new(s)));
                }
            } else if let Ok(file) = open_console(&dev.join(&name)) {
                self.outputs.push((name, file));
            }
        }
        if self.outputs.is_empty() && self.screen.is_none() {
            if let Ok(file) = open_console(&dev.join("console")) {
                self.outputs.push(("console".into(), file));
            }
        }
    }

    /// The same consoles for another thread (the log consoles' handles cloned, the one
    /// screen shared): what it writes shows as the flow's own lines do.
    pub fn handle(&self) -> Consoles {
        Consoles {
            outputs: self
                .outputs
                .iter()
                .filter_map(|(n, f)| f.try_clone().ok().map(|f| (n.clone(), f)))
                .collect(),
            screen: self.screen.clone(),
        }
    }

    /// Names of the consoles currently written to, the screen first.
    pub fn active(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .screen
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| format!("{} (screen)", s.name)))
            .collect();
        names.extend(self.outputs.iter().map(|(n, _)| n.clone()));
        names
    }

    /// Writes one line to the log consoles (CRLF: a serial console in raw mode does not
    /// translate LF) and to the screen's message area.
    pub fn line(&mut self, text: &str) {
        self.log_line(text);
        self.show(|v| v.push_line(text));
    }

    /// A line for the log consoles only: test markers (`IMPRINT-BOOT-OK`, `IMPRINT-DONE`) and
    /// the kernel's log, which are not for the person at the monitor.
    pub fn log_line(&mut self, text: &str) {
        let mut bytes = text.replace('\n', "\r\n").into_bytes();
        bytes.extend_from_slice(b"\r\n");
        self.write_log(&bytes);
    }

    /// Changes the screen's view and redraws it (nothing without a screen).
    pub fn show(&mut self, change: impl FnOnce(&mut View)) {
        if let Some(s) = &self.screen {
            if let Ok(mut s) = s.lock() {
                s.update(change);
            }
        }
    }

    /// The latest message the screen shows, when there is a screen.
    pub fn last_message(&self) -> Option<String> {
        self.screen
            .as_ref()
            .and_then(|s| s.lock().ok().map(|s| s.view.last.clone()))
            .filter(|l| !l.is_empty())
    }

    /// Fits the view on the screen (see [`Screen::fit`]); says what it did.
    pub fn fit_screen(&mut self) -> Option<String> {
        self.screen
            .as_ref()
            .and_then(|s| s.lock().ok().and_then(|mut s| s.fit()))
    }

    /// Copies the kernel log's records that `quiet` kept off the consoles (level 4 and above)
    /// to the log consoles, once, so the serial console still has the whole boot.
    pub fn replay_kernel_log(&mut self, dev: &Path) -> usize {
        let Ok(mut kmsg) = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(dev.join("kmsg"))
        else {
            return 0;
        };
        let mut n = 0;
        let mut buf = vec![0u8; 8192];
        // One record per read; EAGAIN at the end of the buffer, EPIPE when one was overwritten.
        loop {
            match kmsg.read(&mut buf) {
                Ok(0) => break,
                Ok(len) => {
                    if let Some(line) = kmsg_line(&String::from_utf8_lossy(&buf[..len])) {
                        self.log_line(&line);
                        n += 1;
                    }
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        n
    }

    fn write_log(&mut self, bytes: &[u8]) {
        self.outputs.retain_mut(|(_, f)| f.write_all(bytes).is_ok());
    }

    /// Handles for a progress renderer: the log consoles (cloned) and the screen.
    fn handles(&self) -> (Vec<File>, Option<Arc<Mutex<Screen>>>) {
        (
            self.outputs
                .iter()
                .filter_map(|(_, f)| f.try_clone().ok())
                .collect(),
            self.screen.clone(),
        )
    }
}

/// A `/dev/kmsg` record (`PRI,SEQ,USEC,FLAGS;TEXT`) as a dmesg line, when `quiet` kept it off
/// the consoles (level 4 = warning and above in number).
fn kmsg_line(record: &str) -> Option<String> {
    let (head, text) = record.split_once(';')?;
    let mut f = head.split(',');
    let level = f.next()?.parse::<u32>().ok()? & 7;
    let usec = f.nth(1)?.parse::<u64>().ok()?;
    let text = text.lines().next().unwrap_or("");
    (level >= 4).then(|| format!("[{:5}.{:06}] {text}", usec / 1_000_000, usec % 1_000_000))
}

impl Write for Consoles {
    /// Text without a line end (a prompt's `> `): the log consoles get it as is, the screen
    /// shows it as the line being typed.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_log(buf);
        let text = String::from_utf8_lossy(buf).into_owned();
        self.show(|v| v.push_partial(&text));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A virtual terminal on the screen (`tty0` = the one in front, `tty1`…).
pub(crate) fn is_vt(name: &str) -> bool {
    name.strip_prefix("tty")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Opens a console for writing without making it our controlling terminal and without
/// blocking on modem lines (O_NONBLOCK only for the open: writes then block normally, so a
/// full serial buffer slows us down instead of losing lines).
fn open_console(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
        .open(path)?;
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(file)
}

/// The error and its causes on one line, for the consoles.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// How often the serial console gets a progress line, and the screen a redraw.
const LOG_EVERY: f64 = 10.0;
const DRAW_EVERY: f64 = 0.5;

/// The write engine's progress: one large bar on the screen (redrawn twice a second) and a
/// progress line every [`LOG_EVERY`] seconds on the log consoles (no redrawn bars there: a
/// serial log is read later, line by line).
#[derive(Debug)]
pub struct ConsoleProgress {
    logs: Mutex<Vec<File>>,
    screen: Option<Arc<Mutex<Screen>>>,
    state: Mutex<Option<Current>>,
}

#[derive(Debug)]
struct Current {
    phase: Phase,
    total: u64,
    start: Instant,
    last_log: Instant,
    last_draw: Instant,
}

impl ConsoleProgress {
    /// Draws on the consoles of `consoles`.
    pub fn new(consoles: &Consoles) -> Self {
        let (logs, screen) = consoles.handles();
        ConsoleProgress {
            logs: Mutex::new(logs),
            screen,
            state: Mutex::new(None),
        }
    }

    fn log(&self, text: &str) {
        if let Ok(mut logs) = self.logs.lock() {
            let line = format!("{text}\r\n");
            logs.retain_mut(|f| f.write_all(line.as_bytes()).is_ok());
        }
    }

    fn show(&self, change: impl FnOnce(&mut View)) {
        if let Some(s) = &self.screen {
            if let Ok(mut s) = s.lock() {
                s.update(change);
            }
        }
    }
}

/// The bar for `done` of `total` bytes after `secs` seconds.
fn bar(phase: Phase, done: u64, total: u64, secs: f64) -> Bar {
    let rate = done as f64 / secs.max(1e-3);
    let eta = (done > 0 && secs >= 1.0).then(|| total.saturating_sub(done) as f64 / rate);
    Bar {
        phase,
        done,
        total,
        rate,
        eta,
    }
}

impl Progress for ConsoleProgress {
    fn begin(&self, phase: Phase, total: u64) {
        let now = Instant::now();
        if let Ok(mut st) = self.state.lock() {
            *st = Some(Current {
                phase,
                total,
                start: now,
                last_log: now,
                last_draw: now,
            });
        }
        self.log(&format!(
            "imprint: {}: {}",
            phase.name(),
            discover::human_bytes(total)
        ));
        self.show(|v| {
            v.status = screen::phase_heading(phase).to_lowercase();
            v.bar = Some(bar(phase, 0, total, 0.0));
        });
    }

    fn advance(&self, done: u64) {
        let (b, log, draw) = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let Some(p) = st.as_mut() else { return };
            let b = bar(p.phase, done, p.total, p.start.elapsed().as_secs_f64());
            let log = p.last_log.elapsed().as_secs_f64() >= LOG_EVERY;
            let draw = p.last_draw.elapsed().as_secs_f64() >= DRAW_EVERY;
            if log {
                p.last_log = Instant::now();
            }
            if draw {
                p.last_draw = Instant::now();
            }
            (b, log, draw)
        };
        if log {
            self.log(&format!(
                "imprint: {} {}% ({})",
                b.phase.name(),
                b.percent(),
                b.figures()
            ));
        }
        if draw {
            self.show(|v| v.bar = Some(b));
        }
    }

    fn end(&self, phase: Phase, bytes: u64, secs: f64) {
        if let Ok(mut st) = self.state.lock() {
            *st = None;
        }
        let text = phase_done(phase, bytes, secs);
        self.log(&text);
        self.show(|v| {
            v.bar = Some(bar(phase, bytes, bytes.max(1), secs));
            v.push_line(&text);
        });
    }
}

/// The line a finished phase leaves on the consoles, in the host CLI's units (binary sizes,
/// the same units per second): `imprint: write done: 1.2 GiB in 12.3 s (95.4 MiB/s)`.
fn phase_done(phase: Phase, bytes: u64, secs: f64) -> String {
    format!(
        "imprint: {} done: {} in {:.1} s ({}/s)",
        phase.name(),
        discover::human_bytes(bytes),
        secs,
        discover::human_bytes((bytes as f64 / secs.max(1e-3)) as u64)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn phase_lines_use_binary_units() {
        assert_eq!(
            phase_done(Phase::Write, 3 << 30, 30.0),
            "imprint: write done: 3.0 GiB in 30.0 s (102.4 MiB/s)"
        );
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn console_names_are_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("class/tty/console/active"), "tty0 ttyS0\n");
        assert_eq!(Consoles::names(dir.path()), ["tty0", "ttyS0"]);
        write(&dir.path().join("class/tty/console/active"), "ttyS0 tty1\n");
        assert_eq!(Consoles::names(dir.path()), ["ttyS0", "tty1"]);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(Consoles::names(empty.path()), ["tty0", "ttyS0"]);
    }

    #[test]
    fn consoles_write_every_line_to_every_output() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("tty0"), "").unwrap();
        fs::write(dev.join("ttyS0"), "").unwrap();
        let mut c = Consoles::open(&dir.path().join("sys"), &dev);
        assert_eq!(c.active(), ["tty0 (screen)", "ttyS0"]);
        c.line("imprint: disks:");
        c.log_line("IMPRINT-BOOT-OK");
        assert_eq!(
            fs::read_to_string(dev.join("ttyS0")).unwrap(),
            "imprint: disks:\r\nIMPRINT-BOOT-OK\r\n"
        );
        let screen = fs::read_to_string(dev.join("tty0")).unwrap();
        assert!(screen.starts_with(vt::SETUP), "{screen:?}");
        assert!(screen.contains(" disks:"), "the line is on the screen");
        assert!(
            !screen.contains("IMPRINT-BOOT-OK"),
            "markers are for the serial log only"
        );
    }

    #[test]
    fn kernel_records_held_back_by_quiet_are_dmesg_lines() {
        assert_eq!(
            kmsg_line("6,339,5140900,-;usb 1-1: new high-speed USB device\n"),
            Some("[    5.140900] usb 1-1: new high-speed USB device".into())
        );
        assert_eq!(
            kmsg_line("3,1,10,-;shown already"),
            None,
            "errors passed quiet"
        );
        assert_eq!(kmsg_line("garbage"), None);
    }

    #[test]
    fn progress_goes_to_the_screen_as_a_bar_and_to_serial_as_lines() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("tty0"), "").unwrap();
        fs::write(dev.join("ttyS0"), "").unwrap();
        let c = Consoles::open(&dir.path().join("sys"), &dev);
        let p = ConsoleProgress::new(&c);
        p.begin(Phase::Write, 1 << 30);
        std::thread::sleep(std::time::Duration::from_millis(600));
        p.advance(1 << 29);
        let screen = fs::read_to_string(dev.join("tty0")).unwrap();
        assert!(
            screen.contains("Writing image") && screen.contains("50%"),
            "{screen:?}"
        );
        p.end(Phase::Write, 1 << 30, 2.0);
        let serial = fs::read_to_string(dev.join("ttyS0")).unwrap();
        assert!(
            serial.starts_with("imprint: write: 1.0 GiB\r\n"),
            "{serial:?}"
        );
        assert!(
            serial.contains("imprint: write done: 1.0 GiB in 2.0 s"),
            "{serial:?}"
        );
        assert!(
            !serial.contains('\x1b'),
            "no bars redrawn on serial: {serial:?}"
        );
    }
}
