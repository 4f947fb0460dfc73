//! `imprint netboot serve`: the embedded default for one network — render the tree for this
//! host's address on `--interface`, run the real `dnsmasq` for proxy-DHCP as a supervised
//! child, serve the tree over HTTP (Range by tower-http's `ServeDir`; `PUT` only for
//! `reports/<mac>/<name>.json`, written atomically into the reports folder), and show what the
//! machines do from the progress events and reports they `PUT`.
//!
//! The table is indicatif's `MultiProgress` on a terminal (one bar per machine); off a terminal
//! each event is one plain line on standard output, or with `--json` one JSON object per line.
//! Every request but a machine's accepted `PUT` (shown as its event or report) is logged as
//! nginx's access log would: client address, method, path, status and length — on standard
//! error above the table or as plain lines, as a `request` object with `--json`.
//! dnsmasq's log goes to standard error off a terminal, and is shown (its last lines) if it
//! exits on its own, which stops serve. dnsmasq dies with serve: killed on Ctrl-C and SIGTERM,
//! and by the kernel (`PR_SET_PDEATHSIG`) should serve itself be killed.

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::Router;
use imprint_core::event::{Event, EventPhase, PROGRESS_NAME};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;
use tower_http::services::ServeDir;

use super::{RenderArgs, TreeInputs};
use crate::commands::untrusted;
use crate::output::note;
use crate::units;

/// The largest report or event a machine may `PUT` (reports are tens of KiB).
pub const PUT_MAX: usize = 1 << 20;
/// How many of dnsmasq's last log lines are kept to show when it exits.
const DNSMASQ_TAIL: usize = 40;

/// Arguments of `imprint netboot serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub inputs: TreeInputs,
    /// The network interface facing the machines; its IPv4 address and prefix make the URL
    /// (http://ADDRESS:PORT/) and the proxy-DHCP subnet.
    #[arg(long, value_name = "IF")]
    pub interface: String,
    /// The HTTP port.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Where machines' reports and progress events land (reports/<mac>/…); created if missing.
    #[arg(long, value_name = "DIR", default_value = "imprint-reports")]
    pub reports: PathBuf,
    /// Render the tree into this new (or empty) folder and keep it [default: a temporary
    /// folder, removed on exit].
    #[arg(short = 'o', long = "dir", value_name = "TREE")]
    pub dir: Option<PathBuf>,
    /// Each event as one JSON object per line on standard output.
    #[arg(long)]
    pub json: bool,
}

/// What the display is told.
#[derive(Debug)]
enum Update {
    /// A machine's progress event.
    Event(Event),
    /// A machine's report (`reports/<mac>/<id>.json`).
    Report {
        machine: String,
        name: String,
        status: Option<String>,
        hostname: Option<String>,
    },
    /// A request answered (the access log).
    Request(Access),
    /// A line for the operator (standard error).
    Note(String),
    /// A line of dnsmasq's log.
    Dnsmasq(String),
}

/// One answered request, as an access log line tells it.
#[derive(Debug, Serialize)]
struct Access {
    peer: std::net::IpAddr,
    method: String,
    /// The path as the client sent it (untrusted: escaped when shown).
    path: String,
    /// The `Range` header, when the client sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    range: Option<String>,
    status: u16,
    /// The body's length (`Content-Length`), when the answer has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
}

impl Access {
    fn line(&self) -> String {
        let mut l = format!(
            "imprint: {} {} {}",
            self.peer,
            untrusted(&self.method),
            untrusted(&self.path)
        );
        if let Some(r) = &self.range {
            l.push_str(&format!(" ({})", untrusted(r)));
        }
        l.push_str(&format!(" -> {}", self.status));
        if let Some(b) = self.bytes {
            l.push_str(&format!(", {}", units::size(b)));
        }
        l
    }
}

