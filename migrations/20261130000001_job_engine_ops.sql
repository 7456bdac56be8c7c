-- Job kinds an operator paused: no engine instance claims them (running jobs finish) until
-- they are resumed. Checked by every claim.
CREATE TABLE job_kind_pause (
    kind       text PRIMARY KEY,
    paused_by  text NOT NULL,
    paused_at  timestamptz NOT NULL DEFAULT now()
);
