//! Presigned upload URLs in a netboot tree (`imprint netboot render --s3`).
//!
//! An S3 bucket accepts a `PUT` only when it is signed; the appliance holds no keys. So the host
//! that renders the tree signs, per machine of the config's `seed.machines` table (by MAC),
//! one URL per object the appliance uploads under `reports/<machine>/`, and writes them to
//! `presigned/<machine>.json`. The appliance `GET`s its own file (the bucket is publicly
//! readable: firmware fetches the boot files without credentials) and `PUT`s through those
//! URLs. `presigned/index.json` marks a tree as S3: an appliance whose MAC has no file there
//! uploads nothing (and says so) instead of trying unsigned `PUT`s.
//!
//! Install ids are not known when the tree is rendered: every report of a machine goes to
//! [`REPORT_OBJECT`] (the latest report, overwritten), a successful install's also to
//! `installed.json`, and any other name signed for the machine (progress events) to itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The folder of the tree holding the presigned URLs.
pub const DIR: &str = "presigned";
/// `presigned/index.json`: present in a tree rendered with `--s3`.
pub const INDEX: &str = "presigned/index.json";
/// The object a machine's reports go to when their own name has no URL.
pub const REPORT_OBJECT: &str = "report.json";
/// The objects under `reports/<machine>/` that `render --s3` signs a `PUT` URL for.
pub const OBJECTS: &[&str] = &[REPORT_OBJECT, "installed.json", "progress.json"];

/// `presigned/index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// When the URLs stop working (RFC 3339, UTC).
    pub expires: String,
    /// How many machines have a `presigned/<machine>.json`.
    pub machines: usize,
}

/// `presigned/<machine>.json`: one machine's upload URLs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploads {
    /// When the URLs stop working (RFC 3339, UTC).
    pub expires: String,
    /// Tree-relative path (`reports/<machine>/installed.json`) to its presigned `PUT` URL.
    pub put: BTreeMap<String, String>,
}

impl Uploads {
    /// The URL to `PUT` `rel` (a path relative to the tree) to: its own, else, for another
    /// name in a folder that has a [`REPORT_OBJECT`] URL (a report named by its install id),
    /// that one.
    pub fn url_for(&self, rel: &str) -> Option<&str> {
        if let Some(u) = self.put.get(rel) {
            return Some(u);
        }
        let (dir, _) = rel.rsplit_once('/')?;
        self.put
            .get(&format!("{dir}/{REPORT_OBJECT}"))
            .map(String::as_str)
    }
}

/// `presigned/<machine>.json` for a machine folder name (`aa-bb-cc-dd-ee-ff`).
pub fn machine_file(machine: &str) -> String {
    format!("{DIR}/{machine}.json")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reports_route_to_their_own_url_else_the_machine_report() {
        let u = Uploads {
            expires: "2026-12-08T10:00:00Z".into(),
            put: [
                ("reports/m/report.json", "http://s/r?sig"),
                ("reports/m/installed.json", "http://s/i?sig"),
                ("reports/m/progress.json", "http://s/p?sig"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        };
        assert_eq!(
            u.url_for("reports/m/installed.json"),
            Some("http://s/i?sig")
        );
        assert_eq!(u.url_for("reports/m/progress.json"), Some("http://s/p?sig"));
        assert_eq!(
            u.url_for("reports/m/20261201-054900-abcd.json"),
            Some("http://s/r?sig")
        );
        assert_eq!(u.url_for("reports/other/x.json"), None);
        assert_eq!(u.url_for("config.json"), None);
        assert_eq!(
            machine_file("52-54-00-12-34-56"),
            "presigned/52-54-00-12-34-56.json"
        );
    }
}
