//! Human units on the command line: rates (bits/s), byte counts and durations, and their
//! display.
//!
//! Rates are decimal SI (`200Mbit`, `1.5G`, `500k`, `1000`), with an optional `bit`, `bits`,
//! `bps`, `bit/s` suffix. Byte counts take SI (`10MB` = 10^7) or IEC (`200MiB` = 200 * 2^20)
//! prefixes. Durations go through `humantime` (`30s`, `2m`, `1h30m`); a bare number is seconds.
//!
//! Parsers return `Err(String)` with the offending text and examples; clap prefixes the flag
//! name (`invalid value 'fast' for '--rate <RATE>': ...`).

use std::time::Duration;

const RATE_EXAMPLES: &str = "examples: 200Mbit, 1.5G, 500k";
const BYTES_EXAMPLES: &str = "examples: 10MB, 200MiB, 64KiB, 1500";
const DURATION_EXAMPLES: &str = "examples: 30s, 2m, 1h30m, 500ms";

/// Splits `12.5 Mbit/s` into the number (`12.5`, underscores removed) and the unit (`Mbit/s`).
fn split_number(s: &str) -> (String, &str) {
    let s = s.trim();
    let end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.' || *c == '_'))
        .map_or(s.len(), |(i, _)| i);
    let number = s[..end].chars().filter(|c| *c != '_').collect();
    (number, s[end..].trim())
}

/// At most one `.` and at least one digit.
fn is_decimal(number: &str) -> bool {
    number.chars().filter(|c| *c == '.').count() <= 1 && number.chars().any(|c| c.is_ascii_digit())
}

/// `number * multiplier`, rounded to the nearest integer, exactly (no floating point).
/// `None` if `number` is not a plain decimal or the result does not fit in a u64.
fn scale(number: &str, multiplier: u64) -> Option<u64> {
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Digits beyond 24 places after the point cannot change the rounded result for any
    // multiplier we use (<= 2^60) in a way that matters; cap to keep u128 from overflowing.
    let frac = &frac[..frac.len().min(24)];
    let mut mantissa: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(u128::from(c as u8 - b'0'))?;
    }
    let divisor = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let value = mantissa
        .checked_mul(u128::from(multiplier))?
        .checked_add(divisor / 2)?
        / divisor;
    u64::try_from(value).ok()
}

/// Parses a rate in bits/s: `200Mbit`, `200M`, `1.5Gbit`, `10G`, `500k`, `1000`,
/// `200 Mbit/s`. Prefixes are decimal (k = 1000) and case-insensitive.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let not_a_rate = || format!("`{s}` is not a rate; {RATE_EXAMPLES}");
    let (number, unit) = split_number(s);
    if number.is_empty() {
        return Err(not_a_rate());
    }
    if unit.contains('B') || unit.to_ascii_lowercase().contains("byte") {
        return Err(format!(
            "`{s}` looks like bytes, but rates are in bits/s (1 byte = 8 bits); {RATE_EXAMPLES}"
        ));
    }
    let lower = unit.to_ascii_lowercase();
    let (multiplier, rest) = match lower.chars().next() {
        Some('k') => (1_000, &lower[1..]),
        Some('m') => (1_000_000, &lower[1..]),
        Some('g') => (1_000_000_000, &lower[1..]),
        Some('t') => (1_000_000_000_000, &lower[1..]),
        _ => (1, lower.as_str()),
    };
    if !matches!(rest, "" | "bit" | "bits" | "bps" | "bit/s" | "bits/s") {
        return Err(not_a_rate());
    }
    scale(&number, multiplier).ok_or_else(|| {
        if !is_decimal(&number) {
            not_a_rate()
        } else {
            format!("`{s}` is too large a rate (at most {} bit/s)", u64::MAX)
        }
    })
}

