//! imprint: the host command line. Parses arguments and dispatches each subcommand to one
//! library function; errors are printed with their whole chain and mapped to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod bootfiles;
mod commands;
mod fetch;
mod flash;
mod manual;
mod netboot;
mod output;
mod picker;
mod prepare;
mod progress;
mod reports;
mod sign;
mod stick;
mod units;

/// imprint: provision bare-metal machines from a USB stick, and write OS images to disks with
/// verified direct writes.
#[derive(Debug, Parser)]
#[command(name = "imprint", version, about, long_about = None)]
#[command(
    after_help = "Exit status: 0 success; 1 other error (including an input file that is missing, \
unreadable or not a regular file); 2 usage; 3 the image is bad \
(corrupt, truncated, not an imprint image, or its signature does not check out with --trust); 4 the target was refused before anything was written \
(missing, a file without --to-file, too small, in use, busy, permission denied, wrong sector size, not confirmed); 5 the target failed (I/O error, \
read-back mismatch while writing); 6 `verify`: the target does not hold the image; 7 the image could not be downloaded \
(HTTP error, server unreachable or gone, or the file changed on the server).

With --json, the result is JSON on standard output and an error (usage errors included) is one \
line on standard error: {\"event\":\"error\",\"ok\":false,\"exit_code\":N,\"error\":\"...\",\"causes\":[...]}. \
Sizes and rates are in binary units (KiB, MiB, GiB; MiB/s); JSON gives bytes and seconds."
)]
struct Cli {
    /// Say only errors and the final result line (no progress, no notes).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Say more: each phase's size, time and rate, where the boot files were looked for, what
    /// was read and made.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make an imprint image (.img.zst with manifest) from a raw, zstd, xz, gzip or qcow2 disk image.
    Prepare(prepare::PrepareArgs),
    /// Make a minisign key pair for signing images: NAME.key (secret) and NAME.pub (public).
    ///
    /// Without --password-file the secret key is stored unencrypted (mode 0600): keep it off
    /// shared machines, or use --password-file. Existing files are never overwritten. See
    /// docs/signing.md.
    Keygen {
        /// Base name of the key files.
        #[arg(short, long, value_name = "NAME")]
        output: PathBuf,
        /// Protect the secret key with the password on the first line of this file.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Print the key id, the files and the public key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an imprint image to a disk (or a file), verify it, and make it bootable.
    ///
    /// Refuses before writing anything if the target is too small, in use (mounted, swap, held by
    /// LVM/RAID), not openable exclusively, or has another logical sector size than the image.
    /// The partition table is written last, after the whole image was read back and matched: a
    /// failed or interrupted write leaves a disk with no partition table.
    Write {
        /// The imprint image (.img.zst): a file, or an http:// or https:// URL (streamed,
        /// resuming over dropped connections).
        image: PathBuf,
        /// Whole-disk block device (or, with --to-file, a regular file).
        target: PathBuf,
        /// Allow TARGET to be a regular file, created if missing (never under /dev).
        #[arg(long)]
        to_file: bool,
        /// Check the image's signature against this minisign public key (.pub file) before
        /// touching the target; may be given more than once. Without it, a signature is not
        /// checked (the result says so).
        #[arg(long, value_name = "PUBFILE")]
        trust: Vec<PathBuf>,
        /// Skip reading the target back (the stream is still checked against the manifest).
        #[arg(long)]
        no_verify: bool,
        /// Read the whole compressed payload and check its digest before touching the target.
        #[arg(long)]
        precheck: bool,
        /// Do not ask for confirmation before overwriting a block device.
        #[arg(short, long)]
        yes: bool,
        /// Print JSON progress events and a JSON result on standard output.
        #[arg(long)]
        json: bool,
        /// The sha256 the whole image file must have (as `sha256sum` prints it); checked as
        /// the image streams, before the partition table is written.
        #[arg(long, value_name = "HEX", value_parser = fetch::parse_sha256)]
        sha256: Option<String>,
    },
    /// Check that a disk (or file) holds an imprint image.
    Verify {
        /// The imprint image (.img.zst), or its http:// or https:// URL.
        image: PathBuf,
        /// Whole-disk block device or regular file.
        target: PathBuf,
        /// Print JSON progress events and a JSON result on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Build a provisioning stick image file: a FAT32 EFI System Partition with the live image's
    /// boot chain, config and seed, and a partition holding IMAGE.
    ///
    /// Config, seed and image are checked before anything is written. Write the result to a USB
    /// stick with Etcher, dd, or `imprint flash`.
    Build {
        #[command(flatten)]
        stick: StickArgs,
        /// The stick image file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Print the stick's layout as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build the provisioning stick and write it to a USB device, verified.
    ///
    /// Refuses a device that is not USB or removable (unless --force), or that is mounted,
    /// used as swap or held by another device; shows model, size and serial and asks first
    /// (unless --yes). Without DEVICE, on a terminal: choose from a list of the USB and
    /// removable disks (model, size, serial).
    Flash {
        #[command(flatten)]
        stick: StickArgs,
        /// The USB stick (whole disk, e.g. /dev/sdb) [default: choose from a list].
        device: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
        /// Allow a device that is neither USB nor removable.
        #[arg(long)]
        force: bool,
        /// Print JSON progress events and a JSON result on standard output.
        #[arg(long)]
        json: bool,
    },
    /// List this machine's disks as the appliance sees them, and which one it would choose.
    ///
    /// Runs the appliance's discovery and target policy (from --config, or the defaults) on
    /// this machine without touching anything: a dry run for a NUC booted into any Linux.
    /// Exits with 4 when no disk qualifies (the appliance would not install).
    Disks {
        /// Appliance configuration (JSON) whose `target` policy to apply [default: defaults].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also check the disks against this image's size and sector size.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Print the disks and the decision as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the fleet from the appliance's reports: machine, hostname, status, image, when,
    /// how long, target disk.
    ///
    /// SOURCE is a folder of report files, a mounted stick (its imprint/reports/), or a stick
    /// image file or device (read only). Failed runs are listed with their error below the table.
    Reports {
        /// Folder, mounted stick, stick image or stick device.
        source: PathBuf,
        /// Print the rows as JSON.
        #[arg(long)]
        json: bool,
        /// Print a config.json fragment with a seed.machines entry for every machine seen
        /// (from inventory or install reports): fill in hostnames and addresses, then merge it
        /// into your config.
        #[arg(long, conflicts_with = "json")]
        machines: bool,
    },
    /// Show an imprint image's manifest.
    Inspect {
        /// The imprint image (.img.zst), or its http:// or https:// URL.
        image: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
        /// Also read the compressed payload and check its sha256.
        #[arg(long)]
        check: bool,
        /// Check the image's signature against this minisign public key (.pub file); may be
        /// given more than once.
        #[arg(long, value_name = "PUBFILE")]
        trust: Vec<PathBuf>,
    },
    /// Provision machines over the network: a static tree for any HTTP server, or served here.
    #[command(subcommand)]
    Netboot(netboot::NetbootCommand),
    /// Print the shell completion script for SHELL on standard output.
    ///
    /// bash: `imprint completions bash > /etc/bash_completion.d/imprint`;
    /// zsh: `imprint completions zsh > "${fpath[1]}/_imprint"`;
    /// fish: `imprint completions fish > ~/.config/fish/completions/imprint.fish`.
    /// The .deb and the release tarball already carry all three.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: manual::CompletionShell,
    },
    /// Print the man page (roff) on standard output, or write every page into --dir.
    ///
    /// Read it with `imprint man | man -l -`. With --dir: imprint.1 and one page per subcommand
    /// (imprint-build.1, ...), as the .deb and the release tarball carry them.
    Man {
        /// Write imprint.1 and the subcommands' pages into this folder.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// What goes onto a provisioning stick (`build` and `flash`).
#[derive(Debug, clap::Args)]
struct StickArgs {
    /// The imprint image (.img.zst) the stick installs.
    #[arg(long)]
    image: PathBuf,
    /// Folder of cloud-init NoCloud templates (user-data, meta-data, network-config).
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Appliance configuration (JSON) [default: the built-in defaults].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The live image's boot files [default: $IMPRINT_BOOT, else <binary's folder>/../share/imprint/boot, else /usr/share/imprint/boot, else build/boot of a checkout].
    #[arg(long, value_name = "DIR")]
    boot: Option<PathBuf>,
}

impl StickArgs {
    fn into_build(self, output: PathBuf) -> anyhow::Result<stick::BuildOptions> {
        Ok(stick::BuildOptions {
            boot: bootfiles::locate(self.boot)?,
            image: self.image,
            seed: self.seed,
            config: self.config,
            output,
        })
    }
}

/// When this process started (as near as `main` can tell): where `imprint write` counts its
/// time to the first byte on the disk from.
fn started() -> std::time::Instant {
    static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *STARTED.get_or_init(std::time::Instant::now)
}

impl Command {
    /// Whether the user asked for JSON (then errors are JSON too).
    fn json(&self) -> bool {
        match self {
            Command::Prepare(args) => args.json,
            Command::Keygen { json, .. }
            | Command::Write { json, .. }
            | Command::Verify { json, .. }
            | Command::Build { json, .. }
            | Command::Flash { json, .. }
            | Command::Disks { json, .. }
            | Command::Reports { json, .. }
            | Command::Inspect { json, .. } => *json,
            Command::Netboot(netboot::NetbootCommand::Serve(args)) => args.json,
            Command::Completions { .. } | Command::Man { .. } | Command::Netboot(_) => false,
        }
    }
}

/// A command line clap cannot parse: clap's own message and exit status 2, or with `--json`
/// anywhere on the line, the same JSON error object as any other error. Help and version
/// requests print as usual.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let asked_json = std::env::args_os().any(|a| a == "--json");
    if !asked_json
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        e.exit();
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    let code = 2;
    commands::print_error(&anyhow::anyhow!("{message}"), code, true);
    ExitCode::from(code)
}

fn main() -> ExitCode {
    started();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    output::set_level(if cli.quiet {
        output::Level::Quiet
    } else if cli.verbose {
        output::Level::Verbose
    } else {
        output::Level::Normal
    });
    // `netboot serve` stops on Ctrl-C and SIGTERM itself (it ends dnsmasq and cleans its
    // folder); every other command removes its temporary files and exits.
    if !matches!(
        cli.command,
        Command::Netboot(netboot::NetbootCommand::Serve(_))
    ) {
        commands::remove_temporaries_on_signals();
    }
    let json = cli.command.json();
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare(&args),
        Command::Keygen {
            output,
            password_file,
            json,
        } => commands::keygen(&output, password_file.as_deref(), json),
        Command::Write {
            image,
            target,
            no_verify,
            precheck,
            yes,
            json,
            to_file,
            trust,
            sha256,
        } => commands::write(
            &image,
            &target,
            !no_verify,
            precheck,
            yes,
            json,
            to_file,
            &trust,
            sha256.as_deref(),
        ),
        Command::Verify {
            image,
            target,
            json,
        } => commands::verify(&image, &target, json),
        Command::Build {
            stick,
            output,
            json,
        } => stick
            .into_build(output)
            .and_then(|opts| commands::build(&opts, json)),
        Command::Flash {
            stick,
            device,
            yes,
            force,
            json,
        } => stick.into_build(PathBuf::new()).and_then(|build| {
            let device = match device {
                Some(device) => device,
                None => picker::pick(std::path::Path::new("/sys"))?,
            };
            flash::flash(&flash::FlashOptions {
                build,
                device,
                yes,
                force,
                json,
            })
        }),
        Command::Disks {
            config,
            image,
            json,
        } => commands::disks(config.as_deref(), image.as_deref(), json),
        Command::Reports {
            source,
            json,
            machines,
        } => reports::reports(&source, json, machines),
        Command::Inspect {
            image,
            json,
            check,
            trust,
        } => commands::inspect(&image, json, check, &trust),
        Command::Netboot(cmd) => netboot::run(cmd),
        Command::Completions { shell } => {
            manual::completions(Cli::command(), shell, &mut std::io::stdout().lock())
        }
        Command::Man { dir } => manual::man(
            Cli::command(),
            dir.as_deref(),
            &mut std::io::stdout().lock(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = commands::exit_code(&e);
            commands::print_error(&e, code, json);
            ExitCode::from(code)
        }
    }
}
