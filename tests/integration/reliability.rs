//! Reliability on the real binaries: nothing the system owes a payment waits on a job that
//! died, no instance's clock decides anything, a paused leader is replaced, and a crashed
//! order-api's pre-locks come back within seconds. After each, the money invariant: every
//! payment the provider holds as paid is kept, refunded in full once, or an operator was told.

use std::time::{Duration, Instant};

use integration_tests::binaries::{skewed_clock, Services};
use integration_tests::receiver::Receiver;
use integration_tests::{
    assert_money_invariant, create_order, eventually, order_state, NewOrderRequest,
};
use serde_json::{json, Value};

async fn scalar<T>(db: &sqlx::PgPool, sql: &str, id: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Stocks `sku` with its own pre-lock lifetime.
async fn put_sku_ttl(s: &Services, sku: &str, store: &str, stock: i64, ttl_secs: i64) {
    let r = s
        .http
        .put(format!("{}/v1/skus/{sku}", s.prelock))
        .bearer_auth(integration_tests::ops_token())
        .json(
            &json!({ "store_id": store, "price_cents": 1_000, "stock": stock,
                        "prelock_ttl_seconds": ttl_secs }),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

/// The check job of a payment: (state, attempts).
async fn check_job(db: &sqlx::PgPool, payment: &str) -> (String, i32) {
    check_job_of(db, &format!("payment.check:{payment}")).await
}

/// The job with dedupe key `key`: (state, attempts).
async fn check_job_of(db: &sqlx::PgPool, key: &str) -> (String, i32) {
    sqlx::query_as("SELECT state, attempts FROM delayed_job_all WHERE dedupe_key = $1")
        .bind(key)
        .fetch_one(db)
        .await
        .unwrap()
}

/// Kills a job the way the engine does when its attempts run out.
async fn make_dead(db: &sqlx::PgPool, key: &str) {
    // a running job first finishes its run (the worker settles it), then dies
    eventually("the job to be idle", Duration::from_secs(20), || async {
        let done = sqlx::query(
            "UPDATE delayed_job SET state = 'dead', last_error = 'attempts spent (test)',
                 lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
             WHERE dedupe_key = $1 AND state = 'scheduled'",
        )
        .bind(key)
        .execute(db)
        .await
        .unwrap();
        (done.rows_affected() == 1).then_some(())
    })
    .await;
}

/// "Not paid yet" spends no attempt: a payment checked every 50 ms stays checked far past the
/// 240 checks the old attempt budget allowed (12 s here), and when the buyer finally pays
/// (callback lost) compensation applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_checked_for_as_long_as_its_order_can_take_money() {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "100".to_owned())]).await;
    let (_worker, _) = s
        .compensation_worker(&[("PAYMENT_CHECK_INTERVAL_MS", "50".to_owned())])
        .await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    put_sku_ttl(&s, "sku-long", "bar-l", 5, 600).await;
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    let (order, payment, _) = s
        .order_with_payment("long-user", "l-1", ("sku-long", "bar-l"), "wechat")
        .await;
    let checks = "SELECT checks FROM payment_check_state WHERE payment_id = $1::uuid";
    eventually(
        "300 checks of an unpaid payment",
        Duration::from_secs(90),
        || async {
            let n: Option<i32> = sqlx::query_scalar(checks)
                .bind(&payment)
                .fetch_optional(&db)
                .await
                .unwrap();
            n.is_some_and(|n| n >= 300).then_some(())
        },
    )
    .await;
    let (state, attempts) = check_job(&db, &payment).await;
    assert!(
        matches!(state.as_str(), "scheduled" | "running"),
        "the check is alive: {state}"
    );
    assert!(attempts <= 1, "snoozes spend no attempt: {attempts}");
    assert_eq!(order_state(&db, &order).await, "PENDING");
    s.pay(&payment).await;
    eventually(
        "the late payment applied",
        Duration::from_secs(20),
        || async { (order_state(&db, &order).await == "PAID").then_some(()) },
    )
    .await;
    let failures: i64 = scalar(
        &db,
        "SELECT count(*) FROM compensation_failure WHERE payment_id = $1::uuid",
        &payment,
    )
    .await;
    assert_eq!(failures, 0);
    let report = assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(10)).await;
    assert_eq!((report.paid, report.kept), (1, 1));
}

/// A stack whose callbacks are all lost, a compensation worker checking every 500 ms and
/// sweeping every `sweep_ms`, and a SKU `sku-dead` of store `bar-d`.
async fn lost_callbacks(
    sweep_ms: u64,
) -> (Services, integration_tests::binaries::Proc, sqlx::PgPool) {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "100".to_owned())]).await;
    let (worker, _) = s
        .compensation_worker(&[
            ("PAYMENT_CHECK_INTERVAL_MS", "500".to_owned()),
            ("COMPENSATION_SWEEP_MS", sweep_ms.to_string()),
            ("COMPENSATION_SWEEP_GRACE_MS", "200".to_owned()),
            // provider failures archive quickly (two in a row, 100 ms apart)
            ("COMPENSATION_MAX_ATTEMPTS", "2".to_owned()),
            ("COMPENSATION_BACKOFF_BASE_MS", "100".to_owned()),
            ("COMPENSATION_BACKOFF_CAP_MS", "200".to_owned()),
        ])
        .await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    put_sku_ttl(&s, "sku-dead", "bar-d", 10, 600).await;
    s.set_faults(json!({ "drop_rate": 1.0 })).await;
    (s, worker, db)
}

