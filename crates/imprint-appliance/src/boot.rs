//! Early boot of PID 1: everything between the kernel handing over and the install flow.
//!
//! [`init`] mounts the API filesystems, reads the kernel command line, loads the kernel modules
//! the hardware asks for (coldplug: every device's `modalias` matched against `modules.alias`,
//! with dependencies and soft dependencies in order, and again for every device that appears
//! later, as udev would; see [`crate::modules`] and [`crate::uevent`]) and waits, bounded,
//! until the block devices settle and the stick's ESP ([`crate::esp`]) appeared.
//!
//! The pieces that decide something ([`Cmdline`], the module index, the ESP search) take their
//! roots (`/proc`, `/sys`, `/dev`, the module directory, in [`Roots`]) as parameters, so the unit
//! tests run them against fake trees.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imprint_core::report::Coldplug;
use imprint_core::stick::CMDLINE_ESP_PARAM;
use nix::mount::{mount, MsFlags};

use crate::console::{error_chain, Consoles};
use crate::esp::{find_esp, EspPartition};
use crate::modules::{
    is_storage_path, modaliases, module_params, InsertModule, KernelInsert, ModuleIndex,
    ModuleLoader, Progress, ALWAYS_LOAD,
};
use crate::settle;
use crate::uevent::Uevents;

/// How long [`init`] waits at most for devices (the USB stick enumerates last) to appear.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);
/// With a storage controller whose progress [`crate::settle`] cannot read, the device set
/// counts as settled once nothing new appeared for this long.
pub const SETTLE_QUIET: Duration = Duration::from_millis(1500);
/// Otherwise the block devices must stay unchanged this long (partitions, a namespace scan
/// that registers several namespaces one after the other).
pub const STABLE: Duration = Duration::from_millis(300);
/// USB devices must stay unchanged this long: a hub enumerates its ports one after the other
/// and shows no sign of the ones still to come (USB disks are never targets; this keeps the
/// boot screen's table complete).
pub const USB_QUIET: Duration = Duration::from_millis(1000);
const POLL: Duration = Duration::from_millis(50);

/// Errors of early boot; each names the step and the object.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Index {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
}

/// The system roots early boot reads. [`Roots::system`] for PID 1; tests point them at fake trees.
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub dev: PathBuf,
    /// `/lib/modules/<kernel release>`.
    pub modules: PathBuf,
}

impl Roots {
    /// The real roots; the module directory follows the running kernel's release.
    pub fn system() -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Roots {
            proc: "/proc".into(),
            sys: "/sys".into(),
            dev: "/dev".into(),
            modules: Path::new("/lib/modules").join(release),
        }
    }

    /// Fake roots under `dir` (`proc`, `sys`, `dev`, `modules`), for tests.
    #[cfg(test)]
    pub(crate) fn under(dir: &Path) -> Self {
        Roots {
            proc: dir.join("proc"),
            sys: dir.join("sys"),
            dev: dir.join("dev"),
            modules: dir.join("modules"),
        }
    }
}

/// What early boot found; the install flow starts from here.
#[derive(Debug, Clone)]
pub struct BootEnv {
    pub cmdline: Cmdline,
    /// Kernel release (`uname -r`).
    pub kernel_release: String,
    /// Modules loaded, in load order.
    pub modules_loaded: Vec<String>,
    /// Modules that failed to load, with the reason. Not fatal: a driver for hardware that is
    /// absent or a CPU-specific checksum module may refuse, and the rest still works.
    pub module_failures: Vec<(String, String)>,
    /// Whether `/sys/firmware/efi/efivars` is mounted (UEFI boot; BootNext can be set).
    pub efivars: bool,
    /// The stick's ESP, when the command line names its PARTUUID and the partition was seen.
    pub esp: Option<EspPartition>,
    /// The system roots the flow reads (`/proc`, `/sys`, `/dev`).
    pub roots: Roots,
    /// True when the disks settled by the rule in [`crate::settle`] before [`SETTLE_TIMEOUT`].
    pub settled: bool,
    /// Storage controllers still appearing when the wait gave up (empty when settled).
    pub pending: Vec<String>,
    /// When PID 1 started (`main`'s first instant).
    pub started: Instant,
    /// The kernel's uptime (`CLOCK_BOOTTIME`) when PID 1 started: kernel start to PID 1.
    pub kernel_uptime: Option<Duration>,
    /// From PID 1's start to the last module inserted.
    pub modules_done: Duration,
    /// Where the wait for devices went.
    pub coldplug: Coldplug,
    /// Time from PID 1 start to the end of [`init`].
    pub elapsed: Duration,
}

