//! A streaming reader of qcow2 images: yields the virtual disk's bytes in order.
//!
//! Supports what published cloud images use: versions 2 and 3, 512 B–2 MiB clusters,
//! uncompressed, zero and unallocated clusters, and compressed clusters (zlib/deflate, or zstd
//! where the header says so). Refuses, by name, what would make the output wrong: backing files,
//! encryption, external data files, extended L2 entries, unknown incompatible features.

use std::io::{self, Read, Seek, SeekFrom};

/// Why a qcow2 image is refused.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The image uses a feature this reader does not support.
    #[error("unsupported qcow2 image: {0}; convert it first with `qemu-img convert -O raw`")]
    Unsupported(String),
    /// The image is damaged.
    #[error("damaged qcow2 image: {0}")]
    Corrupt(String),
    /// Reading one of the image's structures failed.
    #[error("damaged qcow2 image: reading {what}")]
    At {
        /// The structure and its offset ("the L1 table at offset 196608").
        what: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// qemu's own limit on the L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB): bounds the allocation
/// whatever the header claims.
const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest virtual disk accepted: far beyond any disk imprint writes, small enough that a
/// few-MiB file claiming petabytes is refused at once instead of expanding zeros for hours.
pub const MAX_VIRTUAL_SIZE: u64 = 16 << 40;

const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED_FLAG: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;

#[derive(Debug)]
struct Header {
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    zstd: bool,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}

fn parse_header(h: &[u8]) -> Result<Header, Qcow2Error> {
    if &h[0..4] != b"QFI\xfb" {
        return Err(Qcow2Error::Corrupt("no qcow2 magic".into()));
    }
    let version = be32(h, 4);
    if !(2..=3).contains(&version) {
        return Err(Qcow2Error::Unsupported(format!("version {version}")));
    }
    if be64(h, 8) != 0 {
        return Err(Qcow2Error::Unsupported(
            "it has a backing file (an overlay, not a whole disk)".into(),
        ));
    }
    let cluster_bits = be32(h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(Qcow2Error::Corrupt(format!("cluster_bits {cluster_bits}")));
    }
    if be32(h, 32) != 0 {
        return Err(Qcow2Error::Unsupported("it is encrypted".into()));
    }
    let mut zstd = false;
    if version == 3 {
        let incompatible = be64(h, 72);
        // Bit 0 (dirty) and bit 1 (corrupt) are state bits; bit 3 = compression type field.
        if incompatible & (1 << 1) != 0 {
            return Err(Qcow2Error::Corrupt("the image is marked corrupt".into()));
        }
        if incompatible & (1 << 2) != 0 {
            return Err(Qcow2Error::Unsupported(
                "it keeps its data in an external file".into(),
            ));
        }
        if incompatible & (1 << 4) != 0 {
            return Err(Qcow2Error::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        let known = 0b1_1111;
        if incompatible & !known != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "incompatible features {incompatible:#x}"
            )));
        }
        let header_length = be32(h, 100);
        if incompatible & (1 << 3) != 0 && header_length > 104 {
            match h[104] {
                0 => {}
                1 => zstd = true,
                t => return Err(Qcow2Error::Unsupported(format!("compression type {t}"))),
            }
        }
    }
    Ok(Header {
        cluster_bits,
        size: be64(h, 24),
        l1_size: be32(h, 36),
        l1_table_offset: be64(h, 40),
        zstd,
    })
}

/// Reads the virtual disk of a qcow2 image in order.
#[derive(Debug)]
pub struct Qcow2Reader<R> {
    inner: R,
    hdr: Header,
    l1: Vec<u64>,
    /// Cached L2 table: (L1 index, entries).
    l2: Option<(usize, Vec<u64>)>,
    cluster: Vec<u8>,
    /// Virtual offset of the data in `cluster`, if loaded.
    loaded: Option<u64>,
    pos: u64,
    compressed: Vec<u8>,
}

