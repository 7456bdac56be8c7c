//! Time as a port, and whose time it is.
//!
//! Every lease, claim, heartbeat and rescue is decided by the database's clock, in the SQL
//! (`clock_timestamp()`), never by an instance's own: an instance whose clock is a minute off
//! changes nothing. A [`Clock`] says which clock the SQL decides by ([`Clock::decide_at`]:
//! `None` is the database's) and gives the engine an in-process reading for what cannot wait
//! for a round trip (how long to sleep until a job is due, how late it fired, when to retry).
//!
//! - [`DbClock`], the one the binaries use: the SQL decides by the database's clock, and the
//!   reading is the database's time as last sampled (`SELECT clock_timestamp()`, taken as read
//!   when its answer arrived: the database read it no later, so the reading is never ahead of
//!   the database's clock and a job never fires early, at most one round trip late) plus the
//!   monotonic time since. It does not go back for sampling error (a new sample that reads up
//!   to a second earlier than the last reading holds it until time catches up), but follows
//!   the database's clock when that is set back further (an NTP step), rather than stand
//!   still; a waiting job asks it again on waking. The host's wall clock is never read once
//!   a sample exists, so setting it (or skewing it with libfaketime) moves nothing; a sample
//!   is taken at start and every maintenance round.
//! - [`ManualClock`] (tests): both the SQL and the reading use a time that moves only when told
//!   to, so delayed jobs are tested by moving time instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync + 'static {
    /// The engine's reading of the deciding clock now.
    fn now(&self) -> DateTime<Utc>;

    /// The time the SQL decides leases, claims and due times by: `None` for the database's
    /// own clock.
    fn decide_at(&self) -> Option<DateTime<Utc>> {
        None
    }

    /// Learns the database's clock: it read `db` between `sent` and `received`.
    fn observe(&self, _db: DateTime<Utc>, _sent: Instant, _received: Instant) {}
}

/// The database's clock, read off the monotonic clock between samples (see the module docs).
#[derive(Debug)]
pub struct DbClock {
    /// The last sample: the database's time, the monotonic instant it corresponds to, and
    /// the round trip it took. `None` until the first sample: the host's clock stands in
    /// until then.
    sample: Mutex<Option<(DateTime<Utc>, Instant, Duration)>>,
    /// The latest sampled reading given out (microseconds since the epoch): readings never go
    /// below it.
    floor: AtomicI64,
}

impl DbClock {
    pub fn new() -> Self {
        DbClock {
            sample: Mutex::new(None),
            floor: AtomicI64::new(i64::MIN),
        }
    }

    /// Takes a sample from the database (the engine calls this at start and every
    /// maintenance round).
    pub async fn sync(&self, pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
        let sent = Instant::now();
        let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(pool)
            .await?;
        self.observe(db, sent, Instant::now());
        Ok(())
    }
}

impl Default for DbClock {
    fn default() -> Self {
        DbClock::new()
    }
}

/// A sample whose round trip took longer than the one we have (and than this) does not
/// replace it, unless ours is older than [`SAMPLE_KEPT`].
const SLOW_SAMPLE: Duration = Duration::from_millis(50);
const SAMPLE_KEPT: Duration = Duration::from_secs(30);
/// How far back a new sample may read before the reading follows it rather than holds: more
/// than sampling error (a round trip) means the database's clock itself was set back.
const STEP_BACK: Duration = Duration::from_secs(1);

impl Clock for DbClock {
    fn now(&self) -> DateTime<Utc> {
        let sample = *self.sample.lock().unwrap_or_else(|p| p.into_inner());
        match sample {
            Some((db, at, _)) => {
                let read = db + chrono::Duration::from_std(at.elapsed()).unwrap_or_default();
                let micros = read.timestamp_micros();
                let before = self.floor.fetch_max(micros, Ordering::Relaxed);
                if before > micros && before - micros <= STEP_BACK.as_micros() as i64 {
                    // a sample that reads a little earlier (a round trip's worth): hold
                    DateTime::from_timestamp_micros(before).unwrap_or(read)
                } else {
                    if before > micros {
                        // the database's clock was set back (NTP): follow it, rather than
                        // stand still until it catches up (heartbeats and rounds would stop)
                        self.floor.store(micros, Ordering::Relaxed);
                    }
                    read
                }
            }
            // the host's clock until the first sample; it sets no floor (it may be off)
            None => Utc::now(),
        }
    }

    fn observe(&self, db: DateTime<Utc>, sent: Instant, received: Instant) {
        let rtt = received.saturating_duration_since(sent);
        let mut sample = self.sample.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, at, kept_rtt)) = *sample {
            if rtt > SLOW_SAMPLE.max(kept_rtt) && at.elapsed() < SAMPLE_KEPT {
                return; // a slow answer says less than the sample we have
            }
        }
        // the database read its clock somewhere in the round trip: taking it as read on
        // arrival keeps the reading at or behind the database's (never early, at most `rtt`
        // late)
        *sample = Some((db, received, rtt));
    }
}

/// A clock that only moves when told to (tests). The SQL decides by it too.
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

    fn decide_at(&self) -> Option<DateTime<Utc>> {
        Some(self.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_clock_runs_on_from_its_sample_whatever_the_host_says() {
        let clock = DbClock::new();
        let db: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let sent = Instant::now();
        clock.observe(db, sent, sent + Duration::from_millis(10));
        let read = clock.now();
        // the sample is taken as read on arrival, and runs on from there
        let since = read - db;
        assert!(since >= chrono::Duration::zero(), "{since}");
        assert!(since < chrono::Duration::seconds(5), "{since}");
        // a slow sample does not replace a good one
        clock.observe(
            db + chrono::Duration::hours(1),
            sent,
            sent + Duration::from_secs(1),
        );
        assert!(clock.now() - db < chrono::Duration::minutes(1));
        assert_eq!(clock.decide_at(), None, "the SQL decides by the database");
        // a later sample that reads ten seconds earlier: the database's clock was set back,
        // and the reading follows it rather than stand still
        let before = clock.now();
        std::thread::sleep(Duration::from_millis(40));
        let resampled = Instant::now();
        clock.observe(
            db - chrono::Duration::seconds(10),
            resampled,
            resampled + Duration::from_millis(1),
        );
        assert!(clock.now() < before);
        // a sample a little earlier (sampling error) holds the reading where it was
        let before = clock.now();
        let resampled = Instant::now();
        clock.observe(
            before - chrono::Duration::milliseconds(300),
            resampled,
            resampled + Duration::from_millis(1),
        );
        assert!(clock.now() >= before);
    }
}
