//! How the command line writes sizes, rates and durations: one style everywhere, binary units
//! (`512 B`, `4.0 KiB`, `1.5 GiB`, `112.3 MiB/s`), one decimal, seconds as `12.3 s`. Every
//! human-readable number `imprint` prints goes through here; JSON carries plain bytes and
//! seconds instead.
//!
//! Sizes are the same text the appliance shows on the NUC's console (`human_bytes` of the core),
//! so a size reads the same on the stick's screen and on the workstation.

use imprint_core::progress::human_bytes;

/// A size in binary units: `512 B`, `1.0 KiB`, `3.4 GiB`.
pub fn size(bytes: u64) -> String {
    human_bytes(bytes)
}

/// A size with its exact byte count: `1.0 MiB (1048576 bytes)`.
pub fn size_exact(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", size(bytes))
}

/// Bytes per second in the units of [`size`]: `112.3 MiB/s`; `-` when no time passed.
pub fn rate(bytes: u64, secs: f64) -> String {
    if secs <= 0.0 || !secs.is_finite() {
        return "-".into();
    }
    format!("{}/s", size((bytes as f64 / secs) as u64))
}

/// Elapsed seconds: `0.4 s`, `12.3 s`, `2 min 05 s`, `1 h 02 min`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    let whole = secs.round() as u64;
    if whole < 3600 {
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        format!("{} h {:02} min", whole / 3600, whole % 3600 / 60)
    }
}

/// Time left for a progress bar, fixed width for its place on the line: `12:34`
/// (minutes:seconds) or `1:02:03`, at most `99:59:59`.
pub fn eta(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--:--".into();
    }
    let s = (secs.round() as u64).min(99 * 3600 + 59 * 60 + 59);
    if s < 3600 {
        format!("{:02}:{:02}", s / 60, s % 60)
    } else {
        format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_with_one_decimal() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(64 << 20), "64.0 MiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(size((1 << 40) + (1 << 39)), "1.5 TiB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
        assert_eq!(size_exact(1 << 20), "1.0 MiB (1048576 bytes)");
    }

    #[test]
    fn rates_use_the_size_units_per_second() {
        // 100 MB/s in decimal is 95.4 MiB/s: the same unit as every size, never MB/s.
        assert_eq!(rate(100_000_000, 1.0), "95.4 MiB/s");
        assert_eq!(rate(1 << 30, 2.0), "512.0 MiB/s");
        assert_eq!(rate(10, 0.0), "-");
        assert_eq!(rate(10, f64::NAN), "-");
        for (bytes, secs) in [(1u64, 1.0), (5 << 20, 0.5), (1 << 40, 3.0)] {
            let r = rate(bytes, secs);
            let unit = r.split(' ').nth(1).unwrap_or_default();
            assert!(
                ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"].contains(&unit),
                "{r}"
            );
        }
    }

    #[test]
    fn durations_and_etas() {
        assert_eq!(duration(0.04), "0.0 s");
        assert_eq!(duration(12.34), "12.3 s");
        assert_eq!(duration(125.0), "2 min 05 s");
        assert_eq!(duration(3725.0), "1 h 02 min");
        assert_eq!(duration(-1.0), "-");
        assert_eq!(eta(0.0), "00:00");
        assert_eq!(eta(754.0), "12:34");
        assert_eq!(eta(3723.0), "1:02:03");
        assert_eq!(eta(1e9), "99:59:59");
        assert_eq!(eta(f64::INFINITY), "--:--");
    }
}
