-- Compensation's own records (the compensation-worker binary).

-- A payment the provider closed unpaid (the buyer gave up, or it failed there). Its order may
-- start another payment (only CREATED ones count as open); money that arrives for it anyway
-- is still applied.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('CREATED', 'SUCCEEDED', 'REFUND_REQUIRED', 'REFUNDED', 'CLOSED'));

-- Where each payment's checks stand. The check job's own attempt count also counts "not paid
-- yet", so the retry budget for provider failures (5 in a row by default) is kept here, with
-- the recent outcomes an operator needs when a failure is archived.
CREATE TABLE payment_check_state (
    payment_id    uuid PRIMARY KEY REFERENCES payments (id),
    checks        int NOT NULL DEFAULT 0,
    -- provider failures in a row (timeouts, 5xx, refusals); any other outcome resets it
    failures      int NOT NULL DEFAULT 0,
    last_outcome  text NOT NULL,
    last_error    text,
    -- the last 20 outcomes, newest last: [{"at", "outcome", "error"}]
    history       jsonb NOT NULL DEFAULT '[]',
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- A payment compensation gave up on: archived with its whole context, alerted, and listed for
-- manual replay. At most one open failure per payment.
CREATE TABLE compensation_failure (
    id           bigserial PRIMARY KEY,
    payment_id   uuid NOT NULL REFERENCES payments (id),
    order_id     uuid NOT NULL REFERENCES orders (id),
    provider     text NOT NULL,
    -- what ended it: gateway_timeout, gateway_error, unknown_at_provider, rejected, ...
    reason       text NOT NULL,
    last_error   text NOT NULL,
    attempts     int NOT NULL,
    -- the payment, the order and the check history at the time it was archived
    context      jsonb NOT NULL,
    -- what a replay sends to the provider; operators may edit it (e.g. the provider's
    -- transaction id, when the query by our payment id cannot find it)
    params       jsonb NOT NULL DEFAULT '{}',
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    -- how it was resolved: replay (an operator), callback (the money arrived anyway), ...
    resolution   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz
);
CREATE UNIQUE INDEX compensation_failure_one_open ON compensation_failure (payment_id)
    WHERE status = 'open';
CREATE INDEX compensation_failure_by_time ON compensation_failure (created_at);

-- Every operator action on a failure, kept for good.
CREATE TABLE compensation_audit (
    id          bigserial PRIMARY KEY,
    failure_id  bigint NOT NULL REFERENCES compensation_failure (id),
    operator    text NOT NULL CHECK (length(operator) BETWEEN 1 AND 100),
    action      text NOT NULL CHECK (action IN ('edit', 'replay')),
    -- edit: the parameters before and after; replay: the parameters used
    detail      jsonb NOT NULL,
    outcome     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX compensation_audit_by_failure ON compensation_audit (failure_id, id);
