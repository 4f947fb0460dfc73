//! Reading the virtual NUC's monitor: qemu's `screendump` as PNG, read with Debian's
//! `tesseract-ocr`, and kept as a test artefact in `build/e2e-artefacts/`. What a person at the
//! monitor can read is what these tests assert.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{run, workspace_root, E2eError, Vm};

/// Where screenshots (PNG), their OCR text and the serial log at that moment are left after the
/// run, in the checkout's `build/`.
pub fn artefact_dir() -> PathBuf {
    let d = workspace_root().join("build/e2e-artefacts");
    let _ = std::fs::create_dir_all(&d);
    d
}

/// The text tesseract reads in a screenshot, one line per screen line it found. The screen is
/// a uniform block of text (`--psm 6`); case and spacing are as read.
pub fn ocr(png: &Path) -> Result<String, E2eError> {
    run(Command::new("tesseract")
        .arg(png)
        .arg("stdout")
        .args(["--psm", "6"]))
}

/// How much screenshots are enlarged for OCR: tesseract misreads small console glyphs (`nvme`
/// as `nume` in the 8x16 font); the live image's 16x32 font at twice its size reads well.
const OCR_SCALE: usize = 2;

/// A binary PPM (`P6`, as qemu's `screendump` writes it) as a black-on-white PGM (`P5`)
/// `scale` times larger, for tesseract: in each pixel row the most common colour is the
/// background (black, the banners' green or red, the title's grey) and every pixel clearly
/// unlike it is text. Nearest-neighbour: the console's pixels stay sharp.
pub fn ppm_for_ocr(ppm: &[u8], scale: usize) -> Result<Vec<u8>, E2eError> {
    let bad = |why: &str| E2eError::Missing(format!("screendump is not a P6 PPM: {why}"));
    // Header: P6 WIDTH HEIGHT MAXVAL, whitespace-separated, then one whitespace byte.
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while i < ppm.len() && ppm[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < ppm.len() && !ppm[i].is_ascii_whitespace() {
            i += 1;
        }
        if start == i {
            return Err(bad("short header"));
        }
        fields.push(String::from_utf8_lossy(&ppm[start..i]).into_owned());
    }
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(bad("not 8-bit P6"));
    }
    let w: usize = fields[1].parse().map_err(|_| bad("width"))?;
    let h: usize = fields[2].parse().map_err(|_| bad("height"))?;
    let px = ppm
        .get(i + 1..i + 1 + w * h * 3)
        .ok_or_else(|| bad("short data"))?;
    let mut out = format!("P5 {} {} 255\n", w * scale, h * scale).into_bytes();
    for row in px.chunks(w * 3) {
        let mut counts: std::collections::HashMap<&[u8], usize> = Default::default();
        for p in row.chunks(3) {
            *counts.entry(p).or_default() += 1;
        }
        let bg = counts
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map(|(p, _)| p)
            .unwrap_or(&[0, 0, 0]);
        let line: Vec<u8> = row
            .chunks(3)
            .flat_map(|p| {
                let d: u32 = p
                    .iter()
                    .zip(bg)
                    .map(|(&a, &b)| u32::from(a.abs_diff(b)))
                    .sum();
                std::iter::repeat_n(if d > 96 { 0 } else { 255 }, scale)
            })
            .collect();
        for _ in 0..scale {
            out.extend_from_slice(&line);
        }
    }
    Ok(out)
}

/// A screenshot of the VM's monitor saved as `<artefacts>/<name>.png`, and its text (OCR of
/// an enlarged grey copy, kept next to it as `.txt`).
pub fn shot(vm: &mut Vm, name: &str) -> Result<(PathBuf, String), E2eError> {
    let dir = artefact_dir();
    let png = dir.join(format!("{name}.png"));
    vm.screendump_png(&png)?;
    let ppm = dir.join(format!("{name}.ppm"));
    vm.screendump(&ppm)?;
    let io = |source| E2eError::Io {
        what: "reading",
        path: ppm.clone(),
        source,
    };
    let big = ppm_for_ocr(&std::fs::read(&ppm).map_err(io)?, OCR_SCALE)?;
    let pgm = dir.join(format!("{name}.ocr.pgm"));
    std::fs::write(&pgm, big).map_err(|source| E2eError::Io {
        what: "writing",
        path: pgm.clone(),
        source,
    })?;
    let text = ocr(&pgm)?;
    let _ = std::fs::remove_file(&ppm);
    let _ = std::fs::remove_file(&pgm);
    let _ = std::fs::write(png.with_extension("txt"), &text);
    let _ = std::fs::write(png.with_extension("serial.log"), vm.log());
    Ok((png, text))
}

/// Takes screenshots until one reads as `want` says (`want` gets the OCR text), or `timeout`
/// passes; returns the last one either way with whether it matched.
pub fn shot_until(
    vm: &mut Vm,
    name: &str,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> Result<(PathBuf, String, bool), E2eError> {
    let start = Instant::now();
    loop {
        let (png, text) = shot(vm, name)?;
        if want(&text) {
            return Ok((png, text, true));
        }
        if start.elapsed() >= timeout || !vm.is_running() {
            return Ok((png, text, false));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `text` with whitespace runs squeezed to single spaces, for matching OCR output.
pub fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `text` squeezed, with the glyphs tesseract confuses in the console's Terminus font folded
/// together: its zero has a dot inside and reads as `0`, `@`, `8`, `6`, `O`, `Q` or `D`; one
/// reads as `1`, `l`, `i`, `I` or `|`; stray dashes are dropped.
pub fn fold(text: &str) -> String {
    squeeze(text)
        .chars()
        .filter_map(|c| match c {
            '@' | '8' | '6' | 'O' | 'Q' | 'D' => Some('0'),
            'l' | 'I' | 'i' | '|' => Some('1'),
            // Read into a hyphen next to it (`nuc-—demo`).
            '\u{2014}' | '\u{2013}' => None,
            c => Some(c),
        })
        .collect()
}

/// Whether the OCR text `screen` shows `want`, up to the confusions [`fold`] allows.
pub fn reads(screen: &str, want: &str) -> bool {
    fold(screen).contains(&fold(want))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn folding_forgives_the_dotted_zero_and_the_one() {
        assert!(reads(
            "Erase nvme@nl and\n install",
            "Erase nvme0n1 and install"
        ));
        assert!(reads("S/N NVME@@@1", "NVME0001"));
        assert!(reads("MAC 52:54:00:12:34:56 Ceth@)", "52:54:00:12:34:56"));
        assert!(reads("Hostname nuc-\u{2014}demo-@1", "nuc-demo-01"));
        assert!(!reads("Erase nvme0n2", "Erase nvme0n1"));
        assert!(!reads("FAILED", "DONE"));
    }

    #[test]
    fn screenshots_become_enlarged_grey_text_dark_on_light() {
        // 3x1 on green (a banner): the white pixel is text; scale 2 doubles both ways.
        let ppm = b"P6 3 1 255\n\x00\xaa\x00\xff\xff\xff\x00\xaa\x00";
        let pgm = ppm_for_ocr(ppm, 2).unwrap();
        assert_eq!(&pgm[..11], b"P5 6 2 255\n");
        let row = [255, 255, 0, 0, 255, 255];
        assert_eq!(&pgm[11..], &[row, row].concat()[..]);
        assert!(ppm_for_ocr(b"P3 1 1 255\n0 0 0", 2).is_err());
    }
}
