//! The install flow against fake `/sys`, `/proc` and `/dev` trees: the machine is a fake
//! sysfs (disks, NICs, DMI), its disks are files under the fake `/dev`, the serial console is
//! a file (or a pseudo-terminal where a person answers). Every scenario runs the real flow —
//! discovery, target policy, the write engine, the seed, the stick's records — and asserts the
//! disks' bytes, the report and what the console said.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imprint_core::blockdev::{OpenOptionsTarget, Target};
use imprint_core::config::Config;
use imprint_core::gpt_table::GptTable;
use imprint_core::manifest::{self, Image, PackOptions};
use imprint_core::progress::NoProgress;
use imprint_core::report::{Report, Status};
use imprint_core::stick::{PAYLOAD_TYPE_GUID, REPORTS_DIR, SEED_DIR};
use imprint_core::test_util::{with_gpt, FakeDisk, FakeSys};
use imprint_core::verify::verify_image;
use sha2::{Digest, Sha256};

use super::{install, Ending};
use crate::boot::{BootEnv, Cmdline, Roots};
use crate::console::Consoles;
use crate::esp::EspPartition;
use crate::handover::PROVISIONED_CFG;
use crate::medium::Medium;

const MIB: u64 = 1 << 20;
/// The target disks' size: the 16 MiB image and its 8 MiB seed partition fit.
const DISK: u64 = 64 * MIB;
const IMAGE: u64 = 16 * MIB;
const MAC: &str = "52:54:00:f1:00:01";

/// A machine: fake roots, a stick (its disk, payload partition and mounted ESP folder) and
/// the disks added by each test.
struct Machine {
    sys: FakeSys,
    stick: tempfile::TempDir,
    image: PathBuf,
    /// What early boot reported as still appearing when it gave up waiting.
    pending: Vec<String>,
}

impl Machine {
    fn new() -> Machine {
        let sys = FakeSys::new();
        let m = Machine {
            sys,
            stick: tempfile::tempdir().unwrap(),
            image: PathBuf::new(),
            pending: Vec::new(),
        };
        for d in ["proc", "dev"] {
            fs::create_dir_all(m.sys.dir.path().join(d)).unwrap();
        }
        // The serial console, where the kernel's console list says it is.
        write(&m.root().sys.join("class/tty/console/active"), "ttyS0\n");
        // DMI and one physical NIC.
        let s = m.root().sys;
        write(
            &s.join("class/dmi/id/sys_vendor"),
            "Intel(R) Client Systems\n",
        );
        write(&s.join("class/dmi/id/product_name"), "NUC11TNHi5\n");
        write(&s.join("class/dmi/id/product_serial"), "G6FLOW0001\n");
        let nic = s.join("devices/pci0000:00/0000:00:1f.6/net/eno1");
        write(&nic.join("address"), &format!("{MAC}\n"));
        symlink(nic.parent().unwrap().parent().unwrap(), nic.join("device")).unwrap();
        fs::create_dir_all(s.join("class/net")).unwrap();
        symlink(&nic, s.join("class/net/eno1")).unwrap();
        m
    }

    fn root(&self) -> Roots {
        let d = self.sys.dir.path();
        Roots {
            sys: self.sys.root(),
            ..Roots::under(d)
        }
    }

    fn dev(&self, name: &str) -> PathBuf {
        self.root().dev.join(name)
    }

