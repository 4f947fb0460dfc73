//! The virtual NUC: a small harness that boots an imprint stick in qemu with OVMF (Secure Boot
//! on or off) next to NVMe, SATA and USB disks, and watches the serial console.
//!
//! ```no_run
//! use std::time::Duration;
//! use imprint_e2e::{Firmware, VmBuilder};
//! # fn main() -> Result<(), imprint_e2e::E2eError> {
//! let dir = tempfile::tempdir().unwrap();
//! let mut vm = VmBuilder::new(dir.path(), Firmware::SecureBoot)
//!     .stick("stick.img")
//!     .nvme("nvme.img", "NVME0001")
//!     .sata("sata.img", "SATA0001")
//!     .start()?;
//! vm.wait_for("IMPRINT-BOOT-OK", Duration::from_secs(240))?;
//! let status = vm.wait_exit(Duration::from_secs(60))?;
//! # Ok(()) }
//! ```
//!
//! KVM does not work on the machines this runs on: qemu runs under TCG, always inside
//! `timeout`, because a refused Secure Boot image waits forever at a firmware prompt.

pub mod fixtures;
pub mod netlab;
pub mod ocr;
pub mod ovmf_vars;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The qemu monitor's socket in a VM's work dir (VMs with a screen).
const MONITOR_SOCKET: &str = "monitor.sock";

/// OVMF builds from Debian's `ovmf` package.
pub const OVMF_DIR: &str = "/usr/share/OVMF";
/// What the kernel prints when it gives up; waiting longer would only burn the timeout.
pub const KERNEL_PANIC: &str = "Kernel panic";

/// Errors of the harness; each carries what the test needs to explain itself.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Missing(String),
    #[error("starting qemu")]
    Spawn(#[source] io::Error),
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        command: String,
        status: ExitStatus,
        output: String,
    },
    #[error("waiting for {pattern:?}: {reason} after {secs:.0}s; serial console tail:\n{tail}")]
    Wait {
        pattern: String,
        reason: &'static str,
        secs: f64,
        tail: String,
    },
}

/// The workspace root (the harness crate lives in `tests/e2e`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `build/boot`, checked: the e2e suite needs the live image, and says how to make it instead of
/// passing silently without it.
pub fn boot_dir() -> Result<PathBuf, E2eError> {
    // IMPRINT_BUILD_DIR: the same override image-build/build takes for its output root.
    let dir = std::env::var_os("IMPRINT_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build"))
        .join("boot");
    for rel in [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/BOOT/grubx64.efi",
        "vmlinuz",
        "initrd.img",
    ] {
        if !dir.join(rel).is_file() {
            return Err(E2eError::Missing(format!(
                "{} is missing: run image-build/build first (the e2e tests boot the real live image)",
                dir.join(rel).display()
            )));
        }
    }
    Ok(dir)
}

/// Builds (if needed) and returns the host `imprint` binary of this workspace.
pub fn imprint_bin() -> Result<PathBuf, E2eError> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "-q", "-p", "imprint-cli", "--bin", "imprint"]);
    run(&mut cmd)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug/imprint"))
}

/// Runs a command to completion; its output is kept for the error.
pub fn run(cmd: &mut Command) -> Result<String, E2eError> {
    let out = cmd.output().map_err(|source| E2eError::Io {
        what: "running",
        path: PathBuf::from(cmd.get_program()),
        source,
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(E2eError::Command {
            command: format!("{cmd:?}"),
            status: out.status,
            output: text,
        })
    }
}

/// Creates a sparse raw disk file of `size` bytes.
pub fn sparse_disk(path: &Path, size: u64) -> Result<PathBuf, E2eError> {
    let io = |source| E2eError::Io {
        what: "creating disk",
        path: path.to_owned(),
        source,
    };
    File::create(path)
        .and_then(|f| f.set_len(size))
        .map_err(io)?;
    Ok(path.to_owned())
}

/// UEFI firmware setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// OVMF with Microsoft's keys enrolled and Secure Boot enforced (`OVMF_CODE_4M.ms.fd`,
    /// q35 with SMM, secure pflash), as on a NUC out of the box.
    SecureBoot,
    /// OVMF without Secure Boot (`OVMF_CODE_4M.fd`).
    NoSecureBoot,
}

impl Firmware {
    fn code(self) -> PathBuf {
        Path::new(OVMF_DIR).join(match self {
            Firmware::SecureBoot => "OVMF_CODE_4M.ms.fd",
            Firmware::NoSecureBoot => "OVMF_CODE_4M.fd",
        })
    }

