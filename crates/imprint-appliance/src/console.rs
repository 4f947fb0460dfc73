//! Console fan-out: every line goes to every console an operator might watch (screen and
//! serial at once), and the write engine's progress bars are drawn on all of them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use imprint_core::discover;
use imprint_core::progress::{Phase, Progress};

/// Every console an operator might watch: the kernel's active consoles (`console=` on the
/// command line, e.g. `tty0 ttyS0`), plus `tty0` (the screen) and `ttyS0` (serial) when they
/// exist, each once. Falls back to `/dev/console`. A console whose write fails is dropped, so
/// an absent serial port cannot stall the flow.
#[derive(Debug, Default)]
pub struct Consoles {
    outputs: Vec<(String, File)>,
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

    /// (Re)opens the consoles, e.g. after `/dev` became a devtmpfs.
    pub fn reopen(&mut self, sys: &Path, dev: &Path) {
        self.outputs.clear();
        for name in Self::names(sys) {
            if let Ok(file) = open_console(&dev.join(&name)) {
                self.outputs.push((name, file));
            }
        }
        if self.outputs.is_empty() {
            if let Ok(file) = open_console(&dev.join("console")) {
                self.outputs.push(("console".into(), file));
            }
        }
    }

    /// Names of the consoles currently written to.
    pub fn active(&self) -> Vec<&str> {
        self.outputs.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Writes one line (CRLF: a serial console in raw mode does not translate LF).
    pub fn line(&mut self, text: &str) {
        let mut bytes = text.replace('\n', "\r\n").into_bytes();
        bytes.extend_from_slice(b"\r\n");
        self.write_all_consoles(&bytes);
    }

    fn write_all_consoles(&mut self, bytes: &[u8]) {
        self.outputs.retain_mut(|(_, f)| f.write_all(bytes).is_ok());
    }
}

impl Write for Consoles {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all_consoles(buf);
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

/// Progress bars for the write engine on every console (`indicatif` drawing to a terminal that
/// writes to all consoles), at 2 redraws a second so a serial console keeps up.
#[derive(Debug)]
pub struct ConsoleProgress {
    bar: std::sync::Mutex<Option<(indicatif::ProgressBar, Phase)>>,
    /// Where the consoles are found (`/sys`, `/dev` on the live system).
    sys: PathBuf,
    dev: PathBuf,
}

impl ConsoleProgress {
    /// No bar yet; each phase opens the consoles under `sys` and `dev` afresh (one may have
    /// gone away).
    pub fn new(sys: &Path, dev: &Path) -> Self {
        ConsoleProgress {
            bar: std::sync::Mutex::new(None),
            sys: sys.to_path_buf(),
            dev: dev.to_path_buf(),
        }
    }
}

/// Every console, for `indicatif` (which wants one terminal to draw on).
#[derive(Debug)]
struct AllConsoles {
    files: Vec<std::sync::Mutex<File>>,
}

impl AllConsoles {
    fn open(sys: &Path, dev: &Path) -> Self {
        let names = Consoles::names(sys);
        let mut files = Vec::new();
        for n in names {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(dev.join(&n)) {
                files.push(std::sync::Mutex::new(f));
            }
        }
        AllConsoles { files }
    }
    fn put(&self, s: &str) -> std::io::Result<()> {
        for f in &self.files {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(s.as_bytes());
            }
        }
        Ok(())
    }
}

impl indicatif::TermLike for AllConsoles {
    fn width(&self) -> u16 {
        80
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}A"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}B"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}C"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}D"))
        } else {
            Ok(())
        }
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(&format!("{s}\r\n"))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Progress for ConsoleProgress {
    fn begin(&self, phase: Phase, total: u64) {
        let target = indicatif::ProgressDrawTarget::term_like_with_hz(
            Box::new(AllConsoles::open(&self.sys, &self.dev)),
            2,
        );
        let bar = indicatif::ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                // 79 columns at most: 7 + 2 + 22 + 2 + 23 (two 11-character sizes) + 1 + 13 + 5 + 4.
                "{prefix:>7} [{bar:22}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(phase.name());
        if let Ok(mut b) = self.bar.lock() {
            *b = Some((bar, phase));
        }
    }
    fn advance(&self, done: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some((bar, _)) = b.as_ref() {
                bar.set_position(done);
            }
        }
    }
    fn end(&self, phase: Phase, bytes: u64, secs: f64) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some((bar, _)) = b.take() {
                bar.finish_and_clear();
            }
        }
        let _ = AllConsoles::open(&self.sys, &self.dev)
            .put(&format!("{}\r\n", phase_done(phase, bytes, secs)));
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
        assert_eq!(c.active(), ["tty0", "ttyS0"]);
        c.line("IMPRINT-BOOT-OK");
        for name in ["tty0", "ttyS0"] {
            assert_eq!(
                fs::read_to_string(dev.join(name)).unwrap(),
                "IMPRINT-BOOT-OK\r\n"
            );
        }
    }
}
