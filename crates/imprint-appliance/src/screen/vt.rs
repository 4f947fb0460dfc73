//! The Linux virtual terminal the view is drawn on: plain ANSI sequences (the console's own
//! `console_codes(4)`), three ioctls, and the kernel's messages moved off the screen.
//!
//! Kernel messages: the command line's `quiet` keeps the kernel's boot chatter off every console
//! until PID 1 runs (one console log level covers them all). Then [`quiet_kernel`] sends the VT
//! console's kernel messages to a VT nobody looks at (`TIOCLINUX` subcode 11,
//! `TIOCL_SETKMSGREDIRECT`, to tty[`KMSG_VT`]: Alt+F2 shows them on a real machine) and raises
//! the console log level again, so the serial console gets every later kernel message while
//! the monitor keeps the view. What `quiet` held back during boot is copied from `/dev/kmsg` to
//! the serial console ([`crate::console::Consoles::replay_kernel_log`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{render, Frame, Style, View, COLS, ROWS};

/// The VT that receives the kernel's messages instead of the one in front.
pub const KMSG_VT: u8 = 2;
/// `TIOCLINUX` subcode: redirect kernel messages to VT n (`TIOCL_SETKMSGREDIRECT`).
const TIOCL_SETKMSGREDIRECT: u8 = 11;
/// The console log level restored once the view owns the screen: everything but debug.
const CONSOLE_LOGLEVEL: &str = "7";

mod ioctl {
    use nix::libc;
    /// `struct console_font_op` of `<linux/kd.h>`.
    #[repr(C)]
    pub struct ConsoleFontOp {
        pub op: libc::c_uint,
        pub flags: libc::c_uint,
        pub width: libc::c_uint,
        pub height: libc::c_uint,
        pub charcount: libc::c_uint,
        pub data: *mut libc::c_uchar,
    }
    /// `KDFONTOP` of `<linux/kd.h>` (not in libc).
    const KDFONTOP: libc::c_ulong = 0x4B72;
    // TIOCLINUX takes a byte array whose first byte is the subcode.
    nix::ioctl_write_ptr_bad!(tioclinux, libc::TIOCLINUX, [u8; 2]);
    nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);
    nix::ioctl_write_ptr_bad!(kdfontop, KDFONTOP, ConsoleFontOp);
}

/// `KD_FONT_OP_SET_DEFAULT`: load one of the kernel's built-in fonts, by name.
const KD_FONT_OP_SET_DEFAULT: u32 = 2;

/// Loads the kernel's built-in font `name` (`TER16x32`, `VGA8x16`) on the VT `vt`.
pub fn set_font(vt: &File, name: &str) -> io::Result<()> {
    let mut cname: Vec<u8> = name.bytes().chain([0]).collect();
    let op = ioctl::ConsoleFontOp {
        op: KD_FONT_OP_SET_DEFAULT,
        flags: 0,
        width: 0,
        height: 0,
        charcount: 0,
        data: cname.as_mut_ptr(),
    };
    // SAFETY: KD_FONT_OP_SET_DEFAULT reads the struct and, from `data`, a NUL-terminated name
    // of at most 32 bytes; both live until the call returns.
    unsafe { ioctl::kdfontop(vt.as_raw_fd(), &op) }.map_err(io::Error::from)?;
    Ok(())
}

/// Moves kernel messages off the VT in front (to tty[`KMSG_VT`], allocated by opening it) and
/// restores the console log level `quiet` lowered. Returns what it did, for the serial log.
pub fn quiet_kernel(dev: &Path, proc: &Path, raise_loglevel: bool) -> io::Result<String> {
    let target = open_vt(&dev.join(format!("tty{KMSG_VT}")))?;
    let arg = [TIOCL_SETKMSGREDIRECT, KMSG_VT];
    // SAFETY: TIOCLINUX with subcode 11 reads exactly two bytes from the pointer, which points
    // to a live two-byte array; the fd is an open VT.
    unsafe { ioctl::tioclinux(target.as_raw_fd(), &arg) }.map_err(io::Error::from)?;
    if raise_loglevel {
        std::fs::write(proc.join("sys/kernel/printk"), CONSOLE_LOGLEVEL)?;
    }
    Ok(format!(
        "kernel messages go to tty{KMSG_VT} (Alt+F2) and the serial console{}",
        if raise_loglevel {
            format!(", console log level {CONSOLE_LOGLEVEL}")
        } else {
            String::new()
        }
    ))
}

/// Opens a VT for writing, not as our controlling terminal.
pub fn open_vt(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(path)
}

/// The VT's size (columns, rows).
pub fn size(vt: &File) -> io::Result<(u16, u16)> {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` to the pointer, a live local of that type.
    unsafe { ioctl::tiocgwinsz(vt.as_raw_fd(), &mut ws) }.map_err(io::Error::from)?;
    Ok((ws.ws_col, ws.ws_row))
}

/// Sequences sent once: no screen blanking or power-down (an install outlasts the default 10
/// minutes), no autowrap (a full last row must not scroll the view), clear.
pub const SETUP: &str = "\x1b[9;0]\x1b[14;0]\x1b[?7l\x1b[0m\x1b[H\x1b[2J";

fn sgr(s: Style) -> &'static str {
    match s {
        Style::Normal => "\x1b[0m",
        Style::Title => "\x1b[0;30;47m",
        Style::Label => "\x1b[0;1m",
        Style::BarDone => "\x1b[0;1;37;42m",
        Style::BarLeft => "\x1b[0;44m",
        Style::Good => "\x1b[0;1;37;42m",
        Style::Bad => "\x1b[0;1;37;41m",
        Style::Ask => "\x1b[0;1;33m",
    }
}

/// The bytes that draw `frame` over the whole 80x25 area (row by row, cursor addressed: no
/// newline can scroll), then place the cursor where a question waits, or hide it.
pub fn encode(frame: &Frame, cursor: Option<(usize, usize)>) -> Vec<u8> {
    let mut out = String::with_capacity(COLS * ROWS * 2);
    out.push_str("\x1b[?25l");
    for (r, row) in frame.rows().enumerate() {
        out.push_str(&format!("\x1b[{};1H", r + 1));
        let mut style = None;
        for &(c, s) in row {
            if style != Some(s) {
                out.push_str(sgr(s));
                style = Some(s);
            }
            out.push(c);
        }
    }
    out.push_str("\x1b[0m");
    if let Some((r, c)) = cursor {
        out.push_str(&format!("\x1b[{};{}H\x1b[?25h", r + 1, c + 1));
    }
    out.into_bytes()
}

/// Draws the view on `vt`.
pub fn draw(vt: &mut File, view: &View) -> io::Result<()> {
    let (frame, cursor) = render(view);
    vt.write_all(&encode(&frame, cursor))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cursor_addressed_with_styles_and_no_newlines() {
        let mut f = Frame::default();
        f.put(0, 0, "ab", Style::Title);
        let bytes = String::from_utf8(encode(&f, Some((24, 3)))).unwrap();
        assert!(bytes.starts_with("\x1b[?25l\x1b[1;1H\x1b[0;30;47mab\x1b[0m "));
        assert!(!bytes.contains('\n'));
        assert_eq!(bytes.matches(";1H").count(), ROWS);
        assert!(bytes.ends_with("\x1b[25;4H\x1b[?25h"));
        let hidden = String::from_utf8(encode(&f, None)).unwrap();
        assert!(hidden.ends_with("\x1b[0m") && !hidden.contains("?25h"));
    }
}
