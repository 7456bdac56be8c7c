//! job-engine: durable delayed jobs on Postgres, the engine behind every follow-up action.
//!
//! Layout:
//! - [`clock`]: time as a port ([`Clock`]): the database's clock in production ([`DbClock`]),
//!   so no instance's own clock decides a lease, a claim or a due time; tests move a
//!   [`ManualClock`] instead of sleeping.
//! - [`schedule`]: recurring schedules (cron or business cycles in an IANA zone, with
//!   daylight-saving and misfire policies), written ahead as jobs by the leader.
//! - [`store`]: the SQL of the `delayed_job` table: insert (with an explicit "duplicate of job
//!   X" for a repeated dedupe key), batch claiming with `FOR UPDATE SKIP LOCKED` under a lease
//!   (owner, token, expiry), settling checked against the lease token, rescue of
//!   expired leases, redrive of dead jobs.
//! - [`leader`]: one instance at a time runs maintenance, by a lease in Postgres with an
//!   expiry and a heartbeat (a paused leader is replaced within seconds) and an epoch that
//!   fences what a replaced leader writes after it wakes.
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

pub mod clock;
pub mod engine;
pub mod leader;
pub mod ops;
pub mod runner;
pub mod schedule;
pub mod store;

pub use clock::{Clock, DbClock, ManualClock};
pub use engine::{
    Engine, EngineConfig, EngineError, Job, Maintenance, Outcome, RoundReport, Settled,
};
pub use leader::Leadership;
pub use store::{Coverage, Inserted, NewJob, Priority, RunAt, Settle};
