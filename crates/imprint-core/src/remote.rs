//! Images from a URL: a resumable HTTP reader of one remote file, for the decoder to read
//! the image's byte stream from (`imprint write URL`, netboot).
//!
//! A [`Remote`] is one URL. Its first response *pins* the file: its total length and its
//! validator (a strong `ETag`, else `Last-Modified`). Every later request — the payload after
//! the manifest, and each reconnection — must answer for that same file:
//!
//! - A connection that drops, times out or ends early mid-body is reopened with
//!   `Range: bytes=N-` and `If-Range: <validator>`; only a `206` whose `Content-Range` starts
//!   at N, with the pinned total and validator, is accepted. The decoder above never notices.
//! - A server that ignores `Range` (answers `200`, as `python3 -m http.server` does) with the
//!   same validator sends the same bytes: the first N are read and dropped, and the stream goes
//!   on from N — a clean restart of the transfer, invisible to the decoder (it costs N bytes of
//!   download; reported through [`RemoteOptions::on_notice`]).
//! - A changed file (another validator, another length, a `412`/`416`), or a file without any
//!   validator, is never stitched together: the reader fails with [`RemoteError::Changed`] or
//!   [`RemoteError::CannotResume`]. Bytes already consumed are then invalid, so nothing
//!   resumes: the write engine fails before its commit (the target keeps no partition table)
//!   and the operator runs the install again, from the new manifest.
//!
//! Why not restart the decoder from scratch inside the engine: a restarted payload needs the
//! manifest that describes it, and the engine has already sized and wiped the target from the
//! old one; failing before commit is the one correct place. The manifest's chunk digests and
//! zstd's checksums still check every byte, so even a server that lies about validators cannot
//! get a mixed image onto a disk.
//!
//! Failures are bounded: transport errors, `5xx`, `429` and early ends are retried with
//! exponential backoff, at most [`RemoteOptions::retries`] times in a row without a byte of
//! progress (and [`RemoteOptions::max_reconnects`] in all); `404` and other `4xx` fail at once.
//! Each read waits at most [`RemoteOptions::read_timeout`], each connect
//! [`RemoteOptions::connect_timeout`]. Errors name the URL and the byte offset.
//!
//! URLs are shown redacted ([`redact_url`]): user-info and the query string (presigned S3
//! URLs carry their signature there) never reach an error message or a log.

use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ureq::http::{header, StatusCode};

/// Callback for notices a user should see (a resumed or restarted transfer).
pub type Notice = Arc<dyn Fn(&str) + Send + Sync>;

/// Limits and hooks of the HTTP reader.
#[derive(Clone)]
pub struct RemoteOptions {
    /// Time allowed to resolve and connect (and for TLS, the handshake).
    pub connect_timeout: Duration,
    /// Longest wait for the response head or for any single read of the body: a stalled
    /// server counts as a dropped connection.
    pub read_timeout: Duration,
    /// Consecutive failed attempts (no byte received in between) before giving up.
    pub retries: u32,
    /// Reconnections in all, over the whole transfer, before giving up.
    pub max_reconnects: u32,
    /// First delay before a retry; doubled each time up to [`RemoteOptions::max_backoff`].
    pub backoff: Duration,
    /// Longest delay between retries.
    pub max_backoff: Duration,
    /// Called with a one-line notice when a transfer is resumed or restarted.
    pub on_notice: Option<Notice>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
            retries: 5,
            max_reconnects: 100,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            on_notice: None,
        }
    }
}

impl fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("retries", &self.retries)
            .field("max_reconnects", &self.max_reconnects)
            .field("backoff", &self.backoff)
            .field("max_backoff", &self.max_backoff)
            .finish_non_exhaustive()
    }
}

