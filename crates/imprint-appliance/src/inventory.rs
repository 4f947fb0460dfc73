//! Inventory mode (`"mode": "inventory"` in the config, or `imprint.mode=inventory` from the
//! stick's menu): nothing is written to any disk — no disk is even opened for writing. The
//! machine's facts (DMI, NICs and MACs, every disk with serial, size and transport, CPU and
//! memory) go into a report on the stick, shown on the screen, then the machine powers off.
//! `imprint reports --machines STICK` turns such reports into a machines table to fill in.

use std::path::Path;

use anyhow::{Context, Result};
use imprint_core::config::{Config, Mode};
use imprint_core::discover;
use imprint_core::machine::MachineIdentity;
use imprint_core::report::{Report, Status};

use crate::boot::BootEnv;
use crate::console::Consoles;
use crate::flow::{fail, hardware_summary, unmount, DONE_MARKER};
use crate::medium::Medium;
use crate::power;
use crate::screen::Banner;

/// The kernel command line parameter the stick's inventory menu entry sets.
const CMDLINE_MODE: &str = "imprint.mode";

/// Whether this boot takes inventory instead of installing.
pub fn wanted(env: &BootEnv, config: &Config) -> bool {
    env.cmdline.get(CMDLINE_MODE) == Some("inventory") || config.mode == Mode::Inventory
}

/// Records the facts, saves the report, shows them and powers off.
pub fn run(env: &BootEnv, consoles: &mut Consoles, rep: &mut Report, stick: Medium) -> ! {
    consoles.show(|v| v.status = "inventory: writing nothing".into());
    if let Err(e) = record(&env.roots.sys, consoles, rep) {
        fail(consoles, rep, Some(stick), &e, Some(60));
    }
    stick.save_report(consoles, rep);
    let b = banner(rep);
    consoles.show(|v| {
        v.status = "inventory done".into();
        v.banner = Some(b);
    });
    unmount(consoles, stick);
    consoles.log_line(DONE_MARKER);
    // Long enough for the person at the monitor to read the facts; the report has them all.
    consoles.line(&format!(
        "imprint: powering off in {} s",
        SHOW_FOR.as_secs()
    ));
    std::thread::sleep(SHOW_FOR);
    power::power_off(consoles)
}

/// How long the facts stay on the screen before the machine powers off.
const SHOW_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// Reads the facts into `rep` and lists them on the consoles.
fn record(sys: &Path, consoles: &mut Consoles, rep: &mut Report) -> Result<()> {
    let id = MachineIdentity::read(sys).context("reading the machine's identity")?;
    let disks = discover::scan(sys).context("scanning the disks")?;
    let hw = hardware_summary();
    consoles.line(&format!(
        "imprint: inventory: {} {}, serial {}",
        id.dmi.sys_vendor.as_deref().unwrap_or("?"),
        id.dmi.product_name.as_deref().unwrap_or("?"),
        id.serial().unwrap_or("?")
    ));
    for n in &id.nics {
        consoles.line(&format!("imprint: inventory: nic {} {}", n.name, n.mac));
    }
    if let Some(h) = &hw {
        consoles.line(&format!(
            "imprint: inventory: cpu {} x{}, memory {}",
            h.cpu.as_deref().unwrap_or("?"),
            h.cpus,
            discover::human_bytes(h.memory_bytes)
        ));
    }
    for d in &disks {
        consoles.line(&format!(
            "imprint: inventory: disk {} {} {} serial {}",
            d.name,
            d.transport,
            discover::human_bytes(d.size),
            d.serial.as_deref().unwrap_or("-")
        ));
    }
    rep.machine = Some(id);
    rep.hardware = hw;
    rep.disks = Some(disks);
    rep.status = Status::Inventory;
    Ok(())
}

fn banner(rep: &Report) -> Banner {
    let m = rep.machine.as_ref();
    let macs = m
        .map(|m| {
            m.nics
                .iter()
                .map(|n| n.mac.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let hw = rep.hardware.as_ref();
    Banner::Stopped(
        "INVENTORY RECORDED".into(),
        vec![
            (
                "Serial".into(),
                m.and_then(|m| m.serial()).unwrap_or("-").to_string(),
            ),
            (
                "MACs".into(),
                if macs.is_empty() { "-".into() } else { macs },
            ),
            (
                "CPU".into(),
                hw.map(|h| {
                    format!(
                        "{} x{}, {} memory",
                        h.cpu.as_deref().unwrap_or("?"),
                        h.cpus,
                        discover::human_bytes(h.memory_bytes)
                    )
                })
                .unwrap_or_else(|| "-".into()),
            ),
            ("Disks".into(), "nothing was written to any disk".into()),
            (
                "Report".into(),
                format!("imprint/reports/ on the stick ({})", rep.install_id),
            ),
            (
                "Next".into(),
                "powering off; `imprint reports --machines STICK`".into(),
            ),
        ],
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::boot::{Cmdline, Roots};

    fn env(cmdline: &str) -> BootEnv {
        BootEnv {
            cmdline: Cmdline::parse(cmdline),
            kernel_release: String::new(),
            modules_loaded: Vec::new(),
            module_failures: Vec::new(),
            efivars: false,
            esp: None,
            roots: Roots::system(),
            settled: true,
            pending: Vec::new(),
            started: std::time::Instant::now(),
            kernel_uptime: None,
            modules_done: Duration::ZERO,
            coldplug: Default::default(),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn inventory_is_chosen_by_the_menu_entry_or_the_config() {
        let install = Config::default();
        let inventory = Config::from_json(r#"{ "mode": "inventory" }"#).unwrap();
        assert!(!wanted(&env("quiet imprint.esp=X"), &install));
        assert!(wanted(&env("quiet imprint.mode=inventory"), &install));
        assert!(wanted(&env("quiet"), &inventory));
        assert!(!wanted(&env("imprint.mode=install"), &install));
        assert!(Config::from_json(r#"{ "mode": "inventroy" }"#).is_err());
    }

    #[test]
    fn the_banner_lists_the_facts_and_says_nothing_was_written() {
        let mut rep = Report::new("inv1");
        rep.machine = Some(MachineIdentity {
            dmi: imprint_core::machine::Dmi {
                product_serial: Some("BTTN0001".into()),
                ..Default::default()
            },
            nics: vec![imprint_core::machine::Nic {
                name: "eno1".into(),
                mac: "aa:bb:cc:00:00:01".parse().unwrap(),
                wireless: false,
            }],
        });
        let Banner::Stopped(title, lines) = banner(&rep) else {
            panic!()
        };
        assert_eq!(title, "INVENTORY RECORDED");
        let get = |k: &str| lines.iter().find(|(l, _)| l == k).unwrap().1.clone();
        assert_eq!(get("Serial"), "BTTN0001");
        assert_eq!(get("MACs"), "aa:bb:cc:00:00:01");
        assert_eq!(get("Disks"), "nothing was written to any disk");
        assert!(get("Report").contains("inv1"));
    }
}
