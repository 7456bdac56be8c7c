-- The ceiling for scripts/bench.sh: the job engine's own claim and settle statements, decided
-- on the database's clock as the engine's are
-- (crates/job-engine/src/store.rs: claim, complete_many), bare, with no engine around them:
-- claim a batch of 500 due jobs under a lease, then complete them (into the archive). pgbench runs it from
-- several clients at once; :client_id keeps each client's batch its own.
WITH t AS (SELECT clock_timestamp() AS now)
UPDATE delayed_job j
SET state = 'running', lease_owner = 'pgbench-' || :client_id, lease_token = gen_random_uuid(),
    lease_expires_at = GREATEST(j.run_at, t.now) + 30000 * interval '1 millisecond',
    attempts = j.attempts + 1, updated_at = now()
FROM t, (SELECT id FROM delayed_job
      WHERE state = 'scheduled' AND run_at <= (SELECT now FROM t) + 1000 * interval '1 millisecond'
        AND kind = ANY('{bench.noop}')
      ORDER BY priority, run_at
      LIMIT 500
      FOR UPDATE SKIP LOCKED) due
WHERE j.id = due.id;
WITH done AS (
    DELETE FROM delayed_job
    WHERE state = 'running' AND lease_owner = 'pgbench-' || :client_id
    RETURNING id, kind, payload, priority, run_at, attempts, max_attempts, dedupe_key,
              last_error, traceparent, created_at)
INSERT INTO delayed_job_archive (id, kind, payload, priority, state, run_at, attempts,
    max_attempts, dedupe_key, last_error, traceparent, created_at, finished_at)
SELECT id, kind, payload, priority, 'completed', run_at, attempts, max_attempts, dedupe_key,
       last_error, traceparent, created_at, now()
FROM done;
