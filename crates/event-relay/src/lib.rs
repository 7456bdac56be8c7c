//! event-relay: the outbox to Kafka, and the bar-dashboard projection back from it.
//!
//! **Relay.** One relay leads at a time (a lease in Postgres, `job_engine::leader`: renewed
//! every third of `RELAY_LEADER_LEASE_MS`; a relay that dies or pauses is replaced once its
//! lease lapses, and the position writes of a replaced one are fenced by its epoch, so one
//! that wakes from a pause cannot move the position its successor recorded; any number may
//! run, the others wait to take over). It reads the outbox rows past its
//! position (the `outbox_relay` row; see [`position`]) in id order, each payload's JSON text
//! going into the envelope unparsed, hands them to an idempotent producer in that order,
//! keyed by the aggregate (the order id), and records its new position once Kafka has
//! acknowledged them: one small row per round, not a stamp per event. Rounds are pipelined:
//! the next batch is read and enqueued while Kafka acknowledges up to three earlier ones.
//! `CompensationFailed` goes to the dead compensations topic, everything else to the order
//! events topic.
//! - No skipped rows: ids the relay goes past while no row with them is visible (a
//!   transaction that took its id before rows that committed first: the classic outbox
//!   pitfall with sequence ids) are the position's gaps. Every round looks them up and sends
//!   what has filled them; a gap is dropped only once every transaction that could fill it has
//!   ended. One order's rows are written by transactions serialised on the order row, so they
//!   commit in id order (a row that fills a gap has no later sibling out yet); a round reads
//!   its gaps and the rows past its position from one snapshot (`SELECT_ROUND`), and sends
//!   them in id order, to one partition.
//! - Kafka down: the position stays, the outbox grows, the relay backs off and retries; the
//!   order path never talks to Kafka. A relay that dies after Kafka acknowledged a batch but
//!   before recording its position sends the batch again: a duplicate, harmless to consumers
//!   (the event id travels in the `event_id` header and the body; consumers keep an inbox).
//!
//! **Projection** (`CONSUMER_ENABLED`): a consumer in group `CONSUMER_GROUP` applies order
//! events to `bar_dashboard` (per store: created, paid, confirmed, ... and money kept). Each
//! event's inbox row and its effect commit together (the events that have arrived, up to 500,
//! share one transaction); the offsets are committed after, so a crash in between redelivers
//! events whose inbox rows say they were applied.

pub mod message;
pub mod position;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures_util::FutureExt;
use job_engine::leader::{Fence, Leadership};
use postgres_store::{PgLimits, PgStore};
use prometheus::IntCounterVec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;
use serde_json::Value;
use service_kit::config::{env_millis, env_or, env_string};
use service_kit::telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use message::Batch;
pub use position::{Gap, Position};

/// The relay's role in `leader_lease`.
const RELAY_ROLE: &str = "relay";

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
    /// The relay leader's lease (renewed every third of it): a leader that dies or pauses is
    /// replaced within about this long.
    pub leader_lease: Duration,
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
            batch: env_or("RELAY_BATCH", 5000)?,
            poll: env_millis("RELAY_POLL_MS", 100)?,
            delivery_timeout: env_millis("RELAY_DELIVERY_TIMEOUT_MS", 10_000)?,
            consumer: env_or("CONSUMER_ENABLED", true)?,
            group: env_string("CONSUMER_GROUP", "bar-dashboard"),
            leader_lease: env_millis("RELAY_LEADER_LEASE_MS", 5_000)?,
        };
        if c.leader_lease < Duration::from_secs(1) {
            anyhow::bail!("RELAY_LEADER_LEASE_MS must be at least 1000");
        }
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
    /// Ranges of ids the relay went past unseen and still watches: a few in flight at any
    /// time; many means a transaction somewhere holds the cluster's oldest xid back.
    gaps: prometheus::IntGauge,
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
    /// The relay's own connections (a burst's reader and its position recorder), with
    /// `synchronous_commit` off: the position, and the xids the reader takes, need not wait for
    /// the WAL flush (a position lost in a crash only sends its events again, which consumers'
    /// inboxes absorb). The projection's commits stay on the store's durable pool.
    relay_pool: sqlx::PgPool,
    m: RelayMetrics,
}

/// Reads up to `$2` rows past the position `$1`, oldest first.
pub const SELECT_MESSAGES: &str = concat!(
    "SELECT ",
    message::message_columns!(),
    " FROM outbox o WHERE o.id > $1 ORDER BY o.id LIMIT $2"
);

