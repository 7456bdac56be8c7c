-- The outbox's event ids are random (v4) UUIDs the code generates, and nothing looks a row up by
-- one: a unique index on them guarded against nothing that can happen, and cost a random
-- B-tree insert on every outbox write (on the order path) and again on every publish stamp
-- (an UPDATE that cannot be HOT: published_at is in outbox_unpublished's predicate).
-- Consumers deduplicate by event id in their inbox tables, which keep their own keys.
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
