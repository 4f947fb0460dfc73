//! Network interfaces without `ip`: the initramfs has no iproute2, so PID 1 brings a link up,
//! reads its hardware address and sets the leased address, netmask and default route with the
//! classic socket ioctls (`SIOCSIFFLAGS`, `SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCADDRT`).
//! The ioctls live in the private [`ioctl`] module and are reached only through the safe
//! functions here.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::libc;

use super::dhcp::Lease;

/// `struct rtentry` of `<linux/route.h>` (the libc crate has it for musl only).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

mod ioctl {
    use nix::libc;
    nix::ioctl_read_bad!(get_flags, libc::SIOCGIFFLAGS, libc::ifreq);
    nix::ioctl_write_ptr_bad!(set_flags, libc::SIOCSIFFLAGS, libc::ifreq);
    nix::ioctl_write_ptr_bad!(set_addr, libc::SIOCSIFADDR, libc::ifreq);
    nix::ioctl_write_ptr_bad!(set_netmask, libc::SIOCSIFNETMASK, libc::ifreq);
    #[cfg(test)]
    nix::ioctl_read_bad!(get_hwaddr, libc::SIOCGIFHWADDR, libc::ifreq);
    nix::ioctl_write_ptr_bad!(add_route, libc::SIOCADDRT, super::RtEntry);
}

/// A datagram socket for the ioctls (they act on the interface, not the socket).
fn ctl_socket() -> io::Result<OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// An `ifreq` naming `name` (at most 15 bytes, as the kernel's IFNAMSIZ allows).
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    // SAFETY: ifreq is plain old data (a name and a union of integers and sockaddrs); all
    // zeros is a valid value of every field.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) on Linux and sockaddr
    // is the generic view of it the ioctls take.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `e`, saying which interface and which step.
fn named(name: &str, e: nix::Error, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{name}: {what}: {e}"))
}

/// Brings `name` up (`IFF_UP`).
pub fn up(name: &str) -> io::Result<()> {
    let s = ctl_socket()?;
    let mut r = ifreq(name)?;
    // SAFETY: `r` is a valid ifreq naming the interface; SIOCGIFFLAGS fills ifru_flags.
    unsafe { ioctl::get_flags(s.as_raw_fd(), &mut r) }
        .map_err(|e| named(name, e, "reading its flags"))?;
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS just wrote.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS reads ifru_flags.
    unsafe { ioctl::set_flags(s.as_raw_fd(), &r) }.map_err(|e| named(name, e, "bringing it up"))?;
    Ok(())
}

/// The hardware (MAC) address of `name`, asked from the kernel (the tests' namespaces have no
/// /sys of their own).
#[cfg(test)]
pub fn hw_addr(name: &str) -> io::Result<[u8; 6]> {
    let s = ctl_socket()?;
    let mut r = ifreq(name)?;
    // SAFETY: `r` is a valid ifreq naming the interface; SIOCGIFHWADDR fills ifru_hwaddr.
    unsafe { ioctl::get_hwaddr(s.as_raw_fd(), &mut r) }
        .map_err(|e| named(name, e, "reading its hardware address"))?;
    // SAFETY: ifru_hwaddr is the union member SIOCGIFHWADDR just wrote.
    let data = unsafe { r.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// Sets the lease's address and netmask on `name` and, with a router, the default route.
pub fn configure(name: &str, lease: &Lease) -> io::Result<()> {
    let s = ctl_socket()?;
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_addr = sockaddr_in(lease.address);
    // SAFETY: `r` names the interface and carries an AF_INET address in ifru_addr.
    unsafe { ioctl::set_addr(s.as_raw_fd(), &r) }
        .map_err(|e| named(name, e, "setting its address"))?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(lease.prefix.min(32)))
        .unwrap_or(0);
    r.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
    // SAFETY: as above, with the netmask in ifru_netmask.
    unsafe { ioctl::set_netmask(s.as_raw_fd(), &r) }
        .map_err(|e| named(name, e, "setting its netmask"))?;
    if let Some(gw) = lease.router {
        let mut dev: Vec<libc::c_char> = name.bytes().map(|b| b as libc::c_char).collect();
        dev.push(0);
        let rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gw),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: `rt` is a complete struct rtentry; rt_dev points to a NUL-terminated name
        // that outlives the call.
        match unsafe { ioctl::add_route(s.as_raw_fd(), &rt) } {
            Ok(_) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(named(name, e, "adding the default route")),
        }
    }
    Ok(())
}

/// The MAC in `/sys/class/net/NAME/address`.
pub fn mac_of(dir: &Path) -> io::Result<[u8; 6]> {
    let text = std::fs::read_to_string(dir.join("address"))?;
    parse_mac(text.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a MAC address", dir.display()),
        )
    })
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`) to bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// Ethernet interfaces under `sys/class/net` (not loopback, not virtual), name and MAC, sorted.
pub fn ethernets(sys: &Path) -> Vec<(String, [u8; 6])> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(sys.join("class/net")) else {
        return out;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        // type 1 = ARPHRD_ETHER; a `device` link = real hardware (not a bridge, veth or lo).
        let is_ether = std::fs::read_to_string(dir.join("type")).is_ok_and(|t| t.trim() == "1");
        if is_ether && dir.join("device").exists() {
            if let Ok(mac) = mac_of(&dir) {
                out.push((name, mac));
            }
        }
    }
    out.sort();
    out
}

/// Waits until `sys/class/net/NAME/carrier` reads 1, at most `timeout`. Returns whether it did.
pub fn wait_carrier(sys: &Path, name: &str, timeout: Duration) -> bool {
    let path = sys.join("class/net").join(name).join("carrier");
    let t = Instant::now();
    loop {
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == "1") {
            return true;
        }
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn macs_and_interfaces_from_a_fake_sys() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        assert_eq!(
            parse_mac("52-54-00-ab-cd-01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:1",
            "zz:54:00:ab:cd:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let t = tempfile::tempdir().unwrap();
        let net = t.path().join("class/net");
        for (name, ty, dev, mac) in [
            ("lo", "772", false, "00:00:00:00:00:00"),
            ("enp2s0", "1", true, "52:54:00:00:00:02"),
            ("br0", "1", false, "52:54:00:00:00:09"),
            ("enp1s0", "1", true, "52:54:00:00:00:01"),
        ] {
            let d = net.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("type"), format!("{ty}\n")).unwrap();
            std::fs::write(d.join("address"), format!("{mac}\n")).unwrap();
            if dev {
                std::fs::create_dir_all(d.join("device")).unwrap();
            }
        }
        std::fs::write(net.join("enp1s0/carrier"), "1\n").unwrap();
        assert_eq!(
            ethernets(t.path()),
            vec![
                ("enp1s0".into(), [0x52, 0x54, 0, 0, 0, 1]),
                ("enp2s0".into(), [0x52, 0x54, 0, 0, 0, 2])
            ]
        );
        assert!(wait_carrier(t.path(), "enp1s0", Duration::ZERO));
        assert!(!wait_carrier(
            t.path(),
            "enp2s0",
            Duration::from_millis(150)
        ));
        assert!(ifreq("a-name-that-is-far-too-long").is_err());
    }
}
