//! The leader: one instance at a time runs a role's singleton work (the job engine's
//! maintenance: schedules, aging, archiving; the outbox relay's publishing), by a lease in
//! Postgres (`leader_lease`, one row per role), not a session lock.
//!
//! Why a lease: a session advisory lock lives as long as its connection, and a paused process
//! (`SIGSTOP`, a frozen VM, a long GC-like stall) keeps its TCP session and so its lock: the
//! standby waits forever. A lease has an expiry on the database's clock and is renewed by a
//! heartbeat; a leader that stops renewing is replaced once it lapses, within seconds.
//!
//! - **Taking it**: an upsert that succeeds only if the row is absent or its lease has
//!   lapsed (`expires_at <= clock_timestamp()`), and bumps the **epoch**. Every decision is on
//!   the database's clock; the instance's own clock is never compared with it.
//! - **Keeping it**: a renewal matches `(role, holder, epoch)` and an unexpired lease. Locally
//!   the instance trusts its leadership only until `lease` after it *sent* the last renewal
//!   that succeeded, on the monotonic clock: a leader that wakes from a pause knows at once that
//!   it may no longer lead, before any round trip.
//! - **Fencing**: what a leader writes after waking must not undo its successor's work. Writes
//!   that matter carry the leader's [`Fence`] (role, holder, epoch) and change nothing unless
//!   that lease is still the live one, checked in the same statement or transaction under a
//!   `FOR SHARE` lock of the lease row, so a takeover and a fenced write never interleave
//!   ([`fenced`], [`hold`]).
//! - **Giving it up** (shutdown): the lease is ended at once, so a standby takes over at its
//!   next try instead of waiting for the lapse.

use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The lease a leader holds, for fenced writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub role: String,
    pub holder: String,
    pub epoch: i64,
}

/// The condition a fenced single statement adds to its `WHERE` (with the fence's role, holder
/// and epoch bound at `$a`, `$b`, `$c`): the lease is this one and has not lapsed, and the
/// lease row stays share-locked until the statement's transaction ends.
pub fn fenced(a: u8, b: u8, c: u8) -> String {
    format!(
        "EXISTS (SELECT 1 FROM leader_lease WHERE role = ${a} AND holder = ${b} AND epoch = ${c}
                 AND expires_at > clock_timestamp() FOR SHARE)"
    )
}

/// In the caller's transaction: `true` if `fence` is still the live lease, which then cannot
/// change hands until the transaction ends (the lease row is share-locked). A transaction that
/// could pause while holding it is ended by the server after `lease`
/// (`idle_in_transaction_session_timeout`), so a successor waits at most that long.
pub async fn hold(
    conn: &mut PgConnection,
    fence: &Fence,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    sqlx::query("SELECT set_config('idle_in_transaction_session_timeout', $1, true)")
        .bind(lease.as_millis().max(1).to_string())
        .execute(&mut *conn)
        .await?;
    let live: Option<i32> = sqlx::query_scalar(&format!("SELECT 1 WHERE {}", fenced(1, 2, 3)))
        .bind(&fence.role)
        .bind(&fence.holder)
        .bind(fence.epoch)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(live.is_some())
}

pub struct Leadership {
    pool: PgPool,
    role: &'static str,
    /// This instance's name in the lease row: its owner name and a random id, so a restarted
    /// process is a new holder.
    holder: String,
    lease: Duration,
    held: Option<Held>,
    /// A take-over not yet reported by [`Leadership::newly_leading`].
    fresh: bool,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    /// When the last successful renewal (or the take-over) was sent: the lease is trusted
    /// until `lease` after it.
    renewed: Instant,
}

impl Leadership {
    /// Leadership of `role` ("job", "relay"), named `owner` in the lease row, with leases of
    /// `lease` (renewed every third of it).
    pub fn new(pool: PgPool, role: &'static str, owner: &str, lease: Duration) -> Self {
        Leadership {
            pool,
            role,
            holder: format!("{owner} {}", Uuid::new_v4().simple()),
            lease,
            held: None,
            fresh: false,
        }
    }

    /// Whether this instance took the lease over since the last call (for a "became the
    /// leader" count).
    pub fn newly_leading(&mut self) -> bool {
        std::mem::take(&mut self.fresh) && self.is_leader()
    }

