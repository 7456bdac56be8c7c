//! What compensation does when it cannot resolve a payment on its own, on the real binaries:
//! provider failures are retried with backoff, then archived with their context, a
//! `CompensationFailed` event and one rate-limited alert per storm; an operator edits and
//! replays a failure (audited); a payment the provider closed is closed here; a payment with
//! no check job is found by the sweep.

use std::time::Duration;

use integration_tests::binaries::Services;
use integration_tests::receiver::Receiver;
use integration_tests::{eventually, metric_value, order_state};
use reqwest::Method;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn count(db: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_archived_alerted_once_per_storm_and_replayed_with_an_edited_transaction_id() {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "200".to_owned())]).await;
    let hook = Receiver::start().await;
    let (_worker, worker) = s
        .compensation_worker(&[
            ("COMPENSATION_MAX_ATTEMPTS", "3".to_owned()),
            ("COMPENSATION_BACKOFF_BASE_MS", "100".to_owned()),
            ("COMPENSATION_BACKOFF_CAP_MS", "300".to_owned()),
            ("ALERT_WEBHOOK_URL", hook.url.clone()),
            ("ALERT_MIN_INTERVAL_MS", "3000".to_owned()),
        ])
        .await;
    let http = &s.http;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-fail", "bar-f", 3_000, 20).await;
    s.set_faults(json!({ "drop_rate": 1.0 })).await;

    // five paid payments, callbacks lost, and the provider's query by payment id broken
    let mut paid = Vec::new();
    for n in 0..5 {
        let (order, payment, _) = s
            .order_with_payment(
                "fail-user",
                &format!("f-{n}"),
                ("sku-fail", "bar-f"),
                "alipay",
            )
            .await;
        s.break_query(&payment, true).await;
        s.pay(&payment).await;
        paid.push((order, payment));
    }
    let failures: Vec<Value> = eventually(
        "five failures archived",
        Duration::from_secs(30),
        || async {
            let list = s.open_failures(&worker).await;
            (list.len() == 5).then_some(list)
        },
    )
    .await;
    for f in &failures {
        assert_eq!(f["reason"], "gateway_error", "{f}");
        assert_eq!(f["attempts"], 3, "{f}");
        assert_eq!(f["order_state"], "PENDING");
        // the whole context: the payment, the order and every check
        assert_eq!(f["context"]["payment"]["status"], "CREATED");
        assert_eq!(f["context"]["order"]["state"], "PENDING");
        let checks = f["context"]["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 3, "{f}");
        assert!(checks.iter().all(|c| c["outcome"] == "gateway_error"));
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE event_type = 'CompensationFailed'"
        )
        .await,
        5
    );
    // each failure checked three times, with backoff between (100 ms, then 300 ms)
    let spans: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (history->2->>'at')::timestamptz - (history->0->>'at')::timestamptz)::float8
         FROM payment_check_state",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(spans.len(), 5);
    assert!(spans.iter().all(|s| *s >= 0.25), "{spans:?}");

    // one storm, rate-limited: the first at once, the rest in one summary
    let alerts = eventually("the summary alert", Duration::from_secs(10), || async {
        let got = hook.received();
        let total: u64 = got.iter().map(|a| a["failures"].as_u64().unwrap()).sum();
        (total == 5).then_some(got)
    })
    .await;
    assert!(alerts.len() <= 2, "{alerts:?}");
    let text = alerts.last().unwrap()["text"]["content"].as_str().unwrap();
    assert!(
        text.contains("compensation failures") || text.contains("Compensation failed"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hook.received().len(), alerts.len(), "no further alerts");

    let target = &failures[0];
    let id = target["id"].as_i64().unwrap();
    let payment = target["payment_id"].as_str().unwrap().to_owned();
    let order = target["order_id"].as_str().unwrap().to_owned();
    let url = format!("{worker}/v1/ops/compensation/failures/{id}");

    let replay = |who: Option<&'static str>, url: String| {
        let s = &s;
        async move {
            s.ops(Method::POST, &format!("{url}/replay"), who, None)
                .await
        }
    };

    // only an operator's token replays: a wrong one is 401, the service token and a bar's
    // store token are credentials of another kind (403); none of them is audited
    for (token, want) in [
        ("not-the-token".to_owned(), StatusCode::UNAUTHORIZED),
        (
            integration_tests::SERVICE_TOKEN.to_owned(),
            StatusCode::FORBIDDEN,
        ),
        (
            integration_tests::store_token("bar-1"),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let r = http
            .post(format!("{url}/replay"))
            .bearer_auth(&token)
            .header("X-Operator", "mallory")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
    }

    // a replay as archived fails the same way: audited, still open
    let (_, r) = replay(Some("alice"), url.clone()).await;
    assert!(
        r["outcome"].as_str().unwrap().starts_with("gateway_error"),
        "{r}"
    );
    assert_eq!(r["resolved"], false);

    // bad parameters are refused, naming the field
    let edit = |txn: &str| json!({ "params": { "transaction_id": txn } });
    let (status, r) = s
        .ops(
            Method::PATCH,
            &url,
            Some("alice"),
            Some(edit("no spaces allowed")),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(r["message"].as_str().unwrap().contains("transaction_id"));

    // the provider's transaction id, read off its console, gets round the broken query
    let txn = s.sim_payment(&payment).await["transaction_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = s
        .ops(Method::PATCH, &url, Some("alice"), Some(edit(&txn)))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, r) = replay(Some("bob"), url.clone()).await;
    assert_eq!(r["outcome"], "paid", "{r}");
    assert_eq!(r["resolved"], true);
    assert_eq!(r["failure"]["resolution"], "replay");
    assert_eq!(order_state(&db, &order).await, "PAID");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM payment_events WHERE source = 'replay' AND outcome = 'PAID'"
        )
        .await,
        1
    );

    // the audit trail: replay (failed), edit, replay (paid), each naming its operator
    let (_, d) = s.ops(Method::GET, &url, None, None).await;
    let trail: Vec<(&str, &str, &str)> = d["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let outcome = a["outcome"].as_str().unwrap();
            (
                a["operator"].as_str().unwrap(),
                a["action"].as_str().unwrap(),
                outcome.split(':').next().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        trail,
        [
            ("alice", "replay", "gateway_error"),
            ("alice", "edit", "edited"),
            ("bob", "replay", "paid"),
        ]
    );
    assert_eq!(d["audit"][1]["detail"]["after"]["transaction_id"], txn);

    // resolved: no second replay
    assert_eq!(
        replay(Some("bob"), url.clone()).await.0,
        StatusCode::CONFLICT
    );

    // the mended query: an ordinary replay applies another one
    let second = &failures[1];
    s.break_query(second["payment_id"].as_str().unwrap(), false)
        .await;
    let second_url = format!("{worker}/v1/ops/compensation/failures/{}", second["id"]);
    let (_, r) = replay(Some("carol"), second_url).await;
    assert_eq!(r["outcome"], "paid", "{r}");

    // the worker documents its ops API, the shared job routes included
    let (_, doc) = s
        .ops(Method::GET, &format!("{worker}/openapi.json"), None, None)
        .await;
    for path in [
        "/v1/ops/compensation/failures",
        "/v1/ops/compensation/failures/{id}",
        "/v1/ops/compensation/failures/{id}/replay",
        "/v1/ops/compensation/sla",
        "/v1/ops/jobs",
        "/v1/ops/jobs/{id}/redrive",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
    }
    let (_, sla) = s
        .ops(
            Method::GET,
            &format!("{worker}/v1/ops/compensation/sla"),
            None,
            None,
        )
        .await;
    assert_eq!(sla["open_failures"], 3, "{sla}");
    assert_eq!(sla["failed"], 5, "{sla}");
    assert_eq!(sla["compensated"], 2, "{sla}");
    let rate = sla["success_rate"].as_f64().unwrap();
    assert!((rate - 2.0 / 7.0).abs() < 1e-9, "{sla}");
    let metrics = s.metrics(&worker).await;
    for (name, label, want) in [
        (
            "compensation_failures_total",
            ("reason", "gateway_error"),
            5.0,
        ),
        (
            "compensation_attempts_total",
            ("outcome", "gateway_error"),
            15.0,
        ),
        (
            "payment_paid_latency_seconds_count",
            ("source", "replay"),
            2.0,
        ),
    ] {
        assert_eq!(
            metric_value(&metrics, name, &[label]),
            Some(want),
            "{name} in\n{metrics}"
        );
    }
    eventually("the gauges refreshed", Duration::from_secs(15), || async {
        let m = s.metrics(&worker).await;
        (metric_value(&m, "compensation_open_failures", &[]) == Some(3.0)).then_some(())
    })
    .await;
    integration_tests::assert_emitted_events_match_schemas(&db, &["CompensationFailed"]).await;
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_closed_at_the_provider_is_closed_and_one_without_a_check_job_is_swept() {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "200".to_owned())]).await;
    let http = &s.http;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-sw", "bar-s", 2_000, 10).await;
    s.set_faults(json!({ "drop_rate": 1.0 })).await;

    // closed at the provider before the buyer paid
    let (closed_order, closed_payment, _) = s
        .order_with_payment("sw-user", "sw-1", ("sku-sw", "bar-s"), "wechat")
        .await;
    let r = http
        .post(format!(
            "{}/v1/sim/payments/{closed_payment}/close",
            s.gateway
        ))
        .json(&json!({ "status": "CLOSED" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // a payment whose check job is gone (written before the worker existed, or lost)
    let (swept_order, swept_payment, _) = s
        .order_with_payment("sw-user", "sw-2", ("sku-sw", "bar-s"), "wechat")
        .await;
    let deleted = sqlx::query("DELETE FROM delayed_job WHERE dedupe_key = $1")
        .bind(format!("payment.check:{swept_payment}"))
        .execute(&db)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 1);
    s.pay(&swept_payment).await;

    // a cancelled order: its payment is closed at the provider, so it can no longer be paid
    let (cancelled_order, cancelled_payment, _) = s
        .order_with_payment("sw-user", "sw-3", ("sku-sw", "bar-s"), "alipay")
        .await;
    s.cancel("sw-user", &cancelled_order).await;

    let (_worker, worker) = s
        .compensation_worker(&[
            ("COMPENSATION_SWEEP_MS", "300".to_owned()),
            ("COMPENSATION_SWEEP_GRACE_MS", "0".to_owned()),
        ])
        .await;
    eventually(
        "the swept payment paid",
        Duration::from_secs(20),
        || async { (order_state(&db, &swept_order).await == "PAID").then_some(()) },
    )
    .await;
    eventually(
        "the closed payment closed",
        Duration::from_secs(20),
        || async {
            let st: String = sqlx::query_scalar("SELECT status FROM payments WHERE id = $1::uuid")
                .bind(&closed_payment)
                .fetch_one(&db)
                .await
                .unwrap();
            (st == "CLOSED").then_some(())
        },
    )
    .await;
    eventually(
        "the cancelled order's payment closed at the provider",
        Duration::from_secs(20),
        || async {
            let here: String =
                sqlx::query_scalar("SELECT status FROM payments WHERE id = $1::uuid")
                    .bind(&cancelled_payment)
                    .fetch_one(&db)
                    .await
                    .unwrap();
            let there = s.sim_payment(&cancelled_payment).await["status"].clone();
            (here == "CLOSED" && there == "CLOSED").then_some(())
        },
    )
    .await;
    // the buyer's app can no longer pay it
    assert_eq!(s.pay(&cancelled_payment).await["status"], "CLOSED");
    // the order is still payable, with a new payment
    assert_eq!(order_state(&db, &closed_order).await, "PENDING");
    let r = http
        .post(format!("{}/v1/orders/{closed_order}/payments", s.order_api))
        .bearer_auth(integration_tests::token("sw-user"))
        .json(&json!({ "provider": "wechat" }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let again: Value = r.json().await.unwrap();
    assert_ne!(again["payment_id"].as_str().unwrap(), closed_payment);

    let metrics = s.metrics(&worker).await;
    for (name, labels, want) in [
        ("compensation_swept_total", &[][..], 1.0),
        (
            "compensation_attempts_total",
            &[("outcome", "closed_at_provider")][..],
            1.0,
        ),
        (
            "compensation_attempts_total",
            &[("outcome", "paid")][..],
            1.0,
        ),
    ] {
        assert_eq!(
            metric_value(&metrics, name, labels),
            Some(want),
            "{name} in\n{metrics}"
        );
    }
    // the sweep does not touch payments that have their check job: exactly one per payment
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM delayed_job_all WHERE kind = 'payment.check'"
        )
        .await,
        4
    );
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

/// The SLA trigger on the real worker: slow callbacks alone keep the normal poll; slow
/// callbacks and a transaction missing its events switch to the fast poll (checks already
/// waiting come forward); callbacks stopping takes it back to normal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_callbacks_and_missing_events_together_switch_compensation_to_fast_polling() {
    let s = std::sync::Arc::new(
        Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "300".to_owned())]).await,
    );
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let (_worker, worker) = s
        .compensation_worker(&[
            ("SLA_WINDOW_MS", "2000".to_owned()),
            ("SLA_CALLBACK_P99_MS", "200".to_owned()),
            ("PAYMENT_CHECK_INTERVAL_MS", "60000".to_owned()),
            ("PAYMENT_CHECK_FAST_INTERVAL_MS", "300".to_owned()),
        ])
        .await;
    s.put_sku("sku-sla", "bar-sla", 500, 200).await;
    let fast_mode = || {
        let (s, worker) = (s.clone(), worker.clone());
        async move {
            let m = s.metrics(&worker).await;
            metric_value(&m, "compensation_fast_mode", &[]).unwrap()
        }
    };
    let checks_of = |payment: String| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i32>(
                "SELECT checks FROM payment_check_state WHERE payment_id = $1::uuid",
            )
            .bind(payment)
            .fetch_optional(&db)
            .await
            .unwrap()
            .unwrap_or(0)
        }
    };
    // a payment nobody pays: checked once, then not for a minute
    let (_, unpaid, _) = s
        .order_with_payment("sla-x", "sla-x", ("sku-sla", "bar-sla"), "wechat")
        .await;
    eventually("the first check", Duration::from_secs(10), || async {
        (checks_of(unpaid.clone()).await == 1).then_some(())
    })
    .await;

    // checks held: no check can see a payment whose callback is still on its way (that is
    // the evidence of missing events, not wanted yet)
    s.pause_kind(&worker, "payment.check", true).await;
    // callbacks 0 to 600 ms late, a steady stream of them
    let slow = json!({ "delay_rate": 1.0, "delay_ms": 600 });
    s.set_faults(slow.clone()).await;
    let stream = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..90 {
                let (_, p, _) = s
                    .order_with_payment(&format!("sla-{i}"), "k", ("sku-sla", "bar-sla"), "alipay")
                    .await;
                s.pay(&p).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    // slow for over a window, nothing missing: normal
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(fast_mode().await, 0.0, "slow callbacks alone");
    assert_eq!(checks_of(unpaid.clone()).await, 1);

    // and now a callback is lost, and checks run: that transaction misses its events
    s.set_faults(json!({ "delay_rate": 1.0, "delay_ms": 600, "drop_rate": 1.0 }))
        .await;
    let (_, lost, _) = s
        .order_with_payment("sla-lost", "k", ("sku-sla", "bar-sla"), "douyin")
        .await;
    s.pay(&lost).await;
    s.set_faults(slow).await;
    s.pause_kind(&worker, "payment.check", false).await;
    eventually("fast polling", Duration::from_secs(10), || async {
        (fast_mode().await == 1.0).then_some(())
    })
    .await;
    // the unpaid payment's next check came forward, and it is checked every 300 ms
    eventually(
        "fast checks of the unpaid payment",
        Duration::from_secs(10),
        || async { (checks_of(unpaid.clone()).await >= 4).then_some(()) },
    )
    .await;

    // the callbacks stop: no slow window, back to normal
    stream.await.unwrap();
    eventually("normal polling again", Duration::from_secs(15), || async {
        (fast_mode().await == 0.0).then_some(())
    })
    .await;
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}
