//! The install flow of PID 1, from a booted live image to a provisioned machine:
//!
//! 1. mount the stick's ESP (identified by the PARTUUID on the kernel command line), read
//!    `imprint/config.json` and the seed templates, open the payload partition (by GPT type);
//! 2. read the machine's identity, scan the disks, choose the target by the documented policy
//!    and print the table, the choice and the reason — or stop, or ask, when unsure;
//! 3. skip the install when the disk already holds this image from a successful run (no
//!    reinstall loop), else confirm if the config asks for it;
//! 4. run the write engine (progress bars on every console), inject the cloud-init seed;
//! 5. make the next boot the installed disk (UEFI `BootNext`), write the report to the stick,
//!    then reboot, power off or wait as configured.
//!
//! Nothing here panics or returns: every failure is shown on every console, recorded in the
//! report, and the machine waits (or powers off after a configured time). It never reboots
//! into another install attempt.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use imprint_core::blockdev::{OpenOptionsTarget, Target};
use imprint_core::config::{After, Config, Placement};
use imprint_core::discover::{self, Disk};
use imprint_core::gpt_table::GptTable;
use imprint_core::machine::MachineIdentity;
use imprint_core::manifest::Image;
use imprint_core::seed;
use imprint_core::select::{self, Selection};
use imprint_core::signature;
use imprint_core::stick::{CONFIG_PATH, SEED_DIR};
use imprint_core::write::{self, WriteOptions};

use crate::boot::BootEnv;
use crate::console::{ConsoleProgress, Consoles};
use crate::handover::{
    already_installed, esp_volume_serial, handed_over_before, record_provisioned,
};
use crate::medium::Medium;
use crate::net::events::EventPhase;
use crate::power;
use crate::prompt::{ask_choice, confirm};
use crate::rootfs::seed_into_root;
use crate::screen::banner;
use imprint_core::report::{
    self, BootInfo, Hardware, ImageInfo, NextBoot, Phases, Rejected, Report, SeedInfo,
    SelectionInfo, Status,
};

/// GPT type of an EFI System Partition.
pub(crate) const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// Printed when the flow ends — after the stick is unmounted, so everything it records is on
/// it — for the end-to-end tests.
pub const DONE_MARKER: &str = "IMPRINT-DONE";

/// How the run ended, deciding what happens next.
#[derive(Debug)]
enum Ending {
    /// Installed or already installed: the next boot goes to the disk.
    Provisioned,
    /// Declined or stopped safely before writing: wait for the operator.
    Stopped,
}

/// Runs the flow and never returns.
pub fn run(env: &BootEnv, consoles: &mut Consoles) -> ! {
    let install_id = report::new_install_id();
    let mut rep = Report::new(&install_id);
    rep.boot = Some(BootInfo {
        kernel: env.kernel_release.clone(),
        modules_loaded: env.modules_loaded.len(),
        module_failures: env.module_failures.clone(),
        efi: env.efivars,
        settled: env.settled,
        seconds: env.elapsed.as_secs_f64(),
        pending: env.pending.clone(),
        coldplug: Some(env.coldplug.clone()),
    });
    rep.phases = Some(Phases {
        kernel_seconds: env.kernel_uptime.map(|d| d.as_secs_f64()),
        modules_seconds: Some(env.modules_done.as_secs_f64()),
        settle_seconds: Some(env.elapsed.saturating_sub(env.modules_done).as_secs_f64()),
        ..Default::default()
    });
    consoles.line(&format!("imprint: install {install_id}"));
    let stick = match Medium::open(env, consoles) {
        Ok(s) => s,
        Err(e) => {
            // Without the stick there is nowhere to write a report; show and wait.
            fail(consoles, &mut rep, None, &e, None);
        }
    };
    let config = match Config::load(&stick.path().join(CONFIG_PATH)) {
        Ok(c) => c,
        Err(e) if !stick.path().join(CONFIG_PATH).exists() => {
            consoles.line(&format!(
                "imprint: no {CONFIG_PATH} on the stick; using the defaults ({e})"
            ));
            Config::default()
        }
        Err(e) => fail(
            consoles,
            &mut rep,
            Some(stick),
            &anyhow!(e).context("reading the stick's config"),
            None,
        ),
    };
    stick.events().install_id(&install_id);
    if crate::inventory::wanted(env, &config) {
        crate::inventory::run(env, consoles, &mut rep, stick)
    }
    match install(env, consoles, &stick, &config, &mut rep) {
        Ok(Ending::Provisioned) => {
            stick.save_report(consoles, &rep);
            let b = banner::done(&rep, config.after);
            consoles.show(|v| {
                v.status = "done".into();
                v.bar = None;
                v.banner = Some(b);
            });
            finish(consoles, config.after, stick)
        }
        Ok(Ending::Stopped) => {
            // The flow's last message said why it stopped.
            let why = consoles.last_message();
            stick.save_report(consoles, &rep);
            let b = banner::stopped(
                "STOPPED",
                &why.unwrap_or_else(|| "see the serial console".into()),
                "power the machine off when you are done",
            );
            consoles.show(|v| {
                v.status = "stopped".into();
                v.banner = Some(b);
            });
            unmount(consoles, stick);
            consoles.log_line(DONE_MARKER);
            consoles.line("imprint: nothing was written; power the machine off when you are done");
            wait_or_poweroff(consoles, config.fatal_poweroff_after_secs)
        }
        Err(e) => fail(
            consoles,
            &mut rep,
            Some(stick),
            &e,
            config.fatal_poweroff_after_secs,
        ),
    }
}

