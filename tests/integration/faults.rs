//! Faults between the services, injected with the harness' TCP proxy.

use std::time::Duration;

use integration_tests::fault_proxy::FaultProxy;
use integration_tests::{auth, eventually, token, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A second order-api on the stack's database, reaching prelock-service through `prelock_url`.
async fn order_api_via(s: &Stack, prelock_url: &str, timeout: Duration) -> String {
    let mut cfg = order_api::Config::from_env().unwrap();
    cfg.database_url = s.db_url.clone();
    cfg.prelock_url = prelock_url.to_owned();
    cfg.prelock_timeout = timeout;
    cfg.run_migrations = false;
    cfg.pg_max_connections = 4;
    cfg.fulfillment.orphan_release_delay = Duration::from_millis(400);
    let app = order_api::App::build(cfg, auth(), gateway_protocol::ProviderSecrets::from_env())
        .await
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app.router()).await.unwrap() });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pre_lock_whose_answer_came_too_late_is_given_back() {
    let s = Stack::start().await;
    s.put_sku("sku-slow", "bar-1", 100, 5).await;
    let proxy = FaultProxy::start(&s.prelock).await;
    let api = order_api_via(&s, &proxy.url, Duration::from_millis(150)).await;
    proxy.delay_responses(Duration::from_millis(600));

    let r = s
        .http
        .post(format!("{api}/v1/orders"))
        .bearer_auth(token("ivy"))
        .header("Idempotency-Key", "slow-1")
        .json(&json!({"sku_id": "sku-slow", "store_id": "bar-1", "quantity": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "ERR_PRELOCK_UNAVAILABLE");

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

    // and a retry that succeeds keeps its units: no release steals them
    proxy.delay_responses(Duration::ZERO);
    let r = s
        .http
        .post(format!("{api}/v1/orders"))
        .bearer_auth(token("ivy"))
        .header("Idempotency-Key", "slow-1")
        .json(&json!({"sku_id": "sku-slow", "store_id": "bar-1", "quantity": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let (available, held, _) = s.assert_consistent("sku-slow").await;
    assert_eq!((available, held), (3, 2));
}
