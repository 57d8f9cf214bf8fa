//! Rate limits for log lines a guest can trigger.
//!
//! A guest can repeat a bad MMIO access or a bad descriptor as fast as it
//! exits, so every message it can cause goes through a per-call-site
//! [`LogRateLimit`]: a burst of lines per window, then silence, then one
//! line that says how many were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines let through per window and call site.
pub const BURST: u64 = 10;
/// Window length.
pub const WINDOW_MS: u64 = 5_000;

/// The state of one call site: the window it is in and what it let through.
#[derive(Debug)]
pub struct LogRateLimit {
    /// Packed: window number (upper 40 bits) and lines seen in it (lower 24).
    state: AtomicU64,
    /// Lines suppressed since the last one let through.
    suppressed: AtomicU64,
}

const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Default for LogRateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogRateLimit {
    pub const fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now; `Some(n)` with the number of lines
    /// suppressed before it.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, now_ms: u64) -> Option<u64> {
        let window = (now_ms / WINDOW_MS) + 1; // 0 means "never used"
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (cur_window, count) = (current >> COUNT_BITS, current & COUNT_MASK);
            let next = if cur_window == window {
                if count >= BURST {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                current + 1
            } else {
                (window << COUNT_BITS) | 1
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => current = actual,
            }
        }
    }
}

/// `log::warn!` (or another level) limited per call site: at most
/// [`BURST`] lines per [`WINDOW_MS`], then a count of what was dropped.
#[macro_export]
macro_rules! log_ratelimited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogRateLimit = $crate::ratelimit::LogRateLimit::new();
        if log::log_enabled!($level) {
            if let Some(suppressed) = LIMIT.check() {
                if suppressed > 0 {
                    log::log!($level, "({suppressed} similar messages suppressed)");
                }
                log::log!($level, $($arg)+);
            }
        }
    }};
}

/// [`log_ratelimited!`] at warn level.
#[macro_export]
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => { $crate::log_ratelimited!(log::Level::Warn, $($arg)+) };
}

/// [`log_ratelimited!`] at error level.
#[macro_export]
macro_rules! error_ratelimited {
    ($($arg:tt)+) => { $crate::log_ratelimited!(log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_suppressed_and_counted() {
        let limit = LogRateLimit::new();
        let passed = (0..1000).filter(|_| limit.check_at(100).is_some()).count();
        assert_eq!(passed as u64, BURST);
        // The next window lets a line through and reports what was dropped.
        assert_eq!(limit.check_at(100 + WINDOW_MS), Some(1000 - BURST));
        assert_eq!(limit.check_at(100 + WINDOW_MS), Some(0));
    }

    #[test]
    fn call_sites_are_limited_separately() {
        let (a, b) = (LogRateLimit::new(), LogRateLimit::new());
        for _ in 0..BURST {
            assert!(a.check_at(0).is_some());
        }
        assert!(a.check_at(0).is_none());
        assert!(b.check_at(0).is_some());
    }
}
