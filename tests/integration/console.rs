//! The ops console in a real browser (headless Chromium through WebDriver): log in with
//! an operator token, see an open failure, edit its transaction id and replay it, see the order paid
//! and the audit row; see a dead job and redrive it.

use std::time::Duration;

use integration_tests::binaries::Services;
use integration_tests::eventually;
use integration_tests::webdriver::Browser;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_failure_and_redrives_a_dead_job_in_the_console() {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "200".to_owned())]).await;
    let (_worker, worker) = s
        .compensation_worker(&[
            ("COMPENSATION_MAX_ATTEMPTS", "2".to_owned()),
            ("COMPENSATION_BACKOFF_BASE_MS", "100".to_owned()),
        ])
        .await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-con", "bar-con", 4_200, 5).await;
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    let (order, payment, _) = s
        .order_with_payment("con-user", "con-1", ("sku-con", "bar-con"), "douyin")
        .await;
    s.break_query(&payment, true).await;
    s.pay(&payment).await;
    let failure: Value = eventually("the failure archived", Duration::from_secs(30), || async {
        s.open_failures(&worker).await.into_iter().next()
    })
    .await;
    let dead: i64 = sqlx::query_scalar(
        "INSERT INTO delayed_job (kind, payload, state, run_at, attempts, max_attempts, last_error)
         VALUES ('order.notify', '{\"order_id\": \"gone\"}', 'dead', now(), 10, 10,
                 'notification endpoint answered 410')
         RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let txn = s.sim_payment(&payment).await["transaction_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let b = Browser::start().await;
    b.goto(&format!("{worker}/ops/")).await;

    // a wrong token is refused, on the page
    let token = b.wait_for("#token", |_| true).await;
    b.type_into(&token, "not-the-token").await;
    b.click(&b.find("#login").await.unwrap()).await;
    b.wait_for("#login-error", |t| t.contains("not a valid operator token"))
        .await;
    assert!(!b.displayed(&b.find("#app").await.unwrap()).await);

    // the right one shows the failures, the SLA figures and the dead jobs
    // the name in the audit is the token's, not something typed on the page
    b.type_into(&token, &integration_tests::operator_token("dora"))
        .await;
    b.click(&b.find("#login").await.unwrap()).await;
    let row = b
        .wait_for("#failures tbody tr", |t| t.contains(&payment))
        .await;
    let row_text = b.text(&row).await;
    assert!(row_text.contains("gateway_error"), "{row_text}");
    assert!(row_text.contains("PENDING"), "{row_text}");
    b.wait_for("#sla-open", |t| t == "1").await;
    b.wait_for("#dead-jobs tbody tr", |t| t.contains("answered 410"))
        .await;

    // inspect, edit the transaction id, replay
    b.click(&b.find("#failures tbody tr button.inspect").await.unwrap())
        .await;
    b.wait_for("#detail-id", |t| t == format!("#{}", failure["id"]))
        .await;
    let context = b.text_of("#context").await;
    assert!(context.contains(&payment), "{context}");
    b.type_into(&b.find("#txn").await.unwrap(), &txn).await;
    b.click(&b.find("#save").await.unwrap()).await;
    b.wait_for("#replay-result", |t| t == "saved").await;
    b.click(&b.find("#replay").await.unwrap()).await;
    b.wait_for("#replay-result", |t| t == "replay: paid").await;

    // the order is paid, the failure resolved, and the audit shows who did what
    b.wait_for("#detail-order-state", |t| t == "PAID").await;
    b.wait_for("#detail-status", |t| t == "resolved (replay)")
        .await;
    let audit = b.wait_for("#audit tbody", |t| t.contains("replay")).await;
    let audit_text = b.text(&audit).await;
    assert!(
        audit_text.contains("dora") && audit_text.contains("edit") && audit_text.contains("paid"),
        "{audit_text}"
    );
    b.wait_for("#no-failures", |t| t.contains("No open failures"))
        .await;
    assert_eq!(integration_tests::order_state(&db, &order).await, "PAID");
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT operator, action, outcome FROM compensation_audit ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("dora".to_owned(), "edit".to_owned(), "edited".to_owned()),
            ("dora".to_owned(), "replay".to_owned(), "paid".to_owned()),
        ]
    );

    // redrive the dead job
    b.click(&b.find("#dead-jobs tbody tr button.redrive").await.unwrap())
        .await;
    b.wait_for("#no-dead", |t| t.contains("No dead jobs")).await;
    let job_state: String = sqlx::query_scalar("SELECT state FROM delayed_job WHERE id = $1")
        .bind(dead)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(job_state, "scheduled");
    b.quit().await;
    integration_tests::assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_file_carries_a_strict_content_security_policy() {
    let s = Services::start(&[], &[]).await;
    let (_worker, worker) = s.compensation_worker(&[]).await;
    for (path, kind) in [
        ("/ops/", "text/html"),
        ("/ops/console.js", "text/javascript"),
        ("/ops/console.css", "text/css"),
    ] {
        let r = s.http.get(format!("{worker}{path}")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{path}");
        let h = |name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        assert!(
            h("content-type").starts_with(kind),
            "{path}: {}",
            h("content-type")
        );
        let csp = h("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(h("referrer-policy"), "no-referrer", "{path}");
        if kind == "text/html" {
            // nothing inline for the policy to have to allow
            let page = r.text().await.unwrap();
            assert!(!page.contains("<style"), "inline style");
            assert_eq!(
                page.matches("<script").count(),
                page.matches("<script src=").count(),
                "inline script"
            );
            let handler = page
                .split(char::is_whitespace)
                .find(|w| w.starts_with("on") && w.contains("=\""));
            assert_eq!(handler, None, "inline event handler");
        }
    }
}
