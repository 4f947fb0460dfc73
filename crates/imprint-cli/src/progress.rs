//! Progress renderers for the command line: an `indicatif` bar with rate and ETA on a
//! terminal, plain periodic lines in logs, and JSON events (one object per line) for programs
//! (`--json`). The engine reports through `imprint_core::progress::Progress`.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::output::detail;
use crate::units;
use imprint_core::progress::{Phase, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde::Serialize;

/// Width of the bar itself, so that the whole line fits 80 columns (see [`bar_line`]).
const BAR_WIDTH: u64 = 20;

/// One progress line: `   write [=========>          ] 1.2 GiB/3.4 GiB 95.4 MiB/s ETA 00:24`.
/// At most 79 columns whatever the numbers (sizes and rates at most 10 characters each, ETA at
/// most 8), so it never wraps on an 80-column terminal.
pub fn bar_line(phase: &str, done: u64, total: u64, elapsed: f64, eta: f64) -> String {
    let filled = if total == 0 {
        BAR_WIDTH
    } else {
        (u128::from(done.min(total)) * u128::from(BAR_WIDTH) / u128::from(total)) as u64
    };
    let mut bar = "=".repeat(filled as usize);
    if filled < BAR_WIDTH {
        bar.push('>');
        bar.push_str(&" ".repeat((BAR_WIDTH - filled - 1) as usize));
    }
    format!(
        "{phase:>8} [{bar}] {}/{} {} ETA {}",
        units::size(done),
        units::size(total),
        units::rate(done, elapsed),
        units::eta(eta)
    )
}

/// A bar per phase with bytes, rate and ETA ([`bar_line`]), drawn by `indicatif`.
#[derive(Debug)]
pub struct BarProgress {
    bar: Mutex<Option<ProgressBar>>,
    target: fn() -> ProgressDrawTarget,
}

impl BarProgress {
    /// Bars drawn on standard error.
    pub fn stderr() -> BarProgress {
        BarProgress {
            bar: Mutex::new(None),
            target: ProgressDrawTarget::stderr,
        }
    }
}

/// A bar for `name` (`download`, `prepare`) on standard error, drawn with [`bar_line`]; `None`
/// off a terminal or with `--quiet` (callers then print plain lines, or nothing).
pub fn terminal_bar(name: &'static str) -> Option<ProgressBar> {
    use std::io::IsTerminal;
    (!crate::output::quiet() && std::io::stderr().is_terminal())
        .then(|| styled_bar(name, 0, ProgressDrawTarget::stderr()))
}

/// A bar whose whole line is [`bar_line`].
fn styled_bar(name: &'static str, total: u64, target: ProgressDrawTarget) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), target);
    let style = ProgressStyle::with_template("{line}")
        .map(|s| {
            s.with_key(
                "line",
                move |st: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&bar_line(
                        name,
                        st.pos(),
                        st.len().unwrap_or(0),
                        st.elapsed().as_secs_f64(),
                        st.eta().as_secs_f64(),
                    ));
                },
            )
        })
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

impl Progress for BarProgress {
    fn begin(&self, phase: Phase, total: u64) {
        let bar = styled_bar(phase.name(), total, (self.target)());
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }
    fn advance(&self, done: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.set_position(done);
            }
        }
    }
    fn end(&self, phase: Phase, bytes: u64, secs: f64) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish_and_clear();
            }
        }
        detail!("{}", phase_done(phase, bytes, secs));
    }
}

/// The line a finished phase leaves (with `--verbose`): `   write 1.2 GiB in 12.3 s (95.4 MiB/s)`.
pub fn phase_done(phase: Phase, bytes: u64, secs: f64) -> String {
    format!(
        "{:>8} {} in {} ({})",
        phase.name(),
        units::size(bytes),
        units::duration(secs),
        units::rate(bytes, secs)
    )
}

/// No progress at all (`--quiet`).
#[derive(Debug)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: Phase, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self, _: Phase, _: u64, _: f64) {}
}

/// The phase being reported by [`LineProgress`]: phase, total, start, last line printed.
type LineState = Option<(Phase, u64, Instant, Instant)>;
/// The phase being reported by [`JsonProgress`]: phase, total, last event.
type JsonState = Option<(Phase, u64, Instant)>;

/// Plain lines, at most one every `every`, for logs and dumb consoles.
#[derive(Debug)]
pub struct LineProgress<W: Write + Send> {
    out: Mutex<(W, LineState)>,
    every: Duration,
}

impl<W: Write + Send> LineProgress<W> {
    /// Lines to `out`, at most one per `every`.
    pub fn new(out: W, every: Duration) -> Self {
        LineProgress {
            out: Mutex::new((out, None)),
            every,
        }
    }
}

impl<W: Write + Send> Progress for LineProgress<W> {
    fn begin(&self, phase: Phase, total: u64) {
        if let Ok(mut g) = self.out.lock() {
            let now = Instant::now();
            g.1 = Some((phase, total, now, now));
            let _ = writeln!(g.0, "{}: {} to go", phase.name(), units::size(total));
        }
    }
    fn advance(&self, done: u64) {
        if let Ok(mut g) = self.out.lock() {
            let (out, state) = &mut *g;
            if let Some((phase, total, start, last)) = state {
                if last.elapsed() >= self.every {
                    *last = Instant::now();
                    let secs = start.elapsed().as_secs_f64();
                    let pct = if *total > 0 {
                        done as f64 * 100.0 / *total as f64
                    } else {
                        100.0
                    };
                    let _ = writeln!(
                        out,
                        "{}: {:5.1}% {} of {} ({})",
                        phase.name(),
                        pct,
                        units::size(done),
                        units::size(*total),
                        units::rate(done, secs)
                    );
                }
            }
        }
    }
    fn end(&self, phase: Phase, bytes: u64, secs: f64) {
        if let Ok(mut g) = self.out.lock() {
            g.1 = None;
            let _ = writeln!(
                g.0,
                "{}: done, {} in {} ({})",
                phase.name(),
                units::size(bytes),
                units::duration(secs),
                units::rate(bytes, secs)
            );
        }
    }
}

