//! job-engine: durable delayed jobs on Postgres, the engine behind every follow-up action.
//!
//! Layout:
//! - [`clock`]: time as a port ([`Clock`]); tests move a [`ManualClock`] instead of sleeping.
//! - [`store`]: the SQL of the `delayed_job` table: insert (with an explicit "duplicate of job
//!   X" for a repeated dedupe key), batch claiming with `FOR UPDATE SKIP LOCKED` under a lease
//!   (owner, token, expiry), settling checked against the lease token, rescue of
//!   expired leases, redrive of dead jobs.
//! - [`leader`]: one instance at a time runs maintenance, by a session advisory lock.
//! - [`engine`]: handlers registered by job kind (optionally with a per-kind concurrency
//!   limit), a claim-run-settle round ([`Engine::run_once`]) with retries (exponential backoff
//!   with jitter, per-job attempt budget, permanent errors), and the leader's maintenance
//!   (rescue, priority aging, archiving, queue depth).
//! - [`runner`]: the pipelined loop ([`Engine::run`]): claims ahead within a lookahead, fires
//!   each job from the timer at its due time, wakes on `LISTEN/NOTIFY`, sizes its workers to
//!   the backlog, settles in batches, heartbeats leases, and gives leases back on shutdown.
//!
//! Any number of instances may run: a job is claimed by one, under a lease; a rescued job's
//! old owner cannot settle it. The engine knows nothing about orders: the binaries register
//! their own kinds (`scheduler`: the order follow-ups; `compensation-worker`: the payment
//! checks), and each claims only the kinds it runs.
//!
//! Not here yet (the scheduler issue continues): recurring schedules.

pub mod clock;
pub mod engine;
pub mod leader;
pub mod ops;
pub mod runner;
pub mod schedule;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{
    Engine, EngineConfig, EngineError, Job, Maintenance, Outcome, RoundReport, Settled,
};
pub use leader::Leadership;
pub use store::{Inserted, NewJob, Priority, Settle};
