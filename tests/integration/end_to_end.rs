//! The real binaries, started as processes: an order placed, paid through the simulator's
//! signed callback, PAID, then CONFIRMED with a voucher by the scheduler's follow-up jobs and
//! redeemed at the bar; an unpaid order EXPIRED with its units back; then each binary stops
//! gracefully on SIGTERM.

use std::time::Duration;

use integration_tests::binaries::{free_port, Proc, Services};
use integration_tests::{eventually, ops_token, post_callback_to, token};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Polls e2e-user's order until it is in `state` (20 s at most); returns it.
async fn order_in_state(http: &reqwest::Client, base: &str, id: &str, state: &str) -> Value {
    eventually(
        &format!("order {state}"),
        Duration::from_secs(20),
        || async {
            let o: Value = http
                .get(format!("{base}/v1/orders/{id}"))
                .bearer_auth(token("e2e-user"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (o["state"] == state).then_some(o)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binaries_take_an_order_from_buy_now_to_a_redeemed_voucher() {
    let mut s = Services::start(&[], &[("PRELOCK_TIMEOUT_MS", "2000".to_owned())]).await;
    let (mut sch, scheduler) = s.scheduler(&[("JOB_POLL_MS", "50".to_owned())]).await;
    let (http, order_api, prelock, gateway) = (
        s.http.clone(),
        s.order_api.clone(),
        s.prelock.clone(),
        s.gateway.clone(),
    );

    let r = http
        .put(format!("{prelock}/v1/skus/sku-e2e"))
        .bearer_auth(ops_token())
        .json(&json!({"store_id": "bar-e2e", "price_cents": 12_800, "stock": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = http
        .post(format!("{order_api}/v1/orders"))
        .bearer_auth(token("e2e-user"))
        .header("Idempotency-Key", "e2e-1")
        .json(&json!({"sku_id": "sku-e2e", "store_id": "bar-e2e", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let order: Value = r.json().await.unwrap();
    let id = order["order_id"].as_str().unwrap().to_owned();
    assert_eq!(order["state"], "PENDING");

    let started: Value = http
        .post(format!("{order_api}/v1/orders/{id}/payments"))
        .bearer_auth(token("e2e-user"))
        .json(&json!({"provider": "alipay"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pay_url = started["pay_url"].as_str().expect("pay_url").to_owned();
    assert!(pay_url.starts_with(&gateway));
    assert_eq!(
        http.post(&pay_url).send().await.unwrap().status(),
        StatusCode::OK
    );

    let paid = order_in_state(&http, &order_api, &id, "PAID").await;
    assert_eq!(paid["version"], 2);

    // two seconds later the scheduler deducts the stock and issues the voucher: CONFIRMED
    let confirmed = order_in_state(&http, &order_api, &id, "CONFIRMED").await;
    assert_eq!(confirmed["version"], 3);
    let code = confirmed["voucher_code"]
        .as_str()
        .expect("voucher code")
        .to_owned();
    let sku_view = |sku: &'static str| integration_tests::sku_units(&http, &prelock, sku);
    assert_eq!(
        sku_view("sku-e2e").await,
        (2, 2, 0),
        "the unit left the real stock; nothing is reserved for the order any more"
    );
    let metrics_of = |base: &str| {
        let req = http.get(format!("{base}/metrics"));
        async move { req.send().await.unwrap().text().await.unwrap() }
    };
    // every binary with a database exports the outbox lag (no relay runs here: it grows)
    for base in [&order_api, &prelock, &scheduler] {
        let page = metrics_of(base).await;
        let lag = integration_tests::metric_value(&page, "outbox_lag_seconds", &[]);
        assert!(
            lag.is_some_and(|l| l >= 0.0),
            "{base}: no outbox_lag_seconds in\n{page}"
        );
    }
    // every fire is measured: the paper's job_fire_delay, by kind and priority
    let page = metrics_of(&scheduler).await;
    for series in [
        r#"job_fire_delay_seconds_count{kind="stock.deduct",priority="P0",service="scheduler"} 1"#,
        r#"jobs_total{kind="voucher.issue",outcome="completed",service="scheduler"} 1"#,
        r#"jobs_total{kind="order.notify",outcome="completed",service="scheduler"} 1"#,
    ] {
        assert!(page.contains(series), "{series} missing:\n{page}");
    }
    integration_tests::assert_buckets_span_the_alerts(&page, "job_fire_delay_seconds");
    // the bar redeems the voucher once, with its own store's token: another bar's, an
    // operator's and the service token are refused, and change nothing
    let redeem_with = |token: String| {
        http.post(format!("{order_api}/v1/vouchers/{code}/redeem"))
            .bearer_auth(token)
            .send()
    };
    for (token, want) in [
        (integration_tests::store_token("bar-other"), "ERR_FORBIDDEN"),
        (ops_token(), "ERR_FORBIDDEN"),
        (integration_tests::SERVICE_TOKEN.to_owned(), "ERR_FORBIDDEN"),
        (token("e2e-user"), "ERR_UNAUTHORIZED"),
    ] {
        let r = redeem_with(token).await.unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], want, "{body}");
    }
    let redeem = || redeem_with(integration_tests::store_token("bar-e2e"));
    let r = redeem().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "REDEEMED");
    let r = redeem().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "a voucher is redeemed once"
    );

    // an unpaid order on a SKU with a one-second pre-lock expires, and its units come back
    let r = http
        .put(format!("{prelock}/v1/skus/sku-e2e-ttl"))
        .bearer_auth(ops_token())
        .json(&json!({"store_id": "bar-e2e", "price_cents": 500, "stock": 2, "prelock_ttl_seconds": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let lapsing: Value = http
        .post(format!("{order_api}/v1/orders"))
        .bearer_auth(token("e2e-user"))
        .header("Idempotency-Key", "e2e-2")
        .json(&json!({"sku_id": "sku-e2e-ttl", "store_id": "bar-e2e", "quantity": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let lapsing_id = lapsing["order_id"].as_str().unwrap().to_owned();
    order_in_state(&http, &order_api, &lapsing_id, "EXPIRED").await;
    assert_eq!(sku_view("sku-e2e-ttl").await, (2, 2, 0));

    // metrics are labelled by route template, never by raw id
    let metrics = http
        .get(format!("{order_api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"route="/v1/orders/{order_id}""#),
        "{metrics}"
    );
    assert!(!metrics.contains(&id));
    integration_tests::assert_buckets_span_the_alerts(&metrics, "http_request_duration_seconds");
    let paid = metrics.lines().find(|l| {
        l.starts_with("payment_callbacks_total{")
            && l.contains(r#"outcome="PAID""#)
            && l.contains(r#"provider="alipay""#)
    });
    assert_eq!(
        paid.and_then(|l| l.rsplit(' ').next()),
        Some("1"),
        "{metrics}"
    );
    let pg = sqlx::PgPool::connect(&s.db).await.unwrap();
    integration_tests::assert_emitted_events_match_schemas(
        &pg,
        &[
            "OrderCreated",
            "OrderPaid",
            "StockDeducted",
            "VoucherIssued",
            "OrderConfirmed",
            "OrderRedeemed",
            "OrderExpired",
        ],
    )
    .await;

    let status = sch.terminate(Duration::from_secs(15));
    let log = sch.log_text();
    assert!(status.success(), "scheduler exited with {status}:\n{log}");
    assert!(log.contains("job engine drained"), "{log}");
    for proc in [&mut s.order_proc, &mut s.gateway_proc, &mut s.prelock_proc] {
        let status = proc.terminate(Duration::from_secs(15));
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            proc.name,
            proc.log_text()
        );
        let log = proc.log_text();
        assert!(
            log.contains("background tasks drained"),
            "{} did not drain its background work:\n{log}",
            proc.name
        );
        assert!(
            log.contains("shutdown requested"),
            "{} did not drain:\n{log}",
            proc.name
        );
        let first = log.lines().next().unwrap_or_default();
        assert!(
            serde_json::from_str::<Value>(first).is_ok(),
            "{} logs are not JSON lines: {first}",
            proc.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_refuse_to_start_with_missing_or_public_secrets() {
    // (binary, environment, variables the refusal must name)
    let cases: [(&str, Vec<(&str, String)>, &[&str]); 4] = [
        (
            "order-api",
            vec![
                ("AUTH_JWT_SECRET", String::new()),
                ("SERVICE_TOKEN", "dev-service-token".to_owned()),
                ("STAFF_JWT_SECRET", String::new()),
                (
                    "PAYMENT_SECRET_WECHAT",
                    "a-real-secret-of-at-least-32-bytes".to_owned(),
                ),
                ("PAYMENT_SECRET_ALIPAY", String::new()),
                ("PAYMENT_SECRET_DOUYIN", "dev-douyin-secret".to_owned()),
            ],
            &[
                "AUTH_JWT_SECRET is unset",
                "SERVICE_TOKEN is set to its public development default",
                "STAFF_JWT_SECRET is unset",
                "PAYMENT_SECRET_ALIPAY is unset",
                "PAYMENT_SECRET_DOUYIN is set to its public development default",
            ],
        ),
        (
            "prelock-service",
            vec![
                ("SERVICE_TOKEN", String::new()),
                (
                    "STAFF_JWT_SECRET",
                    "dev-staff-jwt-secret-change-me".to_owned(),
                ),
            ],
            &[
                "SERVICE_TOKEN is unset",
                "STAFF_JWT_SECRET is set to its public development default",
            ],
        ),
        // one byte each, and one secret for two roles
        (
            "order-api",
            vec![
                ("AUTH_JWT_SECRET", "b".to_owned()),
                ("SERVICE_TOKEN", "a".to_owned()),
                ("STAFF_JWT_SECRET", "s".repeat(40)),
                ("PAYMENT_SECRET_WECHAT", "w".repeat(40)),
                ("PAYMENT_SECRET_ALIPAY", "w".repeat(40)),
                ("PAYMENT_SECRET_DOUYIN", "d".repeat(40)),
            ],
            &[
                "AUTH_JWT_SECRET is shorter than 32 bytes",
                "SERVICE_TOKEN is shorter than 32 bytes",
                "PAYMENT_SECRET_ALIPAY is the same secret as PAYMENT_SECRET_WECHAT",
            ],
        ),
        (
            "payment-gateway-sim",
            vec![
                ("PAYMENT_SECRET_WECHAT", String::new()),
                ("PAYMENT_SECRET_ALIPAY", "x".to_owned()),
                ("PAYMENT_SECRET_DOUYIN", "y".to_owned()),
            ],
            &["PAYMENT_SECRET_WECHAT is unset"],
        ),
    ];
    for (bin, mut env, named) in cases {
        env.push(("ALLOW_DEV_SECRETS", "false".to_owned()));
        // a dead database: the refusal must come before anything is connected
        env.push((
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/none".to_owned(),
        ));
        env.push(("ORDER_API_ADDR", format!("127.0.0.1:{}", free_port())));
        env.push(("PRELOCK_ADDR", format!("127.0.0.1:{}", free_port())));
        env.push(("GATEWAY_SIM_ADDR", format!("127.0.0.1:{}", free_port())));
        let mut p = Proc::spawn(bin, &env);
        let status = eventually("the refusal", Duration::from_secs(30), || {
            let s = p.child.try_wait().expect("wait");
            async move { s }
        })
        .await;
        assert!(!status.success(), "{bin} started with public secrets");
        let log = p.log_text();
        for n in named {
            assert!(log.contains(n), "{bin} did not say {n:?}:\n{log}");
        }
        assert!(log.contains("ALLOW_DEV_SECRETS"), "{log}");
    }
}

/// kill -9 of the scheduler while the follow-ups of 1,000 paid orders are due; a new one
/// takes over (the leader rescues the dead one's leases): every order reaches CONFIRMED
/// exactly once, and exactly 1,000 units leave the real stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduler_killed_mid_run_still_confirms_every_order_exactly_once() {
    const ORDERS: usize = 1000;
    let s = Services::start(
        &[
            ("PG_MAX_CONNECTIONS", "8".to_owned()),
            ("PG_ACQUIRE_TIMEOUT_MS", "5000".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ],
        &[
            ("PRELOCK_TIMEOUT_MS", "5000".to_owned()),
            ("FOLLOW_UP_DELAY_MS", "0".to_owned()),
        ],
    )
    .await;
    let (http, order_api, prelock, db) = (
        s.http.clone(),
        s.order_api.clone(),
        s.prelock.clone(),
        s.db.clone(),
    );
    let r = http
        .put(format!("{prelock}/v1/skus/sku-kill"))
        .bearer_auth(ops_token())
        .json(&json!({"store_id": "bar-k", "price_cents": 100, "stock": ORDERS}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // 1,000 buyers buy and pay (the provider's signed callback), 32 at a time
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..ORDERS {
        let (http, order_api, gate) = (http.clone(), order_api.clone(), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let user = format!("k{i}");
            let order: Value = http
                .post(format!("{order_api}/v1/orders"))
                .bearer_auth(token(&user))
                .header("Idempotency-Key", "k")
                .json(&json!({"sku_id": "sku-kill", "store_id": "bar-k", "quantity": 1}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = order["order_id"].as_str().expect("order").to_owned();
            let started: Value = http
                .post(format!("{order_api}/v1/orders/{id}/payments"))
                .bearer_auth(token(&user))
                .json(&json!({"provider": "wechat"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let body = json!({
                "event_id": format!("evt-{id}"), "payment_id": started["payment_id"],
                "order_id": id, "amount_cents": 100, "status": "SUCCESS",
                "paid_at": chrono::Utc::now(),
            });
            let (status, ack) =
                post_callback_to(&http, &order_api, "wechat", &body, None, None).await;
            assert_eq!(status, StatusCode::OK, "{ack}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let pg = sqlx::PgPool::connect(&db).await.unwrap();
    let count = |sql: &'static str| {
        let pg = pg.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pg)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM orders WHERE state = 'PAID'").await,
        ORDERS as i64
    );

    // a scheduler starts on the 3,000 due follow-ups and is killed (SIGKILL) part way through
    let scheduler_env = [
        ("JOB_POLL_MS", "50".to_owned()),
        ("JOB_BATCH_SIZE", "50".to_owned()),
        ("JOB_LEASE_MS", "3000".to_owned()),
        ("JOB_MAINTENANCE_MS", "300".to_owned()),
    ];
    let (mut first, _) = s.scheduler(&scheduler_env).await;
    let at_kill = eventually("some orders confirmed", Duration::from_secs(60), || async {
        let n = count("SELECT count(*) FROM orders WHERE state = 'CONFIRMED'").await;
        (n >= 50).then_some(n)
    })
    .await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let running = count("SELECT count(*) FROM delayed_job WHERE state = 'running'").await;
    let confirmed_at_kill = count("SELECT count(*) FROM orders WHERE state = 'CONFIRMED'").await;
    assert!(
        confirmed_at_kill < ORDERS as i64,
        "the kill came after the work was done"
    );

    // another scheduler finishes the work, rescuing the dead one's leases
    let (mut second, _) = s.scheduler(&scheduler_env).await;
    eventually(
        "every order CONFIRMED",
        Duration::from_secs(120),
        || async {
            (count("SELECT count(*) FROM orders WHERE state = 'CONFIRMED'").await == ORDERS as i64)
                .then_some(())
        },
    )
    .await;
    for (sql, want) in [
        (
            "SELECT count(*) FROM outbox WHERE event_type = 'OrderConfirmed'",
            ORDERS,
        ),
        (
            "SELECT count(DISTINCT aggregate_id) FROM outbox WHERE event_type = 'OrderConfirmed'",
            ORDERS,
        ),
        (
            "SELECT count(*) FROM outbox WHERE event_type = 'StockDeducted'",
            ORDERS,
        ),
        (
            "SELECT count(*) FROM outbox WHERE event_type = 'VoucherIssued'",
            ORDERS,
        ),
        ("SELECT count(DISTINCT code) FROM vouchers", ORDERS),
        (
            "SELECT count(*) FROM reservations WHERE status = 'ALLOCATED'",
            ORDERS,
        ),
        ("SELECT count(*) FROM orders WHERE version <> 3", 0),
    ] {
        assert_eq!(count(sql).await, want as i64, "{sql}");
    }
    let sku: Value = http
        .get(format!("{prelock}/v1/skus/sku-kill"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            sku["stock_real"].as_i64(),
            sku["available"].as_i64(),
            sku["reserved"].as_i64()
        ),
        (Some(0), Some(0), Some(0)),
        "exactly 1,000 units left the real stock"
    );
    eprintln!(
        "kill -9 test: killed at {at_kill}+ confirmed ({confirmed_at_kill} at the kill, {running} jobs left running under the dead scheduler's leases); all {ORDERS} confirmed once after the restart"
    );
    let status = second.terminate(Duration::from_secs(15));
    assert!(status.success(), "{}", second.log_text());
}
