//! The relay's benchmark (`scripts/bench.sh events`), on the local Postgres and Kafka API in
//! one run:
//! 1. `--events` outbox rows (orders of 4 events each) are written to a fresh database;
//! 2. the baseline: a bare rdkafka producer, configured as the relay's (idempotent), sends the
//!    same messages (same bodies, keys and headers) to a topic of its own, once all enqueued at
//!    once and once in the relay's window; the faster counts; events/s from the first send to
//!    the last acknowledgement;
//! 3. the relay publishes the same rows to another topic as it does in production (pipelined
//!    rounds of `RELAY_BATCH`, the position recorded as each round is acknowledged), from its
//!    position before them; events/s;
//! 4. steps 2 and 3 alternate `--repeat` times (the relay last in odd runs, first in even
//!    ones), and each side's median is compared: a shared machine's other load falls on both
//!    alike;
//! 5. outbox lag under load: `--writers` connections insert outbox rows (one per
//!    transaction, as an order's creation does) as fast as they can for `--secs` seconds
//!    while the relay runs; the age of the oldest unpublished row is sampled every 100 ms.
//!
//! Prints the figures and the ratio of the relay to the bare producer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_relay::{App, Batch, Config};
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
    let events = arg("--events", 200_000) as i64;
    let writers = arg("--writers", 8) as usize;
    let secs = arg("--secs", 20);
    let repeat = arg("--repeat", 7).max(1) as usize;
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
        batch: service_kit::config::env_or("RELAY_BATCH", 5000)?,
        poll: Duration::from_millis(20),
        delivery_timeout: Duration::from_secs(30),
        consumer: false,
        group: format!("bench-{tag}"),
        leader_lease: Duration::from_secs(5),
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
                json_build_object('order_id', md5((n / 4)::text)::uuid, 'user_id', 'user-' || n / 4,
                    'sku_id', 'sku-bench', 'store_id', 'bar-' || n % 50, 'quantity', 2,
                    'amount_cents', 19800)
         FROM generate_series(0, $1 - 1) n",
    )
    .bind(events)
    .execute(&pool)
    .await?;
    // a production outbox has statistics (autovacuum); a table filled a moment ago has none yet
    sqlx::query("ANALYZE outbox").execute(&pool).await?;
    // what the relay does besides sending, measured apart: reading the rows and making them
    // messages (bodies, keys, headers), in one pass as the relay's reader does
    let t = Instant::now();
    let (messages, _) = event_relay::read_messages(&pool, 0, events).await?;
    let read_secs = t.elapsed().as_secs_f64();

    // The baseline is the better of two ways to drive a bare producer: everything enqueued at
    // once, and the relay's own window (batches of RELAY_BATCH, PIPELINE_DEPTH in flight).
    // Runs alternate (`--repeat` times) so that the machine's other load falls on both alike,
    // and each side's median is compared.
    let producer = event_relay::producer(&brokers, Duration::from_secs(30))?;
    bare(&producer, &bare_topic, &messages, 1, 1, 1).await?; // warm-up, as the relay's
    let start = event_relay::load_position(&pool).await?.through;
    let mut runs = Vec::new();
    for run in 1..=repeat {
        // the relay goes last in odd runs and first in even ones: whatever the machine does
        // over a run falls on each side alike
        let relay_first = run % 2 == 0;
        eprintln!(
            "== run {run}/{repeat}: {}",
            if relay_first {
                "the relay, then the bare producer all at once and in the relay's window"
            } else {
                "the bare producer all at once and in the relay's window, then the relay"
            }
        );
        let mut relay = (0.0, 0.0);
        if relay_first {
            relay = relay_run(&app, &pool, start, events).await?;
        }
        let all_secs = bare(
            &producer,
            &bare_topic,
            &messages,
            messages.len(),
            messages.len(),
            usize::MAX,
        )
        .await?;
        let cpu = MachineCpu::now();
        let window_secs = bare(
            &producer,
            &bare_topic,
            &messages,
            messages.len(),
            app.config.batch as usize,
            event_relay::PIPELINE_DEPTH,
        )
        .await?;
        let window_cores = cpu.cores_busy();
        if !relay_first {
            relay = relay_run(&app, &pool, start, events).await?;
        }
        let (relay_secs, relay_cores) = relay;
        eprintln!(
            "   bare all at once {all_secs:.3} s, in the window {window_secs:.3} s; relay {relay_secs:.3} s"
        );
        runs.push(Run {
            all_secs,
            window_secs,
            relay_secs,
            window_cores,
            relay_cores,
        });
    }
    // each side's median (a median against the better of two would favour the bare producer
    // by the machine's noise alone), the bare producer's the better of its two ways
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (all_secs, all_min, all_max) = median(|r| r.all_secs);
    let (window_secs, window_min, window_max) = median(|r| r.window_secs);
    let (relay_secs, relay_min, relay_max) = median(|r| r.relay_secs);
    let bare_secs = all_secs.min(window_secs);
    let ratio = bare_secs / relay_secs;
    let (window_cores, _, _) = median(|r| r.window_cores);
    let (relay_cores, _, _) = median(|r| r.relay_cores);

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
                     VALUES (gen_random_uuid(), 'order', $1, 'OrderCreated', 1, $2::json)",
                )
                .bind(order.to_string())
                .bind(json!({"order_id": order, "user_id": format!("w{w}-{n}"), "sku_id": "sku-bench", "store_id": "bar-1", "quantity": 1, "amount_cents": 9900}).to_string())
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
        let lag: Option<f64> = sqlx::query_scalar(postgres_store::effects::OLDEST_UNPUBLISHED)
            .fetch_optional(&pool)
            .await?;
        lags.push(lag.unwrap_or(0.0).max(0.0) * 1000.0);
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

    println!(
        "relay benchmark ({events} events, 6 partitions, local Kafka API at {brokers}; medians of {repeat} interleaved runs, fastest to slowest in brackets)"
    );
    println!(
        "  bare rdkafka producer, all at once      : {:>7.0} events/s ({all_secs:.3} s [{all_min:.3} to {all_max:.3}])",
        events as f64 / all_secs
    );
    println!(
        "  bare rdkafka producer, the relay's window: {:>7.0} events/s ({window_secs:.3} s [{window_min:.3} to {window_max:.3}])",
        events as f64 / window_secs
    );
    println!(
        "  relay (read, send, record its position) : {:>7.0} events/s ({relay_secs:.3} s [{relay_min:.3} to {relay_max:.3}])",
        events as f64 / relay_secs
    );
    println!("  relay / the faster bare producer        : {ratio:>7.2}x (goal >= 0.8x)");
    println!(
        "  machine CPU busy meanwhile (all processes: broker, Postgres, this one), of {} cores: bare producer in the window {window_cores:.2}, relay {relay_cores:.2}",
        MachineCpu::cores()
    );
    println!(
        "  apart: reading the {events} rows and making their messages {read_secs:.2} s (the bare producer's time does not include it; the relay overlaps it with Kafka's acknowledgements)"
    );
    println!(
        "  outbox lag with {writers} writers inserting {insert_rate:.0} events/s: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} samples)",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        lags.len()
    );
    // the local broker keeps what it is sent in memory: give the bench's messages back
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
    let topics = [
        bare_topic.as_str(),
        app.config.order_topic.as_str(),
        app.config.dead_topic.as_str(),
    ];
    if let Err(e) = admin
        .delete_topics(&topics, &rdkafka::admin::AdminOptions::new())
        .await
    {
        eprintln!("the bench topics were not deleted: {e}");
    }
    Ok(())
}

