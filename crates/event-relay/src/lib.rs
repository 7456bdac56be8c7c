//! event-relay: the outbox to Kafka, and the bar-dashboard projection back from it.
//!
//! **Relay.** One relay leads at a time (a Postgres advisory lock on a connection of its own;
//! any number may run, the others wait to take over). It reads unpublished outbox rows
//! (`published_at IS NULL`, in id order; each payload's JSON text goes into the envelope unparsed),
//! hands them to an idempotent producer in that order, keyed by the aggregate (the order id),
//! and stamps what Kafka acknowledged. Rounds are pipelined: the next batch is read and
//! enqueued while Kafka acknowledges up to three earlier ones, and tasks of their own stamp.
//! `CompensationFailed` goes to the dead compensations topic, everything else to the order
//! events topic.
//! - No cursor kept, so no skipped rows: each burst of rounds starts from the oldest
//!   unpublished row, so a row whose transaction commits after rows with higher ids (the
//!   classic outbox pitfall with sequence ids) is simply unpublished until then, and a later
//!   burst takes it. One order's rows are written by transactions serialised on the order row,
//!   so they commit in id order, and are sent in id order, to one partition.
//! - Kafka down: nothing is stamped, the outbox grows, the relay backs off and retries; the
//!   order path never talks to Kafka. A relay that dies after Kafka acknowledged a batch but
//!   before stamping it sends the batch again: a duplicate, harmless to consumers (the event
//!   id travels in the `event_id` header and the body; consumers keep an inbox).
//!
//! **Projection** (`CONSUMER_ENABLED`): a consumer in group `CONSUMER_GROUP` applies order
//! events to `bar_dashboard` (per store: created, paid, confirmed, ... and money kept). Each
//! event's inbox row and its effect commit together (the events that have arrived, up to 500,
//! share one transaction); the offsets are committed after, so a crash in between redelivers
//! events whose inbox rows say they were applied.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures_util::future::join_all;
use futures_util::FutureExt;
use job_engine::leader::Leadership;
use postgres_store::{PgLimits, PgStore};
use prometheus::IntCounterVec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;
use serde_json::Value;
use service_kit::config::{env_millis, env_or, env_string};
use service_kit::telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// Key of the relay leader's advisory lock ("outbox_r").
const RELAY_LOCK: i64 = 0x6f75_7462_6f78_5f72;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub pg: PgLimits,
    pub run_migrations: bool,
    pub brokers: String,
    pub order_topic: String,
    pub dead_topic: String,
    /// Partitions of the topics when the relay creates them.
    pub partitions: i32,
    pub relay: bool,
    pub batch: i64,
    /// Wait between rounds that found nothing.
    pub poll: Duration,
    /// How long Kafka may take to acknowledge a message before the batch is retried.
    pub delivery_timeout: Duration,
    pub consumer: bool,
    pub group: String,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        let c = Config {
            database_url: env_string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/bar_fulfillment",
            ),
            pg: PgLimits::from_env(8, env_or)?,
            run_migrations: env_or("RUN_MIGRATIONS", true)?,
            brokers: env_string("KAFKA_BROKERS", "127.0.0.1:9092"),
            order_topic: env_string("ORDER_EVENTS_TOPIC", "bar.order.events.v1"),
            dead_topic: env_string("DEAD_COMPENSATION_TOPIC", "bar.compensation.dead.v1"),
            partitions: env_or("KAFKA_TOPIC_PARTITIONS", 6)?,
            relay: env_or("RELAY_ENABLED", true)?,
            batch: env_or("RELAY_BATCH", 1000)?,
            poll: env_millis("RELAY_POLL_MS", 100)?,
            delivery_timeout: env_millis("RELAY_DELIVERY_TIMEOUT_MS", 10_000)?,
            consumer: env_or("CONSUMER_ENABLED", true)?,
            group: env_string("CONSUMER_GROUP", "bar-dashboard"),
        };
        if !(1..=100_000).contains(&c.batch) {
            anyhow::bail!("RELAY_BATCH must be 1 to 100000");
        }
        if !(1..=1000).contains(&c.partitions) {
            anyhow::bail!("KAFKA_TOPIC_PARTITIONS must be 1 to 1000");
        }
        Ok(c)
    }
}

