//! `imprint netboot render --s3`: a tree for an S3-compatible bucket. Reads are plain `GET`s of
//! a publicly readable bucket (firmware fetches `bootx64.efi` without credentials anyway);
//! uploads go through presigned `PUT` URLs (SigV4 query signing with rusty-s3), minted here per
//! machine of `seed.machines` keyed by MAC, for the objects of
//! [`imprint_core::presigned::OBJECTS`] under `reports/<machine>/`. The keys come from the
//! standard environment variables and are used only to sign: they are never printed and never
//! written into the tree; the appliance holds no keys.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use imprint_core::config::Config;
use imprint_core::presigned::{self, Index, Uploads};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::BaseUrl;

/// SigV4's longest presigned URL lifetime.
pub const MAX_EXPIRES: Duration = Duration::from_secs(7 * 24 * 3600);

/// The S3 options of `imprint netboot render`.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Args {
    /// The tree goes into an S3-compatible bucket served at --url (virtual-host style,
    /// http://BUCKET.HOST[:PORT]/): sign presigned PUT URLs for each machine's reports with
    /// the keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), into
    /// presigned/<machine>.json. The keys are never printed or written into the tree.
    #[arg(long)]
    pub s3: bool,
    /// The S3 endpoint the machines PUT to, as http://HOST[:PORT] (URLs in path style,
    /// ENDPOINT/BUCKET/KEY: works with an IP address) [default: from --url, virtual-host style].
    #[arg(long, value_name = "URL", requires = "s3")]
    pub s3_endpoint: Option<String>,
    /// The bucket [default: the first label of --url's host].
    #[arg(long, value_name = "NAME", requires = "s3")]
    pub s3_bucket: Option<String>,
    /// The bucket's region (part of the signature).
    #[arg(
        long,
        value_name = "REGION",
        default_value = "us-east-1",
        requires = "s3"
    )]
    pub s3_region: String,
    /// How long the presigned URLs work, as Nd, Nh, Nm or Ns (at most 7d, SigV4's limit).
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_expires, requires = "s3")]
    pub expires: Duration,
}

impl S3Args {
    /// No S3: the tree is for a plain HTTP server (what `netboot serve` renders).
    pub fn off() -> S3Args {
        S3Args {
            s3: false,
            s3_endpoint: None,
            s3_bucket: None,
            s3_region: "us-east-1".into(),
            expires: MAX_EXPIRES,
        }
    }
}

/// Parses `7d`, `36h`, `90m`, `3600s` or `3600` (seconds), at most [`MAX_EXPIRES`].
pub fn parse_expires(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with d, h, m or s (e.g. 7d, 12h)"))?;
    let secs = match unit {
        'd' => n.checked_mul(86_400),
        'h' => n.checked_mul(3600),
        'm' => n.checked_mul(60),
        's' => Some(n),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (d, h, m or s)")),
    }
    .ok_or_else(|| format!("{s:?}: too long"))?;
    if secs == 0 {
        return Err(format!("{s:?}: must be at least one second"));
    }
    if secs > MAX_EXPIRES.as_secs() {
        return Err(format!(
            "{s:?}: presigned S3 URLs work for at most 7 days (7d, SigV4's limit)"
        ));
    }
    Ok(Duration::from_secs(secs))
}

/// What `--s3` adds to the tree.
#[derive(Debug)]
pub struct Presigned {
    /// Tree-relative path and contents: `presigned/index.json`, `presigned/<machine>.json`.
    pub files: Vec<(String, Vec<u8>)>,
    /// Lines for the user (what was signed, until when, what was not).
    pub summary: Vec<String>,
}