/// The kernel's uptime including suspend (`CLOCK_BOOTTIME`), the clock of `/proc/uptime`.
pub fn boottime() -> Option<Duration> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .ok()
        .map(Duration::from)
}

/// Early boot for PID 1: mounts, command line, modules, settle. Messages go to `consoles`.
/// Only a failing mount of `/proc`, `/sys` or `/dev` is an error: without them nothing works.
/// `start` is when PID 1's `main` began and `kernel_uptime` the kernel's uptime then.
pub fn init(
    consoles: &mut Consoles,
    start: Instant,
    kernel_uptime: Option<Duration>,
) -> Result<BootEnv, BootError> {
    mount_api_filesystems()?;
    // The consoles opened before /dev was a devtmpfs only had /dev/console from the archive.
    let roots = Roots::system();
    consoles.reopen(&roots.sys, &roots.dev);
    let cmdline = Cmdline::read(&roots.proc)?;
    keep_kernel_off_the_screen(&roots, &cmdline, consoles);
    let kernel_release = roots
        .modules
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    consoles.line(&format!(
        "imprint: kernel {kernel_release}, loading drivers"
    ));

    let loader = match ModuleIndex::load(&roots.modules) {
        Ok(index) => Some(ModuleLoader::new(
            index,
            module_params(&cmdline),
            KernelInsert,
        )),
        Err(e) => {
            consoles.line(&format!("imprint: no kernel modules: {}", error_chain(&e)));
            None
        }
    };
    let esp_partuuid = cmdline.get(CMDLINE_ESP_PARAM).map(str::to_owned);
    // Subscribed before coldplug's first walk, so that no device falls between the two.
    let uevents = match Uevents::open() {
        Ok(u) => Some(u),
        Err(e) => {
            consoles.log_line(&format!(
                "imprint: no kernel uevents ({e}): walking /sys/devices on every pass"
            ));
            None
        }
    };
    let wait_for_disks = |consoles: &mut Consoles| {
        coldplug_and_settle(
            &roots,
            loader.as_ref(),
            uevents,
            esp_partuuid.as_deref(),
            start,
            consoles,
        )
    };
    // The loader's run ends when every module queued has finished, also after a timeout.
    let settled = match &loader {
        Some(l) => l.run(|| wait_for_disks(consoles)),
        None => wait_for_disks(consoles),
    };
    // efivarfs is one of ALWAYS_LOAD, loaded in coldplug's first pass.
    let efivars = mount_efivarfs(&roots.sys, consoles);
    let (modules_loaded, module_failures, last_module) = match &loader {
        Some(l) => (l.loaded(), l.failures(), l.last_finished()),
        None => (Vec::new(), Vec::new(), None),
    };
    for (module, reason) in &module_failures {
        consoles.line(&format!("imprint: module {module} not loaded: {reason}"));
    }
    let c = &settled.coldplug;
    consoles.log_line(&format!(
        "imprint: coldplug: {} passes; {} walks of /sys/devices in {:.2}s (longest {:.2}s), \
         {} uevents; {} disk checks in {:.2}s; last new device {:.2}s, block change {:.2}s, \
         USB change {:.2}s after PID 1 started",
        c.passes,
        c.walks,
        c.walk_seconds,
        c.longest_walk_seconds,
        c.uevents,
        c.checks,
        c.check_seconds,
        c.last_device_at,
        c.last_block_change_at,
        c.last_usb_change_at,
    ));
    Ok(BootEnv {
        cmdline,
        kernel_release,
        modules_loaded,
        module_failures,
        efivars,
        esp: settled.esp,
        roots,
        settled: settled.settled,
        pending: settled.pending,
        started: start,
        kernel_uptime,
        modules_done: last_module.map_or(Duration::ZERO, |t| t.saturating_duration_since(start)),
        coldplug: settled.coldplug,
        elapsed: start.elapsed(),
    })
}