/// One interleaved run: the bare producer both ways and the relay.
struct Run {
    all_secs: f64,
    window_secs: f64,
    relay_secs: f64,
    window_cores: f64,
    relay_cores: f64,
}

/// The relay publishing the `events` rows past `start` again, as in production: its seconds,
/// and the machine's cores kept busy meanwhile.
async fn relay_run(
    app: &App,
    pool: &sqlx::PgPool,
    start: i64,
    events: i64,
) -> anyhow::Result<(f64, f64)> {
    sqlx::query(
        "UPDATE outbox_relay SET published_through = $1, gap_lo = '{}', gap_hi = '{}',
             gap_horizon = '{}'",
    )
    .bind(start)
    .execute(pool)
    .await?;
    let started = Instant::now();
    let cpu = MachineCpu::now();
    let mut published = 0;
    while published < events as usize {
        published += app.relay_once().await?;
    }
    Ok((started.elapsed().as_secs_f64(), cpu.cores_busy()))
}

/// Sends the first `count` of `messages` on a bare producer, `batch` at a time with at most
/// `depth` batches waiting for acknowledgements; the seconds from the first send to the last
/// acknowledgement.
async fn bare(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    messages: &Batch,
    count: usize,
    batch: usize,
    depth: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    let mut acked = 0;
    for chunk in messages.messages[..count].chunks(batch) {
        let mut deliveries = Vec::with_capacity(chunk.len());
        for m in chunk {
            let (key, body) = messages.key_and_body(m);
            let mut record = FutureRecord::to(topic)
                .key(key)
                .payload(body)
                .headers(m.headers.clone());
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
        in_flight.push_back(deliveries);
        while in_flight.len() >= depth {
            acked += acknowledged(in_flight.pop_front().expect("in flight")).await;
        }
    }
    for done in in_flight {
        acked += acknowledged(done).await;
    }
    anyhow::ensure!(
        acked == count,
        "bare producer: {acked} of {count} acknowledged"
    );
    Ok(started.elapsed().as_secs_f64())
}

/// How many of a batch's messages Kafka acknowledged, waiting on each in order as the relay
/// does.
async fn acknowledged(deliveries: Vec<rdkafka::producer::DeliveryFuture>) -> usize {
    let mut n = 0;
    for d in deliveries {
        n += matches!(d.await, Ok(Ok(_))) as usize;
    }
    n
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