    fn vars_template(self) -> PathBuf {
        Path::new(OVMF_DIR).join(match self {
            Firmware::SecureBoot => "OVMF_VARS_4M.ms.fd",
            Firmware::NoSecureBoot => "OVMF_VARS_4M.fd",
        })
    }
}

#[derive(Debug, Clone)]
enum Attach {
    /// The boot stick: first on the USB bus, bootindex=1.
    Stick,
    Nvme {
        serial: String,
        four_k: bool,
    },
    Sata {
        serial: String,
    },
    Usb {
        serial: String,
    },
}

#[derive(Debug, Clone)]
struct Drive {
    path: PathBuf,
    attach: Attach,
    /// A qemu `blkdebug` rules file: I/O errors injected where it says.
    faults: Option<PathBuf>,
    /// A write throttle in bytes per second (qemu `throttling.bps-write`).
    write_bps: Option<u64>,
}

/// Describes a virtual machine; [`VmBuilder::start`] runs it.
#[derive(Debug, Clone)]
pub struct VmBuilder {
    workdir: PathBuf,
    firmware: Firmware,
    vars: Option<PathBuf>,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    drives: Vec<Drive>,
    nic: Option<String>,
    /// A NIC on a tap device (name, MAC, PXE allowed) that the firmware boots from first.
    boot_nic: Option<(String, String, bool)>,
    /// The network namespace qemu runs in (where its tap device lives).
    netns: Option<String>,
    extra: Vec<String>,
    /// A `bootindex` on the stick only: OVMF then prunes the Boot#### entries of the internal
    /// disks each boot, like firmware that drops or re-sorts entries it did not make.
    stick_only_bootindex: bool,
    /// A monitor and a USB keyboard: the qemu monitor on a socket for `screendump` and
    /// `sendkey` (see [`VmBuilder::with_screen`]).
    screen: bool,
}

impl VmBuilder {
    /// A VM whose logs and firmware variables go to `workdir`.
    pub fn new(workdir: impl Into<PathBuf>, firmware: Firmware) -> Self {
        VmBuilder {
            workdir: workdir.into(),
            firmware,
            vars: None,
            memory_mib: 1024,
            cpus: 2,
            timeout: Duration::from_secs(600),
            drives: Vec::new(),
            nic: None,
            boot_nic: None,
            netns: None,
            extra: Vec::new(),
            stick_only_bootindex: false,
            screen: false,
        }
    }

    /// A person's NUC: the VGA display (kept by `-nographic`, which only hides its window) read
    /// with [`Vm::screendump`], a USB keyboard typed on with [`Vm::type_keys`], through the qemu
    /// monitor on a socket in the work dir.
    pub fn with_screen(mut self) -> Self {
        self.screen = true;
        self
    }

    /// The USB stick to boot from (qemu-xhci, usb-storage, bootindex=1).
    pub fn stick(mut self, path: impl Into<PathBuf>) -> Self {
        self.drives.push(Drive {
            path: path.into(),
            attach: Attach::Stick,
            faults: None,
            write_bps: None,
        });
        self
    }

    /// An NVMe disk with 512-byte sectors.
    pub fn nvme(mut self, path: impl Into<PathBuf>, serial: &str) -> Self {
        self.drives.push(Drive {
            path: path.into(),
            attach: Attach::Nvme {
                serial: serial.into(),
                four_k: false,
            },
            faults: None,
            write_bps: None,
        });
        self
    }

    /// An NVMe disk with 4096-byte logical and physical sectors (4Kn).
    pub fn nvme_4kn(mut self, path: impl Into<PathBuf>, serial: &str) -> Self {
        self.drives.push(Drive {
            path: path.into(),
            attach: Attach::Nvme {
                serial: serial.into(),
                four_k: true,
            },
            faults: None,
            write_bps: None,
        });
        self
    }

    /// An NVMe disk (512-byte sectors) that takes writes at `bps` bytes per second at most, so
    /// that a test can cut the power at a measured point of the stream.
    pub fn nvme_throttled(mut self, path: impl Into<PathBuf>, serial: &str, bps: u64) -> Self {
        self.drives.push(Drive {
            path: path.into(),
            attach: Attach::Nvme {
                serial: serial.into(),
                four_k: false,
            },
            faults: None,
            write_bps: Some(bps),
        });
        self
    }