/// Errors of the HTTP reader. Each names the (redacted) URL and the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not an `http://` (or, with the `https` feature, `https://`) URL.
    #[error("{url} is not a usable image URL: {reason}")]
    BadUrl {
        /// The redacted URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server answered with an error status that retrying cannot fix (404, 403, ...).
    #[error("{url}: the server answered HTTP {status} at byte {offset}{hint}")]
    Status {
        /// The redacted URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// Byte offset requested.
        offset: u64,
        /// A hint for the common cases.
        hint: &'static str,
    },
    /// Retries were exhausted; `last` is the last failure.
    #[error("{url}: giving up at byte {offset} after {attempts} attempts: {last}")]
    GaveUp {
        /// The redacted URL.
        url: String,
        /// Byte offset reached.
        offset: u64,
        /// Attempts made in a row.
        attempts: u32,
        /// The last failure, as text (it may come from the transport).
        last: String,
    },
    /// The file on the server is not the one the transfer started with.
    #[error(
        "{url} changed on the server during the transfer (at byte {offset}: {what}); the bytes already read are invalid — run the command again"
    )]
    Changed {
        /// The redacted URL.
        url: String,
        /// Byte offset reached.
        offset: u64,
        /// What differs.
        what: String,
    },
    /// The server gave neither a strong `ETag` nor `Last-Modified`: a reconnection could not
    /// prove it serves the same file.
    #[error(
        "{url}: the connection was lost at byte {offset} ({last}) and the server sends no ETag or Last-Modified, so the transfer cannot be resumed safely"
    )]
    CannotResume {
        /// The redacted URL.
        url: String,
        /// Byte offset reached.
        offset: u64,
        /// Why the connection was lost.
        last: String,
    },
    /// The server's answer does not make sense (bad `Content-Range`, no length).
    #[error("{url}: unusable answer at byte {offset}: {reason}")]
    Protocol {
        /// The redacted URL.
        url: String,
        /// Byte offset requested.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

impl RemoteError {
    /// Wraps the error for the `Read` interface; [`RemoteError::from_io`] finds it again.
    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The `RemoteError` inside an `io::Error` made by this module's readers, if any.
    pub fn from_io(e: &io::Error) -> Option<&RemoteError> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// What pins the file across requests.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Validator {
    ETag(String),
    LastModified(String),
    None,
}

impl Validator {
    fn of(headers: &ureq::http::HeaderMap) -> Validator {
        let get = |h| {
            headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        // If-Range needs a strong validator: a weak ETag ("W/...") cannot be used.
        match (get(header::ETAG), get(header::LAST_MODIFIED)) {
            (Some(e), _) if !e.starts_with("W/") => Validator::ETag(e),
            (_, Some(lm)) => Validator::LastModified(lm),
            _ => Validator::None,
        }
    }

    fn header_value(&self) -> Option<&str> {
        match self {
            Validator::ETag(v) | Validator::LastModified(v) => Some(v),
            Validator::None => None,
        }
    }
}

impl fmt::Display for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values come from the server: escape control characters.
        match self {
            Validator::ETag(v) => write!(f, "ETag {}", v.escape_debug()),
            Validator::LastModified(v) => write!(f, "Last-Modified {}", v.escape_debug()),
            Validator::None => write!(f, "no validator"),
        }
    }
}

/// The file as the first response described it.
#[derive(Debug, Clone)]
struct Pinned {
    total: u64,
    validator: Validator,
}