struct RelayMetrics {
    published: IntCounterVec,
    errors: IntCounterVec,
    leader: prometheus::IntGauge,
    consumed: IntCounterVec,
    consumer_lag: prometheus::IntGaugeVec,
}

pub struct App {
    pub config: Config,
    pub store: PgStore,
    pub metrics: Metrics,
    /// Replaced after a fatal producer error (an idempotent producer whose state the broker
    /// lost, e.g. a broker that came back empty): a new one starts a new producer id.
    producer: std::sync::RwLock<FutureProducer>,
    m: RelayMetrics,
}

/// One unpublished outbox row, as read for publishing: the payload stays the JSON text
/// Postgres holds, never parsed, and goes into the envelope as it is.
#[derive(sqlx::FromRow)]
pub struct OutboxMessage {
    pub id: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub schema_version: i32,
    pub traceparent: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The payload's JSON text.
    pub payload: String,
}

/// Reads up to `limit` unpublished rows with ids above `after`, oldest first.
pub const SELECT_MESSAGES: &str = "SELECT id, event_id, aggregate_type, aggregate_id, event_type,
        schema_version, traceparent, created_at, payload::text AS payload
    FROM outbox WHERE published_at IS NULL AND id > $1 ORDER BY id LIMIT $2";

/// Events the projection applies in one transaction at most (whatever has arrived).
const CONSUMER_BATCH: usize = 500;

/// Rounds a relay keeps in flight at once (each of `RELAY_BATCH` events): the next round is
/// read and enqueued while Kafka acknowledges the earlier ones.
pub const PIPELINE_DEPTH: usize = 4;

/// Tasks (each with a connection) stamping what Kafka acknowledged: an `UPDATE` of a row
/// costs Postgres more than reading it (a new row version, an index entry), and one stamper
/// falls behind the producer at full speed.
const STAMPERS: usize = 2;

/// How long one pipelined burst runs before the relay checks its leadership again and reads
/// from the oldest unpublished row (no cursor) once more.
const BURST: Duration = Duration::from_secs(1);

/// The producer every relay uses: idempotent (no duplicates or reordering from its own
/// retries, acks from all in-sync replicas), so one order's events stay in order.
pub fn producer(brokers: &str, delivery_timeout: Duration) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        )
        .create()?)
}