/// Runs `imprint netboot serve` until Ctrl-C, SIGTERM, or dnsmasq's exit.
pub fn serve(args: &ServeArgs) -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "imprint netboot serve runs dnsmasq for proxy-DHCP, which needs root for its ports (DHCP 67, PXE 4011, TFTP 69): run it as root"
    );
    let (addr, prefix) = interface_ipv4(&args.interface)?;
    let boot = crate::bootfiles::locate(args.inputs.boot.clone())?;
    let mut _temp = None;
    let tree = match &args.dir {
        Some(d) => d.clone(),
        None => {
            let t = tempfile::Builder::new()
                .prefix("imprint-serve.")
                .tempdir()
                .context("creating a temporary folder for the tree")?;
            // dnsmasq drops root for `nobody`, who must reach tftp/ inside.
            std::fs::set_permissions(
                t.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .with_context(|| format!("setting the mode of {}", t.path().display()))?;
            let tree = t.path().join("tree");
            _temp = Some(t);
            tree
        }
    };
    let url = format!("http://{addr}:{}/", args.port);
    super::render(
        &RenderArgs {
            inputs: args.inputs.clone(),
            url: url.clone(),
            subnet: Some(format!("{addr}/{prefix}")),
            output: tree.clone(),
            s3: super::s3::S3Args::off(),
        },
        &boot,
    )?;
    std::fs::create_dir_all(&args.reports)
        .with_context(|| format!("creating {}", args.reports.display()))?;
    let reports = std::fs::canonicalize(&args.reports)
        .with_context(|| format!("resolving {}", args.reports.display()))?;
    // GETs of reports/ (a machine's installed.json at its next netboot) read the reports
    // folder: the tree's empty reports/ becomes a link to it.
    let in_tree = tree.join("reports");
    std::fs::remove_dir(&in_tree).with_context(|| format!("removing {}", in_tree.display()))?;
    std::os::unix::fs::symlink(&reports, &in_tree)
        .with_context(|| format!("linking {} to {}", in_tree.display(), reports.display()))?;
    // Bound before dnsmasq starts: a port in use fails here, before any machine is told of it.
    let listener = std::net::TcpListener::bind(SocketAddr::from((addr, args.port)))
        .with_context(|| format!("listening on {addr}:{}", args.port))?;
    listener
        .set_nonblocking(true)
        .context("setting the listening socket non-blocking")?;

    let mode = if args.json {
        Mode::Json
    } else if std::io::stdout().is_terminal() {
        Mode::Table
    } else {
        Mode::Lines
    };
    let (tx, rx) = mpsc::channel();
    let display = std::thread::Builder::new()
        .name("imprint-serve-display".into())
        .spawn(move || display(&rx, mode))
        .context("starting the display thread")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(run(Serve {
        listener,
        tree: &tree,
        reports: &reports,
        interface: &args.interface,
        url: &url,
        tx: tx.clone(),
    }));
    drop(tx);
    drop(rt);
    let _ = display.join();
    result
}

struct Serve<'a> {
    listener: std::net::TcpListener,
    tree: &'a Path,
    reports: &'a Path,
    interface: &'a str,
    url: &'a str,
    tx: mpsc::Sender<Update>,
}

#[derive(Debug)]
struct AppState {
    reports: PathBuf,
    tx: mpsc::Sender<Update>,
}

/// The HTTP service: the tree (GET/HEAD with Range), `PUT` under reports/ only.
/// Serves `app` on `listener` until `stop` resolves, over hyper's HTTP/1 server with header
/// names written in title case (`Content-Length`), as nginx writes them: UEFI HTTP clients are
/// small parsers (hyper's default is lower case).
async fn http_server(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut stop => return Ok(()),
        };
        // The access log names the client: its address rides on each request of the connection.
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(ConnectInfo(peer))),
        );
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .title_case_headers(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn router(tree: &Path, reports: &Path, tx: mpsc::Sender<Update>) -> Router {
    let files = ServeDir::new(tree);
    let state = Arc::new(AppState {
        reports: reports.to_path_buf(),
        tx,
    });
    Router::new()
        .route(
            "/reports/{*path}",
            put(put_report)
                .layer(DefaultBodyLimit::max(PUT_MAX))
                .fallback_service(files.clone()),
        )
        .fallback_service(files)
        .layer(axum::middleware::from_fn(error_bodies))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            access_log,
        ))
        .with_state(state)
}

