//! The job engine against real Postgres: many instances, each job run once; a dead instance's
//! leases rescued and its late settle refused; retries, death and redrive, all by moving a
//! test clock rather than sleeping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use integration_tests::{eventually, fresh_database};
use job_engine::store::{self, Settle};
use job_engine::{
    Clock, DbClock, Engine, EngineConfig, Inserted, ManualClock, NewJob, Outcome, Priority,
};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A migrated database with a `job_runs` table where test handlers record each run.
async fn database() -> PgPool {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&fresh_database().await)
        .await
        .unwrap();
    postgres_store::MIGRATOR.run(&pool).await.unwrap();
    sqlx::query(
        "CREATE TABLE job_runs (job_id bigint NOT NULL, instance text NOT NULL,
                                fired_at timestamptz NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

fn job(kind: &str, n: i64, run_at: chrono::DateTime<Utc>) -> NewJob {
    NewJob {
        kind: kind.to_owned(),
        payload: json!({ "n": n }),
        priority: Priority::P1,
        run_at: run_at.into(),
        max_attempts: 3,
        dedupe_key: None,
    }
}

/// The engine's leadership as the binaries make it (a 5 s lease).
fn leadership(pool: &PgPool) -> job_engine::Leadership {
    job_engine::Leadership::new(pool.clone(), "job", "test", Duration::from_secs(5))
}

async fn insert_all(pool: &PgPool, jobs: impl IntoIterator<Item = NewJob>) -> Vec<i64> {
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for j in jobs {
        ids.push(store::insert(&mut tx, &j).await.unwrap().id());
    }
    tx.commit().await.unwrap();
    ids
}

fn test_config(instance: &str) -> EngineConfig {
    EngineConfig {
        owner: instance.to_owned(),
        batch_size: 100,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(20),
        maintenance_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

/// An engine whose `test.run` handler records (job, instance, when it fired) in `job_runs`.
fn recording_engine(pool: &PgPool, clock: Arc<dyn Clock>, instance: &str) -> Engine {
    recording_engine_with(pool, clock, test_config(instance))
}

fn recording_engine_with(pool: &PgPool, clock: Arc<dyn Clock>, config: EngineConfig) -> Engine {
    let (pool, name) = (pool.clone(), config.owner.clone());
    let mut engine = Engine::new(pool.clone(), clock.clone(), config);
    engine.register("test.run", move |j| {
        let (pool, name, clock) = (pool.clone(), name.clone(), clock.clone());
        async move {
            match sqlx::query(
                "INSERT INTO job_runs (job_id, instance, fired_at) VALUES ($1, $2, $3)",
            )
            .bind(j.id)
            .bind(&name)
            .bind(clock.now())
            .execute(&pool)
            .await
            {
                Ok(_) => Outcome::Done,
                Err(e) => Outcome::Retry(e.to_string()),
            }
        }
    });
    engine
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Runs an engine on a runtime of its own, so the test can kill the whole instance (every task
/// it spawned) without letting it settle anything.
struct Instance {
    runtime: Option<tokio::runtime::Runtime>,
}

/// A pool of its own for an [`Instance`]: connections belong to the runtime that opened them,
/// so a killed instance must not leave dead ones in a pool the test still uses.
fn own_pool(pool: &PgPool) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_lazy_with((*pool.connect_options()).clone())
}

impl Instance {
    fn start(engine: Engine, stop: CancellationToken) -> (Instance, tokio::task::JoinHandle<()>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.spawn(async move { engine.run(stop).await });
        (
            Instance {
                runtime: Some(runtime),
            },
            handle,
        )
    }

    /// kill -9, in process: every task of the instance is dropped where it stands.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `engine` as an instance until `sql` counts `n`, then stops it (draining) and kills it.
async fn run_until(pool: &PgPool, engine: Engine, what: &str, sql: &str, n: i64) {
    let stop = CancellationToken::new();
    let (mut instance, handle) = Instance::start(engine, stop.clone());
    eventually(what, Duration::from_secs(30), || async {
        (count(pool, sql).await == n).then_some(())
    })
    .await;
    stop.cancel();
    handle.await.unwrap();
    instance.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_run_5000_jobs_exactly_once_though_one_is_killed_mid_run() {
    let pool = database().await;
    let start = Utc::now() + chrono::Duration::milliseconds(300);
    // due over the next two seconds, one every 0.4 ms
    insert_all(
        &pool,
        (0..5000).map(|n| {
            job(
                "test.run",
                n,
                start + chrono::Duration::microseconds(n * 400),
            )
        }),
    )
    .await;
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    for name in ["a", "b"] {
        let engine = recording_engine(&own_pool(&pool), Arc::new(DbClock::new()), name);
        running.push(Instance::start(engine, stop.clone()));
    }
    // instance C takes its share and hangs in every handler: then it is killed
    let mut c = Engine::new(
        own_pool(&pool),
        Arc::new(DbClock::new()),
        EngineConfig {
            lease: Duration::from_secs(3),
            ..test_config("c")
        },
    );
    c.register("test.run", |_| std::future::pending::<Outcome>());
    let (mut c, _) = Instance::start(c, stop.clone());
    let c_leases: Vec<(i64, uuid::Uuid)> =
        eventually("C to hold jobs", Duration::from_secs(20), || async {
            let held: Vec<(i64, uuid::Uuid)> =
                sqlx::query_as("SELECT id, lease_token FROM delayed_job WHERE lease_owner = 'c'")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            (held.len() >= 20).then_some(held)
        })
        .await;
    c.kill();
    eprintln!(
        "instance C killed holding at least {} leases",
        c_leases.len()
    );

    eventually("5000 jobs to complete", Duration::from_secs(90), || async {
        (count(
            &pool,
            "SELECT count(*) FROM delayed_job_all WHERE state = 'completed'",
        )
        .await
            == 5000)
            .then_some(())
    })
    .await;
    // C's late completion of what it held is refused: the rescuer's run stands
    for (id, token) in &c_leases {
        assert!(
            !store::settle(&pool, *id, *token, &Settle::Completed)
                .await
                .unwrap(),
            "job {id}: a stale owner settled"
        );
    }
    stop.cancel();
    for (mut instance, handle) in running {
        handle.await.unwrap();
        instance.kill();
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM job_runs").await, 5000);
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT job_id) FROM job_runs").await,
        5000,
        "a job ran twice"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM job_runs WHERE instance = 'c'").await,
        0
    );
    // jobs are claimed ahead of time, but none fires before it is due
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM job_runs r JOIN delayed_job_all j ON j.id = r.job_id
             WHERE r.fired_at < j.run_at"
        )
        .await,
        0,
        "a job fired early"
    );
    let rescued = count(
        &pool,
        "SELECT count(*) FROM delayed_job_all WHERE attempts = 2 AND last_error = 'lease expired'",
    )
    .await;
    assert!(
        rescued >= c_leases.len() as i64,
        "C's jobs were rescued: {rescued}"
    );
    let per_instance: Vec<(String, i64)> =
        sqlx::query_as("SELECT instance, count(*) FROM job_runs GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    eprintln!("jobs run per instance: {per_instance:?}; rescued from C: {rescued}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_inserted_due_now_wakes_an_engine_long_before_its_next_poll() {
    let pool = database().await;
    let stop = CancellationToken::new();
    // a poll interval of a minute: only the NOTIFY can get the job run in time
    let engine = recording_engine_with(
        &own_pool(&pool),
        Arc::new(DbClock::new()),
        EngineConfig {
            poll_interval: Duration::from_secs(60),
            lookahead: Duration::from_secs(60),
            lease: Duration::from_secs(120),
            maintenance_interval: Duration::from_secs(3600),
            ..test_config("a")
        },
    );
    let (mut instance, handle) = Instance::start(engine, stop.clone());
    // let it take its first (empty) poll and start listening
    tokio::time::sleep(Duration::from_millis(500)).await;
    insert_all(&pool, [job("test.run", 1, Utc::now())]).await;
    eventually("the job to run", Duration::from_secs(15), || async {
        (count(&pool, "SELECT count(*) FROM job_runs").await == 1).then_some(())
    })
    .await;
    stop.cancel();
    handle.await.unwrap();
    instance.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_back_waiting_jobs_uncounted_and_running_ones_after_the_drain_timeout() {
    let pool = database().await;
    let stop = CancellationToken::new();
    let mut engine = recording_engine_with(
        &own_pool(&pool),
        Arc::new(DbClock::new()),
        EngineConfig {
            lookahead: Duration::from_secs(30),
            lease: Duration::from_secs(60),
            drain_timeout: Duration::from_millis(300),
            ..test_config("a")
        },
    );
    engine.register("test.hang", |_| std::future::pending::<Outcome>());
    let later = Utc::now() + chrono::Duration::seconds(20);
    let ids = insert_all(
        &pool,
        [
            job("test.run", 1, later),
            job("test.run", 2, later),
            job("test.hang", 3, Utc::now()),
        ],
    )
    .await;
    let (mut instance, handle) = Instance::start(engine, stop.clone());
    eventually("all three held", Duration::from_secs(15), || async {
        (count(
            &pool,
            "SELECT count(*) FROM delayed_job WHERE state = 'running'",
        )
        .await
            == 3)
            .then_some(())
    })
    .await;
    stop.cancel();
    handle.await.unwrap();
    instance.kill();
    let rows: Vec<(i64, String, i32, Option<String>, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT id, state, attempts, last_error, lease_token FROM delayed_job ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (ids[0], "scheduled".into(), 0, None, None),
            (ids[1], "scheduled".into(), 0, None, None),
            (
                ids[2],
                "scheduled".into(),
                1,
                Some("released at shutdown while running".into()),
                None
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_low_priority_job_ages_to_the_front_and_a_paused_kind_waits() {
    let pool = database().await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let mut engine = recording_engine_with(
        &pool,
        clock.clone(),
        EngineConfig {
            batch_size: 1,
            aging_step: Duration::from_secs(60),
            ..test_config("a")
        },
    );
    engine.register("test.other", |_| async { Outcome::Done });
    let low = NewJob {
        priority: Priority::P2,
        ..job("test.run", 0, clock.now())
    };
    let ids = insert_all(&pool, [low]).await;
    let low_id = ids[0];
    let mut leadership = leadership(&pool);
    // a stream of P0 work: one new P0 job per round, each newer than the P2 job
    let mut order = Vec::new();
    for n in 1..=6 {
        clock.advance(Duration::from_secs(40));
        let p0 = NewJob {
            priority: Priority::P0,
            ..job("test.run", n, clock.now())
        };
        insert_all(&pool, [p0.clone(), p0]).await;
        engine.maintain_once(&mut leadership).await.unwrap();
        engine.run_once().await.unwrap();
        order.push(
            count(
                &pool,
                &format!("SELECT count(*) FROM job_runs WHERE job_id = {low_id}"),
            )
            .await,
        );
    }
    // P2 waits while younger P0 jobs go first; more than 60 s overdue it is P1 (round 2, at
    // 80 s), 60 s after that P0 (round 4, at 160 s): then it is the oldest P0 job and runs
    let ran_at_round = order.iter().position(|n| *n == 1).map(|i| i + 1);
    assert_eq!(ran_at_round, Some(4), "runs per round: {order:?}");

    // pause: nothing of the kind is claimed, by any instance, until resumed
    insert_all(&pool, [job("test.other", 100, clock.now())]).await;
    sqlx::query("DELETE FROM delayed_job WHERE kind = 'test.run' AND state = 'scheduled'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(store::pause_kind(&pool, "test.other", "ops").await.unwrap());
    assert!(!store::pause_kind(&pool, "test.other", "ops").await.unwrap());
    assert_eq!(engine.run_once().await.unwrap().claimed, 0);
    assert!(store::resume_kind(&pool, "test.other").await.unwrap());
    assert_eq!(engine.run_once().await.unwrap().completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_with_a_concurrency_limit_never_runs_more_at_once() {
    let pool = database().await;
    let mut engine = Engine::new(own_pool(&pool), Arc::new(DbClock::new()), test_config("a"));
    let now_running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, m) = (now_running.clone(), most.clone());
    engine.register_limited("test.limited", 2, move |_| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Outcome::Done
        }
    });
    insert_all(&pool, (0..30).map(|n| job("test.limited", n, Utc::now()))).await;
    run_until(
        &pool,
        engine,
        "30 jobs done",
        "SELECT count(*) FROM delayed_job_all WHERE state = 'completed'",
        30,
    )
    .await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "at most two at once, and two did run together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instances_jobs_are_rescued_and_run_once_and_its_late_settle_is_refused() {
    let pool = database().await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let ids = insert_all(&pool, (0..10).map(|n| job("test.run", n, clock.now()))).await;
    // instance A claims everything, then dies (drops its tasks without settling)
    let kinds = vec!["test.run".to_owned()];
    let lost = store::claim(
        &pool,
        "a",
        &kinds,
        100,
        Some(clock.now()),
        Duration::ZERO,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(lost.len(), 10);

    let b = recording_engine(&pool, clock.clone(), "b");
    assert_eq!(b.run_once().await.unwrap().claimed, 0, "A's leases hold");
    assert_eq!(b.rescue_once().await.unwrap(), 0, "not expired yet");
    clock.advance(Duration::from_secs(6));
    assert_eq!(b.rescue_once().await.unwrap(), 10);
    let round = b.run_once().await.unwrap();
    assert_eq!((round.claimed, round.completed), (10, 10));

    // A comes back and tries to settle what it claimed: refused, nothing changes
    for j in &lost {
        assert!(
            !store::settle(&pool, j.id, j.lease_token, &Settle::Completed)
                .await
                .unwrap()
        );
        assert!(!store::settle(
            &pool,
            j.id,
            j.lease_token,
            &Settle::Dead {
                error: "stale".into()
            }
        )
        .await
        .unwrap());
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM job_runs WHERE instance = 'b'").await,
        10
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM job_runs").await, 10);
    let states: Vec<(i64, String, i32)> =
        sqlx::query_as("SELECT id, state, attempts FROM delayed_job_all ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        states,
        ids.iter()
            .map(|id| (*id, "completed".to_owned(), 2))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_loses_its_lease_mid_run_cannot_settle() {
    let pool = database().await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    insert_all(&pool, [job("test.slow", 1, clock.now())]).await;
    // A's handler hangs until released; meanwhile its lease runs out and B takes the job
    let release = Arc::new(tokio::sync::Notify::new());
    let mut a = Engine::new(
        pool.clone(),
        clock.clone(),
        EngineConfig {
            owner: "a".into(),
            lease: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let r = release.clone();
    a.register("test.slow", move |_| {
        let r = r.clone();
        async move {
            r.notified().await;
            Outcome::Done
        }
    });
    let a = Arc::new(a);
    let a_round = {
        let a = a.clone();
        tokio::spawn(async move { a.run_once().await.unwrap() })
    };
    eventually("A to hold the job", Duration::from_secs(10), || async {
        (count(
            &pool,
            "SELECT count(*) FROM delayed_job WHERE state = 'running'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    clock.advance(Duration::from_secs(6));
    let mut b = Engine::new(
        pool.clone(),
        clock.clone(),
        EngineConfig {
            owner: "b".into(),
            ..Default::default()
        },
    );
    b.register("test.slow", |_| async { Outcome::Done });
    assert_eq!(b.rescue_once().await.unwrap(), 1);
    assert_eq!(b.run_once().await.unwrap().completed, 1);
    release.notify_one();
    let report = a_round.await.unwrap();
    assert_eq!((report.completed, report.lease_lost), (0, 1));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM delayed_job_all WHERE state = 'completed'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_die_with_the_last_error_and_a_redrive_runs_again() {
    let pool = database().await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let failing = Arc::new(AtomicBool::new(true));
    let mut engine = Engine::new(
        pool.clone(),
        clock.clone(),
        EngineConfig {
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let f = failing.clone();
    engine.register("test.flaky", move |j| {
        let f = f.clone();
        async move {
            if f.load(Ordering::SeqCst) {
                Outcome::Retry(format!("boom on attempt {}", j.attempt))
            } else {
                Outcome::Done
            }
        }
    });
    engine.register("test.permanent", |_| async {
        Outcome::Permanent("bad payload".into())
    });
    engine.register("test.later", |_| async {
        Outcome::RetryAfter(Duration::from_secs(42), "not yet".into())
    });
    let ids = insert_all(
        &pool,
        [
            job("test.flaky", 1, clock.now()),
            job("test.permanent", 2, clock.now()),
            job("test.later", 3, clock.now()),
        ],
    )
    .await;
    let (flaky, permanent, later) = (ids[0], ids[1], ids[2]);
    let row = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, i32, chrono::DateTime<Utc>, Option<String>)>(
                "SELECT state, attempts, run_at, last_error FROM delayed_job_all WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    let r = engine.run_once().await.unwrap();
    assert_eq!((r.claimed, r.retried, r.dead), (3, 2, 1));
    let (state, _, _, error) = row(permanent).await;
    assert_eq!(
        (state.as_str(), error.as_deref()),
        ("dead", Some("bad payload"))
    );
    let (_, _, run_at, _) = row(later).await;
    assert_eq!(run_at, clock.now() + chrono::Duration::seconds(42));
    // attempt 1 backs off 5 to 10 s (equal jitter on a 10 s base): not due before 5 s
    let (_, _, run_at, _) = row(flaky).await;
    let wait = run_at - clock.now();
    assert!(
        wait >= chrono::Duration::seconds(5) && wait <= chrono::Duration::seconds(10),
        "{wait}"
    );
    clock.advance(Duration::from_millis(4_900));
    assert_eq!(engine.run_once().await.unwrap().claimed, 0, "not due yet");
    clock.advance(Duration::from_millis(5_100));
    assert_eq!(engine.run_once().await.unwrap().retried, 1, "attempt 2");
    // attempt 2 backs off 10 to 20 s; attempt 3 is the last
    clock.advance(Duration::from_secs(20));
    let r = engine.run_once().await.unwrap();
    assert_eq!((r.claimed, r.dead), (1, 1));
    let (state, attempts, _, error) = row(flaky).await;
    assert_eq!(
        (state.as_str(), attempts, error.as_deref()),
        ("dead", 3, Some("boom on attempt 3"))
    );

    // an operator redrives it once the cause is fixed
    failing.store(false, Ordering::SeqCst);
    assert!(store::redrive(&pool, flaky, Some(clock.now()))
        .await
        .unwrap());
    assert!(
        !store::redrive(&pool, flaky, Some(clock.now()))
            .await
            .unwrap(),
        "no longer dead"
    );
    assert_eq!(engine.run_once().await.unwrap().completed, 1);
    assert_eq!(row(flaky).await.0, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_dedupe_key_names_the_existing_job_and_kinds_stay_apart() {
    let pool = database().await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let keyed = |kind: &str| NewJob {
        dedupe_key: Some("order.expire:42".into()),
        ..job(kind, 1, clock.now())
    };
    let mut conn = pool.acquire().await.unwrap();
    let first = store::insert(&mut conn, &keyed("test.run")).await.unwrap();
    let Inserted::New(id) = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        store::insert(&mut conn, &keyed("test.run")).await.unwrap(),
        Inserted::DuplicateOf(id)
    );
    // another binary's kind in the same table: an engine claims only the kinds it runs
    insert_all(&pool, [job("payment.check", 2, clock.now())]).await;
    let engine = recording_engine(&pool, clock.clone(), "scheduler");
    let r = engine.run_once().await.unwrap();
    assert_eq!((r.claimed, r.completed), (1, 1));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM delayed_job WHERE kind = 'payment.check' AND state = 'scheduled'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_paused_leader_is_replaced_and_fenced() {
    use job_engine::leader;
    let pool = database().await;
    let lease = Duration::from_millis(1200);
    let mut a = job_engine::Leadership::new(pool.clone(), "job", "a", lease);
    let mut b = job_engine::Leadership::new(pool.clone(), "job", "b", lease);
    assert!(a.ensure().await);
    assert!(!b.ensure().await, "the lease is held");
    let first = a.epoch().expect("a leads");
    // A renews while it runs: B never gets in, however often it tries
    let until = std::time::Instant::now() + 2 * lease;
    while std::time::Instant::now() < until {
        assert!(a.ensure().await, "A keeps leading while it renews");
        assert!(!b.ensure().await, "B takes nothing while A renews");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A pauses (a SIGSTOP: it keeps its connections but renews nothing): once its lease
    // lapses on the database's clock, B takes over with a higher epoch
    let fence_a = a.fence().expect("a leads");
    // until when A trusts its lease: `lease` after it sent its last renewal
    let a_trusts = a.valid_until().expect("a leads");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !b.ensure().await {
        assert!(std::time::Instant::now() < deadline, "B never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // never two leaders: B got in only once A could no longer believe it led (the lease
    // lapses on the database's clock `lease` after the renewal reached it)
    let early = a_trusts.saturating_duration_since(std::time::Instant::now());
    assert!(
        early <= Duration::from_millis(20),
        "B took over {early:?} before A's lease was over"
    );
    assert!(
        std::time::Instant::now() < a_trusts + lease,
        "B took over later than a lease after A stopped renewing"
    );
    assert!(b.epoch().unwrap() > first, "a take-over bumps the epoch");
    // A wakes: it knows at once (its own monotonic clock) that it may not lead, and what it
    // writes under its old lease is fenced
    assert!(
        !a.is_leader(),
        "a leader that slept past its lease does not trust it"
    );
    let mut tx = pool.begin().await.unwrap();
    assert!(
        !leader::hold(&mut tx, &fence_a, lease).await.unwrap(),
        "A's fence no longer holds"
    );
    drop(tx);
    let mut tx = pool.begin().await.unwrap();
    assert!(leader::hold(&mut tx, &b.fence().unwrap(), lease)
        .await
        .unwrap());
    drop(tx);
    // what A would write as leader after waking is fenced: no schedule occurrence, no cursor
    let def = job_engine::schedule::ScheduleDef::new("test.run", "* * * * *", "UTC");
    let now = Utc::now();
    job_engine::schedule::put(&pool, "every-minute", &def, "test", now, false)
        .await
        .unwrap()
        .unwrap();
    let until = now + chrono::Duration::minutes(5);
    let grace = chrono::Duration::minutes(1);
    let fenced = Some((&fence_a, lease));
    let written = job_engine::schedule::materialize(&pool, now, until, grace, fenced)
        .await
        .unwrap();
    assert_eq!(written, 0, "a replaced leader writes no occurrence");
    assert_eq!(count(&pool, "SELECT count(*) FROM delayed_job").await, 0);
    let fence_b = b.fence().unwrap();
    let written =
        job_engine::schedule::materialize(&pool, now, until, grace, Some((&fence_b, lease)))
            .await
            .unwrap();
    assert!(written >= 4, "the live leader writes them: {written}");
    assert!(!a.ensure().await, "A does not get it back while B renews");
    // B resigns on shutdown: A takes over at its next try, without waiting for a lapse
    b.resign().await;
    assert!(a.ensure().await);
    assert!(a.epoch().unwrap() > first + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_leave_the_hot_table_and_keys_stay_unique_across_the_archive() {
    let pool = database().await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let keyed = |n: i64| NewJob {
        dedupe_key: Some(format!("test.run:{n}")),
        ..job("test.run", n, clock.now())
    };
    insert_all(&pool, (0..250).map(keyed)).await;
    let mut dead = job("test.run", 999, clock.now());
    dead.max_attempts = 1;
    dead.kind = "test.dies".into();
    let cancelled = NewJob {
        dedupe_key: Some("test.cancel:1".into()),
        ..job("test.run", 1001, clock.now() + chrono::Duration::days(1))
    };
    insert_all(
        &pool,
        [
            dead,
            job("test.run", 1000, clock.now() + chrono::Duration::days(1)),
            cancelled,
        ],
    )
    .await;
    let mut conn = pool.acquire().await.unwrap();
    assert!(store::cancel(&mut conn, "test.cancel:1").await.unwrap());
    let mut engine = recording_engine(&pool, clock.clone(), "a");
    engine.register("test.dies", |_| async { Outcome::Permanent("no".into()) });
    let mut done = 0;
    while done < 251 {
        let r = engine.run_once().await.unwrap();
        assert!(r.claimed > 0);
        done += r.completed + r.dead;
    }
    // completed jobs left the hot table as they completed
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM delayed_job_archive WHERE state = 'completed'"
        )
        .await,
        250
    );
    // a completed job's key still names it: inserting it again writes nothing
    let again = store::insert(&mut conn, &keyed(7)).await.unwrap();
    let archived_7: i64 =
        sqlx::query_scalar("SELECT id FROM delayed_job_archive WHERE dedupe_key = 'test.run:7'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(again, Inserted::DuplicateOf(archived_7));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM delayed_job WHERE dedupe_key = 'test.run:7'"
        )
        .await,
        0
    );

    let mut leadership = leadership(&pool);
    // the cancelled job stays for the retention (archive_after: one hour)
    let m = engine.maintain_once(&mut leadership).await.unwrap();
    assert_eq!((m.leader, m.archived), (true, 0));
    clock.advance(Duration::from_secs(3601));
    let m = engine.maintain_once(&mut leadership).await.unwrap();
    assert_eq!(m.archived, 1);
    // hot: the dead job (awaiting a redrive) and the one not due yet
    let hot: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, state FROM delayed_job ORDER BY kind")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        hot,
        vec![
            ("test.dies".to_owned(), "dead".to_owned()),
            ("test.run".to_owned(), "scheduled".to_owned())
        ]
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM delayed_job_all").await,
        253,
        "nothing lost on the way"
    );
    // a second instance does not lead, so does no maintenance
    let mut other =
        job_engine::Leadership::new(pool.clone(), "job", "other", Duration::from_secs(5));
    let m = engine.maintain_once(&mut other).await.unwrap();
    assert_eq!(m, job_engine::Maintenance::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_schedule_occurrences_ahead_once_and_replays_misfires_by_policy() {
    use job_engine::schedule::{self, Put, ScheduleDef};
    let pool = database().await;
    // 10:00:30 UTC, a fixed day
    let start: chrono::DateTime<Utc> = "2026-06-01T10:00:30Z".parse().unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let def = |misfire: &str, max: i32| ScheduleDef {
        kind: "test.run".into(),
        payload: json!({ "report": "daily" }),
        priority: 2,
        max_attempts: 3,
        recurrence: "* * * * *".into(),
        time_zone: "Asia/Shanghai".into(),
        dst_gap: "shift".into(),
        dst_overlap: "first".into(),
        misfire: misfire.into(),
        catch_up_max: max,
        paused: false,
    };
    for (name, misfire, max) in [
        ("every-minute-once", "fire_once", 1),
        ("every-minute-skip", "skip", 1),
        ("every-minute-catch-up", "catch_up", 3),
    ] {
        let put = schedule::put(&pool, name, &def(misfire, max), "test", clock.now(), false)
            .await
            .unwrap();
        assert_eq!(put, Ok(Put::Created));
    }
    // a bad definition is refused with the reason, and nothing is stored
    let bad = schedule::put(
        &pool,
        "bad",
        &ScheduleDef {
            time_zone: "Atlantis/Nowhere".into(),
            ..def("skip", 1)
        },
        "test",
        clock.now(),
        false,
    )
    .await
    .unwrap();
    assert!(bad.is_err(), "{bad:?}");
    // a start-up default does not overwrite an operator's edit
    let kept = schedule::put(
        &pool,
        "every-minute-skip",
        &def("fire_once", 1),
        "scheduler",
        clock.now(),
        true,
    )
    .await
    .unwrap();
    assert_eq!(kept, Ok(Put::Kept));

    let engine = recording_engine_with(
        &pool,
        clock.clone(),
        EngineConfig {
            maintenance_interval: Duration::from_secs(5),
            lookahead: Duration::from_secs(1),
            misfire_grace: Duration::from_secs(60),
            ..test_config("a")
        },
    );
    let mut leadership = leadership(&pool);
    // the horizon is 11 s ahead: nothing due before 10:01:00
    assert_eq!(
        engine
            .maintain_once(&mut leadership)
            .await
            .unwrap()
            .scheduled,
        0
    );
    clock.advance(Duration::from_secs(20)); // 10:00:50: 10:01:00 is within the horizon
    assert_eq!(
        engine
            .maintain_once(&mut leadership)
            .await
            .unwrap()
            .scheduled,
        3
    );
    assert_eq!(
        engine
            .maintain_once(&mut leadership)
            .await
            .unwrap()
            .scheduled,
        0,
        "written once"
    );
    let occurrences: Vec<(String, chrono::DateTime<Utc>)> =
        sqlx::query_as("SELECT payload->>'schedule', run_at FROM delayed_job ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    let at_1001: chrono::DateTime<Utc> = "2026-06-01T10:01:00Z".parse().unwrap();
    assert!(
        occurrences.iter().all(|(_, run_at)| *run_at == at_1001),
        "{occurrences:?}"
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(engine.run_once().await.unwrap().completed, 3);

    // the leader is gone for ten minutes: 10:02 .. 10:11 are missed
    clock.advance(Duration::from_secs(600)); // 10:11:00
    engine.maintain_once(&mut leadership).await.unwrap();
    let per_schedule: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT payload->>'schedule',
                count(*) FILTER (WHERE run_at = $1),
                count(*) FILTER (WHERE run_at > $1)
         FROM delayed_job WHERE state = 'scheduled' GROUP BY 1 ORDER BY 1",
    )
    .bind(clock.now())
    .fetch_all(&pool)
    .await
    .unwrap();
    // replayed now / on time ahead (10:11 is within the grace; 10:12 is not yet written)
    assert_eq!(
        per_schedule,
        vec![
            ("every-minute-catch-up".to_owned(), 4, 0),
            ("every-minute-once".to_owned(), 2, 0),
            ("every-minute-skip".to_owned(), 1, 0),
        ],
        "catch-up: 10:08..10:10 replayed plus 10:11; once: 10:10 replayed plus 10:11; skip: 10:11"
    );
    let listed = schedule::list(&pool).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|s| s.last_fired_at.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_running_past_its_lease_keeps_it_by_heartbeat_and_runs_once() {
    let pool = database().await;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // a 2 s lease, a leader rescuing expired leases every 100 ms, a handler that takes 4 s
    let mut engine = Engine::new(
        own_pool(&pool),
        Arc::new(DbClock::new()),
        EngineConfig {
            lease: Duration::from_secs(2),
            lookahead: Duration::from_millis(200),
            maintenance_interval: Duration::from_millis(100),
            ..test_config("a")
        },
    );
    let r = runs.clone();
    engine.register("test.slow", move |_| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(4)).await;
            Outcome::Done
        }
    });
    let ids = insert_all(&pool, [job("test.slow", 1, Utc::now())]).await;
    run_until(
        &pool,
        engine,
        "the slow job to complete",
        "SELECT count(*) FROM delayed_job_all WHERE state = 'completed'",
        1,
    )
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the lease lapsed and the job ran again"
    );
    let (attempts, error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM delayed_job_all WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempts, error), (1, None));
}

/// An instance whose lease on a job was rescued claims the job again while its stale run is
/// still going. The stale run's refused settle must not drop the new run from what the
/// instance holds: the new run keeps its heartbeat, so it is not rescued and run a third time,
/// and it settles once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_again_while_its_stale_run_goes_on_keeps_its_heartbeat() {
    use std::sync::atomic::AtomicUsize;
    let pool = database().await;
    let config = EngineConfig {
        lease: Duration::from_millis(1500),
        poll_interval: Duration::from_millis(50),
        lookahead: Duration::from_millis(100),
        maintenance_interval: Duration::from_millis(200),
        ..test_config("a")
    };
    let mut engine = Engine::new(own_pool(&pool), Arc::new(DbClock::new()), config);
    let calls = Arc::new(AtomicUsize::new(0));
    let released = Arc::new(AtomicUsize::new(0));
    {
        let (calls, released) = (calls.clone(), released.clone());
        engine.register("test.long", move |_job| {
            let (calls, released) = (calls.clone(), released.clone());
            async move {
                let run = calls.fetch_add(1, Ordering::SeqCst) + 1;
                while released.load(Ordering::SeqCst) < run {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Outcome::Done
            }
        });
    }
    let id = insert_all(&pool, [job("test.long", 1, Utc::now())]).await[0];
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { engine.run(stop).await }
    });
    let runs = |n: usize| {
        let calls = calls.clone();
        async move { (calls.load(Ordering::SeqCst) == n).then_some(()) }
    };
    eventually("the first run", Duration::from_secs(10), || runs(1)).await;
    // the lease is rescued (as another instance's rescue would), and this instance, whose
    // first run is still going, claims the job again
    sqlx::query(
        "UPDATE delayed_job SET state = 'scheduled', lease_owner = NULL, lease_token = NULL,
             lease_expires_at = NULL, run_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    eventually("the second run", Duration::from_secs(10), || runs(2)).await;
    // the stale run ends: its settle is refused (lease lost)
    released.store(1, Ordering::SeqCst);
    // three leases later the second run still holds its lease (heartbeat), and nothing ran
    // it a third time
    let until = std::time::Instant::now() + Duration::from_millis(4500);
    while std::time::Instant::now() < until {
        assert_eq!(calls.load(Ordering::SeqCst), 2, "rescued and run again");
        let (state, owner): (String, Option<String>) =
            sqlx::query_as("SELECT state, lease_owner FROM delayed_job WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((state.as_str(), owner.as_deref()), ("running", Some("a")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    released.store(2, Ordering::SeqCst);
    eventually("the job completed", Duration::from_secs(10), || async {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM delayed_job_all WHERE id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap();
        (state.as_deref() == Some("completed")).then_some(())
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    stop.cancel();
    running.await.unwrap();
}

/// A stale run and a new run of one job settle in one batch (the instance whose lease was
/// rescued claimed the job again): the row takes the outcome of the run whose token holds its
/// lease, not of the first in the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_and_a_new_run_settling_together_leave_the_new_runs_outcome() {
    let pool = database().await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let id = insert_all(&pool, [job("test.run", 1, clock.now())]).await[0];
    let kinds = vec!["test.run".to_owned()];
    let lease = Duration::from_secs(5);
    let claim = || {
        store::claim(
            &pool,
            "a",
            &kinds,
            1,
            Some(clock.now()),
            Duration::ZERO,
            lease,
        )
    };
    let stale = claim().await.unwrap().remove(0);
    clock.advance(Duration::from_secs(6));
    assert_eq!(
        store::rescue_expired(&pool, Some(clock.now()))
            .await
            .unwrap(),
        1
    );
    let fresh = claim().await.unwrap().remove(0);
    let later = clock.now() + chrono::Duration::hours(1);
    let settled = store::settle_many(
        &pool,
        &[
            (
                id,
                stale.lease_token,
                Settle::Retry {
                    at: clock.now(),
                    error: "the stale run".into(),
                },
            ),
            (
                id,
                fresh.lease_token,
                Settle::Snooze {
                    at: later,
                    note: "the new run".into(),
                },
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        settled,
        [(id, fresh.lease_token)],
        "only the new run settled"
    );
    let row: (String, chrono::DateTime<Utc>, Option<String>, i32) =
        sqlx::query_as("SELECT state, run_at, last_error, attempts FROM delayed_job WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    // two claims, the second's attempt given back by its snooze
    assert_eq!(
        row,
        (
            "scheduled".to_owned(),
            later,
            Some("the new run".to_owned()),
            1
        )
    );
}
