//! Reading what the checker judges: the database, Redis, the provider's books (the
//! simulator's paged ledger) and an independent Kafka consumer; and the server-side figures
//! of the report, from the database (durable: they survive the processes the run kills).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::check::{
    Job, Order, OutboxRow, Payment, ProviderPayment, RedisSku, Reservation, Seen, Sku, World,
};
use super::load::histogram;

/// The checker's own consumer: reads the order topic from the start, for the whole run, into
/// `seen`, each message tagged with the broker's life it was read in (`life / 2`).
///
/// `life` is odd while the broker is being restarted: the consumer is dropped before the
/// broker goes and a fresh one (a new group, from the earliest offset) made once it is back.
/// A client that lives through an in-memory broker's restart sees its topic come back under
/// a new topic id, and librdkafka 2.12's metadata cache then corrupts itself (SIGSEGV in
/// `rd_kafka_metadata_cache_find`; seen here, in this consumer and in the relays).
/// `dropped` counts the lives whose consumer has been dropped.
pub fn read_events(
    brokers: String,
    topic: String,
    life: Arc<AtomicU32>,
    dropped: Arc<AtomicU32>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let mine = life.load(Ordering::SeqCst);
            if mine % 2 == 1 {
                dropped.store(mine, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let consumer: StreamConsumer = match ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("scenario-checker-{}", Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", "10")
                .set("topic.metadata.refresh.interval.ms", "1000")
                .create()
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("checker's consumer: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = consumer.subscribe(&[&topic]) {
                eprintln!("checker's consumer: subscribe: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            while !stop.is_cancelled() && life.load(Ordering::SeqCst) == mine {
                let msg = tokio::select! {
                    m = consumer.recv() => m,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = stop.cancelled() => break,
                };
                let Ok(msg) = msg else { continue };
                let event_id = msg
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|x| x.key == "event_id")
                            .and_then(|x| x.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                    .unwrap_or_default();
                let s = Seen {
                    event_id,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    seen_at: Utc::now(),
                    epoch: mine / 2,
                };
                if let Ok(mut v) = seen.lock() {
                    v.push(s);
                }
            }
        }
    })
}

/// The world the checker judges: `observed` holds what the run saw itself (the client's
/// view, the consumer's reads, the broker's restarts); the rest is read here.
pub async fn world(
    db: &PgPool,
    http: &reqwest::Client,
    gateway: &str,
    redis: &redis_prelock::RedisPrelock,
    stocked: &[(String, i64)],
    observed: World,
) -> anyhow::Result<World> {
    let now_ms = redis.now_ms().await.context("redis TIME")?;
    let mut skus = Vec::new();
    for (id, n) in stocked {
        let stock_real: i64 = sqlx::query_scalar("SELECT stock_real FROM skus WHERE id = $1")
            .bind(id)
            .fetch_one(db)
            .await?;
        let sku = domain::SkuId::parse(id).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let redis_sku = match redis.available(&sku).await.context("redis GET")? {
            None => None,
            Some(available) => Some(RedisSku {
                available,
                held: redis
                    .held(&sku)
                    .await
                    .context("redis held")?
                    .into_iter()
                    .map(|(id, q, exp)| (id, i64::from(q), exp.is_none_or(|e| e > now_ms)))
                    .collect(),
            }),
        };
        skus.push(Sku {
            id: id.clone(),
            stocked: *n,
            stock_real,
            redis: redis_sku,
        });
    }
    let reservations = sqlx::query_as::<_, (Uuid, String, i32, String, bool)>(
        "SELECT order_id, sku_id, quantity, status,
                status = 'ACTIVE' AND expires_at > to_timestamp($1::float8 / 1000)
         FROM reservations",
    )
    .bind(now_ms as f64)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|(o, sku_id, q, status, live)| Reservation {
        order_id: o.to_string(),
        sku_id,
        quantity: i64::from(q),
        status,
        live,
    })
    .collect();
    let orders = sqlx::query_as::<_, (Uuid, String, i64)>(
        "SELECT o.id, o.state,
                (SELECT count(*) FROM vouchers v WHERE v.order_id = o.id)
         FROM orders o",
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|(id, state, vouchers)| Order {
        id: id.to_string(),
        state,
        vouchers,
    })
    .collect();
    let payments = sqlx::query_as::<_, (Uuid, Uuid, String, bool, bool)>(
        "SELECT p.id, p.order_id, p.status,
                EXISTS (SELECT 1 FROM compensation_failure f
                        WHERE f.payment_id = p.id AND f.status = 'open'),
                EXISTS (SELECT 1 FROM compensation_failure f WHERE f.payment_id = p.id)
         FROM payments p",
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|(id, order, status, open, any)| Payment {
        id: id.to_string(),
        order_id: order.to_string(),
        status,
        failure_open: open,
        failure_any: any,
    })
    .collect();
    let jobs = sqlx::query_as::<_, (String, Option<String>, String)>(
        "SELECT kind, dedupe_key, state FROM delayed_job
         UNION ALL SELECT kind, dedupe_key, state FROM delayed_job_archive",
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|(kind, dedupe_key, state)| Job {
        kind,
        dedupe_key,
        state,
    })
    .collect();
    let outbox = sqlx::query_as::<_, (i64, Uuid, String, DateTime<Utc>)>(
        // CompensationFailed goes to the dead compensations topic, not the order topic the
        // checker reads (its payment is judged by the money rules: an open failure)
        "SELECT id, event_id, aggregate_id, created_at FROM outbox
         WHERE aggregate_type = 'order' AND event_type <> 'CompensationFailed' ORDER BY id",
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|(id, e, aggregate_id, created_at)| OutboxRow {
        id,
        event_id: e.to_string(),
        aggregate_id,
        created_at,
    })
    .collect();
    let ledger = ledger(http, gateway)
        .await?
        .into_iter()
        .map(|p| ProviderPayment {
            payment_id: p.payment_id,
            paid: p.status == "PAID",
            amount_cents: p.amount_cents,
            refunds: p.refunds.iter().map(|r| r.amount_cents).collect(),
        })
        .collect();
    Ok(World {
        skus,
        reservations,
        orders,
        payments,
        ledger,
        jobs,
        outbox,
        ..observed
    })
}