/// One remote file, read by any number of [`RemoteReader`]s (one at a time or concurrently).
pub struct Remote {
    url: String,
    shown: String,
    agent: ureq::Agent,
    opts: RemoteOptions,
    pinned: Mutex<Option<Pinned>>,
    resumes: AtomicU64,
    restarts: AtomicU64,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the raw URL: it may hold credentials.
        f.debug_struct("Remote")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

/// True if `s` looks like a URL this module reads (`http://` or `https://`), so callers can
/// tell URLs from file paths.
pub fn is_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// The URL as it may be shown: user-info replaced by `***`, the query string (presigned URLs
/// carry their signature there) replaced by `?…`, the fragment dropped, control characters
/// escaped.
pub fn redact_url(url: &str) -> String {
    let url = url.split('#').next().unwrap_or("");
    let (base, query) = match url.split_once('?') {
        Some((b, _)) => (b, "?…"),
        None => (url, ""),
    };
    let shown = match base.split_once("://") {
        Some((scheme, rest)) => {
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            let host = match authority.rsplit_once('@') {
                Some((_, host)) => format!("***@{host}"),
                None => authority.to_string(),
            };
            format!("{scheme}://{host}{path}{query}")
        }
        None => format!("{base}{query}"),
    };
    shown.escape_debug().to_string()
}

/// Parses `bytes START-END/TOTAL`.
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

/// A ureq error as text, without anything that could carry the URL (and its credentials).
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::BadUri(_) => "the URL is not valid".into(),
        ureq::Error::RequireHttpsOnly(_) => "https is required".into(),
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::HostNotFound => "host not found (DNS)".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        other => other.to_string(),
    }
}

/// One attempt's outcome.
enum Attempt {
    /// A body positioned at the requested offset, and the offset where it ends (a server may
    /// answer a range with less than asked).
    Body(ureq::BodyReader<'static>, u64),
    /// Worth retrying after a pause.
    Retry(String),
    /// Final.
    Fail(RemoteError),
}

impl Remote {
    /// A remote file at `url`. Nothing is requested yet; the first reader's first request
    /// pins the file.
    pub fn new(url: &str, opts: RemoteOptions) -> Result<Remote, RemoteError> {
        let shown = redact_url(url);
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") && !cfg!(feature = "https") {
            return Err(RemoteError::BadUrl {
                url: shown,
                reason: "this build of imprint reads plain http:// only".into(),
            });
        }
        if !is_url(url) {
            return Err(RemoteError::BadUrl {
                url: shown,
                reason: "only http:// and https:// URLs are supported".into(),
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_recv_response(Some(opts.read_timeout))
            .timeout_per_read(Some(opts.read_timeout))
            .user_agent(concat!("imprint/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Remote {
            url: url.to_string(),
            shown,
            agent,
            opts,
            pinned: Mutex::new(None),
            resumes: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        })
    }

    /// The URL as it may be shown (see [`redact_url`]).
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// The file's total length, once a first response pinned it.
    pub fn len(&self) -> Option<u64> {
        self.pinned().map(|p| p.total)
    }

    /// True if the file is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// Transfers resumed with a `206` so far.
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Relaxed)
    }

    /// Transfers restarted from byte 0 (server ignored `Range`) so far.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    fn pinned(&self) -> Option<Pinned> {
        self.pinned.lock().ok().and_then(|p| p.clone())
    }

    fn notice(&self, msg: &str) {
        if let Some(n) = &self.opts.on_notice {
            n(msg);
        }
    }

    /// A reader of bytes `[start, end)` (`end = None`: to the end of the file).
    pub fn reader(self: &Arc<Self>, start: u64, end: Option<u64>) -> RemoteReader {
        RemoteReader {
            remote: Arc::clone(self),
            pos: start,
            end,
            body: None,
            body_end: 0,
            failures: 0,
            reconnects: 0,
            last_failure: None,
        }
    }

    /// Reads the whole file into `out`, returning its length. Resumes like any reader.
    pub fn copy_to(self: &Arc<Self>, out: &mut dyn io::Write) -> io::Result<u64> {
        io::copy(&mut self.reader(0, None), out)
    }

