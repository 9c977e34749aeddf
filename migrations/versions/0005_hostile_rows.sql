-- Rows no worker can use are refused when they are written; retries count as users expect;
-- the status view and the rescuer see stale workers and runs past their timeout.

-- A cron expression that parses but never fires ("0 0 31 2 *") is refused like one that
-- does not parse.  The rules and messages match worker/cron.py's parse().
CREATE OR REPLACE FUNCTION syncworker.cron_error(expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  names constant text[] := ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
  lows constant int[] := ARRAY[0, 0, 1, 1, 0];
  highs constant int[] := ARRAY[59, 23, 31, 12, 7];
  months constant text[] := ARRAY['jan','feb','mar','apr','may','jun','jul','aug','sep','oct','nov','dec'];
  month_days constant int[] := ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
  days constant text[] := ARRAY['sun','mon','tue','wed','thu','fri','sat'];
  body text := btrim(expr);
  fields text[];
  raw text;
  item text;
  base text;
  step_text text;
  step int;
  token text;
  tokens text[];
  bounds int[];
  value int;
  i int;
  dom_values int[] := ARRAY[]::int[];
  month_values int[] := ARRAY[]::int[];
BEGIN
  body := CASE lower(body)
    WHEN '@yearly' THEN '0 0 1 1 *' WHEN '@annually' THEN '0 0 1 1 *'
    WHEN '@monthly' THEN '0 0 1 * *' WHEN '@weekly' THEN '0 0 * * 0'
    WHEN '@daily' THEN '0 0 * * *' WHEN '@midnight' THEN '0 0 * * *'
    WHEN '@hourly' THEN '0 * * * *' ELSE body END;
  fields := CASE WHEN body = '' THEN ARRAY[]::text[] ELSE regexp_split_to_array(body, '\s+') END;
  IF coalesce(array_length(fields, 1), 0) <> 5 THEN
    RETURN format('cron "%s": expected 5 fields (minute hour day-of-month month day-of-week), got %s',
                  expr, coalesce(array_length(fields, 1), 0));
  END IF;
  FOR i IN 1..5 LOOP
    raw := fields[i];
    FOREACH item IN ARRAY string_to_array(raw, ',') LOOP
      IF item = '' THEN
        RETURN format('cron "%s": %s field "%s" has an empty list item', expr, names[i], raw);
      END IF;
      base := split_part(item, '/', 1);
      step := 1;
      IF position('/' IN item) > 0 THEN
        step_text := substr(item, position('/' IN item) + 1);
        IF step_text !~ '^[0-9]+$' OR step_text::numeric = 0 THEN
          RETURN format('cron "%s": %s field "%s" has step ''%s'', expected a positive number',
                        expr, names[i], raw, step_text);
        END IF;
        step := least(step_text::numeric, 1000)::int;
      END IF;
      IF base = '*' THEN
        bounds := ARRAY[lows[i], highs[i]];
      ELSE
        tokens := CASE WHEN position('-' IN base) > 0
                       THEN ARRAY[split_part(base, '-', 1), substr(base, position('-' IN base) + 1)]
                       ELSE ARRAY[base] END;
        bounds := ARRAY[]::int[];
        FOREACH token IN ARRAY tokens LOOP
          IF token ~ '^[0-9]+$' THEN
            value := CASE WHEN length(token) > 6 THEN 1000000 ELSE token::int END;
          ELSIF i = 4 AND lower(token) = ANY (months) THEN
            value := array_position(months, lower(token));
          ELSIF i = 5 AND lower(token) = ANY (days) THEN
            value := array_position(days, lower(token)) - 1;
          ELSE
            RETURN format('cron "%s": %s field "%s" has ''%s'', expected a number%s',
                          expr, names[i], raw, token, CASE WHEN i >= 4 THEN ' or a name' ELSE '' END);
          END IF;
          IF value < lows[i] OR value > highs[i] THEN
            RETURN format('cron "%s": %s field "%s" is out of range %s-%s', expr, names[i], raw, lows[i], highs[i]);
          END IF;
          bounds := bounds || value;
        END LOOP;
        IF array_length(bounds, 1) = 2 AND bounds[1] > bounds[2] THEN
          RETURN format('cron "%s": %s field "%s" has a reversed range %s', expr, names[i], raw, base);
        END IF;
        IF array_length(bounds, 1) = 1 THEN
          bounds := ARRAY[bounds[1], CASE WHEN position('/' IN item) > 0 THEN highs[i] ELSE bounds[1] END];
        END IF;
      END IF;
      IF i = 3 THEN
        dom_values := dom_values || ARRAY(SELECT generate_series(bounds[1], bounds[2], step));
      ELSIF i = 4 THEN
        month_values := month_values || ARRAY(SELECT generate_series(bounds[1], bounds[2], step));
      END IF;
    END LOOP;
  END LOOP;
  -- Either day field may match when both are restricted; otherwise the day of month must
  -- exist in one of the months (February has a 29th in leap years).
  IF NOT (fields[3] NOT LIKE '*%' AND fields[5] NOT LIKE '*%')
     AND NOT EXISTS (SELECT 1 FROM unnest(month_values) m, unnest(dom_values) d WHERE d <= month_days[m]) THEN
    RETURN format('cron "%s" never fires: none of its months has the day of month it asks for', expr);
  END IF;
  RETURN NULL;
END
$$;

-- The timezone and the schedule are checked when they are written, not on every update of
-- the row: a row whose zone later vanished from tzdata, or whose cron an older check let
-- through, can still be finished, disabled and rescued (same constraint names and messages).
ALTER TABLE syncworker.integrations DROP CONSTRAINT integrations_timezone_known;
ALTER TABLE syncworker.integrations DROP CONSTRAINT integrations_schedule_valid;

-- Rows the new cron rule refuses are disabled, saying why; the expression stays.
UPDATE syncworker.integrations
   SET enabled = false, disabled_reason = 'invalid configuration: ' || syncworker.cron_error(cron)
 WHERE enabled AND cron IS NOT NULL AND syncworker.cron_error(cron) IS NOT NULL;

-- Infinite due times could never be written through the wake-up trigger, and times beyond
-- the year 9999 cannot be read by the worker; keep none.
UPDATE syncworker.integrations
   SET next_sync_at = CASE WHEN next_sync_at < now() THEN now() END,
       scheduled_sync_at = NULL
 WHERE NOT isfinite(next_sync_at) OR NOT isfinite(scheduled_sync_at)
    OR next_sync_at NOT BETWEEN '0001-01-02 00:00:00+00' AND '9999-12-30 00:00:00+00'
    OR scheduled_sync_at NOT BETWEEN '0001-01-02 00:00:00+00' AND '9999-12-30 00:00:00+00';

-- An infinite next_sync_at cannot be scheduled, and the wake-up trigger could not subtract it:
-- refuse it with a message that says what to do instead.  Names are for people and for
-- NOTIFY payloads (at most 8000 bytes): at most 200 characters, checked when a name is
-- written, so that a longer name from before keeps working.
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
  -- Re-enabling a job clears why it was disabled and gives it a fresh retry budget.
  IF TG_OP = 'UPDATE' AND NEW.enabled AND NOT OLD.enabled THEN
    NEW.disabled_reason := NULL;
    NEW.retry_count := 0;
  END IF;
  RETURN NEW;
END
$$;

-- max_retries is now the number of retries after the first failure (0 = never retry):
-- a job is disabled after max_retries + 1 failures in a row.  Existing rows keep what they
-- did (max_retries = 3 used to disable on the third failure, i.e. two retries).
ALTER TABLE syncworker.integrations DROP CONSTRAINT integrations_max_retries_positive;
UPDATE syncworker.integrations SET max_retries = max_retries - 1;
ALTER TABLE syncworker.integrations
  ADD CONSTRAINT integrations_max_retries_not_negative CHECK (max_retries >= 0);
COMMENT ON COLUMN syncworker.integrations.max_retries IS
  'retries after the first failure (0 = never retry); disabled after max_retries + 1 failures in a row';

-- When the rescuer first saw a live worker without its liveness lock; cleared when the lock
-- is back.  A worker lost for long enough has its sessions terminated.
ALTER TABLE syncworker.workers ADD COLUMN lost_at timestamptz;

-- Advisory locks are per database: only this database's count.
CREATE OR REPLACE FUNCTION syncworker.lock_held(kind text, key2 bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = syncworker.lock_key(kind)::oid AND objid = key2::oid
  )
$$;

-- `overrunning`: the live run has taken more than 80 % of the job's interval or timeout.
CREATE OR REPLACE VIEW syncworker.status AS
SELECT
  i.id,
  i.name,
  i.kind,
  i.enabled,
  CASE WHEN i.interval_seconds IS NOT NULL THEN format('every %ss', i.interval_seconds)
       WHEN i.cron IS NOT NULL THEN format('cron "%s" %s', i.cron, i.timezone)
       ELSE 'manual' END AS schedule,
  i.running_run_id IS NOT NULL AS running,
  r.started_at AS running_since,
  i.last_status,
  i.last_sync_at,
  i.last_success_at,
  i.next_sync_at,
  i.retry_count,
  s.runs_24h,
  s.success_rate_24h,
  s.mean_duration_ms_24h,
  coalesce(e.unresolved_errors, 0) AS unresolved_errors,
  i.last_error,
  i.disabled_reason,
  CASE
    WHEN NOT i.enabled THEN 'disabled'
    WHEN i.retry_count > 0 THEN 'failing'
    WHEN r.started_at < now() - make_interval(
           secs => 0.8 * least(i.timeout_seconds, coalesce(i.interval_seconds, i.timeout_seconds)))
      THEN 'overrunning'
    WHEN i.running_run_id IS NULL AND i.next_sync_at < now() - interval '5 minutes' THEN 'late'
    WHEN i.last_status = 'partial' THEN 'degraded'
    WHEN i.last_status IS NULL THEN 'pending'
    ELSE 'ok'
  END AS health
FROM syncworker.integrations i
LEFT JOIN syncworker.sync_runs r ON r.id = i.running_run_id
LEFT JOIN LATERAL (
  SELECT count(*) AS runs_24h,
         round(avg(CASE WHEN x.status = 'success' THEN 1.0 ELSE 0.0 END), 3) AS success_rate_24h,
         round(avg(x.duration_ms)) AS mean_duration_ms_24h
  FROM syncworker.sync_runs x
  WHERE x.integration_id = i.id AND x.status <> 'running'
    AND x.started_at > now() - interval '24 hours'
) s ON true
LEFT JOIN LATERAL (
  SELECT count(*) AS unresolved_errors FROM syncworker.sync_errors y
  WHERE y.integration_id = i.id AND NOT y.resolved
) e ON true;

-- Handing a job back never fails the caller (the rescuer abandons many runs in one
-- statement): if the job's row cannot be updated, the run is still closed and the
-- problem is recorded against the job.
CREATE OR REPLACE FUNCTION syncworker.abandon_run(target_run_id bigint, reason text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  run syncworker.sync_runs;
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
  BEGIN
    UPDATE syncworker.integrations
       SET running_run_id = NULL,
           pending_trigger = coalesce(pending_trigger, 'rescue'),
           scheduled_sync_at = coalesce(scheduled_sync_at, run.scheduled_for),
           next_sync_at = now(),
           last_status = 'abandoned',
           last_sync_at = run.finished_at,
           last_error = reason
     WHERE id = run.integration_id AND running_run_id = run.id;
  EXCEPTION WHEN OTHERS THEN
    INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message)
    VALUES (run.integration_id, run.id, 'internal',
            'the job could not be handed back after its run was abandoned: ' || SQLERRM);
  END;
  INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message)
  VALUES (run.integration_id, run.id, 'abandoned', reason);
  RETURN run.integration_id;