/// Gives an error answer without a body (`ServeDir`'s 404, axum's 405) a short text body, as
/// nginx's error pages have. UEFI HTTP clients need it: shim asks for `revocations_sku.efi`
/// first, and OVMF's HTTP stack never completes a response whose `Content-Length` is 0, so
/// shim waits forever on an empty 404 (seen with Debian's shim 16.1 under OVMF; nginx's 404
/// has a body and shim goes on to `grubx64.efi`).
async fn error_bodies(req: Request, next: Next) -> Response {
    let head = req.method() == Method::HEAD;
    let response = next.run(req).await;
    let status = response.status();
    if head
        || !(status.is_client_error() || status.is_server_error())
        || axum::body::HttpBody::size_hint(response.body()).exact() != Some(0)
    {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let text = format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("error")
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Response::from_parts(parts, axum::body::Body::from(text))
}

/// Logs every answered request except a machine's accepted `PUT` under reports/ (that one is
/// shown as the event or report it carries).
async fn access_log(
    State(st): State<Arc<AppState>>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let response = next.run(req).await;
    let status = response.status();
    if method == Method::PUT && path.starts_with("/reports/") && status.is_success() {
        return response;
    }
    let bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| axum::body::HttpBody::size_hint(response.body()).exact());
    let peer = peer.map_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0 .0.ip());
    let _ = st.tx.send(Update::Request(Access {
        peer,
        method: method.to_string(),
        path,
        range,
        status: status.as_u16(),
        bytes,
    }));
    response
}

async fn run(s: Serve<'_>) -> Result<()> {
    let conf = s.tree.join("dnsmasq.conf");
    let mut cmd = tokio::process::Command::new("dnsmasq");
    cmd.arg(format!("--conf-file={}", conf.display()))
        .arg("--keep-in-foreground")
        .arg("--log-facility=-")
        .arg("--pid-file=")
        .arg(format!("--interface={}", s.interface))
        .arg("--bind-interfaces")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .context("starting dnsmasq (apt install dnsmasq-base)")?;
    let pid = child.id().context("dnsmasq exited at once")?;
    let tail = Arc::new(std::sync::Mutex::new(VecDeque::new()));
    if let Some(err) = child.stderr.take() {
        let tx = s.tx.clone();
        let tail = Arc::clone(&tail);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut t) = tail.lock() {
                    if t.len() == DNSMASQ_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                let _ = tx.send(Update::Dnsmasq(line));
            }
        });
    }
    let _ = s.tx.send(Update::Note(format!(
        "imprint: serving {} at {} (PUT under reports/ into {}); dnsmasq (pid {pid}) answers proxy-DHCP on {}; Ctrl-C stops",
        s.tree.display(),
        s.url,
        s.reports.display(),
        s.interface
    )));

    let listener = tokio::net::TcpListener::from_std(s.listener)
        .context("handing the listening socket to the runtime")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = http_server(listener, router(s.tree, s.reports, s.tx.clone()), async {
        let _ = stop_rx.await;
    });
    let mut server = std::pin::pin!(server);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let outcome: Result<()> = tokio::select! {
        status = child.wait() => {
            let status = status.context("waiting for dnsmasq")?;
            // Let the reader pass on dnsmasq's last words.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let last = tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default();
            Err(anyhow::anyhow!(
                "dnsmasq (pid {pid}) exited ({status}); stopping. Its last lines:\n{last}"
            ))
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        r = &mut server => Err(match r {
            Ok(()) => anyhow::anyhow!("the HTTP server stopped"),
            Err(e) => anyhow::Error::from(e).context("serving HTTP"),
        }),
    };
    // dnsmasq first (the network stops sending machines here), then the HTTP server.
    if child.try_wait().ok().flatten().is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(3), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    if outcome.is_ok() {
        let _ = s.tx.send(Update::Note(format!(
            "imprint: stopped; dnsmasq (pid {pid}) ended; reports are in {}",
            s.reports.display()
        )));
    }
    outcome
}

/// `<mac>/<name>.json` with `mac` as the appliance writes it (`52-54-00-12-34-56`) and a
/// plain file name; anything else (`..`, absolute paths, deeper paths) is `None`.
pub fn report_path(path: &str) -> Option<(&str, &str)> {
    let (mac, name) = path.split_once('/')?;
    let mac_ok = mac.len() == 17
        && mac.bytes().enumerate().all(|(i, b)| {
            if i % 3 == 2 {
                b == b'-'
            } else {
                b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
            }
        });
    let stem = name.strip_suffix(".json")?;
    let name_ok = !stem.is_empty()
        && name.len() <= 128
        && !stem.starts_with('.')
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    (mac_ok && name_ok).then_some((mac, name))
}

