-- Hot / cold: finished jobs (completed or cancelled) leave delayed_job for this table once
-- they are older than the retention (the job engine's leader moves them in batches), so the
-- hot table holds what is scheduled, running, dead, or just finished, and stays small under
-- sustained load. Dead jobs stay hot: they wait for an operator's redrive.
-- Dedupe keys are unique in the hot table only: a business action that could be scheduled
-- again after its job was archived must carry a key that says so.
CREATE TABLE delayed_job_archive (
    id               bigint PRIMARY KEY,
    kind             text NOT NULL,
    payload          jsonb NOT NULL,
    priority         smallint NOT NULL,
    state            text NOT NULL,
    run_at           timestamptz NOT NULL,
    attempts         integer NOT NULL,
    max_attempts     integer NOT NULL,
    dedupe_key       text,
    last_error       text,
    traceparent      text,
    created_at       timestamptz NOT NULL,
    finished_at      timestamptz NOT NULL,
    archived_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delayed_job_archive_by_key ON delayed_job_archive (dedupe_key);
CREATE INDEX delayed_job_finished ON delayed_job (updated_at) WHERE state IN ('completed', 'cancelled');
