//! Local wall-clock time for display (`HH:MM:SS`), without a C library call (the crate
//! forbids `unsafe`) and without a time-zone crate: the zone the system uses — `$TZ` (a
//! zone name, a TZif file, or a POSIX TZ string), else `/etc/localtime` — read once from
//! its TZif file, and its POSIX TZ rule for times past the file's table ("slim" files
//! list no transitions after the rules stabilised). Anything unreadable falls back to UTC:
//! a wrong hour on a display is better than a failed command.

use std::path::{Path, PathBuf};

/// The UTC offset of a zone at any instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Zone {
    /// Transition instants (unix seconds), ascending.
    transitions: Vec<i64>,
    /// For each transition, the index of its offset in `offsets`.
    types: Vec<u8>,
    /// UTC offsets (seconds east), in the file's order; `offsets[0]` applies before the
    /// first transition.
    offsets: Vec<i32>,
    /// The rule after the last transition (or the whole zone for a POSIX TZ string).
    rule: Option<Rule>,
}

impl Zone {
    pub fn utc() -> Zone {
        Zone::fixed(0)
    }

    fn fixed(offset: i32) -> Zone {
        Zone {
            transitions: Vec::new(),
            types: Vec::new(),
            offsets: vec![offset],
            rule: None,
        }
    }

    /// The zone this process runs in: `$TZ`, else `/etc/localtime`, else UTC.
    pub fn from_env() -> Zone {
        match std::env::var("TZ") {
            Ok(tz) => Zone::from_tz(&tz),
            Err(_) => read_tzif(Path::new("/etc/localtime")).unwrap_or_else(Zone::utc),
        }
    }

    /// What a `TZ` value means: empty is UTC; `:NAME` or `NAME` a file under the zoneinfo
    /// directory (`$TZDIR`, else /usr/share/zoneinfo) or an absolute path; otherwise a
    /// POSIX TZ string (`CET-1CEST,M3.5.0,M10.5.0/3`).
    pub fn from_tz(tz: &str) -> Zone {
        let tz = tz.trim();
        let name = tz.strip_prefix(':').unwrap_or(tz);
        if name.is_empty() {
            return Zone::utc();
        }
        if name.starts_with('/') {
            return read_tzif(Path::new(name)).unwrap_or_else(Zone::utc);
        }
        if !name.split('/').any(|part| part == "..") {
            let dir = std::env::var_os("TZDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/usr/share/zoneinfo"));
            if let Some(z) = read_tzif(&dir.join(name)) {
                return z;
            }
        }
        match Rule::parse(name) {
            Some(rule) => Zone {
                transitions: Vec::new(),
                types: Vec::new(),
                offsets: vec![rule.std],
                rule: Some(rule),
            },
            None => Zone::utc(),
        }
    }

    /// The UTC offset in seconds (east positive) at unix second `t`.
    pub fn offset_at(&self, t: i64) -> i32 {
        let first = self.offsets.first().copied().unwrap_or(0);
        let n = self.transitions.partition_point(|&x| x <= t);
        if n == 0 {
            // Before the table (or no table at all): a POSIX string's rule, else type 0.
            return match (&self.rule, self.transitions.is_empty()) {
                (Some(r), true) => r.offset_at(t),
                _ => first,
            };
        }
        if n == self.transitions.len() {
            if let Some(r) = &self.rule {
                return r.offset_at(t);
            }
        }
        self.types
            .get(n - 1)
            .and_then(|&i| self.offsets.get(usize::from(i)))
            .copied()
            .unwrap_or(first)
    }

    /// Unix milliseconds as local `HH:MM:SS`.
    pub fn hms(&self, unix_ms: u64) -> String {
        let t = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX / 2);
        let local = t + i64::from(self.offset_at(t));
        let s = local.rem_euclid(86_400);
        format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }
}

fn read_tzif(path: &Path) -> Option<Zone> {
    // Zone files are a few kB; anything large is not one.
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 1 << 20 {
        return None;
    }
    parse_tzif(&std::fs::read(path).ok()?)
}

