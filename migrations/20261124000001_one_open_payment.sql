-- One open (CREATED) payment per order and provider. Two concurrent "start payment" calls
-- used to create two payments for one order (the buyer could be charged twice, then
-- refunded); now the second insert conflicts and the caller returns the first payment.
-- A payment that settled (SUCCEEDED, REFUND_REQUIRED) no longer counts, so a later attempt at
-- the same provider is still possible once the first is resolved.
CREATE UNIQUE INDEX payments_one_open ON payments (order_id, provider) WHERE status = 'CREATED';
