//! Billing time: calendar months in UTC ([`Month`]) and the clock every billing write
//! reads ([`Clock`]), so tests can put a month of traffic at chosen instants.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{Datelike, TimeZone, Utc};

/// Where billing reads the current time, as Unix epoch milliseconds.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, epoch ms.
    fn now_ms(&self) -> i64;
}

/// The system clock (UTC).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::store::now_ms()
    }
}

/// A clock that moves only when told to (tests and simulations). It never goes back:
/// [`ManualClock::set`] to an earlier instant is ignored, as a ledger's time must be.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock reading `ms` (epoch ms).
    pub fn new(ms: i64) -> Self {
        Self(AtomicI64::new(ms))
    }

    /// Moves the clock to `ms` if that is later than now.
    pub fn set(&self, ms: i64) {
        self.0.fetch_max(ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms` (≥ 0) and returns the new time.
    pub fn advance(&self, ms: i64) -> i64 {
        self.0.fetch_add(ms.max(0), Ordering::SeqCst) + ms.max(0)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A calendar month in UTC, written `YYYY-MM` (e.g. `2026-11`): the period of quotas,
/// invoices and payouts. It spans `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    year: i32,
    month: u32,
}

/// A string that is not a month `YYYY-MM` between 1970-01 and 9999-12.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a month (expected YYYY-MM, e.g. 2026-11)")]
pub struct InvalidMonth(pub String);

impl Month {
    /// The month `year`-`month` (1–12), if it lies between 1970-01 and 9999-12.
    pub fn new(year: i32, month: u32) -> Option<Self> {
        ((1970..=9999).contains(&year) && (1..=12).contains(&month)).then_some(Self { year, month })
    }

    /// The UTC month containing the instant `ms` (epoch ms).
    pub fn of_ms(ms: i64) -> Self {
        let t = Utc
            .timestamp_millis_opt(ms)
            .single()
            .unwrap_or_else(Utc::now);
        Self {
            year: t.year(),
            month: t.month(),
        }
    }

    /// The first instant of the month (00:00:00.000 UTC on day 1), epoch ms.
    pub fn start_ms(self) -> i64 {
        Utc.with_ymd_and_hms(self.year, self.month, 1, 0, 0, 0)
            .single()
            .map_or(0, |t| t.timestamp_millis())
    }

    /// The first instant of the next month, epoch ms (the month is `[start, end)`).
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }

    /// The length of the month in ms.
    pub fn len_ms(self) -> i64 {
        self.end_ms() - self.start_ms()
    }

    /// The following month.
    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The preceding month.
    pub fn prev(self) -> Self {
        if self.month == 1 {
            Self {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Self {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// `YYYYMM`, for references that allow no punctuation.
    pub fn compact(self) -> String {
        format!("{:04}{:02}", self.year, self.month)
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for Month {
    type Err = InvalidMonth;

    fn from_str(s: &str) -> Result<Self, InvalidMonth> {
        let bad = || InvalidMonth(s.chars().take(32).collect());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        Month::new(y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?).ok_or_else(bad)
    }
}

impl serde::Serialize for Month {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Formats epoch ms as RFC 3339 UTC with millisecond precision (`2026-11-30T23:59:59.999Z`).
pub fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Parses an instant given as RFC 3339 (`2026-11-15T12:00:00Z`), a day (`2026-11-15`,
/// its 00:00 UTC) or a month (`2026-11`, its first instant), to epoch ms.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_instant(text: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(Utc.from_utc_datetime(&t).timestamp_millis());
    }
    if let Ok(m) = text.parse::<Month>() {
        return Ok(m.start_ms());
    }
    Err(format!(
        "'{}' is not a time (expected RFC 3339 such as 2026-12-01T00:00:00Z, a day 2026-12-01 or a month 2026-12)",
        text.chars().take(64).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_have_utc_boundaries() {
        let nov: Month = "2026-11".parse().unwrap();
        assert_eq!(rfc3339(nov.start_ms()), "2026-11-01T00:00:00.000Z");
        assert_eq!(rfc3339(nov.end_ms()), "2026-12-01T00:00:00.000Z");
        assert_eq!(Month::of_ms(nov.end_ms() - 1), nov);
        assert_eq!(Month::of_ms(nov.end_ms()), nov.next());
        assert_eq!(nov.next().to_string(), "2026-12");
        assert_eq!(
            "2026-12".parse::<Month>().unwrap().next().to_string(),
            "2027-01"
        );
        assert_eq!(
            "2027-01".parse::<Month>().unwrap().prev().to_string(),
            "2026-12"
        );
        assert_eq!(nov.len_ms(), 30 * 86_400_000);
        assert_eq!(nov.compact(), "202611");
    }

    #[test]
    fn refuses_bad_months() {
        for bad in [
            "2026-13", "2026-00", "26-11", "2026-1", "2026/11", "", "abcd-ef", "1969-12",
        ] {
            assert!(bad.parse::<Month>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_instants() {
        assert_eq!(
            parse_instant("2026-12-01").unwrap(),
            "2026-12".parse::<Month>().unwrap().start_ms()
        );
        assert_eq!(
            parse_instant("2026-12-01T00:00:00Z").unwrap(),
            parse_instant("2026-12").unwrap()
        );
        assert!(parse_instant("tomorrow").is_err());
    }

    #[test]
    fn manual_clock_never_goes_back() {
        let c = ManualClock::new(1000);
        c.set(500);
        assert_eq!(c.now_ms(), 1000);
        assert_eq!(c.advance(10), 1010);
        c.set(2000);
        assert_eq!(c.now_ms(), 2000);
    }
}
