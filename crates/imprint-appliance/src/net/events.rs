//! Progress events in network mode: every [`EVERY`] and at each phase change, a small JSON
//! [`Event`] `PUT` to `URL/reports/<machine>/progress.json` (overwritten each time), which
//! `imprint netboot serve` shows as one row per machine.
//!
//! Best-effort by design; the install never waits for the server. The flow only updates a
//! shared snapshot (a mutex held for a field copy, also from the write engine's progress
//! callback); one sender thread `PUT`s the latest snapshot with a short timeout and no
//! retries. While a `PUT` is in flight, updates replace the snapshot instead of queueing, so
//! a slow or hanging server loses intermediate events, never time on the write path. Only the
//! last event ([`Events::finish`]) is waited for, at most [`FINAL_WAIT`], so "done" or
//! "failed" reaches the server before the machine reboots when the server is there at all.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Result;
pub use imprint_core::event::{Event, EventPhase, PROGRESS_NAME};
use imprint_core::progress::{Phase, Progress};
use imprint_core::report::Status;

/// How often an event goes out while nothing else happens.
pub const EVERY: Duration = Duration::from_secs(2);
/// One event `PUT` may take this long (connect, send, answer); it is never retried.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long [`Events::finish`] waits for the last event to be sent.
pub const FINAL_WAIT: Duration = Duration::from_secs(10);
/// How many ended phases wait to be sent at most.
const ENDED_MAX: usize = 8;

impl State {
    /// Keeps the current state to be sent: its phase ends before the sender saw it.
    fn keep_ended(&mut self) {
        if self.ended.len() == ENDED_MAX {
            self.ended.pop_front();
        }
        self.ended.push_back(self.event.clone());
        self.urgent = true;
    }
}

/// Sends one event body to a path under the base URL (relative, e.g.
/// `reports/<mac>/progress.json`), bounded by [`PUT_TIMEOUT`].
pub type Sink = Box<dyn Fn(&str, &[u8]) -> Result<()> + Send + Sync>;

#[derive(Debug)]
struct State {
    event: Event,
    phase_start: Instant,
    /// A phase changed: send now rather than at the next tick.
    urgent: bool,
    /// Phases that ended before their last state was sent (the write engine's with its full
    /// byte count), sent before the current snapshot; at most [`ENDED_MAX`], the oldest
    /// dropped: a hanging server never makes this grow.
    ended: std::collections::VecDeque<Event>,
    /// The phase of the last snapshot taken by the sender.
    sent_phase: Option<EventPhase>,
    /// The last event is set; the sender sends it and stops.
    last: bool,
    /// The sender stopped (after the last event, sent or not).
    stopped: bool,
    /// The server took the last event.
    last_sent: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    start: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the snapshot is still plain data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The progress events of one run; [`Events::off`] (the stick, tests) sends nothing.
#[derive(Debug, Clone, Default)]
pub struct Events {
    shared: Option<Arc<Shared>>,
}

/// Events that go nowhere.
pub static OFF: Events = Events { shared: None };

impl Events {
    /// Events that go nowhere.
    pub fn off() -> Events {
        Events { shared: None }
    }