/// Creates the topics if they are missing (an existing topic is left as it is).
pub async fn ensure_topics(brokers: &str, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(5)))
        .operation_timeout(Some(Duration::from_secs(5)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => anyhow::bail!("creating topic {topic}: {e}"),
        }
    }
    Ok(())
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<Arc<App>> {
        let store = PgStore::connect_patiently(&config.database_url, &config.pg).await?;
        if config.run_migrations {
            store.migrate().await?;
        }
        let metrics = Metrics::new("event-relay");
        store.export_outbox_lag(&metrics);
        let leader = prometheus::IntGauge::new(
            "relay_leader",
            "1 while this relay leads (publishes); the others wait",
        )?;
        metrics.register(Box::new(leader.clone()));
        let m = RelayMetrics {
            published: metrics.counter(
                "relay_published_total",
                "Outbox events Kafka acknowledged, by topic",
                &["topic"],
            ),
            errors: metrics.counter(
                "relay_errors_total",
                "Relay rounds that failed, by what failed: kafka, postgres",
                &["what"],
            ),
            leader,
            consumer_lag: metrics.gauge(
                "consumer_lag_messages",
                "Messages on the order events topic the projection has not consumed yet, by partition it holds",
                &["partition"],
            ),
            consumed: metrics.counter(
                "consumer_events_total",
                "Events the projection consumer handled: applied, duplicate, undecodable",
                &["outcome"],
            ),
        };
        let producer = producer(&config.brokers, config.delivery_timeout)?;
        Ok(Arc::new(App {
            config,
            store,
            metrics,
            producer: std::sync::RwLock::new(producer),
            m,
        }))
    }

    /// `/healthz`, `/readyz` (Postgres answers), `/metrics`.
    pub fn router(self: &Arc<App>) -> Router {
        let ready = service_kit::http::ready_check(self.store.ready_probe());
        service_kit::http::finish(Router::new(), self.metrics.clone(), ready)
    }

    /// The relay and the projection, until `stop`.
    pub async fn run(self: Arc<App>, stop: CancellationToken) {
        let topics = [
            self.config.order_topic.as_str(),
            self.config.dead_topic.as_str(),
        ];
        // Kafka may come up after us: keep trying, the outbox waits meanwhile
        let mut wait = Duration::from_millis(500);
        while let Err(e) =
            ensure_topics(&self.config.brokers, &topics, self.config.partitions).await
        {
            tracing::warn!(error = %e, "Kafka topics not ready; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        let relay = self
            .config
            .relay
            .then(|| tokio::spawn(self.clone().relay(stop.clone())));
        let consumer = self
            .config
            .consumer
            .then(|| tokio::spawn(self.clone().consume(stop.clone())));
        for task in [relay, consumer].into_iter().flatten() {
            let _ = task.await;
        }
    }

    async fn relay(self: Arc<App>, stop: CancellationToken) {
        let mut leadership =
            Leadership::with_key(self.store.pool.clone(), RELAY_LOCK, "outbox relay");
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let leads = leadership.ensure().await;
            self.m.leader.set(leads as i64);
            let pause = if !leads {
                Duration::from_secs(1)
            } else {
                match self.relay_once().await {
                    Ok(n) => {
                        backoff = Duration::from_millis(100);
                        if n > 0 {
                            continue;
                        }
                        self.config.poll
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "relay round failed; the outbox keeps the events");
                        // a broker that came back empty (or a new cluster) lacks the topics
                        let topics = [
                            self.config.order_topic.as_str(),
                            self.config.dead_topic.as_str(),
                        ];
                        if let Err(e) =
                            ensure_topics(&self.config.brokers, &topics, self.config.partitions)
                                .await
                        {
                            tracing::debug!(error = %e, "topics not checked");
                        }
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        wait
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.m.leader.set(0);
        leadership.resign().await;
    }

    /// One burst of pipelined rounds. Each round reads the next `RELAY_BATCH` unpublished
    /// rows and enqueues them in id order on the idempotent producer; up to
    /// [`PIPELINE_DEPTH`] rounds wait for Kafka's acknowledgements at once, and [`STAMPERS`]
    /// tasks of their own stamp what Kafka acknowledged. The burst ends when it has caught up (a short read),
    /// after [`BURST`], or at the first failure, and always with nothing in flight.
    ///
    /// Within a burst, rounds read above the last id read: that skips rows whose transactions
    /// had not committed yet, never loses them. The next burst reads from the oldest
    /// unpublished row again (no cursor), so a late row goes out at most a burst later, and
    /// never ahead of a row of its order: an order's rows are written by transactions
    /// serialised on the order row, so a row that commits late has no later sibling out yet.
    ///
    /// Returns how many events Kafka acknowledged; an error if Postgres failed or Kafka
    /// refused any (what was acknowledged is stamped first).
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        let producer = self
            .producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (stamp_tx, stampers): (Vec<_>, Vec<_>) = (0..STAMPERS)
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (tx, tokio::spawn(stamp(self.store.pool.clone(), rx)))
            })
            .unzip();
        // the next batch is read while this one is sent and earlier ones are acknowledged
        let (batch_tx, mut batches) = tokio::sync::mpsc::channel(2);
        let reader = tokio::spawn(read_batches(
            self.store.pool.clone(),
            self.config.batch,
            BURST,
            batch_tx,
        ));
        let mut in_flight = std::collections::VecDeque::new();
        let mut round = Round::default();
        while let Some(rows) = batches.recv().await {
            let mut sent = Vec::with_capacity(rows.len());
            for row in rows {
                let mut record = FutureRecord::to(self.topic(row.dead))
                    .key(&row.key)
                    .payload(&row.body)
                    .headers(row.headers);
                // enqueued in this order, synchronously: one key's events keep their order
                let delivery = loop {
                    match producer.send_result(record) {
                        Ok(delivery) => break Some(delivery),
                        // the producer's local queue is full: wait for the oldest round
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            match in_flight.pop_front() {
                                Some((meta, acks)) => {
                                    round.settle(self, &stamp_tx, meta, acks.await)
                                }
                                None => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                        }
                        Err((e, _)) => {
                            round.refused = Some(e.to_string());
                            break None;
                        }
                    }
                };
                match delivery {
                    Some(d) => sent.push(((row.id, row.dead), d)),
                    None => break,
                }
            }
            if !sent.is_empty() {
                let (meta, deliveries): (Vec<_>, Vec<_>) = sent.into_iter().unzip();
                in_flight.push_back((meta, join_all(deliveries)));
            }
            while in_flight.len() >= PIPELINE_DEPTH {
                let (meta, acks) = in_flight.pop_front().expect("in flight");
                round.settle(self, &stamp_tx, meta, acks.await);
            }
            if round.failed() {
                break;
            }
        }
        drop(batches); // a reader still going stops at its next batch
        let read_error = reader
            .await
            .unwrap_or_else(|e| Err(sqlx::Error::Protocol(e.to_string())))
            .err();
        // nothing stays in flight past a burst: a failure retries from what was stamped
        while let Some((meta, acks)) = in_flight.pop_front() {
            round.settle(self, &stamp_tx, meta, acks.await);
        }
        drop(stamp_tx);
        let mut stamped = Ok(());
        for stamper in stampers {
            let r = stamper
                .await
                .unwrap_or_else(|e| Err(sqlx::Error::Protocol(e.to_string())));
            stamped = stamped.and(r);
        }
        if let Err(e) = stamped.and(read_error.map_or(Ok(()), Err)) {
            self.m.errors.with_label_values(&["postgres"]).inc();
            return Err(e.into());
        }
        if round.failed() {
            self.m.errors.with_label_values(&["kafka"]).inc();
            // Nothing is in flight now (every delivery has been reported). A producer whose
            // state the broker no longer knows (a broker that came back empty answers
            // UNKNOWN_PRODUCER_ID) fails every message from then on, fatally or not: start a
            // new one, with a new producer id.
            if let Some((code, reason)) = producer.client().fatal_error() {
                tracing::warn!(?code, %reason, "producer failed fatally");
            }
            let fresh = crate::producer(&self.config.brokers, self.config.delivery_timeout)?;
            *self.producer.write().unwrap_or_else(|p| p.into_inner()) = fresh;
            anyhow::bail!(
                "Kafka acknowledged {} events, failed {} (first: {}){}",
                round.acked,
                round.failed,
                round.first_error.unwrap_or_default(),
                round
                    .refused
                    .map(|e| format!("; queue refused: {e}"))
                    .unwrap_or_default()
            );
        }
        Ok(round.acked)
    }

    /// The dead compensations topic for `CompensationFailed`, the order events topic for the
    /// rest.
    fn topic(&self, dead: bool) -> &str {
        if dead {
            &self.config.dead_topic
        } else {
            &self.config.order_topic
        }
    }

    async fn consume(self: Arc<App>, stop: CancellationToken) {
        let consumer: StreamConsumer = match ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", &self.config.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // a consumer that died gives its partitions up within seconds
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            // do not sit on a fetch waiting for more: events are few and small
            .set("fetch.wait.max.ms", "50")
            .create()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "projection consumer not created");
                return;
            }
        };
        if let Err(e) = consumer.subscribe(&[&self.config.order_topic]) {
            tracing::error!(error = %e, "projection consumer cannot subscribe");
            return;
        }
        let mut lag_checked = std::time::Instant::now();
        loop {
            if lag_checked.elapsed() >= Duration::from_secs(5) {
                lag_checked = std::time::Instant::now();
                self.record_consumer_lag(&consumer);
            }
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                m = consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // what else has arrived joins this transaction: one commit for many events
            let mut msgs = vec![msg];
            while msgs.len() < CONSUMER_BATCH {
                match consumer.recv().now_or_never() {
                    Some(Ok(m)) => msgs.push(m),
                    _ => break,
                }
            }
            // applied (or known undecodable) before the offsets move past them
            let outcomes = loop {
                match project_batch(&self.store.pool, &self.config.group, &msgs).await {
                    Ok(o) => break o,
                    Err(e) => {
                        tracing::warn!(error = %e, events = msgs.len(), "projection failed; retrying the events");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
            };
            for outcome in outcomes {
                self.m.consumed.with_label_values(&[outcome]).inc();
            }
            let mut offsets = rdkafka::TopicPartitionList::new();
            for m in &msgs {
                // messages come in offset order per partition: the last one's wins
                let next = rdkafka::Offset::Offset(m.offset() + 1);
                if let Err(e) = offsets.add_partition_offset(m.topic(), m.partition(), next) {
                    tracing::warn!(error = %e, "offset not recorded");
                }
            }
            if let Err(e) = consumer.commit(&offsets, CommitMode::Async) {
                tracing::warn!(error = %e, "offsets not committed; the events may come again (the inbox absorbs them)");
            }
        }
        let _ = consumer.commit_consumer_state(CommitMode::Sync);
    }
}

