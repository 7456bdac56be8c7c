-- The compensation worker's sweep walks the payments that may need a job again: open ones
-- (CREATED) and money owed (REFUND_REQUIRED), oldest change first. Without this it scanned the
-- whole payments table for the owed ones (payments_open covers CREATED only).
CREATE INDEX payments_sweep ON payments (status, updated_at)
    WHERE status IN ('CREATED', 'REFUND_REQUIRED');