/// A check job that died (its attempts spent) is not coverage: the sweep schedules it again
/// and the payment, paid with its callback lost, is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_check_is_not_coverage_the_sweep_revives_it() {
    let (s, _worker, db) = lost_callbacks(300).await;
    let (paid, payment, _) = s
        .order_with_payment("dead-user", "d-1", ("sku-dead", "bar-d"), "alipay")
        .await;
    make_dead(&db, &format!("payment.check:{payment}")).await;
    s.pay(&payment).await;
    eventually(
        "the swept check to apply it",
        Duration::from_secs(20),
        || async { (order_state(&db, &paid).await == "PAID").then_some(()) },
    )
    .await;
    let report = assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(10)).await;
    assert_eq!((report.paid, report.kept), (1, 1));
}

/// An order that can no longer take money (cancelled, expired) has its payment closed at the
/// provider even though its check had died, or had ended archived after provider failures:
/// the cancel and the expiry bring the check forward (and revive it) in their own
/// transaction, without waiting for a sweep (none comes round in the test's time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_that_cannot_take_money_closes_its_payment_whatever_its_check_became() {
    let (s, _worker, db) = lost_callbacks(600_000).await;
    let (_scheduler, _) = s.scheduler(&[]).await;
    put_sku_ttl(&s, "sku-brief", "bar-d", 10, 4).await;
    let user = "dead-user";
    let (cancelled, cancelled_payment, _) = s
        .order_with_payment(user, "d-2", ("sku-dead", "bar-d"), "douyin")
        .await;
    let (lapsing, lapsing_payment, _) = s
        .order_with_payment(user, "d-3", ("sku-brief", "bar-d"), "wechat")
        .await;
    let (archived, archived_payment, _) = s
        .order_with_payment(user, "d-4", ("sku-dead", "bar-d"), "douyin")
        .await;
    for p in [&cancelled_payment, &lapsing_payment] {
        make_dead(&db, &format!("payment.check:{p}")).await;
    }
    // the provider's query of this one fails until its check is archived (and ends)
    s.break_query(&archived_payment, true).await;
    eventually("the check archived", Duration::from_secs(20), || async {
        let (state, _) = check_job(&db, &archived_payment).await;
        (state == "completed").then_some(())
    })
    .await;
    s.break_query(&archived_payment, false).await;
    // cancelled with a dead check, or an archived one: closed at the provider, so the buyer
    // cannot pay it
    s.cancel(user, &cancelled).await;
    s.cancel(user, &archived).await;
    // expired (a 4 s pre-lock) with a dead check: the same
    eventually(
        "the brief order to expire",
        Duration::from_secs(20),
        || async { (order_state(&db, &lapsing).await == "EXPIRED").then_some(()) },
    )
    .await;
    for payment in [&cancelled_payment, &lapsing_payment, &archived_payment] {
        eventually(
            "the payment closed at the provider",
            Duration::from_secs(20),
            || async {
                let sim = s.sim_payment(payment).await;
                let ours: String = scalar(
                    &db,
                    "SELECT status FROM payments WHERE id = $1::uuid",
                    payment,
                )
                .await;
                (sim["status"] == "CLOSED" && ours == "CLOSED").then_some(())
            },
        )
        .await;
    }
    let resolution: String = scalar(
        &db,
        "SELECT resolution FROM compensation_failure WHERE payment_id = $1::uuid",
        &archived_payment,
    )
    .await;
    assert_eq!(resolution, "closed_at_provider");
    let report = assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(10)).await;
    assert_eq!(report.paid, 0, "nobody could pay a closed payment");
}