    /// Starts the sender thread for `machine` (MAC as in `reports/<machine>/`); the first
    /// event (phase `network`) goes out at once.
    pub fn start(machine: &str, sink: Sink) -> Events {
        let now = Instant::now();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                event: Event {
                    machine: machine.to_string(),
                    install_id: None,
                    hostname: None,
                    phase: EventPhase::Network,
                    bytes_done: 0,
                    bytes_total: 0,
                    rate: 0.0,
                    elapsed_secs: 0.0,
                    result: None,
                    error: None,
                    seq: 0,
                },
                phase_start: now,
                urgent: true,
                ended: std::collections::VecDeque::new(),
                sent_phase: None,
                last: false,
                stopped: false,
                last_sent: false,
            }),
            wake: Condvar::new(),
            start: now,
        });
        let rel = format!("reports/{machine}/{PROGRESS_NAME}");
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("imprint-events".into())
            .spawn(move || sender(&s, &rel, &sink));
        match spawned {
            Ok(_) => Events {
                shared: Some(shared),
            },
            Err(e) => {
                eprintln!("imprint: no progress events (cannot start a thread: {e})");
                Events::off()
            }
        }
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        if let Some(s) = &self.shared {
            let mut st = s.lock();
            if st.last {
                return;
            }
            change(&mut st);
            if st.urgent {
                s.wake.notify_all();
            }
        }
    }

    /// A new phase (sent at once).
    pub fn phase(&self, phase: EventPhase) {
        self.update(|st| {
            if st.event.phase != phase {
                if st.sent_phase != Some(st.event.phase) {
                    st.keep_ended();
                }
                st.event.phase = phase;
                st.event.bytes_done = 0;
                st.event.bytes_total = 0;
                st.event.rate = 0.0;
                st.phase_start = Instant::now();
                st.urgent = true;
            }
        });
    }

    /// The run's install id.
    pub fn install_id(&self, id: &str) {
        self.update(|st| st.event.install_id = Some(id.to_string()));
    }

    /// The hostname the seed gives this machine.
    pub fn hostname(&self, name: &str) {
        self.update(|st| {
            if st.event.hostname.as_deref() != Some(name) {
                st.event.hostname = Some(name.to_string());
                st.urgent = true;
            }
        });
    }

    /// The current phase's bytes (cheap: called per buffer by the write engine).
    fn bytes(&self, done: u64, total: Option<u64>) {
        self.update(|st| {
            st.event.bytes_done = done;
            if let Some(t) = total {
                st.event.bytes_total = t;
            }
            st.event.rate = done as f64 / st.phase_start.elapsed().as_secs_f64().max(1e-3);
        });
    }

    /// The current phase ended with `bytes` in `secs`: that state is sent too, even when the
    /// next phase begins before the sender wakes.
    fn ended(&self, bytes: u64, secs: f64) {
        self.update(|st| {
            st.event.bytes_done = bytes;
            st.event.rate = bytes as f64 / secs.max(1e-3);
            st.keep_ended();
            // Its final state is kept; the next phase needs no second copy.
            st.sent_phase = Some(st.event.phase);
        });
    }

    /// The last event: `done` with the result, or `failed` with the error. Waits at most
    /// [`FINAL_WAIT`] for it to be sent; returns whether it was.
    pub fn finish(&self, result: Status, error: Option<&str>) -> bool {
        let Some(s) = &self.shared else {
            return false;
        };
        {
            let mut st = s.lock();
            if st.last {
                return false;
            }
            st.event.phase = if result == Status::Failed {
                EventPhase::Failed
            } else {
                EventPhase::Done
            };
            st.event.result = Some(result);
            st.event.error = error.map(str::to_string);
            st.last = true;
            st.urgent = true;
            s.wake.notify_all();
        }
        let deadline = Instant::now() + FINAL_WAIT;
        let mut st = s.lock();
        loop {
            if st.stopped {
                // The sender stops after its attempt at the last event.
                return st.last_sent;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = s
                .wake
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// A [`Progress`] that feeds these events and passes everything on to `inner`.
    pub fn progress<'a>(&'a self, inner: &'a dyn Progress) -> EventProgress<'a> {
        EventProgress {
            events: self,
            inner,
        }
    }
}

/// The write engine's progress, fed into the events (see [`Events::progress`]).
pub struct EventProgress<'a> {
    events: &'a Events,
    inner: &'a dyn Progress,
}

impl std::fmt::Debug for EventProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProgress")
            .field("events", self.events)
            .finish_non_exhaustive()
    }
}

impl Progress for EventProgress<'_> {
    fn begin(&self, phase: Phase, total: u64) {
        self.events.phase(phase.into());
        self.events.bytes(0, Some(total));
        self.inner.begin(phase, total);
    }
    fn advance(&self, done: u64) {
        self.events.bytes(done, None);
        self.inner.advance(done);
    }
    fn end(&self, phase: Phase, bytes: u64, secs: f64) {
        self.events.ended(bytes, secs);
        self.inner.end(phase, bytes, secs);
    }
}

