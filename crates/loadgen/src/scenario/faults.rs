//! The faults of a run, planned before it starts (from the seed) and printed in the report:
//! the provider's chaos for the whole chaos phase, and process faults at random moments in
//! it, one at a time.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The payment providers' chaos (the paper's): queries timing out, callbacks dropped,
    /// duplicated, delayed and so reordered, refunds answering late.
    Provider,
    /// `SIGKILL` of a compensation worker, then a restart.
    KillWorker,
    /// `SIGKILL` of a scheduler, then a restart.
    KillScheduler,
    /// `SIGKILL` of an event relay, then a restart.
    KillRelay,
    /// Redis killed and started again empty.
    RedisRestart,
    /// The Kafka broker killed and started again.
    KafkaRestart,
    /// Every connection the services hold to Postgres terminated (`pg_terminate_backend`).
    PgTerminate,
}

pub const PROCESS_KINDS: &[Kind] = &[
    Kind::KillWorker,
    Kind::KillScheduler,
    Kind::KillRelay,
    Kind::RedisRestart,
    Kind::KafkaRestart,
    Kind::PgTerminate,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Provider => "provider",
            Kind::KillWorker => "kill-worker",
            Kind::KillScheduler => "kill-scheduler",
            Kind::KillRelay => "kill-relay",
            Kind::RedisRestart => "redis-restart",
            Kind::KafkaRestart => "kafka-restart",
            Kind::PgTerminate => "pg-terminate",
        }
    }
}

/// `none`, `paper` (the provider's chaos), `all` (that and every process fault), or a
/// comma-separated list of kinds.
pub fn parse(s: &str) -> Result<Vec<Kind>, String> {
    let all: Vec<Kind> = std::iter::once(Kind::Provider)
        .chain(PROCESS_KINDS.iter().copied())
        .collect();
    match s {
        "none" => Ok(vec![]),
        "paper" => Ok(vec![Kind::Provider]),
        "all" => Ok(all),
        list => {
            let mut out = Vec::new();
            for name in list.split(',').map(str::trim) {
                let k = all
                    .iter()
                    .copied()
                    .find(|k| k.name() == name)
                    .ok_or_else(|| {
                        format!(
                            "unknown fault {name:?}: none, paper, all, or a list of {}",
                            all.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                        )
                    })?;
                if !out.contains(&k) {
                    out.push(k);
                }
            }
            Ok(out)
        }
    }
}

/// One planned process fault.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub kind: Kind,
    /// Seconds from the start of the run.
    pub at_s: f64,
    /// The member it hits (`scheduler-2`, `redis`, ...), chosen when it runs for kinds with
    /// several instances.
    pub target: String,
    /// How long a killed process stays down before its restart.
    pub down_s: f64,
}

/// Plans the process faults of `kinds` in `[chaos_from, end)`: every kind at least once,
/// more rounds of them if the phase is long (one fault about every 45 s), each in a slot of
/// its own so they come one at a time, at a random moment in the slot's first half (the
/// second half lets the system recover before the next).
pub fn plan(kinds: &[Kind], chaos_from: Duration, end: Duration, seed: u64) -> Vec<Planned> {
    let process: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| *k != Kind::Provider)
        .collect();
    if process.is_empty() || end <= chaos_from {
        return vec![];
    }
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xFA17);
    let span = (end - chaos_from).as_secs_f64();
    let rounds = ((span / 45.0) as usize / process.len()).max(1);
    let mut order = Vec::new();
    for _ in 0..rounds {
        let mut round = process.clone();
        rng.shuffle(&mut round);
        order.extend(round);
    }
    let slot = span / order.len() as f64;
    order
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let at_s = chaos_from.as_secs_f64() + slot * (i as f64 + rng.f64() * 0.5);
            let instance = rng.u32(1..=2);
            let target = match kind {
                Kind::KillWorker => format!("compensation-worker-{instance}"),
                Kind::KillScheduler => format!("scheduler-{instance}"),
                Kind::KillRelay => format!("event-relay-{instance}"),
                Kind::RedisRestart => "redis".to_owned(),
                Kind::KafkaRestart => "kafka".to_owned(),
                Kind::PgTerminate | Kind::Provider => "postgres".to_owned(),
            };
            let down_s = match kind {
                Kind::PgTerminate => 0.0,
                _ => (0.5 + rng.f64() * 2.0).min(slot / 4.0),
            };
            Planned {
                kind,
                at_s,
                target,
                down_s,
            }
        })
        .collect()
}

/// The simulator's faults for the provider chaos (`None`: calm).
pub fn provider_chaos(o: &ProviderShares) -> serde_json::Value {
    serde_json::json!({
        "query_timeout_rate": o.query_timeout,
        // past the worker's gateway timeout (2 s): a timeout, not a slow answer
        "query_timeout_ms": 5000,
        "drop_rate": o.callback_drop,
        "duplicate_rate": o.callback_duplicate,
        "duplicate_count": 1,
        "delay_rate": o.callback_delay,
        "delay_ms": 3000,
        "refund_timeout_rate": o.query_timeout,
        "callback_attempts": 5,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ProviderShares {
    pub query_timeout: f64,
    pub callback_drop: f64,
    pub callback_duplicate: f64,
    pub callback_delay: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_planned_one_at_a_time_inside_the_chaos_phase() {
        let kinds = parse("all").unwrap();
        let p = plan(&kinds, Duration::from_secs(15), Duration::from_secs(60), 3);
        assert_eq!(p.len(), PROCESS_KINDS.len());
        for k in PROCESS_KINDS {
            assert!(p.iter().any(|x| x.kind == *k), "{k:?} missing");
        }
        assert!(p.windows(2).all(|w| w[0].at_s + w[0].down_s < w[1].at_s));
        assert!(p.iter().all(|x| x.at_s >= 15.0 && x.at_s < 60.0));
        // repeatable by the seed
        let again = plan(&kinds, Duration::from_secs(15), Duration::from_secs(60), 3);
        assert_eq!(format!("{p:?}"), format!("{again:?}"));
        // a long run repeats them
        let long = plan(&kinds, Duration::from_secs(60), Duration::from_secs(900), 3);
        assert!(long.len() >= 18, "{}", long.len());
    }

    #[test]
    fn fault_lists_parse_and_unknown_kinds_are_named() {
        assert!(parse("none").unwrap().is_empty());
        assert_eq!(parse("paper").unwrap(), vec![Kind::Provider]);
        assert_eq!(
            parse("kill-relay, redis-restart").unwrap(),
            vec![Kind::KillRelay, Kind::RedisRestart]
        );
        let e = parse("kill-everything").unwrap_err();
        assert!(
            e.contains("kill-everything") && e.contains("pg-terminate"),
            "{e}"
        );
    }
}
