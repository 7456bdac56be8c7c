//! The compensation worker, on the real binaries: a payment whose callback is lost is found
//! by its check job and applied through `apply_payment` (source `compensation`); a payment not
//! paid yet is checked again until it is; a payment of a cancelled order stops being checked.

use std::time::Duration;

use integration_tests::binaries::Services;
use integration_tests::{eventually, token};
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
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM orders WHERE id = $1::uuid")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
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
    let r = http
        .post(format!("{}/v1/orders/{gone_id}/cancel", s.order_api))
        .bearer_auth(token("comp-user"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

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
            let attempts: Option<i32> = sqlx::query_scalar(
                "SELECT attempts FROM delayed_job_all
             WHERE kind = 'payment.check' AND payload->>'payment_id' IN
                   (SELECT id::text FROM payments WHERE order_id = $1::uuid)",
            )
            .bind(&late_id)
            .fetch_optional(&db)
            .await
            .unwrap();
            attempts.is_some_and(|a| a >= 2).then_some(())
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
    let metrics = http
        .get(format!("{worker}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"compensation_attempts_total{outcome="paid",service="compensation-worker"} 2"#,
        r#"compensation_attempts_total{outcome="order_closed",service="compensation-worker"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
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
    let r = http
        .post(format!("{}/v1/orders/{id}/cancel", s.order_api))
        .bearer_auth(token("rf-user"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // the provider makes the refund but its answer comes after the worker gave up
    s.set_faults(json!({ "refund_timeout_rate": 1.0, "query_timeout_ms": 2000 }))
        .await;
    // the buyer pays anyway: the money cannot be kept
    http.post(&pay_url).send().await.unwrap();
    let order_state = || {
        let (db, id) = (db.clone(), id.clone());
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM orders WHERE id = $1::uuid")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    eventually(
        "a refund attempt to time out",
        Duration::from_secs(20),
        || async {
            let attempts: Option<i32> = sqlx::query_scalar(
            "SELECT attempts FROM delayed_job_all WHERE dedupe_key = $1 AND last_error IS NOT NULL",
        )
        .bind(format!("payment.refund:{payment}"))
        .fetch_optional(&db)
        .await
        .unwrap();
            attempts.is_some_and(|a| a >= 1).then_some(())
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
    let metrics = http
        .get(format!("{worker}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"refunds_total{outcome="refunded",service="compensation-worker"} 1"#),
        "{metrics}"
    );
}