    /// An NVMe disk (512-byte sectors) whose I/O fails where the qemu `blkdebug` rules file
    /// `rules` says (e.g. `[inject-error]` with `iotype = "write"`, `sector = "40960"`).
    pub fn nvme_with_faults(
        mut self,
        path: impl Into<PathBuf>,
        serial: &str,
        rules: impl Into<PathBuf>,
    ) -> Self {
        self.drives.push(Drive {
            path: path.into(),
            attach: Attach::Nvme {
                serial: serial.into(),
                four_k: false,
            },
            faults: Some(rules.into()),
            write_bps: None,
        });
        self
    }

    /// A SATA disk on the AHCI controller (up to six).
    pub fn sata(mut self, path: impl Into<PathBuf>, serial: &str) -> Self {
        self.drives.push(Drive {
            path: path.into(),
            attach: Attach::Sata {
                serial: serial.into(),
            },
            faults: None,
            write_bps: None,
        });
        self
    }

    /// Another USB disk (a USB SSD, a second stick) next to the boot stick.
    pub fn usb_disk(mut self, path: impl Into<PathBuf>, serial: &str) -> Self {
        self.drives.push(Drive {
            path: path.into(),
            attach: Attach::Usb {
                serial: serial.into(),
            },
            faults: None,
            write_bps: None,
        });
        self
    }