END
$$;

-- A real-time job added, changed, enabled or disabled: the leader reloads its sources now.
CREATE FUNCTION syncworker.notify_realtime_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('syncworker', '{"realtime_jobs": true}');
  RETURN NULL;
END
$$;
CREATE TRIGGER integrations_realtime_insert AFTER INSERT ON syncworker.integrations
  FOR EACH ROW WHEN (NEW.config @> '{"realtime": true}')
  EXECUTE FUNCTION syncworker.notify_realtime_jobs();
CREATE TRIGGER integrations_realtime_update AFTER UPDATE OF config, enabled ON syncworker.integrations
  FOR EACH ROW WHEN ((NEW.config @> '{"realtime": true}' OR OLD.config @> '{"realtime": true}')
                     AND (NEW.config IS DISTINCT FROM OLD.config OR NEW.enabled IS DISTINCT FROM OLD.enabled))
  EXECUTE FUNCTION syncworker.notify_realtime_jobs();

-- The rescuer ends sessions of lost workers and of runs past their timeout.  A session it may
-- not signal (another role's, a superuser's) is left alone rather than failing the rescue.
CREATE FUNCTION syncworker.terminate_session(target_pid integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  RETURN pg_terminate_backend(target_pid);
EXCEPTION WHEN insufficient_privilege THEN
  RETURN false;
END
$$;

-- A fence has a SQLSTATE of its own (SWF01), so that a real serialization failure is never
-- mistaken for one.
CREATE OR REPLACE FUNCTION syncworker.fenced(run_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RAISE EXCEPTION 'run % is no longer the live run of its integration; nothing of it is committed', run_id
    USING ERRCODE = 'SWF01';
END
$$;
