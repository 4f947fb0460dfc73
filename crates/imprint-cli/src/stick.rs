//! `imprint build`: a provisioning stick as an image file (for Etcher, `dd`, or `imprint flash`).
//!
//! Layout (512-byte sectors, everything 1 MiB aligned):
//!
//! | GPT # | name              | type                    | content                               |
//! |-------|-------------------|-------------------------|---------------------------------------|
//! | 1     | `IMPRINT`         | EFI System Partition    | FAT32 labelled `IMPRINT`: boot chain, `imprint/config.json`, `imprint/seed/`, `imprint/reports/` |
//! | 2     | `imprint-payload` | [`PAYLOAD_TYPE_GUID`]   | the `.img.zst` image, byte for byte   |
//!
//! The FAT is written with `fatfs` and the partition table with `gpt`: no mkfs, no mounts, no
//! root. Config, seed, image and boot files are all checked before the output is created, and
//! the output appears under its name only once complete (a fresh, exclusively created
//! `.OUTPUT.….partial` beside it, then rename; a planted file or link there is never followed).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::partition::Partition;
use gpt::partition_types::{OperatingSystem, Type};
use imprint_core::blockdev::PartitionSlice;
use imprint_core::config::Config;
use imprint_core::manifest::Image;
use imprint_core::seed::{self, META_DATA, NETWORK_CONFIG, USER_DATA};
use imprint_core::stick::{
    CONFIG_PATH, ESP_LABEL, PAYLOAD_PART_NAME, PAYLOAD_TYPE_GUID, REPORTS_DIR, SEED_DIR,
};
use uuid::Uuid;

/// Sector size of the stick image: USB sticks present 512-byte logical sectors.
pub const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// Free space left on the ESP for the appliance's reports (JSON, a few KiB each) and for users
/// adding files.
pub const REPORTS_ROOM: u64 = 16 * MIB;
/// FAT32 needs at least 65525 clusters; with 512-byte clusters that is 32 MiB plus the FATs.
/// Firmware is only required to read FAT32 on fixed disks, so the ESP is FAT32 even when FAT16
/// would fit.
pub const ESP_MIN: u64 = 40 * MIB;
/// The token in the boot directory's grub.cfg that becomes the ESP's PARTUUID.
pub const PARTUUID_TOKEN: &str = "@ESP_PARTUUID@";
/// The grub.cfg the signed GRUB reads (its built-in prefix is /EFI/debian).
pub const GRUB_CFG: &str = "EFI/debian/grub.cfg";
/// The boot directory's folder of netboot-only files (Debian 13's network GRUB), left off sticks.
pub const NETBOOT_DIR: &str = "netboot/";
/// Files a boot directory must hold (image-build/build makes them).
pub const BOOT_FILES: &[&str] = &[
    "EFI/BOOT/BOOTX64.EFI",
    "EFI/BOOT/grubx64.efi",
    GRUB_CFG,
    "vmlinuz",
    "initrd.img",
];

/// What `imprint build` is asked to do.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The imprint image (`.img.zst`) for the payload partition.
    pub image: PathBuf,
    /// Folder of NoCloud seed templates (`user-data`, `meta-data`, `network-config`).
    pub seed: Option<PathBuf>,
    /// Appliance configuration (JSON); the default configuration is written when absent.
    pub config: Option<PathBuf>,
    /// The live image's boot files (image-build/build output).
    pub boot: PathBuf,
    /// The stick image file to write.
    pub output: PathBuf,
}

/// Where things landed in the stick image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickLayout {
    /// Total size of the image file.
    pub size: u64,
    /// PARTUUID of the ESP, as written into grub.cfg (`imprint.esp=`).
    pub esp_partuuid: Uuid,
    /// First and last LBA of the ESP.
    pub esp_lba: (u64, u64),
    /// First and last LBA of the payload partition.
    pub payload_lba: (u64, u64),
    /// Bytes of the image in the payload partition (the rest of it is zeros).
    pub payload_len: u64,
    /// The image's name (from its manifest; untrusted text).
    pub image_name: String,
}

