-- A refund paid back by the provider: the payment moves REFUND_REQUIRED -> REFUNDED (the
-- compensation worker's payment.refund job, idempotent by the refund id it sends).
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('CREATED', 'SUCCEEDED', 'REFUND_REQUIRED', 'REFUNDED'));
ALTER TABLE payments ADD COLUMN refund_id text, ADD COLUMN refunded_at timestamptz;
