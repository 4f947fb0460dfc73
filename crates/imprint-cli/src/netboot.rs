//! `imprint netboot render`: the static tree a plain HTTP server (nginx, caddy, Apache) serves,
//! or an S3-compatible bucket holds, so machines without a stick install over the network.
//!
//! ```text
//! bootx64.efi        Debian's Microsoft-signed shim: the UEFI HTTP boot entry point
//! grubx64.efi        Debian 13's signed network GRUB (HTTP), which shim loads from its folder
//! grub/grub.cfg      GRUB's config (its prefix is /grub beside shim): kernel + initrd over HTTP,
//!                    `imprint.url=URL` on the kernel command line
//! vmlinuz            the Debian-signed kernel
//! initrd.img         the appliance's initramfs (the same as on a stick)
//! config.json        the appliance configuration
//! seed/              the cloud-init NoCloud templates
//! image.img.zst      the imprint image
//! reports/           empty: appliances PUT their reports to reports/<machine>/<install-id>.json
//! dnsmasq.conf       proxy-DHCP beside the network's own DHCP server (not served)
//! tftp/              shim, GRUB and grub.cfg only, for PXE firmware without HTTP boot
//! presigned/         with --s3 only: each machine's presigned report upload URLs ([`s3`])
//! ```
//!
//! Every input is checked (as `imprint build` checks them) before anything is written; the tree
//! is written into a fresh folder beside the output and renamed into place when complete.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use imprint_core::manifest::Image;

pub mod serve;
use imprint_core::seed::{self, META_DATA, NETWORK_CONFIG, USER_DATA};

pub mod s3;

/// Where image-build/build puts Debian 13's network GRUB in the boot folder.
pub const NET_GRUB: &str = "netboot/grubx64.efi";
/// The boot files render needs from the boot folder.
pub const NET_BOOT_FILES: &[&str] = &["EFI/BOOT/BOOTX64.EFI", NET_GRUB, "vmlinuz", "initrd.img"];
/// The image's name in the tree (the appliance fetches `URL/IMAGE_NAME`).
pub const IMAGE_NAME: &str = "image.img.zst";
/// The kernel command-line parameter that puts the appliance in network mode.
pub const URL_PARAM: &str = "imprint.url";

/// `imprint netboot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum NetbootCommand {
    /// Write a static netboot tree for any HTTP server (or S3 bucket) serving it at URL.
    ///
    /// The tree: bootx64.efi (Debian's signed shim; point UEFI HTTP boot at URL/bootx64.efi),
    /// grubx64.efi (Debian 13's signed network GRUB), grub/grub.cfg, vmlinuz, initrd.img,
    /// config.json, seed/, image.img.zst, an empty reports/ (the server must accept PUT
    /// there, e.g. nginx `dav_methods PUT; create_full_put_path on;`), dnsmasq.conf for
    /// proxy-DHCP beside the network's own DHCP server, and tftp/ (shim and GRUB only) for PXE
    /// firmware without HTTP boot. Config, seed and image are checked first; OUTPUT must not
    /// exist or be an empty folder. With --s3 the tree is for an S3 bucket (public read) and
    /// presigned/ holds each machine's signed report upload URLs. See docs/netboot.md.
    Render(RenderArgs),
    /// Render the tree for this host and serve it: proxy-DHCP and HTTP, with a live table.
    ///
    /// Renders the tree (as `render` does) for http://ADDRESS:PORT/, ADDRESS being the IPv4
    /// address of --interface; runs the system's dnsmasq for proxy-DHCP on that interface as a
    /// child (stopped with serve; if it exits, serve says so and stops); serves the tree over
    /// HTTP with Range, and accepts PUT only for reports/<mac>/<name>.json (at most 1 MiB,
    /// written whole into --reports). Shows one row per machine — MAC, hostname, phase,
    /// progress, rate, result — from the progress events and reports machines send; off a
    /// terminal one line per event on standard output (--json: one JSON object per line).
    /// Every other request is logged on standard error (client, method, path, range, status,
    /// length; --json: on standard output). Needs root (dnsmasq's DHCP ports). Ctrl-C or
    /// SIGTERM stops it. See docs/netboot.md.
    Serve(serve::ServeArgs),
}

