//! Prompts wherever a person is. A question is written to every console, and the answer is
//! read from every console that has a person behind it: the screen (VT) when a keyboard is
//! attached, and a serial console (`ttyS*`, `ttyUSB*`, `ttyAMA*`: how a remote operator or the
//! test harness reaches the machine). The first complete line typed on any of them wins.
//!
//! Lines, not keys: each terminal is put in canonical mode with echo, so the kernel's line
//! discipline does the editing (backspace works on the monitor and on serial alike) and a read
//! returns whole lines. All terminals are watched with one `poll(2)`, so nothing is left
//! blocked in a thread after the answer. `imprint.prompt=NAME[,NAME…]` on the kernel command
//! line names the consoles to ask on instead (`console` = the kernel's last `console=`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use imprint_core::discover::{self, Disk};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, FlushArg, InputFlags, LocalFlags, SetArg, Termios};

use crate::boot::{Cmdline, Roots};
use crate::console::{is_vt, Consoles};

/// Longest answer kept; the rest of an over-long line is dropped.
const MAX_LINE: usize = 256;

/// A serial console: someone (or something) may be on the other end whatever the keyboards.
fn is_serial(name: &str) -> bool {
    ["ttyS", "ttyUSB", "ttyAMA"]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(|n| !n.is_empty()))
}

/// Whether an input device with a keyboard's event mask (EV_SYN|EV_KEY|EV_MSC|EV_LED|EV_REP,
/// `EV=120013`) is attached (`devices` is `/proc/bus/input/devices`): AT and USB keyboards have
/// it; power buttons and mice do not.
pub fn keyboard_present(devices: &Path) -> bool {
    std::fs::read_to_string(devices)
        .map(|t| t.lines().any(|l| l.trim() == "B: EV=120013"))
        .unwrap_or(false)
}

/// The consoles to read answers from: the `imprint.prompt=` list when the command line has one,
/// else every console [`Consoles`] writes to that has a person behind it — serial consoles, and
/// the screen (a VT) only when a keyboard is attached.
pub fn prompt_consoles(roots: &Roots, cmdline: &Cmdline) -> Vec<String> {
    let active = Consoles::names(&roots.sys);
    if let Some(list) = cmdline.get("imprint.prompt") {
        let mut names = Vec::new();
        for n in list.split(',').filter(|n| !n.is_empty()) {
            let n = if n == "console" {
                // /dev/console is the last console= of the command line.
                let kernel = std::fs::read_to_string(roots.sys.join("class/tty/console/active"))
                    .unwrap_or_default();
                match kernel.split_whitespace().last() {
                    Some(last) => last.to_string(),
                    None => "console".to_string(),
                }
            } else {
                n.to_string()
            };
            if !names.contains(&n) {
                names.push(n);
            }
        }
        return names;
    }
    let keyboard = keyboard_present(&roots.proc.join("bus/input/devices"));
    active
        .into_iter()
        .filter(|n| is_serial(n) || (keyboard && is_vt(n)))
        .collect()
}

/// An answer to a multiple choice: which candidate, or none.
pub fn parse_choice(input: &str, names: &[&str]) -> Result<Option<usize>, String> {
    let a = input.trim();
    if a.is_empty() || a == "0" || a.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if let Ok(n) = a.parse::<usize>() {
        if (1..=names.len()).contains(&n) {
            return Ok(Some(n - 1));
        }
    }
    if let Some(i) = names.iter().position(|n| *n == a) {
        return Ok(Some(i));
    }
    Err(format!(
        "{} is not one of the choices; type a number from 0 to {}",
        shown(a),
        names.len()
    ))
}

/// A yes/no answer; an empty line is the default, no.
pub fn parse_yes_no(input: &str) -> Result<bool, String> {
    match input.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(true),
        "" | "n" | "no" => Ok(false),
        other => Err(format!("{} is not an answer; type y or n", shown(other))),
    }
}

/// Typed text, safe to echo: control characters escaped.
fn shown(s: &str) -> String {
    format!("{:?}", s.chars().take(40).collect::<String>())
}

/// A terminal answers are read from.
#[derive(Debug)]
pub struct Input {
    /// Console name (`ttyS0`, `tty0`) or a test's label.
    pub name: String,
    file: File,
    /// Its terminal settings before we changed them, restored on drop.
    saved: Option<Termios>,
}

impl Input {
    /// Wraps an open file (a tty, or a pipe in tests).
    pub fn new(name: &str, file: File) -> Self {
        Input {
            name: name.to_string(),
            file,
            saved: None,
        }
    }

