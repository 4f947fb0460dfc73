//! A small blocking DHCPv4 client (RFC 2131: DISCOVER, OFFER, REQUEST, ACK) for network mode.
//! Messages are encoded and decoded by `dhcproto`; the exchange is ours.
//!
//! It runs before the interface has an address: a UDP socket on 0.0.0.0:68 bound to the
//! interface (`SO_BINDTODEVICE`) sends to 255.255.255.255 and asks servers to answer by
//! broadcast (the BROADCAST flag), which Linux delivers to that socket without an address.
//! Offers without an address (a proxy-DHCP server answering a boot client) are ignored, as are
//! answers to another client (transaction id, hardware address).

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
    Lease {
        address: ack.yiaddr(),
        prefix,
        router,
        lease_secs,
        server,
        dns,
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

/// Sends `msg` and waits for an answer `wanted` accepts, resending after 1, 2, 4, 8 s…
/// (RFC 2131's backoff, shortened: a provisioning network is local).
fn exchange(
    sock: &UdpSocket,
    iface: &str,
    what: &'static str,
    msg: &Message,
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
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
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

    /// Two network namespaces joined by a veth pair, removed on drop (with the server).
    struct Lab {
        server_ns: String,
        client_ns: String,
        dnsmasq: Option<Child>,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            if let Some(mut c) = self.dnsmasq.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for ns in [&self.server_ns, &self.client_ns] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
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
        let tag = std::process::id();
        let mut lab = Lab {
            server_ns: format!("imp-dhs-{tag}"),
            client_ns: format!("imp-dhc-{tag}"),
            dnsmasq: None,
        };
        let (s, c) = (lab.server_ns.clone(), lab.client_ns.clone());
        ip(&["netns", "add", &s]);
        ip(&["netns", "add", &c]);
        ip(&[
            "link", "add", "vsrv", "netns", &s, "type", "veth", "peer", "name", "vcli", "netns", &c,
        ]);
        ip(&["-n", &s, "addr", "add", "10.77.0.1/24", "dev", "vsrv"]);
        ip(&["-n", &s, "link", "set", "vsrv", "up"]);
        ip(&["-n", &s, "link", "set", "lo", "up"]);
        ip(&["-n", &c, "link", "set", "lo", "up"]);
        let t = tempfile::tempdir().unwrap();
        let leases = t.path().join("leases");
        lab.dnsmasq = Some(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &s,
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--port=0",
                    "--interface=vsrv",
                    "--bind-interfaces",
                ])
                .arg("--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,2h")
                .arg("--dhcp-option=option:router,10.77.0.254")
                .arg("--dhcp-option=option:dns-server,10.77.0.53")
                .arg(format!("--dhcp-leasefile={}", leases.display()))
                .arg("--conf-file=/dev/null")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq (scripts/deps: dnsmasq-base)"),
        );
        std::thread::sleep(Duration::from_millis(300));

        // The client runs on a thread moved into the client namespace.
        let ns_path = format!("/run/netns/{c}");
        let got = std::thread::spawn(move || {
            let ns = std::fs::File::open(&ns_path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
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
        })
        .join()
        .unwrap();
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