    /// The stick `sdb` (USB, removable) holding `image` in its payload partition, and its
    /// ESP folder with `seed`.
    fn with_stick(mut self, seed_meta: &str) -> Machine {
        let raw = os_image();
        let img = self.sys.dir.path().join("os.img.zst");
        manifest::pack(
            &mut &raw[..],
            &img,
            &PackOptions {
                name: "flow-os".into(),
                level: 3,
                threads: 0,
                chunk_size: MIB,
                frame_size: Some(MIB),
            },
            &mut |_| {},
        )
        .unwrap();
        self.sys.add(
            &FakeDisk::usb("sdb", 1, "STICK0001", true)
                .with_partition(1, Some("IMPRINT"))
                .with_partition(2, None),
        );
        fs::write(self.dev("sdb"), stick_table()).unwrap();
        fs::copy(&img, self.dev("sdb2")).unwrap();
        self.image = img;
        let seed = self.stick.path().join(SEED_DIR);
        fs::create_dir_all(&seed).unwrap();
        fs::write(
            seed.join("user-data"),
            "#cloud-config\nusers:\n  - name: ops\n    passwd: $6$SECRETSALT$SECRETHASH\n",
        )
        .unwrap();
        fs::write(seed.join("meta-data"), seed_meta).unwrap();
        self
    }

    /// An internal NVMe disk that holds old data (a filled first MiB).
    fn with_nvme(self, n: u32, serial: &str) -> Machine {
        self.sys.add(&FakeDisk::nvme(n, 1, serial).with_bytes(DISK));
        old_disk(&self.dev(&format!("nvme{n}n1")));
        self
    }

    fn env(&self) -> BootEnv {
        BootEnv {
            cmdline: Cmdline::default(),
            kernel_release: "6.1.0-test".into(),
            modules_loaded: Vec::new(),
            module_failures: Vec::new(),
            efivars: false,
            esp: Some(EspPartition {
                partition: "sdb1".into(),
                disk: "sdb".into(),
            }),
            roots: self.root(),
            settled: self.pending.is_empty(),
            pending: self.pending.clone(),
            started: std::time::Instant::now(),
            kernel_uptime: None,
            modules_done: Duration::ZERO,
            coldplug: Default::default(),
            elapsed: Duration::ZERO,
        }
    }

    /// Runs the flow once as install `id` (ids sort in run order) with nobody answering, and
    /// saves its report on the stick as PID 1 does; returns the ending, the report and what
    /// the serial console showed.
    fn run(&self, id: &str, config: &str) -> (Result<Ending, String>, Report, String) {
        self.run_answering(id, config, None)
    }

    /// [`Machine::run`] with a person at the serial console who types `reply` once `prompt`
    /// is on the screen.
    fn run_answering(
        &self,
        id: &str,
        config: &str,
        person: Option<(&'static str, &'static str)>,
    ) -> (Result<Ending, String>, Report, String) {
        let serial = Serial::attach(&self.dev("ttyS0"), person);
        let env = self.env();
        let mut consoles = Consoles::open(&env.roots.sys, &env.roots.dev);
        assert_eq!(consoles.active(), ["ttyS0"], "the fake serial console");
        let config = Config::from_json(config).unwrap();
        let mut rep = Report::new(id);
        let medium = Medium::Folder(self.stick.path().to_path_buf());
        let ending =
            install(&env, &mut consoles, &medium, &config, &mut rep).map_err(|e| format!("{e:#}"));
        drop(consoles);
        rep.save(&self.stick.path().join(REPORTS_DIR)).unwrap();
        let said = serial.finish().replace("\r\n", "\n");
        assert!(
            !said.contains("SECRET"),
            "a user-data secret on the console"
        );
        (ending, rep, said)
    }

    /// Whether the disk at `dev` holds the image, as `imprint verify` proves it.
    fn holds_image(&self, dev: &Path) -> bool {
        let image = Image::open(&self.image).unwrap();
        let target = Target::open(
            dev,
            &OpenOptionsTarget {
                read_only: true,
                sys_root: self.root().sys,
                ..Default::default()
            },
        )
        .unwrap();
        verify_image(&image, &target, &NoProgress).is_ok()
    }
}

/// The serial console: a pseudo-terminal whose far end is the test — reading everything
/// shown, and typing an answer when asked.
struct Serial {
    slave: std::os::fd::OwnedFd,
    reader: std::thread::JoinHandle<String>,
}