    /// Uses this VARS file as the starting variables instead of the firmware's template (it is
    /// still copied: the original is never modified).
    pub fn vars_from(mut self, path: impl Into<PathBuf>) -> Self {
        self.vars = Some(path.into());
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Hard limit of the whole run; qemu is killed after it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A network card with this MAC address (the seed's machines table is keyed by MACs). It
    /// uses qemu's user networking with `restrict=on`: the guest reaches nothing outside the VM.
    pub fn nic(mut self, mac: &str) -> Self {
        self.nic = Some(mac.to_string());
        self
    }

    /// A virtio NIC on the tap device `tap` with this MAC, first in the boot order, booting
    /// by UEFI HTTP boot: `romfile=` (empty) keeps qemu's iPXE ROM out, so OVMF's own network
    /// stack boots and shim verifies (with iPXE shim fails "Invalid Parameter"); PXE over IPv4
    /// and IPv6 are switched off through OVMF's fw_cfg knobs, so the firmware goes straight to
    /// HTTPv4 instead of minutes of PXE timeouts under TCG. Use with [`VmBuilder::netns`].
    pub fn http_boot_nic(mut self, tap: &str, mac: &str) -> Self {
        self.boot_nic = Some((tap.to_string(), mac.to_string(), false));
        self
    }

    /// Like [`VmBuilder::http_boot_nic`] with PXE left on: OVMF tries PXEv4 first, as firmware
    /// without HTTP boot does.
    pub fn pxe_boot_nic(mut self, tap: &str, mac: &str) -> Self {
        self.boot_nic = Some((tap.to_string(), mac.to_string(), true));
        self
    }

    /// Runs qemu inside the network namespace `name` (`ip netns exec`).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    /// Extra qemu arguments.
    /// Puts a `bootindex` on the stick only (see the field): the firmware prunes the boot
    /// entry the appliance makes for the installed disk.
    pub fn stick_only_bootindex(mut self) -> Self {
        self.stick_only_bootindex = true;
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// The qemu arguments (without the `timeout` wrapper), for logs and tests.
    pub fn qemu_args(&self, vars: &Path, serial_log: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        let machine = match self.firmware {
            Firmware::SecureBoot => "q35,smm=on",
            Firmware::NoSecureBoot => "q35",
        };
        push(&["-accel", "tcg", "-machine", machine]);
        if self.firmware == Firmware::SecureBoot {
            // Without a secure pflash, the OS could rewrite the Secure Boot variables.
            push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
        let mem = self.memory_mib.to_string();
        let cpus = self.cpus.to_string();
        push(&["-m", &mem, "-smp", &cpus]);
        if self.screen {
            let mon = format!(
                "unix:{},server=on,wait=off",
                self.workdir.join(MONITOR_SOCKET).display()
            );
            push(&["-nographic", "-no-reboot", "-monitor", &mon]);
        } else {
            push(&["-nographic", "-no-reboot", "-monitor", "none"]);
        }
        let nic = match &self.nic {
            Some(mac) => format!("user,restrict=on,model=virtio-net-pci,mac={mac}"),
            None => "none".to_string(),
        };
        push(&["-nic", &nic]);
        if let Some((tap, mac, pxe)) = &self.boot_nic {
            let netdev = format!("tap,id=net0,ifname={tap},script=no,downscript=no");
            let device = format!("virtio-net-pci,netdev=net0,mac={mac},romfile=,bootindex=1");
            push(&["-netdev", &netdev, "-device", &device]);
            if !pxe {
                push(&["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]);
            }
            push(&["-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=n"]);
        }
        let code = format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            self.firmware.code().display()
        );
        let vars = format!("if=pflash,format=raw,unit=1,file={}", vars.display());
        push(&["-drive", &code, "-drive", &vars]);
        // Serial on stdio (so tests can type into it), logged to a file they can read.
        let chardev = format!(
            "stdio,id=serial0,signal=off,logfile={}",
            serial_log.display()
        );
        push(&["-chardev", &chardev, "-serial", "chardev:serial0"]);
        let usb = self.screen
            || self
                .drives
                .iter()
                .any(|d| matches!(d.attach, Attach::Stick | Attach::Usb { .. }));
        if usb {
            push(&["-device", "qemu-xhci,id=xhci"]);
        }
        if self.screen {
            push(&["-device", "usb-kbd,bus=xhci.0"]);
        }
        if self
            .drives
            .iter()
            .any(|d| matches!(d.attach, Attach::Sata { .. }))
        {
            push(&["-device", "ahci,id=ahci"]);
        }
        let mut sata_port = 0;
        for (i, d) in self.drives.iter().enumerate() {
            let id = format!("drive{i}");
            let mut drive = match &d.faults {
                None => format!("if=none,id={id},format=raw,file={}", d.path.display()),
                Some(rules) => format!(
                    "if=none,id={id},driver=raw,file.driver=blkdebug,file.config={},file.image.driver=file,file.image.filename={}",
                    rules.display(),
                    d.path.display()
                ),
            };
            if let Some(bps) = d.write_bps {
                drive.push_str(&format!(",throttling.bps-write={bps}"));
            }
            push(&["-drive", &drive]);
            let device = match &d.attach {
                Attach::Stick => format!("usb-storage,bus=xhci.0,drive={id},bootindex=1"),
                Attach::Usb { serial } => {
                    format!("usb-storage,bus=xhci.0,drive={id},serial={serial}")
                }
                Attach::Nvme { serial, four_k } => {
                    // A bootindex on the internal disks too: with any bootindex set, OVMF
                    // rebuilds BootOrder from them each boot and drops Boot#### entries for
                    // devices without one — the entry the appliance makes for the installed
                    // disk would vanish before BootNext is read (docs/boot-order.md).
                    let mut s = format!("nvme,drive={id},serial={serial}");
                    if !self.stick_only_bootindex {
                        s.push_str(&format!(",bootindex={}", i + 2));
                    }
                    if *four_k {
                        s.push_str(",logical_block_size=4096,physical_block_size=4096");
                    }
                    s
                }
                Attach::Sata { serial } => {
                    let mut s = format!("ide-hd,bus=ahci.{sata_port},drive={id},serial={serial}");
                    if !self.stick_only_bootindex {
                        s.push_str(&format!(",bootindex={}", i + 2));
                    }
                    sata_port += 1;
                    s
                }
            };
            push(&["-device", &device]);
        }
        for e in &self.extra {
            push(&[e]);
        }
        a
    }

    /// Copies the firmware variables and starts qemu under `timeout`.
    pub fn start(self) -> Result<Vm, E2eError> {
        fs::create_dir_all(&self.workdir).map_err(|source| E2eError::Io {
            what: "creating",
            path: self.workdir.clone(),
            source,
        })?;
        for d in &self.drives {
            if !d.path.exists() {
                return Err(E2eError::Missing(format!(
                    "disk image {} does not exist",
                    d.path.display()
                )));
            }
        }
        let code = self.firmware.code();
        if !code.exists() {
            return Err(E2eError::Missing(format!(
                "{} is missing: install the ovmf package (scripts/deps)",
                code.display()
            )));
        }
        let template = self
            .vars
            .clone()
            .unwrap_or_else(|| self.firmware.vars_template());
        let vars = self.workdir.join("OVMF_VARS.fd");
        fs::copy(&template, &vars).map_err(|source| E2eError::Io {
            what: "copying firmware variables from",
            path: template.clone(),
            source,
        })?;
        let serial_log = self.workdir.join("serial.log");
        // qemu appends to its logfile: start from an empty one.
        File::create(&serial_log).map_err(|source| E2eError::Io {
            what: "creating",
            path: serial_log.clone(),
            source,
        })?;
        let stderr_path = self.workdir.join("qemu.stderr");
        let stderr = File::create(&stderr_path).map_err(|source| E2eError::Io {
            what: "creating",
            path: stderr_path.clone(),
            source,
        })?;
        let args = self.qemu_args(&vars, &serial_log);
        let _ = fs::write(
            self.workdir.join("qemu.cmdline"),
            format!("qemu-system-x86_64 {}\n", args.join(" ")),
        );
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "timeout"]);
                c
            }
            None => Command::new("timeout"),
        };
        let child = cmd
            .arg("--kill-after=10")
            .arg(format!("{}", self.timeout.as_secs().max(1)))
            .arg("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(E2eError::Spawn)?;
        let mut child = child;
        let stdin = child.stdin.take();
        Ok(Vm {
            child,
            stdin,
            serial_log,
            stderr_path,
            vars,
            monitor: self.screen.then(|| self.workdir.join(MONITOR_SOCKET)),
            started: Instant::now(),
            status: None,
        })
    }
}

/// A running (or finished) VM.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    serial_log: PathBuf,
    stderr_path: PathBuf,
    vars: PathBuf,
    /// The qemu monitor's socket, for VMs with a screen.
    monitor: Option<PathBuf>,
    started: Instant,
    status: Option<ExitStatus>,
}

impl Vm {
    /// Everything the serial console printed so far (lossy UTF-8).
    pub fn log(&self) -> String {
        fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn serial_log_path(&self) -> &Path {
        &self.serial_log
    }

    /// The VM's own copy of the firmware variables (read BootNext/BootOrder from it after the
    /// run).
    pub fn vars_path(&self) -> &Path {
        &self.vars
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(40)..].join("\n");
        if let Ok(err) = fs::read_to_string(&self.stderr_path) {
            if !err.trim().is_empty() {
                tail.push_str("\n--- qemu stderr ---\n");
                tail.push_str(err.trim());
            }
        }
        tail
    }