/// Money owed is paid back however long the provider fails: far past the old budget of ten
/// attempts, the refund is still tried (capped backoff), archived and alerted once it has
/// failed `COMPENSATION_MAX_ATTEMPTS` times in a row, and refunded (the failure resolved) once
/// the provider takes it. A refund whose job died is swept and paid too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_owed_is_refunded_however_long_the_provider_fails() {
    let s = Services::start(&[], &[("PAYMENT_FIRST_CHECK_MS", "60000".to_owned())]).await;
    let hook = Receiver::start().await;
    let (_worker, worker) = s
        .compensation_worker(&[
            ("COMPENSATION_MAX_ATTEMPTS", "3".to_owned()),
            ("COMPENSATION_BACKOFF_BASE_MS", "50".to_owned()),
            ("COMPENSATION_BACKOFF_CAP_MS", "200".to_owned()),
            // the engine's own retries as fast (the old code spent these on provider errors)
            ("JOB_BACKOFF_BASE_MS", "50".to_owned()),
            ("JOB_BACKOFF_CAP_MS", "200".to_owned()),
            ("COMPENSATION_SWEEP_MS", "300".to_owned()),
            ("COMPENSATION_SWEEP_GRACE_MS", "200".to_owned()),
            ("ALERT_WEBHOOK_URL", hook.url.clone()),
            ("ALERT_MIN_INTERVAL_MS", "100".to_owned()),
        ])
        .await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-owed", "bar-o", 2_500, 10).await;
    // callbacks lost: each buyer pays, then cancels before the money is seen, and the check the
    // cancel brings forward finds it (a cancel first would close the payment at the provider)
    s.set_faults(json!({ "refund_error_rate": 1.0, "drop_rate": 1.0 }))
        .await;
    let user = "owed-user";
    let mut owed = Vec::new();
    for key in ["o-1", "o-2", "o-3"] {
        let (order, payment, _) = s
            .order_with_payment(user, key, ("sku-owed", "bar-o"), "wechat")
            .await;
        s.pay(&payment).await;
        s.cancel(user, &order).await;
        owed.push((order, payment));
    }
    // the third one the provider will refuse (4xx) once it answers again
    let refused = owed.pop().unwrap();
    eventually("the payments owed", Duration::from_secs(20), || async {
        let n: i64 = scalar(
            &db,
            "SELECT count(*) FROM payments WHERE status = 'REFUND_REQUIRED' AND $1 = $1",
            "",
        )
        .await;
        (n == 3).then_some(())
    })
    .await;
    // the second refund's job dies: only the sweep can bring it back
    make_dead(&db, &format!("payment.refund:{}", owed[1].1)).await;
    // fifteen failures in a row, more than the old ten attempts
    let failures = "SELECT failures FROM payment_check_state WHERE payment_id = $1::uuid";
    eventually(
        "fifteen refund failures",
        Duration::from_secs(60),
        || async {
            let n: Option<i32> = sqlx::query_scalar(failures)
                .bind(&owed[0].1)
                .fetch_optional(&db)
                .await
                .unwrap();
            n.is_some_and(|n| n >= 15).then_some(())
        },
    )
    .await;
    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM delayed_job_all WHERE dedupe_key = $1")
            .bind(format!("payment.refund:{}", owed[0].1))
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(matches!(state.as_str(), "scheduled" | "running"), "{state}");
    // a provider error is a snooze: fifteen of them spent no attempt of the job's (the one a
    // claim counts while it runs at most), so the job never runs out of them
    assert!(
        attempts <= 1,
        "{attempts} attempts spent on provider errors"
    );
    // an operator was told, once per payment, and can replay it from the console
    let open = eventually("the refunds archived", Duration::from_secs(30), || async {
        let list = s.open_failures(&worker).await;
        (list.len() == 3).then_some(list)
    })
    .await;
    assert!(
        open.iter().all(|f| f["reason"] == "refund_failed"),
        "{open:?}"
    );
    eventually("the alert", Duration::from_secs(10), || async {
        let n: u64 = hook
            .received()
            .iter()
            .filter_map(|a| a["failures"].as_u64())
            .sum();
        (n == 3).then_some(())
    })
    .await;
    let events: i64 = scalar(
        &db,
        "SELECT count(*) FROM outbox WHERE event_type = 'CompensationFailed' AND $1 = $1",
        "",
    )
    .await;
    assert_eq!(events, 3);

    // a job asking for less than was paid (written by hand, or tampered with) still pays all
    // of it back: the amount is the payment's, never the payload's
    let tampered = format!("payment.refund:{}", owed[0].1);
    eventually(
        "the refund tampered with",
        Duration::from_secs(20),
        || async {
            let done = sqlx::query(
                "UPDATE delayed_job SET payload = jsonb_set(payload, '{amount_cents}', '1')
                 WHERE dedupe_key = $1 AND state = 'scheduled'",
            )
            .bind(&tampered)
            .execute(&db)
            .await
            .unwrap();
            (done.rows_affected() == 1).then_some(())
        },
    )
    .await;
    // the third the provider will refuse (a 4xx: it will not give this money back)
    let key = format!("payment.refund:{}", refused.1);
    s.payment_faults(&refused.1, json!({ "refund_refused": true }))
        .await;
    // the provider takes refunds again: the two are paid, once, and their failures resolve
    s.set_faults(json!({})).await;
    for (order, payment) in &owed {
        eventually("the refund paid", Duration::from_secs(30), || async {
            (order_state(&db, order).await == "REFUNDED").then_some(())
        })
        .await;
        let sim = s.sim_payment(payment).await;
        assert_eq!(sim["refunds"].as_array().unwrap().len(), 1, "{sim}");
        assert_eq!(sim["refunds"][0]["amount_cents"], 2_500, "{sim}");
    }
    // the refused one stops, and its failure now says so: alerted and announced again
    let open = eventually(
        "the refused refund restated",
        Duration::from_secs(30),
        || async {
            let list = s.open_failures(&worker).await;
            (list.len() == 1 && list[0]["reason"] == "refund_rejected").then_some(list)
        },
    )
    .await;
    assert_eq!(open[0]["payment_id"], refused.1.as_str());
    // (the handler records the failure, then its run settles: the job ends right after)
    eventually(
        "a refused refund stops",
        Duration::from_secs(10),
        || async { (check_job_of(&db, &key).await.0 == "completed").then_some(()) },
    )
    .await;
    let announced: i64 = scalar(
        &db,
        "SELECT count(*) FROM outbox WHERE event_type = 'CompensationFailed'
           AND payload->>'payment_id' = $1 AND payload->>'reason' = 'refund_rejected'",
        &refused.1,
    )
    .await;
    assert_eq!(
        announced, 1,
        "the dead-compensation topic learns the refund stopped"
    );
    eventually(
        "the alert of the refusal",
        Duration::from_secs(10),
        || async {
            let n: u64 = hook
                .received()
                .iter()
                .filter_map(|a| a["failures"].as_u64())
                .sum();
            (n == 4).then_some(())
        },
    )
    .await;
    let resolved: Vec<String> =
        sqlx::query_scalar("SELECT resolution FROM compensation_failure WHERE status = 'resolved'")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(resolved, ["refunded", "refunded"]);
    let report = assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(10)).await;
    assert_eq!((report.paid, report.refunded, report.told), (3, 2, 1));
}

