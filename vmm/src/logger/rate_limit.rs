//! A token bucket per log call site: [`BURST`] lines at once, then one more
//! per [`REFILL_INTERVAL`]; lines beyond that are counted, not written.
//! Every site counts all its events, written or not, so the counts can
//! become metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may write at once.
pub const BURST: u32 = 10;
/// A call site earns one more line per interval, up to [`BURST`]: at most
/// 10 lines a minute per site once its burst is spent.
pub const REFILL_INTERVAL: Duration = Duration::from_secs(6);

/// Every site that has seen an event, for [`report_suppressed`].
static SITES: Mutex<Vec<&'static LogSite>> = Mutex::new(Vec::new());

struct Bucket {
    tokens: u32,
    /// When the last token was earned (None: never used, full).
    since: Option<Instant>,
    /// Lines suppressed since the last one written.
    pending: u64,
}

/// One log call site: its bucket and counters. Made by the `guest_*!`
/// macros as a `static`.
pub struct LogSite {
    name: &'static str,
    registered: AtomicBool,
    events: AtomicU64,
    suppressed: AtomicU64,
    bucket: Mutex<Bucket>,
}

impl LogSite {
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            registered: AtomicBool::new(false),
            events: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                since: None,
                pending: 0,
            }),
        }
    }

    /// An event at this site: `Some(n)` when its line may be written, `n`
    /// being how many were suppressed since the last one written; `None`
    /// when it is suppressed (and counted).
    pub fn admit(&'static self) -> Option<u64> {
        if !self.registered.swap(true, Ordering::Relaxed) {
            SITES.lock().unwrap_or_else(|e| e.into_inner()).push(self);
        }
        self.admit_at(Instant::now())
    }

    /// [`LogSite::admit`] at time `now` (tests pass their own clock).
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        self.events.fetch_add(1, Ordering::Relaxed);
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let since = *bucket.since.get_or_insert(now);
        let earned = now.saturating_duration_since(since).as_nanos() / REFILL_INTERVAL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(earned).min(BURST);
            bucket.since = Some(since + REFILL_INTERVAL * earned.min(1 << 20));
        }
        if bucket.tokens == 0 {
            bucket.pending += 1;
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        bucket.tokens -= 1;
        if bucket.tokens == BURST - 1 {
            // A full bucket earns nothing: count from the first line spent.
            bucket.since = Some(now);
        }
        Some(std::mem::take(&mut bucket.pending))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Events seen at this site, written or not.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Events whose line was not written.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// One line naming every site that suppressed lines and how many (empty
/// when none did), for the VMM to print at exit. Bounded: there is one
/// entry per call site in the code, not per event.
pub fn report_suppressed() -> String {
    let sites = SITES.lock().unwrap_or_else(|e| e.into_inner());
    let counts: Vec<String> = sites
        .iter()
        .filter(|site| site.suppressed() > 0)
        .map(|site| {
            format!(
                "{} ({} of {} events)",
                site.name(),
                site.suppressed(),
                site.events()
            )
        })
        .collect();
    if counts.is_empty() {
        return String::new();
    }
    format!(
        "guest-triggered log lines suppressed by the rate limit: {}",
        counts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_interval_and_the_rest_counted() {
        let site = LogSite::new("test");
        let start = Instant::now();
        for _ in 0..BURST {
            assert_eq!(site.admit_at(start), Some(0));
        }
        // A flood at the same instant: all suppressed.
        for _ in 0..1000 {
            assert_eq!(site.admit_at(start), None);
        }
        assert_eq!(site.suppressed(), 1000);
        // Less than an interval later: still nothing.
        assert_eq!(site.admit_at(start + REFILL_INTERVAL / 2), None);
        // One interval later: one line, which carries the count.
        assert_eq!(site.admit_at(start + REFILL_INTERVAL), Some(1001));
        assert_eq!(site.admit_at(start + REFILL_INTERVAL), None);
        assert_eq!(site.events(), BURST as u64 + 1003);
        assert_eq!(site.suppressed(), 1002);
    }

    #[test]
    fn a_quiet_site_earns_back_its_burst_but_no_more() {
        let site = LogSite::new("test");
        let start = Instant::now();
        for _ in 0..BURST {
            site.admit_at(start);
        }
        assert_eq!(site.admit_at(start), None);
        let later = start + REFILL_INTERVAL * 1000;
        for _ in 0..BURST {
            assert!(site.admit_at(later).is_some());
        }
        assert_eq!(site.admit_at(later), None);
    }

    #[test]
    fn a_clock_going_backwards_earns_nothing() {
        let site = LogSite::new("test");
        let start = Instant::now() + REFILL_INTERVAL * 10;
        for _ in 0..BURST {
            site.admit_at(start);
        }
        assert_eq!(site.admit_at(start - REFILL_INTERVAL * 5), None);
    }

    #[test]
    fn the_exit_report_names_the_sites_that_suppressed_lines() {
        static FLOODED: LogSite = LogSite::new("flooded.rs:1");
        static QUIET: LogSite = LogSite::new("quiet.rs:1");
        for _ in 0..BURST + 5 {
            FLOODED.admit();
        }
        QUIET.admit();
        let report = report_suppressed();
        assert!(report.contains("flooded.rs:1 (5 of 15 events)"), "{report}");
        assert!(!report.contains("quiet.rs"), "{report}");
    }

    #[test]
    fn the_macros_write_through_tracing_and_stay_quiet_when_limited() {
        // Each expansion is its own site: a loop over one call site.
        for _ in 0..BURST * 3 {
            crate::guest_warn!("a guest-triggered warning {}", 1);
        }
        let report = report_suppressed();
        assert!(
            report.contains(&format!("({} of {} events)", BURST * 2, BURST * 3)),
            "{report}"
        );
    }
}
