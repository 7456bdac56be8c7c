-- The functions resolve the tables they read in the schema, never in a session's own
-- temporary tables: a role that could create a temporary `order_transition` would otherwise
-- hand the state-machine trigger a table of its own choosing.
ALTER FUNCTION orders_guard() SET search_path = pg_catalog, public;
ALTER FUNCTION outbox_next_id() SET search_path = pg_catalog, public;