/// Everything checked before writing: the files that go onto the ESP and the image.
#[derive(Debug)]
struct Inputs {
    /// ESP path → contents, grub.cfg still a template.
    esp_files: BTreeMap<String, Vec<u8>>,
    image_len: u64,
    image_name: String,
}

/// Builds the stick image at `opts.output`. Returns its layout.
pub fn build(opts: &BuildOptions) -> Result<StickLayout> {
    if let Ok(meta) = fs::metadata(&opts.output) {
        if meta.file_type().is_block_device() {
            bail!(
                "{} is a block device: `imprint build` makes an image file; write a stick directly with `imprint flash`",
                opts.output.display()
            );
        }
    }
    // The output must not be one of the inputs, however it is named (a hard or symbolic link,
    // `dir/../file`): renaming over it would destroy the input.
    let mut inputs_named = vec![opts.image.clone()];
    inputs_named.extend(opts.config.clone());
    if let Some(seed) = &opts.seed {
        inputs_named.extend([USER_DATA, META_DATA, NETWORK_CONFIG].map(|n| seed.join(n)));
    }
    if let Some(same) = inputs_named
        .iter()
        .find(|i| imprint_core::input::same_file(i, &opts.output))
    {
        bail!(
            "the output {} is the input {}: it would be destroyed; choose another output file",
            opts.output.display(),
            same.display()
        );
    }
    let inputs = gather(opts)?;
    let layout = plan(&inputs)?;

    let (partial, file) = imprint_core::input::create_beside(&opts.output, "partial")
        .with_context(|| format!("creating a temporary file beside {}", opts.output.display()))?;
    let result = write_stick(&partial, file, opts, &inputs, &layout).and_then(|()| {
        fs::rename(&partial, &opts.output).with_context(|| {
            format!(
                "renaming {} to {}",
                partial.display(),
                opts.output.display()
            )
        })
    });
    imprint_core::input::unregister_temporary(&partial);
    if let Err(e) = result {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    Ok(layout)
}

/// The config the appliance will read, as bytes (the user's file byte for byte once it parses,
/// or the defaults), and whether it requires a signed image. Shared by `build`, `flash` and
/// `netboot render`.
pub(crate) fn config_bytes(path: Option<&Path>) -> Result<(Vec<u8>, bool)> {
    match path {
        Some(path) => {
            // Config::load names the file, line and column of a parse error.
            let parsed = Config::load(path)?;
            let text = imprint_core::input::read_bounded(path, imprint_core::input::limits::CONFIG)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok((text, parsed.require_signature))
        }
        None => {
            let mut text = serde_json::to_vec_pretty(&Config::default())
                .context("serializing the default configuration")?;
            text.push(b'\n');
            Ok((text, false))
        }
    }
}

/// Reads and validates every input; nothing is written here.
fn gather(opts: &BuildOptions) -> Result<Inputs> {
    let mut esp_files = BTreeMap::new();

    let (config, require_signature) = config_bytes(opts.config.as_deref())?;
    esp_files.insert(CONFIG_PATH.to_owned(), config);

    if let Some(dir) = &opts.seed {
        seed::check_seed_dir_for_build(dir)?;
        for name in [USER_DATA, META_DATA, NETWORK_CONFIG] {
            let path = dir.join(name);
            if path.symlink_metadata().is_ok() {
                // Checked by validate_seed_dir; read again the same way (no symbolic link,
                // bounded), so a file swapped in meanwhile is not followed either.
                let data = imprint_core::input::read_bounded_no_symlink(
                    &path,
                    imprint_core::input::limits::SEED_FILE,
                )
                .with_context(|| format!("reading {}", path.display()))?;
                esp_files.insert(format!("{SEED_DIR}/{name}"), data);
            }
        }
    }

    let image = Image::open(&opts.image)?;
    // The appliance would refuse an unsigned image: say so here, not at the machine. (Whether
    // the signer is trusted is the appliance's to decide: keys may be baked into the live image.)
    if require_signature && image.signature().is_none() {
        return Err(imprint_core::signature::SignatureError::Unsigned {
            path: opts.image.clone(),
        }
        .into());
    }
    let image_len = fs::metadata(&opts.image)
        .with_context(|| format!("reading {}", opts.image.display()))?
        .len();

    for rel in BOOT_FILES {
        let path = opts.boot.join(rel);
        ensure!(
            path.is_file(),
            "{} is missing: build the live image first with image-build/build (or pass --boot DIR)",
            path.display()
        );
    }
    add_tree(&opts.boot, "", &mut esp_files)?;
    // The network GRUB is for `imprint netboot render`, not for sticks.
    esp_files.retain(|rel, _| !rel.starts_with(NETBOOT_DIR));
    let grub = esp_files
        .get(GRUB_CFG)
        .map(|g| String::from_utf8_lossy(g).into_owned());
    ensure!(
        grub.is_some_and(|g| g.contains(PARTUUID_TOKEN)),
        "{} has no {PARTUUID_TOKEN}: it is not an imprint grub.cfg template; rebuild with image-build/build",
        opts.boot.join(GRUB_CFG).display()
    );
    Ok(Inputs {
        esp_files,
        image_len,
        image_name: crate::commands::untrusted(&image.manifest().name),
    })
}

fn add_tree(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            add_tree(&path, &rel, out)?;
        } else {
            let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.insert(rel, data);
        }
    }
    Ok(())
}