/// What a tree is made of: the same for `render` and `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct TreeInputs {
    /// The imprint image (.img.zst) machines install.
    #[arg(long)]
    pub image: PathBuf,
    /// Folder of cloud-init NoCloud templates (user-data, meta-data, network-config).
    #[arg(long)]
    pub seed: PathBuf,
    /// Appliance configuration (JSON) [default: the built-in defaults].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The live image's boot files [default: as for `imprint build`]; needs netboot/grubx64.efi
    /// (image-build/build fetches it from Debian 13).
    #[arg(long, value_name = "DIR")]
    pub boot: Option<PathBuf>,
}

/// Arguments of `imprint netboot render` (`serve` fills them in for its own tree).
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub inputs: TreeInputs,
    /// Where the tree will be served: http://HOST[:PORT]/ — the server's root (plain HTTP:
    /// GRUB and the appliance have no TLS; a sub-path is refused, shim mishandles it).
    #[arg(long)]
    pub url: String,
    /// The network proxy-DHCP answers on, as ADDRESS/PREFIX (e.g. 192.168.1.0/24)
    /// [default: URL's host address with /24]; needed when HOST is a name.
    #[arg(long, value_name = "CIDR")]
    pub subnet: Option<String>,
    /// The folder to create.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub s3: s3::S3Args,
}

/// Runs an `imprint netboot` subcommand.
pub fn run(cmd: NetbootCommand) -> Result<()> {
    match cmd {
        NetbootCommand::Render(args) => {
            let boot = crate::bootfiles::locate(args.inputs.boot.clone())?;
            render(&args, &boot)
        }
        NetbootCommand::Serve(args) => serve::serve(&args),
    }
}

/// A checked base URL: `http://HOST[:PORT]` (no trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host` or `host:port`, as GRUB's `(http,AUTHORITY)` wants it.
    pub authority: String,
    /// The host alone.
    pub host: String,
}

impl BaseUrl {
    /// Parses and checks a render URL.
    pub fn parse(url: &str) -> Result<BaseUrl> {
        let shown = crate::commands::untrusted(&imprint_core::remote::redact_url(url));
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            bail!("--url {shown}: https is not possible here: GRUB and the appliance fetch over plain http (serve the tree over http; the image's digests and an optional signature protect it)");
        } else {
            bail!("--url {shown}: not an http:// URL");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        ensure!(
            !authority.contains('@'),
            "--url {shown}: user names and passwords cannot be in the URL (it is on every machine's kernel command line)"
        );
        ensure!(
            !path.contains('?') && !path.contains('#'),
            "--url {shown}: a query or fragment is not allowed (the URL is on every machine's kernel command line)"
        );
        ensure!(
            path.is_empty() || path == "/",
            "--url {shown}: the tree must be served at the server's root (http://HOST[:PORT]/): served from a sub-path, shim asks for a wrong GRUB path and GRUB finds no config"
        );
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("--url {shown}: bad port {p:?}"))?;
                (h, Some(port))
            }
            None => (authority, None),
        };
        ensure!(
            !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|l| !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
            "--url {shown}: bad host name {:?} (an IPv4 address or a DNS name)",
            crate::commands::untrusted(host)
        );
        Ok(BaseUrl {
            authority: match port {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            },
            host: host.to_owned(),
        })
    }

    /// `http://AUTHORITY`.
    pub fn base(&self) -> String {
        format!("http://{}", self.authority)
    }
}