/// Parses a byte count: `10MB` (10^7), `200MiB` (200 * 2^20), `64KiB`, `1.5k`, `1500`,
/// `1500B`. SI prefixes are case-insensitive; a trailing `b` must be a capital `B`, since a
/// lowercase `b` usually means bits.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let not_bytes = || format!("`{s}` is not a byte count; {BYTES_EXAMPLES}");
    let (number, unit) = split_number(s);
    if number.is_empty() {
        return Err(not_bytes());
    }
    let lower = unit.to_ascii_lowercase();
    if lower.ends_with("bit") || lower.ends_with("bits") || lower.ends_with("bps") {
        return Err(format!(
            "`{s}` looks like bits, but this is a byte count; {BYTES_EXAMPLES}"
        ));
    }
    let (prefix, suffix) = match unit.char_indices().next() {
        Some((_, c)) if "kKmMgGtT".contains(c) => unit.split_at(1),
        _ => ("", unit),
    };
    let power: u32 = match prefix.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        _ => 4,
    };
    let base: u64 = match suffix {
        "i" | "iB" if power > 0 => 1024,
        "" | "B" => 1000,
        "bytes" | "byte" if power == 0 => 1000,
        "b" | "ib" => {
            return Err(format!(
                "`{s}` is ambiguous: a lowercase `b` usually means bits; write `B` for bytes ({BYTES_EXAMPLES})"
            ))
        }
        _ => return Err(not_bytes()),
    };
    let multiplier = base.pow(power);
    scale(&number, multiplier).ok_or_else(|| {
        if !is_decimal(&number) {
            not_bytes()
        } else {
            format!(
                "`{s}` is too large a byte count (at most {} bytes)",
                u64::MAX
            )
        }
    })
}

/// Parses a duration with humantime (`30s`, `2m`, `1h30m`, `500ms`); a bare number is
/// seconds (`45` = 45s, `1.5` = 1.5s).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return t
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .and_then(|v| Duration::try_from_secs_f64(v).ok())
            .ok_or_else(|| format!("`{s}` is not a duration; {DURATION_EXAMPLES}"));
    }
    humantime::parse_duration(t)
        .map_err(|_| format!("`{s}` is not a duration; {DURATION_EXAMPLES}"))
}

/// Formats `value / unit` with up to three decimals, trailing zeros removed.
fn decimal(value: u64, unit: u64) -> (u64, String) {
    let whole = value / unit;
    let rem = value % unit;
    // Round the remainder to thousandths of the unit.
    let mut thousandths =
        ((u128::from(rem) * 1000 + u128::from(unit) / 2) / u128::from(unit)) as u64;
    let mut whole = whole;
    if thousandths == 1000 {
        whole += 1;
        thousandths = 0;
    }
    if thousandths == 0 {
        return (whole, whole.to_string());
    }
    let frac = format!("{thousandths:03}");
    (whole, format!("{whole}.{}", frac.trim_end_matches('0')))
}

/// Formats a rate in bits/s with the largest decimal prefix that keeps the number >= 1:
/// `fmt_rate(200_000_000) == "200 Mbit/s"`, `fmt_rate(1_500) == "1.5 kbit/s"`.
pub fn fmt_rate(bps: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (1_000_000_000_000, "Tbit/s"),
        (1_000_000_000, "Gbit/s"),
        (1_000_000, "Mbit/s"),
        (1_000, "kbit/s"),
        (1, "bit/s"),
    ];
    for (i, (unit, name)) in UNITS.iter().enumerate() {
        if bps >= *unit {
            let (whole, text) = decimal(bps, *unit);
            // 999_999_999 rounds to "1000 Mbit/s": show it as "1 Gbit/s" instead.
            if whole >= 1000 && i > 0 {
                let (bigger, bigger_name) = UNITS[i - 1];
                return format!("{} {bigger_name}", decimal(bps, bigger).1);
            }
            return format!("{text} {name}");
        }
    }
    "0 bit/s".to_string()
}

/// Formats a byte count: an exact IEC multiple below 1024 of its unit prints as such
/// (`200 MiB`, `16 KiB`),
/// anything else with SI prefixes and up to three decimals (`10 MB`, `1.5 kB`, `999 B`).
pub fn fmt_bytes(bytes: u64) -> String {
    const IEC: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in IEC {
        if bytes >= unit && bytes % unit == 0 && bytes / unit < 1024 {
            return format!("{} {name}", bytes / unit);
        }
    }
    const SI: [(u64, &str); 5] = [
        (1_000_000_000_000_000, "PB"),
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "kB"),
    ];
    for (i, (unit, name)) in SI.iter().enumerate() {
        if bytes >= *unit {
            let (whole, text) = decimal(bytes, *unit);
            if whole >= 1000 && i > 0 {
                let (bigger, bigger_name) = SI[i - 1];
                return format!("{} {bigger_name}", decimal(bytes, bigger).1);
            }
            return format!("{text} {name}");
        }
    }
    format!("{bytes} B")
}