fn align_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Sizes the ESP for its files plus [`REPORTS_ROOM`] and places both partitions.
fn plan(inputs: &Inputs) -> Result<StickLayout> {
    // Each file takes whole 512-byte clusters; directories a cluster or two each.
    let files: u64 = inputs
        .esp_files
        .values()
        .map(|d| align_up(d.len() as u64, SECTOR).max(SECTOR))
        .sum();
    let content = files + 64 * SECTOR + REPORTS_ROOM;
    // Two FATs of 4 bytes per 512-byte cluster: 1/64 of the size, plus reserved sectors.
    let esp = align_up(content + content / 64 + MIB, MIB).max(ESP_MIN);
    let esp_first = MIB / SECTOR;
    let esp_last = esp_first + esp / SECTOR - 1;
    let payload_first = align_up(esp_last + 1, MIB / SECTOR);
    let payload_sectors = align_up(inputs.image_len.max(1), MIB) / SECTOR;
    let payload_last = payload_first + payload_sectors - 1;
    // Room for the backup GPT (33 sectors), rounded to a MiB.
    let size = align_up((payload_last + 1 + 33) * SECTOR, MIB);
    ensure!(
        u32::try_from(esp / SECTOR).is_ok(),
        "the boot files are too large for a FAT32 ESP"
    );
    Ok(StickLayout {
        size,
        esp_partuuid: Uuid::new_v4(),
        esp_lba: (esp_first, esp_last),
        payload_lba: (payload_first, payload_last),
        payload_len: inputs.image_len,
        image_name: inputs.image_name.clone(),
    })
}