/// Counts `order.notify` deliveries per order.
fn notified(hook: &Receiver) -> std::collections::HashMap<String, usize> {
    let mut per_order = std::collections::HashMap::new();
    for n in hook.received() {
        if let Some(id) = n["order_id"].as_str() {
            *per_order.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    per_order
}

/// Instances' clocks a minute off under libfaketime: order-api and the scheduler `offset`
/// (`+60s` or `-60s`), the compensation worker, which shares the job table, the other way
/// (two minutes from the scheduler). Nothing changes: an order is not expired before its
/// `expires_at` (nor long after), a buyer paying inside the window is paid, the follow-ups
/// run two seconds after the payment (the order is confirmed), and the worker rescues none of
/// the scheduler's live leases (every paid order notified once).
async fn a_clock_a_minute_off_changes_nothing(offset: &str, worker_offset: &str) {
    let skew = skewed_clock(offset);
    let s = Services::start(&[], &skew).await;
    let hook = Receiver::start().await;
    let mut scheduler_env = skew.clone();
    scheduler_env.extend([
        ("NOTIFY_WEBHOOK_URL", hook.url.clone()),
        ("NOTIFY_WEBHOOK_SECRET", "test-notify-secret".to_owned()),
    ]);
    let (_scheduler, _) = s.scheduler(&scheduler_env).await;
    let (_worker, _) = s.compensation_worker(&skewed_clock(worker_offset)).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    put_sku_ttl(&s, "sku-skew", "bar-s", 100, 6).await;
    let user = "skew-user";

    // paid inside its window: paid, confirmed, notified once
    let mut paid = Vec::new();
    for n in 0..20 {
        let (order, payment, _) = s
            .order_with_payment(user, &format!("s-{n}"), ("sku-skew", "bar-s"), "wechat")
            .await;
        paid.push((order, payment));
    }
    // left unpaid: expires at its expires_at, not before and not a minute after
    let (unpaid, _, _) = s
        .order_with_payment(user, "s-unpaid", ("sku-skew", "bar-s"), "alipay")
        .await;
    let expires_at: chrono::DateTime<chrono::Utc> = scalar(
        &db,
        "SELECT expires_at FROM orders WHERE id = $1::uuid",
        &unpaid,
    )
    .await;
    for (_, payment) in &paid {
        s.pay(payment).await;
    }
    for (order, _) in &paid {
        eventually(
            "the paid order confirmed",
            Duration::from_secs(30),
            || async { (order_state(&db, order).await == "CONFIRMED").then_some(()) },
        )
        .await;
    }
    eventually(
        "the unpaid order expired",
        Duration::from_secs(30),
        || async { (order_state(&db, &unpaid).await == "EXPIRED").then_some(()) },
    )
    .await;
    let expired_at: chrono::DateTime<chrono::Utc> = scalar(
        &db,
        "SELECT updated_at FROM orders WHERE id = $1::uuid",
        &unpaid,
    )
    .await;
    assert!(
        expired_at >= expires_at,
        "expired at {expired_at}, before its expires_at {expires_at}"
    );
    assert!(
        expired_at - expires_at < chrono::Duration::seconds(10),
        "expired at {expired_at}, long after its expires_at {expires_at}"
    );
    // follow-ups ran two seconds after each payment, not a minute off
    let late: i64 = scalar(
        &db,
        "SELECT count(*) FROM delayed_job_all j JOIN payments p ON p.order_id = (j.payload->>'order_id')::uuid
         WHERE j.kind = 'stock.deduct' AND p.status = 'SUCCEEDED'
           AND (j.run_at - p.updated_at > interval '10 seconds'
                OR j.run_at - p.updated_at < interval '1 second') AND $1 = $1",
        "",
    )
    .await;
    assert_eq!(late, 0, "follow-ups due two seconds after the payment");
    // and none ran before it was due (by the database's clock, which wrote both times)
    let early: i64 = scalar(
        &db,
        "SELECT count(*) FROM delayed_job_archive WHERE finished_at < run_at AND $1 = $1",
        "",
    )
    .await;
    assert_eq!(early, 0, "jobs finished before they were due");
    let per_order = eventually(
        "every paid order notified",
        Duration::from_secs(20),
        || async {
            let n = notified(&hook);
            (n.len() == paid.len()).then_some(n)
        },
    )
    .await;
    // give a second notification time to show up: the leases were claimed ahead and held
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_order = {
        let again = notified(&hook);
        assert_eq!(again.len(), per_order.len());
        again
    };
    let twice: Vec<_> = per_order.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "notified more than once: {twice:?}");
    let rescued: i64 = scalar(
        &db,
        "SELECT count(*) FROM delayed_job_all WHERE last_error = 'lease expired' AND $1 = $1",
        "",
    )
    .await;
    assert_eq!(rescued, 0, "no live lease was rescued");
    let report = assert_money_invariant(&s.http, &s.gateway, &db, Duration::from_secs(10)).await;
    assert_eq!((report.paid, report.kept), (20, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_clocks_a_minute_fast_change_nothing() {
    a_clock_a_minute_off_changes_nothing("+60s", "-60s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_clocks_a_minute_slow_change_nothing() {
    a_clock_a_minute_off_changes_nothing("-60s", "+60s").await;
}

/// Reads the `relay_leader` gauge of a relay.
async fn leads(s: &Services, relay: &str) -> bool {
    let m = s.metrics(relay).await;
    integration_tests::metric_value(&m, "relay_leader", &[]) == Some(1.0)
}

/// Two relays; the leader is paused (`SIGSTOP`) past its lease: the standby takes over within
/// seconds and publishes what was written meanwhile. The old leader, woken (`SIGCONT`), does
/// not lead any more and its position writes are fenced: the position keeps moving under the
/// new leader's epoch and every event is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_relay_leader_is_replaced_within_seconds_and_fenced_when_it_wakes() {
    let s = Services::start(&[], &[]).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let env = vec![
        ("ORDER_EVENTS_TOPIC", format!("bar.order.events.v1.{tag}")),
        (
            "DEAD_COMPENSATION_TOPIC",
            format!("bar.compensation.dead.v1.{tag}"),
        ),
        ("CONSUMER_ENABLED", "false".to_owned()),
        ("RELAY_LEADER_LEASE_MS", "2000".to_owned()),
        ("RELAY_POLL_MS", "50".to_owned()),
    ];
    let (first, first_url) = s.event_relay(&env).await;
    eventually("a leader", Duration::from_secs(20), || async {
        leads(&s, &first_url).await.then_some(())
    })
    .await;
    let (_second, second_url) = s.event_relay(&env).await;
    assert!(!leads(&s, &second_url).await, "one leader at a time");
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-relay", "bar-r", 1_000, 100).await;
    let unpublished = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_unpublished")
            .fetch_one(&db)
            .await
            .unwrap();
        n
    };
    let create = |n: usize| {
        let s = &s;
        async move {
            let key = format!("r-{n}");
            let order = NewOrderRequest {
                user: "relay-user",
                key: &key,
                sku: "sku-relay",
                store: "bar-r",
                quantity: 1,
            };
            let (status, body) = create_order(&s.http, &s.order_api, &order).await.unwrap();
            assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
        }
    };
    // orders `range` created and every event published; then the epoch of the lease that
    // recorded the position
    let publish = |range: std::ops::Range<usize>, what: &'static str| {
        let (create, unpublished, db) = (&create, &unpublished, &db);
        async move {
            for n in range {
                create(n).await;
            }
            eventually(what, Duration::from_secs(20), || async {
                (unpublished().await == 0).then_some(())
            })
            .await;
            let epoch: Option<i64> = sqlx::query_scalar("SELECT leader_epoch FROM outbox_relay")
                .fetch_one(db)
                .await
                .unwrap();
            epoch
        }
    };
    let epoch_before = publish(0..5, "published by the leader").await;

    first.signal("STOP");
    let paused = Instant::now();
    let epoch_after = publish(5..25, "the standby to take over and publish").await;
    let took = paused.elapsed();
    println!("relay: the standby published 20 new orders' events {took:?} after the leader paused");
    assert!(leads(&s, &second_url).await);
    assert!(
        epoch_after > epoch_before,
        "{epoch_after:?} > {epoch_before:?}"
    );

    // the old leader wakes: it does not lead, and it moves nothing
    first.signal("CONT");
    eventually(
        "the woken relay to step down",
        Duration::from_secs(20),
        || async { (!leads(&s, &first_url).await).then_some(()) },
    )
    .await;
    let epoch_now = publish(25..35, "published after the wake-up").await;
    assert_eq!(epoch_now, epoch_after, "the position is the new leader's");
    assert!(leads(&s, &second_url).await);
    assert!(!leads(&s, &first_url).await);
    let lease: (String, i64) =
        sqlx::query_as("SELECT holder, epoch FROM leader_lease WHERE role = 'relay'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(Some(lease.1), epoch_after);
    // and idle, neither relay spins: a few statements a poll, not thousands a second
    let commits = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        n
    };
    let before = commits().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = commits().await - before;
    println!("relay: {idle} commits in 3 s on an idle stack with two relays");
    assert!(idle < 2000, "{idle} commits in 3 s: something spins");
}

/// Two schedulers; the job leader is paused past its lease: the other becomes the leader
/// within seconds (schedules, aging and archiving go on), and the woken one steps down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_leader_is_replaced_within_seconds() {
    let s = Services::start(&[], &[]).await;
    let env = [
        ("JOB_LEADER_LEASE_MS", "2000".to_owned()),
        ("JOB_MAINTENANCE_MS", "500".to_owned()),
    ];
    let (first, first_url) = s.scheduler(&env).await;
    let changes = |url: String| {
        let s = &s;
        async move {
            let m = s.metrics(&url).await;
            integration_tests::metric_value(&m, "job_leader_changes_total", &[]).unwrap_or(0.0)
        }
    };
    eventually("a leader", Duration::from_secs(20), || async {
        (changes(first_url.clone()).await == 1.0).then_some(())
    })
    .await;
    let (_second, second_url) = s.scheduler(&env).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        changes(second_url.clone()).await,
        0.0,
        "one leader at a time"
    );
    first.signal("STOP");
    let paused = Instant::now();
    eventually(
        "the other scheduler to lead",
        Duration::from_secs(20),
        || async { (changes(second_url.clone()).await == 1.0).then_some(()) },
    )
    .await;
    println!(
        "job engine: a new leader {:?} after the leader paused",
        paused.elapsed()
    );
    first.signal("CONT");
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    // the schedules the scheduler ships are still written ahead, under the new epoch
    let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM leader_lease WHERE role = 'job'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(epoch >= 2, "{epoch}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let epoch_later: i64 = sqlx::query_scalar("SELECT epoch FROM leader_lease WHERE role = 'job'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(epoch_later, epoch, "the woken leader did not take it back");
}

/// The units of pre-locks whose order never committed, as prelock-service sees them:
/// `stock_real - available - held by the ledger`.
async fn orphaned(s: &Services, sku: &str) -> i64 {
    let (real, available, reserved) = integration_tests::sku_units(&s.http, &s.prelock, sku).await;
    real - available - reserved
}

/// order-api is killed with 40 buyers between their pre-lock and their order's commit (the
/// order inserts wait on a lock the test holds): within seconds of the confirmation window
/// every unit no committed order holds is available again, not at the end of the 15-minute
/// pre-lock. And a commit that lands late (the lock held past the window, order-api alive)
/// keeps its units.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_order_apis_pre_locks_come_back_within_seconds_and_late_commits_keep_theirs() {
    // a window longer than prelock-service takes to restart (part 3)
    let common = [
        ("PRELOCK_CONFIRM_AFTER_MS", "4000".to_owned()),
        ("PRELOCK_CONFIRM_POLL_MS", "100".to_owned()),
    ];
    // order-api waits on the test's lock as long as it is held
    let order_env = [
        ("PG_LOCK_TIMEOUT_MS", "60000".to_owned()),
        ("PG_STATEMENT_TIMEOUT_MS", "60000".to_owned()),
        ("PG_MAX_CONNECTIONS", "48".to_owned()),
        ("PRELOCK_TIMEOUT_MS", "5000".to_owned()),
    ];
    let mut s = Services::start(&common, &order_env).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-crash", "bar-k", 1_000, 100).await;
    let buyers = 40;
    let burst = |round: &'static str, s: &Services| {
        let (http, base) = (s.http.clone(), s.order_api.clone());
        (0..buyers)
            .map(|n| {
                let (http, base) = (http.clone(), base.clone());
                tokio::spawn(async move {
                    let user = format!("crash-{round}-{n}");
                    let order = NewOrderRequest {
                        user: &user,
                        key: "k",
                        sku: "sku-crash",
                        store: "bar-k",
                        quantity: 1,
                    };
                    create_order(&http, &base, &order).await
                })
            })
            .collect::<Vec<_>>()
    };
    let hold_inserts = || async {
        let mut lock = db.begin().await.unwrap();
        sqlx::query("LOCK TABLE orders IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *lock)
            .await
            .unwrap();
        lock
    };
    // units Redis holds for reservations
    let reserved_in_redis = |s: &Services| {
        let (http, prelock) = (s.http.clone(), s.prelock.clone());
        async move {
            let (real, available, _) =
                integration_tests::sku_units(&http, &prelock, "sku-crash").await;
            real - available
        }
    };

    // 1. a commit that lands late keeps its units
    let lock = hold_inserts().await;
    let first = burst("late", &s);
    eventually(
        "every buyer pre-locked",
        Duration::from_secs(20),
        || async { (reserved_in_redis(&s).await == buyers).then_some(()) },
    )
    .await;
    // well past the 4 s window: their transactions are still running
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(reserved_in_redis(&s).await, buyers, "undecided: kept");
    lock.commit().await.unwrap();
    for t in first {
        let (status, body) = t.await.unwrap().expect("order-api answers");
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    }
    // once the confirmer has settled them all (confirmed: an order holds each)
    eventually(
        "the late commits confirmed",
        Duration::from_secs(20),
        || async {
            let m = s.metrics(&s.prelock).await;
            let n = integration_tests::metric_value(
                &m,
                "prelock_confirmations_total",
                &[("outcome", "confirmed")],
            );
            (n >= Some(buyers as f64)).then_some(())
        },
    )
    .await;
    assert_eq!(orphaned(&s, "sku-crash").await, 0);
    assert_eq!(
        reserved_in_redis(&s).await,
        buyers,
        "every late commit kept its unit"
    );

    // 2. order-api dies with every buyer between pre-lock and commit
    let lock = hold_inserts().await;
    let second = burst("crash", &s);
    eventually(
        "every buyer pre-locked",
        Duration::from_secs(20),
        || async { (reserved_in_redis(&s).await == 2 * buyers).then_some(()) },
    )
    .await;
    s.order_proc.crash();
    let crashed = Instant::now();
    assert_eq!(orphaned(&s, "sku-crash").await, buyers, "held for nobody");
    for t in second {
        let _ = t.await; // the connection died with the process
    }
    lock.commit().await.unwrap();
    s.restart_order_api().await;
    eventually(
        "the orphaned units available again",
        Duration::from_secs(15),
        || async { (orphaned(&s, "sku-crash").await == 0).then_some(()) },
    )
    .await;
    println!(
        "confirmer: {buyers} orphaned units back {:?} after the crash (window 4 s)",
        crashed.elapsed()
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(orders, buyers, "the crashed round committed nothing");
    assert_eq!(reserved_in_redis(&s).await, buyers);

    // 3. prelock-service dies too, with the pending confirmations not yet due: the one that
    // comes back finds them (a scan at start) and settles them within the window, not at its
    // next scan of the whole catalogue a minute later
    let lock = hold_inserts().await;
    let third = burst("both", &s);
    eventually(
        "every buyer pre-locked",
        Duration::from_secs(20),
        || async { (reserved_in_redis(&s).await == 2 * buyers).then_some(()) },
    )
    .await;
    s.order_proc.crash();
    s.prelock_proc.crash();
    let crashed = Instant::now();
    for t in third {
        let _ = t.await;
    }
    lock.commit().await.unwrap();
    s.restart_prelock().await;
    s.restart_order_api().await;
    eventually(
        "the orphaned units available again after both restarted",
        Duration::from_secs(15),
        || async { (orphaned(&s, "sku-crash").await == 0).then_some(()) },
    )
    .await;
    println!(
        "confirmer: {buyers} orphaned units back {:?} after order-api and prelock-service crashed",
        crashed.elapsed()
    );
    assert_eq!(reserved_in_redis(&s).await, buyers);
}

/// A reverse proxy to prelock-service whose `GET /v1/clock` answers `behind` earlier than
/// Redis does (a pre-lock store whose host clock lags the database's): returns its URL.
async fn lagging_clock(prelock: &str, behind: Duration) -> String {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, Method, Uri};
    use axum::response::IntoResponse;
    #[derive(Clone)]
    struct Upstream(String, reqwest::Client, Duration);
    async fn clock(State(up): State<Upstream>, headers: HeaderMap) -> impl IntoResponse {
        let mut req = up.1.get(format!("{}/v1/clock", up.0));
        if let Some(auth) = headers.get("authorization") {
            req = req.header("authorization", auth);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        let now = v["now_ms"].as_i64().unwrap() - up.2.as_millis() as i64;
        axum::Json(json!({ "now_ms": now }))
    }
    async fn forward(
        State(up): State<Upstream>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> impl IntoResponse {
        let mut req = up.1.request(method, format!("{}{}", up.0, uri));
        for (name, value) in &headers {
            if name != "host" && name != "content-length" {
                req = req.header(name, value);
            }
        }
        let r = req.body(body).send().await.unwrap();
        let status = r.status();
        let body = r.bytes().await.unwrap();
        (status, [("content-type", "application/json")], body)
    }
    let up = Upstream(prelock.to_owned(), reqwest::Client::new(), behind);
    let app = axum::Router::new()
        .route("/v1/clock", axum::routing::get(clock))
        .fallback(forward)
        .with_state(up);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The pre-lock store's clock six seconds behind the database's: an order expires by the clock
/// that set its `expires_at` (six seconds late by the database's), and its expiry job waits
/// that out in one or two snoozes, not a run every few milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_waits_for_a_lagging_pre_lock_clock_without_spinning() {
    let s = Services::start(&[], &[]).await;
    let lagging = lagging_clock(&s.prelock, Duration::from_secs(6)).await;
    let (_scheduler, scheduler) = s.scheduler(&[("PRELOCK_URL", lagging)]).await;
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    put_sku_ttl(&s, "sku-lag", "bar-g", 10, 2).await;
    let order = NewOrderRequest {
        user: "lag-user",
        key: "g-1",
        sku: "sku-lag",
        store: "bar-g",
        quantity: 1,
    };
    let (status, body) = create_order(&s.http, &s.order_api, &order).await.unwrap();
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    let id = body["order_id"].as_str().unwrap().to_owned();
    eventually("the order expired", Duration::from_secs(30), || async {
        (order_state(&db, &id).await == "EXPIRED").then_some(())
    })
    .await;
    let (expires_at, expired_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT expires_at, updated_at FROM orders WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&db)
            .await
            .unwrap();
    let late = expired_at - expires_at;
    assert!(
        late >= chrono::Duration::seconds(5),
        "expired {late} after its expires_at: not by the pre-lock store's clock"
    );
    let m = s.metrics(&scheduler).await;
    let snoozes = integration_tests::metric_value(
        &m,
        "jobs_total",
        &[("kind", "order.expire"), ("outcome", "snoozed")],
    )
    .unwrap_or(0.0);
    assert!(
        snoozes <= 5.0,
        "the expiry job ran {snoozes} times to wait six seconds"
    );
}
