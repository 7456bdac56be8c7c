//! Security and abuse: purchase limits ("limit N per person") that hold under concurrency and
//! through a Redis loss, and rate limits per buyer, per client address and on the webhooks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{eventually, metric_value, Stack, StackOptions};
use reqwest::StatusCode;
use serde_json::json;
use service_kit::limit::{Budget, RateLimitConfig};
use tokio::task::JoinSet;

/// Units of `sku` that `user` holds in live and paid orders, by the ledger.
async fn held_by(s: &Stack, user: &str, sku: &str) -> i64 {
    s.count(&format!(
        "SELECT COALESCE(sum(quantity), 0)::bigint FROM orders WHERE user_id = '{user}'
         AND sku_id = '{sku}' AND state IN ('PENDING', 'PAID', 'CONFIRMED', 'REDEEMED')"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_buyer_cannot_hoard_a_flash_sale_with_fifty_orders_at_once_nor_after_a_redis_loss() {
    let s = Arc::new(Stack::start().await);
    let sku = "sku-sale";
    let view = s
        .put_sku_with(
            sku,
            json!({"store_id": "bar-1", "price_cents": 100, "stock": 60, "max_per_buyer": 20}),
        )
        .await;
    assert_eq!(view["max_per_buyer"], 20);
    // fifty orders at once from one buyer, 1 to 3 units each, each with its own key
    let mut set = JoinSet::new();
    for i in 0..50 {
        let s = s.clone();
        let quantity = i % 3 + 1;
        set.spawn(async move {
            let key = format!("k{i}");
            let r = s
                .create_order("hoarder", &key, sku, "bar-1", quantity)
                .await;
            (key, quantity, r)
        });
    }
    let (mut units, mut refused, mut orders, mut taken) = (0, 0, Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        let (key, quantity, (status, body)) = r.unwrap();
        match (status, body["code"].as_str()) {
            (StatusCode::CREATED, _) => {
                units += quantity;
                orders.push((body["order_id"].as_str().unwrap().to_owned(), quantity));
                taken.push((key, quantity));
            }
            (StatusCode::CONFLICT, Some("ERR_PURCHASE_LIMIT")) => {
                assert!(
                    body["message"].as_str().unwrap().contains("limited to 20"),
                    "{body}"
                );
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    eprintln!(
        "hoarding: 50 orders at once from one buyer, limit 20: {} created ({units} units), \
         {refused} refused ERR_PURCHASE_LIMIT",
        orders.len()
    );
    assert!((18..=20).contains(&units), "{units} units went through");
    assert_eq!(orders.len() + refused, 50);
    assert_eq!(held_by(&s, "hoarder", sku).await, units);
    // top up to exactly the limit, then not one unit more
    if units < 20 {
        let (status, body) = s
            .create_order("hoarder", "top-up", sku, "bar-1", 20 - units)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        orders.push((body["order_id"].as_str().unwrap().to_owned(), 20 - units));
    }
    let (status, body) = s.create_order("hoarder", "one-more", sku, "bar-1", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("ERR_PURCHASE_LIMIT"))
    );
    // a retry of an order the buyer holds is answered as before, not refused (which of the
    // fifty went through is the race's choice: retry one that did)
    let (key, quantity) = &taken[0];
    let (status, body) = s
        .create_order("hoarder", key, sku, "bar-1", *quantity)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // the next buyer is served: the hoarder holds 20 of 60
    let (status, body) = s.create_order("next-buyer", "k", sku, "bar-1", 3).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // a cancelled order's units stop counting
    let (cancelled, q) = orders.pop().unwrap();
    let (status, body) = s
        .post_user(
            "hoarder",
            &format!("/v1/orders/{cancelled}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s
        .create_order("hoarder", "after-cancel", sku, "bar-1", q)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // paid units count too, and a Redis that lost the SKU gets every count back from the
    // ledger (the rebuild) before it serves again
    let (paid, _) = orders.pop().unwrap();
    let (payment, _) = s.start_payment("hoarder", &paid, "wechat").await;
    s.pay(&payment).await;
    eventually("the payment applied", Duration::from_secs(10), || async {
        (s.order_state(&paid).await == "PAID").then_some(())
    })
    .await;
    let sku_id = domain::SkuId::parse(sku).unwrap();
    s.prelock_app.redis.forget_sku(&sku_id).await.unwrap();
    let (status, body) = s
        .create_order("hoarder", "after-loss", sku, "bar-1", 1)
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("ERR_PURCHASE_LIMIT")),
        "{body}"
    );
    assert_eq!(
        s.prelock_app.redis.bought(&sku_id).await.unwrap(),
        vec![("hoarder".to_owned(), 20), ("next-buyer".to_owned(), 3)]
    );
    assert_eq!(held_by(&s, "hoarder", sku).await, 20);
    s.assert_consistent(sku).await;
    // and the reconciliation finds nothing to repair
    assert_eq!(s.reconcile().await["drifted"], json!([]));
    // a restock that names no limit keeps the SKU's: still not one unit more
    let view = s
        .put_sku_with(
            sku,
            json!({"store_id": "bar-1", "price_cents": 100, "stock": 80}),
        )
        .await;
    assert_eq!(view["max_per_buyer"], 20);
    let (status, body) = s
        .create_order("hoarder", "after-restock", sku, "bar-1", 1)
        .await;
    assert_eq!(body["code"], "ERR_PURCHASE_LIMIT", "{status} {body}");
}

/// A buyer cannot hold twice the limit by letting an order's pre-lock lapse, ordering the
/// same units again, and then paying the lapsed order: the late payment would have to take
/// its units again past the limit, so its money goes back instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paying_a_lapsed_order_late_never_takes_a_buyer_past_the_limit() {
    let s = Stack::start().await;
    let sku = "sku-late";
    s.put_sku_with(
        sku,
        json!({"store_id": "bar-1", "price_cents": 100, "stock": 10, "max_per_buyer": 2,
               "prelock_ttl_seconds": 1}),
    )
    .await;
    let (status, first) = s.create_order("racer", "a", sku, "bar-1", 2).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let first_id = first["order_id"].as_str().unwrap().to_owned();
    let (payment, _) = s.start_payment("racer", &first_id, "alipay").await;
    let lapse: chrono::DateTime<chrono::Utc> =
        first["expires_at"].as_str().unwrap().parse().unwrap();
    eventually("the pre-lock to lapse", Duration::from_secs(10), || async {
        (chrono::Utc::now() > lapse + chrono::Duration::milliseconds(200)).then_some(())
    })
    .await;
    // the lapsed units went back and stopped counting: a new order of two is taken
    let (status, second) = s.create_order("racer", "b", sku, "bar-1", 2).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    // then the money for the lapsed one arrives
    let body = json!({
        "event_id": "evt-late-racer", "payment_id": payment, "order_id": first_id,
        "amount_cents": 200, "status": "SUCCESS", "paid_at": chrono::Utc::now(),
    });
    let (status, ack) = integration_tests::post_callback(&s, "alipay", &body, None, None).await;
    assert!(status.is_success(), "{status} {ack}");
    assert_eq!(s.order_state(&first_id).await, "REFUND_PENDING", "{ack}");
    assert_eq!(held_by(&s, "racer", sku).await, 2);
    let sku_id = domain::SkuId::parse(sku).unwrap();
    assert_eq!(
        s.prelock_app.redis.bought(&sku_id).await.unwrap(),
        vec![("racer".to_owned(), 2)]
    );
    s.assert_consistent(sku).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skus_without_a_limit_take_the_service_default_and_zero_means_none() {
    let s = Stack::start_with(StackOptions {
        default_max_per_buyer: 5,
        ..StackOptions::default()
    })
    .await;
    s.put_sku("sku-default", "bar-1", 100, 100).await;
    s.put_sku_with(
        "sku-unlimited",
        json!({"store_id": "bar-1", "price_cents": 100, "stock": 100, "max_per_buyer": 0}),
    )
    .await;
    let (status, _) = s.create_order("u", "a", "sku-default", "bar-1", 5).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = s.create_order("u", "b", "sku-default", "bar-1", 1).await;
    assert_eq!(body["code"], "ERR_PURCHASE_LIMIT", "{status} {body}");
    for key in ["c", "d", "e"] {
        let (status, body) = s.create_order("u", key, "sku-unlimited", "bar-1", 5).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // bad limits are refused, naming the field
    let r = s
        .http
        .put(format!("{}/v1/skus/sku-default", s.prelock))
        .bearer_auth(integration_tests::ops_token())
        .json(&json!({"store_id": "bar-1", "price_cents": 100, "stock": 100, "max_per_buyer": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["message"]
        .as_str()
        .unwrap()
        .starts_with("max_per_buyer"));
}

/// Sends `n` requests, 50 at a time; returns each answer's status and `Retry-After`, and the
/// time it took.
async fn flood<F, Fut>(n: usize, send: F) -> (Vec<(StatusCode, Option<String>)>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = reqwest::Response> + Send,
{
    let send = Arc::new(send);
    let started = Instant::now();
    let mut set = JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..50 {
        let (send, next) = (send.clone(), next.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                let r = send(i).await;
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                out.push((r.status(), retry));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.unwrap());
    }
    (all, started.elapsed())
}

/// Of `answers`, how many got past the limiter; every refusal is a 429 with `Retry-After`.
fn passed(answers: &[(StatusCode, Option<String>)]) -> usize {
    for (status, retry) in answers {
        if *status == StatusCode::TOO_MANY_REQUESTS {
            let secs: u64 = retry.as_deref().expect("Retry-After").parse().unwrap();
            assert!(secs >= 1);
        }
    }
    answers
        .iter()
        .filter(|(s, _)| *s != StatusCode::TOO_MANY_REQUESTS)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_from_one_buyer_get_at_most_quota_plus_burst_and_others_are_served() {
    let budget = Budget {
        per_sec: 5,
        burst: 10,
    };
    let s = Arc::new(
        Stack::start_with(StackOptions {
            rate_limits: RateLimitConfig {
                buyer: budget,
                webhook: budget,
                ..RateLimitConfig::off()
            },
            ..StackOptions::default()
        })
        .await,
    );
    s.put_sku("sku-rl", "bar-1", 100, 10_000).await;
    let (http, base) = (s.http.clone(), s.order_api.clone());
    let token = integration_tests::token("flooder");
    let (answers, took) = flood(1000, move |i| {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        async move {
            http.post(format!("{base}/v1/orders"))
                .bearer_auth(token)
                .header("Idempotency-Key", format!("flood-{i}"))
                .json(&json!({"sku_id": "sku-rl", "store_id": "bar-1", "quantity": 1}))
                .send()
                .await
                .unwrap()
        }
    })
    .await;
    let through = passed(&answers);
    let allowed = 10 + (5.0 * took.as_secs_f64()).ceil() as usize;
    eprintln!("rate limit: {through} of 1000 from one buyer through in {took:?} (5/s burst 10 allows {allowed})");
    assert!(
        (10..=allowed).contains(&through),
        "{through} of 1000 went through in {took:?} (at most {allowed})"
    );
    // another buyer at the same moment is served
    let (status, body) = s.create_order("bystander", "k", "sku-rl", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // what was refused is counted, by budget
    let page = s.get_text(&format!("{}/metrics", s.order_api)).await;
    assert_eq!(
        metric_value(&page, "rate_limited_total", &[("scope", "buyer")]),
        Some((1000 - through) as f64)
    );
    // the webhooks have a budget of their own: unsigned callbacks from one address are cut
    // off after it (the ones let through are refused for their signature)
    let (http, base) = (s.http.clone(), s.order_api.clone());
    let (answers, took) = flood(300, move |i| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.post(format!("{base}/v1/payments/wechat/callback"))
                .json(&json!({"event_id": format!("e{i}")}))
                .send()
                .await
                .unwrap()
        }
    })
    .await;
    let through = passed(&answers);
    let allowed = 10 + (5.0 * took.as_secs_f64()).ceil() as usize;
    eprintln!("rate limit: {through} of 300 callbacks through in {took:?} (allows {allowed})");
    assert!(
        (10..=allowed).contains(&through),
        "{through} of 300 callbacks went through in {took:?} (at most {allowed})"
    );
    let other: Vec<_> = answers
        .iter()
        .filter(|(s, _)| !matches!(*s, StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS))
        .collect();
    assert!(other.is_empty(), "{other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_has_a_budget_of_its_own_whoever_it_buys_as() {
    let s = Stack::start_with(StackOptions {
        rate_limits: RateLimitConfig {
            address: Budget {
                per_sec: 1,
                burst: 5,
            },
            ..RateLimitConfig::off()
        },
        ..StackOptions::default()
    })
    .await;
    s.put_sku("sku-addr", "bar-1", 100, 100).await;
    let mut statuses = Vec::new();
    for i in 0..20 {
        let (status, body) = s
            .create_order(&format!("buyer-{i}"), "k", "sku-addr", "bar-1", 1)
            .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["code"], "ERR_RATE_LIMITED");
            assert!(
                body["message"].as_str().unwrap().contains("address"),
                "{body}"
            );
        }
        statuses.push(status);
    }
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    // 5 at once, and one a second after that (the loop takes well under 10 s)
    assert!((5..15).contains(&created), "{statuses:?}");
    assert_eq!(
        created
            + statuses
                .iter()
                .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
                .count(),
        20
    );
}

/// Hostile input on the ops APIs is the caller's mistake (400), never "try again later"
/// (503); every error, on every route, unknown or not, is the house JSON body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_a_400_and_every_error_is_the_house_json_body() {
    let s = integration_tests::binaries::Services::start(&[], &[]).await;
    let (_scheduler, scheduler) = s.scheduler(&[]).await;
    let call = |method: reqwest::Method, url: String, body: Option<serde_json::Value>| {
        let mut req = s
            .http
            .request(method, url)
            .bearer_auth(integration_tests::ops_token());
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            let kind = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
            assert!(kind.starts_with("application/json"), "{status} {kind}");
            if !status.is_success() {
                assert!(
                    body["code"].is_string() && body["message"].is_string(),
                    "{body}"
                );
            }
            (status, body)
        }
    };
    let good = json!({"kind": "stock.reconcile", "recurrence": "0 3 * * *",
                      "time_zone": "Asia/Shanghai"});
    let with = |field: &str, value: serde_json::Value| {
        let mut b = good.clone();
        b[field] = value;
        b
    };
    let get = reqwest::Method::GET;
    let put = reqwest::Method::PUT;
    for (method, url, body, want) in [
        (
            get.clone(),
            format!("{scheduler}/v1/ops/jobs?kind=a%00b"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            put.clone(),
            format!("{scheduler}/v1/ops/schedules/a%00b"),
            Some(good.clone()),
            StatusCode::BAD_REQUEST,
        ),
        (
            put.clone(),
            format!("{scheduler}/v1/ops/schedules/nul-payload"),
            Some(with("payload", json!({"note": "a\u{0}b"}))),
            StatusCode::BAD_REQUEST,
        ),
        (
            put.clone(),
            format!("{scheduler}/v1/ops/schedules/negative"),
            Some(with("catch_up_max", json!(-1))),
            StatusCode::BAD_REQUEST,
        ),
        (
            put.clone(),
            format!("{scheduler}/v1/ops/schedules/nul-zone"),
            Some(with("time_zone", json!("Asia/\u{0}Shanghai"))),
            StatusCode::BAD_REQUEST,
        ),
        // path and query rejections, unknown routes and wrong methods
        (
            get.clone(),
            format!("{scheduler}/v1/ops/jobs/abc"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            get.clone(),
            format!("{scheduler}/v1/ops/jobs?limit=many"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            get.clone(),
            format!("{scheduler}/v1/nothing-here"),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            reqwest::Method::DELETE,
            format!("{scheduler}/v1/ops/jobs"),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            get.clone(),
            format!("{}/v1/nothing-here", s.order_api),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            reqwest::Method::PATCH,
            format!("{}/v1/orders", s.order_api),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            get.clone(),
            format!("{}/v1/nothing-here", s.prelock),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            get.clone(),
            format!("{}/v1/nothing-here", s.gateway),
            None,
            StatusCode::NOT_FOUND,
        ),
        // and a good schedule is still taken
        (
            put.clone(),
            format!("{scheduler}/v1/ops/schedules/fine"),
            Some(good.clone()),
            StatusCode::CREATED,
        ),
    ] {
        let (status, body) = call(method.clone(), url.clone(), body).await;
        assert_eq!(status, want, "{method} {url}: {body}");
    }
    // a body over the 2 MB limit is 413, in the house format
    let big = "x".repeat(3 * 1024 * 1024);
    let r = s
        .http
        .post(format!("{}/v1/orders", s.order_api))
        .bearer_auth(integration_tests::token("big"))
        .header("Idempotency-Key", "big")
        .header("content-type", "application/json")
        .body(format!("{{\"sku_id\": \"{big}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "ERR_PAYLOAD_TOO_LARGE");
}

/// Secrets in URLs (a chat bot's `key=`, a notification receiver's `access_token=`, a
/// password in `REDIS_URL` / `DATABASE_URL`) never reach a log line, a job's `last_error`, the
/// ops API or the console's data, on every failure path that names where it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_urls_never_reach_the_logs_or_the_ops_api() {
    const ALERT: &str = "SECRET-ALERT-8f3a";
    const NOTIFY: &str = "SECRET-NOTIFY-77c1";
    const REDIS: &str = "SECRET-REDIS-41d0";
    const PG: &str = "SECRET-PG-9b22";
    let s = integration_tests::binaries::Services::start(
        &[],
        &[("PAYMENT_FIRST_CHECK_MS", "200".to_owned())],
    )
    .await;
    // nothing listens on port 1: every call fails, naming where it went
    let (scheduler_proc, scheduler) = s
        .scheduler(&[
            ("FOLLOW_UP_DELAY_MS", "0".to_owned()),
            (
                "NOTIFY_WEBHOOK_URL",
                format!("http://127.0.0.1:1/robot/send?access_token={NOTIFY}"),
            ),
            ("NOTIFY_WEBHOOK_SECRET", "test-notify-secret".to_owned()),
        ])
        .await;
    let (worker_proc, worker) = s
        .compensation_worker(&[
            ("COMPENSATION_MAX_ATTEMPTS", "2".to_owned()),
            ("COMPENSATION_BACKOFF_BASE_MS", "100".to_owned()),
            (
                "ALERT_WEBHOOK_URL",
                format!("http://127.0.0.1:1/cgi-bin/webhook/send?key={ALERT}"),
            ),
            ("ALERT_MIN_INTERVAL_MS", "100".to_owned()),
        ])
        .await;
    s.put_sku("sku-sec", "bar-sec", 500, 5).await;
    // a paid order: its notification fails (the scheduler's path)
    let (_, paid, _) = s
        .order_with_payment("sec-user", "sec-1", ("sku-sec", "bar-sec"), "wechat")
        .await;
    s.pay(&paid).await;
    // a lost payment whose query is broken: archived, and the alert fails (the worker's path)
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    let (_, lost, _) = s
        .order_with_payment("sec-user", "sec-2", ("sku-sec", "bar-sec"), "douyin")
        .await;
    s.break_query(&lost, true).await;
    s.pay(&lost).await;
    let jobs = |base: String| {
        let http = s.http.clone();
        async move {
            http.get(format!("{base}/v1/ops/jobs?kind=order.notify"))
                .bearer_auth(integration_tests::ops_token())
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let listed = eventually(
        "the notification failed",
        Duration::from_secs(30),
        || async {
            let page = jobs(scheduler.clone()).await;
            page.contains("unreachable").then_some(page)
        },
    )
    .await;
    eventually("the alert failed", Duration::from_secs(30), || async {
        worker_proc
            .log_text()
            .contains("alert webhook unreachable")
            .then_some(())
    })
    .await;
    let dead = jobs(worker.clone()).await;
    // a dependency that is down at start-up, with a password in its URL
    let mut prelock = integration_tests::binaries::Proc::spawn(
        "prelock-service",
        &[
            ("REDIS_URL", format!("redis://:{REDIS}@127.0.0.1:1")),
            ("DATABASE_URL", s.db.clone()),
            ("SERVICE_TOKEN", integration_tests::SERVICE_TOKEN.to_owned()),
            ("ALLOW_DEV_SECRETS", "true".to_owned()),
            (
                "PRELOCK_ADDR",
                format!("127.0.0.1:{}", integration_tests::binaries::free_port()),
            ),
        ],
    );
    let mut order_api = integration_tests::binaries::Proc::spawn(
        "order-api",
        &[
            (
                "DATABASE_URL",
                format!("postgres://app:{PG}@127.0.0.1:1/none"),
            ),
            ("ALLOW_DEV_SECRETS", "true".to_owned()),
            (
                "ORDER_API_ADDR",
                format!("127.0.0.1:{}", integration_tests::binaries::free_port()),
            ),
        ],
    );
    eventually("both said what failed", Duration::from_secs(20), || async {
        (prelock.log_text().contains("redis") && order_api.log_text().contains("postgres"))
            .then_some(())
    })
    .await;
    prelock.crash();
    order_api.crash();
    for (what, text) in [
        ("scheduler log", scheduler_proc.log_text()),
        ("order.notify jobs", listed),
        ("worker log", worker_proc.log_text()),
        ("worker jobs", dead),
        ("prelock-service log", prelock.log_text()),
        ("order-api log", order_api.log_text()),
    ] {
        for secret in [ALERT, NOTIFY, REDIS, PG] {
            assert!(!text.contains(secret), "{what} holds {secret}:\n{text}");
        }
    }
}

/// Open descriptors of a process (its sockets among them).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Slow clients hold nothing for long: 300 sockets trickling one header line at a time are
/// all closed within the header-read timeout, connections past the cap are closed at once,
/// and a body that never finishes is answered 408 in the house format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = integration_tests::binaries::Services::start(
        &[],
        &[
            // all 300 sockets are open together well inside it; far shorter than the 18 s
            // they would trickle
            ("HTTP_HEADER_READ_TIMEOUT_MS", "3000".to_owned()),
            ("HTTP_REQUEST_TIMEOUT_MS", "1500".to_owned()),
            ("HTTP_MAX_CONNECTIONS", "200".to_owned()),
            ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "150".to_owned()),
        ],
    )
    .await;
    let pid = s.order_proc.child.id();
    let addr = s.order_api.trim_start_matches("http://").to_owned();
    let before = open_fds(pid);
    // all 300 connected first (the kernel completes a connect before the server accepts it),
    // so they are open at once whatever the scheduling
    let mut socks = Vec::new();
    for _ in 0..300 {
        socks.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut sock) in socks.into_iter().enumerate() {
        set.spawn(async move {
            let _ = sock
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await;
            // one more header line every 300 ms, never the blank line that ends the head
            let mut buf = [0u8; 512];
            for n in 0..60 {
                tokio::select! {
                    read = sock.read(&mut buf) => match read {
                        // closed by the server (0, or reset), possibly after an error answer
                        Ok(0) | Err(_) => return (i, Some(Instant::now())),
                        Ok(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {
                        if sock.write_all(format!("X-Slow-{n}: y\r\n").as_bytes()).await.is_err() {
                            return (i, Some(Instant::now()));
                        }
                    }
                }
            }
            (i, None)
        });
    }
    // what the server holds while they trickle
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mid = open_fds(pid);
    // one address holds at most its share: another address is served meanwhile
    let other = {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = sock.connect(addr.parse().unwrap()).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer))
            .await
            .expect("another address answered while one holds its connections")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    let mut closed = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, at) = r.unwrap();
        let at = at.unwrap_or_else(|| panic!("slow socket {i} was still open after 18 s"));
        closed.push(at.duration_since(started));
    }
    let slowest = closed.iter().max().unwrap();
    eprintln!(
        "slow clients: 300 trickling sockets from one address, cap 150 an address: {} \
         descriptors more mid-way, the last closed after {slowest:?} (header timeout 3 s)",
        mid.saturating_sub(before)
    );
    // the header-read timeout (3 s) and scheduling; nowhere near the 18 s they would trickle
    assert!(
        *slowest < Duration::from_secs(10),
        "the last slow socket closed after {slowest:?}"
    );
    assert!(
        mid <= before + 150 + 20,
        "{mid} descriptors open with 300 slow clients from one address (150 each, {before} before)"
    );
    let after = eventually("descriptors back", Duration::from_secs(10), || async {
        let n = open_fds(pid);
        (n <= before + 5).then_some(n)
    })
    .await;
    assert!(after <= before + 5);
    let page = s.metrics(&s.order_api).await;
    let refused =
        integration_tests::metric_value(&page, "http_connections_refused_per_address_total", &[])
            .expect("http_connections_refused_per_address_total");
    assert!(refused >= 150.0, "{refused}");
    // and the process-wide cap: 120 from each of two addresses (each inside its share) make
    // 240, of which 200 are held
    let mut held = Vec::new();
    for source in ["127.0.0.1", "127.0.0.3"] {
        for _ in 0..120 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
            held.push(sock.connect(addr.parse().unwrap()).await.unwrap());
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let full = open_fds(pid);
    assert!(
        full <= before + 200 + 20,
        "{full} descriptors open with 240 idle clients (cap 200, {before} before)"
    );
    drop(held);
    eventually("descriptors back", Duration::from_secs(10), || async {
        (open_fds(pid) <= before + 5).then_some(())
    })
    .await;
    let page = s.metrics(&s.order_api).await;
    let refused = integration_tests::metric_value(&page, "http_connections_refused_total", &[])
        .expect("http_connections_refused_total");
    assert!(refused >= 1.0, "{refused}");

    // a body that never finishes: 408 in the house format
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Idempotency-Key: slow\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"sku",
        integration_tests::token("slow-body")
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut answer))
        .await
        .expect("an answer within the request timeout")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("ERR_REQUEST_TIMEOUT"), "{answer}");
}

/// Least privilege in Postgres: `db-migrate` runs the migrations as the migrating role (the
/// schema's owner) and grants the application role DML only; every service runs on that role
/// (an order goes from "buy now" to confirmed), and the role can neither change nor empty a
/// table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_run_as_an_application_role_that_cannot_change_the_schema() {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let (migrator, app, db) = (
        format!("bft_mig_{tag}"),
        format!("bft_app_{tag}"),
        format!("bft_{tag}"),
    );
    let admin = sqlx::PgPool::connect(&integration_tests::admin_url())
        .await
        .unwrap();
    for sql in [
        format!("CREATE ROLE {migrator} LOGIN"),
        format!("CREATE ROLE {app} LOGIN"),
        format!("CREATE DATABASE {db} OWNER {migrator}"),
    ] {
        sqlx::query(&sql).execute(&admin).await.unwrap();
    }
    let url = |role: &str| format!("postgres://{role}@127.0.0.1:5432/{db}");
    let mut migrate = integration_tests::binaries::Proc::spawn(
        "db-migrate",
        &[
            ("MIGRATION_DATABASE_URL", url(&migrator)),
            ("APP_DB_ROLE", app.clone()),
        ],
    );
    let status = eventually("db-migrate", Duration::from_secs(60), || {
        let s = migrate.child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "{}", migrate.log_text());

    // the whole flow on the application role
    let s = integration_tests::binaries::Services::start(
        &[
            ("DATABASE_URL", url(&app)),
            ("RUN_MIGRATIONS", "false".to_owned()),
        ],
        &[],
    )
    .await;
    let (_scheduler, _) = s.scheduler(&[("FOLLOW_UP_DELAY_MS", "0".to_owned())]).await;
    let (_worker, _) = s.compensation_worker(&[]).await;
    s.put_sku("sku-role", "bar-role", 800, 3).await;
    let (order, payment, _) = s
        .order_with_payment("role-user", "r-1", ("sku-role", "bar-role"), "alipay")
        .await;
    s.pay(&payment).await;
    let pool = sqlx::PgPool::connect(&url(&app)).await.unwrap();
    eventually("confirmed", Duration::from_secs(30), || async {
        let state: String = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::uuid")
            .bind(&order)
            .fetch_one(&pool)
            .await
            .unwrap();
        (state == "CONFIRMED").then_some(())
    })
    .await;

    // and what it cannot do
    for sql in [
        "DROP TABLE orders",
        "ALTER TABLE orders ADD COLUMN hoarded integer",
        "TRUNCATE orders",
        "CREATE TABLE side_channel (x integer)",
        "DELETE FROM _sqlx_migrations",
        "ALTER TABLE orders DISABLE TRIGGER ALL",
        "DROP FUNCTION outbox_next_id()",
        // the state machine is read only, the evidence logs append-only
        "INSERT INTO order_transition VALUES ('REDEEMED', 'CONFIRMED')",
        "DELETE FROM order_transition",
        "DELETE FROM compensation_audit",
        "UPDATE compensation_audit SET operator = 'nobody'",
        "DELETE FROM payment_events",
        // nor shadow the state machine with a table of its own
        "CREATE TEMP TABLE order_transition (from_state text, to_state text)",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        let code = err
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    pool.close().await;
    drop(s);
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    for role in [&app, &migrator] {
        sqlx::query(&format!("DROP ROLE {role}"))
            .execute(&admin)
            .await
            .unwrap();
    }
}

/// Each credential opens only what it is for: the service token the service-to-service
/// routes, an operator's token the ops routes (and the audit takes the operator from it, not
/// from a header), a store's token the redemption of its own vouchers (covered end to end),
/// and no credential schedules a job that moves money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_opens_only_what_it_is_for_and_names_who_used_it() {
    use integration_tests::{operator_token, store_token, SERVICE_TOKEN};
    use reqwest::Method;
    let s = integration_tests::binaries::Services::start(&[], &[]).await;
    let (_scheduler, scheduler) = s.scheduler(&[]).await;
    let (_worker, worker) = s.compensation_worker(&[]).await;
    let call = |method: Method, url: String, token: String, body: Option<serde_json::Value>| {
        let mut req = s
            .http
            .request(method, url)
            .bearer_auth(token)
            // a header naming someone else changes nothing
            .header("X-Operator", "alice-the-admin (spoofed)");
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body)
        }
    };
    let sku = json!({"store_id": "bar-1", "price_cents": 100, "stock": 10});
    let reserve = json!({"quantity": 1, "attempt": uuid::Uuid::new_v4(), "buyer": "u"});
    let refund = json!({"kind": "payment.refund", "recurrence": "0 3 * * *",
                        "time_zone": "UTC", "payload": {"payment_id": 1, "amount_cents": 1_000_000}});
    let reconcile =
        json!({"kind": "stock.reconcile", "recurrence": "0 3 * * *", "time_zone": "UTC"});
    let bob = operator_token("bob");
    let buyer = integration_tests::token("bob");
    // a staff-looking token signed with the buyers' key
    let forged = service_kit::auth::mint_staff_token(
        integration_tests::JWT_SECRET,
        "mallory",
        "operator",
        None,
        600,
    );
    let order = uuid::Uuid::new_v4();
    let cases: Vec<(
        Method,
        String,
        String,
        Option<serde_json::Value>,
        StatusCode,
    )> = vec![
        // stock admin: operators only
        (
            Method::PUT,
            format!("{}/v1/skus/sku-cred", s.prelock),
            SERVICE_TOKEN.into(),
            Some(sku.clone()),
            StatusCode::FORBIDDEN,
        ),
        (
            Method::PUT,
            format!("{}/v1/skus/sku-cred", s.prelock),
            store_token("bar-1"),
            Some(sku.clone()),
            StatusCode::FORBIDDEN,
        ),
        (
            Method::PUT,
            format!("{}/v1/skus/sku-cred", s.prelock),
            buyer.clone(),
            Some(sku.clone()),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::PUT,
            format!("{}/v1/skus/sku-cred", s.prelock),
            forged.clone(),
            Some(sku.clone()),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::PUT,
            format!("{}/v1/skus/sku-cred", s.prelock),
            bob.clone(),
            Some(sku.clone()),
            StatusCode::OK,
        ),
        (
            Method::POST,
            format!("{}/v1/admin/rebuild", s.prelock),
            SERVICE_TOKEN.into(),
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            format!("{}/v1/admin/rebuild", s.prelock),
            bob.clone(),
            None,
            StatusCode::OK,
        ),
        // the nightly reconciliation: the scheduler (service) and operators
        (
            Method::POST,
            format!("{}/v1/admin/reconcile", s.prelock),
            SERVICE_TOKEN.into(),
            None,
            StatusCode::OK,
        ),
        (
            Method::POST,
            format!("{}/v1/admin/reconcile", s.prelock),
            store_token("bar-1"),
            None,
            StatusCode::FORBIDDEN,
        ),
        // the reservation routes and the clock: services only
        (
            Method::PUT,
            format!("{}/v1/skus/sku-cred/reservations/{order}", s.prelock),
            bob.clone(),
            Some(reserve.clone()),
            StatusCode::FORBIDDEN,
        ),
        (
            Method::PUT,
            format!("{}/v1/skus/sku-cred/reservations/{order}", s.prelock),
            store_token("bar-1"),
            Some(reserve.clone()),
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            format!("{}/v1/clock", s.prelock),
            bob.clone(),
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            format!("{}/v1/clock", s.prelock),
            SERVICE_TOKEN.into(),
            None,
            StatusCode::OK,
        ),
        (
            Method::GET,
            format!("{}/v1/skus/sku-cred/reservations/{order}", s.prelock),
            bob.clone(),
            None,
            StatusCode::OK,
        ),
        // the job and compensation ops routes: operators only
        (
            Method::GET,
            format!("{scheduler}/v1/ops/jobs"),
            SERVICE_TOKEN.into(),
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            format!("{scheduler}/v1/ops/jobs"),
            store_token("bar-1"),
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            format!("{worker}/v1/ops/compensation/failures"),
            SERVICE_TOKEN.into(),
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            format!("{worker}/v1/ops/compensation/failures"),
            bob.clone(),
            None,
            StatusCode::OK,
        ),
        // no credential schedules a job that moves money
        (
            Method::PUT,
            format!("{scheduler}/v1/ops/schedules/refund-by-hand"),
            bob.clone(),
            Some(refund),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            format!("{scheduler}/v1/ops/schedules/by-service"),
            SERVICE_TOKEN.into(),
            Some(reconcile.clone()),
            StatusCode::FORBIDDEN,
        ),
        (
            Method::PUT,
            format!("{scheduler}/v1/ops/schedules/by-bob"),
            bob.clone(),
            Some(reconcile),
            StatusCode::CREATED,
        ),
        (
            Method::PUT,
            format!("{scheduler}/v1/ops/kinds/order.notify/pause"),
            bob.clone(),
            None,
            StatusCode::OK,
        ),
    ];
    for (method, url, token, body, want) in cases {
        let (status, answer) = call(method.clone(), url.clone(), token, body).await;
        assert_eq!(status, want, "{method} {url}: {answer}");
        if !status.is_success() {
            assert!(answer["code"].is_string(), "{answer}");
        }
        if status == StatusCode::FORBIDDEN {
            assert_eq!(answer["code"], "ERR_FORBIDDEN");
        }
        if status == StatusCode::BAD_REQUEST {
            assert!(
                answer["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("kind: only maintenance kinds"),
                "{answer}"
            );
        }
    }
    // who acted is the token's `sub`, whatever the header said
    for url in [
        format!("{scheduler}/v1/ops/whoami"),
        format!("{worker}/v1/ops/whoami"),
    ] {
        let (status, me) = call(Method::GET, url, operator_token("carol"), None).await;
        assert_eq!(
            (status, me["operator"].as_str()),
            (StatusCode::OK, Some("carol"))
        );
    }
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let (paused_by,): (String,) =
        sqlx::query_as("SELECT paused_by FROM job_kind_pause WHERE kind = 'order.notify'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(paused_by, "bob");
    let (by,): (String,) =
        sqlx::query_as("SELECT updated_by FROM job_schedule WHERE name = 'by-bob'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(by, "bob");
    let refunds: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_schedule WHERE kind = 'payment.refund'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(refunds, 0);
    // an operator removes a schedule; the service token cannot
    let url = format!("{scheduler}/v1/ops/schedules/by-bob");
    let (status, _) = call(Method::DELETE, url.clone(), SERVICE_TOKEN.into(), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(Method::DELETE, url.clone(), bob.clone(), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = call(Method::DELETE, url, bob.clone(), None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("ERR_NOT_FOUND"))
    );

    // and a refund job written by hand (as a schedule would) for a payment its order keeps
    // pays nothing back, whatever amount it names
    let (order, payment, _) = s
        .order_with_payment("cred-buyer", "k", ("sku-cred", "bar-1"), "wechat")
        .await;
    s.pay(&payment).await;
    eventually("the order paid", Duration::from_secs(20), || async {
        (integration_tests::order_state(&db, &order).await != "PENDING").then_some(())
    })
    .await;
    let mut conn = db.acquire().await.unwrap();
    job_engine::store::insert(
        &mut conn,
        &job_engine::NewJob {
            kind: "payment.refund".to_owned(),
            payload: json!({"payment_id": payment, "amount_cents": 1}),
            priority: job_engine::Priority::P0,
            run_at: chrono::Utc::now().into(),
            max_attempts: 3,
            dedupe_key: None,
        },
    )
    .await
    .unwrap();
    drop(conn);
    let error: String = eventually("the hand-written refund refused", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT last_error FROM delayed_job_all WHERE kind = 'payment.refund' AND state = 'dead'",
        )
        .fetch_optional(&db)
        .await
        .unwrap()
        .flatten()
    })
    .await;
    assert!(error.contains("payment is SUCCEEDED"), "{error}");
    let report = integration_tests::assert_money_invariant(
        &s.http,
        &s.gateway,
        &db,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!((report.paid, report.kept), (1, 1));
}
