//! The outbox to Kafka and back, on the real binaries and the local broker (tansu on
//! 127.0.0.1:9092, started by `scripts/kafka.sh`; each test uses topics and a consumer group
//! of its own).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::binaries::{free_port, Proc, ScratchKafka, Services};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

const BROKERS: &str = "127.0.0.1:9092";

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads `topic` from the start until every event id of `want` has been seen (or the
/// deadline passes): every message as (event id, aggregate id), in each partition's order.
async fn read_topic(
    brokers: &str,
    topic: &str,
    deadline: Duration,
    want: &HashSet<String>,
) -> Vec<(String, String)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // the local broker answers a fetch with one record batch: ask again at once
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut found = HashSet::new();
    while found.len() < want.len() {
        assert!(
            started.elapsed() < deadline,
            "read {} messages of {topic} before the deadline",
            seen.len()
        );
        let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        else {
            continue;
        };
        let header_id = event_relay::header(msg.headers(), "event_id").map(str::to_owned);
        let body: Value = serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap();
        let id = body["event_id"].as_str().unwrap().to_owned();
        assert_eq!(
            header_id.as_deref(),
            Some(id.as_str()),
            "the event id travels in a header"
        );
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        assert_eq!(
            body["aggregate_id"].as_str(),
            Some(key.as_str()),
            "keyed by order"
        );
        if want.contains(&id) {
            found.insert(id.clone());
        }
        seen.push((id, key));
    }
    seen
}

/// Every event `written` (event id, order id, in outbox order) is in `seen` (in topic order),
/// and each order's events first appear in the order they were written. Returns how many
/// orders and how many duplicate messages there were.
fn assert_in_order(written: &[(String, String)], seen: &[(String, String)]) -> (usize, usize) {
    let want: HashSet<&str> = written.iter().map(|(e, _)| e.as_str()).collect();
    let mut first_seen: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut unique = HashSet::new();
    for (event, order) in seen {
        if want.contains(event.as_str()) && unique.insert(event.as_str()) {
            first_seen
                .entry(order.as_str())
                .or_default()
                .push(event.as_str());
        }
    }
    let mut by_order: HashMap<&str, Vec<&str>> = HashMap::new();
    for (event, order) in written {
        by_order
            .entry(order.as_str())
            .or_default()
            .push(event.as_str());
    }
    for (order, events) in &by_order {
        assert_eq!(
            first_seen.get(order),
            Some(events),
            "events of order {order} missing or out of order"
        );
    }
    let repeated = seen
        .iter()
        .filter(|(e, _)| want.contains(e.as_str()))
        .count()
        - unique.len();
    (by_order.len(), repeated)
}

/// Topics and a consumer group of a test's own.
fn relay_env(tag: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ORDER_EVENTS_TOPIC", format!("bar.order.events.v1.{tag}")),
        (
            "DEAD_COMPENSATION_TOPIC",
            format!("bar.compensation.dead.v1.{tag}"),
        ),
        ("CONSUMER_GROUP", format!("bar-dashboard-{tag}")),
        ("KAFKA_TOPIC_PARTITIONS", "4".to_owned()),
    ]
}

