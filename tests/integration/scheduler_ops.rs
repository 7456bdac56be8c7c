//! The scheduler's ops API, on the real binary: jobs by state, redrive of a dead job, pause
//! and resume of a kind, schedules (the seeded nightly reconciliation, a new one, a bad one),
//! all behind an operator token and in `/openapi.json`.

use std::time::Duration;

use integration_tests::binaries::Services;
use integration_tests::{eventually, ops_token};
use job_engine::store::{self, NewJob};
use job_engine::Priority;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// An `order.expire` job whose payload has no order id: the scheduler kills it at once.
async fn insert_bad_job(db: &sqlx::PgPool, n: i64) -> i64 {
    let mut conn = db.acquire().await.unwrap();
    store::insert(
        &mut conn,
        &NewJob {
            kind: "order.expire".into(),
            payload: json!({ "n": n }),
            priority: Priority::P1,
            run_at: chrono::Utc::now().into(),
            max_attempts: 3,
            dedupe_key: None,
        },
    )
    .await
    .unwrap()
    .id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_redrive_pause_and_schedule_through_the_ops_api() {
    let s = Services::start(&[], &[]).await;
    let (_scheduler, url) = s.scheduler(&[]).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    let http = &s.http;
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{url}{path}"))
            .bearer_auth(ops_token());
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let get = |path: &str| call(reqwest::Method::GET, path, None);

    // no token, no answer
    let r = http.get(format!("{url}/v1/ops/jobs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, body) = get("/v1/ops/jobs?state=lost").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // a dead job is listed, inspected, redriven (and dies again: its payload is still bad)
    let id = insert_bad_job(&db, 1).await;
    eventually("the bad job to die", Duration::from_secs(20), || async {
        let (_, jobs) = get("/v1/ops/jobs?state=dead&kind=order.expire").await;
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id)
            .then_some(())
    })
    .await;
    let (status, job) = get(&format!("/v1/ops/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["state"], "dead");
    assert_eq!(job["last_error"], "payload has no valid order_id");
    let (status, job) = call(
        reqwest::Method::POST,
        &format!("/v1/ops/jobs/{id}/redrive"),
        None,
    )
    .await;
    assert_eq!(
        (status, job["attempts"].as_i64()),
        (StatusCode::OK, Some(0)),
        "{job}"
    );
    let (status, body) = call(reqwest::Method::POST, "/v1/ops/jobs/999999/redrive", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    eventually(
        "the redriven job to run",
        Duration::from_secs(20),
        || async {
            let (_, job) = get(&format!("/v1/ops/jobs/{id}")).await;
            (job["state"] == "dead" && job["attempts"] == 1).then_some(())
        },
    )
    .await;

    // pause: nothing of the kind runs until it is resumed; then it does
    let (status, paused) = call(
        reqwest::Method::PUT,
        "/v1/ops/kinds/order.expire/pause",
        None,
    )
    .await;
    assert_eq!(
        (status, &paused["paused"]),
        (StatusCode::OK, &json!(["order.expire"]))
    );
    // a pause takes effect within one poll interval (250 ms): the loop re-reads it that often
    tokio::time::sleep(Duration::from_millis(600)).await;
    let held = insert_bad_job(&db, 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        get(&format!("/v1/ops/jobs/{held}")).await.1["state"],
        "scheduled"
    );
    let (status, paused) = call(
        reqwest::Method::DELETE,
        "/v1/ops/kinds/order.expire/pause",
        None,
    )
    .await;
    assert_eq!((status, &paused["paused"]), (StatusCode::OK, &json!([])));
    eventually(
        "the held job to run after the resume",
        Duration::from_secs(20),
        || async {
            (get(&format!("/v1/ops/jobs/{held}")).await.1["state"] == "dead").then_some(())
        },
    )
    .await;
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("/v1/ops/jobs/{held}/redrive"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // schedules: the nightly reconciliation is seeded; a new one is created, a bad one refused
    let (status, all) = get("/v1/ops/schedules").await;
    assert_eq!(status, StatusCode::OK);
    let all = all.as_array().unwrap();
    let names: Vec<&str> = all.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "orders-prune-lost-answers",
            "outbox-prune",
            "stock-reconcile-nightly"
        ]
    );
    let nightly = &all[2];
    assert_eq!(nightly["name"], "stock-reconcile-nightly");
    assert_eq!(nightly["kind"], "stock.reconcile");
    assert_eq!(nightly["time_zone"], "Asia/Shanghai");
    // 03:00 in Shanghai is 19:00 UTC the day before
    let next = nightly["next"].as_array().unwrap();
    assert_eq!(next.len(), 3);
    assert!(
        next.iter()
            .all(|t| t.as_str().unwrap().contains("T19:00:00")),
        "{next:?}"
    );

    let monthly = json!({
        "kind": "stock.reconcile",
        "recurrence": "monthly on day 1 at 02:30",
        "time_zone": "Europe/Berlin",
        "dst_gap": "skip",
        "misfire": "catch_up",
        "catch_up_max": 2
    });
    let (status, created) = call(
        reqwest::Method::PUT,
        "/v1/ops/schedules/monthly-report",
        Some(monthly.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        (
            created["priority"].as_i64(),
            created["dst_overlap"].as_str()
        ),
        (Some(2), Some("first"))
    );
    let (status, _) = call(
        reqwest::Method::PUT,
        "/v1/ops/schedules/monthly-report",
        Some(monthly),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "an edit");
    let (status, body) = call(
        reqwest::Method::PUT,
        "/v1/ops/schedules/monthly-report",
        Some(
            json!({ "kind": "stock.reconcile", "recurrence": "daily at 02:00",
                     "time_zone": "Europe/Berlin", "dst_gap": "sideways" }),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().contains("dst_gap"),
        "{body}"
    );
    let (status, body) = call(
        reqwest::Method::PUT,
        "/v1/ops/schedules/monthly-report",
        Some(
            json!({ "kind": "stock.reconcile", "recurrence": "daily at 02:00",
                     "time_zone": "Europe/Atlantis" }),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Europe/Atlantis"),
        "{body}"
    );
    assert_eq!(
        get("/v1/ops/schedules/monthly-report").await.1["misfire"],
        "catch_up"
    );

    // the ops API is documented like the other services'
    let doc: Value = http
        .get(format!("{url}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for p in [
        "/v1/ops/jobs",
        "/v1/ops/jobs/{id}",
        "/v1/ops/jobs/{id}/redrive",
        "/v1/ops/kinds/paused",
        "/v1/ops/kinds/{kind}/pause",
        "/v1/ops/schedules",
        "/v1/ops/schedules/{name}",
    ] {
        assert!(
            paths.iter().any(|k| k.as_str() == p),
            "{p} missing from {paths:?}"
        );
    }

    // what the daily prune forgets: lost answers older than a day, not fresh ones
    sqlx::query(
        "INSERT INTO prelock_lost_answers (order_id, sku_id, created_at)
         VALUES (gen_random_uuid(), 'sku-a', now() - interval '2 days'),
                (gen_random_uuid(), 'sku-a', now())",
    )
    .execute(&db)
    .await
    .unwrap();
    let pruned = postgres_store::orders::prune_lost_answers(
        &db,
        chrono::Utc::now() - chrono::Duration::days(1),
    )
    .await
    .unwrap();
    assert_eq!(pruned, 1);

    // what the daily outbox prune deletes: published events written before the retention,
    // never one not yet published (in a gap of the relay's position, or past it), however old
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, schema_version,
             payload, created_at)
         SELECT gen_random_uuid(), 'order', a, 'OrderCreated', 1, '{}', now() - age
         FROM unnest(ARRAY['old-published', 'old-unpublished', 'new-published', 'old-past'],
                     ARRAY[interval '9 days', interval '9 days', interval '0', interval '9 days'])
              WITH ORDINALITY AS t(a, age, n)
         ORDER BY n
         RETURNING id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox_relay SET published_through = $1, gap_lo = ARRAY[$2], gap_hi = ARRAY[$2],
             gap_horizon = ARRAY[0::bigint]",
    )
    .bind(ids[2])
    .bind(ids[1])
    .execute(&db)
    .await
    .unwrap();
    let pruned = postgres_store::effects::prune_published(
        &db,
        chrono::Utc::now() - chrono::Duration::days(7),
    )
    .await
    .unwrap();
    assert_eq!(pruned, 1);
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM outbox WHERE aggregate_id LIKE 'old-%' OR aggregate_id LIKE 'new-%'
         ORDER BY aggregate_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(left, ["new-published", "old-past", "old-unpublished"]);
}