/// Reads big-endian integers off a byte slice.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The six counts of a TZif header (RFC 8536 section 3.1).
struct Counts {
    isut: usize,
    isstd: usize,
    leap: usize,
    time: usize,
    typ: usize,
    chars: usize,
}

fn header(c: &mut Cursor<'_>) -> Option<(u8, Counts)> {
    if c.take(4)? != b"TZif" {
        return None;
    }
    let version = c.take(1)?[0];
    c.take(15)?;
    let mut n = || c.u32().and_then(|v| usize::try_from(v).ok());
    let counts = Counts {
        isut: n()?,
        isstd: n()?,
        leap: n()?,
        time: n()?,
        typ: n()?,
        chars: n()?,
    };
    Some((version, counts))
}

/// A TZif file (RFC 8536): version 1 (32-bit times), or 2+ (its 64-bit block and the POSIX
/// TZ footer). Leap-second tables are skipped (`right/` zones come out a few seconds off).
pub fn parse_tzif(b: &[u8]) -> Option<Zone> {
    let mut c = Cursor { b, at: 0 };
    let (version, mut counts) = header(&mut c)?;
    let mut time_size = 4;
    if version >= b'2' {
        // Skip the version 1 block; the 64-bit one follows with its own header.
        let v1 = counts.time * 5
            + counts.typ * 6
            + counts.chars
            + counts.leap * 8
            + counts.isstd
            + counts.isut;
        c.take(v1)?;
        counts = header(&mut c)?.1;
        time_size = 8;
    }
    if counts.typ == 0 {
        return None;
    }
    let mut transitions = Vec::with_capacity(counts.time);
    for _ in 0..counts.time {
        transitions.push(if time_size == 8 {
            c.i64()?
        } else {
            i64::from(c.i32()?)
        });
    }
    let types = c.take(counts.time)?.to_vec();
    let mut offsets = Vec::with_capacity(counts.typ);
    for _ in 0..counts.typ {
        offsets.push(c.i32()?);
        c.take(2)?; // isdst, abbreviation index
    }
    if types.iter().any(|&t| usize::from(t) >= counts.typ) {
        return None;
    }
    c.take(counts.chars + counts.leap * (time_size + 4) + counts.isstd + counts.isut)?;
    let rule = if version >= b'2' {
        let rest = &b[c.at..];
        rest.strip_prefix(b"\n")
            .and_then(|r| r.split(|&x| x == b'\n').next())
            .and_then(|r| std::str::from_utf8(r).ok())
            .and_then(Rule::parse)
    } else {
        None
    };
    Some(Zone {
        transitions,
        types,
        offsets,
        rule,
    })
}

/// A POSIX TZ rule: a standard offset and, optionally, daylight saving time between two
/// dates each year.
#[derive(Clone, Debug, PartialEq)]
struct Rule {
    /// Standard time, seconds east of UTC.
    std: i32,
    dst: Option<Dst>,
}

#[derive(Clone, Debug, PartialEq)]
struct Dst {
    /// Daylight time, seconds east of UTC.
    offset: i32,
    /// Starts at this date and local (standard) time of day.
    start: (RuleDate, i32),
    /// Ends at this date and local (daylight) time of day.
    end: (RuleDate, i32),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum RuleDate {
    /// `Jn`: day 1..=365, February 29 never counted.
    Julian1(u16),
    /// `n`: day 0..=365 of the year, February 29 counted.
    Julian0(u16),
    /// `Mm.w.d`: weekday `d` (0 = Sunday) of week `w` (1..=5, 5 = the last) of month `m`.
    Month { m: u8, w: u8, d: u8 },
}

/// Parses the parts of a POSIX TZ string in order.
struct TzParser<'a> {
    s: &'a [u8],
    at: usize,
}

