//! New devices as the kernel announces them: the `NETLINK_KOBJECT_UEVENT` socket udev listens
//! on. Coldplug walks `/sys/devices` once for the devices already there
//! ([`crate::modules::modaliases`]) and then reads the `add` events for those that appear,
//! instead of walking sysfs again on every pass: a walk is thousands of system calls, which
//! under emulation (qemu's TCG) cost a large part of a second each time.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

/// The kernel's multicast group on the uevent socket (udev's own re-broadcasts are group 2).
const KERNEL_GROUP: u32 = 1;
/// Receive buffer: room for the burst a USB hub or a disk scan sends at once (events are a
/// few hundred bytes). Should it still overflow, the caller walks sysfs again.
const RCVBUF: usize = 4 << 20;
/// The kernel caps one uevent's text at 2048 bytes (`UEVENT_BUFFER_SIZE`) plus the header.
const MAX_EVENT: usize = 8192;

/// A non-blocking subscription to the kernel's uevents.
#[derive(Debug)]
pub struct Uevents {
    fd: OwnedFd,
}

/// What [`Uevents::read`] found since the last read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// The `MODALIAS` of every device added, in the order the kernel announced them.
    pub modaliases: Vec<String>,
    /// Events read, of any kind.
    pub events: usize,
    /// The kernel dropped events (the buffer was full): walk sysfs again to see every device.
    pub lost: bool,
}

impl Uevents {
    /// Subscribes to the kernel's uevents. Open it before the walk it complements: a device
    /// added in between is then seen twice (harmless), never missed.
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // Only root may go above `rmem_max`; PID 1 is root, the unit tests may not be.
        if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        Ok(Uevents { fd })
    }

    /// Every event the kernel sent since the last read (none blocks).
    pub fn read(&mut self) -> Added {
        let mut added = Added::default();
        let mut buf = vec![0u8; MAX_EVENT];
        loop {
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    added.events += 1;
                    added.modaliases.extend(added_modalias(&buf[..n]));
                }
                Err(Errno::EINTR) => {}
                // The queue overflowed since the last read: events were dropped. Reading
                // goes on with the ones after the gap.
                Err(Errno::ENOBUFS) => added.lost = true,
                // EAGAIN: nothing more now. Anything else: the socket is unusable; the
                // caller cannot tell which events it missed either.
                Err(Errno::EAGAIN) => return added,
                Err(_) => {
                    added.lost = true;
                    return added;
                }
            }
        }
    }
}

/// The `MODALIAS` of a kernel `add` event (`add@/devices/…\0ACTION=add\0DEVPATH=…\0…
/// MODALIAS=…\0`), if it has one. Other actions (`bind`, `change`, `remove`) and messages
/// that are not the kernel's (udev's start with `libudev\0`) give `None`.
pub fn added_modalias(msg: &[u8]) -> Option<String> {
    let mut fields = msg.split(|&b| b == 0);
    if !fields.next()?.starts_with(b"add@") {
        return None;
    }
    fields
        .find_map(|f| f.strip_prefix(b"MODALIAS="))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .filter(|m| !m.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn add_events_give_their_modalias_and_nothing_else_does() {
        let add = b"add@/devices/pci0000:00/0000:00:02.0/usb1/1-1/1-1:1.0\0ACTION=add\0\
            DEVPATH=/devices/pci0000:00/0000:00:02.0/usb1/1-1/1-1:1.0\0SUBSYSTEM=usb\0\
            DEVTYPE=usb_interface\0PRODUCT=46f4/1/0\0TYPE=0/0/0\0INTERFACE=8/6/80\0\
            MODALIAS=usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00\0SEQNUM=1290\0";
        assert_eq!(
            added_modalias(add).as_deref(),
            Some("usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00")
        );
        // The same device's `bind` (its driver arrived) and an `add` without a modalias (a
        // block device) ask for no driver.
        let bind = b"bind@/devices/pci0000:00/0000:00:02.0/usb1/1-1/1-1:1.0\0ACTION=bind\0\
            DRIVER=usb-storage\0MODALIAS=usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00\0";
        assert_eq!(added_modalias(bind), None);
        let block = b"add@/devices/virtual/block/loop0\0ACTION=add\0SUBSYSTEM=block\0\
            DEVNAME=loop0\0DEVTYPE=disk\0SEQNUM=1291\0";
        assert_eq!(added_modalias(block), None);
        // udev's re-broadcast (group 2; binary header) and garbage.
        assert_eq!(added_modalias(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(added_modalias(b""), None);
        assert_eq!(added_modalias(b"add@/x\0MODALIAS=\0"), None);
    }

    #[test]
    fn the_socket_opens_and_reads_nothing_without_blocking() {
        // Any user may subscribe; a sandbox without netlink cannot, and then PID 1 falls back
        // to walking sysfs on every pass (tested in boot).
        let Ok(mut events) = Uevents::open() else {
            return;
        };
        let t = std::time::Instant::now();
        let _ = events.read();
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
