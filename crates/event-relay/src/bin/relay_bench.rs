//! The relay's benchmark (`scripts/bench.sh events`), on the local Postgres and Kafka API in
//! one run:
//! 1. `--events` outbox rows (orders of 4 events each) are written to a fresh database;
//! 2. the baseline: a bare rdkafka producer, configured as the relay's (idempotent), sends the
//!    same messages (same bodies, keys and headers) to a topic of its own, once all enqueued at
//!    once and once in the relay's window; the faster counts; events/s from the first send to
//!    the last acknowledgement;
//! 3. the relay publishes the same rows to another topic as it does in production (pipelined
//!    rounds of `RELAY_BATCH`, each acknowledged event stamped); events/s;
//! 4. outbox lag under load: `--writers` connections insert outbox rows (one per
//!    transaction, as an order's creation does) as fast as they can for `--secs` seconds
//!    while the relay runs; the age of the oldest unpublished row is sampled every 100 ms.
//!
//! Prints the figures and the ratio of the relay to the bare producer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_relay::{App, Config, OutboxMessage, SELECT_MESSAGES};
use futures_util::future::join_all;
use postgres_store::PgLimits;
use rdkafka::producer::FutureRecord;
use serde_json::json;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} wants a number"))
        })
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = arg("--events", 100_000) as i64;
    let writers = arg("--writers", 8) as usize;
    let secs = arg("--secs", 20);
    let database_url = std::env::var("DATABASE_URL")?;
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        database_url,
        pg: PgLimits::from_env(16, service_kit::config::env_or)?,
        run_migrations: true,
        brokers: brokers.clone(),
        order_topic: format!("bench.relay.{tag}"),
        dead_topic: format!("bench.dead.{tag}"),
        partitions: 6,
        relay: true,
        batch: service_kit::config::env_or("RELAY_BATCH", 1000)?,
        poll: Duration::from_millis(20),
        delivery_timeout: Duration::from_secs(30),
        consumer: false,
        group: format!("bench-{tag}"),
    };
    let bare_topic = format!("bench.bare.{tag}");
    event_relay::ensure_topics(
        &brokers,
        &[&config.order_topic, &config.dead_topic, &bare_topic],
        6,
    )
    .await?;
    let app = App::build(config).await?;
    let pool = app.store.pool.clone();

    // warm-up: the relay's producer fetches its id and the topics' metadata on its first
    // send; neither figure below should include that
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, schema_version, payload)
         VALUES (gen_random_uuid(), 'order', 'warm-up', 'OrderCreated', 1, '{}')",
    )
    .execute(&pool)
    .await?;
    anyhow::ensure!(app.relay_once().await? == 1, "warm-up event not published");

    eprintln!("== writing {events} outbox rows");
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, schema_version, payload)
         SELECT gen_random_uuid(), 'order', md5((n / 4)::text)::uuid::text,
                (ARRAY['OrderCreated', 'OrderPaid', 'StockDeducted', 'OrderConfirmed'])[n % 4 + 1], 1,
                jsonb_build_object('order_id', md5((n / 4)::text)::uuid, 'user_id', 'user-' || n / 4,
                    'sku_id', 'sku-bench', 'store_id', 'bar-' || n % 50, 'quantity', 2,
                    'amount_cents', 19800)
         FROM generate_series(0, $1 - 1) n",
    )
    .bind(events)
    .execute(&pool)
    .await?;
    // a production outbox has statistics (autovacuum); a table filled a moment ago has none yet
    sqlx::query("ANALYZE outbox").execute(&pool).await?;
    // where the relay's time goes, measured apart: reading the rows, building their messages
    // (body and headers)
    let t = Instant::now();
    let rows: Vec<OutboxMessage> = sqlx::query_as(SELECT_MESSAGES)
        .bind(0i64)
        .bind(events)
        .fetch_all(&pool)
        .await?;
    let read_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let messages: Vec<_> = rows
        .iter()
        .map(|r| (r.aggregate_id.clone(), (r.body(), r.headers())))
        .collect();
    let build_secs = t.elapsed().as_secs_f64();

    // The baseline is the better of two ways to drive a bare producer: everything enqueued at
    // once, and the relay's own window (batches of RELAY_BATCH, PIPELINE_DEPTH in flight).
    let producer = event_relay::producer(&brokers, Duration::from_secs(30))?;
    bare(&producer, &bare_topic, &messages[..1], 1, 1).await?; // warm-up, as the relay's
    eprintln!("== bare producer, all at once: the same {events} messages");
    let all_secs = bare(
        &producer,
        &bare_topic,
        &messages,
        messages.len(),
        usize::MAX,
    )
    .await?;
    eprintln!("== bare producer, the relay's window: the same {events} messages");
    let cpu = MachineCpu::now();
    let window_secs = bare(
        &producer,
        &bare_topic,
        &messages,
        app.config.batch as usize,
        event_relay::PIPELINE_DEPTH,
    )
    .await?;
    let window_cores = cpu.cores_busy();
    let bare_secs = all_secs.min(window_secs);
    let bare_rate = events as f64 / bare_secs;

    eprintln!("== relay: the same {events} rows, stamped");
    let started = Instant::now();
    let cpu = MachineCpu::now();
    let mut published = 0;
    while published < events as usize {
        published += app.relay_once().await?;
    }
    let relay_secs = started.elapsed().as_secs_f64();
    let relay_cores = cpu.cores_busy();
    let relay_rate = events as f64 / relay_secs;

    eprintln!("== outbox lag: {writers} writers at full speed for {secs} s, the relay running");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (pool, stop, written) = (pool.clone(), stop.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let order = uuid::Uuid::new_v4();
                let r = sqlx::query(
                    "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, schema_version, payload)
                     VALUES (gen_random_uuid(), 'order', $1, 'OrderCreated', 1, $2)",
                )
                .bind(order.to_string())
                .bind(json!({"order_id": order, "user_id": format!("w{w}-{n}"), "sku_id": "sku-bench", "store_id": "bar-1", "quantity": 1, "amount_cents": 9900}))
                .execute(&pool)
                .await;
                if r.is_ok() {
                    n += 1;
                    written.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let relay = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match app.relay_once().await {
                    Ok(0) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Ok(_) => {}
                    Err(e) => eprintln!("relay round failed: {e}"),
                }
            }
        })
    };
    let mut lags = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        let lag: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM clock_timestamp() - created_at)::float8 * 1000 FROM outbox
             WHERE published_at IS NULL ORDER BY id LIMIT 1",
        )
        .fetch_optional(&pool)
        .await?;
        lags.push(lag.unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let _ = relay.await;
    let insert_rate = written.load(Ordering::Relaxed) as f64 / secs as f64;
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len()) - 1];

    println!("relay benchmark ({events} events, 6 partitions, local Kafka API at {brokers})");
    println!(
        "  bare rdkafka producer : {bare_rate:>10.0} events/s ({bare_secs:.2} s; all at once {all_secs:.2} s, in the relay's window {window_secs:.2} s)"
    );
    println!("  relay (read, send, stamp): {relay_rate:>7.0} events/s ({relay_secs:.2} s)");
    println!(
        "  relay / bare producer : {:>10.2}x (goal >= 0.8x)",
        relay_rate / bare_rate
    );
    println!(
        "  machine CPU busy meanwhile (all processes: broker, Postgres, this one), of {} cores: bare producer in the window {window_cores:.2}, relay {relay_cores:.2}",
        MachineCpu::cores()
    );
    println!(
        "  apart: reading the {events} rows {read_secs:.2} s, building their messages {build_secs:.2} s (the bare producer's time includes neither; the relay overlaps them with Kafka's acknowledgements)"
    );
    println!(
        "  outbox lag with {writers} writers inserting {insert_rate:.0} events/s: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} samples)",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        lags.len()
    );
    Ok(())
}

