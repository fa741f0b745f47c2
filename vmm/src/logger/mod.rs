//! Bounded logging: what a hostile guest can make the VMM write.
//!
//! The guest triggers many of the VMM's log lines (a dropped vsock packet,
//! an access to an unknown MMIO register, a malformed ring). Written each
//! time, an unprivileged process in the guest could fill the host's `/run`
//! with them. So:
//!
//! - [`rate_limit`]: every guest-triggered line goes through
//!   [`guest_warn!`](crate::guest_warn) (or `guest_debug!`), which logs at
//!   most a burst of lines per call site and then a trickle, counting the
//!   rest; the count of suppressed lines is reported with the next line let
//!   through and, for every site, at exit ([`report_suppressed`]);
//! - [`capped`]: the writer of `vmm.log` (the VMM's stderr) and of the
//!   console file stops at a size cap and says so once.

pub mod capped;
pub mod rate_limit;

pub use capped::{Capped, MAX_CONSOLE_BYTES, MAX_LOG_BYTES};
pub use rate_limit::{report_suppressed, LogSite, BURST, REFILL_INTERVAL};

/// A warning the guest can cause: rate-limited per call site, see
/// [`rate_limit`]. Takes the arguments of `tracing::warn!`.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static SITE: $crate::logger::LogSite =
            $crate::logger::LogSite::new(concat!(file!(), ":", line!()));
        if let Some(suppressed) = SITE.admit() {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    }};
}

/// A debug line the guest can cause: rate-limited per call site like
/// [`guest_warn!`](crate::guest_warn).
#[macro_export]
macro_rules! guest_debug {
    ($($arg:tt)+) => {{
        if tracing::enabled!(tracing::Level::DEBUG) {
            static SITE: $crate::logger::LogSite =
                $crate::logger::LogSite::new(concat!(file!(), ":", line!()));
            if let Some(suppressed) = SITE.admit() {
                if suppressed > 0 {
                    tracing::debug!(suppressed, $($arg)+);
                } else {
                    tracing::debug!($($arg)+);
                }
            }
        }
    }};
}

/// An error the guest can cause (a ring write that failed, …): rate-limited
/// per call site like [`guest_warn!`](crate::guest_warn).
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {{
        static SITE: $crate::logger::LogSite =
            $crate::logger::LogSite::new(concat!(file!(), ":", line!()));
        if let Some(suppressed) = SITE.admit() {
            if suppressed > 0 {
                tracing::error!(suppressed, $($arg)+);
            } else {
                tracing::error!($($arg)+);
            }
        }
    }};
}
