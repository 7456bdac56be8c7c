//! The simulator's refund and refund-query APIs (what the compensation worker's refunds will
//! call): a refund id is paid once, however often it is asked for, even when the answer to the
//! first request was lost to a timeout; refunds never exceed what was paid; faults apply.

use std::time::Duration;

use domain::Provider;
use gateway_protocol::{GatewayClient, GatewayError, RefundRequest};
use integration_tests::Stack;
use reqwest::StatusCode;
use serde_json::json;

/// A paid payment of `user`'s 2-unit order: (payment_id, amount_cents).
async fn paid_payment(s: &Stack, user: &str) -> (String, i64) {
    let (status, order) = s.create_order(user, "k", "sku-refund", "bar-1", 2).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let id = order["order_id"].as_str().unwrap();
    let (payment_id, _) = s.start_payment(user, id, "wechat").await;
    s.pay(&payment_id).await;
    (payment_id, order["amount_cents"].as_i64().unwrap())
}

fn request(refund_id: &str, payment_id: &str, amount_cents: i64) -> RefundRequest {
    RefundRequest {
        refund_id: refund_id.into(),
        payment_id: payment_id.into(),
        amount_cents,
    }
}

async fn refunds_paid(s: &Stack, payment_id: &str) -> usize {
    let sim = s
        .get_json(&format!("{}/v1/sim/payments/{payment_id}", s.gateway))
        .await;
    sim["refunds"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_id_is_paid_once_even_when_its_first_answer_is_lost() {
    let s = Stack::start().await;
    s.put_sku("sku-refund", "bar-1", 1_000, 10).await;
    let gw = GatewayClient::new(&s.gateway, Duration::from_millis(500)).unwrap();
    let wechat = Provider::Wechat;

    // paid once, asked twice: one refund, the same answer
    let (payment, amount) = paid_payment(&s, "alice").await;
    let first = gw
        .refund(wechat, &request("rf-1", &payment, amount))
        .await
        .unwrap();
    assert_eq!(
        (first.status.as_str(), first.amount_cents),
        ("SUCCESS", amount)
    );
    let again = gw
        .refund(wechat, &request("rf-1", &payment, amount))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(refunds_paid(&s, &payment).await, 1);
    assert_eq!(gw.query_refund(wechat, "rf-1").await.unwrap(), first);
    // a second refund id cannot take back more than was paid
    let over = gw.refund(wechat, &request("rf-2", &payment, 1)).await;
    assert!(
        matches!(over, Err(GatewayError::Rejected(ref m)) if m.contains("409")),
        "{over:?}"
    );
    assert!(matches!(
        gw.query_refund(wechat, "rf-2").await,
        Err(GatewayError::Rejected(_))
    ));
    // nor can an amount so large that the sum would wrap around (release builds wrap)
    let (payment_w, amount_w) = paid_payment(&s, "wrap").await;
    let part = gw
        .refund(wechat, &request("rf-w1", &payment_w, amount_w - 1))
        .await
        .unwrap();
    assert_eq!(part.amount_cents, amount_w - 1);
    let wrap = gw
        .refund(wechat, &request("rf-w2", &payment_w, i64::MAX))
        .await;
    assert!(
        matches!(wrap, Err(GatewayError::Rejected(ref m)) if m.contains("409")),
        "{wrap:?}"
    );
    assert_eq!(refunds_paid(&s, &payment_w).await, 1);

    // the refund is made but its answer comes after the caller gave up: the retry with the
    // same id is answered with the refund already made, and nothing is paid twice
    let (payment, amount) = paid_payment(&s, "bob").await;
    s.set_faults(json!({ "refund_timeout_rate": 1.0, "query_timeout_ms": 1500 }))
        .await;
    let lost = gw.refund(wechat, &request("rf-3", &payment, amount)).await;
    assert!(matches!(lost, Err(GatewayError::Timeout(_))), "{lost:?}");
    assert_eq!(
        refunds_paid(&s, &payment).await,
        1,
        "paid although the answer was lost"
    );
    s.set_faults(json!({})).await;
    let retried = gw
        .refund(wechat, &request("rf-3", &payment, amount))
        .await
        .unwrap();
    assert_eq!(retried.refund_id, "rf-3");
    assert_eq!(refunds_paid(&s, &payment).await, 1);

    // a provider error refunds nothing; an unpaid payment cannot be refunded
    let (payment, amount) = paid_payment(&s, "carol").await;
    s.set_faults(json!({ "refund_error_rate": 1.0 })).await;
    let failed = gw.refund(wechat, &request("rf-4", &payment, amount)).await;
    assert!(
        matches!(failed, Err(GatewayError::Unavailable(_))),
        "{failed:?}"
    );
    assert_eq!(refunds_paid(&s, &payment).await, 0);
    s.set_faults(json!({})).await;
    let (status, order) = s.create_order("dave", "k", "sku-refund", "bar-1", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    let (unpaid, _) = s
        .start_payment("dave", order["order_id"].as_str().unwrap(), "wechat")
        .await;
    let refused = gw.refund(wechat, &request("rf-5", &unpaid, 1)).await;
    assert!(
        matches!(refused, Err(GatewayError::Rejected(ref m)) if m.contains("not paid")),
        "{refused:?}"
    );

    // bad rates are refused
    let r = reqwest::Client::new()
        .put(format!("{}/v1/sim/faults", s.gateway))
        .json(&json!({ "refund_error_rate": 2.0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}
