//! Where the appliance's `PUT`s go: under the base URL (nginx WebDAV), or through the presigned
//! URLs of a tree rendered with `imprint netboot render --s3` (see
//! [`imprint_core::presigned`]). The appliance holds no keys and signs nothing: it only uses
//! URLs it was given.

use anyhow::{Context, Result};
use imprint_core::presigned::{self, Index, Uploads};

use crate::console::Consoles;

/// How this machine's uploads are addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// `PUT` to the base URL + the relative path (a server that accepts `PUT`, e.g. nginx).
    Direct,
    /// An S3 tree with URLs for this machine.
    Presigned(Uploads),
    /// An S3 tree without URLs for this machine (not in the config's `seed.machines` by MAC).
    None,
}

/// Why an upload was not attempted: an S3 tree has no URL for it.
#[derive(Debug, thiserror::Error)]
#[error("{rel}: no presigned upload URL for this machine ({machine}) in the S3 tree ({why}); nothing was uploaded")]
pub struct NoUrl {
    rel: String,
    machine: String,
    why: &'static str,
}

impl Targets {
    /// Reads `presigned/index.json` and, if there, this machine's `presigned/<machine>.json`
    /// through `fetch` (`Ok(None)`: not found); says on the console what it found.
    pub fn load(
        fetch: impl Fn(&str) -> Result<Option<Vec<u8>>>,
        machine: &str,
        consoles: &mut Consoles,
    ) -> Result<Targets> {
        let Some(index) = fetch(presigned::INDEX)? else {
            return Ok(Targets::Direct);
        };
        let index: Index = serde_json::from_slice(&index)
            .with_context(|| format!("reading {}", presigned::INDEX))?;
        let file = presigned::machine_file(machine);
        match fetch(&file)? {
            Some(data) => {
                let up: Uploads =
                    serde_json::from_slice(&data).with_context(|| format!("reading {file}"))?;
                consoles.line(&format!(
                    "imprint: reports go to S3 through presigned URLs ({file}, valid until {})",
                    up.expires
                ));
                Ok(Targets::Presigned(up))
            }
            None => {
                consoles.line(&format!(
                    "imprint: S3 tree: no {file} (render --s3 signs upload URLs for the {} machines of seed.machines keyed by MAC); this machine's report stays on this console",
                    index.machines
                ));
                Ok(Targets::None)
            }
        }
    }

