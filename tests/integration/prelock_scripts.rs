//! The Redis Lua scripts implement the domain's reference ledger (`SkuLedger`): random
//! histories of reserve, pin, release and withdraw (by several create attempts) give the same
//! answers in both (purchase limits included), and lapsed reservations are reclaimed lazily.

use std::time::Duration;

use domain::stock::{Attempt, Claim, PinOutcome, ReserveOutcome, SkuLedger, WithdrawOutcome};
use domain::{OrderId, SkuId};
use integration_tests::{eventually, redis_url, unique_prefix};
use redis_prelock::{Purchases, RedisPrelock};

async fn prelock() -> RedisPrelock {
    RedisPrelock::connect(
        &redis_url(0),
        &unique_prefix(),
        Duration::from_secs(2),
        Duration::from_secs(3),
    )
    .await
    .unwrap()
}

/// A create attempt with no transaction behind it (these tests drive the scripts alone).
fn attempt_of(id: uuid::Uuid) -> Attempt {
    Attempt { id, txid: None }
}

#[tokio::test]
async fn scripts_agree_with_the_reference_ledger() {
    let redis = prelock().await;
    let sku = SkuId::parse("sku-model").unwrap();
    let ids: Vec<OrderId> = (0..8).map(|_| OrderId(uuid::Uuid::new_v4())).collect();
    let attempts: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    let buyers = ["b1", "b2", "b3"];
    let mut rng = fastrand_seeded(7);
    for round in 0..20 {
        let stock = (round % 7) as i64 * 2;
        // every other round under a purchase limit of 1 to 4 units per buyer
        let limit = if round % 2 == 0 {
            0
        } else {
            (round % 4 + 1) as u32
        };
        let mut model: SkuLedger<usize> = SkuLedger::new(stock);
        model.set_limit(limit);
        let purchases = Purchases {
            limit: Some(limit),
            ..Purchases::default()
        };
        redis
            .replace_sku(&sku, stock, None, &[], &purchases)
            .await
            .unwrap();
        for _ in 0..80 {
            let i = (rng() % ids.len() as u64) as usize;
            let a = attempts[(rng() % attempts.len() as u64) as usize];
            // each reservation id belongs to one buyer, as an order id does
            let buyer = buyers[i % buyers.len()];
            match rng() % 6 {
                0 => {
                    let q = (rng() % 3 + 1) as u32;
                    let want = model.reserve_for(i, q, 0, 3_600_000, Claim::Attempt(a), buyer);
                    let got = redis
                        .reserve(
                            &sku,
                            ids[i],
                            q,
                            Duration::from_secs(3600),
                            attempt_of(a),
                            buyer,
                        )
                        .await;
                    match (want, got) {
                        (
                            ReserveOutcome::Reserved { available: a, .. },
                            Ok(ReserveOutcome::Reserved { available: b, .. }),
                        ) => assert_eq!(a, b),
                        (
                            ReserveOutcome::Shortage { available: a },
                            Ok(ReserveOutcome::Shortage { available: b }),
                        ) => assert_eq!(a, b),
                        (w @ ReserveOutcome::OverLimit { .. }, Ok(g)) => assert_eq!(w, g),
                        (
                            ReserveOutcome::Existing { quantity, .. },
                            Ok(ReserveOutcome::Existing { .. }),
                        ) => assert_eq!(quantity, q),
                        (
                            ReserveOutcome::Existing { quantity, .. },
                            Err(domain::ports::PrelockError::Mismatch),
                        ) => assert_ne!(quantity, q),
                        (w, g) => panic!("model {w:?} but redis {g:?}"),
                    }
                }
                1 => {
                    let q = (rng() % 3 + 1) as u32;
                    let want = model.pin_for(i, q, 0, buyer);
                    let got = redis.pin(&sku, ids[i], q, buyer).await.unwrap();
                    assert_eq!(got, want);
                }
                2 => {
                    let want = model.withdraw(&i, Claim::Attempt(a));
                    let got = redis.withdraw(&sku, ids[i], a).await.unwrap();
                    assert_eq!(got, want);
                }
                3 => {
                    let want = model.lapse(&i);
                    assert_eq!(redis.lapse(&sku, ids[i]).await.unwrap(), want);
                }
                4 => {
                    let want = model.deduct(&i);
                    assert_eq!(redis.deduct(&sku, ids[i]).await.unwrap(), want);
                }
                _ => {
                    let want = model.release(&i);
                    assert_eq!(redis.release(&sku, ids[i]).await.unwrap(), want);
                }
            }
            assert_eq!(
                redis.available(&sku).await.unwrap(),
                Some(model.available())
            );
            assert!(model.available() >= 0);
            let mut bought: Vec<(String, u32)> = buyers
                .iter()
                .map(|b| (b.to_string(), model.bought(b)))
                .filter(|(_, n)| *n > 0)
                .collect();
            bought.sort();
            assert_eq!(redis.bought(&sku).await.unwrap(), bought);
        }
        let held: i64 = redis
            .held(&sku)
            .await
            .unwrap()
            .iter()
            .map(|(_, q, _)| i64::from(*q))
            .sum();
        assert_eq!(held, model.held_units());
    }
}