    /// Waits until the serial console has printed `pattern`. Fails early when the kernel
    /// panics or the VM exits, and after `timeout`.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<(), E2eError> {
        let start = Instant::now();
        let fail = |vm: &Self, reason| E2eError::Wait {
            pattern: pattern.to_owned(),
            reason,
            secs: start.elapsed().as_secs_f64(),
            tail: vm.tail(),
        };
        loop {
            let exited = self.poll_exit().is_some();
            // Read after polling: output written just before the exit is not missed.
            let log = self.log();
            if log.contains(pattern) {
                return Ok(());
            }
            if log.contains(KERNEL_PANIC) {
                return Err(fail(self, "the kernel panicked"));
            }
            if exited {
                return Err(fail(self, "the VM exited"));
            }
            if start.elapsed() >= timeout {
                return Err(fail(self, "timed out"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types `text` into the serial console.
    pub fn send(&mut self, text: &str) -> Result<(), E2eError> {
        let io = |source| E2eError::Io {
            what: "writing to the serial console of",
            path: self.serial_log.clone(),
            source,
        };
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| E2eError::Missing("the VM's stdin is closed".into()))?;
        stdin.write_all(text.as_bytes()).map_err(io)?;
        stdin.flush().map_err(io)
    }

    /// Runs a qemu monitor command and returns its output.
    pub fn monitor(&mut self, command: &str) -> Result<String, E2eError> {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let path = self
            .monitor
            .clone()
            .ok_or_else(|| E2eError::Missing("the VM has no monitor (with_screen)".into()))?;
        let io = |source| E2eError::Io {
            what: "talking to the qemu monitor at",
            path: path.clone(),
            source,
        };
        let mut sock = UnixStream::connect(&path).map_err(io)?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        // The greeting ends with the first prompt; the command's output with the next one.
        let read_prompt = |sock: &mut UnixStream| -> Result<String, E2eError> {
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            while !got.ends_with(b"(qemu) ") {
                let n = sock.read(&mut b).map_err(io)?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&b[..n]);
            }
            Ok(String::from_utf8_lossy(&got).into_owned())
        };
        read_prompt(&mut sock)?;
        sock.write_all(format!("{command}\n").as_bytes())
            .map_err(io)?;
        read_prompt(&mut sock)
    }

    /// Saves what the VM's monitor shows to `path` (PPM).
    pub fn screendump(&mut self, path: &Path) -> Result<(), E2eError> {
        let _ = fs::remove_file(path);
        self.monitor(&format!("screendump {}", path.display()))?;
        // qemu writes the file before it answers; a missing one means the dump failed.
        if !path.is_file() {
            return Err(E2eError::Missing(format!(
                "screendump wrote no {}",
                path.display()
            )));
        }
        Ok(())
    }

    /// Saves what the VM's monitor shows to `path` as PNG.
    pub fn screendump_png(&mut self, path: &Path) -> Result<(), E2eError> {
        let _ = fs::remove_file(path);
        self.monitor(&format!("screendump {} -f png", path.display()))?;
        if !path.is_file() {
            return Err(E2eError::Missing(format!(
                "screendump wrote no {}",
                path.display()
            )));
        }
        Ok(())
    }

    /// Types `text` on the VM's USB keyboard (`sendkey`): lower-case letters, digits, space
    /// and `\n` (Enter).
    pub fn type_keys(&mut self, text: &str) -> Result<(), E2eError> {
        for c in text.chars() {
            let key = match c {
                '\n' => "ret".to_string(),
                ' ' => "spc".to_string(),
                c if c.is_ascii_lowercase() || c.is_ascii_digit() => c.to_string(),
                c => return Err(E2eError::Missing(format!("no key for {c:?}"))),
            };
            self.monitor(&format!("sendkey {key}"))?;
            std::thread::sleep(Duration::from_millis(150));
        }
        Ok(())
    }

    /// Waits for qemu to exit (the guest powered off; `-no-reboot` turns a reboot into an exit
    /// too).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, E2eError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.poll_exit() {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                return Err(E2eError::Wait {
                    pattern: "<qemu exit>".into(),
                    reason: "timed out",
                    secs: start.elapsed().as_secs_f64(),
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether qemu is still running (the guest neither powered off nor rebooted).
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Stops the VM now.
    pub fn kill(&mut self) {
        if self.poll_exit().is_none() {
            // The child is `timeout`, which runs qemu in a process group of its own (pgid = its
            // pid). Killing `timeout` alone would orphan qemu — running until the machine stops —
            // so kill the whole group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One row of the appliance's disk table, as printed on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRow {
    pub name: String,
    pub transport: String,
    pub line: String,
}

/// Parses the disk table the placeholder PID 1 prints between `imprint: disks:` and the marker.
pub fn parse_disk_table(log: &str) -> Vec<DiskRow> {
    let mut rows = Vec::new();
    let mut inside = false;
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if line.contains("imprint: disks:") {
            inside = true;
            rows.clear();
            continue;
        }
        if !inside {
            continue;
        }
        let Some(row) = line.strip_prefix("  ") else {
            inside = false;
            continue;
        };
        let fields: Vec<&str> = row.split_whitespace().collect();
        if fields.first() == Some(&"NAME") || fields.len() < 4 {
            continue;
        }
        // NAME, size value, size unit, TRANSPORT, ...
        rows.push(DiskRow {
            name: fields[0].to_owned(),
            transport: fields[3].to_owned(),
            line: row.to_owned(),
        });
    }
    rows
}

/// Byte offset of the ESP in sticks made by `imprint build` (first partition at 1 MiB).
pub const STICK_ESP_OFFSET: u64 = 1 << 20;

/// Appends kernel arguments (e.g. `imprint.probe`) to the `linux` line of a built stick's
/// grub.cfg, with mtools on the stick's ESP: tests change what the appliance does without a
/// special build.
pub fn add_kernel_args(stick: &Path, args: &str) -> Result<(), E2eError> {
    let image = format!("{}@@{STICK_ESP_OFFSET}", stick.display());
    let cfg = "::EFI/debian/grub.cfg";
    let text = run(Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &image, cfg]))?;
    let mut changed = false;
    let patched: String = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("linux ") {
                changed = true;
                format!("{line} {args}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    if !changed {
        return Err(E2eError::Missing(format!(
            "no linux line in {cfg} of {}",
            stick.display()
        )));
    }
    let tmp = stick.with_extension("grub.cfg");
    fs::write(&tmp, patched).map_err(|source| E2eError::Io {
        what: "writing",
        path: tmp.clone(),
        source,
    })?;
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-o", "-i", &image])
        .arg(&tmp)
        .arg(cfg))?;
    let _ = fs::remove_file(&tmp);
    Ok(())
}

/// Copies a file (e.g. a stick image) so a test can modify its copy.
pub fn copy(from: &Path, to: &Path) -> Result<(), E2eError> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|source| E2eError::Io {
            what: "copying",
            path: from.to_owned(),
            source,
        })
}