/// What a burst's rounds came to.
#[derive(Default)]
struct Round {
    rounds: usize,
    acked: usize,
    failed: usize,
    first_error: Option<String>,
    refused: Option<String>,
}

type Acks = Vec<<rdkafka::producer::DeliveryFuture as std::future::Future>::Output>;

impl Round {
    fn failed(&self) -> bool {
        self.failed > 0 || self.refused.is_some()
    }

    /// Counts a round's acknowledgements and hands the acknowledged ids to the stamper.
    fn settle(
        &mut self,
        app: &App,
        stamp: &[tokio::sync::mpsc::UnboundedSender<Vec<i64>>],
        meta: Vec<(i64, bool)>,
        acks: Acks,
    ) {
        let mut ids = Vec::with_capacity(meta.len());
        for ((id, dead), ack) in meta.into_iter().zip(acks) {
            match ack {
                Ok(Ok(_)) => {
                    ids.push(id);
                    app.m.published.with_label_values(&[app.topic(dead)]).inc();
                }
                Ok(Err((e, _))) => {
                    self.failed += 1;
                    self.first_error.get_or_insert_with(|| e.to_string());
                }
                Err(_) => {
                    self.failed += 1;
                    self.first_error
                        .get_or_insert_with(|| "delivery report lost".to_owned());
                }
            }
        }
        self.acked += ids.len();
        if !ids.is_empty() {
            // the stampers outlive the burst's rounds; rounds take turns
            self.rounds += 1;
            let _ = stamp[self.rounds % stamp.len()].send(ids);
        }
    }
}

