//! One integration-test binary; each module is one area. See `tests/src/lib.rs` for the harness.

mod burst;
mod callbacks;
mod chaos;
mod compensation;
mod compensation_failures;
mod console;
mod deploy;
mod end_to_end;
mod event_schemas;
mod events;
mod faults;
mod follow_ups;
mod hardening;
mod jobs;
mod lifecycle;
mod openapi;
mod prelock_scripts;
mod rebuild;
mod reliability;
mod scenario;
mod scheduler_ops;
mod schema;
mod security;
mod simulator_refunds;
mod validation;