/// A JSON progress event.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A phase began.
    Begin {
        /// The phase.
        phase: Phase,
        /// Bytes expected.
        total: u64,
    },
    /// Progress within the phase.
    Progress {
        /// The phase.
        phase: Phase,
        /// Bytes done.
        done: u64,
        /// Bytes expected.
        total: u64,
    },
    /// A phase ended.
    End {
        /// The phase.
        phase: Phase,
        /// Bytes processed.
        bytes: u64,
        /// Seconds taken.
        seconds: f64,
        /// Bytes per second.
        bytes_per_second: f64,
    },
}

/// JSON events, one per line, at most one `progress` event per `every`.
#[derive(Debug)]
pub struct JsonProgress<W: Write + Send> {
    out: Mutex<(W, JsonState)>,
    every: Duration,
}

impl<W: Write + Send> JsonProgress<W> {
    /// Events to `out`.
    pub fn new(out: W, every: Duration) -> Self {
        JsonProgress {
            out: Mutex::new((out, None)),
            every,
        }
    }
}

fn emit<W: Write>(out: &mut W, ev: &Event) {
    if let Ok(line) = serde_json::to_string(ev) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

impl<W: Write + Send> Progress for JsonProgress<W> {
    fn begin(&self, phase: Phase, total: u64) {
        if let Ok(mut g) = self.out.lock() {
            g.1 = Some((phase, total, Instant::now()));
            emit(&mut g.0, &Event::Begin { phase, total });
        }
    }
    fn advance(&self, done: u64) {
        if let Ok(mut g) = self.out.lock() {
            let (out, state) = &mut *g;
            if let Some((phase, total, last)) = state {
                if last.elapsed() >= self.every {
                    *last = Instant::now();
                    emit(
                        out,
                        &Event::Progress {
                            phase: *phase,
                            done,
                            total: *total,
                        },
                    );
                }
            }
        }
    }
    fn end(&self, phase: Phase, bytes: u64, secs: f64) {
        if let Ok(mut g) = self.out.lock() {
            g.1 = None;
            let bps = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
            emit(
                &mut g.0,
                &Event::End {
                    phase,
                    bytes,
                    seconds: secs,
                    bytes_per_second: bps,
                },
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_events_are_lines_of_json() {
        let p = JsonProgress::new(Vec::new(), Duration::ZERO);
        p.begin(Phase::Write, 100);
        p.advance(50);
        p.end(Phase::Write, 100, 2.0);
        let out = p.out.into_inner().unwrap().0;
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["event"], "begin");
        assert_eq!(lines[1]["done"], 50);
        assert_eq!(lines[2]["bytes_per_second"], 50.0);
    }

    #[test]
    fn bar_lines_fit_80_columns_and_use_binary_units() {
        let worst = [
            (0, 0, 0.0, 0.0),
            (1023 << 30, 1023 << 30, 1.0, 1e9),
            (u64::MAX, u64::MAX, 1e-9, f64::INFINITY),
            (1023 * (1 << 20) + 1000, 1023 << 30, 1.0, 359_999.0),
        ];
        for phase in [
            Phase::Precheck,
            Phase::Wipe,
            Phase::Write,
            Phase::Verify,
            Phase::Commit,
            Phase::Compress,
        ] {
            for (done, total, elapsed, eta) in worst {
                let line = bar_line(phase.name(), done, total, elapsed, eta);
                assert!(line.chars().count() <= 80, "{} columns: {line}", line.len());
            }
        }
        assert_eq!(
            bar_line("write", 1 << 29, 1 << 30, 4.0, 4.0),
            "   write [==========>         ] 512.0 MiB/1.0 GiB 128.0 MiB/s ETA 00:04"
        );
        assert_eq!(
            bar_line("verify", 10, 10, 0.0, 0.0),
            "  verify [====================] 10 B/10 B - ETA 00:00"
        );
        assert_eq!(
            phase_done(Phase::Write, 3 << 30, 30.0),
            "   write 3.0 GiB in 30.0 s (102.4 MiB/s)"
        );
    }

    #[test]
    fn log_lines_use_binary_units() {
        let p = LineProgress::new(Vec::new(), Duration::ZERO);
        p.begin(Phase::Verify, 2 << 20);
        p.advance(1 << 20);
        p.end(Phase::Verify, 2 << 20, 0.5);
        let out = String::from_utf8(p.out.into_inner().unwrap().0).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "verify: 2.0 MiB to go");
        assert!(
            lines[1].starts_with("verify:  50.0% 1.0 MiB of 2.0 MiB ("),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].ends_with(" MiB/s)") || lines[1].ends_with(" GiB/s)"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2], "verify: done, 2.0 MiB in 0.5 s (4.0 MiB/s)");
    }
}