/// Parses `A.B.C.D/N` (or takes the URL host with /24) into (address, netmask).
fn subnet(spec: Option<&str>, url: &BaseUrl) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    let (addr, prefix) = match spec {
        Some(s) => {
            let (a, p) = s
                .split_once('/')
                .with_context(|| format!("--subnet {s:?}: expected ADDRESS/PREFIX"))?;
            let a: std::net::Ipv4Addr = a
                .parse()
                .with_context(|| format!("--subnet {s:?}: bad IPv4 address"))?;
            let p: u32 = p
                .parse()
                .ok()
                .filter(|p| (1..=32).contains(p))
                .with_context(|| format!("--subnet {s:?}: bad prefix length"))?;
            (a, p)
        }
        None => match url.host.parse::<std::net::Ipv4Addr>() {
            Ok(a) => (a, 24),
            Err(_) => bail!(
                "--url names the host {:?}, not an address: pass --subnet ADDRESS/PREFIX for proxy-DHCP",
                url.host
            ),
        },
    };
    let mask = u32::MAX << (32 - prefix);
    Ok((
        std::net::Ipv4Addr::from(u32::from(addr) & mask),
        std::net::Ipv4Addr::from(mask),
    ))
}

/// The grub.cfg the network GRUB reads: one entry, kernel and initrd over HTTP from the tree.
///
/// No per-machine section: the appliance finds its own entry in config.json (by MAC, DMI
/// serial or UUID) and GRUB hands it the booting NIC's MAC (`imprint.mac=`), so one entry
/// serves the fleet.
pub fn grub_cfg(url: &BaseUrl) -> String {
    let a = &url.authority;
    let base = url.base();
    format!(
        "# imprint netboot (written by `imprint netboot render`). GRUB fetched this file over HTTP\n\
         # (or TFTP); the kernel and initramfs always come over HTTP from {base}.\n\
         set timeout=2\n\
         set default=0\n\
         # panic=0: a kernel panic stays on screen instead of rebooting into another netboot.\n\
         # imprint.mac: the NIC the firmware booted from; the appliance asks DHCP on it.\n\
         menuentry \"imprint: provision this machine over the network\" --id provision {{\n\
         \x20   linux (http,{a})/vmlinuz console=tty0 console=ttyS0,115200 panic=0 {URL_PARAM}={base} imprint.mac=$net_default_mac\n\
         \x20   initrd (http,{a})/initrd.img\n\
         }}\n"
    )
}

/// dnsmasq's proxy-DHCP configuration for the tree (see docs/netboot.md and
/// shared/DESIGN.md "Netboot" for what each line was measured to need).
pub fn dnsmasq_conf(
    url: &BaseUrl,
    net: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
    tftp_root: &Path,
) -> String {
    let boot = format!("{}/bootx64.efi", url.base());
    format!(
        "# imprint netboot: proxy-DHCP (written by `imprint netboot render`).\n\
         # Runs beside the network's own DHCP server (a home router): it hands out no addresses,\n\
         # it only tells booting machines where to boot from.\n\
         #   dnsmasq --conf-file=dnsmasq.conf --keep-in-foreground   (as root)\n\
         # No DNS service.\n\
         port=0\n\
         log-dhcp\n\
         dhcp-range={net},proxy,{mask}\n\
         # UEFI HTTP boot clients (architecture 16) get the shim's URL; without\n\
         # dhcp-pxe-vendor proxy mode ignores HTTPClient requests (dnsmasq >= 2.83).\n\
         dhcp-pxe-vendor=PXEClient,HTTPClient\n\
         dhcp-match=set:efihttp,option:client-arch,16\n\
         dhcp-boot=tag:efihttp,{boot}\n\
         pxe-service=tag:efihttp,x86-64_EFI,\"imprint\",{boot}\n\
         # Firmware without HTTP boot: PXE, with shim and GRUB over TFTP from tftp/ (nothing\n\
         # else is there); GRUB then loads the kernel and initramfs over HTTP. If the tree\n\
         # moves, change tftp-root; delete these three lines to serve HTTP boot only.\n\
         enable-tftp\n\
         tftp-root={}\n\
         pxe-service=tag:!efihttp,x86-64_EFI,\"imprint (PXE)\",bootx64.efi\n",
        tftp_root.display()
    )
}

