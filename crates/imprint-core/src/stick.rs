//! The provisioning stick's layout: the names and GUIDs by which the appliance recognises its
//! own stick (never by `sdX` order) and the paths of the files on its EFI System Partition.

/// GPT partition type of the payload partition that holds the raw `.img.zst` image.
pub const PAYLOAD_TYPE_GUID: &str = "4011d3e2-18e9-46fa-ba24-210466d1720f";
/// GPT partition name of the payload partition.
pub const PAYLOAD_PART_NAME: &str = "imprint-payload";
/// GPT partition name and FAT volume label of the stick's EFI System Partition.
pub const ESP_LABEL: &str = "IMPRINT";
/// Kernel command-line parameter carrying the PARTUUID of the stick's ESP, written into the
/// boot configuration by `imprint build`, so PID 1 knows exactly which disk it booted from.
pub const CMDLINE_ESP_PARAM: &str = "imprint.esp";
/// Appliance configuration on the ESP.
pub const CONFIG_PATH: &str = "imprint/config.json";
/// Folder of NoCloud seed templates on the ESP (`user-data`, `meta-data`, `network-config`).
pub const SEED_DIR: &str = "imprint/seed";
/// Folder the appliance writes its JSON reports into.
pub const REPORTS_DIR: &str = "imprint/reports";
