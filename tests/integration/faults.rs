//! Faults between the services, injected with the harness' TCP proxy.

use std::time::Duration;

use integration_tests::fault_proxy::FaultProxy;
use integration_tests::{eventually, Stack};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pre_lock_whose_answer_came_too_late_is_given_back() {
    let s = Stack::start().await;
    s.put_sku("sku-slow", "bar-1", 100, 5).await;
    s.assert_ledger().await;
    let proxy = FaultProxy::start(&s.prelock).await;
    let api = s
        .extra_order_api(&proxy.url, Duration::from_millis(150))
        .await;
    proxy.delay_responses(Duration::from_millis(600));

    let (status, body) = s
        .create_order_at(&api, "ivy", "slow-1", "sku-slow", "bar-1", 2)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "ERR_PRELOCK_UNAVAILABLE");

    // the reserve did run: two units are held by an order that does not exist...
    let sku = domain::SkuId::parse("sku-slow").unwrap();
    let redis = &s.prelock_app.redis;
    assert_eq!(
        redis.available(&sku).await.unwrap(),
        Some(3),
        "the scenario needs the late reserve to have run"
    );
    assert_eq!(s.count("SELECT count(*) FROM orders").await, 0);
    // ...until order-api gives them back, well before the 15-minute lapse
    eventually(
        "the orphaned pre-lock to be released",
        Duration::from_secs(10),
        || async { (redis.available(&sku).await.unwrap() == Some(5)).then_some(()) },
    )
    .await;
    let (available, held, _) = s.assert_consistent("sku-slow").await;
    assert_eq!((available, held), (5, 0));
    s.assert_ledger().await;

    // and a retry that succeeds keeps its units: no release steals them
    proxy.delay_responses(Duration::ZERO);
    let (status, body) = s
        .create_order_at(&api, "ivy", "slow-1", "sku-slow", "bar-1", 2)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (available, held, _) = s.assert_consistent("sku-slow").await;
    assert_eq!((available, held), (3, 2));
}
