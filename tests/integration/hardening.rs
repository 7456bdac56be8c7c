//! The ways a hostile tester oversold the landed code, or kept it down, each replayed with the
//! fault that did it. The ledger invariant (`Stack::assert_ledger`) is checked after every
//! step: Redis = Postgres, `available + reserved = stock_real`, nothing over-committed.

use std::time::Duration;

use integration_tests::binaries::{free_port, ScratchRedis};
use integration_tests::fault_proxy::FaultProxy;
use integration_tests::{eventually, post_callback, Stack, StackOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Starts a payment for `order_id` and delivers the provider's signed "paid" callback;
/// returns the callback's `result`.
async fn pay(s: &Stack, user: &str, order_id: &str, amount: i64) -> String {
    let (payment_id, _) = s.start_payment(user, order_id, "wechat").await;
    deliver(s, &payment_id, order_id, amount).await
}

/// The provider's signed "paid" callback for a started payment; returns its `result`.
async fn deliver(s: &Stack, payment_id: &str, order_id: &str, amount: i64) -> String {
    let body = json!({
        "event_id": format!("evt-{order_id}"), "payment_id": payment_id, "order_id": order_id,
        "amount_cents": amount, "status": "SUCCESS", "paid_at": chrono::Utc::now(),
    });
    let (status, ack) = post_callback(s, "wechat", &body, None, None).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    ack["result"].as_str().unwrap().to_owned()
}

fn id_of(order: &Value) -> String {
    order["order_id"].as_str().expect("order_id").to_owned()
}

/// Item 1: cancel released in Redis before Postgres committed. With prelock-service answering
/// after order-api's budget, the units were already back in Redis while the order stayed
/// PENDING with its reservation; another buyer took them, and a rebuild wrote both back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_whose_release_answers_late_never_oversells() {
    let s = Stack::start().await;
    s.put_sku("sku-cxl", "bar-1", 100, 1).await;
    let proxy = FaultProxy::start(&s.prelock).await;
    let api = s
        .extra_order_api(&proxy.url, Duration::from_millis(150))
        .await;
    let (status, ann) = s
        .create_order_at(&api, "ann", "k1", "sku-cxl", "bar-1", 1)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ann}");
    s.assert_ledger().await;

    // ann cancels; prelock-service releases at once but its answer comes after 400 ms
    proxy.delay_responses(Duration::from_millis(400));
    let (status, body) = s
        .post_user_at(
            &api,
            "ann",
            &format!("/v1/orders/{}/cancel", id_of(&ann)),
            json!({}),
        )
        .await;
    s.assert_ledger().await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::OK, Some("CANCELLED")),
        "the cancel committed; the slow release is not the buyer's problem: {body}"
    );
    proxy.delay_responses(Duration::ZERO);

    // bob buys the unit ann gave back; a rebuild changes nothing
    let (status, bob) = s.create_order("bob", "k1", "sku-cxl", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{bob}");
    s.assert_ledger().await;
    let report = s.rebuild().await;
    assert_eq!(report["failed"], json!([]));
    assert_eq!(report["expired_orders"], json!([]));
    s.assert_ledger().await;

    // only bob's order can be paid; ann's cannot even start a payment
    assert_eq!(pay(&s, "bob", &id_of(&bob), 100).await, "PAID");
    let (status, _) = s
        .post_user(
            "ann",
            &format!("/v1/orders/{}/payments", id_of(&ann)),
            json!({"provider": "wechat"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (available, held, stock) = s.assert_consistent("sku-cxl").await;
    assert_eq!((available, held, stock), (0, 1, 1));
}

/// Item 1, second half: whatever left the ledger over-committed, a rebuild must not write it
/// all back (each reservation could then be paid). Paid ones win, the newest unpaid lose and
/// are expired properly, and the rebuild says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_never_restores_more_than_the_stock() {
    let s = Stack::start().await;
    s.put_sku("sku-over", "bar-1", 100, 3).await;
    let (_, a) = s.create_order("amy", "k", "sku-over", "bar-1", 1).await;
    assert_eq!(pay(&s, "amy", &id_of(&a), 100).await, "PAID");
    let (_, b) = s.create_order("ben", "k", "sku-over", "bar-1", 1).await;
    let (_, c) = s.create_order("cat", "k", "sku-over", "bar-1", 1).await;
    let (cat_payment, _) = s.start_payment("cat", &id_of(&c), "wechat").await;
    s.assert_ledger().await;

    // the ledger goes over-committed behind the services' back: 3 units held, 2 in stock
    sqlx::query("UPDATE skus SET stock_real = 2 WHERE id = 'sku-over'")
        .execute(&s.pg)
        .await
        .unwrap();
    let report = s.rebuild().await;
    assert_eq!(report["expired_orders"], json!([id_of(&c)]), "{report}");
    assert_eq!(report["paid_over_stock"], json!([]));
    assert_eq!(report["failed"], json!([]));
    assert_eq!(s.order_state(&id_of(&a)).await, "PAID");
    assert_eq!(s.order_state(&id_of(&b)).await, "PENDING");
    assert_eq!(s.order_state(&id_of(&c)).await, "EXPIRED");
    let c_id = id_of(&c);
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) FROM outbox WHERE aggregate_id = '{c_id}'
               AND event_type = 'OrderExpired' AND payload->>'reason' = 'overcommitted'"
        ))
        .await,
        1
    );
    assert_eq!(s.count(&format!("SELECT count(*) FROM delayed_job WHERE dedupe_key = 'order.expire:{c_id}' AND state = 'cancelled'")).await, 1);
    let (available, held, stock) = s.assert_consistent("sku-over").await;
    assert_eq!((available, held, stock), (0, 2, 2));
    let page = s.get_text(&format!("{}/metrics", s.prelock)).await;
    assert_eq!(
        integration_tests::metric_value(
            &page,
            "prelock_overcommit_total",
            &[("outcome", "expired_order")]
        ),
        Some(1.0),
        "{page}"
    );
    // cat's payment, when it comes, goes back: her unit is gone
    assert_eq!(
        deliver(&s, &cat_payment, &c_id, 100).await,
        "REFUND_REQUIRED"
    );
    s.assert_ledger().await;

    // paid units alone beyond the stock: expiring cannot fix that, the rebuild reports it
    sqlx::query("UPDATE skus SET stock_real = 0 WHERE id = 'sku-over'")
        .execute(&s.pg)
        .await
        .unwrap();
    let report = s.rebuild().await;
    assert_eq!(report["expired_orders"], json!([id_of(&b)]), "{report}");
    assert_eq!(report["paid_over_stock"], json!(["sku-over"]));
    let sku = domain::SkuId::parse("sku-over").unwrap();
    let redis = &s.prelock_app.redis;
    assert_eq!(redis.available(&sku).await.unwrap(), Some(0));
    assert_eq!(
        redis.held(&sku).await.unwrap(),
        vec![(id_of(&a), 1, None)],
        "the paid order keeps its unit"
    );
}

