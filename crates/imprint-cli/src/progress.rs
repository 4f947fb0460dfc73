//! Progress renderers for the command line: an `indicatif` bar with rate and ETA on a
//! terminal, plain periodic lines in logs, and JSON events (one object per line) for programs
//! (`--json`). The engine reports through `imprint_core::progress::Progress`.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use imprint_core::progress::{human_bytes, Phase, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// An `indicatif` bar per phase with bytes, rate and ETA.
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

impl Progress for BarProgress {
    fn begin(&self, phase: Phase, total: u64) {
        let bar = ProgressBar::with_draw_target(Some(total), (self.target)());
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(phase.name());
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
        eprintln!(
            "{:>8} {} in {:.1} s ({})",
            phase.name(),
            human_bytes(bytes),
            secs,
            rate(bytes, secs)
        );
    }
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
            let _ = writeln!(g.0, "{}: {} to go", phase.name(), human_bytes(total));
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
                        human_bytes(done),
                        human_bytes(*total),
                        rate(done, secs)
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
                "{}: done, {} in {:.1} s ({})",
                phase.name(),
                human_bytes(bytes),
                secs,
                rate(bytes, secs)
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

/// Bytes per second, in the same units as every other size (`human_bytes`).
fn rate(bytes: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
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
}
