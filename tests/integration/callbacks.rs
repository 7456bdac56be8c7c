//! Payment callbacks: exactly once under duplicates, refused when forged, stale or wrong, and
//! late or double payments never silently kept.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::{eventually, post_callback, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::task::JoinSet;

/// A PENDING order with a started payment: (order_id, payment_id, amount_cents).
async fn order_with_payment(
    s: &Stack,
    user: &str,
    sku: &str,
    provider: &str,
) -> (String, String, i64) {
    let (status, order) = s
        .create_order(user, &format!("k-{provider}"), sku, "bar-1", 2)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let id = order["order_id"].as_str().unwrap().to_owned();
    let (payment_id, _) = s.start_payment(user, &id, provider).await;
    (id, payment_id, order["amount_cents"].as_i64().unwrap())
}

fn notification(event_id: &str, payment_id: &str, order_id: &str, amount: i64) -> Value {
    json!({
        "event_id": event_id, "payment_id": payment_id, "order_id": order_id,
        "amount_cents": amount, "status": "SUCCESS", "paid_at": chrono::Utc::now(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callback_delivered_ten_times_concurrently_applies_once() {
    let s = Arc::new(Stack::start().await);
    s.put_sku("sku-cb", "bar-1", 2_500, 10).await;
    let (order_id, payment_id, amount) = order_with_payment(&s, "alice", "sku-cb", "douyin").await;
    let body = notification("evt-dup-1", &payment_id, &order_id, amount);

    let mut set = JoinSet::new();
    for _ in 0..10 {
        let s = s.clone();
        let body = body.clone();
        set.spawn(async move { post_callback(&s, "douyin", &body, None, None).await });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        let (status, ack) = r.unwrap();
        assert_eq!(status, StatusCode::OK, "{ack}");
        results.push(ack["result"].as_str().unwrap().to_owned());
    }
    results.sort();
    assert_eq!(
        results.iter().filter(|r| *r == "PAID").count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|r| *r == "DUPLICATE").count(),
        9,
        "{results:?}"
    );

    assert_eq!(s.order_state(&order_id).await, "PAID");
    assert_eq!(
        s.count(&format!(
            "SELECT version::bigint FROM orders WHERE id = '{order_id}'"
        ))
        .await,
        2
    );
    assert_eq!(s.count("SELECT count(*) FROM payment_events").await, 1);
    assert_eq!(
        s.count("SELECT count(*) FROM outbox WHERE event_type = 'OrderPaid'")
            .await,
        1
    );
    assert_eq!(s.count("SELECT count(*) FROM delayed_job WHERE kind IN ('stock.deduct', 'voucher.issue', 'order.notify')").await, 3);
    s.assert_consistent("sku-cb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_stale_wrong_or_unknown_callbacks_change_nothing() {
    let s = Stack::start().await;
    s.put_sku("sku-sig", "bar-1", 1_000, 10).await;
    let (order_id, payment_id, amount) = order_with_payment(&s, "bob", "sku-sig", "alipay").await;
    let good = notification("evt-1", &payment_id, &order_id, amount);

    let cases: Vec<(&str, Value, Option<&str>, Option<i64>, StatusCode, &str)> = vec![
        (
            "forged signature",
            good.clone(),
            Some("not-the-secret"),
            None,
            StatusCode::UNAUTHORIZED,
            "ERR_BAD_SIGNATURE",
        ),
        (
            "stale timestamp",
            good.clone(),
            None,
            Some(chrono::Utc::now().timestamp() - 301),
            StatusCode::UNAUTHORIZED,
            "ERR_STALE_TIMESTAMP",
        ),
        (
            "future timestamp",
            good.clone(),
            None,
            Some(chrono::Utc::now().timestamp() + 301),
            StatusCode::UNAUTHORIZED,
            "ERR_STALE_TIMESTAMP",
        ),
        (
            // now - 2^63: `(now - ts).abs()` wrapped in release builds and accepted this
            "timestamp 2^63 seconds ago",
            good.clone(),
            None,
            Some(chrono::Utc::now().timestamp().wrapping_sub(i64::MIN)),
            StatusCode::UNAUTHORIZED,
            "ERR_STALE_TIMESTAMP",
        ),
        (
            "wrong amount",
            notification("evt-2", &payment_id, &order_id, amount - 1),
            None,
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_AMOUNT_MISMATCH",
        ),
        (
            "unknown payment",
            notification(
                "evt-3",
                &uuid::Uuid::new_v4().to_string(),
                &order_id,
                amount,
            ),
            None,
            None,
            StatusCode::NOT_FOUND,
            "ERR_UNKNOWN_PAYMENT",
        ),
    ];
    for (what, body, secret, ts, want_status, want_code) in cases {
        let (status, err) = post_callback(&s, "alipay", &body, secret, ts).await;
        assert_eq!(
            (status, err["code"].as_str()),
            (want_status, Some(want_code)),
            "{what}: {err}"
        );
    }
    // a correctly signed callback for another provider's payment is unknown there
    let (status, _) = post_callback(&s, "wechat", &good, None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // the signature covers the exact bytes: a body altered after signing is refused
    let r = s
        .http
        .post(format!("{}/v1/payments/alipay/callback", s.order_api))
        .header(
            "Alipay-Timestamp",
            chrono::Utc::now().timestamp().to_string(),
        )
        .header("Alipay-Signature", "00ff")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s
        .http
        .post(format!("{}/v1/payments/alipay/callback", s.order_api))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "missing headers");

    assert_eq!(s.order_state(&order_id).await, "PENDING");
    assert_eq!(s.count("SELECT count(*) FROM payment_events").await, 0);
    assert_eq!(
        s.count("SELECT count(*) FROM outbox WHERE event_type <> 'OrderCreated'")
            .await,
        0
    );
    assert_eq!(
        s.count("SELECT count(*) FROM payments WHERE status <> 'CREATED'")
            .await,
        0
    );
    assert_eq!(
        s.count(
            "SELECT count(*) FROM delayed_job WHERE kind NOT IN ('order.expire', 'payment.check')"
        )
        .await,
        0
    );
    // the started payment's compensation check was written with it
    assert_eq!(
        s.count("SELECT count(*) FROM delayed_job WHERE kind = 'payment.check'")
            .await,
        1
    );

    // and the genuine one still works afterwards
    assert_eq!(
        deliver(&s, "alipay", "evt-1", &payment_id, &order_id, amount).await,
        "PAID"
    );
}

/// Delivers a correctly signed "paid" callback; returns its `result` (PAID, DUPLICATE, ...).
async fn deliver(
    s: &Stack,
    provider: &str,
    event_id: &str,
    payment_id: &str,
    order_id: &str,
    amount: i64,
) -> String {
    let body = notification(event_id, payment_id, order_id, amount);
    let (status, ack) = post_callback(s, provider, &body, None, None).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    ack["result"].as_str().expect("result").to_owned()
}

/// Waits until Redis' clock has passed the order's pre-lock expiry.
async fn wait_lapsed(s: &Stack, order_id: &str) {
    let expires: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT expires_at FROM orders WHERE id = $1::uuid")
            .bind(order_id)
            .fetch_one(&s.pg)
            .await
            .unwrap();
    eventually("the pre-lock to lapse", Duration::from_secs(10), || async {
        (chrono::Utc::now() > expires + chrono::Duration::milliseconds(50)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_payment_re_reserves_or_is_refunded() {
    let s = Stack::start().await;
    s.put_sku_with(
        "sku-late",
        json!({"store_id": "bar-1", "price_cents": 100, "stock": 2, "prelock_ttl_seconds": 1}),
    )
    .await;

    // alice's pre-lock lapses, but the units are still there: her payment re-reserves them
    let (a_order, a_pay, amount) = order_with_payment(&s, "alice", "sku-late", "wechat").await;
    wait_lapsed(&s, &a_order).await;
    assert_eq!(
        deliver(&s, "wechat", "evt-a", &a_pay, &a_order, amount).await,
        "PAID"
    );
    assert_eq!(s.order_state(&a_order).await, "PAID");
    let (available, held, _) = s.assert_consistent("sku-late").await;
    assert_eq!((available, held), (0, 2));

    // bob's pre-lock lapses and carol takes the units: bob's money goes back
    s.put_sku_with(
        "sku-late",
        json!({"store_id": "bar-1", "price_cents": 100, "stock": 4, "prelock_ttl_seconds": 1}),
    )
    .await;
    let (b_order, b_pay, amount) = order_with_payment(&s, "bob", "sku-late", "wechat").await;
    wait_lapsed(&s, &b_order).await;
    // a lapsed order cannot start another payment (the one already started may still land)
    let (status, err) = s
        .post_user(
            "bob",
            &format!("/v1/orders/{b_order}/payments"),
            json!({"provider": "alipay"}),
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (StatusCode::CONFLICT, Some("ERR_ORDER_EXPIRED"))
    );
    // (a long TTL from here on, so carol's pre-lock cannot lapse while the test checks it;
    // the restock's rebuild drops bob's lapsed pre-lock, as the reserve script would)
    s.put_sku_with(
        "sku-late",
        json!({"store_id": "bar-1", "price_cents": 100, "stock": 4, "prelock_ttl_seconds": 900}),
    )
    .await;
    let (status, carol) = s.create_order("carol", "c1", "sku-late", "bar-1", 2).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "carol gets the reclaimed units: {carol}"
    );
    assert_eq!(
        deliver(&s, "wechat", "evt-b", &b_pay, &b_order, amount).await,
        "REFUND_REQUIRED"
    );
    assert_eq!(s.order_state(&b_order).await, "REFUND_PENDING");
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) FROM payments WHERE id = '{b_pay}' AND status = 'REFUND_REQUIRED'"
        ))
        .await,
        1
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) FROM delayed_job WHERE dedupe_key = 'payment.refund:{b_pay}'"
        ))
        .await,
        1
    );
    assert_eq!(s.count(&format!("SELECT count(*) FROM outbox WHERE aggregate_id = '{b_order}' AND event_type IN ('OrderExpired', 'RefundRequested')")).await, 2);
    let (available, held, stock) = s.assert_consistent("sku-late").await;
    assert_eq!(
        (available, held, stock),
        (0, 4, 4),
        "alice 2 (paid) + carol 2 (pending)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_payment_of_a_paid_order_is_refunded() {
    let s = Stack::start().await;
    s.put_sku("sku-twice", "bar-1", 700, 5).await;
    let (order_id, p1, amount) = order_with_payment(&s, "dan", "sku-twice", "wechat").await;
    let (p2, _) = s.start_payment("dan", &order_id, "douyin").await;
    assert_eq!(
        deliver(&s, "wechat", "e1", &p1, &order_id, amount).await,
        "PAID"
    );
    assert_eq!(
        deliver(&s, "douyin", "e2", &p2, &order_id, amount).await,
        "REFUND_REQUIRED"
    );
    assert_eq!(s.order_state(&order_id).await, "PAID");
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) FROM delayed_job WHERE dedupe_key = 'payment.refund:{p2}'"
        ))
        .await,
        1
    );
    let (available, held, _) = s.assert_consistent("sku-twice").await;
    assert_eq!((available, held), (3, 2), "the order holds its units once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulator_faults_drop_and_duplicate_callbacks() {
    let s = Stack::start().await;
    s.put_sku("sku-faults", "bar-1", 300, 5).await;

    // duplicates: every copy is delivered, one transition
    s.set_faults(json!({"duplicate_rate": 1.0, "duplicate_count": 4}))
        .await;
    let (o1, p1, _) = order_with_payment(&s, "fay", "sku-faults", "wechat").await;
    let paid = s.pay(&p1).await;
    assert_eq!(paid["callbacks_planned"], 5);
    eventually(
        "5 acknowledged callbacks",
        Duration::from_secs(10),
        || async {
            let r: Value = s
                .http
                .get(format!("{}/v1/sim/payments/{p1}", s.gateway))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (r["callbacks_acknowledged"] == 5).then_some(())
        },
    )
    .await;
    assert_eq!(s.order_state(&o1).await, "PAID");
    assert_eq!(
        s.count("SELECT count(*) FROM outbox WHERE event_type = 'OrderPaid'")
            .await,
        1
    );

    // drops: the provider says paid, no callback comes (compensation's job, a later issue)
    s.set_faults(json!({"drop_rate": 1.0})).await;
    let (o2, p2, _) = order_with_payment(&s, "gus", "sku-faults", "alipay").await;
    let paid = s.pay(&p2).await;
    assert_eq!(paid["callback_dropped"], true);
    let q = s
        .get_json(&format!("{}/v1/alipay/payments/{p2}", s.gateway))
        .await;
    assert_eq!(q["status"], "PAID");
    assert!(q["event_id"].as_str().is_some());
    assert_eq!(s.order_state(&o2).await, "PENDING");

    // query faults and validation of the fault settings
    s.set_faults(json!({"query_error_rate": 1.0})).await;
    let r = s
        .http
        .get(format!("{}/v1/alipay/payments/{p2}", s.gateway))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let r = s
        .http
        .put(format!("{}/v1/sim/faults", s.gateway))
        .json(&json!({"drop_rate": 1.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s
        .http
        .put(format!("{}/v1/sim/faults", s.gateway))
        .json(&json!({"dorp_rate": 0.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "unknown fault names are refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_racing_a_cancel_leaves_no_stock_pinned() {
    let s = Stack::start().await;
    s.put_sku("sku-race", "bar-1", 400, 3).await;
    let (order_id, payment_id, amount) = order_with_payment(&s, "hal", "sku-race", "wechat").await;
    let (status, _) = s
        .post_user("hal", &format!("/v1/orders/{order_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // The interleaving under test: the payment's first attempt found the pre-lock gone (the
    // cancel released it), pinned the units again, then lost the compare-and-set to the
    // cancel. Replay exactly that Redis state, then let the payment's retry run.
    let sku = domain::SkuId::parse("sku-race").unwrap();
    let id = domain::OrderId::parse(&order_id).unwrap();
    let redis = &s.prelock_app.redis;
    redis.pin(&sku, id, 2, "race-user").await.unwrap();
    assert_eq!(redis.available(&sku).await.unwrap(), Some(1));

    assert_eq!(
        deliver(&s, "wechat", "evt-race", &payment_id, &order_id, amount).await,
        "REFUND_REQUIRED"
    );
    assert_eq!(s.order_state(&order_id).await, "REFUND_PENDING");
    let (available, held, _) = s.assert_consistent("sku-race").await;
    assert_eq!(
        (available, held),
        (3, 0),
        "the cancelled order's units are sellable again"
    );
}