/// Item 2: the orphan release checked "no order took this id" and then released, with nothing
/// holding the two together; a retry that committed in between lost its unit to it. The give-
/// back is now the pre-lock's delayed confirmation, settled by the first attempt's transaction
/// (rolled back): it withdraws that attempt's claim only, and the retry's order keeps the unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orphan_give_back_landing_after_the_retry_committed_takes_nothing() {
    let s = Stack::start_with(StackOptions {
        // the retry below commits well inside the window
        confirm_after: Duration::from_secs(4),
        ..Default::default()
    })
    .await;
    s.put_sku("sku-orph", "bar-1", 100, 1).await;
    let proxy = FaultProxy::start(&s.prelock).await;
    let api = s
        .extra_order_api(&proxy.url, Duration::from_millis(150))
        .await;

    // ivy's "buy now" reserves the last unit, but the answer comes too late: 503
    proxy.delay_responses(Duration::from_millis(600));
    let (status, body) = s
        .create_order_at(&api, "ivy", "k1", "sku-orph", "bar-1", 1)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    proxy.delay_responses(Duration::ZERO);
    // ivy's retry, on another order-api, commits: it claims the reservation it finds
    let (status, ivy) = s.create_order("ivy", "k1", "sku-orph", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{ivy}");
    s.assert_ledger().await;

    // the first attempt's pending confirmation comes due: its transaction rolled back, so
    // its claim is withdrawn, and the retry's claim keeps the unit
    let page = eventually(
        "the first attempt's confirmation settled",
        Duration::from_secs(15),
        || async {
            let page = s
                .http
                .get(format!("{}/metrics", s.prelock))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            page.contains(r#"prelock_confirmations_total{outcome="confirmed""#)
                .then_some(page)
        },
    )
    .await;
    s.assert_ledger().await;
    assert!(
        page.contains(
            r#"prelock_confirmations_total{outcome="still_claimed",service="prelock-service"} 1"#
        ),
        "{page}"
    );
    let (status, body) = s.create_order("joe", "k1", "sku-orph", "bar-1", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("ERR_STOCK_SHORTAGE_PRELOCK")),
        "ivy's unit must not be sold again"
    );
    let (available, held, stock) = s.assert_consistent("sku-orph").await;
    assert_eq!((available, held, stock), (0, 1, 1));
}