impl Serial {
    fn attach(at: &Path, person: Option<(&'static str, &'static str)>) -> Serial {
        let pty = nix::pty::openpty(None, None).unwrap();
        let name = nix::unistd::ttyname(&pty.slave).unwrap();
        let _ = fs::remove_file(at);
        symlink(&name, at).unwrap();
        let mut master = File::from(pty.master);
        let reader = std::thread::spawn(move || {
            let (mut seen, mut buf, mut asked) = (Vec::new(), [0u8; 4096], person);
            // Until every holder of the terminal's other end has closed it (EIO).
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if let Some((prompt, reply)) = asked {
                    if String::from_utf8_lossy(&seen).contains(prompt) {
                        master.write_all(reply.as_bytes()).unwrap();
                        asked = None;
                    }
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        Serial {
            slave: pty.slave,
            reader,
        }
    }

    /// Everything the console showed (call once the flow has closed its consoles).
    fn finish(self) -> String {
        drop(self.slave);
        self.reader.join().unwrap()
    }
}

fn write(p: &Path, s: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, s).unwrap();
}

fn sha(p: &Path) -> String {
    manifest::hex(&Sha256::digest(fs::read(p).unwrap()))
}

/// A disk file of [`DISK`] bytes whose first MiB and last MiB hold old data.
fn old_disk(p: &Path) {
    let mut f = File::create(p).unwrap();
    f.set_len(DISK).unwrap();
    f.write_all(&[0xA5; MIB as usize]).unwrap();
    f.seek(SeekFrom::Start(DISK - MIB)).unwrap();
    f.write_all(&[0x5A; MIB as usize]).unwrap();
}

/// The OS image: a GPT with an EFI System Partition (FAT, holding the removable-media
/// loader, so the stick can hand over to it) and a root partition of patterned bytes.
fn os_image() -> Vec<u8> {
    let mut parts = BTreeMap::new();
    let disk_guid = Some(uuid::Uuid::from_u128(0xF10));
    let mut raw = with_gpt(vec![0u8; IMAGE as usize], 512, disk_guid, |g| {
        g.add_partition("EFI", 4 * MIB, gpt::partition_types::EFI, 0, None)
            .unwrap();
        g.add_partition("root", 8 * MIB, gpt::partition_types::LINUX_FS, 0, None)
            .unwrap();
        parts = g.partitions().clone();
    });
    let (esp, root) = (&parts[&1], &parts[&2]);
    // The ESP: a FAT with /EFI/BOOT/BOOTX64.EFI.
    let mut fat = Cursor::new(vec![
        0u8;
        ((esp.last_lba + 1 - esp.first_lba) * 512) as usize
    ]);
    fatfs::format_volume(
        &mut fat,
        fatfs::FormatVolumeOptions::new().volume_id(0x1234_ABCD),
    )
    .unwrap();
    {
        let fs = fatfs::FileSystem::new(&mut fat, fatfs::FsOptions::new()).unwrap();
        let dir = fs.root_dir().create_dir("EFI").unwrap();
        let dir = dir.create_dir("BOOT").unwrap();
        dir.create_file("BOOTX64.EFI")
            .unwrap()
            .write_all(b"MZ a loader")
            .unwrap();
    }
    let at = (esp.first_lba * 512) as usize;
    let fat = fat.into_inner();
    raw[at..at + fat.len()].copy_from_slice(&fat);
    let at = (root.first_lba * 512) as usize;
    for (i, b) in raw[at..at + (4 * MIB) as usize].iter_mut().enumerate() {
        *b = (i % 251) as u8 ^ 0x3C;
    }
    raw
}

/// The stick's partition table: 1 = its ESP, 2 = the payload (imprint's type GUID).
fn stick_table() -> Vec<u8> {
    let payload = gpt::partition_types::Type {
        guid: PAYLOAD_TYPE_GUID.parse().unwrap(),
        os: gpt::partition_types::OperatingSystem::None,
    };
    with_gpt(vec![0u8; (8 * MIB) as usize], 512, None, |g| {
        g.add_partition("IMPRINT", 2 * MIB, gpt::partition_types::EFI, 0, None)
            .unwrap();
        g.add_partition("payload", 4 * MIB, payload, 0, None)
            .unwrap();
    })
}

/// `meta-data` from the CIDATA partition of the disk at `dev`.
fn cidata_meta(dev: &Path) -> String {
    let table = GptTable::read(&mut File::open(dev).unwrap(), 512).unwrap();
    let (_, p) = table.find_by_name("CIDATA").expect("a CIDATA partition");
    let mut f = File::open(dev).unwrap();
    let mut fat = vec![0u8; ((p.last_lba + 1 - p.first_lba) * 512) as usize];
    f.seek(SeekFrom::Start(p.first_lba * 512)).unwrap();
    f.read_exact(&mut fat).unwrap();
    let fs = fatfs::FileSystem::new(Cursor::new(fat), fatfs::FsOptions::new()).unwrap();
    let mut s = String::new();
    fs.root_dir()
        .open_file("meta-data")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s
}

const UNATTENDED: &str = r#"{ "confirm": "never" }"#;

#[test]
fn installs_on_the_internal_disk_and_never_on_the_stick_or_a_usb_disk() {
    let m = Machine::new()
        .with_stick("local-hostname: flow-7\n")
        .with_nvme(0, "NVME-FLOW-1");
    // A USB SSD next to the internal disk: never a candidate.
    m.sys
        .add(&FakeDisk::usb("sdc", 1, "USBSSD1", false).with_bytes(DISK));
    old_disk(&m.dev("sdc"));
    let (usb, stick) = (sha(&m.dev("sdc")), sha(&m.dev("sdb")));

    let (ending, rep, said) = m.run("20261201-000001-aaaa", UNATTENDED);
    assert!(
        matches!(ending, Ok(Ending::Provisioned)),
        "{ending:?}\n{said}"
    );
    assert_eq!(rep.status, Status::Installed);
    assert_eq!(
        rep.selection.as_ref().unwrap().chosen.as_deref(),
        Some("nvme0n1")
    );
    assert!(said.contains("imprint: target nvme0n1"), "{said}");
    assert!(
        said.contains("not sdc: "),
        "the USB disk is named as refused: {said}"
    );
    // The disks' bytes: the image (verified as `imprint verify` does, seed partition and
    // all), the seed with its hostname; the USB disk and the stick untouched.
    let nvme = m.dev("nvme0n1");
    assert!(m.holds_image(&nvme));
    assert_eq!(fs::metadata(&nvme).unwrap().len(), DISK);
    let meta = cidata_meta(&nvme);
    let seed = &rep.seed.as_ref().unwrap().summary;
    assert_eq!(seed.hostname, "flow-7");
    assert_eq!(
        seed.hostname_source,
        imprint_core::seed::HostnameSource::SeedMetaData
    );
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["local-hostname"], "flow-7");
    // The key paths `imprint reports` reads, and the report read back as the next boot does.
    let saved: Report = serde_json::from_value(serde_json::to_value(&rep).unwrap()).unwrap();
    let v = serde_json::to_value(&saved).unwrap();
    assert_eq!(v["seed"]["summary"]["hostname"], "flow-7");
    assert_eq!(v["seed"]["placement"]["placement"], "cidata-partition");
    assert_eq!(v["write"]["verified"], true);
    assert_eq!(saved.write.as_ref().unwrap().raw_size, IMAGE);
    // Time to first byte, by phase: counted from PID 1's start (here: the test's BootEnv).
    let phases = saved.phases.as_ref().unwrap();
    let first_byte = saved.write.as_ref().unwrap().first_byte_seconds;
    let (medium, choose, first_write) = (
        phases.medium_seconds.unwrap(),
        phases.choose_seconds.unwrap(),
        phases.first_write_seconds.unwrap(),
    );
    assert!(first_byte > 0.0 && first_write > 0.0, "{phases:?}");
    assert!(
        (medium + choose + first_write - first_byte).abs() < 0.01,
        "the phases add up to the first byte: {phases:?}, {first_byte}"
    );
    assert!(said.contains("imprint: first byte "), "{said}");
    assert_eq!(sha(&m.dev("sdc")), usb, "the USB disk is untouched");
    assert_eq!(sha(&m.dev("sdb")), stick, "the stick's disk is untouched");
    // The stick records the install for its GRUB: the seed volume and the installed ESP.
    let cfg = fs::read_to_string(m.stick.path().join(PROVISIONED_CFG)).unwrap();
    assert!(
        cfg.contains("--fs-uuid --set=imprint_esp 1234-ABCD"),
        "{cfg}"
    );
    assert_eq!(
        rep.next_boot.as_ref().unwrap().stick_handover.as_deref(),
        cfg.split("--set=imprint_seed ")
            .nth(1)
            .and_then(|s| s.split(';').next())
    );
}

#[test]
fn the_next_boot_does_not_reinstall_and_the_one_after_stops_instead_of_looping() {
    let m = Machine::new()
        .with_stick("local-hostname: flow-8\n")
        .with_nvme(0, "NVME-FLOW-2");
    let (ending, rep, _) = m.run("20261201-000001-aaaa", UNATTENDED);
    assert!(matches!(ending, Ok(Ending::Provisioned)));
    assert_eq!(rep.status, Status::Installed);
    let nvme = m.dev("nvme0n1");
    let installed = sha(&nvme);

    // The firmware boots the stick again: the disk holds this image from this stick's
    // install, so nothing is written and the machine is handed to its disk.
    let (ending, rep, said) = m.run("20261201-000002-aaaa", UNATTENDED);
    assert!(matches!(ending, Ok(Ending::Provisioned)), "{said}");
    assert_eq!(rep.status, Status::AlreadyInstalled);
    assert!(said.contains("already holds flow-os"), "{said}");
    assert_eq!(sha(&nvme), installed, "not rewritten");

    // And once more: the handover did not take. One extra pass at most — it stops.
    let (ending, rep, said) = m.run("20261201-000003-aaaa", UNATTENDED);
    assert!(matches!(ending, Ok(Ending::Stopped)), "{said}");
    assert_eq!(rep.status, Status::AlreadyInstalled);
    assert_eq!(
        rep.next_boot.as_ref().unwrap().why.as_deref(),
        Some("handed over once already; not looping")
    );
    assert!(
        said.contains("stopping instead of rebooting again"),
        "{said}"
    );
    assert_eq!(sha(&nvme), installed, "not rewritten");

    // With `reinstall: true` the same disk is written again.
    let (ending, rep, _) = m.run(
        "20261201-000004-aaaa",
        r#"{ "confirm": "never", "reinstall": true }"#,
    );
    assert!(matches!(ending, Ok(Ending::Provisioned)));
    assert_eq!(rep.status, Status::Installed);
    assert!(m.holds_image(&nvme));
}

#[test]
fn two_equal_disks_and_nobody_to_ask_write_nothing() {
    let m = Machine::new()
        .with_stick("local-hostname: flow-9\n")
        .with_nvme(0, "NVME-A")
        .with_nvme(1, "NVME-B");
    let (a, b) = (sha(&m.dev("nvme0n1")), sha(&m.dev("nvme1n1")));
    // No console to ask on (`imprint.prompt=` names none): nobody can answer.
    fs::write(m.root().proc.join("cmdline"), "imprint.prompt=\n").unwrap();
    let (ending, rep, said) = m.run("20261201-000001-aaaa", UNATTENDED);
    assert!(matches!(ending, Ok(Ending::Stopped)), "{said}");
    assert_eq!(rep.status, Status::Declined);
    assert!(said.contains("imprint: ambiguous:"), "{said}");
    assert!(said.contains("no disk chosen; stopping"), "{said}");
    assert_eq!(sha(&m.dev("nvme0n1")), a);
    assert_eq!(sha(&m.dev("nvme1n1")), b);
}

#[test]
fn the_disk_a_person_picks_on_the_serial_console_is_the_one_written() {
    let m = Machine::new()
        .with_stick("local-hostname: flow-10\n")
        .with_nvme(0, "NVME-A")
        .with_nvme(1, "NVME-B");
    let a = sha(&m.dev("nvme0n1"));
    let (ending, rep, said) = m.run_answering(
        "20261201-000001-aaaa",
        UNATTENDED,
        Some(("Type a number and Enter", "2\n")),
    );
    assert!(
        matches!(ending, Ok(Ending::Provisioned)),
        "{ending:?}\n{said}"
    );
    assert!(
        said.contains("Which disk should imprint overwrite?"),
        "{said}"
    );
    assert!(said.contains("2) nvme1n1"), "{said}");
    assert_eq!(rep.status, Status::Installed);
    assert_eq!(
        rep.selection.as_ref().unwrap().chosen.as_deref(),
        Some("nvme1n1")
    );
    assert!(m.holds_image(&m.dev("nvme1n1")));
    assert_eq!(
        sha(&m.dev("nvme0n1")),
        a,
        "the disk not picked is untouched"
    );
}

#[test]
fn a_strict_fleet_never_writes_a_machine_its_table_lacks() {
    let m = Machine::new()
        .with_stick("local-hostname: flow-11\n")
        .with_nvme(0, "NVME-FLOW-3");
    let before = sha(&m.dev("nvme0n1"));
    let (ending, rep, said) = m.run(
        "20261201-000001-aaaa",
        r#"{ "confirm": "never", "unknown_machines": "refuse",
             "seed": { "machines": [ { "mac": "52:54:00:00:00:99", "hostname": "other" } ] } }"#,
    );
    assert!(matches!(ending, Ok(Ending::Stopped)), "{ending:?}\n{said}");
    assert_eq!(rep.status, Status::Declined);
    assert!(
        said.contains(MAC) || said.contains("G6FLOW0001"),
        "names the machine: {said}"
    );
    assert!(rep.disks.is_none(), "stopped before any disk was looked at");
    assert_eq!(sha(&m.dev("nvme0n1")), before);
}

