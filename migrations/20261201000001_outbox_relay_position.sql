-- The relay keeps its place in the outbox instead of stamping every row it publishes.
--
-- A stamp was an UPDATE per event (a new row version and its index entries, never HOT: the
-- partial index of unpublished rows names published_at), which cost Postgres more than the
-- publish itself. The relay now writes one small row per round: every outbox row with an id up
-- to published_through has been published, except the gaps, ranges of ids the relay went past
-- while no row with them was visible. A gap is either a transaction still running (the
-- classic outbox pitfall: it took its id before rows that committed first) or one that rolled
-- back. The relay looks its gaps up every round and publishes what has become visible; it
-- drops a gap only once it is certain nothing will ever fill it:
--
--   * every outbox id is taken by outbox_next_id(), which gives the transaction its xid first:
--     a transaction holding an id the relay saw missing got its xid before the relay's read;
--   * right after that read the relay takes an xid of its own, the gap's horizon: greater
--     than the xid of any transaction holding an id in the gap;
--   * once the oldest running transaction (pg_snapshot_xmin) is newer than the horizon, each
--     of them has ended, and an id still not visible in a later lookup was rolled back.
--
-- The sequence must not cache values (CACHE 1, the default): ids are then taken in time
-- order, which is what makes "an id below a visible row" a sure sign of a gap.

CREATE TABLE outbox_relay (
    -- one row: the position of whichever relay leads
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    published_through  bigint NOT NULL CHECK (published_through >= 0),
    -- the gaps: ranges gap_lo[i]..gap_hi[i], each with the horizon (an xid, as a number)
    -- after which it can be dropped
    gap_lo             bigint[] NOT NULL DEFAULT '{}',
    gap_hi             bigint[] NOT NULL DEFAULT '{}',
    gap_horizon        bigint[] NOT NULL DEFAULT '{}',
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(gap_lo) = cardinality(gap_hi)
           AND cardinality(gap_lo) = cardinality(gap_horizon))
);

CREATE FUNCTION outbox_next_id() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- the xid first (a no-op when the transaction has one already), then the id
    PERFORM pg_current_xact_id();
    RETURN nextval('outbox_id_seq');
END
$$;

-- From the stamps to a position: with writers held off, every id taken so far is either a
-- visible row or a rolled-back one. Nothing unpublished: the position is the sequence's last
-- value. Otherwise just below the oldest unpublished row (rows above it that were published
-- go out again: duplicates, which consumers' inboxes absorb; none is skipped).
LOCK TABLE outbox IN SHARE MODE;
INSERT INTO outbox_relay (published_through)
SELECT coalesce(
    (SELECT min(id) - 1 FROM outbox WHERE published_at IS NULL),
    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM outbox_id_seq));
-- one row: say so, or the planner guesses hundreds and every read of the view pays for it
ANALYZE outbox_relay;

ALTER SEQUENCE outbox_id_seq CACHE 1;
ALTER TABLE outbox ALTER COLUMN id SET DEFAULT outbox_next_id();
DROP INDEX outbox_unpublished;
ALTER TABLE outbox DROP COLUMN published_at;

-- The payload as the JSON text it was written as (json: checked on the way in, kept as it is),
-- not jsonb: the outbox is written once and read once, as text, by the relay, and jsonb parsed
-- every payload on insert (on the order path) only to print it again on every read, half of
-- what reading an outbox row cost Postgres. (Rewrites the table: quick on an outbox the daily
-- prune keeps to a week.)
ALTER TABLE outbox ALTER COLUMN payload TYPE json USING payload::json;

-- What the relay has not published yet: rows past its position, and rows that filled a gap.
-- (outbox_lag_seconds is the age of the oldest of these.)
CREATE VIEW outbox_unpublished AS
    SELECT o.* FROM outbox o
    WHERE o.id > (SELECT published_through FROM outbox_relay)
    UNION ALL
    SELECT o.* FROM outbox o
    JOIN (SELECT unnest(gap_lo) AS lo, unnest(gap_hi) AS hi FROM outbox_relay) g
      ON o.id BETWEEN g.lo AND g.hi;