/// 10,000 orders through the API (a quarter paid and followed up by the scheduler, a tenth
/// cancelled), the relay killed with SIGKILL and restarted twice meanwhile: every outbox event
/// arrives, each order's events arrive in the order they were written, and the projection
/// consumer (in a process of its own) applies each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_arrives_in_order_and_is_applied_once_though_the_relay_is_killed_twice() {
    let orders = env_num("EVENTS_ORDERS", 10_000);
    let started = Instant::now();
    let s = Arc::new(
        Services::start(
            &[("PG_MAX_CONNECTIONS", "12".to_owned())],
            &[("PAYMENT_FIRST_CHECK_MS", "600000".to_owned())],
        )
        .await,
    );
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("bar.order.events.v1.{tag}");
    // the relay in one process (killed twice below), the projection in another
    let mut relay_env = relay_env(&tag);
    let mut consumer_only = relay_env.clone();
    relay_env.push(("CONSUMER_ENABLED", "false".to_owned()));
    consumer_only.push(("RELAY_ENABLED", "false".to_owned()));
    let (relay, relay_url) = s.event_relay(&relay_env).await;
    let (_projection, projection_url) = s.event_relay(&consumer_only).await;
    let (_scheduler, _) = s.scheduler(&[]).await;
    s.put_sku("sku-ev", "bar-ev", 1_200, orders as i64 + 10)
        .await;

    // the relay dies by SIGKILL twice while orders come in, and comes back each time
    let killer = {
        let (s, relay_env) = (s.clone(), relay_env.clone());
        tokio::spawn(async move {
            let (mut relay, mut url): (Proc, String) = (relay, relay_url);
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                relay.child.kill().expect("SIGKILL the relay");
                relay.child.wait().expect("reap the relay");
                tokio::time::sleep(Duration::from_millis(500)).await;
                (relay, url) = s.event_relay(&relay_env).await;
            }
            (relay, url)
        })
    };

    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..orders {
        let (s, gate) = (s.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let user = format!("ev-{i}");
            if i % 4 == 0 {
                let (_, payment, _) = s
                    .order_with_payment(&user, "k", ("sku-ev", "bar-ev"), "wechat")
                    .await;
                s.pay(&payment).await;
            } else {
                let (order, _, _) = s
                    .order_with_payment(&user, "k", ("sku-ev", "bar-ev"), "alipay")
                    .await;
                if i % 10 == 1 {
                    s.cancel(&user, &order).await;
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let created_in = started.elapsed();
    let (_relay, _) = killer.await.unwrap();

    // the paid orders confirmed (their follow-ups' events written), then the outbox drained
    let paid = orders.div_ceil(4) as i64;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (confirmed, unpublished): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orders WHERE state = 'CONFIRMED'),
                    (SELECT count(*) FROM outbox_unpublished)",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if confirmed == paid && unpublished == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed {confirmed}/{paid}, unpublished {unpublished}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // every outbox event is on the topic; each order's in the order written
    let written: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id::text, aggregate_id FROM outbox
         WHERE event_type <> 'CompensationFailed' ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let want: HashSet<String> = written.iter().map(|(e, _)| e.clone()).collect();
    let seen = read_topic(BROKERS, &topic, Duration::from_secs(120), &want).await;
    let mut first_seen: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut unique = HashSet::new();
    for (event, order) in &seen {
        if unique.insert(event.as_str()) {
            first_seen
                .entry(order.as_str())
                .or_default()
                .push(event.as_str());
        }
    }
    let mut by_order: HashMap<&str, Vec<&str>> = HashMap::new();
    for (event, order) in &written {
        by_order
            .entry(order.as_str())
            .or_default()
            .push(event.as_str());
    }
    assert_eq!(by_order.len(), orders);
    for (order, events) in &by_order {
        assert_eq!(
            first_seen.get(order),
            Some(events),
            "events of order {order} out of order"
        );
    }
    let duplicates = seen.len() - unique.len();

    // the projection applied each event once: it agrees with the outbox
    let truth: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_type, count(*) FROM outbox GROUP BY 1")
            .fetch_all(&db)
            .await
            .unwrap();
    let truth: HashMap<String, i64> = truth.into_iter().collect();
    let count_of = |t: &str| truth.get(t).copied().unwrap_or(0);
    let want_row = json!([
        count_of("OrderCreated"),
        count_of("OrderPaid"),
        count_of("OrderConfirmed"),
        count_of("OrderCancelled"),
        1_200 * count_of("OrderPaid"),
    ]);
    // the projection applies one event per transaction: on a machine busy with other tests it
    // can trail by a minute or more, so the wait fails only when it stops making progress
    let (mut applied, mut progressed) = (-1i64, Instant::now());
    let projection_wait = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let row: Option<(i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT created, paid, confirmed, cancelled, paid_cents FROM bar_dashboard
             WHERE store_id = 'bar-ev'",
        )
        .fetch_optional(&db)
        .await
        .unwrap();
        let got = row.map(|r| json!([r.0, r.1, r.2, r.3, r.4]));
        if got.as_ref() == Some(&want_row) {
            break;
        }
        let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_inbox")
            .fetch_one(&db)
            .await
            .unwrap();
        if inbox > applied {
            (applied, progressed) = (inbox, Instant::now());
        }
        if progressed.elapsed() > Duration::from_secs(60) || Instant::now() > deadline {
            let m = s.metrics(&projection_url).await;
            let consumer: Vec<&str> = m.lines().filter(|l| l.starts_with("consumer_")).collect();
            panic!("dashboard {got:?}, want {want_row}; {consumer:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_inbox")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(inbox as usize, want.len(), "one inbox row per event");
    println!(
        "events: {orders} orders created in {created_in:.1?}; {} events written, {} messages read ({duplicates} duplicates from the two kills); projection agrees ({want_row}), {:.1?} after the topic was read",
        written.len(),
        seen.len(),
        projection_wait.elapsed(),
    );
}

/// Kafka gone for 30 s while orders come in: every order succeeds without waiting on Kafka,
/// the outbox grows; once Kafka is back (empty: an in-memory broker restarted) the backlog
/// drains and every event written meanwhile arrives, each order's in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_keep_succeeding_while_kafka_is_down_and_the_backlog_drains_after() {
    let outage = Duration::from_secs(env_num("EVENTS_OUTAGE_SECS", 30) as u64);
    let mut kafka = ScratchKafka::start(free_port()).await;
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "600000".to_owned())]).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("bar.order.events.v1.{tag}");
    let mut env = relay_env(&tag);
    env.push(("KAFKA_BROKERS", kafka.brokers()));
    env.push(("CONSUMER_ENABLED", "false".to_owned()));
    env.push(("RELAY_DELIVERY_TIMEOUT_MS", "3000".to_owned()));
    let (_relay, relay_url) = s.event_relay(&env).await;
    s.put_sku("sku-down", "bar-down", 800, 10_000).await;
    let unpublished = || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_unpublished")
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    for i in 0..20 {
        s.order_with_payment(
            &format!("before-{i}"),
            "k",
            ("sku-down", "bar-down"),
            "wechat",
        )
        .await;
    }
    integration_tests::eventually(
        "the first orders published",
        Duration::from_secs(30),
        || async { (unpublished().await == 0).then_some(()) },
    )
    .await;
    let cutoff: i64 = sqlx::query_scalar("SELECT max(id) FROM outbox")
        .fetch_one(&db)
        .await
        .unwrap();

    // Kafka goes away; orders keep coming, and keep succeeding at once
    kafka.stop();
    let down = Instant::now();
    let (mut during, mut slowest) = (0, Duration::ZERO);
    while down.elapsed() < outage {
        let t = Instant::now();
        s.order_with_payment(
            &format!("during-{during}"),
            "k",
            ("sku-down", "bar-down"),
            "alipay",
        )
        .await;
        slowest = slowest.max(t.elapsed());
        during += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backlog = unpublished().await;
    assert!(
        backlog >= during as i64,
        "backlog {backlog} < {during} orders"
    );
    let lag =
        integration_tests::metric_value(&s.metrics(&relay_url).await, "outbox_lag_seconds", &[])
            .unwrap();
    assert!(lag >= outage.as_secs_f64() / 2.0, "outbox lag {lag}");

    // Kafka is back: the backlog drains, and every event written meanwhile is on the topic
    kafka.resume().await;
    let back = Instant::now();
    integration_tests::eventually("the backlog drained", Duration::from_secs(120), || async {
        (unpublished().await == 0).then_some(())
    })
    .await;
    let drained_in = back.elapsed();
    let written: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id::text, aggregate_id FROM outbox WHERE id > $1 ORDER BY id")
            .bind(cutoff)
            .fetch_all(&db)
            .await
            .unwrap();
    let want: HashSet<String> = written.iter().map(|(e, _)| e.clone()).collect();
    let seen = read_topic(&kafka.brokers(), &topic, Duration::from_secs(60), &want).await;
    let (per_order, duplicates) = assert_in_order(&written, &seen);
    assert_eq!(per_order, during);
    println!(
        "events: Kafka down {outage:?}: {during} orders succeeded (slowest {slowest:.0?}), backlog {backlog} events (lag {lag:.0} s); drained {} events in {drained_in:.1?} after Kafka came back ({duplicates} duplicates)",
        written.len()
    );
}

