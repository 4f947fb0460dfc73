//! A small blocking DHCPv4 client (RFC 2131: DISCOVER, OFFER, REQUEST, ACK) for network mode.
//! Messages are encoded and decoded by `dhcproto`; the exchange is ours.
//!
//! It runs before the interface has an address: a UDP socket on 0.0.0.0:68 bound to the
//! interface (`SO_BINDTODEVICE`) sends to 255.255.255.255 and asks servers to answer by
//! broadcast (the BROADCAST flag), which Linux delivers to that socket without an address.
//! Offers without an address (a proxy-DHCP server answering a boot client) are ignored, as are
//! answers to another client (transaction id, hardware address).
//!
//! An install can outlast a short lease (dnsmasq's default is an hour; a 20 GiB image over a
//! slow link or a slow disk takes longer), so [`keep`] holds the lease for the rest of the boot
//! (RFC 2131 4.4.5): at T1 it renews with the server that granted it (unicast), from T2 it
//! rebinds with any server (broadcast), and when the lease ran out or a server refused it (NAK)
//! it starts over with DISCOVER and puts the new address on the interface. A download that was
//! cut by the change resumes through the core's resumable reader.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;

/// What the server leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub address: Ipv4Addr,
    /// Prefix length from the subnet mask (24 if the server sent none).
    pub prefix: u8,
    /// The first router, if any.
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds (`u32::MAX` = infinite).
    pub lease_secs: u32,
    /// When to renew (T1), seconds after the grant: option 58, else half the lease.
    pub renew_secs: u32,
    /// When to rebind (T2), seconds after the grant: option 59, else 7/8 of the lease.
    pub rebind_secs: u32,
    /// The server that granted it.
    pub server: Ipv4Addr,
    /// DNS servers offered.
    pub dns: Vec<Ipv4Addr>,
}

/// DHCP failures; each names the interface.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("{iface}: opening the DHCP socket")]
    Socket {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: sending a DHCP {what}")]
    Send {
        iface: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: encoding a DHCP message: {reason}")]
    Encode { iface: String, reason: String },
    #[error("{iface}: no DHCP server answered within {secs} s (is the cable in, and a DHCP server on this network?)")]
    NoAnswer { iface: String, secs: u64 },
    #[error("{iface}: the DHCP server {server} refused the request (NAK) {tries} times")]
    Refused {
        iface: String,
        server: Ipv4Addr,
        tries: u32,
    },
}

/// Gets a lease on `iface` (hardware address `mac`), giving up after `timeout`.
pub fn lease(iface: &str, mac: [u8; 6], timeout: Duration) -> Result<Lease, DhcpError> {
    let sock = open_socket(iface).map_err(|source| DhcpError::Socket {
        iface: iface.into(),
        source,
    })?;
    let start = Instant::now();
    let mut naks = 0;
    loop {
        let xid = transaction_id(&mac);
        let discover = message(xid, &mac, MessageType::Discover, None);
        let offer = exchange(&sock, iface, "DISCOVER", &discover, start, timeout, |m| {
            m.xid() == xid
                && m.opts().has_msg_type(MessageType::Offer)
                && !m.yiaddr().is_unspecified()
                && m.chaddr().get(..6) == Some(&mac[..])
        })?;
        let server = match offer.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => *s,
            _ => offer.siaddr(),
        };
        let request = message(
            xid,
            &mac,
            MessageType::Request,
            Some((offer.yiaddr(), server)),
        );
        let answer = exchange(&sock, iface, "REQUEST", &request, start, timeout, |m| {
            m.xid() == xid
                && (m.opts().has_msg_type(MessageType::Ack)
                    || m.opts().has_msg_type(MessageType::Nak))
                && m.chaddr().get(..6) == Some(&mac[..])
        })?;
        if answer.opts().has_msg_type(MessageType::Nak) {
            naks += 1;
            if naks >= 3 {
                return Err(DhcpError::Refused {
                    iface: iface.into(),
                    server,
                    tries: naks,
                });
            }
            continue;
        }
        return Ok(lease_of(&answer, server));
    }
}