    /// One request for the bytes from `pos`; `resuming` says a connection was lost before
    /// (for the notice).
    fn attempt(&self, pos: u64, resuming: bool) -> Attempt {
        let pinned = self.pinned();
        let mut req = self.agent.get(&self.url);
        req = req.header(header::RANGE, format!("bytes={pos}-"));
        if let Some(v) = pinned.as_ref().and_then(|p| p.validator.header_value()) {
            req = req.header(header::IF_RANGE, v);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(describe(&e)),
        };
        let status = resp.status();
        let validator = Validator::of(resp.headers());
        let header_str = |h| {
            resp.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let fail_status = |hint: &'static str| {
            Attempt::Fail(RemoteError::Status {
                url: self.shown.clone(),
                status: status.as_u16(),
                offset: pos,
                hint,
            })
        };
        let changed = |what: String| {
            Attempt::Fail(RemoteError::Changed {
                url: self.shown.clone(),
                offset: pos,
                what,
            })
        };
        let protocol = |reason: String| {
            Attempt::Fail(RemoteError::Protocol {
                url: self.shown.clone(),
                offset: pos,
                reason,
            })
        };
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let Some((start, last, total)) = header_str(header::CONTENT_RANGE)
                    .as_deref()
                    .and_then(parse_content_range)
                else {
                    return protocol("a 206 answer without a usable Content-Range".into());
                };
                if last < start || last >= total {
                    return protocol(format!(
                        "the Content-Range {start}-{last}/{total} is not a range of the file"
                    ));
                }
                if start != pos {
                    return protocol(format!(
                        "asked for byte {pos}, the server sent from {start}"
                    ));
                }
                match &pinned {
                    None => self.pin(total, validator),
                    Some(p) => {
                        if p.total != total {
                            return changed(format!("its size was {}, now {total}", p.total));
                        }
                        if p.validator != validator {
                            return changed(format!("{} became {validator}", p.validator));
                        }
                    }
                }
                Attempt::Body(resp.into_body().into_reader(), last.saturating_add(1))
            }
            StatusCode::OK => {
                let Some(total) = header_str(header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
                else {
                    return protocol("the server sends no Content-Length".into());
                };
                match &pinned {
                    None => self.pin(total, validator),
                    Some(p) => {
                        if p.validator != validator || p.validator == Validator::None {
                            if p.validator == Validator::None {
                                return Attempt::Fail(RemoteError::CannotResume {
                                    url: self.shown.clone(),
                                    offset: pos,
                                    last: "the server ignored Range".into(),
                                });
                            }
                            return changed(format!("{} became {validator}", p.validator));
                        }
                        if p.total != total {
                            return changed(format!("its size was {}, now {total}", p.total));
                        }
                    }
                }
                let mut body = resp.into_body().into_reader();
                if pos > 0 {
                    // The server ignores Range but sends the same file: drop what was read.
                    if resuming {
                        self.restarts.fetch_add(1, Ordering::Relaxed);
                        self.notice(&format!(
                            "{}: the server ignores Range; re-reading {pos} bytes to continue",
                            self.shown
                        ));
                    }
                    match io::copy(&mut (&mut body).take(pos), &mut io::sink()) {
                        Ok(n) if n == pos => {}
                        Ok(n) => {
                            return Attempt::Retry(format!(
                                "the connection ended after {n} of the {pos} bytes to skip"
                            ))
                        }
                        Err(e) => return Attempt::Retry(e.to_string()),
                    }
                }
                Attempt::Body(body, total)
            }
            StatusCode::PRECONDITION_FAILED | StatusCode::RANGE_NOT_SATISFIABLE => {
                changed(format!(
                    "the server answered HTTP {} to a request for the same file",
                    status.as_u16()
                ))
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                fail_status(" (not found: check the URL, or the file was removed)")
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => fail_status(
                " (access denied: credentials missing or wrong, or a presigned URL expired)",
            ),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Attempt::Retry(format!("the server answered HTTP {}", s.as_u16()))
            }
            _ => fail_status(""),
        }
    }

    fn pin(&self, total: u64, validator: Validator) {
        if let Ok(mut p) = self.pinned.lock() {
            p.get_or_insert(Pinned { total, validator });
        }
    }
}

/// Reads bytes `[start, end)` of a [`Remote`], reconnecting as the module describes.
pub struct RemoteReader {
    remote: Arc<Remote>,
    pos: u64,
    end: Option<u64>,
    body: Option<ureq::BodyReader<'static>>,
    /// Where the current body ends.
    body_end: u64,
    failures: u32,
    reconnects: u32,
    last_failure: Option<String>,
}