pub(crate) fn fail(
    consoles: &mut Consoles,
    rep: &mut Report,
    stick: Option<Medium>,
    e: &anyhow::Error,
    poweroff_after: Option<u64>,
) -> ! {
    let chain = format!("{e:#}");
    rep.status = Status::Failed;
    rep.error = Some(chain.clone());
    consoles.line("");
    consoles.line(&format!("imprint: FAILED: {chain}"));
    let state = disk_state_after(e);
    consoles.line(&format!("imprint: {state}"));
    let b = banner::failed(rep, &chain, &state);
    consoles.show(|v| {
        v.status = "FAILED".into();
        v.bar = None;
        v.banner = Some(b);
    });
    if let Some(stick) = stick {
        stick.save_report(consoles, rep);
        unmount(consoles, stick);
    }
    consoles.log_line(DONE_MARKER);
    wait_or_poweroff(consoles, poweroff_after)
}

/// What a failure left on the target disk, in one sentence: the write engine knows for the
/// failures it saw; anything else stopped before the engine wrote (or, for root-filesystem
/// seed placement, after its commit — its error says so).
fn disk_state_after(e: &anyhow::Error) -> String {
    match e
        .chain()
        .find_map(|c| c.downcast_ref::<write::WriteError>())
    {
        Some(w) => format!("target disk: {}", w.disk_state().describe()),
        None if format!("{e:#}").contains("the image is installed") => {
            "target disk: the image is installed and its partition table committed; only the seed is missing".into()
        }
        None => "target disk: nothing was written to any disk".into(),
    }
}

fn wait_or_poweroff(consoles: &mut Consoles, after: Option<u64>) -> ! {
    match after {
        Some(secs) => {
            consoles.line(&format!("imprint: powering off in {secs} s"));
            std::thread::sleep(Duration::from_secs(secs));
            power::power_off(consoles)
        }
        None => {
            consoles.line("imprint: waiting; power the machine off to stop");
            power::halt_forever()
        }
    }
}

fn finish(consoles: &mut Consoles, after: After, stick: Medium) -> ! {
    unmount(consoles, stick);
    consoles.log_line(DONE_MARKER);
    match after {
        After::Reboot => {
            consoles.line("imprint: rebooting into the installed system");
            power::reboot(consoles)
        }
        After::Poweroff => {
            consoles.line("imprint: powering off");
            power::power_off(consoles)
        }
        After::Wait => {
            consoles.line("imprint: done; waiting (config `after: wait`)");
            power::halt_forever()
        }
    }
}

/// Unmounts the stick before PID 1 stops, reboots or powers off (none of which returns).
pub(crate) fn unmount(consoles: &mut Consoles, stick: Medium) {
    if let Err(e) = stick.close() {
        consoles.line(&format!("imprint: {e:#}"));
    }
}

/// Reads the GPT of `dev` with `sector_size`-byte logical sectors (through core's one GPT
/// module: a strange table is an error, never a panic).
pub(crate) fn read_gpt(dev: &Path, sector_size: u32) -> Result<GptTable> {
    let mut f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    GptTable::read(&mut f, sector_size)
        .with_context(|| format!("reading the GPT of {}", dev.display()))
}

/// The first used partition of `g` whose type GUID is `type_guid`: (number, partition).
pub(crate) fn find_partition_by_type(
    g: &GptTable,
    type_guid: &str,
) -> Option<(u32, gpt::partition::Partition)> {
    g.find_by_type(type_guid)
}