    /// Whether this instance leads, as far as it knows without asking: it holds a lease it
    /// renewed less than `lease` ago (on its monotonic clock).
    pub fn is_leader(&self) -> bool {
        self.valid_until().is_some_and(|t| Instant::now() < t)
    }

    /// Until when (monotonic) this instance's lease is surely live; `None` when it does not
    /// lead. Work done on leadership stops at this instant unless it is renewed meanwhile.
    pub fn valid_until(&self) -> Option<Instant> {
        self.held.map(|h| h.renewed + self.lease)
    }

    /// The fence for writes made as leader; `None` when not leading.
    pub fn fence(&self) -> Option<Fence> {
        self.is_leader().then(|| Fence {
            role: self.role.to_owned(),
            holder: self.holder.clone(),
            epoch: self.held.map_or(0, |h| h.epoch),
        })
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The epoch of the lease this instance holds (each take-over bumps it).
    pub fn epoch(&self) -> Option<i64> {
        self.held.map(|h| h.epoch)
    }

    /// Whether this instance leads now: renews its lease when a third of it has passed (or
    /// takes it over when the leader's has lapsed). At most one round trip; never waits for
    /// another instance.
    pub async fn ensure(&mut self) -> bool {
        if let Some(h) = self.held {
            if h.renewed.elapsed() < self.lease / 3 {
                return true;
            }
            let sent = Instant::now();
            match self.renew(h.epoch).await {
                Ok(true) => {
                    self.held = Some(Held {
                        epoch: h.epoch,
                        renewed: sent,
                    });
                    return true;
                }
                Ok(false) => {
                    tracing::warn!(
                        role = self.role,
                        epoch = h.epoch,
                        "leader lease lapsed or taken over: leadership lost"
                    );
                    self.held = None;
                }
                // the lease may still be live: lead until it surely is not
                Err(e) if self.is_leader() => {
                    tracing::warn!(role = self.role, error = %e, "leader lease not renewed; will retry");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(role = self.role, error = %e, "leader lease not renewed in time: leadership lost");
                    self.held = None;
                    return false;
                }
            }
        }
        let sent = Instant::now();
        match self.take_over().await {
            Ok(Some(epoch)) => {
                tracing::info!(role = self.role, epoch, "became the leader");
                self.held = Some(Held {
                    epoch,
                    renewed: sent,
                });
                self.fresh = true;
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(role = self.role, error = %e, "leader lease not tried");
                false
            }
        }
    }

    /// Takes the lease if nobody holds a live one: the new epoch, or `None`.
    async fn take_over(&self) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO leader_lease AS l (role, holder, epoch, expires_at, acquired_at,
                 renewed_at)
             VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 millisecond',
                     clock_timestamp(), clock_timestamp())
             ON CONFLICT (role) DO UPDATE
                 SET holder = excluded.holder, epoch = l.epoch + 1,
                     expires_at = excluded.expires_at, acquired_at = excluded.acquired_at,
                     renewed_at = excluded.renewed_at
                 WHERE l.expires_at <= clock_timestamp()
             RETURNING epoch",
        )
        .bind(self.role)
        .bind(&self.holder)
        .bind(self.lease.as_secs_f64() * 1000.0)
        .fetch_optional(&self.pool)
        .await
    }

    /// Extends this instance's lease if it is still the live one.
    async fn renew(&self, epoch: i64) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE leader_lease
             SET expires_at = clock_timestamp() + $4 * interval '1 millisecond',
                 renewed_at = clock_timestamp()
             WHERE role = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()",
        )
        .bind(self.role)
        .bind(&self.holder)
        .bind(epoch)
        .bind(self.lease.as_secs_f64() * 1000.0)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives leadership up (shutdown): the lease ends now, and another instance takes it at
    /// its next try.
    pub async fn resign(&mut self) {
        if let Some(h) = self.held.take() {
            let ended = sqlx::query(
                "UPDATE leader_lease SET expires_at = clock_timestamp()
                 WHERE role = $1 AND holder = $2 AND epoch = $3",
            )
            .bind(self.role)
            .bind(&self.holder)
            .bind(h.epoch)
            .execute(&self.pool)
            .await;
            if let Err(e) = ended {
                tracing::warn!(role = self.role, error = %e, "leader lease not given up; it lapses on its own");
            }
        }
    }
}