/// Checks what the appliance left in the firmware's variable store `vars` (an OVMF VARS file
/// after the VM stopped) against the install's report: `BootNext` is the reported entry, that
/// `Boot####` boots the reported partition (number and GUID) of the installed disk through
/// the reported loader under the reported description, and `BootOrder` lists it at the
/// reported position. `Err` says what differs.
pub fn check_next_boot(vars: &Path, report: &serde_json::Value) -> Result<(), String> {
    let nb = &report["next_boot"];
    if nb["set"] != true {
        return Err(format!("the report says no boot entry was set: {nb}"));
    }
    let name = nb["boot_entry"]
        .as_str()
        .ok_or("no boot_entry in the report")?;
    let num = name
        .strip_prefix("Boot")
        .and_then(|n| u16::from_str_radix(n, 16).ok())
        .ok_or_else(|| format!("boot_entry {name:?} is not Boot####"))?;
    let store = ovmf_vars::read(vars).map_err(|e| e.to_string())?;
    if store.boot_next() != Some(num) {
        return Err(format!(
            "BootNext is {:?}, the report says {name}",
            store.boot_next()
        ));
    }
    let data = store
        .boot_entry(num)
        .ok_or_else(|| format!("{name} is not in the variable store"))?;
    let opt = ovmf_vars::load_option(data).map_err(|e| e.to_string())?;
    let want = |k: &str| nb[k].as_str().map(str::to_ascii_lowercase);
    let checks = [
        (
            "description",
            Some(opt.description.to_ascii_lowercase()),
            want("description"),
        ),
        (
            "partition GUID",
            opt.partition_guid.clone(),
            want("esp_partuuid"),
        ),
        (
            "loader",
            opt.file_path.as_deref().map(str::to_ascii_lowercase),
            want("loader"),
        ),
        (
            "partition number",
            opt.partition.map(|p| p.to_string()),
            nb["esp_partition"].as_u64().map(|p| p.to_string()),
        ),
    ];
    for (what, got, expected) in checks {
        if got.is_none() || got != expected {
            return Err(format!(
                "{name}: {what} is {got:?}, the report says {expected:?}"
            ));
        }
    }
    if opt.attributes & 1 == 0 {
        return Err(format!("{name} is not active"));
    }
    let order = store.boot_order().unwrap_or_default();
    let pos = order
        .iter()
        .position(|&n| n == num)
        .ok_or_else(|| format!("BootOrder {order:04X?} does not list {name}"))?;
    let said = nb["boot_order"].as_str().unwrap_or_default();
    // The report counts positions from 1, like a boot menu.
    if !said.contains(&format!("position {}", pos + 1)) {
        return Err(format!(
            "{name} is at position {} of BootOrder {order:04X?}; the report says {said:?}",
            pos + 1
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn check_next_boot_holds_the_firmware_to_the_report() {
        use ovmf_vars::tests::{load_option_bytes, synthetic_store, GUID};
        use ovmf_vars::VAR_ADDED;
        let loader = "\\EFI\\BOOT\\BOOTX64.EFI";
        let entry = load_option_bytes("imprint: QEMU NVMe Ctrl NVME0001", 1, GUID, loader);
        let report = serde_json::json!({ "next_boot": {
            "set": true, "boot_entry": "Boot0003", "description": "imprint: QEMU NVMe Ctrl NVME0001",
            "esp_partition": 1, "esp_partuuid": "12345678-AAAA-BBBB-CCCC-1234567890AB",
            "loader": loader, "boot_order": "added to BootOrder at position 2" } });
        let t = tempfile::tempdir().unwrap();
        let check = |vars: &[(&str, u8, &[u8])], report: &serde_json::Value| {
            let path = t.path().join("vars.fd");
            std::fs::write(&path, synthetic_store(vars)).unwrap();
            check_next_boot(&path, report)
        };
        let order: &[u8] = &[1, 0, 3, 0];
        let good = [
            ("BootNext", VAR_ADDED, &[3u8, 0][..]),
            ("Boot0003", VAR_ADDED, &entry[..]),
            ("BootOrder", VAR_ADDED, order),
        ];
        check(&good, &report).unwrap();
        // Each way the firmware can disagree with the report is caught.
        let mut no_next = good;
        no_next[0].2 = &[4, 0];
        assert!(check(&no_next, &report).unwrap_err().contains("BootNext"));
        let other_guid = load_option_bytes("imprint: QEMU NVMe Ctrl NVME0001", 1, [7; 16], loader);
        let mut wrong_disk = good;
        wrong_disk[1].2 = &other_guid;
        assert!(check(&wrong_disk, &report)
            .unwrap_err()
            .contains("partition GUID"));
        let mut not_listed = good;
        not_listed[2].2 = &[1, 0];
        assert!(check(&not_listed, &report)
            .unwrap_err()
            .contains("does not list"));
        let mut first = good;
        first[2].2 = &[3, 0, 1, 0];
        assert!(check(&first, &report)
            .unwrap_err()
            .contains("is at position 1"));
        let mut unset = report.clone();
        unset["next_boot"]["set"] = false.into();
        assert!(check(&good, &unset).is_err());
    }

    #[test]
    fn qemu_args_attach_every_drive_where_asked() {
        let b = VmBuilder::new("/w", Firmware::SecureBoot)
            .stick("/s.img")
            .nvme("/n.img", "N1")
            .nvme_4kn("/n4.img", "N4")
            .sata("/a.img", "A1")
            .sata("/b.img", "B1")
            .usb_disk("/u.img", "U1");
        let args = b
            .qemu_args(Path::new("/w/VARS.fd"), Path::new("/w/serial.log"))
            .join(" ");
        for want in [
            "-accel tcg -machine q35,smm=on",
            "-global driver=cfi.pflash01,property=secure,value=on",
            "file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
            "if=pflash,format=raw,unit=1,file=/w/VARS.fd",
            "-nographic -no-reboot -monitor none -nic none",
            "logfile=/w/serial.log",
            "-device qemu-xhci,id=xhci",
            "usb-storage,bus=xhci.0,drive=drive0,bootindex=1",
            "nvme,drive=drive1,serial=N1,bootindex=3 ",
            "nvme,drive=drive2,serial=N4,bootindex=4,logical_block_size=4096,physical_block_size=4096",
            "-device ahci,id=ahci",
            "ide-hd,bus=ahci.0,drive=drive3,serial=A1,bootindex=5",
            "ide-hd,bus=ahci.1,drive=drive4,serial=B1",
            "usb-storage,bus=xhci.0,drive=drive5,serial=U1",
            "if=none,id=drive0,format=raw,file=/s.img",
        ] {
            assert!(args.contains(want), "{want:?} not in {args}");
        }
        let off = VmBuilder::new("/w", Firmware::NoSecureBoot)
            .qemu_args(Path::new("/v"), Path::new("/l"))
            .join(" ");
        assert!(off.contains("-machine q35 ") && off.contains("OVMF_CODE_4M.fd"));
        assert!(!off.contains("secure,value=on") && !off.contains("ahci"));
        let nic = VmBuilder::new("/w", Firmware::NoSecureBoot)
            .nic("52:54:00:12:34:56")
            .qemu_args(Path::new("/v"), Path::new("/l"))
            .join(" ");
        assert!(
            nic.contains("-nic user,restrict=on,model=virtio-net-pci,mac=52:54:00:12:34:56"),
            "{nic}"
        );
    }

    #[test]
    fn disk_table_is_parsed_from_the_console() {
        let log = "noise\r\nimprint: disks:\r\n  NAME          SIZE BUS    MODEL            SERIAL               DATA\r\n  nvme0n1    1.0 GiB nvme   QEMU NVMe Ctrl   NVME0001             no\r\n  sdb       47.0 MiB usb    QEMU HARDDISK    1-0000:00:02.0-1     imprint stick\r\nIMPRINT-BOOT-OK\r\n";
        let rows = parse_disk_table(log);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].name.as_str(), rows[0].transport.as_str()),
            ("nvme0n1", "nvme")
        );
        assert_eq!(
            (rows[1].name.as_str(), rows[1].transport.as_str()),
            ("sdb", "usb")
        );
        assert!(rows[1].line.ends_with("imprint stick"));
    }

    #[test]
    fn wait_for_reports_an_early_exit_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        fs::write(&log, "booting\n").unwrap();
        let child = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
        let mut vm = Vm {
            child,
            stdin: None,
            serial_log: log.clone(),
            stderr_path: dir.path().join("none"),
            vars: dir.path().join("vars"),
            monitor: None,
            started: Instant::now(),
            status: None,
        };
        let err = vm.wait_for("NEVER", Duration::from_secs(10)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("the VM exited") && text.contains("booting"),
            "{text}"
        );
        fs::write(
            &log,
            "x\nKernel panic - not syncing: Attempted to kill init!\n",
        )
        .unwrap();
        assert!(vm
            .wait_for("NEVER", Duration::from_secs(10))
            .unwrap_err()
            .to_string()
            .contains("panicked"));
        vm.wait_for("Attempted", Duration::from_secs(1)).unwrap();
    }
}