impl TzParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// `EST` or `<+0330>`.
    fn name(&mut self) -> Option<()> {
        if self.eat(b'<') {
            while self.peek()? != b'>' {
                self.at += 1;
            }
            self.at += 1;
            return Some(());
        }
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_alphabetic()) {
            self.at += 1;
        }
        (self.at > start).then_some(())
    }

    fn number(&mut self, max: u32) -> Option<u32> {
        let start = self.at;
        let mut v: u32 = 0;
        while let Some(b) = self.peek().filter(u8::is_ascii_digit) {
            v = v.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
            self.at += 1;
        }
        (self.at > start && v <= max).then_some(v)
    }

    /// `[+-]hh[:mm[:ss]]` in seconds (`max_hours` 24 for offsets, 167 for rule times).
    fn hms(&mut self, max_hours: u32) -> Option<i32> {
        let sign = if self.eat(b'-') {
            -1
        } else {
            self.eat(b'+');
            1
        };
        let mut secs = self.number(max_hours)? * 3600;
        if self.eat(b':') {
            secs += self.number(59)? * 60;
            if self.eat(b':') {
                secs += self.number(59)?;
            }
        }
        Some(sign * i32::try_from(secs).ok()?)
    }

    fn date(&mut self) -> Option<(RuleDate, i32)> {
        let date = if self.eat(b'J') {
            RuleDate::Julian1(u16::try_from(self.number(365)?).ok().filter(|&n| n >= 1)?)
        } else if self.eat(b'M') {
            let m = self.number(12)?;
            self.eat(b'.').then_some(())?;
            let w = self.number(5)?;
            self.eat(b'.').then_some(())?;
            let d = self.number(6)?;
            if m == 0 || w == 0 {
                return None;
            }
            RuleDate::Month {
                m: u8::try_from(m).ok()?,
                w: u8::try_from(w).ok()?,
                d: u8::try_from(d).ok()?,
            }
        } else {
            RuleDate::Julian0(u16::try_from(self.number(365)?).ok()?)
        };
        let time = if self.eat(b'/') {
            self.hms(167)?
        } else {
            2 * 3600
        };
        Some((date, time))
    }
}

impl Rule {
    /// `UTC0`, `EST5EDT,M3.2.0,M11.1.0`, `<+0330>-3:30`, `IST-1GMT0,M10.5.0,M3.5.0/1`.
    /// POSIX offsets count west of UTC, so `CET-1` is one hour east.
    fn parse(s: &str) -> Option<Rule> {
        let mut p = TzParser {
            s: s.as_bytes(),
            at: 0,
        };
        p.name()?;
        let std = -p.hms(24)?;
        if p.peek().is_none() {
            return Some(Rule { std, dst: None });
        }
        p.name()?;
        let offset = match p.peek() {
            Some(b) if b == b'+' || b == b'-' || b.is_ascii_digit() => -p.hms(24)?,
            _ => std + 3600,
        };
        let (start, end) = if p.eat(b',') {
            let start = p.date()?;
            p.eat(b',').then_some(())?;
            (start, p.date()?)
        } else {
            // POSIX leaves the default rule to the implementation; this is the US one.
            (
                (RuleDate::Month { m: 3, w: 2, d: 0 }, 7200),
                (RuleDate::Month { m: 11, w: 1, d: 0 }, 7200),
            )
        };
        if p.peek().is_some() {
            return None;
        }
        Some(Rule {
            std,
            dst: Some(Dst { offset, start, end }),
        })
    }