fn lease_of(ack: &Message, server: Ipv4Addr) -> Lease {
    let o = ack.opts();
    let prefix = match o.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => u32::from(*m).leading_ones() as u8,
        _ => 24,
    };
    let router = match o.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let lease_secs = match o.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => *t,
        _ => u32::MAX,
    };
    let dns = match o.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    // RFC 2131 4.4.5's defaults, and T1 <= T2 <= the lease whatever a server sent.
    let rebind_secs = match o.get(OptionCode::Rebinding) {
        Some(DhcpOption::Rebinding(t)) => *t,
        _ => (u64::from(lease_secs) * 7 / 8) as u32,
    }
    .min(lease_secs);
    let renew_secs = match o.get(OptionCode::Renewal) {
        Some(DhcpOption::Renewal(t)) => *t,
        _ => lease_secs / 2,
    }
    .min(rebind_secs);
    Lease {
        address: ack.yiaddr(),
        prefix,
        router,
        lease_secs,
        renew_secs,
        rebind_secs,
        server,
        dns,
    }
}

/// Renews `lease` (RFC 2131 4.3.2, RENEWING or REBINDING): a REQUEST carrying the address in
/// `ciaddr`, unicast to the server that granted it, or with `rebind` broadcast to any server.
/// `Ok(None)` is a NAK (the lease is gone); the caller starts over with [`lease`].
pub fn renew(
    iface: &str,
    mac: [u8; 6],
    lease: &Lease,
    rebind: bool,
    timeout: Duration,
) -> Result<Option<Lease>, DhcpError> {
    let sock = open_socket(iface).map_err(|source| DhcpError::Socket {
        iface: iface.into(),
        source,
    })?;
    let xid = transaction_id(&mac);
    let mut request = message(xid, &mac, MessageType::Request, None);
    request.set_ciaddr(lease.address);
    // The client has an address now: answers come to it, not by broadcast.
    request.set_flags(Flags::default());
    let dest = if rebind {
        Ipv4Addr::BROADCAST
    } else {
        lease.server
    };
    let what = if rebind {
        "REQUEST (rebind)"
    } else {
        "REQUEST (renew)"
    };
    let answer = exchange_with(
        &sock,
        iface,
        what,
        &request,
        dest,
        Instant::now(),
        timeout,
        |m| {
            m.xid() == xid
                && (m.opts().has_msg_type(MessageType::Ack)
                    || m.opts().has_msg_type(MessageType::Nak))
                && m.chaddr().get(..6) == Some(&mac[..])
        },
    )?;
    if answer.opts().has_msg_type(MessageType::Nak) {
        return Ok(None);
    }
    let server = match answer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => lease.server,
    };
    let mut renewed = lease_of(&answer, server);
    if renewed.address.is_unspecified() {
        renewed.address = lease.address;
    }
    Ok(Some(renewed))
}

/// What [`keep`] did, for the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// The lease was extended (renewed or rebound).
    Renewed(Lease),
    /// The lease was lost and a new one put on the interface.
    Replaced(Lease),
    /// Renewing failed this time; it tries again.
    Trouble(String),
}

/// Holds `lease` on `iface` for the rest of the boot on a thread of its own: renews at T1,
/// rebinds from T2, starts over (DISCOVER, and the new address set with `configure`) when the
/// lease ran out, was refused, or a server moved the address. `report` hears about each step.
/// An infinite lease needs nothing and no thread is started.
pub fn keep(
    iface: String,
    mac: [u8; 6],
    lease: Lease,
    configure: impl Fn(&str, &Lease) -> io::Result<()> + Send + 'static,
    report: impl Fn(Kept) + Send + 'static,
) -> io::Result<Option<std::thread::JoinHandle<()>>> {
    if lease.lease_secs == u32::MAX {
        return Ok(None);
    }
    std::thread::Builder::new()
        .name("dhcp-keep".into())
        .spawn(move || hold(&iface, mac, lease, &configure, &report))
        .map(Some)
}

