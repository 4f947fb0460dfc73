//! Where an install comes from: the stick (its ESP mounted, the image in its payload partition)
//! or the network ([`crate::net`], `imprint.url=` on the kernel command line). The install flow
//! reads config and seed from [`Medium::path`] (the same layout for both), opens the image with
//! [`Medium::image`] and hands reports to [`Medium::save_report`]; everything else — target
//! policy, verified write, seed, boot order — is the same code for both.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use imprint_core::manifest::Image;
use imprint_core::report::Report;
use imprint_core::stick::REPORTS_DIR;

use crate::boot::BootEnv;
use crate::console::Consoles;
use crate::mount::Mount;
use crate::net::events::{self, Events};
use crate::net::{self, Network};

/// The source of an install.
#[derive(Debug)]
pub enum Medium {
    /// The stick's ESP, mounted.
    Stick(Mount),
    /// A server, reached over the network.
    Net(Network),
    /// The flow tests' stick: its ESP as a plain folder (nothing to mount).
    #[cfg(test)]
    Folder(std::path::PathBuf),
}

impl Medium {
    /// The network when the kernel command line names a URL, else the stick.
    pub fn open(env: &BootEnv, consoles: &mut Consoles) -> Result<Medium> {
        match env.cmdline.get(net::URL_PARAM) {
            Some(url) => Ok(Medium::Net(
                Network::start(env, consoles, url).context("starting the network")?,
            )),
            None => Ok(Medium::Stick(crate::stick::mount_stick(env)?)),
        }
    }

    /// A folder laid out like the stick's ESP: `imprint/config.json`, `imprint/seed/`.
    pub fn path(&self) -> &Path {
        match self {
            Medium::Stick(m) => m.path(),
            Medium::Net(n) => n.path(),
            #[cfg(test)]
            Medium::Folder(p) => p,
        }
    }

    /// True for the stick (what the stick's hand-over records need).
    pub fn is_stick(&self) -> bool {
        match self {
            Medium::Stick(_) => true,
            Medium::Net(_) => false,
            #[cfg(test)]
            Medium::Folder(_) => true,
        }
    }

    /// The disk the install came from, never a target (the stick's disk; none over the network).
    pub fn own_disk<'a>(&self, env: &'a BootEnv) -> Option<&'a str> {
        match self {
            Medium::Net(_) => None,
            _ => env.esp.as_ref().map(|e| e.disk.as_str()),
        }
    }

    /// The run's progress events (network mode; nowhere for the stick).
    pub fn events(&self) -> &Events {
        match self {
            Medium::Net(n) => n.events(),
            _ => &events::OFF,
        }
    }

    /// The image to install.
    pub fn image(&self, env: &BootEnv) -> Result<Image> {
        match self {
            Medium::Net(n) => n.image(),
            _ => {
                let esp = env
                    .esp
                    .as_ref()
                    .ok_or_else(|| anyhow!("the stick's ESP is unknown"))?;
                let payload = crate::stick::payload_partition(&env.roots, &esp.disk)?;
                // Not fatal: only slower without it.
                let _ = crate::stick::raise_read_ahead(
                    &env.roots,
                    &esp.disk,
                    crate::stick::STICK_READ_AHEAD_KB,
                );
                Image::open(&payload).with_context(|| {
                    format!("opening the image on the stick ({})", payload.display())
                })
            }
        }
    }

    /// Writes the report: to the stick, or `PUT` to the server (and kept in memory's folder).
    pub fn save_report(&self, consoles: &mut Consoles, rep: &Report) {
        match self {
            Medium::Stick(m) => crate::stick::save_report(consoles, rep, m.path()),
            #[cfg(test)]
            Medium::Folder(p) => crate::stick::save_report(consoles, rep, p),
            Medium::Net(n) => {
                // A local copy too: the hand-over checks read reports from the medium's folder.
                let _ = rep.save(&n.path().join(REPORTS_DIR));
                match n.put_report(rep) {
                    Ok(url) => consoles.line(&format!("imprint: report sent to {url}")),
                    Err(e) => consoles.line(&format!("imprint: could not send the report: {e:#}")),
                }
                // The last progress event, after the report it points at (bounded wait).
                n.events().finish(rep.status, rep.error.as_deref());
            }
        }
    }

    /// Unmounts the stick; nothing to do for the network.
    pub fn close(self) -> Result<()> {
        match self {
            Medium::Stick(m) => m.unmount(),
            Medium::Net(_) => Ok(()),
            #[cfg(test)]
            Medium::Folder(_) => Ok(()),
        }
    }
}