fn install(
    env: &BootEnv,
    consoles: &mut Consoles,
    medium: &Medium,
    config: &Config,
    rep: &mut Report,
) -> Result<Ending> {
    let t0 = Instant::now();
    let stick = medium.path();
    let templates = seed::validate_seed_dir(&stick.join(SEED_DIR)).context("checking the seed")?;

    let image = medium.image(env)?;
    if env.cmdline.has(crate::bench::PARAM) && medium.is_stick() {
        bench_stick_read(env, consoles, &image, rep);
    }
    let m = image.manifest().clone();
    rep.image = Some(ImageInfo {
        name: m.name.clone(),
        sha256: m.sha256.clone(),
        raw_size: m.raw_size,
        sector_size: m.sector_size,
        compressed_size: Some(m.compressed_size),
        signature: None,
    });
    consoles.line(&format!(
        "imprint: image {} ({}), sha256 {}",
        m.name,
        discover::human_bytes(m.raw_size),
        &m.sha256[..16]
    ));
    // Before any disk is touched (docs/signing.md).
    let signature_verified = check_signature(consoles, &image, config, rep)?;
    let medium_done = env.started.elapsed();

    let sys = &env.roots.sys;
    let identity = MachineIdentity::read(sys).context("reading the machine's identity")?;
    rep.machine = Some(identity.clone());
    // A strict fleet (`unknown_machines: refuse`) never writes a machine its table lacks:
    // stopped here, before any disk is looked at.
    if let Err(e) = seed::check_known_machine(config, &identity) {
        rep.status = Status::Declined;
        consoles.line(&format!("imprint: {e}"));
        return Ok(Ending::Stopped);
    }
    rep.hardware = hardware_summary();
    // Rendered before any disk is chosen or touched: a seed that cannot be made for this
    // machine (no table entry and no serial or MAC for the hostname pattern) stops here.
    let rendered = seed::render(&templates, &config.seed, &identity, &rep.install_id)
        .context("rendering the cloud-init seed")?;
    medium.events().hostname(&rendered.hostname);
    medium.events().phase(EventPhase::Target);
    let disks = discover::scan(sys).context("scanning the disks")?;
    rep.disks = Some(disks.clone());
    // Early boot gave up waiting while a controller was still starting: a disk may be missing
    // from the scan, and choosing among the others would be a guess.
    if !env.pending.is_empty() {
        bail!(
            "not choosing a disk: storage still appearing after {} s ({}); nothing was written",
            crate::boot::SETTLE_TIMEOUT.as_secs(),
            env.pending.join("; ")
        );
    }
    // main.rs printed the disk table already (IMPRINT-BOOT-OK); the decision follows it.

    let selection = select::choose(
        &disks,
        &config.target,
        m.raw_size,
        m.sector_size,
        medium.own_disk(env),
    );
    rep.selection = Some(SelectionInfo {
        chosen: selection.chosen().map(|d| d.name.clone()),
        reason: selection.reason().to_string(),
        rejected: selection
            .rejected()
            .iter()
            .map(|r| Rejected {
                disk: r.disk.name.clone(),
                why: r.why.to_string(),
            })
            .collect(),
    });
    for r in selection.rejected() {
        consoles.line(&format!("  not {}: {}", r.disk.name, r.why));
    }
    if let Some(s) = &rep.selection {
        let rejected: Vec<(String, String)> = s
            .rejected
            .iter()
            .map(|r| (r.disk.clone(), r.why.clone()))
            .collect();
        consoles.show(|v| v.mark_choice(s.chosen.as_deref(), &rejected));
    }
    let target_disk: Disk = match &selection {
        Selection::Chosen { disk, .. } => {
            consoles.line(&format!(
                "imprint: target {} — {}",
                disk.name,
                selection.reason()
            ));
            disk.clone()
        }
        Selection::Ambiguous { candidates, .. } => {
            consoles.line(&format!("imprint: ambiguous: {}", selection.reason()));
            match ask_choice(consoles, &env.roots, candidates)? {
                Some(d) => d,
                None => {
                    rep.status = Status::Declined;
                    consoles.line("imprint: no disk chosen; stopping. Pin the target in imprint/config.json (target.serial) to install without asking.");
                    return Ok(Ending::Stopped);
                }
            }
        }
        Selection::NoCandidate { .. } => bail!("no target disk: {}", selection.reason()),
    };
    if let Some(s) = rep.selection.as_mut() {
        s.chosen = Some(target_disk.name.clone());
    }
    consoles.show(|v| {
        v.mark_choice(Some(&target_disk.name), &[]);
        v.status = format!("target {}", target_disk.name);
    });
    // The last-resort hostname comes from the target disk's serial, known only now.
    let rendered = if matches!(
        rendered.hostname_source,
        seed::HostnameSource::Fallback { .. }
    ) {
        seed::render_for_disk(
            &templates,
            &config.seed,
            &identity,
            &rep.install_id,
            target_disk.serial.as_deref(),
        )
        .context("rendering the cloud-init seed")?
    } else {
        rendered
    };
    rep.timing("discover", t0.elapsed().as_secs_f64());

    let dev = env.roots.dev.join(&target_disk.name);
    if !config.reinstall && already_installed(consoles, &image, &dev, &target_disk, stick) {
        consoles.line(&format!(
            "imprint: {} already holds {} from an earlier successful install; not reinstalling (config: reinstall=false)",
            target_disk.name, m.name
        ));
        rep.status = Status::AlreadyInstalled;
        if handed_over_before(stick, target_disk.serial.as_deref()) {
            // We handed this machine to its disk once already and are back: the firmware
            // ignores BootNext or pruned the entry, and the stick's GRUB found no installed
            // disk to boot. One extra pass at most — stop instead of looping.
            rep.next_boot = Some(NextBoot {
                why: Some("handed over once already; not looping".into()),
                ..Default::default()
            });
            consoles.line("imprint: this machine came back to the stick after being handed to its disk; stopping instead of rebooting again. Remove the stick (or put the internal disk first in the firmware's boot order) and power-cycle.");
            return Ok(Ending::Stopped);
        }
        rep.next_boot = next_boot(consoles, env, &dev, &target_disk);
        if rep.next_boot.as_ref().is_some_and(|n| n.ignored_before) {
            // We set BootNext last time and the firmware booted the stick anyway: rebooting
            // again would loop. Stop here and let the operator act.
            consoles.line("imprint: this firmware ignored BootNext last time; remove the stick (or put the internal disk first in the boot order once) and power-cycle");
            return Ok(Ending::Stopped);
        }
        return Ok(Ending::Provisioned);
    }

    let has_data = target_disk.has_partitions() || !first_mib_is_zero(&dev);
    if config.confirm.required(has_data)
        && !confirm(consoles, &env.roots, &target_disk, &m.name, m.raw_size)?
    {
        rep.status = Status::Declined;
        consoles.line("imprint: declined; nothing was written");
        return Ok(Ending::Stopped);
    }

    let chosen_at = env.started.elapsed();
    // One transaction (docs/write-engine.md): the exclusive target stays open from the plan
    // to the commit; the image, the seed partition and the final partition table are all
    // written and read back before the single commit.
    let t = Instant::now();
    let target = Target::open(
        &dev,
        &OpenOptionsTarget {
            sys_root: env.roots.sys.clone(),
            proc_root: env.roots.proc.clone(),
            ..Default::default()
        },
    )
    .with_context(|| format!("opening {}", dev.display()))?;
    let plan = write::plan(&image, &target)
        .with_context(|| format!("checking {} against {}", m.name, dev.display()))?;
    let table = plan.table().ok_or_else(|| {
        anyhow!("the image has no GPT: imprint needs one to place the cloud-init seed")
    })?;
    let ss = u64::from(target.logical_sector_size());
    let (additions, cidata, root) = match config.seed.placement {
        Placement::CidataPartition => {
            let (a, p) = seed::cidata_addition(table, plan.target_size(), &dev, &rendered)
                .context("laying out the CIDATA seed partition")?;
            (vec![a], Some(p), None)
        }
        Placement::RootFilesystem => {
            let parts = table.partitions();
            let num = seed::pick_root_partition(&parts, &config.seed.root_partition)?;
            let p = &parts[&num];
            let (offset, len) = (p.first_lba * ss, (p.last_lba + 1 - p.first_lba) * ss);
            if offset < write::HOLD {
                bail!("the root partition {num} starts inside the image's first MiB, which is written last; use seed.placement cidata-partition");
            }
            (Vec::new(), None, Some((num, offset, len)))
        }
    };
    let console_progress = ConsoleProgress::new(consoles);
    let progress = medium.events().progress(&console_progress);
    let opts = WriteOptions {
        verify: true,
        zeroout: true,
        // A verified signature covers the manifest, and the manifest the payload's digest:
        // check that digest before the first write, so no unauthenticated byte reaches the disk.
        precheck_payload: signature_verified,
        // The first byte counts from PID 1's start (power-on to first byte, with the kernel's
        // uptime then: report.phases).
        started: Some(env.started),
    };
    // Root-filesystem placement: the seed goes into the image's root filesystem on the disk,
    // through a loop device over the partition's range, before the commit.
    let mut in_root = None;
    let wrep = {
        let mut work =
            |t: &Target| -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
                if let Some((num, offset, len)) = root {
                    let placed = seed_into_root(&env.roots.dev, t.path(), offset, len, &rendered)
                        .map_err(|e| {
                        format!("putting the seed into root partition {num}: {e:#}")
                    })?;
                    in_root = Some(placed);
                }
                Ok(())
            };
        let hook: Option<&mut write::BeforeCommit<'_>> = if root.is_some() {
            Some(&mut work)
        } else {
            None
        };
        write::write_planned(&image, &target, &plan, &additions, hook, &opts, &progress)
            .with_context(|| format!("writing {} to {}", m.name, dev.display()))?
    };
    drop(console_progress);
    medium.events().phase(EventPhase::Seed);
    consoles.line(&format!(
        "imprint: wrote {} in {:.1} s ({:.0} MiB/s), read back alongside and verified {:.1} s after the last write",
        discover::human_bytes(m.raw_size),
        wrep.write_seconds,
        m.raw_size as f64 / wrep.write_seconds.max(1e-3) / 1048576.0,
        wrep.verify_seconds,
    ));
    {
        let p = rep.phases.get_or_insert_with(Phases::default);
        let chosen = chosen_at;
        p.medium_seconds = Some(medium_done.saturating_sub(env.elapsed).as_secs_f64());
        p.choose_seconds = Some(chosen.saturating_sub(medium_done).as_secs_f64());
        p.first_write_seconds = Some((wrep.first_byte_seconds - chosen.as_secs_f64()).max(0.0));
        p.first_byte_uptime_seconds = p.kernel_seconds.map(|k| k + wrep.first_byte_seconds);
        consoles.log_line(&format!(
            "imprint: first byte {:.2}s after PID 1 started (kernel uptime {}): modules {:.2}s, settle {:.2}s, stick and image {:.2}s, choosing {:.2}s, to the first write {:.2}s",
            wrep.first_byte_seconds,
            p.first_byte_uptime_seconds
                .map_or("unknown".to_string(), |u| format!("{u:.2}s")),
            p.modules_seconds.unwrap_or_default(),
            p.settle_seconds.unwrap_or_default(),
            p.medium_seconds.unwrap_or_default(),
            p.choose_seconds.unwrap_or_default(),
            p.first_write_seconds.unwrap_or_default(),
        ));
    }
    rep.write = Some(wrep);
    rep.timing("write_and_verify", t.elapsed().as_secs_f64());
    drop(target);

    let t = Instant::now();
    let placement = cidata
        .or(in_root)
        .ok_or_else(|| anyhow!("the seed was not placed"))?;
    let summary = rendered.summary();
    consoles.line(&format!(
        "imprint: seed written and read back: hostname {} ({})",
        summary.hostname,
        rendered.hostname_source.describe()
    ));
    rep.seed = Some(SeedInfo {
        summary,
        placement: placement.clone(),
    });
    rep.timing("seed", t.elapsed().as_secs_f64());
    rep.status = Status::Installed;
    medium.events().phase(EventPhase::BootOrder);
    rep.next_boot = next_boot(consoles, env, &dev, &target_disk);
    // The stick's hand-over record (its GRUB boots this disk while the stick stays in).
    if let (true, false, seed::SeedPlacement::CidataPartition { partition_guid, .. }) =
        (medium.is_stick(), config.reinstall, &placement)
    {
        let esp = plan
            .table()
            .and_then(|t| t.find_by_type(ESP_TYPE))
            .and_then(|(_, p)| esp_volume_serial(&dev, &p, ss));
        match (uuid::Uuid::parse_str(partition_guid), esp) {
            (Ok(g), Some(esp)) => {
                let serial = seed::cidata_volume_serial(&g);
                let label = format!("{} ({})", rendered.hostname, m.name);
                match record_provisioned(stick, &serial, &esp, &label) {
                    Ok(_) => {
                        consoles.line(&format!("imprint: recorded on the stick: with the stick left in, it boots this disk (seed volume {serial})"));
                        if let Some(n) = rep.next_boot.as_mut() {
                            n.stick_handover = Some(serial.clone());
                        }
                    }
                    Err(e) => consoles.line(&format!(
                        "imprint: could not record the install on the stick ({e:#}); remove the stick before the next power-on"
                    )),
                }
            }
            _ => consoles.line("imprint: the image has no readable EFI System Partition the stick could hand over to; remove the stick before the next power-on"),
        }
    }
    rep.timing("total", t0.elapsed().as_secs_f64());
    Ok(Ending::Provisioned)
}

