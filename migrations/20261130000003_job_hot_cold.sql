-- Completed jobs leave the hot table the moment they complete: one statement deletes the row
-- and writes it to delayed_job_archive (cancelled jobs still move after the retention). A
-- completed job used to be written three times more (completed, then deleted and archived an
-- hour later); the hot table now holds only live jobs (scheduled, running, dead, recently
-- cancelled), which also makes the expired-lease scan cheap enough to need no index of its
-- own. Dedupe keys: most jobs have none, so the unique index skips NULLs; the insert API looks
-- in the archive too, so "duplicate of job X" holds after a job is archived.
ALTER TABLE delayed_job DROP CONSTRAINT delayed_job_dedupe_key_key;
CREATE UNIQUE INDEX delayed_job_dedupe ON delayed_job (dedupe_key) WHERE dedupe_key IS NOT NULL;
DROP INDEX delayed_job_leases;
DROP INDEX delayed_job_archive_by_key;
CREATE INDEX delayed_job_archive_by_key ON delayed_job_archive (dedupe_key)
    WHERE dedupe_key IS NOT NULL;

-- Every job, live or archived, for operators and reports.
CREATE VIEW delayed_job_all AS
    SELECT id, kind, payload, priority, state, run_at, attempts, max_attempts, dedupe_key,
           lease_owner, lease_expires_at, last_error, created_at, updated_at
    FROM delayed_job
    UNION ALL
    SELECT id, kind, payload, priority, state, run_at, attempts, max_attempts, dedupe_key,
           NULL, NULL, last_error, created_at, finished_at
    FROM delayed_job_archive;