    /// The URL to `PUT` `rel` to.
    pub fn url(&self, base: &str, rel: &str, machine: &str) -> Result<String, NoUrl> {
        match self {
            Targets::Direct => Ok(format!("{base}/{rel}")),
            Targets::Presigned(up) => up.url_for(rel).map(str::to_owned).ok_or(NoUrl {
                rel: rel.to_owned(),
                machine: machine.to_owned(),
                why: "not among its signed objects",
            }),
            Targets::None => Err(NoUrl {
                rel: rel.to_owned(),
                machine: machine.to_owned(),
                why: "the machine is not in seed.machines by MAC",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use imprint_core::report::{Report, Status};
    use imprint_core::test_util::{S3Server, S3_ACCESS_KEY, S3_SECRET_KEY};
    use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

    use super::*;
    use crate::net::Network;

    const MACHINE: &str = "52-54-00-ab-cd-01";

    fn bucket(endpoint: &str) -> Bucket {
        Bucket::new(
            endpoint.parse().unwrap(),
            UrlStyle::Path,
            "fleet",
            "us-east-1",
        )
        .unwrap()
    }

    /// The URLs `render --s3` writes for MACHINE, signed at `at` for `valid`.
    fn uploads(endpoint: &str, at: jiff::Timestamp, valid: Duration) -> Uploads {
        let creds = Credentials::new(S3_ACCESS_KEY, S3_SECRET_KEY);
        let b = bucket(endpoint);
        let put: BTreeMap<String, String> = presigned::OBJECTS
            .iter()
            .map(|o| {
                let key = format!("reports/{MACHINE}/{o}");
                let url = b.put_object(Some(&creds), &key).sign_with_time(valid, &at);
                (key, url.to_string())
            })
            .collect();
        Uploads {
            expires: "2026-12-08T10:00:00Z".into(),
            put,
        }
    }

    fn consoles(dir: &Path) -> (Consoles, std::path::PathBuf) {
        let dev = dir.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("ttyS0"), "").unwrap();
        (Consoles::open(&dir.join("sys"), &dev), dev.join("ttyS0"))
    }

    /// Config, seed and image are read from a real S3 server (public read, no signature); the
    /// reports and a progress object go up through presigned URLs and land byte for byte; the
    /// server checks the signatures (unsigned, tampered and expired PUTs are refused and leave
    /// nothing); a machine without URLs uploads nothing and says so.
    #[test]
    fn config_image_and_reports_through_a_real_s3_bucket() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("s3");
        let tree = root.join("fleet");
        super::super::tests::server_tree(&tree);
        std::fs::create_dir_all(tree.join("presigned")).unwrap();
        let s3 = S3Server::start(&root);
        let now = jiff::Timestamp::now();
        let up = uploads(&s3.endpoint, now, Duration::from_secs(600));
        std::fs::write(
            tree.join(presigned::INDEX),
            serde_json::to_vec(&Index {
                expires: up.expires.clone(),
                machines: 1,
            })
            .unwrap(),
        )
        .unwrap();
        std::fs::write(
            tree.join(presigned::machine_file(MACHINE)),
            serde_json::to_vec(&up).unwrap(),
        )
        .unwrap();

        let mut net = Network {
            base: format!("{}/fleet", s3.endpoint),
            mac: [0x52, 0x54, 0, 0xab, 0xcd, 0x01],
            local: t.path().join("local"),
            uploads: Targets::Direct,
            events: crate::net::events::Events::off(),
        };
        let (mut cons, log) = consoles(t.path());
        net.uploads = Targets::load(|rel| net.fetch(rel), MACHINE, &mut cons).unwrap();
        assert_eq!(net.uploads, Targets::Presigned(up.clone()));
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            said.contains("reports go to S3 through presigned URLs (presigned/52-54-00-ab-cd-01.json, valid until 2026-12-08T10:00:00Z)"),
            "{said}"
        );

        // Public reads: plain GETs, a missing object is absent, the image streams.
        assert_eq!(
            net.fetch("config.json").unwrap().unwrap(),
            b"{\"after\": \"poweroff\"}\n"
        );
        assert_eq!(net.fetch("seed/meta-data").unwrap(), None, "404 is absent");
        let image = net.image().unwrap();
        assert_eq!(image.manifest().name, "test-os");
        assert_eq!(image.manifest().raw_size, 1 << 20);

        // Reports through the presigned URLs, byte for byte.
        let dir = tree.join("reports").join(MACHINE);
        let rep = Report::new("20261201-054900-abcd");
        let shown = net.put_report(&rep).unwrap();
        assert!(
            shown.ends_with("/fleet/reports/52-54-00-ab-cd-01/report.json?…"),
            "the report goes to report.json; the signature is not shown: {shown}"
        );
        let mut body = serde_json::to_vec_pretty(&rep).unwrap();
        body.push(b'\n');
        assert_eq!(std::fs::read(dir.join("report.json")).unwrap(), body);
        assert!(!dir.join("installed.json").exists());
        let mut done = Report::new("20261201-055000-beef");
        done.status = Status::Installed;
        net.put_report(&done).unwrap();
        let mut body = serde_json::to_vec_pretty(&done).unwrap();
        body.push(b'\n');
        assert_eq!(std::fs::read(dir.join("report.json")).unwrap(), body);
        assert_eq!(std::fs::read(dir.join("installed.json")).unwrap(), body);
        net.put(
            "reports/52-54-00-ab-cd-01/progress.json",
            b"{\"percent\": 40}\n",
        )
        .unwrap();
        assert_eq!(
            std::fs::read(dir.join("progress.json")).unwrap(),
            b"{\"percent\": 40}\n"
        );
        // The next netboot reads installed.json with a plain GET.
        assert_eq!(
            net.fetch("reports/52-54-00-ab-cd-01/installed.json")
                .unwrap()
                .unwrap(),
            body
        );
        let entries = || {
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            entries(),
            ["installed.json", "progress.json", "report.json"]
        );

        // The server checks signatures: an unsigned PUT, a tampered signature, a URL signed
        // for another object and an expired URL are refused, and nothing changes.
        let direct = Network {
            uploads: Targets::Direct,
            ..net.clone()
        };
        let e = format!(
            "{:#}",
            direct
                .put("reports/52-54-00-ab-cd-01/x.json", b"{}")
                .unwrap_err()
        );
        assert!(e.contains("HTTP 403"), "{e}");
        let tamper = |f: &dyn Fn(&str) -> String| {
            let mut bad = up.clone();
            for u in bad.put.values_mut() {
                *u = f(u);
            }
            Network {
                uploads: Targets::Presigned(bad),
                ..net.clone()
            }
        };
        let flip_sig = |u: &str| {
            let i = u.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
            let c = if &u[i..=i] == "0" { "1" } else { "0" };
            format!("{}{c}{}", &u[..i], &u[i + 1..])
        };
        let other_key = |u: &str| u.replace("/report.json?", "/installed.json?");
        for (what, bad) in [
            ("signature", tamper(&flip_sig)),
            ("key", tamper(&other_key)),
        ] {
            let e = format!("{:#}", bad.put_report(&rep).unwrap_err());
            assert!(
                e.contains("HTTP 403") && e.contains("presigned URL"),
                "{what}: {e}"
            );
            assert!(
                !e.contains("X-Amz-Signature"),
                "{what}: the signature is not shown: {e}"
            );
        }
        let stale = Network {
            uploads: Targets::Presigned(uploads(
                &s3.endpoint,
                now - jiff::SignedDuration::from_hours(2),
                Duration::from_secs(3600),
            )),
            ..net.clone()
        };
        let e = format!("{:#}", stale.put_report(&rep).unwrap_err());
        assert!(e.contains("HTTP 403"), "expired: {e}");
        let mut body = serde_json::to_vec_pretty(&done).unwrap();
        body.push(b'\n');
        assert_eq!(std::fs::read(dir.join("report.json")).unwrap(), body);
        assert_eq!(
            entries(),
            ["installed.json", "progress.json", "report.json"]
        );

        // A machine render signed nothing for: says so, uploads nothing.
        let (mut cons, log) = consoles(&t.path().join("other"));
        let unknown = Targets::load(|rel| net.fetch(rel), "52-54-00-ff-ff-ff", &mut cons).unwrap();
        assert_eq!(unknown, Targets::None);
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            said.contains("no presigned/52-54-00-ff-ff-ff.json")
                && said.contains("report stays on this console"),
            "{said}"
        );
        let stranger = Network {
            mac: [0x52, 0x54, 0, 0xff, 0xff, 0xff],
            uploads: unknown,
            ..net.clone()
        };
        let e = format!("{:#}", stranger.put_report(&done).unwrap_err());
        assert!(
            e.contains("no presigned upload URL for this machine (52-54-00-ff-ff-ff)"),
            "{e}"
        );
        assert!(!tree.join("reports/52-54-00-ff-ff-ff").exists());
        drop(s3);
    }
}