/// Formats milliseconds for a human: `850ms`, `29.5s`, `2m 3s`, `1h 2m 3s`.
pub fn fmt_millis(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 59_950 {
        let tenths = (ms + 50) / 100;
        return if tenths % 10 == 0 {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    humantime::format_duration(Duration::from_secs((ms + 500) / 1000)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_rate(input: &str, expect: Result<u64, &str>) {
        let got = parse_rate(input);
        match (got, expect) {
            (Ok(v), Ok(e)) => assert_eq!(v, e, "parse_rate({input:?})"),
            (Err(m), Err(e)) => assert!(
                m.contains(e),
                "parse_rate({input:?}) error {m:?} lacks {e:?}"
            ),
            (got, expect) => panic!("parse_rate({input:?}) = {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn rates() {
        check_rate("1000", Ok(1000));
        check_rate("0", Ok(0));
        check_rate("500k", Ok(500_000));
        check_rate("500K", Ok(500_000));
        check_rate("500kbit", Ok(500_000));
        check_rate("200M", Ok(200_000_000));
        check_rate("200m", Ok(200_000_000));
        check_rate("200Mbit", Ok(200_000_000));
        check_rate("200mbit", Ok(200_000_000));
        check_rate("200Mbps", Ok(200_000_000));
        check_rate("200Mbit/s", Ok(200_000_000));
        check_rate("200 Mbit/s", Ok(200_000_000));
        check_rate(" 200 Mbits ", Ok(200_000_000));
        check_rate("1.5Gbit", Ok(1_500_000_000));
        check_rate("1.5G", Ok(1_500_000_000));
        check_rate("10G", Ok(10_000_000_000));
        check_rate("2T", Ok(2_000_000_000_000));
        check_rate("1_000_000", Ok(1_000_000));
        check_rate(".5k", Ok(500));
        check_rate("1.0005k", Ok(1001));
        check_rate("100bit", Ok(100));
        check_rate("100bps", Ok(100));
        check_rate(
            "fast",
            Err("`fast` is not a rate; examples: 200Mbit, 1.5G, 500k"),
        );
        check_rate("", Err("is not a rate"));
        check_rate("M", Err("is not a rate"));
        check_rate("-5M", Err("is not a rate"));
        check_rate("5X", Err("is not a rate"));
        check_rate("5Mibit", Err("is not a rate"));
        check_rate("1.2.3M", Err("is not a rate"));
        check_rate(".", Err("is not a rate"));
        check_rate(".k", Err("is not a rate"));
        check_rate("10 MB", Err("looks like bytes"));
        check_rate("10MBps", Err("looks like bytes"));
        check_rate("10 bytes", Err("looks like bytes"));
        check_rate("99999999999T", Err("too large"));
    }

    fn check_bytes(input: &str, expect: Result<u64, &str>) {
        let got = parse_bytes(input);
        match (got, expect) {
            (Ok(v), Ok(e)) => assert_eq!(v, e, "parse_bytes({input:?})"),
            (Err(m), Err(e)) => assert!(
                m.contains(e),
                "parse_bytes({input:?}) error {m:?} lacks {e:?}"
            ),
            (got, expect) => panic!("parse_bytes({input:?}) = {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn byte_counts() {
        check_bytes("1500", Ok(1500));
        check_bytes("1500B", Ok(1500));
        check_bytes("1500 bytes", Ok(1500));
        check_bytes("10MB", Ok(10_000_000));
        check_bytes("10mB", Ok(10_000_000));
        check_bytes("10M", Ok(10_000_000));
        check_bytes("1.5k", Ok(1500));
        check_bytes("1.5kB", Ok(1500));
        check_bytes("64KB", Ok(64_000));
        check_bytes("64KiB", Ok(65_536));
        check_bytes("64Ki", Ok(65_536));
        check_bytes("64kiB", Ok(65_536));
        check_bytes("200MiB", Ok(200 * 1024 * 1024));
        check_bytes("200 MiB", Ok(200 * 1024 * 1024));
        check_bytes("1.5GiB", Ok(1536 * 1024 * 1024));
        check_bytes("2GB", Ok(2_000_000_000));
        check_bytes("1TiB", Ok(1 << 40));
        check_bytes("1.3KiB", Ok(1331));
        check_bytes(
            "lots",
            Err("`lots` is not a byte count; examples: 10MB, 200MiB"),
        );
        check_bytes("", Err("is not a byte count"));
        check_bytes("10XB", Err("is not a byte count"));
        check_bytes("10Bi", Err("is not a byte count"));
        check_bytes("10iB", Err("is not a byte count"));
        check_bytes("10Mb", Err("ambiguous"));
        check_bytes("10Mib", Err("ambiguous"));
        check_bytes("10Mbit", Err("looks like bits"));
        check_bytes("10Mbps", Err("looks like bits"));
        check_bytes("20000000TiB", Err("too large"));
    }

    fn check_duration(input: &str, expect: Result<Duration, &str>) {
        let got = parse_duration(input);
        match (got, expect) {
            (Ok(v), Ok(e)) => assert_eq!(v, e, "parse_duration({input:?})"),
            (Err(m), Err(e)) => assert!(
                m.contains(e),
                "parse_duration({input:?}) error {m:?} lacks {e:?}"
            ),
            (got, expect) => panic!("parse_duration({input:?}) = {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn durations() {
        check_duration("30s", Ok(Duration::from_secs(30)));
        check_duration("2m", Ok(Duration::from_secs(120)));
        check_duration("1h30m", Ok(Duration::from_secs(5400)));
        check_duration("1h 30m", Ok(Duration::from_secs(5400)));
        check_duration("500ms", Ok(Duration::from_millis(500)));
        check_duration("45", Ok(Duration::from_secs(45)));
        check_duration("1.5", Ok(Duration::from_millis(1500)));
        check_duration("soon", Err("`soon` is not a duration; examples: 30s, 2m"));
        check_duration("", Err("is not a duration"));
        check_duration("5 parsecs", Err("is not a duration"));
        check_duration("1.2.3", Err("is not a duration"));
        check_duration("-3s", Err("is not a duration"));
    }

    #[test]
    fn rate_display() {
        let cases: &[(u64, &str)] = &[
            (0, "0 bit/s"),
            (1, "1 bit/s"),
            (999, "999 bit/s"),
            (1_000, "1 kbit/s"),
            (1_500, "1.5 kbit/s"),
            (500_000, "500 kbit/s"),
            (200_000_000, "200 Mbit/s"),
            (123_456_789, "123.457 Mbit/s"),
            (999_999_999, "1 Gbit/s"),
            (1_500_000_000, "1.5 Gbit/s"),
            (100_000_000_000, "100 Gbit/s"),
            (2_000_000_000_000, "2 Tbit/s"),
            (u64::MAX, "18446744.074 Tbit/s"),
        ];
        for (bps, want) in cases {
            assert_eq!(fmt_rate(*bps), *want, "fmt_rate({bps})");
        }
    }

    #[test]
    fn rate_display_round_trips() {
        for bps in [
            1,
            999,
            1_000,
            1_500,
            200_000_000,
            1_500_000_000,
            10_000_000_000,
        ] {
            assert_eq!(parse_rate(&fmt_rate(bps)), Ok(bps), "round trip {bps}");
        }
    }

    #[test]
    fn byte_display() {
        let cases: &[(u64, &str)] = &[
            (0, "0 B"),
            (999, "999 B"),
            (1_000, "1 kB"),
            (1_500, "1.5 kB"),
            (1_024, "1 KiB"),
            (16_384, "16 KiB"),
            (65_536, "64 KiB"),
            (10_000_000, "10 MB"),
            (12_345_678, "12.346 MB"),
            (200 * 1024 * 1024, "200 MiB"),
            (999_999_999, "1 GB"),
            (1 << 40, "1 TiB"),
            (3_000_000_000_000, "3 TB"),
            (2048 << 30, "2 TiB"),
            (1_024_000, "1000 KiB"),
            (1 << 50, "1.126 PB"),
        ];
        for (bytes, want) in cases {
            assert_eq!(fmt_bytes(*bytes), *want, "fmt_bytes({bytes})");
        }
    }

    #[test]
    fn byte_display_round_trips() {
        for bytes in [
            0,
            999,
            1_000,
            1_500,
            16_384,
            10_000_000,
            200 * 1024 * 1024,
            1 << 40,
        ] {
            assert_eq!(
                parse_bytes(&fmt_bytes(bytes)),
                Ok(bytes),
                "round trip {bytes}"
            );
        }
    }

    #[test]
    fn millis_display() {
        let cases: &[(u64, &str)] = &[
            (0, "0ms"),
            (850, "850ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (29_500, "29.5s"),
            (29_999, "30s"),
            (59_000, "59s"),
            (59_949, "59.9s"),
            (59_950, "1m"),
            (60_000, "1m"),
            (123_000, "2m 3s"),
            (3_723_000, "1h 2m 3s"),
        ];
        for (ms, want) in cases {
            assert_eq!(fmt_millis(*ms), *want, "fmt_millis({ms})");
        }
    }
}