/// Item 3, first half: prelock-service answered a late payment's re-reserve from its
/// in-process sold-out mark; a shortage moments earlier turned a payment whose units were
/// there into a refund (and freed the unit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_payment_keeps_its_units_whatever_sold_out_marks_say() {
    let s = Stack::start_with(StackOptions {
        sold_out_ttl: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    s.put_sku_with(
        "sku-late",
        json!({"store_id": "bar-1", "price_cents": 100, "stock": 1, "prelock_ttl_seconds": 1}),
    )
    .await;
    let (_, amy) = s.create_order("amy", "k1", "sku-late", "bar-1", 1).await;
    let (payment_id, _) = s.start_payment("amy", &id_of(&amy), "wechat").await;
    // bob finds it sold out: order-api now remembers "sold out" for a minute
    let (status, _) = s.create_order("bob", "k1", "sku-late", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CONFLICT);
    s.assert_ledger().await;

    // amy's pre-lock lapses; nobody takes the unit; her money arrives late
    let redis = &s.prelock_app.redis;
    let lapse: chrono::DateTime<chrono::Utc> = amy["expires_at"].as_str().unwrap().parse().unwrap();
    eventually(
        "amy's pre-lock to lapse",
        Duration::from_secs(10),
        || async { (redis.now_ms().await.unwrap() > lapse.timestamp_millis()).then_some(()) },
    )
    .await;
    let body = json!({
        "event_id": "evt-amy", "payment_id": payment_id, "order_id": id_of(&amy),
        "amount_cents": 100, "status": "SUCCESS", "paid_at": chrono::Utc::now(),
    });
    let (status, ack) = post_callback(&s, "wechat", &body, None, None).await;
    assert_eq!(
        (status, ack["result"].as_str()),
        (StatusCode::OK, Some("PAID")),
        "the unit was there: the money is kept"
    );
    assert_eq!(s.order_state(&id_of(&amy)).await, "PAID");
    let (available, held, stock) = s.assert_consistent("sku-late").await;
    assert_eq!((available, held, stock), (0, 1, 1));
}

/// Item 3, second half: the sold-out mark was consulted before "this order already holds
/// units", so a retry after a lost answer was told "sold out" about its own units.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_a_lost_answer_gets_its_units_not_sold_out() {
    let s = Stack::start_with(StackOptions {
        sold_out_ttl: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    s.put_sku("sku-retry", "bar-1", 100, 1).await;
    let proxy = FaultProxy::start(&s.prelock).await;
    let (api, app) = s
        .extra_order_app(&proxy.url, Duration::from_millis(150))
        .await;
    proxy.delay_responses(Duration::from_millis(600));
    let (status, _) = s
        .create_order_at(&api, "ivy", "k1", "sku-retry", "bar-1", 1)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // joe finds the SKU sold out (ivy's lost attempt holds the unit): marked for a minute
    let (status, _) = s.create_order("joe", "k1", "sku-retry", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // ivy retries at that same order-api: the unit is hers
    let (status, ivy) = s.create_order("ivy", "k1", "sku-retry", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{ivy}");
    s.assert_ledger().await;
    // and her first attempt's give-back, when it runs, leaves it with her
    eventually(
        "the give-back to finish",
        Duration::from_secs(15),
        || async { (app.fulfillment.tasks.is_empty()).then_some(()) },
    )
    .await;
    let (available, held, stock) = s.assert_consistent("sku-retry").await;
    assert_eq!((available, held, stock), (0, 1, 1));
}

/// Item 4: a few seconds without Redis kept prelock-service down for about two minutes
/// (reconnect sleeps of 60-120 s). A real redis-server is stopped and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prelock_serves_again_within_seconds_of_redis_coming_back() {
    let port = free_port();
    let mut redis = ScratchRedis::start(port).await;
    let s = Stack::start_with(StackOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    s.put_sku("sku-blip", "bar-1", 100, 100).await;
    let (status, _) = s.create_order("u0", "k", "sku-blip", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CREATED);

    // Redis dies for 3 s while buyers keep coming: they get 503, nothing is half-written
    redis.stop();
    let outage = std::time::Instant::now();
    let mut i = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        i += 1;
        let (status, body) = s
            .create_order(&format!("d{i}"), "k", "sku-blip", "bar-1", 1)
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await; // traffic pacing
    }
    assert_eq!(s.count("SELECT count(*) FROM orders").await, 1);

    // it comes back empty (nothing on disk): buyers are served again within seconds
    let redis = ScratchRedis::start(port).await;
    let back = std::time::Instant::now();
    let mut n = 0;
    eventually("orders to succeed again", Duration::from_secs(10), || {
        n += 1;
        let user = format!("r{n}");
        let s = &s;
        async move {
            let (status, _) = s.create_order(&user, "k", "sku-blip", "bar-1", 1).await;
            (status == StatusCode::CREATED).then_some(())
        }
    })
    .await;
    eprintln!(
        "redis outage: {} orders answered 503 during 3 s; first order {:?} after Redis answered again ({n} tries)",
        i,
        back.elapsed()
    );
    let ready = s
        .http
        .get(format!("{}/readyz", s.prelock))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let (available, held, stock) = s.assert_consistent("sku-blip").await;
    assert_eq!((available, held, stock), (98, 2, 100));
    drop(redis);
}

/// Item 7: with no lock or statement timeout, a request waited as long as anything held the
/// SKU's lock (a stuck rebuild, a long admin transaction), holding a connection all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_sku_answers_503_with_retry_after_instead_of_hanging() {
    let s = Stack::start().await;
    s.put_sku("sku-lock", "bar-1", 100, 5).await;
    let mut tx = s.pg.begin().await.unwrap();
    postgres_store::lock_sku_exclusive(&mut tx, "sku-lock")
        .await
        .unwrap();
    let r = s
        .http
        .post(format!("{}/v1/orders", s.order_api))
        .bearer_auth(integration_tests::token("u1"))
        .header("Idempotency-Key", "k")
        .json(&json!({"sku_id": "sku-lock", "store_id": "bar-1", "quantity": 1}))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("an answer, not a hang");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "ERR_UNAVAILABLE");
    s.assert_ledger().await;
    tx.rollback().await.unwrap();
    let (status, _) = s.create_order("u1", "k", "sku-lock", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    s.assert_ledger().await;
}
