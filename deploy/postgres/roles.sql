-- Least privilege (run once by the postgres image's entrypoint, as the superuser, on the
-- first start of an empty volume): bar_migrator owns the schema and runs the migrations
-- (db-migrate); the services connect as bar_app, which db-migrate grants DML only.
-- Development passwords: set your own in production (and keep them out of the compose file).
CREATE ROLE bar_migrator LOGIN PASSWORD 'bar_migrator';
CREATE ROLE bar_app LOGIN PASSWORD 'bar_app';
ALTER DATABASE bar_fulfillment OWNER TO bar_migrator;
ALTER SCHEMA public OWNER TO bar_migrator;