impl fmt::Debug for RemoteReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteReader")
            .field("remote", &self.remote)
            .field("pos", &self.pos)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl RemoteReader {
    /// The offset of the next byte.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Opens a body at `self.pos`, retrying within the limits.
    fn connect(&mut self) -> Result<ureq::BodyReader<'static>, RemoteError> {
        let r = &self.remote;
        loop {
            if let Some(last) = &self.last_failure {
                if self.failures > r.opts.retries || self.reconnects >= r.opts.max_reconnects {
                    return Err(RemoteError::GaveUp {
                        url: r.shown.clone(),
                        offset: self.pos,
                        attempts: self.failures,
                        last: last.clone(),
                    });
                }
                // A reconnection needs proof that the file is the same one.
                if let Some(p) = r.pinned() {
                    if p.validator == Validator::None && self.pos > 0 {
                        return Err(RemoteError::CannotResume {
                            url: r.shown.clone(),
                            offset: self.pos,
                            last: last.clone(),
                        });
                    }
                }
                let shift = self.failures.saturating_sub(1).min(16);
                let delay = r
                    .opts
                    .backoff
                    .saturating_mul(1 << shift)
                    .min(r.opts.max_backoff);
                std::thread::sleep(delay);
                self.reconnects += 1;
            }
            match r.attempt(self.pos, self.last_failure.is_some()) {
                Attempt::Body(b, end) => {
                    self.body_end = end;
                    if let Some(last) = self.last_failure.take() {
                        r.resumes.fetch_add(1, Ordering::Relaxed);
                        r.notice(&format!(
                            "{}: resumed at byte {} after: {last}",
                            r.shown, self.pos
                        ));
                    }
                    return Ok(b);
                }
                Attempt::Retry(why) => {
                    self.failures += 1;
                    self.last_failure = Some(why);
                }
                Attempt::Fail(e) => return Err(e),
            }
        }
    }

    fn lost(&mut self, why: String) {
        self.body = None;
        self.failures += 1;
        self.last_failure = Some(why);
    }
}

