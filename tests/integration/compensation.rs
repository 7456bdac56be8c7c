//! The compensation worker, on the real binaries: a payment whose callback is lost is found
//! by its check job and applied through `apply_payment` (source `compensation`); a payment not
//! paid yet is checked again until it is; a payment of a cancelled order stops being checked.

use std::time::Duration;

use integration_tests::binaries::Services;
use integration_tests::eventually;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn count(db: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_payment_whose_callback_was_lost_is_found_and_applied_once() {
    let s = Services::start(
        &[],
        &[
            ("PRELOCK_TIMEOUT_MS", "2000".to_owned()),
            ("PAYMENT_FIRST_CHECK_MS", "300".to_owned()),
        ],
    )
    .await;
    let (_worker, worker) = s
        .compensation_worker(&[("PAYMENT_CHECK_INTERVAL_MS", "700".to_owned())])
        .await;
    let http = &s.http;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-comp", "bar-c", 5_000, 10).await;
    // every callback is lost
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    let order_with_payment =
        |key: &'static str| s.order_with_payment("comp-user", key, ("sku-comp", "bar-c"), "wechat");
    let state = |id: String| {
        let db = db.clone();
        async move { integration_tests::order_state(&db, &id).await }
    };

    // paid at once, callback lost: the first check finds it
    let (paid_id, paid_payment, pay_url) = order_with_payment("c-1").await;
    let sim: Value = http
        .post(&pay_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sim["callback_dropped"], true);
    // paid later: checked (not yet paid) until it is
    let (late_id, _, late_url) = order_with_payment("c-2").await;
    // cancelled before paying: checks stop
    let (gone_id, gone_payment, _) = order_with_payment("c-3").await;
    s.cancel("comp-user", &gone_id).await;

    eventually(
        "the lost callback compensated",
        Duration::from_secs(20),
        || async { (state(paid_id.clone()).await == "PAID").then_some(()) },
    )
    .await;
    eventually(
        "the late payment checked at least twice",
        Duration::from_secs(20),
        || async {
            let checks: Option<i32> = sqlx::query_scalar(
                "SELECT checks FROM payment_check_state
                 WHERE payment_id IN (SELECT id FROM payments WHERE order_id = $1::uuid)",
            )
            .bind(&late_id)
            .fetch_optional(&db)
            .await
            .unwrap();
            checks.is_some_and(|n| n >= 2).then_some(())
        },
    )
    .await;
    assert_eq!(state(late_id.clone()).await, "PENDING");
    http.post(&late_url).send().await.unwrap();
    eventually(
        "the late payment compensated",
        Duration::from_secs(20),
        || async { (state(late_id.clone()).await == "PAID").then_some(()) },
    )
    .await;
    eventually(
        "the cancelled order's check to end",
        Duration::from_secs(20),
        || async {
            let done: Option<String> =
                sqlx::query_scalar("SELECT state FROM delayed_job_all WHERE dedupe_key = $1")
                    .bind(format!("payment.check:{gone_payment}"))
                    .fetch_optional(&db)
                    .await
                    .unwrap();
            (done.as_deref() == Some("completed")).then_some(())
        },
    )
    .await;

    // applied once each, recorded as compensation, with one follow-up set per order
    let from_compensation = count(
        &db,
        "SELECT count(*) FROM payment_events WHERE source = 'compensation' AND outcome = 'PAID'",
    )
    .await;
    assert_eq!(from_compensation, 2);
    let versions = count(
        &db,
        "SELECT count(*) FROM orders WHERE state = 'PAID' AND version = 2",
    )
    .await;
    assert_eq!(versions, 2);
    let deduct_jobs = count(
        &db,
        "SELECT count(*) FROM delayed_job_all WHERE kind = 'stock.deduct'",
    )
    .await;
    assert_eq!(deduct_jobs, 2);
    let paid_check: String =
        sqlx::query_scalar("SELECT state FROM delayed_job_all WHERE dedupe_key = $1")
            .bind(format!("payment.check:{paid_payment}"))
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(paid_check, "completed");
    let metrics = s.metrics(&worker).await;
    for line in [
        r#"compensation_attempts_total{outcome="paid",service="compensation-worker"} 2"#,
        r#"compensation_attempts_total{outcome="order_closed",service="compensation-worker"} 1"#,
        // the engine's metrics, every kind from 0: a first dead refund pages (JobsDead)
        r#"jobs_total{kind="payment.refund",outcome="dead",service="compensation-worker"} 0"#,
        r#"jobs_total{kind="payment.check",outcome="completed",service="compensation-worker"}"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    integration_tests::assert_buckets_span_the_alerts(&metrics, "payment_paid_latency_seconds");
    integration_tests::assert_buckets_span_the_alerts(&metrics, "job_fire_delay_seconds");
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_two_workers_with_a_lock_that_expires_at_once_apply_each_payment_once() {
    let s = Services::start(
        &[],
        &[
            ("PRELOCK_TIMEOUT_MS", "2000".to_owned()),
            ("PAYMENT_FIRST_CHECK_MS", "200".to_owned()),
        ],
    )
    .await;
    // A 1 ms lock saves no work. Late and duplicated callbacks race the checks of two
    // workers for the same payments; only the payment row lock and the version check stand
    // between them and a double transition.
    let worker_env = [
        ("PAYMENT_CHECK_INTERVAL_MS", "300".to_owned()),
        ("COMPENSATION_LOCK_TTL_MS", "1".to_owned()),
        ("JOB_POLL_MS", "50".to_owned()),
        ("GATEWAY_TIMEOUT_MS", "1000".to_owned()),
    ];
    let (_a, _) = s.compensation_worker(&worker_env).await;
    let (_b, _) = s.compensation_worker(&worker_env).await;
    let http = &s.http;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-race", "bar-r", 1_000, 100).await;
    // half the callbacks lost, the rest late (up to 1.5 s) and some duplicated; a third of
    // the queries time out
    s.set_faults(json!({
        "drop_rate": 0.5, "delay_rate": 1.0, "delay_ms": 1500,
        "duplicate_rate": 0.3, "duplicate_count": 2,
        "query_timeout_rate": 0.3, "query_timeout_ms": 1500
    }))
    .await;
    const ORDERS: usize = 40;
    for n in 0..ORDERS {
        let user = format!("racer-{n}");
        let (_, _, pay_url) = s
            .order_with_payment(&user, "k", ("sku-race", "bar-r"), "douyin")
            .await;
        http.post(pay_url).send().await.unwrap();
    }
    eventually(
        "every payment applied",
        Duration::from_secs(120),
        || async {
            let paid: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'PAID'")
                .fetch_one(&db)
                .await
                .unwrap();
            (paid == ORDERS as i64).then_some(())
        },
    )
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM orders WHERE version <> 2").await,
        0,
        "a double transition"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE event_type = 'OrderPaid'"
        )
        .await,
        ORDERS as i64
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM delayed_job_all WHERE kind = 'stock.deduct'"
        )
        .await,
        ORDERS as i64,
        "follow-ups written once per order"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM payment_events WHERE outcome = 'PAID'"
        )
        .await,
        ORDERS as i64
    );
    let by_source: Vec<(String, i64)> = sqlx::query_as(
        "SELECT source, count(*) FROM payment_events WHERE outcome = 'PAID' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    eprintln!("payments applied by source: {by_source:?}");
    assert!(
        by_source.iter().any(|(s, _)| s == "compensation"),
        "no payment was compensated: {by_source:?}"
    );
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_for_a_cancelled_order_is_refunded_once_though_the_first_answer_is_lost() {
    let s = Services::start(&[], &[("PRELOCK_TIMEOUT_MS", "2000".to_owned())]).await;
    let (_worker, worker) = s
        .compensation_worker(&[
            ("GATEWAY_TIMEOUT_MS", "400".to_owned()),
            ("JOB_BACKOFF_BASE_MS", "200".to_owned()),
        ])
        .await;
    let http = &s.http;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-rf", "bar-rf", 2_000, 5).await;
    let (id, payment, pay_url) = s
        .order_with_payment("rf-user", "rf-1", ("sku-rf", "bar-rf"), "alipay")
        .await;
    // the provider makes the refund but its answer comes after the worker gave up; and the
    // buyer's callback is lost
    s.set_faults(json!({ "refund_timeout_rate": 1.0, "query_timeout_ms": 2000, "drop_rate": 1.0 }))
        .await;
    // the buyer pays, then cancels before the money is seen: the cancel brings the check
    // forward, it finds the money, and the money cannot be kept (a cancel first would close the
    // payment at the provider, so the buyer could not pay it at all)
    http.post(&pay_url).send().await.unwrap();
    s.cancel("rf-user", &id).await;
    let order_state = || {
        let (db, id) = (db.clone(), id.clone());
        async move { integration_tests::order_state(&db, &id).await }
    };
    eventually(
        "a refund attempt to time out",
        Duration::from_secs(20),
        || async {
            let failures: Option<i32> = sqlx::query_scalar(
                "SELECT failures FROM payment_check_state
                 WHERE payment_id = $1::uuid AND last_outcome = 'refund_gateway_error'",
            )
            .bind(&payment)
            .fetch_optional(&db)
            .await
            .unwrap();
            failures.is_some_and(|n| n >= 1).then_some(())
        },
    )
    .await;
    assert_eq!(order_state().await, "REFUND_PENDING");
    s.set_faults(json!({})).await;
    eventually("the order refunded", Duration::from_secs(20), || async {
        (order_state().await == "REFUNDED").then_some(())
    })
    .await;
    let sim: Value = http
        .get(format!("{}/v1/sim/payments/{payment}", s.gateway))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        sim["refunds"].as_array().unwrap().len(),
        1,
        "paid back once: {sim}"
    );
    let (status, refund_id): (String, Option<String>) =
        sqlx::query_as("SELECT status, refund_id FROM payments WHERE id = $1::uuid")
            .bind(&payment)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), refund_id),
        ("REFUNDED", Some(format!("rf-{payment}")))
    );
    let refunded = count(
        &db,
        "SELECT count(*) FROM outbox WHERE event_type = 'OrderRefunded'",
    )
    .await;
    assert_eq!(refunded, 1);
    let metrics = s.metrics(&worker).await;
    assert!(
        metrics.contains(r#"refunds_total{outcome="refunded",service="compensation-worker"} 1"#),
        "{metrics}"
    );
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

/// The lock holder stops (SIGSTOP) in the middle of applying a payment, holding the Redis
/// lock and the payment's row, and stays stopped past the lock's TTL and its job lease. A
/// second worker rescues the job, takes the expired lock and tries the same payment; the
/// first wakes up (SIGCONT) and finishes. One transition, one OrderPaid, one set of
/// follow-ups. (The paused leader keeps its advisory lock: the rescue that hands the job to
/// the second worker runs on every instance for exactly this reason.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_paused_past_its_ttl_while_another_worker_takes_over_makes_one_transition() {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "300".to_owned())]).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let redis = redis::Client::open(integration_tests::redis_url(0)).unwrap();
    let kv = redis.get_multiplexed_async_connection().await.unwrap();
    // worker A reaches prelock-service through a proxy that answers 3 s late: it sits in
    // apply_payment, lock held, long enough to be stopped there
    let proxy = integration_tests::fault_proxy::FaultProxy::start(&s.prelock).await;
    proxy.delay_responses(Duration::from_secs(3));
    let short = [
        ("COMPENSATION_LOCK_TTL_MS", "1000".to_owned()),
        ("JOB_LEASE_MS", "2500".to_owned()),
        ("JOB_MAINTENANCE_MS", "200".to_owned()),
    ];
    let mut a_env = short.to_vec();
    a_env.push(("PRELOCK_URL", proxy.url.clone()));
    a_env.push(("PRELOCK_TIMEOUT_MS", "10000".to_owned()));
    let (mut a, a_url) = s.compensation_worker(&a_env).await;
    s.put_sku("sku-stop", "bar-stop", 900, 3).await;
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    let (order, payment, _) = s
        .order_with_payment("stop-user", "st-1", ("sku-stop", "bar-stop"), "wechat")
        .await;
    s.pay(&payment).await;
    let key = format!("compensate:order:{payment}");
    let a_token: String = eventually("worker A to take the lock", Duration::from_secs(20), || {
        let mut kv = kv.clone();
        let key = key.clone();
        async move {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(&mut kv)
                .await
                .unwrap()
        }
    })
    .await;
    // A is inside apply_payment (waiting on the late pre-lock answer): stop it there
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = a.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());

    // B rescues the job once A's lease lapses, and takes the lock A's TTL freed
    let (_b, b_url) = s.compensation_worker(&short).await;
    let b_token: String = eventually(
        "worker B to take the expired lock",
        Duration::from_secs(30),
        || {
            let mut kv = kv.clone();
            let (key, a_token) = (key.clone(), a_token.clone());
            async move {
                let now: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut kv)
                    .await
                    .unwrap();
                now.filter(|t| *t != a_token)
            }
        },
    )
    .await;
    assert_ne!(a_token, b_token);
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());

    eventually("the order paid", Duration::from_secs(20), || async {
        (integration_tests::order_state(&db, &order).await == "PAID").then_some(())
    })
    .await;
    // both workers finish what they started
    eventually(
        "both workers' attempts counted",
        Duration::from_secs(30),
        || async {
            let mut done = 0.0;
            for url in [&a_url, &b_url] {
                let m = s.metrics(url).await;
                for outcome in ["paid", "duplicate", "locked", "failed"] {
                    done += integration_tests::metric_value(
                        &m,
                        "compensation_attempts_total",
                        &[("outcome", outcome)],
                    )
                    .unwrap_or(0.0);
                }
            }
            (done >= 2.0).then_some(())
        },
    )
    .await;
    let (state, version): (String, i32) =
        sqlx::query_as("SELECT state, version FROM orders WHERE id = $1::uuid")
            .bind(&order)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((state.as_str(), version), ("PAID", 2), "one transition");
    let paid_events = count(&db, &format!("SELECT count(*) FROM outbox WHERE aggregate_id = '{order}' AND event_type = 'OrderPaid'")).await;
    assert_eq!(paid_events, 1);
    let applied = count(&db, &format!("SELECT count(*) FROM payment_events WHERE payment_id = '{payment}' AND outcome = 'PAID'")).await;
    assert_eq!(applied, 1);
    let follow_ups = count(&db, &format!("SELECT count(*) FROM delayed_job_all WHERE payload->>'order_id' = '{order}' AND kind IN ('stock.deduct', 'voucher.issue', 'order.notify')")).await;
    assert_eq!(follow_ups, 3);
    a.terminate(Duration::from_secs(20));
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

