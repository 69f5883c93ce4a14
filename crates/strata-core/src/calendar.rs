//! Calendar arithmetic on Unix time, UTC and proleptic Gregorian (Howard
//! Hinnant's civil-calendar algorithms): dates of days, month starts for
//! budgets, timestamps for reports, and moments given on the command line.

/// (year, month, day) of a day counted from 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's civil-calendar algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for Unix milliseconds.
pub fn utc_timestamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Days from 1970-01-01 of a proleptic Gregorian date (the inverse of
/// `civil_from_days`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A moment given on the command line, in Unix milliseconds: a date
/// (`2026-11-29`), a UTC time (`2026-11-29T08:00:00Z` or with a space, `Z`
/// optional), or a span ago (`90s`, `15m`, `2h`, `7d`) counted back from `now_ms`.
pub fn parse_moment(text: &str, now_ms: i64) -> Option<i64> {
    let t = text.trim();
    let unit_ms = match t.chars().last() {
        Some('s') => Some(1e3),
        Some('m') => Some(60e3),
        Some('h') => Some(3_600e3),
        Some('d') => Some(86_400e3),
        _ => None,
    };
    if let Some(unit_ms) = unit_ms {
        let n: f64 = t[..t.len() - 1]
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
        return Some(now_ms - (n * unit_ms) as i64);
    }
    let t = t.strip_suffix('Z').unwrap_or(t);
    let (date, time) = match t.split_once(['T', ' ']) {
        Some((d, tm)) => (d, Some(tm)),
        None => (t, None),
    };
    let mut ymd = date.split('-');
    let (y, m, d) = (
        ymd.next()?.parse::<i64>().ok()?,
        ymd.next()?.parse::<u32>().ok()?,
        ymd.next()?.parse::<u32>().ok()?,
    );
    if ymd.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(time) = time {
        let parts: Vec<&str> = time.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return None;
        }
        let mut unit = 3600;
        for p in parts {
            let max = if unit == 3600 { 24 } else { 60 };
            let v: i64 = p.parse().ok().filter(|v| (0..max).contains(v))?;
            secs += v * unit;
            unit /= 60;
        }
    }
    Some(secs * 1000)
}

/// Unix milliseconds of the start of the UTC calendar month holding `now_ms`.
pub fn month_start_ms(now_ms: i64) -> i64 {
    let days = now_ms.div_euclid(86_400_000);
    let (y, m, _) = civil_from_days(days);
    days_from_civil(y, m, 1) * 86_400_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn moments_parse_as_dates_times_and_spans_ago() {
        let day = 86_400_000;
        assert_eq!(parse_moment("1970-01-02", 0), Some(day));
        assert_eq!(
            parse_moment("2026-11-29T08:30:00Z", 0),
            Some(days_from_civil(2026, 11, 29) * day + 8 * 3_600_000 + 30 * 60_000)
        );
        assert_eq!(
            parse_moment("2026-11-29 08:30", 0),
            parse_moment("2026-11-29T08:30:00", 0)
        );
        assert_eq!(parse_moment("2h", 10 * 3_600_000), Some(8 * 3_600_000));
        assert_eq!(parse_moment("90s", 100_000), Some(10_000));
        for bad in [
            "",
            "h",
            "2w",
            "2026-13-01",
            "2026-11-29T25:00",
            "yesterday",
            "-3h",
        ] {
            assert_eq!(parse_moment(bad, 0), None, "{bad}");
        }
        for days in [-1, 0, 59, 60, 20_000, 20_786] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn month_starts_are_calendar_months_in_utc() {
        // 2026-11-29T02:25:21Z -> 2026-11-01T00:00:00Z
        assert_eq!(month_start_ms(1_796_005_521_000), 1_793_491_200_000);
        // 2024-02-29T23:59:59.999Z -> 2024-02-01
        assert_eq!(month_start_ms(1_709_251_199_999), 1_706_745_600_000);
        // 2024-03-01T00:00:00Z is its own month start.
        assert_eq!(month_start_ms(1_709_251_200_000), 1_709_251_200_000);
        assert_eq!(month_start_ms(0), 0);
    }

    proptest! {
        #[test]
        fn month_start_is_at_most_31_days_back_and_idempotent(t in 0i64..4_102_444_800_000) {
            let s = month_start_ms(t);
            prop_assert!(s <= t && t - s < 31 * 86_400_000);
            prop_assert_eq!(month_start_ms(s), s);
            prop_assert_eq!(civil_from_days(s / 86_400_000).2, 1);
        }
    }
}
