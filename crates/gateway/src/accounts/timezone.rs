//! Time zones for limit windows: days and months are reckoned in the organisation's zone
//! (IST by default for INR organisations, UTC otherwise). Zones are fixed UTC offsets, which
//! covers India (+05:30, no daylight saving) exactly; IANA names are accepted for the common
//! fixed-offset zones.

/// A fixed offset from UTC, in minutes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UtcOffset {
    minutes: i32,
}

const DAY_MS: i64 = 86_400_000;

impl UtcOffset {
    pub const UTC: UtcOffset = UtcOffset { minutes: 0 };
    pub const IST: UtcOffset = UtcOffset { minutes: 330 };

    /// `UTC`, `Asia/Kolkata`, `Asia/Calcutta`, `IST`, or `+HH:MM` / `-HH:MM`.
    pub fn parse(s: &str) -> Option<UtcOffset> {
        match s {
            "UTC" | "Etc/UTC" | "GMT" | "Z" => return Some(UtcOffset::UTC),
            "Asia/Kolkata" | "Asia/Calcutta" | "IST" => return Some(UtcOffset::IST),
            _ => {}
        }
        let (sign, rest) = match s.as_bytes().first()? {
            b'+' => (1, &s[1..]),
            b'-' => (-1, &s[1..]),
            _ => return None,
        };
        let (h, m) = rest.split_once(':')?;
        let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 14 && m < 60).then_some(UtcOffset { minutes: sign * (h * 60 + m) })
    }

    /// `UTC`, or the offset as `+05:30` / `-04:00`.
    pub fn label(self) -> String {
        if self.minutes == 0 {
            return "UTC".to_owned();
        }
        let sign = if self.minutes < 0 { '-' } else { '+' };
        let m = self.minutes.abs();
        format!("{sign}{:02}:{:02}", m / 60, m % 60)
    }

    fn offset_ms(self) -> i64 {
        i64::from(self.minutes) * 60_000
    }

    /// The local day containing `ms`, as days since 1970-01-01 (in this zone).
    pub fn day_number(self, ms: i64) -> i64 {
        (ms + self.offset_ms()).div_euclid(DAY_MS)
    }

    /// The start (unix ms) of local day `day` (see [`UtcOffset::day_number`]).
    pub fn start_of_day(self, day: i64) -> i64 {
        day.saturating_mul(DAY_MS) - self.offset_ms()
    }

    /// The start (unix ms) of the local day containing `now_ms`.
    pub fn day_start(self, now_ms: i64) -> i64 {
        let local = now_ms + self.offset_ms();
        local - local.rem_euclid(DAY_MS) - self.offset_ms()
    }

    /// The start of the local week (Monday) containing `now_ms`.
    pub fn week_start(self, now_ms: i64) -> i64 {
        let day = self.day_start(now_ms);
        let days_since_epoch = (day + self.offset_ms()).div_euclid(DAY_MS);
        // 1970-01-01 was a Thursday: Monday-based weekday = (days + 3) mod 7.
        day - (days_since_epoch + 3).rem_euclid(7) * DAY_MS
    }

    /// The start of the local calendar month containing `now_ms`.
    pub fn month_start(self, now_ms: i64) -> i64 {
        let day = self.day_start(now_ms);
        let days = (day + self.offset_ms()).div_euclid(DAY_MS);
        let (_, _, d) = civil_from_days(days);
        day - i64::from(d - 1) * DAY_MS
    }
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The default zone name for a new organisation billed in `currency`.
pub fn default_for(currency: &str) -> &'static str {
    if currency == "INR" {
        "Asia/Kolkata"
    } else {
        "UTC"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-22T20:00:00Z = 2026-11-23T01:30 IST (a Monday in IST, Sunday in UTC).
    const T: i64 = 1_795_377_600_000;

    #[test]
    fn windows_start_at_local_midnight() {
        assert_eq!(UtcOffset::UTC.day_start(T), 1_795_305_600_000); // 2026-11-22T00:00Z
        assert_eq!(UtcOffset::IST.day_start(T), 1_795_372_200_000); // 2026-11-22T18:30Z
        assert_eq!(UtcOffset::IST.week_start(T), UtcOffset::IST.day_start(T), "Monday in IST");
        assert_eq!(UtcOffset::UTC.week_start(T), 1_794_787_200_000); // Monday 2026-11-16
        assert_eq!(UtcOffset::UTC.month_start(T), 1_793_491_200_000); // 2026-11-01T00:00Z
        assert_eq!(UtcOffset::parse("+05:30"), Some(UtcOffset::IST));
        assert_eq!(UtcOffset::IST.label(), "+05:30");
        assert_eq!(UtcOffset::parse("-04:00").map(UtcOffset::label).as_deref(), Some("-04:00"));
        assert_eq!(UtcOffset::parse("Mars/Olympus"), None);
        let day = UtcOffset::IST.day_number(T);
        assert_eq!(UtcOffset::IST.start_of_day(day), UtcOffset::IST.day_start(T));
        assert_eq!(UtcOffset::UTC.day_number(T) + 1, day, "already the next day in IST");
    }
}
