//! Power: PID 1 never exits (the kernel would panic), so every ending is a power-off, a reboot
//! or waiting forever.

use std::time::Duration;

use crate::console::Consoles;

/// Flushes filesystems and powers the machine off. Never returns: if the kernel refuses, PID 1
/// must still not exit (that would panic the kernel), so it waits forever.
pub fn power_off(consoles: &mut Consoles) -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    consoles.line(&format!("imprint: power off failed: {e}"));
    halt_forever()
}

/// Reboots. Never returns (see [`power_off`]).
pub fn reboot(consoles: &mut Consoles) -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    consoles.line(&format!("imprint: reboot failed: {e}"));
    halt_forever()
}

/// Waits forever: what PID 1 does when there is nothing left it can do safely.
pub fn halt_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
