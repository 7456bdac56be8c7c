-- Purchase limits ("limit N per person"): the most units of a SKU one buyer may hold in live
-- (PENDING) and paid orders. NULL = the service default (PRELOCK_MAX_PER_BUYER); 0 = no limit.
-- The pre-lock script enforces it atomically in Redis; a rebuild restores each buyer's count
-- from the ledger with the index below (paid orders of the SKU) and the live reservations.
ALTER TABLE skus ADD COLUMN max_per_buyer integer CHECK (max_per_buyer BETWEEN 0 AND 1000000);

CREATE INDEX orders_paid_by_sku ON orders (sku_id, user_id)
    WHERE state IN ('PAID', 'CONFIRMED', 'REDEEMED');
