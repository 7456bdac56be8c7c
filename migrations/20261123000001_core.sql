-- bar-fulfillment core schema. This directory is the only schema source; every binary that
-- touches Postgres embeds it (sqlx::migrate!) and applies it under sqlx's migration lock.
--
-- Rules the domain crate states in code are enforced here again, so that no bug, script or
-- psql session can break them: legal order states and transitions, non-negative stock,
-- unique idempotency keys, one record per provider event.

-- SKUs: the source of truth for real stock. Redis' pre-lock counter is derived from this and
-- the reservations ledger (available = stock_real - units held by live reservations).
CREATE TABLE skus (
    id                  text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    store_id            text NOT NULL CHECK (store_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    price_cents         bigint NOT NULL CHECK (price_cents BETWEEN 0 AND 1000000000),
    stock_real          bigint NOT NULL CHECK (stock_real >= 0),
    -- Pre-lock lifetime for this SKU; NULL = the service default (15 minutes).
    prelock_ttl_seconds integer CHECK (prelock_ttl_seconds BETWEEN 1 AND 86400),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The allowed order transitions: the same table as domain::order::TRANSITIONS (a test checks
-- they agree). Data, not code, so the trigger below can read it.
CREATE TABLE order_transition (
    from_state text NOT NULL,
    to_state   text NOT NULL,
    PRIMARY KEY (from_state, to_state)
);
INSERT INTO order_transition (from_state, to_state) VALUES
    ('PENDING', 'PAID'), ('PENDING', 'EXPIRED'), ('PENDING', 'CANCELLED'),
    ('PAID', 'CONFIRMED'), ('CONFIRMED', 'REDEEMED'),
    ('PAID', 'REFUND_PENDING'), ('CONFIRMED', 'REFUND_PENDING'),
    ('REFUND_PENDING', 'REFUNDED'),
    ('EXPIRED', 'PAID'), ('EXPIRED', 'REFUND_PENDING'), ('CANCELLED', 'REFUND_PENDING');

CREATE TABLE orders (
    -- Derived from (user_id, idempotency_key) by the domain: retries share one id.
    id                  uuid PRIMARY KEY,
    user_id             text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    sku_id              text NOT NULL REFERENCES skus (id),
    store_id            text NOT NULL,
    quantity            integer NOT NULL CHECK (quantity > 0),
    unit_price_cents    bigint NOT NULL CHECK (unit_price_cents >= 0),
    amount_cents        bigint NOT NULL CHECK (amount_cents = unit_price_cents * quantity),
    state               text NOT NULL CHECK (state IN ('PENDING', 'PAID', 'CONFIRMED', 'REDEEMED',
                            'EXPIRED', 'CANCELLED', 'REFUND_PENDING', 'REFUNDED')),
    version             integer NOT NULL CHECK (version >= 1),
    idempotency_key     text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    -- sha256 of the request body fields; the same key with another body is refused.
    request_fingerprint text NOT NULL,
    -- When the pre-lock lapses (from Redis' clock, so Redis and Postgres agree).
    expires_at          timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX orders_pending_by_expiry ON orders (expires_at) WHERE state = 'PENDING';

-- New orders start PENDING at version 1; every later change of state must be a listed
-- transition and must bump the version by exactly one (the compare-and-set contract).
CREATE FUNCTION orders_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state <> 'PENDING' OR NEW.version <> 1 THEN
            RAISE EXCEPTION 'orders must be created PENDING at version 1'
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT EXISTS (SELECT 1 FROM order_transition
                        WHERE from_state = OLD.state AND to_state = NEW.state) THEN
            RAISE EXCEPTION 'illegal order transition % -> %', OLD.state, NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.version <> OLD.version + 1 THEN
            RAISE EXCEPTION 'a transition must bump the version by one'
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF NEW.version <> OLD.version THEN
        RAISE EXCEPTION 'the version changes only with the state'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.id <> OLD.id OR NEW.user_id <> OLD.user_id OR NEW.sku_id <> OLD.sku_id
       OR NEW.quantity <> OLD.quantity OR NEW.amount_cents <> OLD.amount_cents THEN
        RAISE EXCEPTION 'an order''s identity and amount are immutable'
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER orders_guard BEFORE INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_guard();

-- The reservations ledger: one row per order (reservation id = order id).
--   ACTIVE     pre-locked, lapses at expires_at
--   CONFIRMED  paid; never lapses; awaits the stock-deduction job
--   ALLOCATED  deducted from skus.stock_real (a permanent allocation)
--   RELEASED   given back (cancel, expiry, refund)
-- Units held = ACTIVE rows not yet lapsed + CONFIRMED rows.
CREATE TABLE reservations (
    order_id    uuid PRIMARY KEY REFERENCES orders (id),
    sku_id      text NOT NULL REFERENCES skus (id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    status      text NOT NULL CHECK (status IN ('ACTIVE', 'CONFIRMED', 'ALLOCATED', 'RELEASED')),
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reservations_held ON reservations (sku_id) WHERE status IN ('ACTIVE', 'CONFIRMED');

CREATE TABLE payments (
    id                 uuid PRIMARY KEY,
    order_id           uuid NOT NULL REFERENCES orders (id),
    provider           text NOT NULL CHECK (provider IN ('wechat', 'alipay', 'douyin')),
    amount_cents       bigint NOT NULL CHECK (amount_cents >= 0),
    status             text NOT NULL CHECK (status IN ('CREATED', 'SUCCEEDED', 'REFUND_REQUIRED')),
    pay_url            text NOT NULL,
    provider_event_id  text,
    paid_at            timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_by_order ON payments (order_id);
-- The compensation poller's work list: payments started and not yet resolved.
CREATE INDEX payments_open ON payments (created_at) WHERE status = 'CREATED';

-- Every payment result we accepted, once per provider event id (webhook, compensation and
-- replay all land here; duplicates are refused by the key, not by application logic).
CREATE TABLE payment_events (
    id                 bigserial PRIMARY KEY,
    provider           text NOT NULL,
    provider_event_id  text NOT NULL CHECK (length(provider_event_id) BETWEEN 1 AND 128),
    payment_id         uuid NOT NULL REFERENCES payments (id),
    source             text NOT NULL CHECK (source IN ('webhook', 'compensation', 'replay')),
    amount_cents       bigint NOT NULL,
    -- what applying it did: PAID, REFUND_REQUIRED, ...
    outcome            text NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_event_id)
);

-- Transactional outbox: domain events written in the same transaction as the state change;
-- a relay publishes them to Kafka keyed by aggregate_id (the order id) and stamps
-- published_at.
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    schema_version integer NOT NULL CHECK (schema_version >= 1),
    payload        jsonb NOT NULL,
    -- W3C traceparent of the request that caused it, so one trace spans the delay.
    traceparent    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Durable delayed jobs, run by the scheduler: claimed with FOR UPDATE SKIP LOCKED, executed
-- under a lease whose token is checked on completion. Order expiry and every follow-up action
-- of a payment are rows here, written in the transaction that makes them necessary.
CREATE TABLE delayed_job (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_.]{0,63}$'),
    payload          jsonb NOT NULL,
    -- 0 = P0 (payment, stock) ... 2 = P2 (reports, archiving)
    priority         smallint NOT NULL DEFAULT 1 CHECK (priority BETWEEN 0 AND 2),
    state            text NOT NULL DEFAULT 'scheduled'
                     CHECK (state IN ('scheduled', 'running', 'completed', 'dead', 'cancelled')),
    run_at           timestamptz NOT NULL,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer NOT NULL DEFAULT 10 CHECK (max_attempts >= 1),
    -- One job per business action (e.g. 'order.expire:<order id>'): writing it twice is a
    -- no-op, so a retried transaction cannot schedule an action twice.
    dedupe_key       text UNIQUE,
    lease_owner      text,
    lease_token      uuid,
    lease_expires_at timestamptz,
    last_error       text,
    traceparent      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'running') = (lease_token IS NOT NULL))
);
CREATE INDEX delayed_job_due ON delayed_job (priority, run_at) WHERE state = 'scheduled';
CREATE INDEX delayed_job_leases ON delayed_job (lease_expires_at) WHERE state = 'running';
