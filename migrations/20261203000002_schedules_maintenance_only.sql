-- Operators may schedule maintenance kinds only (the scheduler's ops API refuses the rest): a
-- schedule of a job that moves money or stock, written before that rule, is paused here so it
-- never fires again; an operator can read it and remove it (DELETE /v1/ops/schedules/{name}).
UPDATE job_schedule
   SET paused = true, updated_by = 'migration: maintenance kinds only', updated_at = now()
 WHERE kind NOT IN ('stock.reconcile', 'outbox.prune', 'orders.prune_lost_answers')
   AND NOT paused;
