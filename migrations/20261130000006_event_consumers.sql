-- Kafka consumers' side (the event-relay binary's projection).

-- Events a consumer has applied, once each: a redelivered event (Kafka delivers at least
-- once) finds its row and has no second effect. Written in the transaction of the effect.
CREATE TABLE consumer_inbox (
    consumer    text NOT NULL,
    event_id    uuid NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- The bar dashboard: per store, how many orders reached each step, and the money kept. Fed
-- only from bar.order.events.v1 (a projection: it can be dropped and rebuilt from the topic).
CREATE TABLE bar_dashboard (
    store_id       text PRIMARY KEY,
    created        bigint NOT NULL DEFAULT 0,
    paid           bigint NOT NULL DEFAULT 0,
    confirmed      bigint NOT NULL DEFAULT 0,
    redeemed       bigint NOT NULL DEFAULT 0,
    cancelled      bigint NOT NULL DEFAULT 0,
    expired        bigint NOT NULL DEFAULT 0,
    refunded       bigint NOT NULL DEFAULT 0,
    paid_cents     bigint NOT NULL DEFAULT 0,
    last_event_at  timestamptz
);
