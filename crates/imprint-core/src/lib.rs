//! imprint-core owns everything that touches a disk and everything both binaries share:
//!
//! - [`manifest`]: the `.img.zst` image format (a zstd stream with its manifest in a skippable
//!   frame) — reading, validating and writing it.
//! - [`signature`]: checking an image's minisign signature against trusted keys.
//! - [`blockdev`]: safe wrappers over the block-device ioctls and the exclusivity checks
//!   (mounted, swap, holders) that decide whether a target may be touched at all.
//! - [`write`]: the verified write engine: zero the ends, stream, read back, commit the first MiB
//!   last, move the backup GPT.
//! - [`verify`]: reading a target back and proving it holds an image.
//! - [`ordered`]: work on several threads with its results used in order (an image's frames
//!   compressed by `prepare`, decoded by the write).
//! - [`gpt_table`]: the one GPT reader and layout (guarded, entries kept verbatim).
//! - [`durable`]: replacing a small file so it is whole on the medium (FAT included).
//! - [`input`]: opening user-given files: non-regular files refused, small files size-capped.
//! - `remote` (feature `remote`): images from an `http(s)://` URL through a resumable reader.
//! - [`progress`]: progress events for terminals, logs and the appliance (`--json`).
//! - [`event`]: the progress events a network install sends to its server.
//! - [`report`]: the typed install report the appliance writes to the stick.
//! - [`discover`], [`select`], [`config`], [`seed`]: what the appliance needs to find the
//!   internal disk, decide on it, and render the cloud-init NoCloud seed.
//! - [`seed_schema`] (feature `seed-schema`, host only): the seed checked the way cloud-init
//!   reads it — YAML 1.1 and cloud-init's JSON schema — with line and column.
//!
//! System roots (`/sys`, `/proc`, `/dev`) are parameters wherever discovery happens, so the
//! policy is tested against fake trees.

pub mod blockdev;
pub mod config;
pub mod discover;
pub mod durable;
pub mod event;
pub mod gpt_table;
pub mod input;
pub mod loopdev;
pub mod machine;
pub mod manifest;
pub mod ordered;
pub mod presigned;
pub mod progress;
#[cfg(feature = "remote")]
pub mod remote;
pub mod report;
pub mod seed;
#[cfg(feature = "seed-schema")]
pub mod seed_schema;
pub mod select;
pub mod signature;
pub mod stick;
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod test_util;
pub mod verify;
pub mod write;
