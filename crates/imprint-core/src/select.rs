//! The target policy: given the disks found and the configuration's `target` section, choose
//! the one disk to install to — or say, with reasons, why there is none or more than one.
//!
//! What protects data here: the provisioning stick and every USB disk are never candidates,
//! even when a pin names them; read-only disks and disks held by dm/md are never candidates;
//! two equally preferred candidates are never resolved by guessing (the operator pins one).
//! Every disk that is not chosen carries a sentence saying why, for the console and the report.
//! The policy is described for operators in `docs/target-selection.md`.

use serde::Serialize;

use crate::config::TargetPolicy;
use crate::discover::{human_bytes, Disk, Transport};

/// A disk that is not the target, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// The disk.
    pub disk: Disk,
    /// Why, in words for the console (`usb: never a target`).
    pub why: String,
}

/// The outcome of the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Selection {
    /// Exactly one disk qualifies.
    Chosen {
        /// The target.
        disk: Disk,
        /// Why this one (`the only internal nvme disk`).
        reason: String,
        /// Every other disk, with its reason.
        rejected: Vec<Rejected>,
    },
    /// More than one disk qualifies equally; pin one.
    Ambiguous {
        /// The equally good candidates.
        candidates: Vec<Disk>,
        /// What to do about it.
        reason: String,
        /// Every other disk, with its reason.
        rejected: Vec<Rejected>,
    },
    /// No disk qualifies.
    NoCandidate {
        /// The summary (names an unmatched pin when there is one).
        reason: String,
        /// Every disk, with its reason.
        rejected: Vec<Rejected>,
    },
}

impl Selection {
    /// The chosen disk, if any.
    pub fn chosen(&self) -> Option<&Disk> {
        match self {
            Selection::Chosen { disk, .. } => Some(disk),
            _ => None,
        }
    }

    /// The one-sentence reason.
    pub fn reason(&self) -> &str {
        match self {
            Selection::Chosen { reason, .. }
            | Selection::Ambiguous { reason, .. }
            | Selection::NoCandidate { reason, .. } => reason,
        }
    }

    /// The disks that were not chosen.
    pub fn rejected(&self) -> &[Rejected] {
        match self {
            Selection::Chosen { rejected, .. }
            | Selection::Ambiguous { rejected, .. }
            | Selection::NoCandidate { rejected, .. } => rejected,
        }
    }
}

fn describe(d: &Disk) -> String {
    let mut s = format!("{} ({}, {}", d.name, d.transport, human_bytes(d.size));
    if let Some(m) = &d.model {
        s.push_str(&format!(", {m}"));
    }
    if let Some(sn) = &d.serial {
        s.push_str(&format!(", S/N {sn}"));
    }
    s.push(')');
    s
}

/// Which pins a disk fails, each as a sentence. Empty: it matches every pin.
fn pin_mismatches(d: &Disk, p: &TargetPolicy) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(want) = &p.serial {
        if d.serial.as_deref().map(str::trim) != Some(want.trim()) {
            out.push(format!(
                "serial {} is not the pinned {}",
                d.serial.as_deref().unwrap_or("(none)"),
                want.trim()
            ));
        }
    }
    if let Some(want) = &p.wwid {
        let have = d.wwid.as_deref().map(|w| w.trim().to_ascii_lowercase());
        if have.as_deref() != Some(want.trim().to_ascii_lowercase().as_str()) {
            out.push(format!(
                "wwid {} is not the pinned {}",
                d.wwid.as_deref().unwrap_or("(none)"),
                want.trim()
            ));
        }
    }
    if let Some(want) = &p.model {
        let have = d.model.as_deref().unwrap_or("").to_ascii_lowercase();
        if !have.contains(&want.trim().to_ascii_lowercase()) {
            out.push(format!(
                "model {} does not contain the pinned {:?}",
                d.model.as_deref().unwrap_or("(none)"),
                want.trim()
            ));
        }
    }
    if let Some(min) = p.min_size {
        if d.size < min.0 {
            out.push(format!(
                "{} is below target.min_size {}",
                human_bytes(d.size),
                human_bytes(min.0)
            ));
        }
    }
    if let Some(max) = p.max_size {
        if d.size > max.0 {
            out.push(format!(
                "{} is above target.max_size {}",
                human_bytes(d.size),
                human_bytes(max.0)
            ));
        }
    }
    out
}