/// [`keep`]'s loop; never returns.
fn hold(
    iface: &str,
    mac: [u8; 6],
    mut lease: Lease,
    configure: &dyn Fn(&str, &Lease) -> io::Result<()>,
    report: &dyn Fn(Kept),
) {
    let mut granted = Instant::now();
    loop {
        let at = |secs: u32| granted + Duration::from_secs(u64::from(secs));
        let (t1, t2, end) = (
            at(lease.renew_secs),
            at(lease.rebind_secs),
            at(lease.lease_secs),
        );
        std::thread::sleep(t1.saturating_duration_since(Instant::now()));
        // RENEWING until T2, REBINDING until the end; each try waits half of what is left.
        let mut renewed = false;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let rebind = now >= t2;
            let until = if rebind { end } else { t2 };
            let wait = (until.saturating_duration_since(now) / 2).max(Duration::from_secs(2));
            match renew(iface, mac, &lease, rebind, wait) {
                Ok(Some(l)) if l.address == lease.address => {
                    lease = l;
                    granted = now;
                    renewed = true;
                    report(Kept::Renewed(lease.clone()));
                    break;
                }
                // A NAK, or a server moving the address: the lease is gone.
                Ok(_) => break,
                Err(e) => {
                    report(Kept::Trouble(crate::console::error_chain(&e)));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        if renewed {
            continue;
        }
        // INIT again, until a new lease is on the interface.
        loop {
            let fresh = self::lease(iface, mac, Duration::from_secs(60))
                .map_err(|e| crate::console::error_chain(&e))
                .and_then(|l| {
                    configure(iface, &l)
                        .map(|()| l)
                        .map_err(|e| format!("{iface}: setting the new address: {e}"))
                });
            match fresh {
                Ok(l) => {
                    lease = l;
                    granted = Instant::now();
                    report(Kept::Replaced(lease.clone()));
                    break;
                }
                Err(e) => {
                    report(Kept::Trouble(e));
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A DISCOVER, or a REQUEST for `(address, server)`.
fn message(
    xid: u32,
    mac: &[u8; 6],
    kind: MessageType,
    request: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Message {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, u, u, u, u, mac);
    m.set_opcode(Opcode::BootRequest);
    m.set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    let mut id = vec![1u8];
    id.extend_from_slice(mac);
    o.insert(DhcpOption::ClientIdentifier(id));
    o.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
    ]));
    if let Some((addr, server)) = request {
        o.insert(DhcpOption::RequestedIpAddress(addr));
        o.insert(DhcpOption::ServerIdentifier(server));
    }
    m
}

/// Broadcasts `msg` and waits for an answer `wanted` accepts (see [`exchange_with`]).
fn exchange(
    sock: &UdpSocket,
    iface: &str,
    what: &'static str,
    msg: &Message,
    start: Instant,
    timeout: Duration,
    wanted: impl Fn(&Message) -> bool,
) -> Result<Message, DhcpError> {
    exchange_with(
        sock,
        iface,
        what,
        msg,
        Ipv4Addr::BROADCAST,
        start,
        timeout,
        wanted,
    )
}

/// Sends `msg` to `to` and waits for an answer `wanted` accepts, resending after 1, 2, 4, 8 s…
/// (RFC 2131's backoff, shortened: a provisioning network is local).
#[allow(clippy::too_many_arguments)]
fn exchange_with(
    sock: &UdpSocket,
    iface: &str,
    what: &'static str,
    msg: &Message,
    to: Ipv4Addr,
    start: Instant,
    timeout: Duration,
    wanted: impl Fn(&Message) -> bool,
) -> Result<Message, DhcpError> {
    let mut bytes = Vec::new();
    msg.encode(&mut Encoder::new(&mut bytes))
        .map_err(|e| DhcpError::Encode {
            iface: iface.into(),
            reason: e.to_string(),
        })?;
    let dest = SocketAddrV4::new(to, SERVER_PORT);
    let mut wait = Duration::from_secs(1);
    let mut buf = [0u8; 1500];
    loop {
        if start.elapsed() >= timeout {
            return Err(DhcpError::NoAnswer {
                iface: iface.into(),
                secs: timeout.as_secs(),
            });
        }
        sock.send_to(&bytes, dest)
            .map_err(|source| DhcpError::Send {
                iface: iface.into(),
                what,
                source,
            })?;
        let resend_at = Instant::now() + wait;
        wait = (wait * 2).min(Duration::from_secs(8));
        loop {
            let now = Instant::now();
            let left = resend_at
                .min(start + timeout)
                .saturating_duration_since(now);
            if left.is_zero() {
                break;
            }
            // A zero timeout would mean "block forever": `left` is never zero here.
            let _ = sock.set_read_timeout(Some(left));
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                        continue;
                    };
                    if m.opcode() == Opcode::BootReply && wanted(&m) {
                        return Ok(m);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(source) => {
                    return Err(DhcpError::Send {
                        iface: iface.into(),
                        what,
                        source,
                    })
                }
            }
        }
    }
}

fn open_socket(iface: &str) -> io::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, CLIENT_PORT))?;
    sock.set_broadcast(true)?;
    setsockopt(
        &sock,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(iface),
    )
    .map_err(io::Error::from)?;
    Ok(sock)
}