#[tokio::test]
async fn lapsed_reservations_are_reclaimed_by_the_next_reserve_not_by_a_timer() {
    let redis = prelock().await;
    let sku = SkuId::parse("sku-lapse").unwrap();
    redis
        .replace_sku(
            &sku,
            2,
            Some(Duration::from_millis(50)),
            &[],
            &Purchases::default(),
        )
        .await
        .unwrap();
    let a = OrderId(uuid::Uuid::new_v4());
    let b = OrderId(uuid::Uuid::new_v4());
    let attempt = uuid::Uuid::new_v4();
    assert!(matches!(
        redis
            .reserve(
                &sku,
                a,
                2,
                Duration::from_secs(900),
                attempt_of(attempt),
                ""
            )
            .await
            .unwrap(),
        ReserveOutcome::Reserved { available: 0, .. }
    ));
    // the SKU's own 50 ms TTL applies, not the 900 s default; nothing runs in between
    eventually(
        "b's reserve to reclaim a's lapsed units",
        Duration::from_secs(5),
        || async {
            matches!(
                redis
                    .reserve(
                        &sku,
                        b,
                        1,
                        Duration::from_secs(900),
                        attempt_of(attempt),
                        ""
                    )
                    .await
                    .unwrap(),
                ReserveOutcome::Reserved { .. }
            )
            .then_some(())
        },
    )
    .await;
    assert_eq!(redis.available(&sku).await.unwrap(), Some(1));
    assert!(
        !redis.holds(&sku, a).await.unwrap(),
        "a's lapsed pre-lock was reclaimed"
    );
    // a late payment for a: its pre-lock is gone, the unit left is taken again and pinned
    assert_eq!(
        redis.pin(&sku, a, 1, "").await.unwrap(),
        PinOutcome::Repinned {
            quantity: 1,
            available: 0
        }
    );
    // b's lapses too: pinning it takes its own returned unit again, and then nothing is left
    eventually("b to lapse", Duration::from_secs(5), || async {
        let lapse = redis
            .held(&sku)
            .await
            .unwrap()
            .iter()
            .filter_map(|h| h.2)
            .max();
        (redis.now_ms().await.unwrap() > lapse.unwrap_or(0)).then_some(())
    })
    .await;
    assert_eq!(
        redis.pin(&sku, b, 1, "").await.unwrap(),
        PinOutcome::Repinned {
            quantity: 1,
            available: 0
        }
    );
    let c = OrderId(uuid::Uuid::new_v4());
    assert_eq!(
        redis.pin(&sku, c, 1, "").await.unwrap(),
        PinOutcome::Shortage { available: 0 }
    );
    // pinned reservations never lapse, and no attempt can withdraw them
    assert_eq!(
        redis.withdraw(&sku, a, attempt).await.unwrap(),
        WithdrawOutcome::StillClaimed
    );
    let mut want = vec![(a.to_string(), 1, None), (b.to_string(), 1, None)];
    want.sort();
    assert_eq!(redis.held(&sku).await.unwrap(), want);
    // and an unloaded SKU says so instead of pretending to be empty
    let unknown = SkuId::parse("sku-never-loaded").unwrap();
    assert_eq!(
        redis
            .reserve(
                &unknown,
                a,
                1,
                Duration::from_secs(1),
                attempt_of(attempt),
                ""
            )
            .await,
        Err(domain::ports::PrelockError::NotLoaded)
    );
}

/// A tiny deterministic generator (xorshift), so failures replay.
fn fastrand_seeded(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.max(1);
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
