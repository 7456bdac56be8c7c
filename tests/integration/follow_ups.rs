//! The order follow-ups the scheduler runs (expiry, stock deduction, voucher), driven
//! directly: each idempotent, safe after a crash half way, and the ledger whole after each.

use std::time::Duration;

use domain::{OrderId, SkuId};
use fulfillment::follow_up::FollowUp;
use integration_tests::binaries::free_port;
use integration_tests::{eventually, post_callback, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn paid_order(s: &Stack, user: &str, sku: &str, qty: i64) -> OrderId {
    let (status, order) = s.create_order(user, "k", sku, "bar-1", qty).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let id = order["order_id"].as_str().unwrap().to_owned();
    let (payment_id, _) = s.start_payment(user, &id, "wechat").await;
    let body = json!({
        "event_id": format!("evt-{id}"), "payment_id": payment_id, "order_id": id,
        "amount_cents": order["amount_cents"], "status": "SUCCESS", "paid_at": chrono::Utc::now(),
    });
    let (status, ack) = post_callback(s, "wechat", &body, None, None).await;
    assert_eq!(
        (status, ack["result"].as_str()),
        (StatusCode::OK, Some("PAID"))
    );
    OrderId::parse(&id).unwrap()
}

async fn events(s: &Stack, id: OrderId, kind: &str) -> i64 {
    s.count(&format!(
        "SELECT count(*) FROM outbox WHERE aggregate_id = '{id}' AND event_type = '{kind}'"
    ))
    .await
}

async fn redeem(s: &Stack, code: &str) -> (StatusCode, Value) {
    let r = s
        .http
        .post(format!("{}/v1/vouchers/{code}/redeem", s.order_api))
        // every order here is bar-1's
        .bearer_auth(integration_tests::store_token("bar-1"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follow_ups_run_twice_change_nothing_twice_and_confirm_once() {
    let s = Stack::start().await;
    s.put_sku("sku-fu", "bar-1", 100, 5).await;
    let id = paid_order(&s, "amy", "sku-fu", 2).await;
    let f = &s.order_app.fulfillment;

    // the voucher first: not confirmed yet, the stock is not deducted
    assert_eq!(f.issue_voucher(id).await.unwrap(), FollowUp::Done);
    assert_eq!(s.order_state(&id.to_string()).await, "PAID");
    let (_, order) = s.get_order("amy", &id.to_string()).await;
    let code = order["voucher_code"]
        .as_str()
        .expect("code shown")
        .to_owned();
    let (status, err) = redeem(&s, &code).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (StatusCode::CONFLICT, Some("ERR_INVALID_TRANSITION")),
        "not confirmed yet"
    );
    s.assert_ledger().await;

    assert_eq!(f.deduct_stock(id).await.unwrap(), FollowUp::Done);
    assert_eq!(s.order_state(&id.to_string()).await, "CONFIRMED");
    s.assert_ledger().await;
    let (available, held, stock) = s.assert_consistent("sku-fu").await;
    assert_eq!((available, held, stock), (3, 0, 3));

    // again, both: nothing changes a second time
    assert_eq!(f.deduct_stock(id).await.unwrap(), FollowUp::Done);
    assert_eq!(f.issue_voucher(id).await.unwrap(), FollowUp::Done);
    assert_eq!(s.assert_consistent("sku-fu").await, (3, 0, 3));
    for (kind, n) in [
        ("StockDeducted", 1),
        ("VoucherIssued", 1),
        ("OrderConfirmed", 1),
    ] {
        assert_eq!(events(&s, id, kind).await, n, "{kind}");
    }
    let (_, order) = s.get_order("amy", &id.to_string()).await;
    assert_eq!(
        (order["version"].as_i64(), order["voucher_code"].as_str()),
        (Some(3), Some(code.as_str()))
    );

    // the bar redeems once; again, or an unknown or malformed code, is refused
    let (status, order) = redeem(&s, &code).await;
    assert_eq!(
        (status, order["state"].as_str()),
        (StatusCode::OK, Some("REDEEMED"))
    );
    assert_eq!(redeem(&s, &code).await.0, StatusCode::CONFLICT);
    assert_eq!(redeem(&s, "ABCDEFGHJKMN").await.0, StatusCode::NOT_FOUND);
    assert_eq!(redeem(&s, "short").await.0, StatusCode::BAD_REQUEST);
    s.assert_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deduction_cut_off_after_its_commit_finishes_on_the_next_run() {
    let s = Stack::start().await;
    s.put_sku("sku-cut", "bar-1", 100, 4).await;
    let id = paid_order(&s, "ben", "sku-cut", 1).await;
    // a scheduler whose pre-lock service is unreachable: Postgres commits, the Redis step fails
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (_, cut) = s.extra_order_app(&dead, Duration::from_millis(200)).await;
    assert!(
        cut.fulfillment.deduct_stock(id).await.is_err(),
        "the job must be retried"
    );
    let sku = SkuId::parse("sku-cut").unwrap();
    assert_eq!(
        s.prelock_app.redis.held(&sku).await.unwrap().len(),
        1,
        "the pinned pre-lock is still in Redis"
    );
    // the stock view stays consistent in between: available + reserved = stock_real
    let v = s.get_sku("sku-cut").await;
    assert_eq!(
        (
            v["stock_real"].as_i64(),
            v["available"].as_i64(),
            v["reserved"].as_i64()
        ),
        (Some(3), Some(3), Some(0))
    );
    // the retry redoes only the pre-lock step
    assert_eq!(
        s.order_app.fulfillment.deduct_stock(id).await.unwrap(),
        FollowUp::Done
    );
    assert_eq!(events(&s, id, "StockDeducted").await, 1);
    assert_eq!(s.assert_consistent("sku-cut").await, (3, 0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_payment_keeps_the_units_the_expiry_job_would_give_back() {
    let s = Stack::start().await;
    s.put_sku_with(
        "sku-exp",
        json!({"store_id": "bar-1", "price_cents": 100, "stock": 1, "prelock_ttl_seconds": 1}),
    )
    .await;
    let (_, order) = s.create_order("cat", "k", "sku-exp", "bar-1", 1).await;
    let id = OrderId::parse(order["order_id"].as_str().unwrap()).unwrap();
    let (payment_id, _) = s.start_payment("cat", &id.to_string(), "alipay").await;
    let f = &s.order_app.fulfillment;
    match f.expire_order(id).await.unwrap() {
        FollowUp::NotDue(_) => {}
        other => panic!("expired before its time: {other:?}"),
    }
    let lapse: chrono::DateTime<chrono::Utc> =
        order["expires_at"].as_str().unwrap().parse().unwrap();
    eventually("the pre-lock to lapse", Duration::from_secs(10), || async {
        (chrono::Utc::now() > lapse).then_some(())
    })
    .await;
    assert_eq!(f.expire_order(id).await.unwrap(), FollowUp::Done);
    assert_eq!(s.order_state(&id.to_string()).await, "EXPIRED");
    assert_eq!(events(&s, id, "OrderExpired").await, 1);
    assert_eq!(
        s.assert_consistent("sku-exp").await,
        (1, 0, 1),
        "units back"
    );

    // the money arrives late; the unit is still there: re-pinned, PAID
    let body = json!({
        "event_id": "evt-late", "payment_id": payment_id, "order_id": id.to_string(),
        "amount_cents": 100, "status": "SUCCESS", "paid_at": chrono::Utc::now(),
    });
    let (_, ack) = post_callback(&s, "alipay", &body, None, None).await;
    assert_eq!(ack["result"], "PAID");
    // an expiry job's pre-lock step landing now (its run was cut off after its commit)
    // leaves the paid units alone, and a rerun of the job does nothing
    let sku = SkuId::parse("sku-exp").unwrap();
    assert_eq!(
        s.prelock_app.redis.lapse(&sku, id).await.unwrap(),
        domain::stock::ReleaseOutcome::NotFound
    );
    assert!(matches!(
        f.expire_order(id).await.unwrap(),
        FollowUp::NotNeeded(_)
    ));
    assert_eq!(s.order_state(&id.to_string()).await, "PAID");
    assert_eq!(s.assert_consistent("sku-exp").await, (0, 1, 1));
}