fn write_stick(
    path: &Path,
    mut file: File,
    opts: &BuildOptions,
    inputs: &Inputs,
    layout: &StickLayout,
) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    // Opened read and write (create_beside): the gpt crate reads back what it sizes.
    file.set_len(layout.size).with_context(ctx)?;

    let lb_size = LogicalBlockSize::Lb512;
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(layout.size / SECTOR - 1).unwrap_or(u32::MAX),
    );
    mbr.overwrite_lba0(&mut file).with_context(ctx)?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb_size)
        .create_from_device(&mut file, Some(Uuid::new_v4()))
        .with_context(ctx)?;
    let payload_type = Type {
        guid: Uuid::parse_str(PAYLOAD_TYPE_GUID).context("PAYLOAD_TYPE_GUID")?,
        os: OperatingSystem::None,
    };
    let partitions = BTreeMap::from([
        (
            1,
            Partition {
                part_type_guid: gpt::partition_types::EFI,
                part_guid: layout.esp_partuuid,
                first_lba: layout.esp_lba.0,
                last_lba: layout.esp_lba.1,
                flags: 0,
                name: ESP_LABEL.to_owned(),
            },
        ),
        (
            2,
            Partition {
                part_type_guid: payload_type,
                part_guid: Uuid::new_v4(),
                first_lba: layout.payload_lba.0,
                last_lba: layout.payload_lba.1,
                flags: 0,
                name: PAYLOAD_PART_NAME.to_owned(),
            },
        ),
    ]);
    disk.update_partitions(partitions).with_context(ctx)?;
    disk.write().with_context(ctx)?;

    write_esp(&mut file, inputs, layout)
        .with_context(|| format!("writing the ESP of {}", path.display()))?;

    let mut image =
        File::open(&opts.image).with_context(|| format!("opening {}", opts.image.display()))?;
    file.seek(SeekFrom::Start(layout.payload_lba.0 * SECTOR))
        .with_context(ctx)?;
    let copied =
        io::copy(&mut (&mut image).take(inputs.image_len), &mut file).with_context(|| {
            format!(
                "copying {} into the payload partition",
                opts.image.display()
            )
        })?;
    ensure!(
        copied == inputs.image_len,
        "{} shrank while being copied ({copied} of {} bytes)",
        opts.image.display(),
        inputs.image_len
    );
    file.sync_all().with_context(ctx)?;
    Ok(())
}