    /// Opens `<dev>/<name>` for reading (no controlling terminal, no wait on modem lines) and,
    /// if it is a terminal, switches it to canonical mode with echo and drops keys typed before
    /// the question was asked.
    fn open(dev: &Path, name: &str) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
            .open(dev.join(name))?;
        let mut input = Input::new(name, file);
        if let Ok(t) = termios::tcgetattr(input.file.as_fd()) {
            let mut lines = t.clone();
            lines.local_flags |= LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ECHOE;
            lines.input_flags |= InputFlags::ICRNL;
            let _ = termios::tcsetattr(input.file.as_fd(), SetArg::TCSANOW, &lines);
            let _ = termios::tcflush(input.file.as_fd(), FlushArg::TCIFLUSH);
            input.saved = Some(t);
        }
        Ok(input)
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Some(t) = self.saved.take() {
            // Half-typed answers on the consoles that lost the race are dropped with them.
            let _ = termios::tcflush(self.file.as_fd(), FlushArg::TCIFLUSH);
            let _ = termios::tcsetattr(self.file.as_fd(), SetArg::TCSANOW, &t);
        }
    }
}

/// The first complete line typed on any of `inputs`: (index of the input, the line without its
/// end). A line ends at `\n` or `\r` (a serial terminal in raw mode sends CR for Enter). An
/// input that ends (EOF, hang-up, read error) stops being watched; `Ok(None)` when none is left
/// or `timeout` passed.
pub fn first_line(
    inputs: &mut [Input],
    timeout: Option<Duration>,
) -> io::Result<Option<(usize, String)>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); inputs.len()];
    let mut open: Vec<bool> = vec![true; inputs.len()];
    loop {
        let watched: Vec<usize> = (0..inputs.len()).filter(|&i| open[i]).collect();
        if watched.is_empty() {
            return Ok(None);
        }
        let wait = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds: Vec<PollFd> = watched
            .iter()
            .map(|&i| PollFd::new(inputs[i].file.as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, wait) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<(usize, PollFlags)> = watched
            .iter()
            .zip(&fds)
            .filter_map(|(&i, fd)| fd.revents().filter(|r| !r.is_empty()).map(|r| (i, r)))
            .collect();
        drop(fds);
        for (i, revents) in ready {
            let mut chunk = [0u8; 256];
            match inputs[i].file.read(&mut chunk) {
                Ok(0) => open[i] = false,
                Ok(n) => {
                    for &b in &chunk[..n] {
                        if b == b'\n' || b == b'\r' {
                            let line = String::from_utf8_lossy(&bufs[i]).into_owned();
                            return Ok(Some((i, line)));
                        }
                        if bufs[i].len() < MAX_LINE {
                            bufs[i].push(b);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                        open[i] = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => open[i] = false,
            }
        }
    }
}

/// Asks `question` until an answer parses: the lines go to every console, the answer comes
/// from the first of `inputs` to send a complete line. `Ok(None)` when no input is left.
pub fn ask<T>(
    consoles: &mut Consoles,
    inputs: &mut [Input],
    question: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>> {
    consoles.show(|v| v.status = "waiting for your answer".into());
    loop {
        for l in question {
            consoles.line(l);
        }
        let _ = consoles.write_all(b"> ");
        let Some((i, line)) = first_line(inputs, None).context("reading the answer")? else {
            return Ok(None);
        };
        consoles.line("");
        match parse(&line) {
            Ok(v) => {
                consoles.line(&format!(
                    "imprint: answered on {}: {}",
                    inputs[i].name,
                    shown(line.trim())
                ));
                return Ok(Some(v));
            }
            Err(msg) => consoles.line(&format!("imprint: {msg}")),
        }
    }
}

/// Opens the consoles with a person behind them (see [`prompt_consoles`]) under `roots`.
fn system_inputs(roots: &Roots) -> Vec<Input> {
    let cmdline = Cmdline::read(&roots.proc).unwrap_or_default();
    prompt_consoles(roots, &cmdline)
        .iter()
        .filter_map(|n| Input::open(&roots.dev, n).ok())
        .collect()
}

/// Asks which of the equally good disks to use; `None` when declined or when nobody can
/// answer.
pub fn ask_choice(
    consoles: &mut Consoles,
    roots: &Roots,
    candidates: &[Disk],
) -> Result<Option<Disk>> {
    let mut inputs = system_inputs(roots);
    if inputs.is_empty() {
        consoles.line("imprint: no keyboard or serial console to ask on");
        return Ok(None);
    }
    let mut question = vec!["imprint: Which disk should imprint overwrite?".to_string()];
    for (i, d) in candidates.iter().enumerate() {
        question.push(format!(
            "  {}) {} {} {} serial {}",
            i + 1,
            d.name,
            discover::human_bytes(d.size),
            d.model.as_deref().unwrap_or("?"),
            d.serial.as_deref().unwrap_or("?")
        ));
    }
    question.push("  0) none: stop without writing (the default)".to_string());
    question.push(format!(
        "Type a number and Enter (on the keyboard or the serial console: {})",
        inputs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let names: Vec<&str> = candidates.iter().map(|d| d.name.as_str()).collect();
    let pick = ask(consoles, &mut inputs, &question, |a| {
        parse_choice(a, &names)
    })
    .context("asking which disk to use")?;
    Ok(pick.flatten().and_then(|i| candidates.get(i).cloned()))
}

/// Shows what will be erased and asks for a yes; anything but yes (or nobody to ask) is no.
pub fn confirm(
    consoles: &mut Consoles,
    roots: &Roots,
    disk: &Disk,
    image: &str,
    size: u64,
) -> Result<bool> {
    let parts: Vec<String> = disk
        .partitions
        .iter()
        .map(|p| format!("{} ({})", p.name, discover::human_bytes(p.size)))
        .collect();
    consoles.line(&format!(
        "imprint: {} {} serial {} {} — partitions: {} — will be overwritten with {} ({})",
        disk.name,
        disk.model.as_deref().unwrap_or("?"),
        disk.serial.as_deref().unwrap_or("?"),
        discover::human_bytes(disk.size),
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        },
        image,
        discover::human_bytes(size)
    ));
    let mut inputs = system_inputs(roots);
    if inputs.is_empty() {
        consoles.line("imprint: confirmation required (config `confirm`) but no keyboard or serial console to ask on; set `confirm: never` and pin the target to install unattended");
        return Ok(false);
    }
    let question = [format!(
        "Erase {} and install {image}? Type y and Enter to install, n or Enter to stop [n]",
        disk.name
    )];
    let ok =
        ask(consoles, &mut inputs, &question, parse_yes_no).context("asking for confirmation")?;
    Ok(ok == Some(true))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    const BUTTON: &str = "I: Bus=0019 Vendor=0000 Product=0001 Version=0000\nN: Name=\"Power Button\"\nH: Handlers=kbd event0\nB: PROP=0\nB: EV=3\nB: KEY=10000000000000 0\n\n";
    const KEYBOARD: &str = "I: Bus=0003 Vendor=0627 Product=0001 Version=0111\nN: Name=\"QEMU QEMU USB Keyboard\"\nH: Handlers=sysrq kbd leds event2\nB: PROP=0\nB: EV=120013\nB: KEY=1000000000007 ff9f207ac14057ff febeffdfffefffff fffffffffffffffe\n";

    #[test]
    fn keyboards_are_told_from_buttons() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("devices");
        write(&p, BUTTON);
        assert!(!keyboard_present(&p));
        write(&p, &format!("{BUTTON}{KEYBOARD}"));
        assert!(keyboard_present(&p));
        assert!(!keyboard_present(&t.path().join("missing")));
    }

    #[test]
    fn prompts_go_to_serial_always_and_to_the_screen_when_a_keyboard_is_there() {
        let t = tempfile::tempdir().unwrap();
        let r = Roots::under(t.path());
        // The live image's command line: console=tty0 console=ttyS0,115200.
        write(&r.sys.join("class/tty/console/active"), "tty0 ttyS0\n");
        write(&r.proc.join("bus/input/devices"), BUTTON);
        let none = Cmdline::parse("console=tty0 console=ttyS0,115200");
        assert_eq!(prompt_consoles(&r, &none), ["ttyS0"], "no keyboard");
        write(
            &r.proc.join("bus/input/devices"),
            &format!("{BUTTON}{KEYBOARD}"),
        );
        assert_eq!(prompt_consoles(&r, &none), ["tty0", "ttyS0"]);
        // Screen only (a NUC without serial console=): ttyS0 is still tried, it is added to
        // every console list and may have a cable.
        write(&r.sys.join("class/tty/console/active"), "tty1\n");
        assert_eq!(prompt_consoles(&r, &none), ["tty1", "ttyS0"]);
        // The override wins, `console` is the kernel's last console.
        write(&r.sys.join("class/tty/console/active"), "tty0 ttyS0\n");
        let one = Cmdline::parse("imprint.prompt=console");
        assert_eq!(prompt_consoles(&r, &one), ["ttyS0"]);
        let two = Cmdline::parse("imprint.prompt=tty0,ttyUSB0,tty0");
        assert_eq!(prompt_consoles(&r, &two), ["tty0", "ttyUSB0"]);
    }

    #[test]
    fn answers_parse() {
        let names = ["nvme0n1", "nvme1n1"];
        assert_eq!(parse_choice("2\n", &names), Ok(Some(1)));
        assert_eq!(parse_choice(" 1 ", &names), Ok(Some(0)));
        assert_eq!(parse_choice("nvme1n1", &names), Ok(Some(1)));
        assert_eq!(
            parse_choice("", &names),
            Ok(None),
            "Enter is the default: none"
        );
        assert_eq!(parse_choice("0", &names), Ok(None));
        assert_eq!(parse_choice("NONE", &names), Ok(None));
        assert!(parse_choice("3", &names).unwrap_err().contains("0 to 2"));
        let e = parse_choice("\x1b[A", &names).unwrap_err();
        assert!(
            !e.contains('\x1b'),
            "control characters are not echoed: {e}"
        );
        assert_eq!(parse_yes_no("y"), Ok(true));
        assert_eq!(parse_yes_no("YES\r"), Ok(true));
        assert_eq!(parse_yes_no(""), Ok(false));
        assert_eq!(parse_yes_no("n"), Ok(false));
        assert!(parse_yes_no("yep").is_err());
    }

    fn pipe() -> (Input, File) {
        let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        (Input::new("pipe", File::from(r)), File::from(w))
    }

    #[test]
    fn the_first_complete_line_on_any_input_wins() {
        let (a, mut wa) = pipe();
        let (b, mut wb) = pipe();
        let mut inputs = [a, b];
        // A half line on a never wins over a whole line on b, whichever came first.
        wa.write_all(b"1").unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            wb.write_all(b"2\r").unwrap();
            wb
        });
        let got = first_line(&mut inputs, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(got, Some((1, "2".to_string())));
        let _wb = late.join().unwrap();
        // A closed input stops being watched; the other still answers.
        let (c, wc) = pipe();
        let (d, mut wd) = pipe();
        let mut inputs = [c, d];
        drop(wc);
        wd.write_all(b"yes\n").unwrap();
        assert_eq!(
            first_line(&mut inputs, Some(Duration::from_secs(10))).unwrap(),
            Some((1, "yes".to_string()))
        );
        // Nothing typed: the timeout ends the wait; all closed: nobody can answer.
        let (e, _we) = pipe();
        let t = Instant::now();
        assert_eq!(
            first_line(&mut [e], Some(Duration::from_millis(200))).unwrap(),
            None
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        let (f, wf) = pipe();
        drop(wf);
        assert_eq!(first_line(&mut [f], None).unwrap(), None);
    }

    #[test]
    fn a_pty_in_canonical_mode_answers_with_a_line() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let t = tempfile::tempdir().unwrap();
        let name = nix::unistd::ttyname(pty.slave.as_fd()).unwrap();
        // Input::open takes <dev>/<name>: point a fake /dev at the pty's slave.
        std::os::unix::fs::symlink(&name, t.path().join("ttyS9")).unwrap();
        // Raw mode first, as a program before us may have left it.
        let mut raw = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &raw).unwrap();
        let input = Input::open(t.path(), "ttyS9").unwrap();
        let mut master = File::from(pty.master);
        // Enter on a serial terminal is CR; canonical mode with ICRNL makes it a line end.
        master.write_all(b"n\x7fy\r").unwrap();
        let mut inputs = [input];
        assert_eq!(
            first_line(&mut inputs, Some(Duration::from_secs(10))).unwrap(),
            Some((0, "y".to_string())),
            "backspace edited the line"
        );
        drop(inputs);
        let after = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(
            !after.local_flags.contains(LocalFlags::ICANON),
            "mode restored"
        );
    }

    #[test]
    fn ask_repeats_until_an_answer_parses_and_says_where_it_came_from() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("ttyS0"), "").unwrap();
        let mut consoles = Consoles::open(&t.path().join("sys"), &dev);
        let (a, mut wa) = pipe();
        let (mut b, mut wb) = pipe();
        b.name = "tty0".into();
        let mut inputs = [a, b];
        wb.write_all(b"maybe\n").unwrap();
        let later = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            wa.write_all(b"y\n").unwrap();
            wa
        });
        let q = ["Erase nvme0n1 and install demo?".to_string()];
        let got = ask(&mut consoles, &mut inputs, &q, parse_yes_no).unwrap();
        let _wa = later.join().unwrap();
        assert_eq!(got, Some(true));
        let shown = std::fs::read_to_string(dev.join("ttyS0")).unwrap();
        assert_eq!(
            shown.matches("Erase nvme0n1 and install demo?").count(),
            2,
            "{shown}"
        );
        assert!(
            shown.contains("\"maybe\" is not an answer; type y or n"),
            "{shown}"
        );
        assert!(
            shown.contains("imprint: answered on pipe: \"y\""),
            "{shown}"
        );
        drop(wb);
    }
}
