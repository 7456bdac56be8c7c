-- The W3C traceparent of the request that created the order. What acts on the order later
-- (its payment, the provider's callback, compensation) continues this trace, so one trace shows
-- the order from "buy now" to its voucher. (outbox and delayed_job rows have carried the column
-- since the first migration.)
ALTER TABLE orders ADD COLUMN traceparent text;
