-- Order ids whose pre-lock answer was lost (a timeout, or a commit whose outcome is unknown):
-- the pre-lock may hold units for them although no order exists. order-api records one before
-- answering 503, so the retry of such an id is never answered from the in-process sold-out
-- mark (it may own units), while a brand-new buyer of a sold-out SKU still is, at the cost of
-- one indexed read. The row goes when the background give-back for it has run; rows left by
-- a process that died first only switch the shortcut off for that one id.
CREATE TABLE prelock_lost_answers (
    order_id   uuid PRIMARY KEY,
    sku_id     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