/// Bench mode: the stick's read rates, on the consoles and in the report. A failure costs
/// only the figures.
fn bench_stick_read(env: &BootEnv, consoles: &mut Consoles, image: &Image, rep: &mut Report) {
    consoles.line("imprint: bench: reading the stick's payload partition twice");
    match crate::bench::stick_read(&env.roots.proc, image) {
        Ok(r) => {
            consoles.line(&format!(
                "imprint: bench: image reader {:.1} MiB/s ({} in {:.2}s), plain O_DIRECT 4 MiB reads {:.1} MiB/s ({} in {:.2}s) on {}",
                r.payload_mib_s(),
                discover::human_bytes(r.payload_bytes),
                r.payload_seconds,
                r.direct_mib_s(),
                discover::human_bytes(r.direct_bytes),
                r.direct_seconds,
                r.partition
            ));
            rep.stick_read = Some(r);
        }
        Err(e) => consoles.line(&format!("imprint: bench: {e:#}")),
    }
}

/// Applies the signature policy (`require_signature`, trusted keys from the config and the live
/// image's [`signature::BAKED_KEY_DIR`]) and records the outcome in `rep.image.signature`;
/// returns whether the signature was verified. An error stops the install before any write.
fn check_signature(
    consoles: &mut Consoles,
    image: &Image,
    config: &Config,
    rep: &mut Report,
) -> Result<bool> {
    let info = signature::signature_info(image).ok().flatten();
    if let Some(i) = rep.image.as_mut() {
        i.signature = Some(signature::SignatureCheck {
            signed: image.signature().is_some(),
            key_id: info.as_ref().map(|i| i.key_id.to_string()),
            verified: false,
        });
    }
    let check = signature::trusted_keys(&config.trusted_keys, Path::new(signature::BAKED_KEY_DIR))
        .and_then(|keys| signature::check_policy(image, config.require_signature, &keys))
        .context("checking the image's signature")?;
    consoles.line(&match (&check.key_id, check.verified) {
        (Some(id), true) => format!("imprint: image signed by key {id}: signature verified"),
        (Some(id), false) => {
            format!("imprint: image signed by key {id}, not checked: no key is trusted")
        }
        (None, _) => "imprint: image is not signed (no signature required)".to_string(),
    });
    if let Some(i) = rep.image.as_mut() {
        i.signature = Some(check.clone());
    }
    Ok(check.verified)
}