/// A round while the position has gaps, in one statement: the rows that have filled the gaps
/// (lows `$3`, highs `$4`) and up to `$2` rows past the position `$1`, oldest first.
///
/// One statement is one snapshot, and that is what keeps an order's events in order: a
/// transaction may write two rows of an order whose ids straddle another's committed row, so
/// the first becomes a gap while the second is not read yet. Looked up and read in two
/// statements, the transaction could commit in between, and the second row would go out in
/// this round and the first only in the next.
const SELECT_ROUND: &str = concat!(
    "SELECT * FROM (SELECT ",
    message::message_columns!(),
    " FROM outbox o JOIN unnest($3::bigint[], $4::bigint[]) g(lo, hi)
        ON o.id BETWEEN g.lo AND g.hi
      UNION ALL
      (SELECT ",
    message::message_columns!(),
    " FROM outbox o WHERE o.id > $1 ORDER BY o.id LIMIT $2)) r ORDER BY id"
);

/// Events the projection applies in one transaction at most (whatever has arrived).
const CONSUMER_BATCH: usize = 500;

/// Rounds a relay keeps in flight at once (each of `RELAY_BATCH` events): the next round is
/// read and enqueued while Kafka acknowledges the earlier ones.
pub const PIPELINE_DEPTH: usize = 4;

/// How long one pipelined burst runs before the relay checks its leadership again and starts
/// over from its recorded position.
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
        let gaps = prometheus::IntGauge::new(
            "relay_position_gaps",
            "Ranges of outbox ids the leading relay went past while no row held them, still looked up every round",
        )?;
        metrics.register(Box::new(gaps.clone()));
        // counted from 0, so the first failed round is an increase RelayErrors sees
        let errors = metrics.counter(
            "relay_errors_total",
            "Relay rounds that failed, by what failed: kafka, postgres, fenced (the lease was no longer this relay's)",
            &["what"],
        );
        for what in ["kafka", "postgres", "fenced"] {
            errors.with_label_values(&[what]);
        }
        let m = RelayMetrics {
            published: metrics.counter(
                "relay_published_total",
                "Outbox events Kafka acknowledged, by topic",
                &["topic"],
            ),
            errors,
            leader,
            gaps,
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
        let relay_pool = store.pool_with(
            &PgLimits {
                max_connections: 2,
                ..config.pg.clone()
            },
            &[("synchronous_commit", "off")],
        );
        Ok(Arc::new(App {
            config,
            store,
            metrics,
            producer: std::sync::RwLock::new(producer),
            relay_pool,
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
        let owner = format!(
            "event-relay-{}-{}",
            env_string("HOSTNAME", "local"),
            std::process::id()
        );
        let leadership = Leadership::new(
            self.store.pool.clone(),
            RELAY_ROLE,
            &owner,
            self.config.leader_lease,
        );
        // the lease is kept by a task of its own, so a burst waiting on Kafka's
        // acknowledgements never lets it lapse
        let (lease_tx, mut lease) = tokio::sync::watch::channel(None);
        let keeper = tokio::spawn(keep_lease(
            leadership,
            lease_tx,
            self.m.leader.clone(),
            stop.clone(),
        ));
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            // marked seen: the wait below ends only when the lease changes hands again
            let held = lease.borrow_and_update().clone();
            let pause = match held {
                // a standby waits for the keeper to take the lease over
                None => Duration::from_secs(1),
                Some(held) => match self.relay_burst(Some(held)).await {
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
                },
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = lease.changed() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let _ = keeper.await;
    }

    /// One burst of pipelined rounds, from the position recorded in `outbox_relay`. Each
    /// round sends what has filled the position's gaps and the next `RELAY_BATCH` rows past
    /// it, enqueued in id order on the idempotent producer; up to [`PIPELINE_DEPTH`] rounds
    /// wait for Kafka's acknowledgements at once, and a task of its own records the position
    /// each fully acknowledged round reached (rounds settle in order). The burst ends when it
    /// has caught up (a short read), after `BURST`, or at the first failure, and always with
    /// nothing in flight; the next one starts from the recorded position, so a failed round
    /// and the rounds after it are sent again.
    ///
    /// Returns how many events Kafka acknowledged; an error if Postgres failed or Kafka
    /// refused any (the position of the rounds acknowledged before it is recorded first).
    ///
    /// This is the burst of a relay that is alone (tests, the benchmark); the leading relay's
    /// bursts are fenced by its lease ([`App::relay_burst`]).
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        self.relay_burst(None).await
    }

    /// [`App::relay_once`] as the leader holding `lease` (its fence, and until when it surely
    /// leads): no round starts past that instant, and each position is recorded only while
    /// the lease is the live one, so a leader that was paused past its lease and replaced
    /// records nothing (it may send a round again: a duplicate consumers absorb).
    pub async fn relay_burst(
        &self,
        lease: Option<(Fence, std::time::Instant)>,
    ) -> anyhow::Result<usize> {
        let (fence, until) = lease.unzip();
        let producer = self
            .producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (start, reader_conn) = match self.burst_start().await {
            Ok((start, conn)) => {
                self.m.gaps.set(start.gaps.len() as i64);
                (start, conn)
            }
            Err(e) => {
                self.m.errors.with_label_values(&["postgres"]).inc();
                return Err(e.into());
            }
        };
        let (positions, recorded) = tokio::sync::mpsc::unbounded_channel();
        let recorder = tokio::spawn(record_positions(self.relay_pool.clone(), recorded, fence));
        // the next batch is read while this one is sent and earlier ones are acknowledged
        let (batch_tx, mut batches) = tokio::sync::mpsc::channel(2);
        // batches sent go back to the reader to be filled again (their buffers kept)
        let (spare_tx, spare) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(read_batches(
            reader_conn,
            start,
            self.config.batch,
            BURST,
            until,
            (batch_tx, spare),
        ));
        let mut in_flight = std::collections::VecDeque::new();
        let mut round = Round::default();
        while let Some((mut batch, position)) = batches.recv().await {
            let mut sent = Vec::with_capacity(batch.len());
            let mut refused = false;
            let message::Batch { bytes, messages } = &mut batch;
            for m in messages.drain(..) {
                let mut record = FutureRecord::to(self.topic(m.dead))
                    .key(&bytes[m.key])
                    .payload(&bytes[m.body])
                    .headers(m.headers);
                // enqueued in this order, synchronously: one key's events keep their order
                let delivery = loop {
                    match producer.send_result(record) {
                        Ok(delivery) => break Some(delivery),
                        // the producer's local queue is full: wait for the oldest round
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            match in_flight.pop_front() {
                                Some(r) => round.settle(self, &positions, r).await,
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
                    Some(d) => sent.push((m.dead, d)),
                    None => {
                        refused = true;
                        break;
                    }
                }
            }
            // librdkafka has its own copies of what it took
            batch.clear();
            let _ = spare_tx.send(batch);
            let (dead, deliveries): (Vec<_>, Vec<_>) = sent.into_iter().unzip();
            // a round not wholly enqueued never moves the position
            let position = (!refused).then_some(position);
            in_flight.push_back(InFlight {
                dead,
                position,
                acks: deliveries,
            });
            while in_flight.len() >= PIPELINE_DEPTH {
                let r = in_flight.pop_front().expect("in flight");
                round.settle(self, &positions, r).await;
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
        // nothing stays in flight past a burst: a failure retries from the recorded position
        while let Some(r) = in_flight.pop_front() {
            round.settle(self, &positions, r).await;
        }
        drop(positions);
        let recorded = recorder
            .await
            .unwrap_or_else(|e| Err(RecordError::Db(sqlx::Error::Protocol(e.to_string()))));
        match recorded {
            Err(RecordError::Fenced) => {
                self.m.errors.with_label_values(&["fenced"]).inc();
                anyhow::bail!("the relay lease is no longer this relay's: position not recorded");
            }
            Err(RecordError::Db(e)) => {
                self.m.errors.with_label_values(&["postgres"]).inc();
                return Err(e.into());
            }
            Ok(()) => {}
        }
        if let Some(e) = read_error {
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

    /// The recorded position and the connection the burst's reader keeps.
    async fn burst_start(
        &self,
    ) -> Result<(Position, sqlx::pool::PoolConnection<sqlx::Postgres>), sqlx::Error> {
        let mut conn = self.relay_pool.acquire().await?;
        Ok((load_position(&mut *conn).await?, conn))
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
    acked: usize,
    failed: usize,
    first_error: Option<String>,
    refused: Option<String>,
}

/// A round waiting for Kafka: the topic of each message (dead compensations or not), the
/// position it reaches once every message is acknowledged (none if it was not wholly
/// enqueued), and the acknowledgements.
struct InFlight {
    dead: Vec<bool>,
    position: Option<Position>,
    acks: Vec<rdkafka::producer::DeliveryFuture>,
}

impl Round {
    fn failed(&self) -> bool {
        self.failed > 0 || self.refused.is_some()
    }

    /// Waits for a round's acknowledgements and counts them; hands its position to the
    /// recorder when every message of it, and of every round before it, was acknowledged.
    async fn settle(
        &mut self,
        app: &App,
        positions: &tokio::sync::mpsc::UnboundedSender<Position>,
        round: InFlight,
    ) {
        let was_failed = self.failed();
        let mut failed = 0;
        // acknowledged, by topic: [order events, dead compensations]
        let mut acked = [0u64; 2];
        // in order: by the time a round is settled most of its reports are in, and waiting on
        // each costs less than a joined set of thousands of futures
        for (dead, ack) in round.dead.into_iter().zip(round.acks) {
            match ack.await {
                Ok(Ok(_)) => acked[dead as usize] += 1,
                Ok(Err((e, _))) => {
                    failed += 1;
                    self.first_error.get_or_insert_with(|| e.to_string());
                }
                Err(_) => {
                    failed += 1;
                    self.first_error
                        .get_or_insert_with(|| "delivery report lost".to_owned());
                }
            }
        }
        self.failed += failed;
        for (dead, n) in [(false, acked[0]), (true, acked[1])] {
            if n > 0 {
                self.acked += n as usize;
                app.m
                    .published
                    .with_label_values(&[app.topic(dead)])
                    .inc_by(n);
            }
        }
        if let (false, 0, Some(position)) = (was_failed, failed, round.position) {
            // the recorder outlives the burst's rounds
            let _ = positions.send(position);
        }
    }
}

/// Keeps (or, as a standby, tries for) the relay's lease every third of it until `stop`, then
/// gives it up; publishes the lease this relay holds (its fence, and until when it surely
/// leads) to the relay loop, and sets `relay_leader`.
async fn keep_lease(
    mut leadership: Leadership,
    lease: tokio::sync::watch::Sender<Option<(Fence, std::time::Instant)>>,
    gauge: prometheus::IntGauge,
    stop: CancellationToken,
) {
    loop {
        let leads = leadership.ensure().await;
        gauge.set(leads as i64);
        let held = leadership.fence().zip(leadership.valid_until());
        lease.send_if_modified(|now| {
            let changed = now.as_ref().map(|(f, _)| f) != held.as_ref().map(|(f, _)| f);
            *now = held;
            changed
        });
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(leadership.lease() / 3) => {}
        }
    }
    gauge.set(0);
    lease.send_replace(None);
    leadership.resign().await;
}

/// The relay's position as `outbox_relay` records it.
pub async fn load_position(db: impl sqlx::PgExecutor<'_>) -> Result<Position, sqlx::Error> {
    let (through, lo, hi, horizon): (i64, Vec<i64>, Vec<i64>, Vec<i64>) =
        sqlx::query_as("SELECT published_through, gap_lo, gap_hi, gap_horizon FROM outbox_relay")
            .fetch_one(db)
            .await?;
    Ok(Position::from_columns(through, &lo, &hi, &horizon))
}

/// Reads a burst's batches into `out`, each with the position it reaches: what has filled
/// the gaps, then the rows past the position, in id order; a batch comes back through
/// `spare` once sent, and is filled again. Until a short batch (caught up), until `burst` has
/// passed or the instant `until` (the end of the leader's lease as it knows it), or until the
/// receiver is gone; a round that would change nothing is not sent.
async fn read_batches(
    mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    mut position: Position,
    limit: i64,
    burst: Duration,
    until: Option<std::time::Instant>,
    (out, mut spare): (
        tokio::sync::mpsc::Sender<(Batch, Position)>,
        tokio::sync::mpsc::UnboundedReceiver<Batch>,
    ),
) -> Result<(), sqlx::Error> {
    let started = std::time::Instant::now();
    let stop_at = until.map_or(started + burst, |u| u.min(started + burst));
    loop {
        if std::time::Instant::now() >= stop_at {
            return Ok(()); // a leader that woke from a pause past its lease reads nothing more
        }
        let before = position.clone();
        let mut batch = spare
            .try_recv()
            .unwrap_or_else(|_| Batch::with_capacity(limit as usize));
        let ids = if position.gaps.is_empty() {
            read_into(
                &mut batch,
                sqlx::query(SELECT_MESSAGES)
                    .bind(position.through)
                    .bind(limit),
                &mut conn,
            )
            .await?
        } else {
            // the oldest running transaction, read before the lookup: a gap with an older
            // horizon that the lookup does not see filled never will be
            let xmin: i64 =
                sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                    .fetch_one(&mut *conn)
                    .await?;
            let (lo, hi, _) = position.gap_columns();
            let query = sqlx::query(SELECT_ROUND)
                .bind(position.through)
                .bind(limit)
                .bind(lo)
                .bind(hi);
            let mut ids = read_into(&mut batch, query, &mut conn).await?;
            // in id order: what filled the gaps is at or below the position, the rest past it
            let fresh = ids.partition_point(|&id| id <= position.through);
            position.fill(&ids[..fresh], xmin);
            ids.drain(..fresh);
            ids
        };
        let caught_up = (ids.len() as i64) < limit;
        let missing = position.missing(&ids);
        if let Some(&last) = ids.last() {
            let horizon = if missing.is_empty() {
                0
            } else {
                take_xid(&mut conn).await?
            };
            position.advance(last, &missing, horizon);
        }
        if batch.is_empty() && position == before {
            return Ok(());
        }
        if out.send((batch, position.clone())).await.is_err()
            || caught_up
            || std::time::Instant::now() >= stop_at
        {
            return Ok(());
        }
    }
}

/// Up to `limit` rows past `after`, oldest first, made into their messages ([`SELECT_MESSAGES`]);
/// and their ids.
pub async fn read_messages(
    pool: &sqlx::PgPool,
    after: i64,
    limit: i64,
) -> Result<(Batch, Vec<i64>), sqlx::Error> {
    let mut batch = Batch::with_capacity(limit as usize);
    let query = sqlx::query(SELECT_MESSAGES).bind(after).bind(limit);
    let ids = read_into(&mut batch, query, &mut *pool.acquire().await?).await?;
    Ok((batch, ids))
}

/// Runs `query` (rows of `message_columns!`) and appends a message per row to
/// `batch`, as the rows arrive; returns their ids.
async fn read_into<'q>(
    batch: &mut Batch,
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    conn: &mut sqlx::PgConnection,
) -> Result<Vec<i64>, sqlx::Error> {
    use futures_util::TryStreamExt;
    let mut rows = query.fetch(conn);
    let mut ids = Vec::new();
    while let Some(row) = rows.try_next().await? {
        ids.push(batch.push(&row)?);
    }
    Ok(ids)
}

/// An xid of the relay's own, taken right after a read that skipped ids: the horizon of the
/// gaps that read found (every transaction still holding one of their ids is older). On the
/// relay's connection: its commit does not wait for the WAL flush.
async fn take_xid(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(conn)
        .await
}

/// Why a position was not recorded.
enum RecordError {
    Db(sqlx::Error),
    /// The lease the burst ran under is not the live one any more.
    Fenced,
}

/// Records the positions acknowledged rounds reached, the newest that has queued up since its
/// last statement in one `UPDATE` of the one `outbox_relay` row (on the relay's connection:
/// the commit does not wait for the WAL flush). With a `fence`, the row changes only while
/// that lease is the live one (in the same statement, under a share lock of the lease row).
async fn record_positions(
    pool: sqlx::PgPool,
    mut reached: tokio::sync::mpsc::UnboundedReceiver<Position>,
    fence: Option<Fence>,
) -> Result<(), RecordError> {
    let mut conn = None;
    let sql = format!(
        "UPDATE outbox_relay SET published_through = $1, gap_lo = $2, gap_hi = $3,
             gap_horizon = $4, updated_at = now(), leader_epoch = $7
         WHERE $5::text IS NULL OR {}",
        job_engine::leader::fenced(5, 6, 7)
    );
    while let Some(mut position) = reached.recv().await {
        while let Ok(newer) = reached.try_recv() {
            position = newer;
        }
        let conn = match &mut conn {
            Some(c) => c,
            None => conn.insert(pool.acquire().await.map_err(RecordError::Db)?),
        };
        let (lo, hi, horizon) = position.gap_columns();
        let done = sqlx::query(&sql)
            .bind(position.through)
            .bind(lo)
            .bind(hi)
            .bind(horizon)
            .bind(fence.as_ref().map(|f| f.role.as_str()))
            .bind(fence.as_ref().map(|f| f.holder.as_str()))
            .bind(fence.as_ref().map(|f| f.epoch))
            .execute(&mut **conn)
            .await
            .map_err(RecordError::Db)?;
        if done.rows_affected() == 0 {
            return Err(RecordError::Fenced);
        }
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