fn write_esp(file: &mut File, inputs: &Inputs, layout: &StickLayout) -> Result<()> {
    let start = layout.esp_lba.0 * SECTOR;
    let len = (layout.esp_lba.1 - layout.esp_lba.0 + 1) * SECTOR;
    let mut label = [b' '; 11];
    label[..ESP_LABEL.len()].copy_from_slice(ESP_LABEL.as_bytes());
    let uuid = layout.esp_partuuid.as_bytes();
    let options = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .bytes_per_cluster(512)
        .volume_label(label)
        // The volume serial follows the PARTUUID: one identity per stick.
        .volume_id(u32::from_le_bytes([uuid[0], uuid[1], uuid[2], uuid[3]]));
    fatfs::format_volume(PartitionSlice::new(file, start, len), options)
        .context("formatting FAT32")?;
    let fs = fatfs::FileSystem::new(
        PartitionSlice::new(file, start, len),
        fatfs::FsOptions::new(),
    )
    .context("opening the new FAT32")?;
    {
        let root = fs.root_dir();
        let partuuid = layout.esp_partuuid.to_string();
        for (path, data) in &inputs.esp_files {
            let mut dir = root.clone();
            let mut parts: Vec<&str> = path.split('/').collect();
            let name = parts.pop().unwrap_or_default();
            for part in parts {
                dir = match dir.open_dir(part) {
                    Ok(d) => d,
                    Err(_) => dir
                        .create_dir(part)
                        .with_context(|| format!("creating {part}"))?,
                };
            }
            let data = if path == GRUB_CFG {
                String::from_utf8_lossy(data)
                    .replace(PARTUUID_TOKEN, &partuuid)
                    .into_bytes()
            } else {
                data.clone()
            };
            let mut f = dir
                .create_file(name)
                .with_context(|| format!("creating {path}"))?;
            f.truncate().with_context(|| format!("creating {path}"))?;
            f.write_all(&data)
                .with_context(|| format!("writing {path}"))?;
        }
        if root.open_dir(SEED_DIR).is_err() {
            root.create_dir("imprint").ok();
            root.create_dir(SEED_DIR)
                .with_context(|| format!("creating {SEED_DIR}"))?;
        }
        root.create_dir(REPORTS_DIR)
            .with_context(|| format!("creating {REPORTS_DIR}"))?;
    }
    fs.unmount().context("closing the FAT32")?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use imprint_core::manifest::{pack, PackOptions};

    /// No temporary file of the build is left in `dir`.
    fn assert_no_partial(dir: &Path) {
        let left: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A boot directory shaped like image-build/build's output, with small stand-in files (the
    /// stick writer copies bytes; it does not care what they boot).
    fn boot_dir(root: &Path) -> PathBuf {
        let boot = root.join("boot");
        for rel in BOOT_FILES {
            let path = boot.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, format!("contents of {rel}\n")).unwrap();
        }
        fs::write(
            boot.join(GRUB_CFG),
            "linux /vmlinuz console=ttyS0 imprint.esp=@ESP_PARTUUID@\n",
        )
        .unwrap();
        fs::write(boot.join("MANIFEST"), "kernel-release test\n").unwrap();
        boot
    }

    /// A real imprint image: a 3 MiB raw "disk" packed by the image format's own writer.
    fn image(root: &Path) -> PathBuf {
        let raw: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
        let out = root.join("os.img.zst");
        let opts = PackOptions {
            name: "test-os".into(),
            level: 1,
            threads: 0,
            chunk_size: MIB,
            frame_size: Some(MIB),
        };
        pack(&mut raw.as_slice(), &out, &opts, &mut |_| {}).unwrap();
        out
    }

    fn options(root: &Path) -> BuildOptions {
        BuildOptions {
            image: image(root),
            seed: None,
            config: None,
            boot: boot_dir(root),
            output: root.join("stick.img"),
        }
    }

    fn read_file<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>, path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        fs.root_dir()
            .open_file(path)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn stick_reads_back_with_gpt_and_fat() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        let seed = dir.path().join("seed");
        fs::create_dir(&seed).unwrap();
        fs::write(seed.join(USER_DATA), "#cloud-config\nruncmd: [poweroff]\n").unwrap();
        opts.seed = Some(seed);
        let layout = build(&opts).unwrap();
        assert_no_partial(dir.path());
        let len = fs::metadata(&opts.output).unwrap().len();
        assert_eq!(len, layout.size);
        assert_eq!(len % MIB, 0);
        // As small as the content allows: the minimum ESP, the payload, alignment.
        assert!(
            len <= ESP_MIN + 2 * MIB + align_up(layout.payload_len, MIB),
            "{len}"
        );

        let disk = gpt::GptConfig::new()
            .logical_block_size(LogicalBlockSize::Lb512)
            .open(&opts.output)
            .unwrap();
        let parts = disk.partitions();
        assert_eq!(parts.len(), 2);
        let esp = &parts[&1];
        assert_eq!(esp.part_type_guid, gpt::partition_types::EFI);
        assert_eq!(esp.name, ESP_LABEL);
        assert_eq!(esp.part_guid, layout.esp_partuuid);
        assert_eq!(esp.first_lba, 2048);
        let payload = &parts[&2];
        assert_eq!(payload.name, PAYLOAD_PART_NAME);
        assert_eq!(
            payload.part_type_guid.guid.to_string(),
            PAYLOAD_TYPE_GUID.to_lowercase()
        );
        assert_eq!(payload.first_lba % 2048, 0);
        assert!(payload.first_lba > esp.last_lba);

        let mut file = File::open(&opts.output).unwrap();
        // Protective MBR: 0xEE partition, boot signature.
        let mut mbr = [0u8; 512];
        file.read_exact(&mut mbr).unwrap();
        assert_eq!(mbr[450], 0xEE);
        assert_eq!(&mbr[510..], &[0x55, 0xAA]);

        // The payload partition starts with the image, byte for byte.
        let image = fs::read(&opts.image).unwrap();
        let mut payload_bytes = vec![0u8; image.len()];
        file.seek(SeekFrom::Start(payload.first_lba * SECTOR))
            .unwrap();
        file.read_exact(&mut payload_bytes).unwrap();
        assert!(payload_bytes == image);

        let mut rw = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&opts.output)
            .unwrap();
        let esp_len = (esp.last_lba - esp.first_lba + 1) * SECTOR;
        let fat = fatfs::FileSystem::new(
            PartitionSlice::new(&mut rw, esp.first_lba * SECTOR, esp_len),
            fatfs::FsOptions::new(),
        )
        .unwrap();
        assert_eq!(fat.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fat.volume_label(), ESP_LABEL);
        let grub = String::from_utf8(read_file(&fat, GRUB_CFG)).unwrap();
        assert_eq!(
            grub,
            format!(
                "linux /vmlinuz console=ttyS0 imprint.esp={}\n",
                esp.part_guid
            )
        );
        assert_eq!(read_file(&fat, "vmlinuz"), b"contents of vmlinuz\n");
        assert_eq!(
            read_file(&fat, "EFI/BOOT/BOOTX64.EFI"),
            b"contents of EFI/BOOT/BOOTX64.EFI\n"
        );
        assert_eq!(read_file(&fat, "MANIFEST"), b"kernel-release test\n");
        assert_eq!(
            read_file(&fat, "imprint/seed/user-data"),
            b"#cloud-config\nruncmd: [poweroff]\n"
        );
        // The default configuration is written, and it is one the appliance accepts.
        let config = String::from_utf8(read_file(&fat, CONFIG_PATH)).unwrap();
        Config::from_json(&config).unwrap();
        let reports: Vec<_> = fat
            .root_dir()
            .open_dir(REPORTS_DIR)
            .unwrap()
            .iter()
            .collect();
        // Only "." and "..".
        assert_eq!(reports.len(), 2);
        // Room for reports is there.
        let stats = fat.stats().unwrap();
        assert!(u64::from(stats.free_clusters()) * u64::from(stats.cluster_size()) >= REPORTS_ROOM);
    }

    #[test]
    fn bad_config_is_refused_with_line_and_column_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        let config = dir.path().join("fleet.json");
        fs::write(
            &config,
            "{\n  \"target\": {\n    \"transports\": [\"nvme\",]\n  }\n}\n",
        )
        .unwrap();
        opts.config = Some(config);
        let err = format!("{:#}", build(&opts).unwrap_err());
        assert!(
            err.contains("fleet.json") && err.contains("line 3"),
            "{err}"
        );
        assert!(!opts.output.exists());
        assert_no_partial(dir.path());
    }

    #[test]
    fn bad_seed_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        let seed = dir.path().join("seed");
        fs::create_dir(&seed).unwrap();
        fs::write(seed.join(NETWORK_CONFIG), "ethernets:\n\teth0: {}\n").unwrap();
        opts.seed = Some(seed);
        let err = format!("{:#}", build(&opts).unwrap_err());
        assert!(err.contains("network-config"), "{err}");
        assert!(!opts.output.exists());
    }

    #[test]
    fn not_an_image_and_missing_boot_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        let raw = dir.path().join("raw.img");
        fs::write(&raw, vec![0u8; 4096]).unwrap();
        let good_image = std::mem::replace(&mut opts.image, raw);
        let err = format!("{:#}", build(&opts).unwrap_err());
        assert!(err.contains("not an imprint image"), "{err}");
        assert!(!opts.output.exists());

        opts.image = good_image;
        fs::remove_file(opts.boot.join("initrd.img")).unwrap();
        let err = format!("{:#}", build(&opts).unwrap_err());
        assert!(
            err.contains("initrd.img is missing") && err.contains("image-build/build"),
            "{err}"
        );

        let boot = boot_dir(dir.path());
        fs::write(boot.join(GRUB_CFG), "linux /vmlinuz\n").unwrap();
        let err = format!("{:#}", build(&opts).unwrap_err());
        assert!(err.contains(PARTUUID_TOKEN), "{err}");
        assert!(!opts.output.exists());
    }

    #[test]
    fn slice_stays_inside_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = tempfile::tempfile_in(dir.path()).unwrap();
        file.write_all(&[0u8; 64]).unwrap();
        let mut s = PartitionSlice::new(&mut file, 16, 8);
        assert_eq!(s.write(&[1u8; 12]).unwrap(), 8);
        assert!(s.write(&[1u8; 1]).is_err());
        assert!(s.seek(SeekFrom::Start(9)).is_err());
        assert_eq!(s.seek(SeekFrom::End(-2)).unwrap(), 6);
        let mut all = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut all).unwrap();
        assert_eq!(&all[16..24], &[1u8; 8]);
        assert_eq!(all[15], 0);
        assert_eq!(all[24], 0);
    }
}