/// Checks every input and writes the tree at `args.output`.
pub fn render(args: &RenderArgs, boot: &Path) -> Result<()> {
    let url = BaseUrl::parse(&args.url)?;
    let (net, mask) = subnet(args.subnet.as_deref(), &url)?;
    let out = &args.output;
    match fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => {
            let mut entries =
                fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
            ensure!(
                entries.next().is_none(),
                "{} exists and is not empty: choose a new folder (render never overwrites)",
                out.display()
            );
        }
        Ok(_) => bail!(
            "{} exists and is not a folder: choose a new folder",
            out.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", out.display())),
    }

    // Inputs, checked as `imprint build` checks them.
    let (config, require_signature) = crate::stick::config_bytes(args.inputs.config.as_deref())?;
    seed::check_seed_dir_for_build(&args.inputs.seed)?;
    let mut seed_files = Vec::new();
    for name in [USER_DATA, META_DATA, NETWORK_CONFIG] {
        let path = args.inputs.seed.join(name);
        if path.symlink_metadata().is_ok() {
            let data = imprint_core::input::read_bounded_no_symlink(
                &path,
                imprint_core::input::limits::SEED_FILE,
            )
            .with_context(|| format!("reading {}", path.display()))?;
            seed_files.push((name, data));
        }
    }
    let presigned = if args.s3.s3 {
        let parsed: imprint_core::config::Config =
            serde_json::from_slice(&config).context("reading the configuration")?;
        Some(s3::presign(&args.s3, &url, &parsed)?)
    } else {
        None
    };
    let image = Image::open(&args.inputs.image)?;
    if require_signature && image.signature().is_none() {
        return Err(imprint_core::signature::SignatureError::Unsigned {
            path: args.inputs.image.clone(),
        }
        .into());
    }
    for rel in NET_BOOT_FILES {
        let path = boot.join(rel);
        ensure!(
            path.is_file(),
            "{} is missing: build the live image's boot files with image-build/build (it fetches Debian 13's network GRUB), or pass --boot DIR",
            path.display()
        );
    }

    // Written beside the output, renamed into place when whole.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a folder name", out.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a folder in {}", parent.display()))?;
    let dir = tmp.path();
    let final_abs =
        std::path::absolute(out).with_context(|| format!("resolving {}", out.display()))?;

    let copy = |from: &Path, rel: &str| -> Result<()> {
        let to = dir.join(rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting the mode of {}", to.display()))?;
        Ok(())
    };
    let write = |rel: &str, data: &[u8]| -> Result<()> {
        let to = dir.join(rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        fs::write(&to, data).with_context(|| format!("writing {}", to.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting the mode of {}", to.display()))
    };
    let grub = grub_cfg(&url);
    for sub in ["", "tftp/"] {
        copy(
            &boot.join("EFI/BOOT/BOOTX64.EFI"),
            &format!("{sub}bootx64.efi"),
        )?;
        copy(&boot.join(NET_GRUB), &format!("{sub}grubx64.efi"))?;
        write(&format!("{sub}grub/grub.cfg"), grub.as_bytes())?;
    }
    copy(&boot.join("vmlinuz"), "vmlinuz")?;
    copy(&boot.join("initrd.img"), "initrd.img")?;
    write("config.json", &config)?;
    for (name, data) in &seed_files {
        write(&format!("seed/{name}"), data)?;
    }
    fs::create_dir_all(dir.join("seed")).context("creating seed/")?;
    fs::create_dir_all(dir.join("reports")).context("creating reports/")?;
    copy(&args.inputs.image, IMAGE_NAME)?;
    for (rel, data) in presigned.iter().flat_map(|p| &p.files) {
        write(rel, data)?;
    }
    if presigned.is_some() {
        fs::set_permissions(dir.join("presigned"), fs::Permissions::from_mode(0o755))
            .context("setting the mode of presigned/")?;
    }
    write(
        "dnsmasq.conf",
        dnsmasq_conf(&url, net, mask, &final_abs.join("tftp")).as_bytes(),
    )?;
    for d in ["", "grub", "seed", "reports", "tftp", "tftp/grub"] {
        fs::set_permissions(dir.join(d), fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", dir.join(d).display()))?;
    }
    // rename(2) replaces an empty folder; a non-empty one (raced in meanwhile) fails it.
    let tmp_path = tmp.keep();
    if let Err(e) = fs::rename(&tmp_path, out) {
        let _ = fs::remove_dir_all(&tmp_path);
        return Err(e).with_context(|| format!("renaming the tree into {}", out.display()));
    }
    eprintln!(
        "imprint: netboot tree {} for {}: image {} ({} bytes); point UEFI HTTP boot at {}/bootx64.efi or run dnsmasq -C {}/dnsmasq.conf for proxy-DHCP",
        out.display(),
        url.base(),
        crate::commands::untrusted(&image.manifest().name),
        fs::metadata(out.join(IMAGE_NAME)).map(|m| m.len()).unwrap_or(0),
        url.base(),
        out.display()
    );
    for line in presigned.iter().flat_map(|p| &p.summary) {
        eprintln!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_are_checked() {
        let u = BaseUrl::parse("http://192.168.1.5:8080/").unwrap();
        assert_eq!(u.authority, "192.168.1.5:8080");
        assert_eq!(u.base(), "http://192.168.1.5:8080");
        assert_eq!(
            BaseUrl::parse("http://boot.lan").unwrap().base(),
            "http://boot.lan"
        );
        for (bad, why) in [
            ("https://x/", "https is not possible"),
            ("ftp://x/", "not an http:// URL"),
            ("x/", "not an http:// URL"),
            ("http://u:secret@x/", "user names and passwords"),
            ("http://x/?sig=secret", "query"),
            ("http://x/imprint/", "server's root"),
            ("http://x:0/", "bad port"),
            ("http://x:99999/", "bad port"),
            ("http://x y/", "bad host"),
            ("http:///", "bad host"),
        ] {
            let e = format!("{:#}", BaseUrl::parse(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }

    #[test]
    fn subnets() {
        let u = BaseUrl::parse("http://10.1.2.3:8080/").unwrap();
        let (n, m) = subnet(None, &u).unwrap();
        assert_eq!(
            (n.to_string(), m.to_string()),
            ("10.1.2.0".into(), "255.255.255.0".into())
        );
        let (n, m) = subnet(Some("172.16.5.9/16"), &u).unwrap();
        assert_eq!(
            (n.to_string(), m.to_string()),
            ("172.16.0.0".into(), "255.255.0.0".into())
        );
        assert!(subnet(None, &BaseUrl::parse("http://boot.lan/").unwrap()).is_err());
        assert!(subnet(Some("10.0.0.0/33"), &u).is_err());
        assert!(subnet(Some("10.0.0.0"), &u).is_err());
    }

    #[test]
    fn grub_cfg_puts_the_url_on_the_kernel_command_line() {
        let cfg = grub_cfg(&BaseUrl::parse("http://10.0.0.1:8080").unwrap());
        assert!(cfg.contains("linux (http,10.0.0.1:8080)/vmlinuz "), "{cfg}");
        assert!(cfg.contains(" imprint.url=http://10.0.0.1:8080 "), "{cfg}");
        assert!(cfg.contains("imprint.mac=$net_default_mac\n"), "{cfg}");
        assert!(
            cfg.contains("initrd (http,10.0.0.1:8080)/initrd.img\n"),
            "{cfg}"
        );
    }
}
