-- Leadership by lease, not by a session advisory lock: a paused leader (SIGSTOP, a frozen VM)
-- keeps its TCP session, and with it a session lock, for as long as it is paused, so no
-- standby could take over. A lease has an expiry on the database's clock, renewed by the
-- leader's heartbeat; once it lapses another instance takes it and the epoch goes up. Writes
-- a leader makes after it wakes carry its epoch and change nothing once it is not the live one
-- (job_engine::leader). One row per role: 'job' (the job engine's maintenance), 'relay' (the
-- outbox relay).
CREATE TABLE leader_lease (
    role         text PRIMARY KEY,
    -- the instance: its owner name and a random id (a restarted process is a new holder)
    holder       text NOT NULL,
    -- bumped by every take-over; a fenced write names the epoch it was made under
    epoch        bigint NOT NULL,
    expires_at   timestamptz NOT NULL,
    acquired_at  timestamptz NOT NULL,
    renewed_at   timestamptz NOT NULL
);

-- The epoch of the relay lease that recorded the position (for operators: which leader wrote
-- it last).
ALTER TABLE outbox_relay ADD COLUMN leader_epoch bigint;