/// The monitor shows the view, not the kernel: what `quiet` held back during boot is copied to
/// the serial console, and later kernel messages go to a hidden VT and the serial console (see
/// [`crate::screen::vt`]). Failures only cost looks, never the install: they are logged.
fn keep_kernel_off_the_screen(roots: &Roots, cmdline: &Cmdline, consoles: &mut Consoles) {
    let quiet = cmdline.has("quiet");
    if quiet {
        let n = consoles.replay_kernel_log(&roots.dev);
        consoles.log_line(&format!(
            "imprint: {n} kernel messages held back from the screen by `quiet` (above)"
        ));
    }
    match crate::screen::vt::quiet_kernel(&roots.dev, &roots.proc, quiet) {
        Ok(done) => consoles.log_line(&format!("imprint: {done}")),
        Err(e) => consoles.log_line(&format!("imprint: kernel messages stay on the screen: {e}")),
    }
    if let Some(done) = consoles.fit_screen() {
        consoles.log_line(&format!("imprint: {done}"));
    }
    consoles.show(|v| v.status = "starting".into());
}

fn mount_api_filesystems() -> Result<(), BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let mounts: [(&'static str, &str, MsFlags, Option<&str>); 4] = [
        ("proc", "/proc", nosuid, None),
        ("sysfs", "/sys", nosuid, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (fstype, target, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        match mount(Some(fstype), target, Some(fstype), flags, data) {
            // EBUSY: already mounted (PID 1 restarted by a debugger, or the kernel did it).
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(BootError::Mount {
                    fstype,
                    target: target.into(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Mounts efivarfs where UEFI provides variables. Not fatal: the flow only loses the ability
/// to set BootNext, and says so.
fn mount_efivarfs(sys: &Path, consoles: &mut Consoles) -> bool {
    let target = sys.join("firmware/efi/efivars");
    if !target.is_dir() {
        consoles.line("imprint: no EFI variables (legacy BIOS boot?)");
        return false;
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    match mount(
        Some("efivarfs"),
        &target,
        Some("efivarfs"),
        flags,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::Error::EBUSY) => true,
        Err(e) => {
            consoles.line(&format!("imprint: mounting efivarfs: {e}"));
            false
        }
    }
}

/// What [`coldplug_and_settle`] found and where its time went.
struct Settled {
    /// The rule in [`crate::settle`] held (and the stick appeared) before [`SETTLE_TIMEOUT`].
    settled: bool,
    esp: Option<EspPartition>,
    /// Controllers still appearing when the wait ended (empty when settled).
    pending: Vec<String>,
    coldplug: Coldplug,
}

/// Loads drivers for every device as it appears and waits until the stick's ESP (when the
/// command line names it) is there and every storage controller is done by the rule in
/// [`crate::settle`]: no module loading and no new device in the last pass, no controller
/// pending, and the block devices unchanged for [`STABLE`] ([`SETTLE_QUIET`] when a controller
/// of a kind the rule cannot read is present; USB devices for [`USB_QUIET`]).
///
/// Devices are found by one walk of `/sys/devices`, then by the kernel's `uevents`
/// ([`crate::uevent`], subscribed before; a walk again only if events were lost, on every pass
/// without them). Their modules are queued to `loader`, whose run loads them in the background: a pass
/// follows as soon as an insertion finishes (its driver may have made devices appear, as xhci
/// makes the USB disks appear), or after [`POLL`].
fn coldplug_and_settle<I: InsertModule>(
    roots: &Roots,
    loader: Option<&ModuleLoader<I>>,
    mut uevents: Option<Uevents>,
    esp_partuuid: Option<&str>,
    pid1_start: Instant,
    consoles: &mut Consoles,
) -> Settled {
    let start = Instant::now();
    let at = |t: Instant| t.saturating_duration_since(pid1_start).as_secs_f64();
    let devices = roots.sys.join("devices");
    let mut stats = Coldplug::default();
    let mut walk = true;
    let mut seen_aliases = BTreeSet::new();
    let mut seen_blocks = BTreeSet::new();
    let mut seen_usb = BTreeSet::new();
    let mut last_change = start;
    let mut last_usb = start;
    let mut last_device = start;
    let mut esp = None;
    let mut announced = false;
    let mut last_pending: Vec<String> = Vec::new();
    // The kernel log says which ATA ports have no link (libata leaves their slots `unknown`).
    let mut kmsg_file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(roots.dev.join("kmsg"))
        .ok();
    let mut kmsg: Vec<String> = Vec::new();
    loop {
        // Where the insertions stood before this pass looked: only if none was running then
        // has the pass seen every device they made.
        let progress = loader.map(ModuleLoader::progress);
        let mut found = Vec::new();
        if let Some(u) = uevents.as_mut() {
            let added = u.read();
            stats.uevents += u32::try_from(added.events).unwrap_or(u32::MAX);
            walk |= added.lost;
            found = added.modaliases;
        }
        if walk || uevents.is_none() {
            let t = Instant::now();
            found.extend(modaliases(&devices));
            let took = t.elapsed().as_secs_f64();
            stats.walks += 1;
            stats.walk_seconds += took;
            stats.longest_walk_seconds = stats.longest_walk_seconds.max(took);
            walk = false;
        }
        let new: Vec<String> = found
            .into_iter()
            .filter(|a| seen_aliases.insert(a.clone()))
            .collect();
        let mut queued = 0;
        if let Some(loader) = loader {
            // What the disks and the stick wait for (storage and USB controllers, USB disks,
            // SCSI disks) goes before everything else: there are only as many insertions at
            // once as CPUs, and the first byte waits for these, not for sound or graphics.
            let (storage, other): (Vec<String>, Vec<String>) =
                new.iter().cloned().partition(|a| is_storage_path(a));
            let mut first = loader.modules_for_aliases(&storage);
            let mut wanted = loader.modules_for_aliases(&other);
            if stats.passes == 0 {
                // sd_mod before its disks appear: USB sticks and SATA disks are SCSI disks.
                first.push("sd_mod".into());
                wanted.extend(ALWAYS_LOAD.iter().map(|m| (*m).to_string()));
            }
            queued = loader.queue_first(&first) + loader.queue(&wanted);
        }
        stats.passes += 1;
        let now = Instant::now();
        let blocks: BTreeSet<String> = list_dir(&roots.sys.join("class/block"));
        if !new.is_empty() {
            last_device = now;
        }
        if !new.is_empty() || blocks != seen_blocks {
            last_change = now;
        }
        if blocks != seen_blocks {
            stats.last_block_change_at = at(now);
        }
        let usb: BTreeSet<String> = list_dir(&roots.sys.join("bus/usb/devices"));
        if usb != seen_usb {
            last_usb = now;
        }
        seen_blocks = blocks;
        seen_usb = usb;
        kmsg.extend(read_kmsg(kmsg_file.as_mut()));
        let quiet_pass = new.is_empty() && queued == 0 && progress.is_none_or(|p| p.idle);
        let timed_out = start.elapsed() >= SETTLE_TIMEOUT;
        if !announced && start.elapsed() >= Duration::from_secs(2) {
            consoles.line(&format!(
                "imprint: waiting for disks to settle (up to {}s)",
                SETTLE_TIMEOUT.as_secs()
            ));
            announced = true;
        }
        // The disks cannot be done while a driver is loading or a device just appeared, and
        // checking them is the costly part of a pass: only a quiet pass (or the last) does.
        if !quiet_pass && !timed_out {
            wait(loader, progress);
            continue;
        }
        let t = Instant::now();
        // The stick's partition does not go away once it is there.
        if esp.is_none() {
            esp = esp_partuuid.and_then(|uuid| find_esp(&roots.sys, &roots.dev, uuid));
        }
        let esp_ok = esp_partuuid.is_none() || esp.is_some();
        let has_driver = |alias: &str| loader.is_some_and(|l| l.driver_expected(alias));
        let storage = settle::storage(
            &roots.sys,
            &has_driver,
            start.elapsed() >= settle::NVME_EMPTY_GRACE,
            &settle::ata_links_down(kmsg.iter().map(String::as_str)),
        );
        stats.checks += 1;
        stats.check_seconds += t.elapsed().as_secs_f64();
        if storage.pending != last_pending {
            for p in &storage.pending {
                consoles.log_line(&format!(
                    "imprint: waiting at {:.2}s: {p}",
                    start.elapsed().as_secs_f64()
                ));
            }
            last_pending = storage.pending.clone();
        }
        let quiet = if storage.unknown.is_empty() {
            STABLE
        } else {
            SETTLE_QUIET
        };
        let done = |settled: bool, esp, pending, mut stats: Coldplug| {
            stats.last_device_at = at(last_device);
            stats.last_usb_change_at = at(last_usb);
            Settled {
                settled,
                esp,
                pending,
                coldplug: stats,
            }
        };
        if esp_ok
            && quiet_pass
            && storage.ready()
            && last_change.elapsed() >= quiet
            && last_usb.elapsed() >= USB_QUIET
        {
            for why in storage.unknown.iter().chain(&storage.ignored) {
                consoles.log_line(&format!("imprint: storage: {why}"));
            }
            return done(true, esp, Vec::new(), stats);
        }
        if timed_out {
            if !esp_ok {
                consoles.line(&format!(
                    "imprint: the stick's partition {} did not appear within {}s",
                    esp_partuuid.unwrap_or_default(),
                    SETTLE_TIMEOUT.as_secs()
                ));
            }
            for p in &storage.pending {
                consoles.line(&format!(
                    "imprint: still appearing after {}s: {p}",
                    SETTLE_TIMEOUT.as_secs()
                ));
            }
            return done(false, esp, storage.pending, stats);
        }
        wait(loader, progress);
    }
}

/// Until the next pass: an insertion finishing after `progress` (its driver may have made
/// devices appear) or [`POLL`], whichever comes first.
fn wait<I: InsertModule>(loader: Option<&ModuleLoader<I>>, progress: Option<Progress>) {
    match (loader, progress) {
        (Some(l), Some(p)) => l.wait_for_progress(p.finished, POLL),
        _ => std::thread::sleep(POLL),
    }
}

/// The kernel log records not read yet from `/dev/kmsg` (opened non-blocking), the ATA link
/// lines only (all the settle rule needs).
fn read_kmsg(file: Option<&mut fs::File>) -> Vec<String> {
    use std::io::Read;
    let mut out = Vec::new();
    let Some(f) = file else { return out };
    let mut buf = vec![0u8; 8192];
    // One record per read; EAGAIN at the end, EPIPE when a record was overwritten (go on).
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                if rec.contains(": SATA link ") {
                    out.push(rec.lines().next().unwrap_or_default().to_owned());
                }
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {}
            Err(_) => break,
        }
    }
    out
}

pub(crate) fn list_dir(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The kernel command line, split like the kernel does (double quotes group spaces).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Reads `<proc>/cmdline`.
    pub fn read(proc: &Path) -> Result<Self, BootError> {
        let path = proc.join("cmdline");
        let text = fs::read_to_string(&path).map_err(|source| BootError::Read { path, source })?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut push = |word: &mut String| {
            if !word.is_empty() {
                let param = match word.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (word.clone(), None),
                };
                params.push(param);
                word.clear();
            }
        };
        for c in text.chars() {
            match c {
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => push(&mut word),
                c => word.push(c),
            }
        }
        push(&mut word);
        Cmdline { params }
    }

    /// Value of the last `key=value` (the kernel's rule: later wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// True when `key` appears, with or without a value.
    pub fn has(&self, key: &str) -> bool {
        self.params.iter().any(|(k, _)| k == key)
    }

    pub fn params(&self) -> &[(String, Option<String>)] {
        &self.params
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::settle::fake::write;

    /// A kernel for coldplug: inserting `xhci_pci` makes a USB disk's interface appear (as the
    /// controller's driver enumerates its ports); inserting `ext4` is slow, and only ends
    /// early once `usb_storage` has started.
    struct FakeKernel {
        sys: PathBuf,
        /// (module, started, finished), in the order insertions finished.
        log: Mutex<Vec<(String, Instant, Instant)>>,
        started: Mutex<Vec<String>>,
    }

    impl InsertModule for &FakeKernel {
        fn insert(&self, path: &Path, _params: &str) -> io::Result<()> {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().replace('-', "_"))
                .unwrap_or_default();
            let start = Instant::now();
            self.started.lock().unwrap().push(name.clone());
            match name.as_str() {
                "xhci_pci" => write(
                    &self
                        .sys
                        .join("devices/pci0000:00/0000:00:02.0/usb1/1-1/1-1:1.0/modalias"),
                    "usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00\n",
                ),
                "ext4" => {
                    while start.elapsed() < Duration::from_secs(5)
                        && !self
                            .started
                            .lock()
                            .unwrap()
                            .iter()
                            .any(|m| m == "usb_storage")
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
            self.log.lock().unwrap().push((name, start, Instant::now()));
            Ok(())
        }
    }

    #[test]
    fn coldplug_loads_what_a_driver_made_appear_without_waiting_for_slow_modules() {
        let t = tempfile::tempdir().unwrap();
        let roots = Roots::under(t.path());
        write(
            &roots.modules.join("modules.dep"),
            "kernel/usbcore.ko:\n\
             kernel/xhci-hcd.ko: kernel/usbcore.ko\n\
             kernel/xhci-pci.ko: kernel/xhci-hcd.ko kernel/usbcore.ko\n\
             kernel/usb-storage.ko: kernel/usbcore.ko\n\
             kernel/jbd2.ko:\n\
             kernel/ext4.ko: kernel/jbd2.ko\n",
        );
        write(
            &roots.modules.join("modules.alias"),
            "alias pci:v*d*sv*sd*bc0Csc03i30* xhci_pci\n\
             alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage\n",
        );
        // The USB controller; the disk behind it appears only once its driver is loaded.
        write(
            &roots.sys.join("devices/pci0000:00/0000:00:02.0/modalias"),
            "pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30\n",
        );
        let kernel = FakeKernel {
            sys: roots.sys.clone(),
            log: Mutex::default(),
            started: Mutex::default(),
        };
        let index = ModuleIndex::load(&roots.modules).unwrap();
        let loader = ModuleLoader::new(index, HashMap::new(), &kernel);
        let start = Instant::now();
        let settled = loader.run(|| {
            coldplug_and_settle(
                &roots,
                Some(&loader),
                None,
                None,
                start,
                &mut Consoles::default(),
            )
        });
        assert!(settled.settled);
        let log = kernel.log.lock().unwrap().clone();
        let span = |m: &str| {
            let (_, s, e) = log.iter().find(|(n, _, _)| n == m).unwrap();
            (*s, *e)
        };
        // usb_storage, found by a later pass, started while ext4 (the first pass) still
        // loaded; with one batch per pass it would have waited for ext4's 5 s.
        assert!(span("usb_storage").0 < span("ext4").1, "{log:?}");
        assert!(span("ext4").1 < start + Duration::from_secs(4), "{log:?}");
        // Dependencies still come first.
        assert!(span("usbcore").1 <= span("usb_storage").0);
        assert!(span("xhci_hcd").1 <= span("xhci_pci").0);
        assert!(span("jbd2").1 <= span("ext4").0);
        let loaded = loader.loaded();
        assert!(loaded.contains(&"usb_storage".to_string()), "{loaded:?}");
        // Without uevents, every pass walked sysfs; the ALWAYS_LOAD modules this tree lacks
        // failed, and only those.
        let c = &settled.coldplug;
        assert!(c.walks == c.passes && c.passes >= 3, "{c:?}");
        assert!(c.checks >= 1 && c.last_device_at > 0.0, "{c:?}");
        assert!(loader
            .failures()
            .iter()
            .all(|(m, _)| ALWAYS_LOAD.contains(&m.as_str()) && m != "ext4"));
    }

    #[test]
    fn cmdline_parses_quotes_and_last_value_wins() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/vmlinuz console=tty0 console=ttyS0,115200 panic=0 imprint.esp=0FC63DAF-1 \"x=a b\" ro\n",
        );
        assert_eq!(c.get("console"), Some("ttyS0,115200"));
        assert_eq!(c.get("imprint.esp"), Some("0FC63DAF-1"));
        assert_eq!(c.get("x"), Some("a b"));
        assert!(c.has("ro"));
        assert_eq!(c.get("ro"), None);
        assert_eq!(c.get("quiet"), None);
    }
}