#[test]
fn a_disk_too_small_for_the_image_is_refused_untouched() {
    let m = Machine::new().with_stick("local-hostname: flow-12\n");
    m.sys
        .add(&FakeDisk::nvme(0, 1, "NVME-SMALL").with_bytes(8 * MIB));
    let small = m.dev("nvme0n1");
    fs::write(&small, vec![0xA5; (8 * MIB) as usize]).unwrap();
    let (ending, _, said) = m.run("20261201-000001-aaaa", UNATTENDED);
    let err = ending.expect_err("no target");
    assert!(err.starts_with("no target disk:"), "{err}");
    assert!(said.contains("not nvme0n1: "), "{said}");
    assert_eq!(fs::read(&small).unwrap(), vec![0xA5; (8 * MIB) as usize]);
}

#[test]
fn a_controller_still_appearing_when_boot_gave_up_stops_before_choosing() {
    // Early boot waited its 15 s and a second NVMe controller never finished: the one disk
    // that did appear must not be chosen for being alone.
    let mut m = Machine::new()
        .with_stick("local-hostname: flow-13\n")
        .with_nvme(0, "NVME-FLOW-1");
    m.pending = vec!["PCI 0000:00:05.0 (storage 010802): nvme1 is \"connecting\"".into()];
    let nvme = sha(&m.dev("nvme0n1"));
    let (ending, rep, said) = m.run("20261201-000001-aaaa", UNATTENDED);
    let err = ending.expect_err("no choice");
    assert!(
        err.contains("not choosing a disk: storage still appearing"),
        "{err}"
    );
    assert!(err.contains("nvme1 is \"connecting\""), "{err}");
    assert!(rep.selection.is_none(), "{:?}", rep.selection);
    assert!(!said.contains("imprint: target "), "{said}");
    assert_eq!(sha(&m.dev("nvme0n1")), nvme, "nothing was written");
}