fn first_mib_is_zero(dev: &Path) -> bool {
    let mut buf = vec![0u8; 1 << 20];
    match File::open(dev).and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) => buf.iter().all(|&b| b == 0),
        Err(_) => false,
    }
}

/// Makes the next boot the installed disk's ESP (UEFI `BootNext`).
fn next_boot(consoles: &mut Consoles, env: &BootEnv, dev: &Path, disk: &Disk) -> Option<NextBoot> {
    if !env.efivars {
        consoles.line("imprint: not booted with UEFI variables; the firmware's boot order decides the next boot");
        return Some(NextBoot {
            why: Some("no efivarfs".into()),
            ..Default::default()
        });
    }
    match crate::efi::next_boot::set_next_boot_to_disk(dev, disk) {
        Ok(v) => {
            consoles.line(&format!(
                "imprint: next boot: {}",
                v.description.as_deref().unwrap_or("installed disk")
            ));
            Some(v)
        }
        Err(e) => {
            consoles.line(&format!("imprint: could not set the next boot ({e:#}); remove the stick before the next power-on"));
            Some(NextBoot {
                why: Some(format!("{e:#}")),
                ..Default::default()
            })
        }
    }
}

pub(crate) fn hardware_summary() -> Option<Hardware> {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    Some(Hardware {
        cpu: sys.cpus().first().map(|c| c.brand().to_string()),
        cpus: sys.cpus().len(),
        memory_bytes: sys.total_memory(),
        kernel: sysinfo::System::kernel_version(),
    })
}

#[cfg(test)]
mod tests;