/// A transaction id that differs between machines and runs: the MAC mixed with the clock and
/// the kernel's random bytes when they can be read.
fn transaction_id(mac: &[u8; 6]) -> u32 {
    let mut r = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut r);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u32::from_be_bytes(r) ^ t ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::process::{Child, Command, Stdio};

    #[test]
    fn messages_carry_what_servers_need() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let m = message(
            7,
            &mac,
            MessageType::Request,
            Some(([10, 0, 0, 5].into(), [10, 0, 0, 1].into())),
        );
        let mut bytes = Vec::new();
        m.encode(&mut Encoder::new(&mut bytes)).unwrap();
        let d = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(d.xid(), 7);
        assert!(d.flags().broadcast());
        assert_eq!(&d.chaddr()[..6], &mac);
        assert!(d.opts().has_msg_type(MessageType::Request));
        assert_eq!(
            d.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress([10, 0, 0, 5].into()))
        );
        assert_eq!(
            d.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier([10, 0, 0, 1].into()))
        );
    }

    /// Runs `ip ARGS`, panicking with its output on failure.
    fn ip(args: &[&str]) {
        let o = Command::new("ip")
            .args(args)
            .output()
            .expect("ip (iproute2)");
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Two network namespaces joined by a veth pair (`vsrv` at 10.77.0.1/24, `vcli`), removed on
    /// drop (with the server).
    struct Lab {
        server_ns: String,
        client_ns: String,
        dnsmasq: Option<Child>,
        /// dnsmasq's own log (`--log-dhcp`), shown when a test fails.
        log: Option<std::path::PathBuf>,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            self.stop_dnsmasq();
            for ns in [&self.server_ns, &self.client_ns] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    impl Lab {
        fn new(tag: &str) -> Lab {
            let id = std::process::id();
            let lab = Lab {
                server_ns: format!("imp-{tag}s-{id}"),
                client_ns: format!("imp-{tag}c-{id}"),
                dnsmasq: None,
                log: None,
            };
            let (s, c) = (&lab.server_ns, &lab.client_ns);
            ip(&["netns", "add", s]);
            ip(&["netns", "add", c]);
            ip(&[
                "link", "add", "vsrv", "netns", s, "type", "veth", "peer", "name", "vcli", "netns",
                c,
            ]);
            ip(&["-n", s, "addr", "add", "10.77.0.1/24", "dev", "vsrv"]);
            ip(&["-n", s, "link", "set", "vsrv", "up"]);
            ip(&["-n", s, "link", "set", "lo", "up"]);
            ip(&["-n", c, "link", "set", "lo", "up"]);
            lab
        }

        /// Starts a real dnsmasq on `vsrv` with `args` added, its leases in `leases` and its log
        /// beside them, and waits until it says it serves DHCP (a loaded machine can take
        /// longer than any fixed sleep).
        fn start_dnsmasq(&mut self, leases: &std::path::Path, args: &[&str]) {
            self.stop_dnsmasq();
            let log = leases.with_extension("log");
            let out = std::fs::File::create(&log).unwrap();
            self.dnsmasq = Some(
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.server_ns,
                        "dnsmasq",
                        "--keep-in-foreground",
                    ])
                    .args(["--port=0", "--interface=vsrv", "--bind-interfaces"])
                    // No pid file: two labs at once would race for /var/run/dnsmasq.pid and
                    // the loser exits at once (seen in CI as a 20 s DHCP timeout).
                    .args(["--pid-file=", "--log-facility=-", "--log-dhcp"])
                    .args(args)
                    .arg(format!("--dhcp-leasefile={}", leases.display()))
                    .arg("--conf-file=/dev/null")
                    .stdout(Stdio::null())
                    .stderr(out)
                    .spawn()
                    .expect("dnsmasq (scripts/deps: dnsmasq-base)"),
            );
            self.log = Some(log);
            let until = Instant::now() + Duration::from_secs(20);
            while !self.dnsmasq_log().contains("DHCP, IP range") {
                if let Some(Ok(Some(status))) = self.dnsmasq.as_mut().map(Child::try_wait) {
                    panic!("dnsmasq exited ({status}):\n{}", self.dnsmasq_log());
                }
                assert!(
                    Instant::now() < until,
                    "dnsmasq did not start within 20 s:\n{}",
                    self.dnsmasq_log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        fn dnsmasq_log(&self) -> String {
            self.log
                .as_ref()
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default()
        }

        fn stop_dnsmasq(&mut self) {
            if let Some(mut c) = self.dnsmasq.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        /// Runs `f` on a thread moved into the client namespace; if it fails, the failure
        /// comes with dnsmasq's log.
        fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let ns_path = format!("/run/netns/{}", self.client_ns);
            std::thread::spawn(move || {
                let ns = std::fs::File::open(&ns_path).unwrap();
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap_or_else(|_| panic!("the client failed; dnsmasq's log:\n{}", self.dnsmasq_log()))
        }

        /// The client's IPv4 addresses on `vcli`, as `ip` shows them (`10.77.0.51/24`).
        fn client_addresses(&self) -> Vec<String> {
            let o = Command::new("ip")
                .args(["-n", &self.client_ns, "-4", "-o", "addr", "show", "vcli"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
                .map(str::to_owned)
                .collect()
        }
    }

    /// A real dnsmasq in one namespace and this client in another, over a veth pair: the
    /// lease's address, router and lease time are what dnsmasq was told to give, and the
    /// interface configured with it reaches the server.
    #[test]
    fn lease_from_a_real_dnsmasq_over_a_veth_pair() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
        let mut lab = Lab::new("dh");
        let c = lab.client_ns.clone();
        let t = tempfile::tempdir().unwrap();
        let leases = t.path().join("leases");
        lab.start_dnsmasq(
            &leases,
            &[
                "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,2h",
                "--dhcp-option=option:router,10.77.0.254",
                "--dhcp-option=option:dns-server,10.77.0.53",
            ],
        );

        let got = lab.in_client(move || {
            let mac = super::super::iface::mac_of(std::path::Path::new("/sys/class/net/vcli"));
            // /sys shows the namespace that mounted it, so ask the interface itself.
            let mac = mac
                .or_else(|_| super::super::iface::hw_addr("vcli"))
                .unwrap();
            super::super::iface::up("vcli").unwrap();
            let lease = lease("vcli", mac, Duration::from_secs(20)).unwrap();
            super::super::iface::configure("vcli", &lease).unwrap();
            // The address is this host's now (it can be bound).
            UdpSocket::bind((lease.address, 0)).unwrap();
            let reach = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([10, 77, 0, 1], 9)),
                Duration::from_secs(3),
            )
            .unwrap_err()
            .kind();
            (lease, mac, reach)
        });
        let (lease, mac, reach) = got;
        assert!(
            (50..=60).contains(&lease.address.octets()[3])
                && lease.address.octets()[..3] == [10, 77, 0],
            "{lease:?}"
        );
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.router, Some([10, 77, 0, 254].into()));
        assert_eq!(lease.lease_secs, 7200);
        assert_eq!(lease.server, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(lease.dns, vec![Ipv4Addr::new(10, 77, 0, 53)]);
        // dnsmasq recorded the lease for this MAC; the kernel has the address and the route.
        let mac_text = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let l = std::fs::read_to_string(&leases).unwrap();
        assert!(l.contains(&format!("{mac_text} {}", lease.address)), "{l}");
        let addr = Command::new("ip")
            .args(["-n", &c, "-4", "addr", "show", "vcli"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&addr.stdout).contains(&format!("inet {}/24", lease.address))
        );
        let route = Command::new("ip")
            .args(["-n", &c, "-4", "route"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&route.stdout).contains("default via 10.77.0.254 dev vcli"),
            "{}",
            String::from_utf8_lossy(&route.stdout)
        );
        // The server answered over the configured link: a TCP connect to a closed port
        // is refused (an RST from 10.77.0.1), not timed out or unreachable.
        assert_eq!(reach, io::ErrorKind::ConnectionRefused);
        drop(lab);
    }

    /// The first field (expiry, seconds since the epoch) of the lease file's line for `addr`.
    fn lease_expiry(leases: &std::path::Path, addr: Ipv4Addr) -> u64 {
        let text = std::fs::read_to_string(leases).unwrap();
        text.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(&addr.to_string()))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no lease for {addr} in {text}"))
    }

    /// Waits for the keeper's next step other than a passing trouble, up to `secs`.
    fn next_step(rx: &std::sync::mpsc::Receiver<Kept>, secs: u64) -> Kept {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Kept::Trouble(_)) => continue,
                Ok(k) => return k,
                Err(e) => panic!("the lease keeper did nothing within {secs} s: {e}"),
            }
        }
    }

    /// An install can outlast its lease: the kept lease is renewed with its server at T1 (the
    /// server's lease file moves the expiry on), and when a server refuses it (a new dnsmasq
    /// whose range no longer holds the address NAKs) the client starts over and the interface
    /// ends with the new address only.
    #[test]
    fn a_kept_lease_is_renewed_at_t1_and_replaced_when_refused() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
        let mut lab = Lab::new("dk");
        let t = tempfile::tempdir().unwrap();
        let leases = t.path().join("leases");
        let short = [
            "--dhcp-option=option:T1,2",
            "--dhcp-option=option:T2,4",
            "--dhcp-authoritative",
        ];
        let mut args = vec!["--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,2m"];
        args.extend(short);
        lab.start_dnsmasq(&leases, &args);
        let (tx, rx) = std::sync::mpsc::channel();
        let first = lab.in_client(move || {
            let mac = super::super::iface::hw_addr("vcli").unwrap();
            super::super::iface::up("vcli").unwrap();
            let l = lease("vcli", mac, Duration::from_secs(20)).unwrap();
            super::super::iface::configure("vcli", &l).unwrap();
            // The keeper's thread is made here, so it lives in the client namespace too.
            keep(
                "vcli".into(),
                mac,
                l.clone(),
                super::super::iface::configure,
                move |k| {
                    let _ = tx.send(k);
                },
            )
            .unwrap()
            .expect("a finite lease is kept");
            l
        });
        // dnsmasq adds a little random fuzz to T1.
        assert!(
            (2..=4).contains(&first.renew_secs)
                && (first.rebind_secs, first.lease_secs) == (4, 120),
            "{first:?}"
        );
        let granted = lease_expiry(&leases, first.address);
        std::thread::sleep(Duration::from_millis(1100));
        match next_step(&rx, 15) {
            Kept::Renewed(l) => assert_eq!(l.address, first.address),
            other => panic!("expected a renewal, got {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            lease_expiry(&leases, first.address) > granted,
            "the server did not extend the lease"
        );

        // The network changes under the install: the next renewal is refused.
        let leases2 = t.path().join("leases2");
        let mut args = vec!["--dhcp-range=10.77.0.100,10.77.0.110,255.255.255.0,2m"];
        args.extend(short);
        lab.start_dnsmasq(&leases2, &args);
        let now = match next_step(&rx, 40) {
            Kept::Replaced(l) => l,
            other => panic!("expected a new lease, got {other:?}"),
        };
        assert!((100..=110).contains(&now.address.octets()[3]), "{now:?}");
        assert_eq!(lab.client_addresses(), [format!("{}/24", now.address)]);
        lease_expiry(&leases2, now.address);
    }

    #[test]
    fn no_server_is_a_clear_timeout() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
        let ns = format!("imp-dhn-{}", std::process::id());
        let lab = Lab {
            server_ns: ns.clone(),
            client_ns: format!("{ns}x"),
            dnsmasq: None,
            log: None,
        };
        ip(&["netns", "add", &ns]);
        ip(&["netns", "add", &lab.client_ns]);
        ip(&[
            "link",
            "add",
            "va",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            &lab.client_ns,
        ]);
        ip(&["-n", &ns, "link", "set", "va", "up"]);
        let path = format!("/run/netns/{}", lab.client_ns);
        let e = std::thread::spawn(move || {
            nix::sched::setns(
                std::fs::File::open(&path).unwrap(),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .unwrap();
            super::super::iface::up("vb").unwrap();
            lease("vb", [2, 0, 0, 0, 0, 1], Duration::from_secs(3)).unwrap_err()
        })
        .join()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "vb: no DHCP server answered within 3 s (is the cable in, and a DHCP server on this network?)"
        );
    }
}