impl<R: Read + Seek> Qcow2Reader<R> {
    /// Parses the header and L1 table.
    pub fn new(mut inner: R) -> Result<Self, Qcow2Error> {
        let mut h = vec![0u8; 112];
        inner.seek(SeekFrom::Start(0))?;
        inner.read_exact(&mut h[..72])?;
        // v3 headers are longer; a v2 header ends at 72 and what follows is other data.
        if be32(&h, 4) == 3 {
            inner.read_exact(&mut h[72..104])?;
            let hl = be32(&h, 100) as usize;
            if hl > 104 {
                inner.read_exact(&mut h[104..112.min(hl)])?;
            }
        }
        let hdr = parse_header(&h)?;
        let file_len = inner.seek(SeekFrom::End(0))?;
        let cs = 1u64 << hdr.cluster_bits;
        if hdr.size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::Corrupt(format!(
                "the header claims a {}-byte virtual disk, more than the {MAX_VIRTUAL_SIZE}-byte \
                 limit (the file holds {file_len} bytes)",
                hdr.size
            )));
        }
        let needed_l1 = hdr.size.div_ceil(cs * (cs / 8));
        if u64::from(hdr.l1_size) < needed_l1 {
            return Err(Qcow2Error::Corrupt(format!(
                "L1 table of {} entries for {} needed",
                hdr.l1_size, needed_l1
            )));
        }
        let l1_bytes = u64::from(hdr.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Qcow2Error::Corrupt(format!(
                "the L1 table of {} entries ({l1_bytes} bytes) is larger than qemu allows \
                 ({MAX_L1_BYTES} bytes)",
                hdr.l1_size
            )));
        }
        if hdr
            .l1_table_offset
            .checked_add(l1_bytes)
            .is_none_or(|end| end > file_len)
        {
            return Err(Qcow2Error::Corrupt(format!(
                "the L1 table ({l1_bytes} bytes at offset {}) runs past the end of the \
                 {file_len}-byte file",
                hdr.l1_table_offset
            )));
        }
        let at = |what: String| move |source| Qcow2Error::At { what, source };
        let l1_what = || format!("the L1 table at offset {}", hdr.l1_table_offset);
        inner
            .seek(SeekFrom::Start(hdr.l1_table_offset))
            .map_err(at(l1_what()))?;
        let mut raw = vec![0u8; l1_bytes as usize];
        inner.read_exact(&mut raw).map_err(at(l1_what()))?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Qcow2Reader {
            inner,
            cluster: vec![0u8; cs as usize],
            hdr,
            l1,
            l2: None,
            loaded: None,
            pos: 0,
            compressed: Vec::new(),
        })
    }

    /// Size of the virtual disk.
    #[cfg(test)]
    pub fn virtual_size(&self) -> u64 {
        self.hdr.size
    }

    fn load_cluster(&mut self, vcluster: u64) -> Result<(), Qcow2Error> {
        let bits = self.hdr.cluster_bits;
        let cs = 1u64 << bits;
        let entries_per_l2 = cs / 8;
        let l1_idx = (vcluster / entries_per_l2) as usize;
        let l2_idx = (vcluster % entries_per_l2) as usize;
        let l2_off = self.l1[l1_idx] & L2_OFFSET_MASK;
        if l2_off == 0 {
            self.cluster.fill(0);
            return Ok(());
        }
        if self.l2.as_ref().map(|(i, _)| *i) != Some(l1_idx) {
            let mut raw = vec![0u8; cs as usize];
            let what = || format!("the L2 table at offset {l2_off} (L1 entry {l1_idx})");
            self.inner
                .seek(SeekFrom::Start(l2_off))
                .map_err(|source| Qcow2Error::At {
                    what: what(),
                    source,
                })?;
            self.inner
                .read_exact(&mut raw)
                .map_err(|source| Qcow2Error::At {
                    what: what(),
                    source,
                })?;
            self.l2 = Some((l1_idx, raw.chunks_exact(8).map(|c| be64(c, 0)).collect()));
        }
        let entry = self.l2.as_ref().map(|(_, t)| t[l2_idx]).unwrap_or(0);
        if entry & COMPRESSED_FLAG != 0 {
            let x = 62 - (bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            self.compressed.resize(len as usize, 0);
            self.inner
                .seek(SeekFrom::Start(host))
                .map_err(|source| Qcow2Error::At {
                    what: format!("the compressed cluster {vcluster} at offset {host}"),
                    source,
                })?;
            // The last compressed cluster may end before the stated length at end of file.
            let got = read_up_to(&mut self.inner, &mut self.compressed)?;
            let data = &self.compressed[..got];
            if self.hdr.zstd {
                let mut d = zstd::stream::read::Decoder::new(data)?;
                d.read_exact(&mut self.cluster)
                    .map_err(|e| Qcow2Error::Corrupt(format!("cluster {vcluster}: {e}")))?;
            } else {
                let mut d = flate2::read::DeflateDecoder::new(data);
                d.read_exact(&mut self.cluster)
                    .map_err(|e| Qcow2Error::Corrupt(format!("cluster {vcluster}: {e}")))?;
            }
            return Ok(());
        }
        let host = entry & L2_OFFSET_MASK;
        if entry & ZERO_FLAG != 0 || host == 0 {
            self.cluster.fill(0);
            return Ok(());
        }
        let what = || format!("the data of cluster {vcluster} at offset {host}");
        self.inner
            .seek(SeekFrom::Start(host))
            .map_err(|source| Qcow2Error::At {
                what: what(),
                source,
            })?;
        self.inner
            .read_exact(&mut self.cluster)
            .map_err(|source| Qcow2Error::At {
                what: what(),
                source,
            })?;
        Ok(())
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

impl<R: Read + Seek> Read for Qcow2Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.hdr.size || buf.is_empty() {
            return Ok(0);
        }
        let cs = 1u64 << self.hdr.cluster_bits;
        let vcluster = self.pos / cs;
        let base = vcluster * cs;
        if self.loaded != Some(base) {
            self.load_cluster(vcluster).map_err(|e| match e {
                Qcow2Error::Io(e) => e,
                Qcow2Error::At { what, source } => io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("damaged qcow2 image: reading {what}: {source}"),
                ),
                other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
            })?;
            self.loaded = Some(base);
        }
        let off = (self.pos - base) as usize;
        let n = buf
            .len()
            .min(cs as usize - off)
            .min((self.hdr.size - self.pos) as usize);
        buf[..n].copy_from_slice(&self.cluster[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A version-2 qcow2 header with 64 KiB clusters, `size` and an L1 table of `l1_size`
    /// entries at `l1_off`, padded to `file_len` bytes.
    fn header(size: u64, l1_size: u32, l1_off: u64, file_len: usize) -> Vec<u8> {
        let mut h = vec![0u8; file_len.max(72)];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&2u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&l1_off.to_be_bytes());
        h
    }

    #[test]
    fn absurd_claims_are_refused_without_allocating_them() {
        // An L1 table of 2^32-1 entries (32 GiB) claimed by a 64 KiB file.
        let e = Qcow2Reader::new(io::Cursor::new(header(1 << 30, u32::MAX, 65536, 65536)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the L1 table of 4294967295 entries"), "{e}");
        // A table qemu would allow, but past the end of the file.
        let e = Qcow2Reader::new(io::Cursor::new(header(1 << 30, 16, 1 << 40, 65536)))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "damaged qcow2 image: the L1 table (128 bytes at offset 1099511627776) runs past \
             the end of the 65536-byte file"
        );
        // 32 TiB claimed by a tiny file: refused at once, not hours of zeros.
        let e = Qcow2Reader::new(io::Cursor::new(header(32 << 40, 1 << 20, 512, 9 << 20)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("claims a 35184372088832-byte virtual disk, more than the"),
            "{e}"
        );
    }

    #[test]
    fn an_l2_table_past_the_end_is_named() {
        // One L1 entry pointing far beyond the file.
        let mut f = header(1 << 20, 1, 512, 4096);
        f[512..520].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let mut r = Qcow2Reader::new(io::Cursor::new(f)).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = r.read(&mut buf).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "damaged qcow2 image: reading the L2 table at offset 1099511627776 (L1 entry 0)"
            ),
            "{e}"
        );
    }

    fn pattern(size: usize) -> Vec<u8> {
        let mut v = vec![0u8; size];
        for (i, b) in v.iter_mut().enumerate() {
            // Data in the first and third MiB, zeros elsewhere; text-like bytes compress.
            if (i >> 20) % 2 == 0 {
                *b = (i % 251) as u8 ^ (i >> 12) as u8;
            }
        }
        v
    }

    /// Converts with the real qemu-img and reads back: uncompressed, compressed (zlib), v2.
    #[test]
    fn matches_qemu_img_conversions() {
        let dir = tempfile::tempdir().unwrap();
        let raw = pattern(5 << 20);
        let raw_path = dir.path().join("a.raw");
        std::fs::write(&raw_path, &raw).unwrap();
        for (name, extra) in [
            ("plain", vec![]),
            ("compressed", vec!["-c"]),
            ("v2", vec!["-o", "compat=0.10"]),
            ("small-clusters", vec!["-c", "-o", "cluster_size=4096"]),
        ] {
            let out = dir.path().join(format!("{name}.qcow2"));
            let mut cmd = Command::new("qemu-img");
            cmd.args(["convert", "-f", "raw", "-O", "qcow2"])
                .args(&extra)
                .arg(&raw_path)
                .arg(&out);
            let st = cmd.status().expect("qemu-img is installed by scripts/deps");
            assert!(st.success(), "qemu-img {name}");
            let mut r = Qcow2Reader::new(std::fs::File::open(&out).unwrap()).unwrap();
            assert_eq!(r.virtual_size(), raw.len() as u64);
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert!(back == raw, "{name}: content differs");
        }
    }

    #[test]
    fn refuses_backing_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let over = dir.path().join("over.qcow2");
        assert!(Command::new("qemu-img")
            .args(["create", "-f", "qcow2"])
            .arg(&base)
            .arg("1M")
            .status()
            .unwrap()
            .success());
        assert!(Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&over)
            .status()
            .unwrap()
            .success());
        let e = Qcow2Reader::new(std::fs::File::open(&over).unwrap()).unwrap_err();
        assert!(e.to_string().contains("backing file"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: imprint_core::test_util::proptest_cases(512),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Any header fields and table contents: refused with an error, or read (the first
        /// MiB at most) without panicking and without allocating what the header claims.
        #[test]
        fn arbitrary_headers_and_tables_never_panic(
            version in 2u32..=3,
            cluster_bits in proptest::prop_oneof![0u32..40, 9u32..=21],
            size in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..(1 << 30)],
            l1_size in proptest::prop_oneof![proptest::prelude::any::<u32>(), 0u32..4, 0u32..64],
            l1_off in 0u64..(1 << 17),
            incompatible in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..32],
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..65536),
        ) {
            let mut f = header(size, l1_size, l1_off, 112);
            f[4..8].copy_from_slice(&version.to_be_bytes());
            f[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
            f[72..80].copy_from_slice(&incompatible.to_be_bytes());
            f[100..104].copy_from_slice(&104u32.to_be_bytes());
            f.extend_from_slice(&tail);
            if let Ok(r) = Qcow2Reader::new(io::Cursor::new(f)) {
                let mut sink = Vec::new();
                let _ = r.take(1 << 20).read_to_end(&mut sink);
            }
        }
    }
}
