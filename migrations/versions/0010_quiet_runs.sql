-- syncworker schema, version 0010: a run's own bookkeeping fires no trigger.
--
-- A claim and a finish each UPDATE the job's row.  Until now both went through the
-- plpgsql row triggers (the checks of what a person writes, and the paused bookkeeping), and
-- every finish sent a NOTIFY for the job's next slot, inside the run's transaction: NOTIFY
-- serialises every notifying commit of the server, so runs on many sessions and replicas
-- queued behind one another.  Now:
-- * integrations_before_write fires for what a person (or an operator function) changes: the
--   job's definition, its schedule, enabling, or next_sync_at while no run holds the row.
--   updated_at is therefore the time of the last such change, not of the last run;
-- * integrations_paused fires only when there is a paused_at to clear;
-- * the wake-up NOTIFY of an UPDATE is sent when an idle row is rescheduled, enabled or
--   triggered, and when a run ends with its job due within 5 minutes (a trigger that came
--   during the run, a rescue, a frequent schedule: the replicas must know that slot even if
--   the finishing one freezes the next moment).  A run that ends with its job due later (an
--   hourly or daily job, a burst of manual runs) sends none: the finishing worker tells the
--   other replicas outside the run's transaction, at most a few times a second, and each
--   replica looks at the table at least every --poll-interval anyway.

DROP TRIGGER integrations_before_write ON syncworker.integrations;
CREATE TRIGGER integrations_before_write BEFORE INSERT ON syncworker.integrations
  FOR EACH ROW EXECUTE FUNCTION syncworker.integrations_before_write();
CREATE TRIGGER integrations_before_update BEFORE UPDATE ON syncworker.integrations
  FOR EACH ROW
  WHEN (OLD.name IS DISTINCT FROM NEW.name OR OLD.kind IS DISTINCT FROM NEW.kind
        OR OLD.config IS DISTINCT FROM NEW.config OR OLD.enabled IS DISTINCT FROM NEW.enabled
        OR OLD.interval_seconds IS DISTINCT FROM NEW.interval_seconds
        OR OLD.cron IS DISTINCT FROM NEW.cron OR OLD.timezone IS DISTINCT FROM NEW.timezone
        OR OLD.max_retries IS DISTINCT FROM NEW.max_retries
        OR OLD.retry_backoff_seconds IS DISTINCT FROM NEW.retry_backoff_seconds
        OR OLD.timeout_seconds IS DISTINCT FROM NEW.timeout_seconds
        OR OLD.max_abandons IS DISTINCT FROM NEW.max_abandons
        OR OLD.stale_after_seconds IS DISTINCT FROM NEW.stale_after_seconds
        OR OLD.paused_at IS DISTINCT FROM NEW.paused_at
        OR (OLD.running_run_id IS NOT DISTINCT FROM NEW.running_run_id
            AND (OLD.next_sync_at IS DISTINCT FROM NEW.next_sync_at
                 OR OLD.scheduled_sync_at IS DISTINCT FROM NEW.scheduled_sync_at)))
  EXECUTE FUNCTION syncworker.integrations_before_write();

DROP TRIGGER integrations_paused ON syncworker.integrations;
CREATE TRIGGER integrations_paused BEFORE INSERT ON syncworker.integrations
  FOR EACH ROW WHEN (NEW.paused_at IS NOT NULL)
  EXECUTE FUNCTION syncworker.integrations_paused();
CREATE TRIGGER integrations_paused_update BEFORE UPDATE ON syncworker.integrations
  FOR EACH ROW
  WHEN (NEW.paused_at IS NOT NULL
        AND (NEW.enabled OR NEW.disabled_reason IS DISTINCT FROM OLD.disabled_reason))
  EXECUTE FUNCTION syncworker.integrations_paused();

DROP TRIGGER integrations_notify_update ON syncworker.integrations;
CREATE TRIGGER integrations_notify_update AFTER UPDATE ON syncworker.integrations
  FOR EACH ROW
  WHEN (NEW.enabled AND NEW.running_run_id IS NULL AND NEW.next_sync_at IS NOT NULL
        AND CASE WHEN OLD.running_run_id IS NULL
                 THEN OLD.next_sync_at IS DISTINCT FROM NEW.next_sync_at OR NOT OLD.enabled
                 ELSE NEW.next_sync_at <= now() + interval '5 minutes' END)
  EXECUTE FUNCTION syncworker.notify_due_row();
