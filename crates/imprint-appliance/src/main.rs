//! imprint-appliance: PID 1 of the imprint live image.
//!
//! Early boot ([`boot::init`]: mounts, modules, consoles), a table of the disks on every
//! console ([`disks`], from core discovery) and the marker line `IMPRINT-BOOT-OK`, then the
//! install flow ([`flow::run`]), which never returns.
//!
//! Rooms: [`boot`] (mounts, command line, settle), [`modules`] (kernel modules, [`fnmatch`]), [`esp`] (which
//! partition is the stick), [`console`] (every line on every console, progress bars),
//! [`prompt`] (questions on every console with a person), [`power`], [`mount`] (mounts as
//! guards), [`efi`] (boot variables, next boot) and [`flow`] (the install). The report is
//! `imprint_core::report`. With `imprint.probe` on the kernel command line it powers off after the table
//! instead (hardware checks, live-image tests): nothing is written.

mod bench;
mod boot;
mod console;
mod disks;
mod efi;
mod esp;
mod flow;
mod fnmatch;
mod handover;
mod inventory;
mod medium;
mod modules;
mod mount;
mod net;
mod power;
mod prompt;
mod rootfs;
mod screen;
mod settle;
mod stick;
mod uevent;

use std::path::Path;

use console::Consoles;

/// The line the end-to-end tests wait for on the serial console.
const BOOT_OK_MARKER: &str = "IMPRINT-BOOT-OK";

fn main() {
    // Power-on to first byte counts from here (plus the kernel's uptime now).
    let started = std::time::Instant::now();
    let kernel_uptime = boot::boottime();
    // Before /dev is a devtmpfs only the archive's /dev/console exists; init() reopens.
    let mut consoles = Consoles::open(Path::new("/sys"), Path::new("/dev"));
    if std::process::id() != 1 {
        // It mounts filesystems and loads modules: never on a workstation by accident.
        consoles.line("imprint-appliance is the live image's init (PID 1); refusing to run as a normal process");
        std::process::exit(2);
    }
    install_panic_hook();
    let env = match boot::init(&mut consoles, started, kernel_uptime) {
        Ok(env) => env,
        Err(e) => {
            consoles.line(&format!(
                "imprint: early boot failed: {}",
                console::error_chain(&e)
            ));
            consoles.line("imprint: nothing was written; power the machine off to retry");
            power::halt_forever();
        }
    };
    consoles.line(&format!(
        "imprint: {} modules loaded, consoles {}, devices {} after {:.1}s",
        env.modules_loaded.len(),
        consoles.active().join(" "),
        if env.settled {
            "settled"
        } else {
            "still changing"
        },
        env.elapsed.as_secs_f64()
    ));
    // The uptime lets the host place the kernel's start on its own clock (scripts/bench-boot).
    consoles.log_line(&format!(
        "imprint: timing: uptime {:.3}s; kernel {:.2}s before PID 1, modules loaded {:.2}s, disks settled {:.2}s after PID 1 started",
        boot::boottime().unwrap_or_default().as_secs_f64(),
        env.kernel_uptime.unwrap_or_default().as_secs_f64(),
        env.modules_done.as_secs_f64(),
        env.elapsed.as_secs_f64()
    ));
    if let Ok(id) = imprint_core::machine::MachineIdentity::read(&env.roots.sys) {
        consoles.show(|v| v.machine = Some(id));
    }
    match imprint_core::discover::scan(&env.roots.sys) {
        Ok(found) => {
            // The serial log gets the table; the screen its own columns.
            consoles.log_line("imprint: disks:");
            let stick = env.esp.as_ref().map(|e| e.disk.as_str());
            for line in disks::table(&found, stick, &env.roots.dev) {
                consoles.log_line(&format!("  {line}"));
            }
            let lines = disks::screen_lines(&found, stick, &env.roots.dev);
            consoles.show(|v| v.disks = lines);
        }
        Err(e) => consoles.line(&format!(
            "imprint: could not list the disks: {}",
            console::error_chain(&e)
        )),
    }
    if env.esp.is_none() && env.cmdline.get(net::URL_PARAM).is_none() {
        consoles.line("imprint: the stick's own partition was not found");
    }
    consoles.log_line(BOOT_OK_MARKER);
    if env.cmdline.has("imprint.probe") {
        // Probe mode (live-image tests, hardware checks): report what was found, touch nothing.
        power::power_off(&mut consoles);
    }
    flow::run(&env, &mut consoles)
}

/// A panic in PID 1 would end the process and the kernel would panic with "Attempted to kill
/// init", losing the message: show it on every console and wait instead.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let mut consoles = Consoles::open(Path::new("/sys"), Path::new("/dev"));
        consoles.line(&format!("imprint: internal error: {info}"));
        consoles.line("imprint: please report this; power the machine off to retry");
        power::halt_forever();
    }));
}
