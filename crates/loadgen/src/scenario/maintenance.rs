//! What production Postgres does on its own and a test server may not: when `autovacuum` is
//! off (as on our CI machines), a long run's churned tables (`delayed_job` above all: every
//! job is inserted, leased, updated and moved to the archive) fill with dead rows and every
//! claim reads through them. The scenario then stands in for autovacuum, by its default rules
//! and at its pace: every `--vacuum-every` (autovacuum's naptime, 60 s) it vacuums each table
//! of the run's database whose dead rows pass 50 + 20 % of its live rows or whose rows inserted
//! since its last vacuum pass 1000 + 20 %, and analyzes each whose changes since its last
//! analyze pass 50 + 10 %; one table at a time, throttled as autovacuum is
//! (`vacuum_cost_delay` 2 ms, `vacuum_cost_limit` 200), skipping a table it would wait for a
//! lock on (`SKIP_LOCKED`; autovacuum too gives way), and each statement bounded by the
//! server's `statement_timeout`. (Autovacuum estimates a table's size from
//! `pg_class.reltuples`; this uses `n_live_tup`.) An unthrottled `VACUUM` of the whole
//! database every 30 s was tried first: its second of I/O and CPU on two cores showed as
//! "buy now" p99 spikes of 100 to 400 ms.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use sqlx::Connection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the stand-in did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Vacuums {
    /// Whether the server's autovacuum was off (else nothing ran).
    pub autovacuum_off: bool,
    /// Tables vacuumed (with analyze), and analyzed only.
    pub vacuumed: u32,
    pub analyzed: u32,
    pub seconds: f64,
    pub failures: Vec<String>,
}

/// A table's vacuum or analyze may take this long before the server cancels it (and it is
/// reported).
const PER_TABLE: Duration = Duration::from_secs(60);

/// Starts the stand-in if the server's autovacuum is off (`every` zero: never); it runs
/// until `stop` and its figures are read from the returned cell.
pub async fn stand_in_for_autovacuum(
    admin_url: &str,
    every: Duration,
    stop: CancellationToken,
) -> anyhow::Result<Arc<Mutex<Vacuums>>> {
    if every.is_zero() {
        return Ok(Arc::new(Mutex::new(Vacuums::default())));
    }
    let mut conn = paced(admin_url).await?;
    let setting: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&mut conn)
        .await?;
    let autovacuum_off = setting != "on";
    let done = Arc::new(Mutex::new(Vacuums {
        autovacuum_off,
        ..Default::default()
    }));
    if !autovacuum_off {
        return Ok(done);
    }
    eprintln!(
        "autovacuum is off on this server: the scenario stands in for it every {every:?} (its thresholds and pace)"
    );
    let (figures, url) = (done.clone(), admin_url.to_owned());
    tokio::spawn(async move {
        let mut conn = Some(conn);
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pass = async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(paced(&url).await?),
                };
                one_pass(c, &figures, &stop).await
            };
            if let Err(e) = pass.await {
                // a connection lost or left mid-statement: a fresh one next time
                conn = None;
                if let Ok(mut f) = figures.lock() {
                    f.failures.push(format!("{e:#}"));
                }
            }
        }
    });
    Ok(done)
}

/// A connection that vacuums at autovacuum's own pace, not a manual VACUUM's (unthrottled).
async fn paced(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    let mut conn = tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(url))
        .await
        .map_err(|_| anyhow::anyhow!("connect: no answer within 10 s"))??;
    sqlx::query("SET vacuum_cost_delay = '2ms'")
        .execute(&mut conn)
        .await?;
    sqlx::query("SET vacuum_cost_limit = 200")
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!(
        "SET statement_timeout = {}",
        PER_TABLE.as_millis()
    ))
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

/// Vacuums or analyzes each table past autovacuum's default thresholds.
async fn one_pass(
    conn: &mut sqlx::PgConnection,
    figures: &Mutex<Vacuums>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let due: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT table_name, do_vacuum, do_analyze FROM (
           SELECT format('%I.%I', schemaname, relname) AS table_name, n_dead_tup,
                  n_dead_tup > 50 + 0.2 * n_live_tup
                    OR n_ins_since_vacuum > 1000 + 0.2 * n_live_tup AS do_vacuum,
                  n_mod_since_analyze > 50 + 0.1 * n_live_tup AS do_analyze
             FROM pg_stat_user_tables) t
          WHERE do_vacuum OR do_analyze
          ORDER BY n_dead_tup DESC",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (table, vacuum, analyze) in due {
        if stop.is_cancelled() {
            return Ok(());
        }
        let sql = match (vacuum, analyze) {
            (true, true) => format!("VACUUM (SKIP_LOCKED, ANALYZE) {table}"),
            (true, false) => format!("VACUUM (SKIP_LOCKED) {table}"),
            _ => format!("ANALYZE (SKIP_LOCKED) {table}"),
        };
        let began = Instant::now();
        let outcome = sqlx::query(&sql).execute(&mut *conn).await;
        let took = began.elapsed().as_secs_f64();
        let Ok(mut f) = figures.lock() else {
            continue;
        };
        f.seconds += took;
        match outcome {
            Ok(_) => {
                f.vacuumed += u32::from(vacuum);
                f.analyzed += u32::from(analyze);
            }
            // one table's failure (its statement_timeout) is told; the others go on
            Err(sqlx::Error::Database(e)) => f.failures.push(format!("{sql}: {e}")),
            Err(e) => anyhow::bail!("{sql}: {e}"),
        }
    }
    Ok(())
}