/// Sends `messages` on a bare producer, `batch` at a time with at most `depth` batches
/// waiting for acknowledgements; the seconds from the first send to the last acknowledgement.
async fn bare(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    messages: &[(String, (Vec<u8>, rdkafka::message::OwnedHeaders))],
    batch: usize,
    depth: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    let mut acked = 0;
    for chunk in messages.chunks(batch) {
        let mut deliveries = Vec::with_capacity(chunk.len());
        for (key, (body, headers)) in chunk {
            let mut record = FutureRecord::to(topic)
                .key(key)
                .payload(body)
                .headers(headers.clone());
            loop {
                match producer.send_result(record) {
                    Ok(d) => break deliveries.push(d),
                    // the local queue is full: let it drain a little
                    Err((_, r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        in_flight.push_back(join_all(deliveries));
        while in_flight.len() >= depth {
            let done = in_flight.pop_front().expect("in flight").await;
            acked += done.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        }
    }
    for done in in_flight {
        acked += done.await.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    }
    anyhow::ensure!(
        acked == messages.len(),
        "bare producer: {acked} of {} acknowledged",
        messages.len()
    );
    Ok(started.elapsed().as_secs_f64())
}

/// The machine's CPU time from `/proc/stat` (Linux), to show how busy every process together
/// kept the cores during a phase.
struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    fn now() -> MachineCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        let total: u64 = ticks.iter().take(8).sum();
        MachineCpu {
            busy: total - idle,
            total,
        }
    }

    fn cores() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Cores kept busy on average since `self` (0 to [`Self::cores`]).
    fn cores_busy(&self) -> f64 {
        let now = MachineCpu::now();
        let total = (now.total - self.total).max(1) as f64;
        (now.busy - self.busy) as f64 / total * Self::cores() as f64
    }
}