/// One trace from "buy now" to the consumer, across five processes and Kafka: every binary
/// exports its spans over OTLP to an in-memory collector in this test. The order request stores
/// its context on the order, the outbox rows and the expiry job; the payment and the provider's
/// callback continue it; the follow-up jobs written by the callback run two seconds later in
/// the scheduler as spans of it; the relay sends each row's context as the `traceparent` header;
/// the projection consumer's spans continue it. The JSON logs name the same trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_the_order_request_the_callback_the_follow_up_jobs_and_the_consumer() {
    let collector = integration_tests::otlp::Collector::start().await;
    let otel = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let mut s = Services::start(&otel, &[]).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (_relay, _) = s.event_relay(&relay_env(&tag)).await;
    let (_scheduler, _) = s.scheduler(&[]).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-tr", "bar-tr", 9_900, 3).await;

    let (order, payment, _) = s
        .order_with_payment("trace-user", "trace-1", ("sku-tr", "bar-tr"), "wechat")
        .await;
    s.pay(&payment).await; // the buyer pays; the provider calls back
    integration_tests::eventually(
        "the consumer saw the order confirmed",
        Duration::from_secs(60),
        || {
            let db = db.clone();
            async move {
                let n: Option<i64> = sqlx::query_scalar(
                    "SELECT confirmed FROM bar_dashboard WHERE store_id = 'bar-tr'",
                )
                .fetch_optional(&db)
                .await
                .unwrap();
                (n == Some(1)).then_some(())
            }
        },
    )
    .await;

    let stored: String = sqlx::query_scalar("SELECT traceparent FROM orders WHERE id = $1::uuid")
        .bind(&order)
        .fetch_one(&db)
        .await
        .unwrap();
    let trace = stored.split('-').nth(1).unwrap().to_owned();
    let want = [
        ("order-api", "POST /v1/orders"),
        (
            "prelock-service",
            "PUT /v1/skus/{sku_id}/reservations/{reservation_id}",
        ),
        ("order-api", "order.pay"),
        ("order-api", "payment.callback"),
        ("scheduler", "job stock.deduct"),
        ("scheduler", "job voucher.issue"),
        ("scheduler", "job order.notify"),
        ("event-relay", "consume OrderCreated"),
        ("event-relay", "consume OrderPaid"),
        ("event-relay", "consume OrderConfirmed"),
    ];
    let spans =
        integration_tests::eventually("the spans exported", Duration::from_secs(30), || {
            let spans = collector.spans();
            let ours: Vec<_> = spans.into_iter().filter(|s| s.trace_id == trace).collect();
            let all = want
                .iter()
                .all(|(svc, name)| ours.iter().any(|s| s.service == *svc && s.name == *name));
            async move { all.then_some(ours) }
        })
        .await;
    // every row the order caused carries the trace: its events and its jobs
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, traceparent FROM outbox WHERE aggregate_id = $1
         UNION ALL
         SELECT kind, traceparent FROM delayed_job_archive WHERE payload->>'order_id' = $1",
    )
    .bind(&order)
    .fetch_all(&db)
    .await
    .unwrap();
    for kind in [
        "OrderCreated",
        "OrderPaid",
        "OrderConfirmed",
        "stock.deduct",
        "voucher.issue",
        "order.notify",
    ] {
        assert!(rows.iter().any(|r| r.0 == kind), "no {kind} row: {rows:?}");
    }
    for (what, tp) in &rows {
        assert!(
            tp.as_deref().is_some_and(|tp| tp.contains(&trace)),
            "{what} is not in the order's trace {trace}: {tp:?}"
        );
    }

    // one trace, one root: the order request
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<_> = spans
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(roots, [("order-api", "POST /v1/orders")], "{spans:#?}");
    let mut services: Vec<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    services.sort();
    services.dedup();
    println!(
        "trace {trace}: {} spans from {services:?}: {:?}",
        spans.len(),
        spans.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
    );

    // a cancellation is part of its order's trace too
    let (cancelled, _, _) = s
        .order_with_payment("trace-user", "trace-2", ("sku-tr", "bar-tr"), "alipay")
        .await;
    s.cancel("trace-user", &cancelled).await;
    let traces: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT traceparent FROM orders WHERE id = $1::uuid
         UNION ALL
         SELECT traceparent FROM outbox WHERE aggregate_id = $1 AND event_type = 'OrderCancelled'",
    )
    .bind(&cancelled)
    .fetch_all(&db)
    .await
    .unwrap();
    let order_trace = traces[0].as_deref().unwrap().split('-').nth(1).unwrap();
    assert!(
        traces.len() == 2
            && traces[1]
                .as_deref()
                .is_some_and(|t| t.contains(order_trace)),
        "{traces:?}"
    );

    // the logs name the trace: the callback's "payment applied" line in order-api's JSON log
    let log = s.order_proc.log_text();
    let applied = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "payment applied")
        .unwrap_or_else(|| panic!("no payment applied line:\n{log}"));
    assert_eq!(applied["trace_id"], trace.as_str(), "{applied}");
    assert_eq!(applied["span"], "payment.callback", "{applied}");
    s.order_proc.terminate(Duration::from_secs(10));
}