async fn put_report(
    State(st): State<Arc<AppState>>,
    UrlPath(path): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Some((mac, name)) = report_path(&path) else {
        let _ = st.tx.send(Update::Note(format!(
            "imprint: refused PUT /reports/{} (only reports/<mac>/<name>.json)",
            untrusted(&path)
        )));
        return (
            StatusCode::FORBIDDEN,
            "only reports/<mac>/<name>.json may be PUT\n",
        )
            .into_response();
    };
    let (mac, name) = (mac.to_string(), name.to_string());
    let dir = st.reports.join(&mac);
    let data = body.clone();
    let file = name.clone();
    let written = tokio::task::spawn_blocking(move || write_atomic(&dir, &file, &data)).await;
    let created = match written {
        Ok(Ok(created)) => created,
        Ok(Err(e)) => {
            let _ = st
                .tx
                .send(Update::Note(format!("imprint: PUT /reports/{path}: {e:#}")));
            return (StatusCode::INTERNAL_SERVER_ERROR, "could not store it\n").into_response();
        }
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let update = if name == PROGRESS_NAME {
        match serde_json::from_slice::<Event>(&body) {
            Ok(mut e) => {
                // The path names the machine; the body cannot claim another.
                e.machine = mac;
                Update::Event(e)
            }
            Err(e) => Update::Note(format!(
                "imprint: {mac}/{PROGRESS_NAME}: not a progress event: {e}"
            )),
        }
    } else {
        let v: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        let text = |p: &str| {
            v.as_ref()
                .and_then(|v| v.pointer(p))
                .and_then(|s| s.as_str())
                .map(str::to_string)
        };
        Update::Report {
            machine: mac,
            name,
            status: text("/status"),
            hostname: text("/seed/summary/hostname"),
        }
    };
    let _ = st.tx.send(update);
    if created {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

/// Writes `dir/name` through a temporary file and a rename, so readers (a machine fetching
/// its installed.json) never see half a report. Returns whether the file is new.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let existed = path.exists();
    let mut tmp = tempfile::Builder::new()
        .prefix(".put.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(data)
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("setting the mode of {}", tmp.path().display()))?;
    tmp.persist(&path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(!existed)
}

/// The first IPv4 address of `name` and its prefix length.
fn interface_ipv4(name: &str) -> Result<(Ipv4Addr, u32)> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing the network interfaces")?;
    let mut seen = false;
    for a in addrs {
        if a.interface_name != name {
            continue;
        }
        seen = true;
        let (Some(addr), Some(mask)) = (
            a.address.as_ref().and_then(|s| s.as_sockaddr_in()),
            a.netmask.as_ref().and_then(|s| s.as_sockaddr_in()),
        ) else {
            continue;
        };
        return Ok((addr.ip(), u32::from(mask.ip()).count_ones()));
    }
    if seen {
        bail!("--interface {name}: it has no IPv4 address (give it one; machines reach the server there)")
    }
    bail!("--interface {name}: no such network interface (see `ip -brief addr`)")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Table,
    Lines,
    Json,
}

/// A machine's row.
#[derive(Debug, Default)]
struct Row {
    hostname: Option<String>,
    phase: String,
    done: u64,
    total: u64,
    rate: f64,
    result: String,
    bar: Option<ProgressBar>,
}

impl Row {
    fn prefix(&self, mac: &str) -> String {
        format!(
            "{mac:17}  {:16.16}  {:10}",
            untrusted(self.hostname.as_deref().unwrap_or("-")),
            self.phase
        )
    }

    fn message(&self) -> String {
        if !self.result.is_empty() {
            return self.result.clone();
        }
        if self.total == 0 {
            return String::new();
        }
        format!(
            "{}/{} {}/s",
            units::size(self.done),
            units::size(self.total),
            units::size(self.rate as u64)
        )
    }
}

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
enum JsonLine<'a> {
    MachineProgress(&'a Event),
    Request(&'a Access),
    MachineReport {
        machine: &'a str,
        name: &'a str,
        status: Option<&'a str>,
        hostname: Option<&'a str>,
    },
}

/// Draws the updates until every sender is gone.
fn display(rx: &mpsc::Receiver<Update>, mode: Mode) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template("{prefix} [{bar:24}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut out = std::io::stdout();
    for u in rx {
        match u {
            Update::Note(n) => match mode {
                Mode::Table => {
                    let _ = multi.println(n);
                }
                _ => note!("{n}"),
            },
            Update::Request(a) => match mode {
                Mode::Table => {
                    let _ = multi.println(a.line());
                }
                Mode::Lines => note!("{}", a.line()),
                Mode::Json => {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::to_string(&JsonLine::Request(&a)).unwrap_or_default()
                    );
                }
            },
            Update::Dnsmasq(l) => {
                if mode != Mode::Table {
                    note!("dnsmasq: {}", untrusted(&l));
                }
            }
            Update::Event(e) => {
                let row = rows.entry(e.machine.clone()).or_default();
                if e.hostname.is_some() {
                    row.hostname.clone_from(&e.hostname);
                }
                row.phase = e.phase.name().to_string();
                row.done = e.bytes_done;
                row.total = e.bytes_total;
                row.rate = e.rate;
                row.result = match (e.phase, e.result, &e.error) {
                    (EventPhase::Failed, _, Some(err)) => format!("FAILED: {}", untrusted(err)),
                    (_, Some(r), _) => serde_json::to_value(r)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                match mode {
                    Mode::Json => {
                        let _ = writeln!(
                            out,
                            "{}",
                            serde_json::to_string(&JsonLine::MachineProgress(&e))
                                .unwrap_or_default()
                        );
                    }
                    Mode::Lines => {
                        let _ = writeln!(
                            out,
                            "{}  {}",
                            row.prefix(&e.machine).trim_end(),
                            row.message()
                        );
                    }
                    Mode::Table => draw(&multi, &style, &e.machine, row),
                }
            }
            Update::Report {
                machine,
                name,
                status,
                hostname,
            } => {
                let row = rows.entry(machine.clone()).or_default();
                if hostname.is_some() {
                    row.hostname.clone_from(&hostname);
                }
                match mode {
                    Mode::Json => {
                        let _ = writeln!(
                            out,
                            "{}",
                            serde_json::to_string(&JsonLine::MachineReport {
                                machine: &machine,
                                name: &name,
                                status: status.as_deref(),
                                hostname: hostname.as_deref(),
                            })
                            .unwrap_or_default()
                        );
                    }
                    Mode::Lines => {
                        let _ = writeln!(
                            out,
                            "{}  report {}: {}",
                            row.prefix(&machine).trim_end(),
                            untrusted(&name),
                            untrusted(status.as_deref().unwrap_or("?"))
                        );
                    }
                    Mode::Table => {
                        if let Some(s) = &status {
                            row.result = format!("{} (report {})", untrusted(s), untrusted(&name));
                        }
                        draw(&multi, &style, &machine, row);
                    }
                }
            }
        }
        let _ = out.flush();
    }
    for row in rows.values() {
        if let Some(b) = &row.bar {
            b.abandon();
        }
    }
}

fn draw(multi: &MultiProgress, style: &ProgressStyle, mac: &str, row: &mut Row) {
    let (prefix, message) = (row.prefix(mac), row.message());
    let position = if row.total == 0 {
        u64::from(!row.result.is_empty())
    } else {
        row.done
    };
    let length = row.total.max(1);
    let bar = row.bar.get_or_insert_with(|| {
        let b = multi.add(ProgressBar::new(0));
        b.set_style(style.clone());
        b
    });
    bar.set_length(length);
    bar.set_position(position);
    bar.set_prefix(prefix);
    bar.set_message(message);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_mac_and_json_names_may_be_put() {
        assert_eq!(
            report_path("52-54-00-12-34-56/progress.json"),
            Some(("52-54-00-12-34-56", "progress.json"))
        );
        assert_eq!(
            report_path("52-54-00-12-34-56/20261201-101500-abcd.json"),
            Some(("52-54-00-12-34-56", "20261201-101500-abcd.json"))
        );
        for bad in [
            "../image.img.zst",
            "52-54-00-12-34-56/../../x.json",
            "52-54-00-12-34-56/.json",
            "52-54-00-12-34-56/.hidden.json",
            "52-54-00-12-34-56/a/b.json",
            "52-54-00-12-34-56/report.txt",
            "52:54:00:12:34:56/progress.json",
            "52-54-00-12-34-5G/progress.json",
            "52-54-00-12-34-56-/progress.json",
            "/etc/passwd",
            "52-54-00-12-34-56/",
            "52-54-00-12-34-56",
            "",
        ] {
            assert_eq!(report_path(bad), None, "{bad}");
        }
        let long = format!("52-54-00-12-34-56/{}.json", "a".repeat(200));
        assert_eq!(report_path(&long), None);
    }

    #[test]
    fn puts_replace_whole_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("52-54-00-12-34-56");
        assert!(write_atomic(&d, "progress.json", b"{\"a\":1}\n").unwrap());
        assert!(!write_atomic(&d, "progress.json", b"{\"a\":2}\n").unwrap());
        assert_eq!(
            std::fs::read(d.join("progress.json")).unwrap(),
            b"{\"a\":2}\n"
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }
}