/// An outbox row made into its Kafka message, ready to enqueue.
struct Ready {
    id: i64,
    /// For the dead compensations topic.
    dead: bool,
    key: String,
    body: Vec<u8>,
    headers: OwnedHeaders,
}

/// Reads a burst's batches in id order, each above the last id read, into `out`: until a
/// short batch (caught up), until `burst` has passed, or until the receiver is gone.
async fn read_batches(
    pool: sqlx::PgPool,
    batch: i64,
    burst: Duration,
    out: tokio::sync::mpsc::Sender<Vec<Ready>>,
) -> Result<(), sqlx::Error> {
    let started = std::time::Instant::now();
    let mut after = 0i64;
    loop {
        let rows: Vec<OutboxMessage> = sqlx::query_as(SELECT_MESSAGES)
            .bind(after)
            .bind(batch)
            .fetch_all(&pool)
            .await?;
        let caught_up = (rows.len() as i64) < batch;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.id;
        let ready = rows
            .into_iter()
            .map(|row| Ready {
                id: row.id,
                dead: row.event_type == fulfillment::events::COMPENSATION_FAILED,
                body: row.body(),
                headers: row.headers(),
                key: row.aggregate_id,
            })
            .collect();
        if out.send(ready).await.is_err() || caught_up || started.elapsed() >= burst {
            return Ok(());
        }
    }
}

