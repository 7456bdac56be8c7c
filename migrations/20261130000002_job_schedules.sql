-- Recurring schedules (job-engine's schedule module). The engine's leader materialises each
-- schedule's occurrences as ordinary delayed_job rows shortly before they are due (dedupe key
-- 'schedule:<name>:<occurrence>', so doing it twice writes nothing), and moves `cursor` past
-- them in the same transaction. Times are stored in UTC; the recurrence is matched on the wall
-- clock of `time_zone`, with the daylight-saving and misfire policies below.
CREATE TABLE job_schedule (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    kind          text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_.]{0,63}$'),
    payload       jsonb NOT NULL DEFAULT '{}',
    priority      smallint NOT NULL DEFAULT 2 CHECK (priority BETWEEN 0 AND 2),
    max_attempts  integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    -- a cron expression or a business cycle ('monthly on day 1 at 02:00')
    recurrence    text NOT NULL,
    time_zone     text NOT NULL,
    dst_gap       text NOT NULL DEFAULT 'shift' CHECK (dst_gap IN ('skip', 'shift')),
    dst_overlap   text NOT NULL DEFAULT 'first' CHECK (dst_overlap IN ('first', 'last', 'both')),
    misfire       text NOT NULL DEFAULT 'fire_once'
                  CHECK (misfire IN ('fire_once', 'skip', 'catch_up')),
    catch_up_max  integer NOT NULL DEFAULT 1 CHECK (catch_up_max >= 1),
    paused        boolean NOT NULL DEFAULT false,
    -- occurrences at or before this instant have been materialised (or skipped)
    cursor        timestamptz NOT NULL,
    last_fired_at timestamptz,
    updated_by    text NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