impl Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let limit = self.end.or_else(|| self.remote.len());
            if let Some(limit) = limit {
                if self.pos >= limit {
                    return Ok(0);
                }
            }
            let body = match &mut self.body {
                Some(b) => b,
                None => {
                    let b = self.connect().map_err(RemoteError::into_io)?;
                    self.body.insert(b)
                }
            };
            // The first answer may have pinned the length just now.
            let limit = self.end.or_else(|| self.remote.len());
            let want = match limit {
                Some(l) => buf
                    .len()
                    .min(usize::try_from(l - self.pos).unwrap_or(usize::MAX)),
                None => buf.len(),
            };
            match body.read(&mut buf[..want]) {
                Ok(0) if self.pos >= self.body_end => {
                    // A shorter range than asked, complete: ask for the next one.
                    self.body = None;
                }
                Ok(0) => {
                    // The body ended before the bytes this reader needs.
                    let why = format!("the server closed the connection at byte {}", self.pos);
                    self.lost(why);
                }
                Ok(n) => {
                    self.pos += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.lost(format!("{e} at byte {}", self.pos)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn redacts_credentials_and_queries() {
        assert_eq!(
            redact_url("http://user:secret@host:8080/a/b.img.zst?X-Amz-Signature=abc#frag"),
            "http://***@host:8080/a/b.img.zst?…"
        );
        assert_eq!(
            redact_url("https://s3.local/bucket/x.img.zst"),
            "https://s3.local/bucket/x.img.zst"
        );
        assert_eq!(redact_url("http://h/p\n"), "http://h/p\\n");
        assert!(!redact_url("http://a:b@c@d/x").contains('b'));
    }

    #[test]
    fn tells_urls_from_paths() {
        assert!(is_url("http://x/y"));
        assert!(is_url("HTTPS://x/y"));
        assert!(!is_url("/tmp/http://x"));
        assert!(!is_url("image.img.zst"));
    }

    #[test]
    fn parses_content_range() {
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, 99, 100)));
        assert_eq!(parse_content_range("bytes 10-99/*"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    /// A minimal HTTP/1.1 server on 127.0.0.1 for `file`, answering each `Range: bytes=N-`
    /// with at most `cap` bytes (as some CDNs and object stores do), one request per
    /// connection. With `validator` false it sends no ETag; with `cut_first`, the first answer
    /// promises its whole range but the connection closes after `cap / 2` bytes. Returns its
    /// port and a request counter.
    pub(crate) fn capped_server(
        file: Vec<u8>,
        cap: usize,
        validator: bool,
        cut_first: bool,
    ) -> (u16, Arc<AtomicU64>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicU64::new(0));
        let requests = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let first = requests.fetch_add(1, Ordering::SeqCst) == 0;
                let mut start = 0usize;
                let mut lines = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    lines.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        start = v.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                let end = (start + cap).min(file.len());
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n{}Connection: close\r\n\r\n",
                    end - start,
                    end - 1,
                    file.len(),
                    if validator { "ETag: \"v1\"\r\n" } else { "" }
                );
                let _ = conn.write_all(head.as_bytes());
                let sent = if first && cut_first {
                    start + (end - start) / 2
                } else {
                    end
                };
                let _ = conn.write_all(&file[start..sent]);
            }
        });
        (port, count)
    }

    #[test]
    fn follows_short_ranges_without_counting_failures() {
        let file: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (port, requests) = capped_server(file.clone(), 100_000, true, false);
        let opts = RemoteOptions {
            retries: 0,
            max_reconnects: 0,
            ..Default::default()
        };
        let remote = Arc::new(Remote::new(&format!("http://127.0.0.1:{port}/f"), opts).unwrap());
        let mut got = Vec::new();
        remote.reader(0, None).read_to_end(&mut got).unwrap();
        assert_eq!(got, file);
        assert_eq!(remote.len(), Some(file.len() as u64));
        assert_eq!(requests.load(Ordering::SeqCst), 11);
        assert_eq!(remote.resumes() + remote.restarts(), 0);
        // A bounded reader stops at its end.
        let mut part = Vec::new();
        remote
            .reader(150_000, Some(250_000))
            .read_to_end(&mut part)
            .unwrap();
        assert_eq!(part, &file[150_000..250_000]);
    }

    #[test]
    fn resumes_only_with_a_validator() {
        let file: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let opts = RemoteOptions {
            backoff: Duration::from_millis(10),
            ..Default::default()
        };
        // With an ETag: the cut first answer is resumed.
        let (port, _) = capped_server(file.clone(), 400_000, true, true);
        let remote =
            Arc::new(Remote::new(&format!("http://127.0.0.1:{port}/f"), opts.clone()).unwrap());
        let mut got = Vec::new();
        remote.reader(0, None).read_to_end(&mut got).unwrap();
        assert_eq!(got, file);
        assert_eq!(remote.resumes(), 1);
        // Without: refused, naming the URL and the offset.
        let (port, _) = capped_server(file, 400_000, false, true);
        let remote = Arc::new(Remote::new(&format!("http://127.0.0.1:{port}/f"), opts).unwrap());
        let err = remote
            .reader(0, None)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        let inner = RemoteError::from_io(&err).unwrap();
        assert!(
            matches!(
                inner,
                RemoteError::CannotResume {
                    offset: 200_000,
                    ..
                }
            ),
            "{inner}"
        );
        assert!(inner.to_string().contains("127.0.0.1"), "{inner}");
    }

    #[test]
    fn refuses_other_schemes() {
        let e = Remote::new("ftp://user:pw@host/x", RemoteOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("only http"), "{msg}");
        assert!(!msg.contains("pw"), "{msg}");
    }
}
