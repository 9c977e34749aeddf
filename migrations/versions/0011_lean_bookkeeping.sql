-- syncworker schema, version 0011: a run's bookkeeping prepares no trigger condition and no
-- CHECK expression.
--
-- Every UPDATE of a row prepares, for that statement, each CHECK constraint of the table and
-- the WHEN condition of each row trigger whose columns it sets (parsed from the catalog and
-- compiled, then evaluated): a claim and a finish each paid for eleven CHECKs and four WHEN
-- conditions, and each claim ran the plpgsql of the sync_runs statement trigger, for
-- nothing.  That was about half of the server's work of a no-op run.  Now:
-- * the checks of what a person writes into a job's row (the constraints of 0001-0007, with
--   the same names, SQLSTATE 23514 and messages) are made by integrations_before_write, for
--   the INSERT and for an UPDATE that sets one of the checked columns without handing the
--   row's run over (running_run_id stays as it was).  A claim, a finish and a rescue are the
--   worker's own bookkeeping: they write values the worker computed, and fire none of it;
-- * integrations_paused_update fires only for an UPDATE that sets enabled, disabled_reason or
--   paused_at (a finish sets none of them: a run that disables its job does so in a second
--   statement, which fires it);
-- * integrations_notify_update fires for a row no run holds; the finish of a run and the
--   rescue of an abandoned one send their own wake-up NOTIFY when the job is due within 5
--   minutes, as before;
-- * sync_runs_notify_insert fires only in sessions that do not announce their runs
--   themselves (the worker's do), and keeps no transition table.

ALTER TABLE syncworker.integrations
  DROP CONSTRAINT integrations_config_is_object,
  DROP CONSTRAINT integrations_kind_not_blank,
  DROP CONSTRAINT integrations_max_abandons_positive,
  DROP CONSTRAINT integrations_max_retries_not_negative,
  DROP CONSTRAINT integrations_name_not_blank,
  DROP CONSTRAINT integrations_pending_trigger_known,
  DROP CONSTRAINT integrations_retry_backoff_positive,
  DROP CONSTRAINT integrations_retry_count_not_negative,
  DROP CONSTRAINT integrations_stale_after_positive,
  DROP CONSTRAINT integrations_state_is_object,
  DROP CONSTRAINT integrations_timeout_positive;

CREATE OR REPLACE FUNCTION syncworker.integrations_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  failed text;
BEGIN
  -- The row's checks (NULL passes, as in a CHECK constraint).
  failed := CASE
    WHEN (btrim(NEW.name) <> '') IS FALSE THEN 'integrations_name_not_blank'
    WHEN (btrim(NEW.kind) <> '') IS FALSE THEN 'integrations_kind_not_blank'
    WHEN (jsonb_typeof(NEW.config) = 'object') IS FALSE THEN 'integrations_config_is_object'
    WHEN (jsonb_typeof(NEW.state) = 'object') IS FALSE THEN 'integrations_state_is_object'
    WHEN (NEW.max_retries >= 0) IS FALSE THEN 'integrations_max_retries_not_negative'
    WHEN (NEW.retry_backoff_seconds >= 1) IS FALSE THEN 'integrations_retry_backoff_positive'
    WHEN (NEW.timeout_seconds >= 1) IS FALSE THEN 'integrations_timeout_positive'
    WHEN (NEW.retry_count >= 0) IS FALSE THEN 'integrations_retry_count_not_negative'
    WHEN (NEW.stale_after_seconds > 0) IS FALSE THEN 'integrations_stale_after_positive'
    WHEN (NEW.max_abandons >= 1) IS FALSE THEN 'integrations_max_abandons_positive'
    WHEN (NEW.pending_trigger IN ('manual', 'realtime', 'rescue')) IS FALSE
      THEN 'integrations_pending_trigger_known'
  END;
  IF failed IS NOT NULL THEN
    RAISE EXCEPTION 'new row for relation "integrations" violates check constraint "%"', failed
      USING ERRCODE = 'check_violation', CONSTRAINT = failed, SCHEMA = 'syncworker',
            TABLE = 'integrations';
  END IF;
  -- An UPDATE that changes neither the job's definition nor its schedule (its state, say)
  -- is not a change of the job.
  IF TG_OP = 'UPDATE' AND NOT (
       OLD.name IS DISTINCT FROM NEW.name OR OLD.kind IS DISTINCT FROM NEW.kind
       OR OLD.config IS DISTINCT FROM NEW.config OR OLD.enabled IS DISTINCT FROM NEW.enabled
       OR OLD.interval_seconds IS DISTINCT FROM NEW.interval_seconds
       OR OLD.cron IS DISTINCT FROM NEW.cron OR OLD.timezone IS DISTINCT FROM NEW.timezone
       OR OLD.max_retries IS DISTINCT FROM NEW.max_retries
       OR OLD.retry_backoff_seconds IS DISTINCT FROM NEW.retry_backoff_seconds
       OR OLD.timeout_seconds IS DISTINCT FROM NEW.timeout_seconds
       OR OLD.max_abandons IS DISTINCT FROM NEW.max_abandons
       OR OLD.stale_after_seconds IS DISTINCT FROM NEW.stale_after_seconds
       OR OLD.paused_at IS DISTINCT FROM NEW.paused_at
       OR OLD.next_sync_at IS DISTINCT FROM NEW.next_sync_at
       OR OLD.scheduled_sync_at IS DISTINCT FROM NEW.scheduled_sync_at) THEN
    RETURN NEW;
  END IF;
  IF NOT isfinite(NEW.next_sync_at)
     OR NEW.next_sync_at NOT BETWEEN '0001-01-02 00:00:00+00' AND '9999-12-30 00:00:00+00' THEN
    RAISE EXCEPTION 'next_sync_at must be a finite time between the years 1 and 9999, got %', NEW.next_sync_at
      USING ERRCODE = 'check_violation', CONSTRAINT = 'integrations_next_sync_at_finite',
            HINT = 'Use NULL for a job that only runs when triggered, or enabled = false to pause it.';
  END IF;
  IF char_length(NEW.name) > 200 AND (TG_OP = 'INSERT' OR NEW.name IS DISTINCT FROM OLD.name) THEN
    RAISE EXCEPTION 'an integration name has at most 200 characters, got %', char_length(NEW.name)
      USING ERRCODE = 'check_violation', CONSTRAINT = 'integrations_name_length';
  END IF;
  IF TG_OP = 'INSERT' OR NEW.timezone IS DISTINCT FROM OLD.timezone THEN
    PERFORM syncworker.check_timezone(NEW.timezone);
  END IF;
  IF TG_OP = 'INSERT' OR NEW.interval_seconds IS DISTINCT FROM OLD.interval_seconds
     OR NEW.cron IS DISTINCT FROM OLD.cron THEN
    PERFORM syncworker.check_schedule(NEW.interval_seconds, NEW.cron);
  END IF;
  NEW.updated_at := now();
  IF NEW.next_sync_at IS NULL AND (NEW.interval_seconds IS NOT NULL OR NEW.cron IS NOT NULL)
     AND NEW.running_run_id IS NULL
     AND (TG_OP = 'INSERT' OR OLD.interval_seconds IS DISTINCT FROM NEW.interval_seconds
          OR OLD.cron IS DISTINCT FROM NEW.cron OR (NEW.enabled AND NOT OLD.enabled)) THEN
    NEW.next_sync_at := now();
  END IF;
  -- Re-enabling a job clears why it was disabled and gives it fresh retry and abandon budgets.
  IF TG_OP = 'UPDATE' AND NEW.enabled AND NOT OLD.enabled THEN
    NEW.disabled_reason := NULL;
    NEW.retry_count := 0;
    NEW.abandon_count := 0;
  END IF;
  RETURN NEW;
END
$$;

DROP TRIGGER integrations_before_update ON syncworker.integrations;
CREATE TRIGGER integrations_before_update
  BEFORE UPDATE OF name, kind, config, enabled, interval_seconds, cron, timezone, next_sync_at,
                   max_retries, retry_backoff_seconds, timeout_seconds, retry_count, state,
                   pending_trigger, scheduled_sync_at, paused_at, stale_after_seconds, max_abandons
  ON syncworker.integrations
  FOR EACH ROW WHEN (OLD.running_run_id IS NOT DISTINCT FROM NEW.running_run_id)
  EXECUTE FUNCTION syncworker.integrations_before_write();

DROP TRIGGER integrations_paused_update ON syncworker.integrations;
CREATE TRIGGER integrations_paused_update
  BEFORE UPDATE OF enabled, disabled_reason, paused_at ON syncworker.integrations
  FOR EACH ROW
  WHEN (NEW.paused_at IS NOT NULL
        AND (NEW.enabled OR NEW.disabled_reason IS DISTINCT FROM OLD.disabled_reason))
  EXECUTE FUNCTION syncworker.integrations_paused();

CREATE OR REPLACE FUNCTION syncworker.notify_due_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.enabled AND NEW.next_sync_at IS NOT NULL
     AND (OLD.next_sync_at IS DISTINCT FROM NEW.next_sync_at OR NOT OLD.enabled) THEN
    PERFORM pg_notify('syncworker', json_build_object(
      'due_in', round(extract(epoch FROM NEW.next_sync_at - clock_timestamp())::numeric, 3))::text);
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER integrations_notify_update ON syncworker.integrations;
CREATE TRIGGER integrations_notify_update
  AFTER UPDATE OF next_sync_at, enabled ON syncworker.integrations
  FOR EACH ROW WHEN (OLD.running_run_id IS NULL AND NEW.running_run_id IS NULL)
  EXECUTE FUNCTION syncworker.notify_due_row();

DROP TRIGGER sync_runs_notify_insert ON syncworker.sync_runs;
CREATE OR REPLACE FUNCTION syncworker.notify_runs_started() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('syncworker', '{"runs_started": true}');
  RETURN NULL;
END
$$;
CREATE TRIGGER sync_runs_notify_insert AFTER INSERT ON syncworker.sync_runs
  FOR EACH STATEMENT
  WHEN (current_setting('syncworker.announces_runs', true) IS DISTINCT FROM 'on')
  EXECUTE FUNCTION syncworker.notify_runs_started();

-- A rescued job due within 5 minutes wakes every replica's dispatcher (integrations_notify_update
-- no longer fires for a row whose run is handed back); everything else as in 0007.
CREATE OR REPLACE FUNCTION syncworker.abandon_run(target_run_id bigint, reason text, counted boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  run syncworker.sync_runs;
  job syncworker.integrations;
  why text;
BEGIN
  UPDATE syncworker.sync_runs
     SET status = 'abandoned', finished_at = clock_timestamp(),
         duration_ms = (extract(epoch FROM clock_timestamp() - started_at) * 1000)::bigint,
         error_type = 'abandoned', error = reason
   WHERE id = target_run_id AND status = 'running'
  RETURNING * INTO run;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message)
  VALUES (run.integration_id, run.id, 'abandoned', reason);
  BEGIN
    UPDATE syncworker.integrations i
       SET running_run_id = NULL,
           abandon_count = i.abandon_count + counted::integer,
           pending_trigger = coalesce(i.pending_trigger, 'rescue'),
           scheduled_sync_at = coalesce(i.scheduled_sync_at, run.scheduled_for),
           next_sync_at = now() + CASE WHEN counted THEN syncworker.rescue_delay(i.abandon_count + 1)
                                       ELSE interval '0' END,
           last_status = 'abandoned',
           last_sync_at = run.finished_at,
           last_error = reason
     WHERE i.id = run.integration_id AND i.running_run_id = run.id
    RETURNING * INTO job;
    IF FOUND AND counted AND job.abandon_count >= job.max_abandons AND job.enabled THEN
      why := format('crash loop: its last %s runs were abandoned (each time its worker died, froze or '
                    'lost its database session while running it); last: %s', job.abandon_count, reason);
      UPDATE syncworker.integrations SET enabled = false, disabled_reason = left(why, 2000)
       WHERE id = job.id;
      INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message)
      VALUES (job.id, run.id, 'crash_loop', left(why, 2000));
      PERFORM pg_notify('syncworker_alerts', json_build_object(
        'integration', left(job.name, 200), 'integration_id', job.id, 'run_id', run.id,
        'error_type', 'crash_loop', 'reason', left(why, 1000))::text);
    ELSIF FOUND AND job.enabled AND job.next_sync_at <= now() + interval '5 minutes' THEN
      -- The job is due again soon: every replica's dispatcher hears of it at once.
      PERFORM pg_notify('syncworker', json_build_object(
        'due_in', round(extract(epoch FROM job.next_sync_at - clock_timestamp())::numeric, 3))::text);
    END IF;
  EXCEPTION WHEN OTHERS THEN
    INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message)
    VALUES (run.integration_id, run.id, 'internal',
            'the job could not be handed back after its run was abandoned: ' || SQLERRM);
  END;
  RETURN run.integration_id;
END
$$;