/// The projection consumer stopped (SIGTERM: a rolling deploy) and replaced twice while
/// events flow: the new consumer takes the partitions over from the last committed offset,
/// events handled but not yet committed come again and the inbox absorbs them, and the
/// dashboard ends equal to the outbox with one inbox row per event. (A consumer SIGKILLed
/// instead is left to Kafka's session timeout; tansu, the local broker, does not expire such
/// a member, so that case is not exercised here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_resumes_from_its_committed_offsets_and_applies_each_event_once() {
    let orders = env_num("CONSUMER_RESTART_ORDERS", 600);
    let s =
        Arc::new(Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "600000".to_owned())]).await);
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut relay_only = relay_env(&tag);
    let mut consumer_only = relay_only.clone();
    relay_only.push(("CONSUMER_ENABLED", "false".to_owned()));
    consumer_only.push(("RELAY_ENABLED", "false".to_owned()));
    let (_relay, _) = s.event_relay(&relay_only).await;
    let (first, _) = s.event_relay(&consumer_only).await;
    s.put_sku("sku-cr", "bar-cr", 1_500, orders as i64 + 10)
        .await;

    let replacer = {
        let (s, env) = (s.clone(), consumer_only.clone());
        tokio::spawn(async move {
            let mut consumer = first;
            let mut replaced = 0;
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let status = consumer.terminate(Duration::from_secs(20));
                assert!(status.success(), "{status}: {}", consumer.log_text());
                (consumer, _) = s.event_relay(&env).await;
                replaced += 1;
            }
            (consumer, replaced)
        })
    };
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..orders {
        let (s, gate) = (s.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            // spread over the replacements: about 12 s of traffic
            tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
            let user = format!("cr-{i}");
            let (order, _, _) = s
                .order_with_payment(&user, "k", ("sku-cr", "bar-cr"), "alipay")
                .await;
            if i % 3 == 0 {
                s.cancel(&user, &order).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let (consumer, replaced) = replacer.await.unwrap();
    assert_eq!(replaced, 2);
    let want = json!([orders, orders.div_ceil(3)]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT created, cancelled FROM bar_dashboard WHERE store_id = 'bar-cr'",
        )
        .fetch_optional(&db)
        .await
        .unwrap();
        let got = row.map(|r| json!([r.0, r.1]));
        if got.as_ref() == Some(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard {got:?}, want {want}; consumer log: {}",
            consumer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (events, inbox): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM consumer_inbox)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(inbox, events, "one inbox row per event");
    println!("consumer restarts: {orders} orders, {events} events, consumer replaced twice; dashboard {want}, one inbox row per event");
}

/// An in-process relay on a fresh database with topics of its own (batches of 10, no
/// projection), driven burst by burst: the app, a pool on its database, its order topic.
async fn relay_alone() -> (std::sync::Arc<event_relay::App>, sqlx::PgPool, String) {
    let db = integration_tests::fresh_database().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let config = event_relay::Config {
        database_url: db.clone(),
        pg: integration_tests::test_pg_limits(4),
        run_migrations: true,
        brokers: BROKERS.to_owned(),
        order_topic: format!("bar.order.events.v1.{tag}"),
        dead_topic: format!("bar.compensation.dead.v1.{tag}"),
        partitions: 2,
        relay: true,
        batch: 10,
        poll: Duration::from_millis(20),
        delivery_timeout: Duration::from_secs(10),
        consumer: false,
        group: format!("bar-dashboard-{tag}"),
        leader_lease: Duration::from_secs(5),
    };
    event_relay::ensure_topics(BROKERS, &[&config.order_topic, &config.dead_topic], 2)
        .await
        .unwrap();
    let topic = config.order_topic.clone();
    let app = event_relay::App::build(config).await.unwrap();
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    (app, pool, topic)
}

/// The classic outbox pitfall: a transaction that took its row id first commits last. The
/// relay must neither skip that row (a plain cursor past it would) nor send it before the rows
/// of its order that came before it. Here row A (the lowest id) stays uncommitted while B and
/// C, written after it, commit and are published; the relay's position goes past A, keeping
/// its id as a gap, and once A commits the next burst publishes it. A rolled-back row's gap is
/// dropped. Also: a burst of many rounds (a batch of 10 rows) publishes every row once, in id
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_commits_after_higher_ids_is_published_late_never_skipped() {
    let (app, pool, topic) = relay_alone().await;
    let insert = "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type,
                      schema_version, payload)
                  VALUES (gen_random_uuid(), 'order', $1, 'OrderCreated', 1, '{}')
                  RETURNING id, event_id::text";

    // A takes the lowest id and stays open; B and C commit after it
    let mut late = pool.begin().await.unwrap();
    let (a_id, a_event): (i64, String) = sqlx::query_as(insert)
        .bind("order-a")
        .fetch_one(&mut *late)
        .await
        .unwrap();
    let mut early = Vec::new();
    for order in ["order-b", "order-c"] {
        let row: (i64, String) = sqlx::query_as(insert)
            .bind(order)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(row.0 > a_id);
        early.push(row.1);
    }
    assert_eq!(
        app.relay_once().await.unwrap(),
        2,
        "B and C go; A is not visible yet"
    );
    let position = event_relay::load_position(&pool).await.unwrap();
    assert!(position.through > a_id, "the relay went past A");
    assert!(
        position.gaps.iter().any(|g| (g.lo..=g.hi).contains(&a_id)),
        "A's id is a gap: {position:?}"
    );
    assert_eq!(app.relay_once().await.unwrap(), 0, "A is still not visible");
    assert_eq!(
        integration_tests::metric_value(&app.metrics.render(), "relay_position_gaps", &[]),
        Some(position.gaps.len() as f64),
        "the gaps watched are on /metrics"
    );
    let kept = event_relay::load_position(&pool).await.unwrap();
    assert!(
        kept.gaps.iter().any(|g| (g.lo..=g.hi).contains(&a_id)),
        "A's gap stays while its transaction runs, however many rounds pass: {kept:?}"
    );
    late.commit().await.unwrap();
    assert_eq!(app.relay_once().await.unwrap(), 1, "A goes once it commits");
    let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_unpublished")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(unpublished, 0);
    assert!(
        event_relay::load_position(&pool)
            .await
            .unwrap()
            .gaps
            .is_empty(),
        "A filled its gap"
    );

    // a rolled-back row leaves a gap that goes once nothing can fill it
    let mut rolled_back = pool.begin().await.unwrap();
    let (r_id, _): (i64, String) = sqlx::query_as(insert)
        .bind("order-r")
        .fetch_one(&mut *rolled_back)
        .await
        .unwrap();
    let after: (i64, String) = sqlx::query_as(insert)
        .bind("order-s")
        .fetch_one(&pool)
        .await
        .unwrap();
    let s_event = after.1;
    rolled_back.rollback().await.unwrap();
    assert_eq!(app.relay_once().await.unwrap(), 1, "S goes, R never will");
    // a later round sees every transaction older than the gap's horizon ended (in the whole
    // cluster: a test elsewhere holding a transaction open delays it)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert_eq!(app.relay_once().await.unwrap(), 0);
        let p = event_relay::load_position(&pool).await.unwrap();
        if !p.gaps.iter().any(|g| (g.lo..=g.hi).contains(&r_id)) {
            break;
        }
        assert!(Instant::now() < deadline, "R's gap is still there: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // one transaction's two rows of order E straddle order F's committed row: E1 is a gap
    // when F goes; once E commits, E1 (the gap's) and E2 (past the position) go together, in
    // id order
    let mut straddling = pool.begin().await.unwrap();
    let (_, e1): (i64, String) = sqlx::query_as(insert)
        .bind("order-e")
        .fetch_one(&mut *straddling)
        .await
        .unwrap();
    let (_, f): (i64, String) = sqlx::query_as(insert)
        .bind("order-f")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (_, e2): (i64, String) = sqlx::query_as(insert)
        .bind("order-e")
        .fetch_one(&mut *straddling)
        .await
        .unwrap();
    assert_eq!(
        app.relay_once().await.unwrap(),
        1,
        "F goes; E is not visible"
    );
    straddling.commit().await.unwrap();
    assert_eq!(app.relay_once().await.unwrap(), 2, "E1 and E2 go");

    // 95 rows of one order: one burst of ten rounds, each row once, in id order
    let mut written = Vec::new();
    for _ in 0..95 {
        let row: (i64, String) = sqlx::query_as(insert)
            .bind("order-d")
            .fetch_one(&pool)
            .await
            .unwrap();
        written.push(row.1);
    }
    let mut published = 0;
    while published < 95 {
        published += app.relay_once().await.unwrap();
    }
    assert_eq!(published, 95);

    let mut want: HashSet<String> = written.iter().cloned().collect();
    want.insert(a_event.clone());
    want.extend(early.iter().cloned());
    want.insert(s_event);
    want.extend([e1.clone(), e2.clone(), f]);
    let seen = read_topic(BROKERS, &topic, Duration::from_secs(60), &want).await;
    let ids: Vec<&str> = seen.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(ids.len(), 102, "each once: {ids:?}");
    let pos = |e: &str| ids.iter().position(|x| *x == e).unwrap();
    assert!(
        early.iter().all(|e| pos(e) < pos(&a_event)),
        "A went after B and C"
    );
    let d_order: Vec<&str> = seen
        .iter()
        .filter(|(_, k)| k == "order-d")
        .map(|(e, _)| e.as_str())
        .collect();
    assert_eq!(d_order, written, "one order's rows in the order written");
    assert!(pos(&e1) < pos(&e2), "E1 before E2");
}

/// The message an outbox row becomes, as every consumer reads it: the JSON envelope with the
/// payload's text as `data` (strings escaped where they need it, the time in RFC 3339 with
/// microseconds), the aggregate id as the key, the event named in headers with the trace
/// context. The relay builds it from the bytes Postgres sends, so this pins it to the row.
#[tokio::test]
async fn an_outbox_row_becomes_its_envelope_key_and_headers() {
    use rdkafka::message::Headers;
    let db = integration_tests::fresh_database().await;
    let store = postgres_store::PgStore::connect(&db, &integration_tests::test_pg_limits(2))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let rows: Vec<(i64, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        r#"INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, schema_version,
               payload, traceparent, created_at)
           VALUES (gen_random_uuid(), 'order', 'order "quoted" \ tab	é', 'OrderPaid', 3,
                   '{"store_id": "bar-1", "note": "✓ \"ok\"", "amount_cents": 19800}', $1,
                   '2026-12-01 15:04:05.123456+00'),
                  (gen_random_uuid(), 'payment', 'p-1', 'CompensationFailed', 1, '[1, 2]', NULL,
                   '1999-12-31 23:59:59.999999+00')
           RETURNING id, event_id::text, created_at"#,
    )
    .bind(traceparent)
    .fetch_all(&store.pool)
    .await
    .unwrap();
    let (batch, ids) = event_relay::read_messages(&store.pool, 0, 10)
        .await
        .unwrap();
    assert_eq!(ids, rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let want = [
        (
            "order \"quoted\" \\ tab\té",
            json!({
                "event_id": rows[0].1, "event_type": "OrderPaid", "schema_version": 3,
                "aggregate_type": "order", "aggregate_id": "order \"quoted\" \\ tab\té",
                "occurred_at": "2026-12-01T15:04:05.123456Z",
                "data": {"store_id": "bar-1", "note": "✓ \"ok\"", "amount_cents": 19800}
            }),
            vec![
                ("event_id", rows[0].1.as_str()),
                ("event_type", "OrderPaid"),
                ("schema_version", "3"),
                ("traceparent", traceparent),
            ],
            false,
        ),
        (
            "p-1",
            json!({
                "event_id": rows[1].1, "event_type": "CompensationFailed", "schema_version": 1,
                "aggregate_type": "payment", "aggregate_id": "p-1",
                "occurred_at": "1999-12-31T23:59:59.999999Z", "data": [1, 2]
            }),
            vec![
                ("event_id", rows[1].1.as_str()),
                ("event_type", "CompensationFailed"),
                ("schema_version", "1"),
            ],
            true,
        ),
    ];
    assert_eq!(batch.len(), want.len());
    for (m, (key, body, headers, dead)) in batch.messages.iter().zip(want) {
        let (k, b) = batch.key_and_body(m);
        assert_eq!(std::str::from_utf8(k).unwrap(), key);
        let got: Value = serde_json::from_slice(b).unwrap();
        assert_eq!(got, body);
        assert_eq!(
            got["occurred_at"],
            json!(rows
                .iter()
                .find(|r| r.1 == body["event_id"])
                .unwrap()
                .2
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            "the row's own time"
        );
        let got_headers: Vec<(String, String)> = (0..m.headers.count())
            .map(|i| {
                let h = m.headers.get(i);
                (
                    h.key.to_owned(),
                    String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect();
        let want_headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got_headers, want_headers);
        assert_eq!(m.dead, dead, "CompensationFailed goes to the dead topic");
    }
}

/// A relay whose lease is not the live one (it was paused and replaced) records no position:
/// the burst fails as fenced and the position stays where the live leader put it; under the
/// live lease the same burst records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_relay_leader_records_no_position() {
    use job_engine::leader::Fence;
    let (app, pool, _) = relay_alone().await;
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type,
             schema_version, payload)
         VALUES (gen_random_uuid(), 'order', 'o-1', 'OrderCreated', 1, '{}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut live =
        job_engine::Leadership::new(pool.clone(), "relay", "live", Duration::from_secs(5));
    assert!(live.ensure().await);
    let stale = Fence {
        epoch: live.epoch().unwrap() - 1,
        ..live.fence().unwrap()
    };
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let before = event_relay::load_position(&pool).await.unwrap();
    let err = app
        .relay_burst(Some((stale, until)))
        .await
        .expect_err("a stale lease records nothing");
    assert!(err.to_string().contains("no longer"), "{err}");
    assert_eq!(event_relay::load_position(&pool).await.unwrap(), before);
    // under the live lease: recorded, with its epoch
    assert_eq!(
        app.relay_burst(Some((live.fence().unwrap(), until)))
            .await
            .unwrap(),
        1,
        "the event is sent again and its position recorded"
    );
    assert!(event_relay::load_position(&pool).await.unwrap().through > before.through);
    let epoch: Option<i64> = sqlx::query_scalar("SELECT leader_epoch FROM outbox_relay")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(epoch, live.epoch());
}