#[derive(serde::Deserialize)]
struct LedgerRefund {
    amount_cents: i64,
}

#[derive(serde::Deserialize)]
pub struct LedgerPayment {
    payment_id: String,
    status: String,
    amount_cents: i64,
    paid_at: Option<DateTime<Utc>>,
    refunds: Vec<LedgerRefund>,
}

#[derive(serde::Deserialize)]
struct LedgerPage {
    payments: Vec<LedgerPayment>,
    next_after: Option<String>,
}

/// The provider's whole ledger, a page at a time.
pub async fn ledger(http: &reqwest::Client, gateway: &str) -> anyhow::Result<Vec<LedgerPayment>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = http
            .get(format!("{gateway}/v1/sim/ledger"))
            .query(&[("limit", "5000")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let page: LedgerPage = req
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .context("the simulator's ledger")?
            .error_for_status()?
            .json()
            .await?;
        out.extend(page.payments);
        match page.next_after {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// Percentiles of a set of durations (milliseconds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

pub fn dist(h: &Histogram<u64>) -> Dist {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Dist::default();
    }
    Dist {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

fn hist_of(values_ms: impl IntoIterator<Item = f64>) -> Histogram<u64> {
    let mut h = histogram();
    for v in values_ms {
        let _ = h.record(((v * 1000.0).max(1.0) as u64).min(600_000_000));
    }
    h
}

/// The server-side figures, from the database and the provider's books.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFigures {
    /// Payments a compensation check queried the provider for.
    pub checked_payments: i64,
    /// ... whose first query failed (a timeout or an error).
    pub first_attempt_failed: f64,
    /// ... resolved within three retries (at most three failures before the answer).
    pub within_3_retries: f64,
    /// ... still failing after five retries (or never resolved).
    pub failing_after_5: f64,
    /// Payments paid at the provider, and the share kept or refunded (an open failure
    /// counts against it: the paper's `compensation_success_rate`).
    pub paid_at_provider: i64,
    pub compensation_success_rate: f64,
    /// "Provider says paid" to `PAID`: every paid payment, those the callback made paid, and
    /// those compensation did.
    pub time_to_paid: Dist,
    pub time_to_paid_by_callback: Dist,
    pub time_to_paid_by_compensation: Dist,
    /// The distribution of time to `PAID` (ms upper bound, count) for the chart.
    pub time_to_paid_buckets: Vec<(f64, u64)>,
    /// A check job's run: due to done.
    pub check_execution: Dist,
    /// The scheduler's follow-ups (expiry, deduction, voucher, notify): due to done, an upper
    /// bound of their fire delay, and the share done within 100 ms of due.
    pub job_due_to_done: Dist,
    pub jobs_on_time: f64,
    pub jobs_done: u64,
    /// Outbox row written to read from Kafka by the checker's consumer (the relay's lag
    /// plus the consumer's: an upper bound).
    pub outbox_lag: Dist,
}

pub async fn server_figures(
    db: &PgPool,
    ledger: &[LedgerPayment],
    world: &World,
    findings: &super::check::Findings,
) -> anyhow::Result<ServerFigures> {
    let mut f = ServerFigures::default();
    // the compensation's checks, from each payment's outcome history
    let histories: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT history FROM payment_check_state")
            .fetch_all(db)
            .await?;
    // the worker's provider failures (compensation_worker::check::provider_failure_label and
    // the refund's and answer's failures)
    let failure = |o: &str| {
        matches!(
            o,
            "gateway_timeout"
                | "gateway_error"
                | "unknown_at_provider"
                | "bad_answer"
                | "refund_gateway_error"
        )
    };
    let (mut first_failed, mut within3, mut after5) = (0i64, 0i64, 0i64);
    for h in &histories {
        let outcomes: Vec<&str> = h
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["outcome"].as_str()).collect())
            .unwrap_or_default();
        // a check that found the callback had already made it paid asked the provider
        // nothing: not a compensation task
        if outcomes.is_empty() || outcomes[0] == "duplicate" {
            continue;
        }
        f.checked_payments += 1;
        if failure(outcomes[0]) {
            first_failed += 1;
        }
        match outcomes.iter().position(|o| !failure(o)) {
            Some(i) if i <= 3 => within3 += 1,
            Some(i) if i > 5 => after5 += 1,
            Some(_) => {}
            None if outcomes.len() > 5 => after5 += 1,
            None => {}
        }
    }
    let share = |n: i64, of: i64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
    f.first_attempt_failed = share(first_failed, f.checked_payments);
    f.within_3_retries = share(within3, f.checked_payments);
    f.failing_after_5 = share(after5, f.checked_payments);

    // time to PAID: the provider's paid_at to the first event that made it paid here
    let made_paid: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT DISTINCT ON (payment_id) payment_id, source, received_at FROM payment_events
         WHERE outcome = 'PAID' ORDER BY payment_id, received_at",
    )
    .fetch_all(db)
    .await?;
    let made: std::collections::HashMap<String, (String, DateTime<Utc>)> = made_paid
        .into_iter()
        .map(|(p, s, at)| (p.to_string(), (s, at)))
        .collect();
    let (mut all, mut cb, mut comp) = (Vec::new(), Vec::new(), Vec::new());
    for p in ledger.iter().filter(|p| p.status == "PAID") {
        f.paid_at_provider += 1;
        let (Some(paid_at), Some((source, at))) = (p.paid_at, made.get(&p.payment_id)) else {
            continue;
        };
        let ms = (*at - paid_at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        all.push(ms);
        if source == "webhook" {
            cb.push(ms)
        } else {
            comp.push(ms)
        }
    }
    let h = hist_of(all.iter().copied());
    f.time_to_paid = dist(&h);
    f.time_to_paid_by_callback = dist(&hist_of(cb));
    f.time_to_paid_by_compensation = dist(&hist_of(comp));
    let mut bound = 1.0f64;
    while bound <= 600_000.0 {
        let next = bound * 2.0;
        let n = all
            .iter()
            .filter(|v| **v > bound / 2.0 && **v <= bound)
            .count() as u64;
        f.time_to_paid_buckets.push((bound, n));
        bound = next;
    }

    // kept or refunded, of those paid at the provider (the checker's money rule counts them)
    let counted = |k: &str| findings.counts.get(k).copied().unwrap_or(0);
    let resolved = counted("payments_kept") + counted("payments_refunded");
    f.compensation_success_rate = share(resolved, f.paid_at_provider);

    let ms_of = |sql: &'static str| async move {
        let v: Vec<f64> = sqlx::query_scalar(sql).fetch_all(db).await?;
        anyhow::Ok(v)
    };
    f.check_execution = dist(&hist_of(
        ms_of(
            "SELECT (extract(epoch FROM finished_at - run_at) * 1000)::float8
             FROM delayed_job_archive WHERE kind = 'payment.check' AND state = 'completed'",
        )
        .await?,
    ));
    let jobs = ms_of(
        "SELECT (extract(epoch FROM finished_at - run_at) * 1000)::float8
         FROM delayed_job_archive WHERE state = 'completed'
           AND kind IN ('order.expire', 'stock.deduct', 'voucher.issue', 'order.notify')",
    )
    .await?;
    f.jobs_done = jobs.len() as u64;
    f.jobs_on_time = if jobs.is_empty() {
        0.0
    } else {
        jobs.iter().filter(|v| **v <= 100.0).count() as f64 / jobs.len() as f64
    };
    f.job_due_to_done = dist(&hist_of(jobs));
    let mut first_seen: std::collections::HashMap<&str, DateTime<Utc>> =
        std::collections::HashMap::new();
    for s in &world.seen {
        first_seen.entry(s.event_id.as_str()).or_insert(s.seen_at);
    }
    f.outbox_lag = dist(&hist_of(world.outbox.iter().filter_map(|row| {
        first_seen
            .get(row.event_id.as_str())
            .map(|at| (*at - row.created_at).num_microseconds().unwrap_or(0) as f64 / 1000.0)
    })));
    Ok(f)
}

/// Whether the run has settled: nothing due is waiting, no order is past its expiry, no
/// refund or publication is outstanding (the checker judges a settled system).
pub async fn unsettled(db: &PgPool) -> anyhow::Result<Vec<String>> {
    let (due, expired_pending, refunding, unpublished, paid): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT
               (SELECT count(*) FROM delayed_job WHERE state IN ('scheduled', 'running')
                  AND run_at < now() - interval '2 seconds'),
               (SELECT count(*) FROM orders WHERE state = 'PENDING'
                  AND expires_at < now() - interval '2 seconds'),
               (SELECT count(*) FROM orders WHERE state = 'REFUND_PENDING'),
               (SELECT count(*) FROM outbox_unpublished),
               (SELECT count(*) FROM orders WHERE state = 'PAID')",
        )
        .fetch_one(db)
        .await?;
    let mut out = Vec::new();
    for (n, what) in [
        (due, "jobs overdue"),
        (expired_pending, "pending orders past their expiry"),
        (refunding, "refunds pending"),
        (unpublished, "events unpublished"),
        (paid, "paid orders not yet confirmed"),
    ] {
        if n > 0 {
            out.push(format!("{n} {what}"));
        }
    }
    Ok(out)
}