    fn offset_at(&self, t: i64) -> i32 {
        let Some(d) = &self.dst else {
            return self.std;
        };
        let year = civil_from_days((t + i64::from(self.std)).div_euclid(86_400)).0;
        let at = |(date, time): (RuleDate, i32), offset: i32| {
            day_of(year, date) * 86_400 + i64::from(time) - i64::from(offset)
        };
        let start = at(d.start, self.std);
        let end = at(d.end, d.offset);
        let in_dst = if start < end {
            start <= t && t < end
        } else {
            // Southern hemisphere: daylight time spans the new year.
            !(end <= t && t < start)
        };
        if in_dst {
            d.offset
        } else {
            self.std
        }
    }
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// The day (since 1970-01-01) a rule date falls on in `year`.
fn day_of(year: i64, date: RuleDate) -> i64 {
    let jan1 = days_from_civil(year, 1, 1);
    match date {
        RuleDate::Julian1(n) => {
            let n = i64::from(n);
            jan1 + n - 1 + i64::from(is_leap(year) && n >= 60)
        }
        RuleDate::Julian0(n) => jan1 + i64::from(n),
        RuleDate::Month { m, w, d } => {
            let (m, w, d) = (i64::from(m), i64::from(w), i64::from(d));
            let first = days_from_civil(year, m, 1);
            // 1970-01-01 was a Thursday (4).
            let weekday = (first + 4).rem_euclid(7);
            let mut day = 1 + (d - weekday).rem_euclid(7) + 7 * (w - 1);
            while day > days_in_month(year, m) {
                day -= 7;
            }
            first + day - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn utc(y: i64, mo: i64, d: i64, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for z in [-800_000, -1, 0, 1, 11_016, 11_017, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z, "{z}");
        }
    }

    fn check_rule(tz: &str, cases: &[(i64, i32)]) {
        let zone = Zone::from_tz(tz);
        for (t, want) in cases {
            assert_eq!(zone.offset_at(*t), *want, "{tz} at {t}");
        }
    }

    #[test]
    fn posix_rules() {
        // Central Europe: +1, +2 from the last Sunday of March 01:00 UTC to the last
        // Sunday of October 01:00 UTC. 2026: March 29 and October 25.
        let cet = "CET-1CEST,M3.5.0,M10.5.0/3";
        check_rule(
            cet,
            &[
                (utc(2026, 1, 15, 12, 0), 3600),
                (utc(2026, 3, 29, 0, 59), 3600),
                (utc(2026, 3, 29, 1, 0), 7200),
                (utc(2026, 7, 1, 0, 0), 7200),
                (utc(2026, 10, 25, 0, 59), 7200),
                (utc(2026, 10, 25, 1, 0), 3600),
            ],
        );
        // US Eastern: second Sunday of March 02:00 local (07:00 UTC) to the first Sunday
        // of November 02:00 local daylight time (06:00 UTC). 2026: March 8, November 1.
        check_rule(
            "EST5EDT,M3.2.0,M11.1.0",
            &[
                (utc(2026, 3, 8, 6, 59), -5 * 3600),
                (utc(2026, 3, 8, 7, 0), -4 * 3600),
                (utc(2026, 11, 1, 5, 59), -4 * 3600),
                (utc(2026, 11, 1, 6, 0), -5 * 3600),
            ],
        );
        // The default rule when none is given is the US one.
        check_rule("EST5EDT", &[(utc(2026, 7, 1, 0, 0), -4 * 3600)]);
        // Southern hemisphere: daylight time over the new year. Sydney 2026: ends April
        // 5 03:00 local daylight (16:00 UTC April 4), starts October 4 02:00 local
        // standard (16:00 UTC October 3).
        check_rule(
            "AEST-10AEDT,M10.1.0,M4.1.0/3",
            &[
                (utc(2026, 1, 1, 0, 0), 11 * 3600),
                (utc(2026, 4, 4, 15, 59), 11 * 3600),
                (utc(2026, 4, 4, 16, 0), 10 * 3600),
                (utc(2026, 10, 3, 15, 59), 10 * 3600),
                (utc(2026, 10, 3, 16, 0), 11 * 3600),
                (utc(2026, 12, 31, 0, 0), 11 * 3600),
            ],
        );
        // Fixed offsets, quoted names, minutes.
        check_rule("<+0530>-5:30", &[(0, 5 * 3600 + 1800)]);
        check_rule("UTC0", &[(utc(2026, 7, 1, 0, 0), 0)]);
        // Julian days: J60 is always March 1; day 59 (0-based) is March 1 in a leap year.
        assert_eq!(
            day_of(2024, RuleDate::Julian1(60)),
            days_from_civil(2024, 3, 1)
        );
        assert_eq!(
            day_of(2024, RuleDate::Julian0(59)),
            days_from_civil(2024, 2, 29)
        );
        // The fifth Sunday is the last one when a month has four.
        assert_eq!(
            day_of(2026, RuleDate::Month { m: 2, w: 5, d: 0 }),
            days_from_civil(2026, 2, 22)
        );
    }

    #[test]
    fn unparseable_tz_is_utc() {
        for tz in [
            "",
            ":",
            "nonsense-zone-123",
            "EST5EDT,M3",
            "../../etc/passwd",
        ] {
            assert_eq!(Zone::from_tz(tz).offset_at(1_000_000_000), 0, "{tz:?}");
        }
    }

    /// A version 2 TZif file: one 32-bit block, one 64-bit block and the footer.
    fn tzif(transitions: &[(i64, u8)], offsets: &[i32], footer: &str) -> Vec<u8> {
        let block = |wide: bool| {
            let mut b = Vec::new();
            b.extend_from_slice(b"TZif2");
            b.extend_from_slice(&[0; 15]);
            let chars = 4u32;
            for n in [
                0,
                0,
                0,
                transitions.len() as u32,
                offsets.len() as u32,
                chars,
            ] {
                b.extend_from_slice(&n.to_be_bytes());
            }
            for (t, _) in transitions {
                if wide {
                    b.extend_from_slice(&t.to_be_bytes());
                } else {
                    b.extend_from_slice(&(*t as i32).to_be_bytes());
                }
            }
            b.extend(transitions.iter().map(|(_, i)| *i));
            for o in offsets {
                b.extend_from_slice(&o.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
            }
            b.extend_from_slice(b"XYZ\0");
            b
        };
        let mut f = block(false);
        f.extend(block(true));
        f.extend_from_slice(format!("\n{footer}\n").as_bytes());
        f
    }

    #[test]
    fn tzif_table_then_footer() {
        let t1 = utc(2000, 1, 1, 0, 0);
        let t2 = utc(2010, 1, 1, 0, 0);
        let file = tzif(&[(t1, 1), (t2, 0)], &[3600, 7200], "<+03>-3");
        let z = parse_tzif(&file).expect("valid TZif");
        assert_eq!(z.offset_at(t1 - 1), 3600, "before the table: type 0");
        assert_eq!(z.offset_at(t1), 7200);
        assert_eq!(z.offset_at(t2 - 1), 7200);
        // After the last transition the footer rule applies.
        assert_eq!(z.offset_at(t2 + 10), 3 * 3600);
        assert_eq!(
            z.hms(u64::try_from(t2).expect("positive") * 1000),
            "03:00:00"
        );
        // Truncated or foreign files are refused.
        assert_eq!(parse_tzif(&file[..30]), None);
        assert_eq!(parse_tzif(b"not a zone file at all, really not"), None);
    }

    #[test]
    fn hms_wraps_the_day() {
        let z = Zone::from_tz("<-05>5");
        // 02:30 UTC is 21:30 the day before at -5.
        let t = utc(2026, 11, 21, 2, 30);
        assert_eq!(
            z.hms(u64::try_from(t).expect("positive") * 1000 + 999),
            "21:30:00"
        );
        assert_eq!(Zone::utc().hms(0), "00:00:00");
    }

    #[test]
    fn system_zone_file_if_present() {
        // The zone database is on most systems; where it is, a named zone must load.
        let dir = Path::new("/usr/share/zoneinfo");
        if dir.join("Europe/Berlin").exists() {
            let z = Zone::from_tz("Europe/Berlin");
            assert_eq!(z.offset_at(utc(2026, 7, 1, 0, 0)), 7200);
            assert_eq!(z.offset_at(utc(2026, 1, 1, 0, 0)), 3600);
        } else {
            eprintln!("skipped: no /usr/share/zoneinfo/Europe/Berlin");
        }
    }
}
