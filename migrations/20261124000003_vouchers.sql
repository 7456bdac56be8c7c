-- Redeemable vouchers: one per paid order, issued by the voucher.issue job. The code is what
-- the buyer shows at the bar (12 characters, no look-alikes); the bar redeems it once
-- (order CONFIRMED -> REDEEMED). A code is a bearer secret: generated from a CSPRNG.
CREATE TABLE vouchers (
    order_id    uuid PRIMARY KEY REFERENCES orders (id),
    code        text NOT NULL UNIQUE CHECK (code ~ '^[A-HJKMNP-Z2-9]{12}$'),
    issued_at   timestamptz NOT NULL DEFAULT now(),
    redeemed_at timestamptz
);