/// Names the pins in force, for a message about a pin that matched nothing.
fn pins_text(p: &TargetPolicy) -> String {
    let mut v = Vec::new();
    if let Some(s) = &p.serial {
        v.push(format!("target.serial {:?}", s.trim()));
    }
    if let Some(s) = &p.wwid {
        v.push(format!("target.wwid {:?}", s.trim()));
    }
    if let Some(s) = &p.model {
        v.push(format!("target.model {:?}", s.trim()));
    }
    if let Some(s) = p.min_size {
        v.push(format!("target.min_size {}", human_bytes(s.0)));
    }
    if let Some(s) = p.max_size {
        v.push(format!("target.max_size {}", human_bytes(s.0)));
    }
    v.join(", ")
}

/// Applies the target policy.
///
/// - `image_size`: bytes the image needs on disk.
/// - `image_sector_size`: the sector size the image's GPT was built for, if known; a disk
///   with another logical sector size cannot boot it.
/// - `stick`: the kernel name of the disk the appliance booted from, if known. It is never a
///   candidate; USB disks are excluded regardless.
pub fn choose(
    disks: &[Disk],
    policy: &TargetPolicy,
    image_size: u64,
    image_sector_size: Option<u32>,
    stick: Option<&str>,
) -> Selection {
    let mut rejected: Vec<Rejected> = Vec::new();
    // Disks that pass the safety rules (not stick, not USB, writable, not held) — whether
    // a pin matches is decided after, so an unmatched pin can be reported as such.
    let mut eligible: Vec<&Disk> = Vec::new();
    // Pinned disks excluded by a safety rule, to explain a pin that points at one.
    let mut pinned_but_unsafe: Vec<(&Disk, String)> = Vec::new();

    for d in disks {
        let safety = if stick == Some(d.name.as_str()) {
            Some("the provisioning stick: never a target".to_string())
        } else if d.transport == Transport::Usb {
            Some("usb: never a target".to_string())
        } else if d.external {
            Some("external (Thunderbolt/USB4 or another external port): never a target".to_string())
        } else if d.read_only {
            Some("read-only".to_string())
        } else if d.size == 0 {
            Some("no medium (size 0)".to_string())
        } else if !d.all_holders().is_empty() {
            Some(format!(
                "in use: held by {} (dm/md)",
                d.all_holders().join(", ")
            ))
        } else if !policy.transports.contains(&d.transport) {
            Some(format!(
                "{}: not in target.transports ({})",
                d.transport,
                policy
                    .transports
                    .iter()
                    .map(Transport::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        } else {
            None
        };
        match safety {
            Some(why) => {
                if policy.is_pinned() && pin_mismatches(d, policy).is_empty() {
                    pinned_but_unsafe.push((d, why.clone()));
                }
                rejected.push(Rejected {
                    disk: d.clone(),
                    why,
                });
            }
            None => eligible.push(d),
        }
    }

    if eligible.is_empty() && !policy.is_pinned() {
        let reason = format!(
            "no internal {} disk found; every disk is excluded",
            transports_text(policy)
        );
        return no_candidate(reason, rejected, disks);
    }

    // Pins.
    let mut pinned: Vec<&Disk> = Vec::new();
    for d in eligible {
        let miss = pin_mismatches(d, policy);
        if miss.is_empty() {
            pinned.push(d);
        } else {
            rejected.push(Rejected {
                disk: d.clone(),
                why: miss.join("; "),
            });
        }
    }
    if policy.is_pinned() && pinned.is_empty() {
        let reason = match pinned_but_unsafe.first() {
            Some((d, why)) => format!(
                "{} matches {} but is excluded: {why}",
                describe(d),
                pins_text(policy)
            ),
            None => format!("no disk matches {}", pins_text(policy)),
        };
        return no_candidate(reason, rejected, disks);
    }

    // Fit: size and sector size.
    let mut fitting: Vec<&Disk> = Vec::new();
    for d in pinned {
        let why = if d.size < image_size {
            Some(format!(
                "too small: {} < image {}",
                human_bytes(d.size),
                human_bytes(image_size)
            ))
        } else {
            match image_sector_size {
                Some(s) if s != d.logical_block_size => Some(format!(
                    "{}-byte sectors, image has {s}",
                    d.logical_block_size
                )),
                _ => None,
            }
        };
        match why {
            Some(why) => rejected.push(Rejected {
                disk: d.clone(),
                why,
            }),
            None => fitting.push(d),
        }
    }
    if fitting.is_empty() {
        let reason = if policy.is_pinned() {
            format!(
                "the disk matching {} cannot hold the image",
                pins_text(policy)
            )
        } else {
            format!(
                "no internal {} disk can hold the image",
                transports_text(policy)
            )
        };
        return no_candidate(reason, rejected, disks);
    }

    // Preference: the earliest transport in target.transports wins; within it, no guessing.
    let rank = |d: &Disk| {
        policy
            .transports
            .iter()
            .position(|t| *t == d.transport)
            .unwrap_or(usize::MAX)
    };
    let best = fitting.iter().map(|d| rank(d)).min().unwrap_or(usize::MAX);
    let (top, lower): (Vec<&Disk>, Vec<&Disk>) = fitting.into_iter().partition(|d| rank(d) == best);
    let best_transport = top.first().map(|d| d.transport);
    for d in &lower {
        rejected.push(Rejected {
            disk: (*d).clone(),
            why: format!(
                "{} is preferred over {} (target.transports); left untouched",
                best_transport.map(|t| t.to_string()).unwrap_or_default(),
                d.transport
            ),
        });
    }
    sort_like(&mut rejected, disks);

    match top.as_slice() {
        [one] => {
            let reason = if policy.is_pinned() {
                format!("{} matches {}", describe(one), pins_text(policy))
            } else if lower.is_empty() {
                format!("{}: the only internal disk that fits", describe(one))
            } else {
                format!(
                    "{}: {} is preferred over {}",
                    describe(one),
                    one.transport,
                    lower
                        .iter()
                        .map(|d| format!("{} ({})", d.name, d.transport))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            Selection::Chosen {
                disk: (*one).clone(),
                reason,
                rejected,
            }
        }
        many => Selection::Ambiguous {
            reason: format!(
                "{} equally good {} disks: {}; pin one with target.serial or target.wwid",
                many.len(),
                best_transport.map(|t| t.to_string()).unwrap_or_default(),
                many.iter()
                    .map(|d| describe(d))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            candidates: many.iter().map(|d| (*d).clone()).collect(),
            rejected,
        },
    }
}

fn transports_text(p: &TargetPolicy) -> String {
    p.transports
        .iter()
        .map(Transport::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Keeps the rejected list in the order the disks were found, so the console reads top-down.
fn sort_like(rejected: &mut [Rejected], disks: &[Disk]) {
    rejected.sort_by_key(|r| {
        disks
            .iter()
            .position(|d| d.name == r.disk.name)
            .unwrap_or(usize::MAX)
    });
}

fn no_candidate(reason: String, mut rejected: Vec<Rejected>, disks: &[Disk]) -> Selection {
    sort_like(&mut rejected, disks);
    let reason = if disks.is_empty() {
        "no disks found at all (is the storage driver loaded?)".to_string()
    } else {
        reason
    };
    Selection::NoCandidate { reason, rejected }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use crate::discover::fixture::{FakeDisk, FakeSys};
    use crate::discover::scan;

    const GIB: u64 = 1 << 30;

    fn disks(fakes: &[FakeDisk]) -> Vec<Disk> {
        let sys = FakeSys::new();
        for f in fakes {
            sys.add(f);
        }
        scan(&sys.root()).unwrap()
    }

    fn stick() -> FakeDisk {
        FakeDisk::usb("sda", 16, "STICK", true)
    }

    fn why<'a>(sel: &'a Selection, name: &str) -> &'a str {
        &sel.rejected()
            .iter()
            .find(|r| r.disk.name == name)
            .unwrap_or_else(|| panic!("{name} not rejected: {sel:#?}"))
            .why
    }

    fn chosen_name(sel: &Selection) -> &str {
        &sel.chosen()
            .unwrap_or_else(|| panic!("nothing chosen: {sel:#?}"))
            .name
    }

    #[test]
    fn one_nvme_is_chosen() {
        let d = disks(&[stick(), FakeDisk::nvme(0, 512, "S1")]);
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(512),
            Some("sda"),
        );
        assert_eq!(chosen_name(&sel), "nvme0n1");
        assert!(
            sel.reason().contains("only internal disk"),
            "{}",
            sel.reason()
        );
        assert_eq!(why(&sel, "sda"), "the provisioning stick: never a target");
    }

    #[test]
    fn nvme_preferred_over_sata_and_sata_untouched() {
        let d = disks(&[
            FakeDisk::sata("sda", 1, 1000, "WD1"),
            stick_named("sdb"),
            FakeDisk::nvme(0, 256, "S1"),
        ]);
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(512),
            Some("sdb"),
        );
        assert_eq!(chosen_name(&sel), "nvme0n1");
        assert!(why(&sel, "sda").contains("nvme is preferred over sata"));
        assert!(
            sel.reason().contains("preferred over sda"),
            "{}",
            sel.reason()
        );
        // The order in target.transports is the preference.
        let sata_first = TargetPolicy {
            transports: vec![Transport::Sata, Transport::Nvme],
            ..TargetPolicy::default()
        };
        let sel = choose(&d, &sata_first, 10 * GIB, Some(512), Some("sdb"));
        assert_eq!(chosen_name(&sel), "sda");
    }

    fn stick_named(name: &str) -> FakeDisk {
        FakeDisk::usb(name, 16, "STICK", true)
    }

    #[test]
    fn two_nvme_are_ambiguous_until_pinned() {
        let d = disks(&[
            stick(),
            FakeDisk::nvme(0, 512, "S1"),
            FakeDisk::nvme(1, 512, "S2"),
        ]);
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(512),
            Some("sda"),
        );
        let Selection::Ambiguous {
            candidates, reason, ..
        } = &sel
        else {
            panic!("{sel:#?}")
        };
        assert_eq!(candidates.len(), 2);
        assert!(
            reason.contains("pin one") && reason.contains("S/N S2"),
            "{reason}"
        );

        let pinned = TargetPolicy {
            serial: Some("S2".into()),
            ..TargetPolicy::default()
        };
        let sel = choose(&d, &pinned, 10 * GIB, Some(512), Some("sda"));
        assert_eq!(chosen_name(&sel), "nvme1n1");
        assert!(why(&sel, "nvme0n1").contains("not the pinned S2"));
    }

    #[test]
    fn stick_only_is_no_candidate_with_clear_reason() {
        let d = disks(&[stick()]);
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(512),
            Some("sda"),
        );
        let Selection::NoCandidate { reason, rejected } = &sel else {
            panic!("{sel:#?}")
        };
        assert!(reason.contains("no internal nvme or sata disk"), "{reason}");
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].why, "the provisioning stick: never a target");

        let sel = choose(&[], &TargetPolicy::default(), 1, None, None);
        assert!(sel.reason().contains("no disks found"), "{}", sel.reason());
    }

    #[test]
    fn usb_ssd_reporting_fixed_is_never_chosen_even_pinned() {
        let d = disks(&[
            stick(),
            FakeDisk::usb("sdb", 1000, "USBSSD", false),
            FakeDisk::sata("sdc", 1, 256, "INTERNAL"),
        ]);
        assert!(!d[1].removable);
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(512),
            Some("sda"),
        );
        assert_eq!(chosen_name(&sel), "sdc");
        assert_eq!(why(&sel, "sdb"), "usb: never a target");

        // Pinning the USB disk by serial does not make it a target.
        let pinned = TargetPolicy {
            serial: Some("USBSSD".into()),
            ..TargetPolicy::default()
        };
        let sel = choose(&d, &pinned, 10 * GIB, Some(512), Some("sda"));
        let Selection::NoCandidate { reason, .. } = &sel else {
            panic!("{sel:#?}")
        };
        assert!(
            reason.contains("sdb") && reason.contains("usb: never a target"),
            "{reason}"
        );
        // Allowing "usb" in transports would not help either: USB is rejected before that
        // (and config validation refuses it).
        let with_usb = TargetPolicy {
            transports: vec![Transport::Usb, Transport::Sata],
            serial: Some("USBSSD".into()),
            ..TargetPolicy::default()
        };
        assert!(choose(&d, &with_usb, 10 * GIB, None, Some("sda"))
            .chosen()
            .is_none());
    }

    #[test]
    fn thunderbolt_nvme_never_chosen() {
        let mut tb = FakeDisk::nvme(1, 1000, "TB1");
        tb.external_pci = true;
        let d = disks(&[stick(), FakeDisk::sata("sdb", 1, 256, "INTERNAL"), tb]);
        assert!(d.iter().any(|x| x.name == "nvme1n1" && x.external));
        let sel = choose(&d, &TargetPolicy::default(), GIB, None, Some("sda"));
        // NVMe is preferred, but not this one: the internal SATA disk is chosen.
        assert_eq!(chosen_name(&sel), "sdb");
        assert!(why(&sel, "nvme1n1").starts_with("external"));
    }

    #[test]
    fn stick_is_excluded_by_name_even_if_not_usb() {
        // A stick in an SD slot (mmc) or a virtio disk in a test VM: excluded by identity.
        let d = disks(&[FakeDisk::sata("sda", 1, 64, "STICK-SATA")]);
        let sel = choose(&d, &TargetPolicy::default(), GIB, Some(512), Some("sda"));
        assert!(sel.chosen().is_none());
        assert_eq!(why(&sel, "sda"), "the provisioning stick: never a target");
    }

    #[test]
    fn four_k_native_disk_rejected_for_512_image() {
        let d = disks(&[stick(), FakeDisk::nvme(0, 512, "S1").with_lbs(4096)]);
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(512),
            Some("sda"),
        );
        assert!(sel.chosen().is_none());
        assert_eq!(why(&sel, "nvme0n1"), "4096-byte sectors, image has 512");
        // A 4096-byte image fits it.
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(4096),
            Some("sda"),
        );
        assert_eq!(chosen_name(&sel), "nvme0n1");
    }

    #[test]
    fn too_small_disk_rejected_and_bigger_sata_chosen() {
        let d = disks(&[
            stick(),
            FakeDisk::nvme(0, 8, "S1"),
            FakeDisk::sata("sdb", 1, 1000, "WD1"),
        ]);
        let sel = choose(
            &d,
            &TargetPolicy::default(),
            10 * GIB,
            Some(512),
            Some("sda"),
        );
        assert_eq!(why(&sel, "nvme0n1"), "too small: 8.0 GiB < image 10.0 GiB");
        assert_eq!(chosen_name(&sel), "sdb");

        let d = disks(&[stick(), FakeDisk::nvme(0, 1, "S1").with_bytes(GIB - 512)]);
        let sel = choose(&d, &TargetPolicy::default(), GIB, None, Some("sda"));
        assert!(matches!(sel, Selection::NoCandidate { .. }));
        assert!(why(&sel, "nvme0n1").starts_with("too small"));
    }

    #[test]
    fn pinned_serial_absent_names_the_pin() {
        let d = disks(&[stick(), FakeDisk::nvme(0, 512, "S1")]);
        let pinned = TargetPolicy {
            serial: Some("NOPE".into()),
            ..TargetPolicy::default()
        };
        let sel = choose(&d, &pinned, GIB, Some(512), Some("sda"));
        let Selection::NoCandidate { reason, .. } = &sel else {
            panic!("{sel:#?}")
        };
        assert_eq!(reason, "no disk matches target.serial \"NOPE\"");
        assert!(why(&sel, "nvme0n1").contains("S1 is not the pinned NOPE"));
    }

    #[test]
    fn pins_by_wwid_model_and_size_range() {
        let d = disks(&[
            stick(),
            FakeDisk::nvme(0, 256, "S1"),
            FakeDisk::nvme(1, 1024, "S2"),
        ]);
        let by_wwid = TargetPolicy {
            wwid: Some("EUI.0000000000000001".into()),
            ..TargetPolicy::default()
        };
        assert_eq!(
            chosen_name(&choose(&d, &by_wwid, GIB, None, Some("sda"))),
            "nvme1n1"
        );
        let by_model = TargetPolicy {
            model: Some("model NVME0".into()),
            ..TargetPolicy::default()
        };
        assert_eq!(
            chosen_name(&choose(&d, &by_model, GIB, None, Some("sda"))),
            "nvme0n1"
        );
        let by_size = TargetPolicy {
            min_size: Some(ByteSize(500 * GIB)),
            max_size: Some(ByteSize(2000 * GIB)),
            ..TargetPolicy::default()
        };
        let sel = choose(&d, &by_size, GIB, None, Some("sda"));
        assert_eq!(chosen_name(&sel), "nvme1n1");
        assert!(why(&sel, "nvme0n1").contains("below target.min_size"));
    }

    #[test]
    fn read_only_and_held_disks_never_chosen() {
        let mut ro = FakeDisk::nvme(0, 512, "S1");
        ro.ro = true;
        let mut held = FakeDisk::sata("sdb", 1, 512, "WD1");
        held.holders = vec!["md127".into()];
        let d = disks(&[stick(), ro, held]);
        let sel = choose(&d, &TargetPolicy::default(), GIB, None, Some("sda"));
        assert!(matches!(sel, Selection::NoCandidate { .. }));
        assert_eq!(why(&sel, "nvme0n1"), "read-only");
        assert!(why(&sel, "sdb").contains("held by md127"));
    }

    #[test]
    fn selection_serializes_for_the_report() {
        let d = disks(&[stick(), FakeDisk::nvme(0, 512, "S1")]);
        let sel = choose(&d, &TargetPolicy::default(), GIB, None, Some("sda"));
        let v = serde_json::to_value(&sel).unwrap();
        assert_eq!(v["outcome"], "chosen");
        assert_eq!(v["disk"]["name"], "nvme0n1");
        assert_eq!(
            v["rejected"][0]["why"],
            "the provisioning stick: never a target"
        );
    }
}