/// Stamps `published_at` on what Kafka acknowledged, taking whatever has queued up since its
/// last statement in one `UPDATE`.
async fn stamp(
    pool: sqlx::PgPool,
    mut acked: tokio::sync::mpsc::UnboundedReceiver<Vec<i64>>,
) -> Result<(), sqlx::Error> {
    while let Some(mut ids) = acked.recv().await {
        while let Ok(more) = acked.try_recv() {
            ids.extend(more);
        }
        // A stamp lost in a database crash only sends its events again (a duplicate the
        // consumers' inboxes absorb): it need not wait for the WAL flush.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT set_config('synchronous_commit', 'off', true)")
            .execute(&mut *tx)
            .await?;
        // `published_at IS NULL` lets Postgres find the rows through the small partial index
        // of unpublished rows rather than the primary key (several times cheaper, measured)
        sqlx::query(
            "UPDATE outbox SET published_at = now() WHERE published_at IS NULL AND id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

impl App {
    /// `consumer_lag_messages{partition}`: the newest offset Kafka has minus where this
    /// consumer is, for each partition it holds. (librdkafka's calls block: off the runtime.)
    fn record_consumer_lag(&self, consumer: &StreamConsumer) {
        let lag = tokio::task::block_in_place(|| {
            let Ok(position) = consumer.position() else {
                return Vec::new();
            };
            position
                .elements()
                .iter()
                .filter_map(|e| {
                    let (_, high) = consumer
                        .fetch_watermarks(e.topic(), e.partition(), Duration::from_millis(500))
                        .ok()?;
                    let at = e.offset().to_raw().filter(|o| *o >= 0).unwrap_or(0);
                    Some((e.partition(), (high - at).max(0)))
                })
                .collect::<Vec<_>>()
        });
        for (partition, n) in lag {
            self.m
                .consumer_lag
                .with_label_values(&[&partition.to_string()])
                .set(n);
        }
    }
}

impl OutboxMessage {
    /// The message body, a JSON envelope: `{"event_id","event_type","schema_version",
    /// "aggregate_type","aggregate_id","occurred_at","data"}`, `data` being the payload's text.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.payload.len() + 256);
        let text = |b: &mut Vec<u8>, s: &str| {
            serde_json::to_writer(&mut *b, s).expect("a string serialises");
        };
        b.extend_from_slice(b"{\"event_id\":\"");
        b.extend_from_slice(
            self.event_id
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        b.extend_from_slice(b"\",\"event_type\":");
        text(&mut b, &self.event_type);
        b.extend_from_slice(b",\"schema_version\":");
        b.extend_from_slice(self.schema_version.to_string().as_bytes());
        b.extend_from_slice(b",\"aggregate_type\":");
        text(&mut b, &self.aggregate_type);
        b.extend_from_slice(b",\"aggregate_id\":");
        text(&mut b, &self.aggregate_id);
        b.extend_from_slice(b",\"occurred_at\":\"");
        b.extend_from_slice(
            self.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .as_bytes(),
        );
        b.extend_from_slice(b"\",\"data\":");
        b.extend_from_slice(self.payload.as_bytes());
        b.push(b'}');
        b
    }

    /// Headers naming the event (so a consumer can drop a duplicate before decoding the body)
    /// and carrying the trace context.
    pub fn headers(&self) -> OwnedHeaders {
        let version = self.schema_version.to_string();
        let event_id = self.event_id.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "event_id",
                value: Some(&event_id),
            })
            .insert(Header {
                key: "event_type",
                value: Some(&self.event_type),
            })
            .insert(Header {
                key: "schema_version",
                value: Some(&version),
            });
        if let Some(tp) = &self.traceparent {
            headers = headers.insert(Header {
                key: service_kit::trace::TRACEPARENT,
                value: Some(tp),
            });
        }
        headers
    }
}

/// The value of header `key` of a message, if it has one.
pub fn header<'a>(
    headers: Option<&'a rdkafka::message::BorrowedHeaders>,
    key: &str,
) -> Option<&'a str> {
    let h = headers?;
    (0..h.count())
        .map(|i| h.get(i))
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Applies a batch of order events in one transaction, each once, each in a span of the trace
/// that wrote it (its `traceparent` header): the outcomes, in order.
async fn project_batch(
    pool: &sqlx::PgPool,
    consumer: &str,
    msgs: &[rdkafka::message::BorrowedMessage<'_>],
) -> Result<Vec<&'static str>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(msgs.len());
    for msg in msgs {
        let span = service_kit::trace::follow(
            tracing::info_span!(
                "consume",
                otel.name = format!(
                    "consume {}",
                    header(msg.headers(), "event_type").unwrap_or("event")
                ),
                otel.kind = "consumer",
                messaging.destination.name = msg.topic(),
                messaging.kafka.offset = msg.offset(),
                consumer.group = %consumer,
            ),
            header(msg.headers(), service_kit::trace::TRACEPARENT),
        );
        let outcome = project(&mut tx, consumer, msg.payload())
            .instrument(span)
            .await?;
        outcomes.push(outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Applies one order event to the dashboard, once, in the caller's transaction: `applied`,
/// `duplicate` (its inbox row was there) or `undecodable` (skipped, logged).
async fn project(
    tx: &mut sqlx::PgConnection,
    consumer: &str,
    payload: Option<&[u8]>,
) -> Result<&'static str, sqlx::Error> {
    let Some(event) = payload.and_then(|p| serde_json::from_slice::<Value>(p).ok()) else {
        tracing::warn!("undecodable event skipped");
        return Ok("undecodable");
    };
    let (Some(event_id), Some(kind)) = (
        event["event_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok()),
        event["event_type"].as_str(),
    ) else {
        tracing::warn!(%event, "event without an id or a type skipped");
        return Ok("undecodable");
    };
    let data = &event["data"];
    let fresh = sqlx::query(
        "INSERT INTO consumer_inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        return Ok("duplicate");
    }
    let column = match kind {
        "OrderCreated" => Some("created"),
        "OrderPaid" => Some("paid"),
        "OrderConfirmed" => Some("confirmed"),
        "OrderRedeemed" => Some("redeemed"),
        "OrderCancelled" => Some("cancelled"),
        "OrderExpired" => Some("expired"),
        "OrderRefunded" => Some("refunded"),
        _ => None,
    };
    if let (Some(column), Some(store)) = (column, data["store_id"].as_str()) {
        let cents = if kind == "OrderPaid" {
            data["amount_cents"].as_i64().unwrap_or(0)
        } else {
            0
        };
        // the column name comes from the fixed list above, never from the message
        sqlx::query(&format!(
            "INSERT INTO bar_dashboard (store_id, {column}, paid_cents, last_event_at)
             VALUES ($1, 1, $2, now())
             ON CONFLICT (store_id) DO UPDATE SET {column} = bar_dashboard.{column} + 1,
                 paid_cents = bar_dashboard.paid_cents + $2, last_event_at = now()"
        ))
        .bind(store)
        .bind(cents)
        .execute(&mut *tx)
        .await?;
    }
    Ok("applied")
}
