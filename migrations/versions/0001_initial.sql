-- syncworker schema, version 0001: jobs, runs, errors, workers, and the SQL surface.

CREATE SCHEMA IF NOT EXISTS syncworker;

-- Advisory lock keys live here and nowhere else: (namespace, id) pairs.
--   1398230785 'SW\x00\x01' integration runs, key2 = integration id
--   1398230786 'SW\x00\x02' worker liveness, key2 = worker id
--   1398230787 'SW\x00\x03' leadership, key2 = 0
CREATE FUNCTION syncworker.lock_key(kind text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE kind WHEN 'integration' THEN 1398230785
                   WHEN 'worker' THEN 1398230786
                   WHEN 'leader' THEN 1398230787 END
$$;

CREATE FUNCTION syncworker.lock_held(kind text, key2 bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND classid = syncworker.lock_key(kind)::oid AND objid = key2::oid
  )
$$;

-- Zone names known to Postgres (the same tzdata Python's zoneinfo reads).
-- pg_timezone_names is slow to scan, so validation looks here first.
CREATE TABLE syncworker.timezone_names (name text PRIMARY KEY);
INSERT INTO syncworker.timezone_names SELECT DISTINCT name FROM pg_timezone_names;

CREATE FUNCTION syncworker.check_timezone(tz text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM syncworker.timezone_names WHERE name = tz)
     OR EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = tz) THEN
    RETURN true;
  END IF;
  RAISE EXCEPTION 'unknown timezone "%"', tz
    USING ERRCODE = 'check_violation', CONSTRAINT = 'integrations_timezone_known',
          HINT = 'Use an IANA zone name such as UTC, Europe/Berlin or America/New_York (names are case-sensitive).';
END
$$;

CREATE FUNCTION syncworker.check_schedule(interval_seconds integer, cron text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  problem text;
BEGIN
  IF interval_seconds IS NOT NULL AND cron IS NOT NULL THEN
    RAISE EXCEPTION 'an integration has either interval_seconds or cron, not both (got interval_seconds=% and cron "%")', interval_seconds, cron
      USING ERRCODE = 'check_violation', CONSTRAINT = 'integrations_one_schedule',
            HINT = 'Set the other one to NULL in the same statement.';
  END IF;
  IF interval_seconds IS NOT NULL AND interval_seconds <= 0 THEN
    RAISE EXCEPTION 'interval_seconds must be a positive number of seconds, got %', interval_seconds
      USING ERRCODE = 'check_violation', CONSTRAINT = 'integrations_interval_positive';
  END IF;
  IF cron IS NOT NULL THEN
    problem := syncworker.cron_error(cron);
    IF problem IS NOT NULL THEN
      RAISE EXCEPTION '%', problem
        USING ERRCODE = 'check_violation', CONSTRAINT = 'integrations_cron_valid',
              HINT = 'Five fields: minute hour day-of-month month day-of-week, e.g. "0 3 * * *" for 03:00 daily.';
    END IF;
  END IF;
  RETURN true;
END
$$;

CREATE TABLE syncworker.workers (
  id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  hostname     text NOT NULL,
  pid          integer NOT NULL,
  version      text NOT NULL,
  mode         text NOT NULL DEFAULT 'active',
  concurrency  integer NOT NULL DEFAULT 4,
  started_at   timestamptz NOT NULL DEFAULT now(),
  heartbeat_at timestamptz NOT NULL DEFAULT now(),
  leader       boolean NOT NULL DEFAULT false,
  running      integer NOT NULL DEFAULT 0,
  stopped_at   timestamptz
);

CREATE TABLE syncworker.integrations (
  id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name                  text NOT NULL,
  kind                  text NOT NULL,
  config                jsonb NOT NULL DEFAULT '{}',
  enabled               boolean NOT NULL DEFAULT true,
  interval_seconds      integer,
  cron                  text,
  timezone              text NOT NULL DEFAULT 'UTC',
  next_sync_at          timestamptz DEFAULT now(),
  max_retries           integer NOT NULL DEFAULT 3,
  retry_backoff_seconds integer NOT NULL DEFAULT 60,
  timeout_seconds       integer NOT NULL DEFAULT 3600,
  retry_count           integer NOT NULL DEFAULT 0,
  state                 jsonb NOT NULL DEFAULT '{}',
  last_sync_at          timestamptz,
  last_success_at       timestamptz,
  last_status           text,
  last_error            text,
  disabled_reason       text,
  created_at            timestamptz NOT NULL DEFAULT now(),
  updated_at            timestamptz NOT NULL DEFAULT now(),
  -- Worker bookkeeping (not for operators to write):
  running_run_id        bigint,       -- the live run; NULL when idle
  pending_trigger       text,         -- a trigger that arrived for the next run: manual | realtime | rescue
  scheduled_sync_at     timestamptz,  -- the schedule's own slot while next_sync_at is moved by a trigger or a retry
  CONSTRAINT integrations_name_unique UNIQUE (name),
  CONSTRAINT integrations_name_not_blank CHECK (btrim(name) <> ''),
  CONSTRAINT integrations_kind_not_blank CHECK (btrim(kind) <> ''),
  CONSTRAINT integrations_config_is_object CHECK (jsonb_typeof(config) = 'object'),
  CONSTRAINT integrations_state_is_object CHECK (jsonb_typeof(state) = 'object'),
  CONSTRAINT integrations_timezone_known CHECK (syncworker.check_timezone(timezone)),
  CONSTRAINT integrations_schedule_valid CHECK (syncworker.check_schedule(interval_seconds, cron)),
  CONSTRAINT integrations_max_retries_positive CHECK (max_retries >= 1),
  CONSTRAINT integrations_retry_backoff_positive CHECK (retry_backoff_seconds >= 1),
  CONSTRAINT integrations_timeout_positive CHECK (timeout_seconds >= 1),
  CONSTRAINT integrations_retry_count_not_negative CHECK (retry_count >= 0),
  CONSTRAINT integrations_pending_trigger_known CHECK (pending_trigger IN ('manual', 'realtime', 'rescue'))
);

-- Matches the claim query: due, enabled, idle rows in next_sync_at order.
CREATE INDEX integrations_due_idx ON syncworker.integrations (next_sync_at, id)
  WHERE enabled AND running_run_id IS NULL AND next_sync_at IS NOT NULL;

CREATE TABLE syncworker.sync_runs (
  id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  integration_id    bigint NOT NULL REFERENCES syncworker.integrations (id) ON DELETE CASCADE,
  status            text NOT NULL DEFAULT 'running',
  trigger           text NOT NULL DEFAULT 'schedule',
  attempt           integer NOT NULL DEFAULT 1,
  worker_id         bigint REFERENCES syncworker.workers (id) ON DELETE SET NULL,
  scheduled_for     timestamptz,
  started_at        timestamptz NOT NULL DEFAULT now(),
  locked_at         timestamptz,  -- when the run's session took the integration lock
  finished_at       timestamptz,
  duration_ms       bigint,
  records_processed bigint NOT NULL DEFAULT 0,
  records_failed    bigint NOT NULL DEFAULT 0,
  records_inserted  bigint NOT NULL DEFAULT 0,
  records_updated   bigint NOT NULL DEFAULT 0,
  records_deleted   bigint NOT NULL DEFAULT 0,
  error_type        text,
  error             text,
  CONSTRAINT sync_runs_status_known
    CHECK (status IN ('running', 'success', 'partial', 'failed', 'abandoned')),
  CONSTRAINT sync_runs_trigger_known
    CHECK (trigger IN ('schedule', 'manual', 'retry', 'realtime', 'rescue')),
  CONSTRAINT sync_runs_finished_iff_not_running
    CHECK ((status = 'running') = (finished_at IS NULL))
);
CREATE INDEX sync_runs_integration_idx ON syncworker.sync_runs (integration_id, started_at DESC);
CREATE INDEX sync_runs_running_idx ON syncworker.sync_runs (integration_id) WHERE status = 'running';
CREATE INDEX sync_runs_finished_idx ON syncworker.sync_runs (finished_at);

ALTER TABLE syncworker.integrations
  ADD CONSTRAINT integrations_running_run_fk FOREIGN KEY (running_run_id)
  REFERENCES syncworker.sync_runs (id) ON DELETE SET NULL;

CREATE TABLE syncworker.sync_errors (
  id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  integration_id bigint NOT NULL REFERENCES syncworker.integrations (id) ON DELETE CASCADE,
  run_id         bigint REFERENCES syncworker.sync_runs (id) ON DELETE SET NULL,
  created_at     timestamptz NOT NULL DEFAULT now(),
  error_type     text NOT NULL,
  message        text NOT NULL,
  detail         text,
  record_key     text,
  context        jsonb NOT NULL DEFAULT '{}',
  resolved       boolean NOT NULL DEFAULT false
);
CREATE INDEX sync_errors_unresolved_idx ON syncworker.sync_errors (integration_id, created_at DESC)
  WHERE NOT resolved;
CREATE INDEX sync_errors_run_idx ON syncworker.sync_errors (run_id);
CREATE INDEX sync_errors_created_idx ON syncworker.sync_errors (created_at);

-- Keep updated_at honest and give a scheduled row with no next_sync_at a first slot.
CREATE FUNCTION syncworker.integrations_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
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
CREATE TRIGGER integrations_before_write BEFORE INSERT OR UPDATE ON syncworker.integrations
  FOR EACH ROW EXECUTE FUNCTION syncworker.integrations_before_write();

-- Wake the workers: the payload says in how many seconds the row is due,
-- measured on the database clock so that host clock skew does not matter.
CREATE FUNCTION syncworker.notify_due_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  due timestamptz;
BEGIN
  SELECT min(next_sync_at) INTO due FROM new_rows
  WHERE enabled AND running_run_id IS NULL AND next_sync_at IS NOT NULL;
  IF due IS NOT NULL THEN
    PERFORM pg_notify('syncworker', json_build_object(
      'due_in', round(extract(epoch FROM due - clock_timestamp())::numeric, 3))::text);
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER integrations_notify_insert AFTER INSERT ON syncworker.integrations
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION syncworker.notify_due_rows();

CREATE FUNCTION syncworker.notify_due_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('syncworker', json_build_object(
    'due_in', round(extract(epoch FROM NEW.next_sync_at - clock_timestamp())::numeric, 3))::text);
  RETURN NULL;
END
$$;
CREATE TRIGGER integrations_notify_update AFTER UPDATE ON syncworker.integrations
  FOR EACH ROW
  WHEN (NEW.enabled AND NEW.running_run_id IS NULL AND NEW.next_sync_at IS NOT NULL
        AND (OLD.next_sync_at IS DISTINCT FROM NEW.next_sync_at
             OR NOT OLD.enabled OR OLD.running_run_id IS NOT NULL))
  EXECUTE FUNCTION syncworker.notify_due_row();

-- Tell the leader that runs exist, so it watches them for abandonment.
CREATE FUNCTION syncworker.notify_runs_started() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows) THEN
    PERFORM pg_notify('syncworker', '{"runs_started": true}');
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER sync_runs_notify_insert AFTER INSERT ON syncworker.sync_runs
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION syncworker.notify_runs_started();

-- Ask for a run of an enabled job as soon as possible, for `reason` (manual or realtime).
-- Idle: due now, keeping the schedule's own slot aside.  Running: remembered, so that the
-- run's end starts exactly one follow-up run.  Returns false for a disabled or missing job.
CREATE FUNCTION syncworker.request_run(target_id bigint, reason text) RETURNS boolean
LANGUAGE sql AS $$
  UPDATE syncworker.integrations
     SET pending_trigger = CASE WHEN pending_trigger = 'manual' THEN 'manual' ELSE reason END,
         scheduled_sync_at = CASE WHEN running_run_id IS NULL
                                  THEN coalesce(scheduled_sync_at, next_sync_at) ELSE scheduled_sync_at END,
         next_sync_at = CASE WHEN running_run_id IS NULL
                             THEN least(coalesce(next_sync_at, now()), now()) ELSE next_sync_at END
   WHERE id = target_id AND enabled
  RETURNING true
$$;

-- Run a job now, by name, with errors a person can act on.
CREATE FUNCTION syncworker.trigger_sync(integration_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  job syncworker.integrations;
BEGIN
  SELECT * INTO job FROM syncworker.integrations WHERE name = integration_name FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no integration named "%"', integration_name
      USING ERRCODE = 'no_data_found',
            HINT = 'SELECT name FROM syncworker.integrations lists the names.';
  END IF;
  IF NOT job.enabled THEN
    RAISE EXCEPTION 'integration "%" is disabled%', integration_name,
      coalesce(' (' || job.disabled_reason || ')', '')
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = format('Re-enable it first: UPDATE syncworker.integrations SET enabled = true WHERE name = %L;', integration_name);
  END IF;
  PERFORM syncworker.request_run(job.id, 'manual');
  RETURN CASE WHEN job.running_run_id IS NULL THEN 'queued' ELSE 'running now; one more run will follow' END;
END
$$;

CREATE VIEW syncworker.status AS
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

-- Raised by the worker's final statement when its run is no longer the live run.
CREATE FUNCTION syncworker.fenced(run_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RAISE EXCEPTION 'run % is no longer the live run of its integration; nothing of it is committed', run_id
    USING ERRCODE = 'serialization_failure';
END
$$;

-- Give up on a run whose session is gone (or that the worker is abandoning on
-- shutdown) and hand the job back for an immediate rerun elsewhere.  Returns the
-- integration id, or NULL when the run had already finished.
CREATE FUNCTION syncworker.abandon_run(target_run_id bigint, reason text) RETURNS bigint
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
  UPDATE syncworker.integrations
     SET running_run_id = NULL,
         pending_trigger = coalesce(pending_trigger, 'rescue'),
         scheduled_sync_at = coalesce(scheduled_sync_at, run.scheduled_for),
         next_sync_at = now(),
         last_status = 'abandoned',
         last_sync_at = run.finished_at,
         last_error = reason
   WHERE id = run.integration_id AND running_run_id = run.id;
  INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message)
  VALUES (run.integration_id, run.id, 'abandoned', reason);
  RETURN run.integration_id;
END
$$;
