-- The ceiling for scripts/bench.sh: the job engine's own claim and settle statements
-- (crates/job-engine/src/store.rs: claim, settle_many), bare, with no engine around them:
-- claim a batch of 500 due jobs under a lease, then complete them. pgbench runs it from
-- several clients at once; :client_id keeps each client's batch its own.
UPDATE delayed_job j
SET state = 'running', lease_owner = 'pgbench-' || :client_id, lease_token = gen_random_uuid(),
    lease_expires_at = GREATEST(j.run_at, now()) + 30000 * interval '1 millisecond',
    attempts = j.attempts + 1, updated_at = now()
FROM (SELECT id FROM delayed_job
      WHERE state = 'scheduled' AND run_at <= now() + interval '1 second'
        AND kind = ANY('{bench.noop}')
      ORDER BY priority, run_at
      LIMIT 500
      FOR UPDATE SKIP LOCKED) due
WHERE j.id = due.id;
UPDATE delayed_job
SET state = 'completed', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
    updated_at = now()
WHERE state = 'running' AND lease_owner = 'pgbench-' || :client_id;