/// Money that arrives after the order expired, found by compensation (its callback lost):
/// re-reserved and PAID while the unit is still there; when another buyer took it,
/// REFUND_PENDING, then REFUNDED once the provider paid it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_payment_found_by_compensation_is_re_reserved_or_refunded() {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "300".to_owned())]).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let (_scheduler, _) = s.scheduler(&[]).await;
    let (_worker, worker) = s
        .compensation_worker(&[("PAYMENT_CHECK_INTERVAL_MS", "500".to_owned())])
        .await;
    for sku in ["sku-late-a", "sku-late-b"] {
        let r = s
            .http
            .put(format!("{}/v1/skus/{sku}", s.prelock))
            .bearer_auth(integration_tests::ops_token())
            .json(&json!({"store_id": "bar-late", "price_cents": 1_500, "stock": 1, "prelock_ttl_seconds": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    let state = |id: String| {
        let db = db.clone();
        async move { integration_tests::order_state(&db, &id).await }
    };
    // hold the checks while the orders lapse (a check of an expired, unpaid order closes its
    // payment at the provider: the buyer below pays in the moment before that)
    s.pause_kind(&worker, "payment.check", true).await;

    let (a, a_pay, _) = s
        .order_with_payment("late-a", "la-1", ("sku-late-a", "bar-late"), "wechat")
        .await;
    let (b, b_pay, _) = s
        .order_with_payment("late-b", "lb-1", ("sku-late-b", "bar-late"), "alipay")
        .await;
    for id in [&a, &b] {
        eventually("the order to expire", Duration::from_secs(20), || async {
            (state(id.clone()).await == "EXPIRED").then_some(())
        })
        .await;
    }
    // another buyer takes b's unit
    let (c, _, _) = s
        .order_with_payment("late-c", "lc-1", ("sku-late-b", "bar-late"), "douyin")
        .await;
    assert_eq!(state(c.clone()).await, "PENDING");
    // both pay late; the callbacks are lost
    s.pay(&a_pay).await;
    s.pay(&b_pay).await;
    s.pause_kind(&worker, "payment.check", false).await;

    eventually(
        "a re-reserved and paid",
        Duration::from_secs(30),
        || async { (state(a.clone()).await == "PAID").then_some(()) },
    )
    .await;
    eventually("b refunded", Duration::from_secs(30), || async {
        (state(b.clone()).await == "REFUNDED").then_some(())
    })
    .await;
    let b_path: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM outbox WHERE aggregate_id = $1 ORDER BY id")
            .bind(&b)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        b_path,
        [
            "OrderCreated",
            "OrderExpired",
            "RefundRequested",
            "OrderRefunded"
        ]
    );
    let refunds = s.sim_payment(&b_pay).await["refunds"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(refunds, 1);
    assert_eq!(
        s.sim_payment(&a_pay).await["refunds"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // c keeps the unit it holds
    assert_eq!(state(c).await, "PENDING");
    integration_tests::assert_emitted_events_match_schemas(
        &db,
        &[
            "OrderExpired",
            "RefundRequested",
            "OrderRefunded",
            "OrderPaid",
        ],
    )
    .await;
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

/// The compensation lock lives in Redis, and only saves work: a Redis that hangs (here
/// `SIGSTOP`ped, its connection open and never answered) must cost a check its
/// `REDIS_TIMEOUT_MS`, not hold it. The scenario saw a worker's checks wait two minutes after
/// a Redis restart when the lock's calls had no bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_delays_compensation_by_its_timeout_only() {
    let s = Services::start(
        &[],
        &[
            ("PRELOCK_TIMEOUT_MS", "2000".to_owned()),
            ("PAYMENT_FIRST_CHECK_MS", "300".to_owned()),
        ],
    )
    .await;
    let lock_redis =
        integration_tests::binaries::ScratchRedis::start(integration_tests::binaries::free_port())
            .await;
    let (_worker, _) = s
        .compensation_worker(&[
            ("PAYMENT_CHECK_INTERVAL_MS", "700".to_owned()),
            ("REDIS_URL", lock_redis.url()),
            ("REDIS_TIMEOUT_MS", "300".to_owned()),
        ])
        .await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-hung", "bar-h", 5_000, 10).await;
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    // the lock's connection is open (a first payment went through it) when Redis hangs, and
    // then when it is gone altogether (each call reconnects, and is bounded as a whole)
    let mut lock_redis = lock_redis;
    for (key, fault) in [("h-1", ""), ("h-2", "hang"), ("h-3", "gone")] {
        let (id, _, pay_url) = s
            .order_with_payment("hung-user", key, ("sku-hung", "bar-h"), "alipay")
            .await;
        match fault {
            "hang" => lock_redis.signal("STOP"),
            "gone" => lock_redis.stop(),
            _ => {}
        }
        s.http.post(&pay_url).send().await.unwrap();
        eventually(
            "the lost callback compensated",
            Duration::from_secs(20),
            || {
                let (db, id) = (db.clone(), id.clone());
                async move {
                    (integration_tests::order_state(&db, &id).await == "PAID").then_some(())
                }
            },
        )
        .await;
    }
}
