//! job-bench: measures the job engine against a database given by URL (migrated here).
//!
//! ```text
//! job-bench fire      <database-url> [rate per s] [seconds] [due ahead ms] [workers]
//! job-bench burndown  <database-url> [jobs] [workers]
//! job-bench notify    <database-url> [inserts] [clients]
//! ```
//! Each prints `RESULT <name> key=value ...` lines that `scripts/bench.sh` turns into ratios.
//! Handlers do nothing, so what is measured is the engine: claiming, timing, settling.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use job_engine::store::{self, NewJob};
use job_engine::{DbClock, Engine, EngineConfig, Outcome, Priority};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const KIND: &str = "bench.noop";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> anyhow::Result<u64> {
        match args.get(i) {
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("argument {i} ({v}) is not a number")),
            None => Ok(default),
        }
    };
    let (Some(mode), Some(url)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: job-bench fire|burndown|notify <database-url> [numbers...]");
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await?;
    postgres_store::MIGRATOR.run(&pool).await?;
    sqlx::query("TRUNCATE delayed_job, delayed_job_archive")
        .execute(&pool)
        .await?;
    match mode.as_str() {
        "fire" => {
            fire(
                &pool,
                arg(2, 1000)?,
                arg(3, 60)?,
                arg(4, 2000)?,
                arg(5, 16)?,
            )
            .await
        }
        "burndown" => burndown(&pool, arg(2, 100_000)?, arg(3, 16)?).await,
        "notify" => notify_cost(&pool, arg(2, 4000)?, arg(3, 8)?).await,
        other => anyhow::bail!("unknown mode {other}: fire, burndown or notify"),
    }
}

/// An engine whose only kind does nothing, with a fixed number of workers; fire delays
/// (started at minus due at) go to `delays`.
fn engine(pool: &PgPool, workers: u64, delays: Arc<Mutex<Vec<f64>>>) -> Engine {
    let workers = workers.max(1) as usize;
    let mut engine = Engine::new(
        pool.clone(),
        Arc::new(DbClock::new()),
        EngineConfig {
            owner: "bench".into(),
            batch_size: 500,
            concurrency_min: workers,
            concurrency_max: workers,
            maintenance_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    engine.register(KIND, |_| async { Outcome::Done });
    engine.on_settled(move |s| {
        if let Ok(mut d) = delays.lock() {
            d.push(s.fire_delay.as_secs_f64() * 1000.0);
        }
    });
    engine
}

async fn open_jobs(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM delayed_job WHERE state IN ('scheduled', 'running')",
    )
    .fetch_one(pool)
    .await?)
}

/// `rate` jobs per second for `secs` seconds, each due `ahead_ms` after it is inserted.
async fn fire(
    pool: &PgPool,
    rate: u64,
    secs: u64,
    ahead_ms: u64,
    workers: u64,
) -> anyhow::Result<()> {
    let delays = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let engine = engine(pool, workers, delays.clone());
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { engine.run(stop).await })
    };
    // the engine is up and idle when the load arrives (connections open, statements prepared)
    tokio::time::sleep(Duration::from_secs(1)).await;
    // every 10 ms, one transaction with rate/100 jobs, as a busy order flow writes them
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut inserted = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let mut tx = pool.begin().await?;
        for _ in 0..per_tick {
            let job = NewJob {
                kind: KIND.into(),
                payload: serde_json::json!({}),
                priority: Priority::P1,
                run_at: (Utc::now() + chrono::Duration::milliseconds(ahead_ms as i64)).into(),
                max_attempts: 3,
                dedupe_key: None,
            };
            store::insert(&mut tx, &job).await?;
        }
        tx.commit().await?;
        inserted += per_tick;
        if inserted.is_multiple_of(rate * 10) {
            eprintln!(
                "fire: {inserted} jobs inserted, {} fired",
                delays.lock().map(|d| d.len()).unwrap_or(0)
            );
        }
    }
    while open_jobs(pool).await? > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await?;
    let mut d = delays
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    d.sort_by(f64::total_cmp);
    let pct = |p: f64| d[((d.len() as f64 * p) as usize).min(d.len() - 1)];
    let on_time = d.iter().filter(|ms| **ms <= 100.0).count() as f64 / d.len() as f64;
    println!(
        "RESULT fire jobs={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} on_time_pct={:.3}",
        d.len(),
        pct(0.50),
        pct(0.99),
        d[d.len() - 1],
        on_time * 100.0
    );
    Ok(())
}

/// `jobs` jobs all due now; how fast the engine completes them.
async fn burndown(pool: &PgPool, jobs: u64, workers: u64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO delayed_job (kind, payload, priority, run_at, max_attempts)
         SELECT $1, '{}', 1, now(), 3 FROM generate_series(1, $2)",
    )
    .bind(KIND)
    .bind(jobs as i64)
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE delayed_job")
        .execute(pool)
        .await?;
    let delays = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let engine = engine(pool, workers, delays.clone());
    let started = Instant::now();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { engine.run(stop).await })
    };
    // checked every 20 ms (the figure's resolution), progress shown every second
    let mut shown = Instant::now();
    loop {
        let open = open_jobs(pool).await?;
        if open == 0 {
            break;
        }
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            eprintln!(
                "burndown: {open} of {jobs} left after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.cancel();
    running.await?;
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM delayed_job_all WHERE state = 'completed'")
            .fetch_one(pool)
            .await?;
    println!(
        "RESULT burndown jobs={done} seconds={elapsed:.2} jobs_per_s={:.0}",
        done as f64 / elapsed
    );
    Ok(())
}

/// One job insert per transaction from `clients` connections, as order creation does: due in
/// an hour (no NOTIFY) against due now (NOTIFY at commit). Prints both rates.
async fn notify_cost(pool: &PgPool, inserts: u64, clients: u64) -> anyhow::Result<()> {
    let mut rates = Vec::new();
    for (label, ahead) in [
        ("quiet", chrono::Duration::hours(1)),
        ("notify", chrono::Duration::zero()),
    ] {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let pool = pool.clone();
            let n = inserts / clients;
            tasks.push(tokio::spawn(async move {
                for _ in 0..n {
                    let mut tx = pool.begin().await?;
                    let job = NewJob {
                        kind: "bench.parked".into(),
                        payload: serde_json::json!({}),
                        priority: Priority::P1,
                        run_at: (Utc::now() + ahead).into(),
                        max_attempts: 3,
                        dedupe_key: None,
                    };
                    store::insert(&mut tx, &job).await?;
                    tx.commit().await?;
                }
                Ok::<_, sqlx::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let rate = (inserts / clients * clients) as f64 / started.elapsed().as_secs_f64();
        eprintln!("notify: {label} {rate:.0} inserts/s");
        rates.push(rate);
    }
    println!(
        "RESULT notify quiet_per_s={:.0} notify_per_s={:.0} ratio={:.3}",
        rates[0],
        rates[1],
        rates[1] / rates[0]
    );
    Ok(())
}
