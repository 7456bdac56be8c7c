//! Time as a port. Due times, leases and backoff are computed from a [`Clock`], never from
//! `Utc::now()` directly, so tests move time instead of sleeping.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    /// Starts at `start`, truncated to microseconds: Postgres keeps timestamps to the
    /// microsecond, so times read back compare equal to the clock's.
    pub fn new(start: DateTime<Utc>) -> Self {
        use chrono::SubsecRound;
        ManualClock {
            now: Mutex::new(start.trunc_subsecs(6)),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now += chrono::Duration::from_std(by).expect("a duration that fits");
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}