/// The sender thread: the latest snapshot every [`EVERY`], or at once after a phase change;
/// stops after the last event.
fn sender(s: &Shared, rel: &str, sink: &Sink) {
    let mut next = Instant::now();
    let mut failing = false;
    loop {
        let (event, last) = {
            let mut st = s.lock();
            while !st.urgent && Instant::now() < next {
                let wait = next.saturating_duration_since(Instant::now());
                st = s
                    .wake
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            st.event.seq += 1;
            let elapsed = s.start.elapsed().as_secs_f64();
            match st.ended.pop_front() {
                // Ended phases first; the current snapshot right after them.
                Some(mut e) => {
                    e.seq = st.event.seq;
                    e.elapsed_secs = elapsed;
                    (e, false)
                }
                None => {
                    st.urgent = false;
                    st.sent_phase = Some(st.event.phase);
                    st.event.elapsed_secs = elapsed;
                    (st.event.clone(), st.last)
                }
            }
        };
        // Off the lock: updates go on while this PUT is in flight (and replace the snapshot).
        let sent = sink(rel, &event.encode());
        match &sent {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                eprintln!("imprint: progress event not sent (the install goes on): {e:#}");
            }
            Err(_) => {}
        }
        if last {
            let mut st = s.lock();
            st.stopped = true;
            st.last_sent = sent.is_ok();
            s.wake.notify_all();
            return;
        }
        next = Instant::now() + EVERY;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Phases go out in order, the write engine's bytes arrive, the last event carries the
    /// result, and nothing is sent after it.
    #[test]
    fn phases_bytes_and_the_last_event_are_sent() {
        let got: Arc<Mutex<Vec<(String, Event2)>>> = Arc::default();
        let g = Arc::clone(&got);
        let ev = Events::start(
            "52-54-00-12-34-56",
            Box::new(move |rel, body| {
                let v: Event2 = serde_json::from_slice(body).unwrap();
                g.lock().unwrap().push((rel.to_string(), v));
                Ok(())
            }),
        );
        ev.install_id("id-1");
        ev.phase(EventPhase::Config);
        std::thread::sleep(Duration::from_millis(200));
        ev.hostname("nuc-1");
        let p = ev.progress(&imprint_core::progress::NoProgress);
        p.begin(Phase::Write, 1000);
        p.advance(600);
        // The next tick carries the bytes.
        std::thread::sleep(EVERY + Duration::from_millis(500));
        // A phase that ends and is followed at once by the next still reports its total.
        p.begin(Phase::Commit, 77);
        p.end(Phase::Commit, 77, 0.5);
        p.begin(Phase::Verify, 1000);
        std::thread::sleep(Duration::from_millis(300));
        assert!(ev.finish(Status::Installed, None));
        let got = got.lock().unwrap();
        assert!(got
            .iter()
            .all(|(rel, _)| rel == "reports/52-54-00-12-34-56/progress.json"));
        let phases: Vec<&str> = got.iter().map(|(_, e)| e.phase.as_str()).collect();
        assert_eq!(phases.first(), Some(&"network"), "{phases:?}");
        assert!(phases.contains(&"config"), "{phases:?}");
        assert!(
            got.iter().any(|(_, e)| e.phase == "writing"
                && e.bytes_done == 600
                && e.bytes_total == 1000
                && e.hostname.as_deref() == Some("nuc-1")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|(_, e)| e.phase == "commit" && e.bytes_done == 77 && e.bytes_total == 77),
            "{got:?}"
        );
        assert!(got.iter().any(|(_, e)| e.phase == "verifying"), "{got:?}");
        let last = &got.last().unwrap().1;
        assert_eq!(last.phase, "done");
        assert_eq!(last.result.as_deref(), Some("installed"));
        assert_eq!(last.install_id.as_deref(), Some("id-1"));
        let seqs: Vec<u64> = got.iter().map(|(_, e)| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // After the last event, updates go nowhere.
        drop(got);
        ev.phase(EventPhase::Writing);
        assert!(!ev.finish(Status::Failed, Some("late")));
    }

    #[derive(Debug, serde::Deserialize)]
    struct Event2 {
        phase: String,
        hostname: Option<String>,
        install_id: Option<String>,
        bytes_done: u64,
        bytes_total: u64,
        result: Option<String>,
        seq: u64,
    }

    /// A server that accepts connections and never answers: the flow's updates and the write
    /// engine's progress never wait for it, the sender gives up after [`PUT_TIMEOUT`], and the
    /// last event's wait is bounded by [`FINAL_WAIT`].
    #[test]
    fn a_hanging_server_never_stalls_the_install() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&requests);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let c = conn.unwrap();
                // Read the request head, then hang: never answer.
                let mut line = String::new();
                let mut rd = BufReader::new(c.try_clone().unwrap());
                if rd.read_line(&mut line).is_ok() && line.starts_with("PUT ") {
                    r.fetch_add(1, Ordering::SeqCst);
                }
                held.push(c);
            }
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(PUT_TIMEOUT))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let ev = Events::start(
            "aa-bb-cc-dd-ee-ff",
            Box::new(move |rel, body| {
                agent
                    .put(&format!("{base}/{rel}"))
                    .send(body)
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }),
        );
        // A write path's worth of updates while the first PUT hangs: each returns at once.
        let p = ev.progress(&imprint_core::progress::NoProgress);
        let t = Instant::now();
        p.begin(Phase::Write, 1 << 30);
        for i in 0..200_000u64 {
            p.advance(i * 4096);
            if i % 50_000 == 0 {
                ev.phase(EventPhase::Verifying);
                ev.phase(EventPhase::Writing);
            }
        }
        p.end(Phase::Write, 1 << 30, 1.0);
        let updates = t.elapsed();
        // Far below one PUT timeout: no update waited for the hanging PUT.
        assert!(updates < PUT_TIMEOUT / 2, "updates took {updates:?}");
        // The sender is still in its first PUT: phase changes were not queued behind it.
        assert!(requests.load(Ordering::SeqCst) <= 1);
        let t = Instant::now();
        assert!(
            !ev.finish(Status::Failed, Some("disk gone")),
            "nothing was answered"
        );
        let waited = t.elapsed();
        assert!(waited <= FINAL_WAIT + Duration::from_secs(1), "{waited:?}");
        // At most: the hanging first PUT, the write phase's end, the last event — each cut at
        // PUT_TIMEOUT; the 200 000 updates and 8 phase changes in between were not queued.
        assert!(requests.load(Ordering::SeqCst) <= 3);
    }
}
