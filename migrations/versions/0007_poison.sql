-- syncworker schema, version 0007: poison jobs.  A job whose runs kill or freeze their worker
-- (os._exit, a segfault in a C extension, the OOM killer, a statement that crashes its
-- backend) is rescued and handed to the next replica, which dies the same way.  Abandoned runs
-- are counted per job: the first is rerun at once, the next ones after a growing delay, and at
-- max_abandons in a row the job is disabled (error type `crash_loop`), so that a fleet under
-- systemd recovers after at most max_abandons worker deaths.  Failures the job reports count
-- toward max_retries as before, never toward this limit.

ALTER TABLE syncworker.integrations
  ADD COLUMN abandon_count integer NOT NULL DEFAULT 0,
  ADD COLUMN max_abandons integer NOT NULL DEFAULT 3,
  ADD CONSTRAINT integrations_max_abandons_positive CHECK (max_abandons >= 1);
COMMENT ON COLUMN syncworker.integrations.abandon_count IS
  'runs abandoned in a row (their worker died or lost its session); reset by any run that ends';
COMMENT ON COLUMN syncworker.integrations.max_abandons IS
  'disabled (error type crash_loop) when this many runs in a row are abandoned';

-- How long the rescue of a job waits after its abandoned-in-a-row count reaches `abandons`:
-- nothing the first time (a worker's death is usually not the job's doing), then 10 s, 20 s,
-- 40 s ... up to 5 minutes.
CREATE FUNCTION syncworker.rescue_delay(abandons integer) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN abandons <= 1 THEN interval '0'
              ELSE make_interval(secs => least(300, 10 * power(2, least(abandons - 2, 10))))
         END
$$;

-- Give a run up and hand its job back.  `counted` (the default) is for runs whose worker died,
-- froze or lost its session: they count toward max_abandons.  A worker that shuts down
-- gracefully hands its runs back uncounted.
DROP FUNCTION syncworker.abandon_run(bigint, text);
CREATE FUNCTION syncworker.abandon_run(target_run_id bigint, reason text, counted boolean DEFAULT true)
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
    END IF;
  EXCEPTION WHEN OTHERS THEN
    INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message)
    VALUES (run.integration_id, run.id, 'internal',
            'the job could not be handed back after its run was abandoned: ' || SQLERRM);
  END;
  RETURN run.integration_id;
END
$$;

-- Re-enabling a job also forgets its abandoned runs; everything else as in 0005.
CREATE OR REPLACE FUNCTION syncworker.integrations_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
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