/// The bucket the machines `PUT` to, from the options and --url.
fn bucket(args: &S3Args, url: &BaseUrl) -> Result<Bucket> {
    let first_label = url
        .host
        .split_once('.')
        .filter(|_| url.host.parse::<std::net::Ipv4Addr>().is_err());
    let (endpoint, style, name) = match &args.s3_endpoint {
        Some(e) => {
            let name = match (&args.s3_bucket, first_label) {
                (Some(b), _) => b.clone(),
                (None, Some((b, _))) => b.to_owned(),
                (None, None) => bail!(
                    "--s3-endpoint needs --s3-bucket NAME (--url's host {:?} names no bucket)",
                    url.host
                ),
            };
            (e.clone(), UrlStyle::Path, name)
        }
        None => {
            let Some((b, rest)) = first_label else {
                bail!(
                    "--s3: --url must name the bucket as http://BUCKET.HOST[:PORT]/ (virtual-host style: the tree is served at the bucket's root, which shim and GRUB need), or pass --s3-endpoint and --s3-bucket; {:?} is not such a name",
                    url.host
                );
            };
            if let Some(want) = &args.s3_bucket {
                ensure!(
                    want == b,
                    "--s3-bucket {want:?} is not --url's bucket {b:?}: pass --s3-endpoint too"
                );
            }
            let port = url
                .authority
                .rsplit_once(':')
                .map(|(_, p)| format!(":{p}"))
                .unwrap_or_default();
            (
                format!("http://{rest}{port}"),
                UrlStyle::VirtualHost,
                b.to_owned(),
            )
        }
    };
    let shown = crate::commands::untrusted(&imprint_core::remote::redact_url(&endpoint));
    let parsed: url::Url = endpoint
        .parse()
        .with_context(|| format!("--s3-endpoint {shown}: not a URL"))?;
    ensure!(
        parsed.scheme() == "http",
        "--s3-endpoint {shown}: only http:// (the appliance has no TLS)"
    );
    ensure!(
        parsed.username().is_empty() && parsed.password().is_none(),
        "--s3-endpoint {shown}: user names and passwords cannot be in the URL (the keys come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    );
    ensure!(
        parsed.query().is_none() && parsed.fragment().is_none(),
        "--s3-endpoint {shown}: a query or fragment is not allowed"
    );
    Bucket::new(parsed, style, name.clone(), args.s3_region.clone())
        .with_context(|| format!("the bucket {name:?} at {shown}"))
}

/// Signs the upload URLs for every machine of `config` keyed by MAC.
pub fn presign(args: &S3Args, url: &BaseUrl, config: &Config) -> Result<Presigned> {
    let bucket = bucket(args, url)?;
    let creds = Credentials::from_env().context(
        "--s3 signs upload URLs with the keys in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (they are never written into the tree)",
    )?;
    // Whole seconds: the expiry shown is the one in the signature.
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .context("reading the clock")?;
    let span = jiff::SignedDuration::try_from(args.expires).context("the expiry")?;
    let expires = now
        .checked_add(span)
        .context("the expiry is out of range")?
        .to_string();

    let mut files = Vec::new();
    let mut signed = 0usize;
    let mut by_dmi = 0usize;
    for m in &config.seed.machines {
        let Some(mac) = m.mac else {
            by_dmi += 1;
            continue;
        };
        let machine = mac
            .0
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join("-");
        let mut put = std::collections::BTreeMap::new();
        for obj in presigned::OBJECTS {
            let key = format!("reports/{machine}/{obj}");
            let u = bucket
                .put_object(Some(&creds), &key)
                .sign_with_time(args.expires, &now);
            put.insert(key, u.to_string());
        }
        let up = Uploads {
            expires: expires.clone(),
            put,
        };
        let mut body = serde_json::to_vec_pretty(&up).context("serializing presigned URLs")?;
        body.push(b'\n');
        files.push((presigned::machine_file(&machine), body));
        signed += 1;
    }
    let mut index = serde_json::to_vec_pretty(&Index {
        expires: expires.clone(),
        machines: signed,
    })
    .context("serializing presigned/index.json")?;
    index.push(b'\n');
    files.push((presigned::INDEX.to_owned(), index));

    let mut summary = vec![format!(
        "imprint: S3: presigned PUT URLs for {signed} machine(s) in presigned/ ({} at {}), valid until {expires} ({}); render again before then",
        bucket.name(),
        crate::commands::untrusted(bucket.base_url().as_str()),
        human(args.expires),
    )];
    if by_dmi > 0 {
        summary.push(format!(
            "imprint: S3: {by_dmi} machine(s) of seed.machines are keyed by DMI serial or UUID: they get no upload URLs (key them by the MAC they netboot from)"
        ));
    }
    summary.push(
        "imprint: S3: machines not in seed.machines by MAC install without uploading a report (the appliance says so on its console)".to_string(),
    );
    Ok(Presigned { files, summary })
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = [(86_400, "day"), (3600, "hour"), (60, "minute")]
        .into_iter()
        .find(|(u, _)| s.is_multiple_of(*u))
        .map_or((s, "second"), |(u, name)| (s / u, name));
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn expiries_are_parsed_and_capped_at_seven_days() {
        assert_eq!(parse_expires("7d").unwrap(), MAX_EXPIRES);
        assert_eq!(
            parse_expires("36h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(parse_expires("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_expires("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_expires("60").unwrap(), Duration::from_secs(60));
        assert_eq!(human(MAX_EXPIRES), "7 days");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
        assert_eq!(human(Duration::from_secs(90)), "90 seconds");
        for bad in ["8d", "169h", "0s", "d", "7w", "-1d", ""] {
            assert!(parse_expires(bad).is_err(), "{bad}");
        }
    }

    fn args(endpoint: Option<&str>, bucket: Option<&str>) -> S3Args {
        S3Args {
            s3: true,
            s3_endpoint: endpoint.map(str::to_owned),
            s3_bucket: bucket.map(str::to_owned),
            s3_region: "us-east-1".into(),
            expires: MAX_EXPIRES,
        }
    }

    #[test]
    fn the_bucket_comes_from_the_url_or_the_options() {
        let vh = BaseUrl::parse("http://fleet.s3.lan:9000/").unwrap();
        let b = bucket(&args(None, None), &vh).unwrap();
        assert_eq!(b.name(), "fleet");
        assert_eq!(b.base_url().as_str(), "http://fleet.s3.lan:9000/");
        let b = bucket(&args(Some("http://10.0.0.5:9000"), None), &vh).unwrap();
        assert_eq!(b.base_url().as_str(), "http://10.0.0.5:9000/fleet/");
        let ip = BaseUrl::parse("http://10.0.0.5:9000/").unwrap();
        let e = format!("{:#}", bucket(&args(None, None), &ip).unwrap_err());
        assert!(e.contains("BUCKET.HOST"), "{e}");
        let e = format!(
            "{:#}",
            bucket(&args(Some("http://10.0.0.5"), None), &ip).unwrap_err()
        );
        assert!(e.contains("--s3-bucket"), "{e}");
        let b = bucket(&args(Some("http://10.0.0.5"), Some("b")), &ip).unwrap();
        assert_eq!(b.base_url().as_str(), "http://10.0.0.5/b/");
        for (bad, why) in [
            ("https://10.0.0.5", "only http://"),
            ("http://k:secret@10.0.0.5", "user names"),
            ("http://10.0.0.5/?x=secret", "query"),
        ] {
            let e = format!(
                "{:#}",
                bucket(&args(Some(bad), Some("b")), &ip).unwrap_err()
            );
            assert!(e.contains(why) && !e.contains("secret"), "{bad}: {e}");
        }
        let e = format!("{:#}", bucket(&args(None, Some("other")), &vh).unwrap_err());
        assert!(e.contains("is not --url's bucket"), "{e}");
    }
}
