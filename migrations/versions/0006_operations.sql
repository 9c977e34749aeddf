-- syncworker schema, version 0006: operating it.  Pausing a job (`paused_at`), the `paused`
-- and `stale` health words (`stale_after_seconds`), the functions behind the operator
-- commands (pause, resume, enable, disable, resolve), and the alert incidents the leader
-- delivers (`syncworker.alerts`).

-- Set by syncworker.pause_job(); a paused job is a disabled one (enabled = false: never
-- claimed) whose schedule is kept.  Cleared when the job is enabled again.
ALTER TABLE syncworker.integrations ADD COLUMN paused_at timestamptz;
-- No success for longer than this makes the job `stale`.  NULL: three times its period (see
-- syncworker.stale_after); a job with no schedule is never stale unless this is set.
ALTER TABLE syncworker.integrations ADD COLUMN stale_after_seconds integer;
ALTER TABLE syncworker.integrations
  ADD CONSTRAINT integrations_stale_after_positive CHECK (stale_after_seconds > 0);

-- Keep paused_at meaning "paused by an operator": it goes when the job is enabled again, and
-- when something else (the worker, retries exhausted) gives the disabled job another reason.
-- (A trigger of its own, after integrations_before_write: triggers fire in name order.)
CREATE FUNCTION syncworker.integrations_paused() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.enabled THEN
    NEW.paused_at := NULL;
  ELSIF TG_OP = 'UPDATE' AND NEW.disabled_reason IS DISTINCT FROM OLD.disabled_reason
        AND NEW.paused_at IS NOT DISTINCT FROM OLD.paused_at THEN
    NEW.paused_at := NULL;
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER integrations_paused BEFORE INSERT OR UPDATE ON syncworker.integrations
  FOR EACH ROW EXECUTE FUNCTION syncworker.integrations_paused();

-- The period after which a job without a success is `stale` (NULL: never), in seconds:
-- stale_after_seconds, else three times the job's period.  For cron the period is read from the
-- coarsest field that is restricted: minute only = an hour, hour = a day, weekday = a week,
-- day of month = 31 days, month = 366 days (the macros likewise).
CREATE FUNCTION syncworker.stale_after(stale_after_seconds integer, interval_seconds integer, cron text)
RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
  SELECT coalesce(stale_after_seconds::bigint, 3 * coalesce(interval_seconds::bigint, (
    SELECT CASE WHEN cardinality(f) = 1 THEN
                  CASE lower(f[1]) WHEN '@hourly' THEN 3600 WHEN '@daily' THEN 86400
                                   WHEN '@midnight' THEN 86400 WHEN '@weekly' THEN 604800
                                   WHEN '@monthly' THEN 2678400 ELSE 31622400 END
                WHEN f[4] <> '*' THEN 31622400
                WHEN f[3] <> '*' THEN 2678400
                WHEN f[5] <> '*' THEN 604800
                WHEN f[2] <> '*' THEN 86400
                WHEN f[1] <> '*' THEN 3600
                ELSE 60 END
      FROM regexp_split_to_array(btrim(cron), '\s+') AS f
     WHERE cron IS NOT NULL)))
$$;

-- Health words, worst first: disabled, paused, failing, stale, overrunning, late, degraded,
-- pending, ok.  The columns of 0005 keep their order; new ones come at the end.
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
    WHEN NOT i.enabled AND i.paused_at IS NOT NULL THEN 'paused'
    WHEN NOT i.enabled THEN 'disabled'
    WHEN i.retry_count > 0 THEN 'failing'
    WHEN coalesce(i.last_success_at, i.created_at) < now() - make_interval(secs => st.stale_after)
      THEN 'stale'
    WHEN r.started_at < now() - make_interval(
           secs => 0.8 * least(i.timeout_seconds, coalesce(i.interval_seconds, i.timeout_seconds)))
      THEN 'overrunning'
    WHEN i.running_run_id IS NULL AND i.next_sync_at < now() - interval '5 minutes' THEN 'late'
    WHEN i.last_status = 'partial' THEN 'degraded'
    WHEN i.last_status IS NULL THEN 'pending'
    ELSE 'ok'
  END AS health,
  i.paused_at,
  st.stale_after AS stale_after_seconds,
  l.duration_ms AS last_duration_ms,
  i.timeout_seconds
FROM syncworker.integrations i
CROSS JOIN LATERAL (
  SELECT syncworker.stale_after(i.stale_after_seconds, i.interval_seconds, i.cron) AS stale_after
) st
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
) e ON true
LEFT JOIN LATERAL (
  SELECT z.duration_ms FROM syncworker.sync_runs z
  WHERE z.integration_id = i.id AND z.status <> 'running'
  ORDER BY z.started_at DESC LIMIT 1
) l ON true;

-- One job by name, locked for an operator's change; a readable error when there is none.
CREATE FUNCTION syncworker.job_for_update(integration_name text) RETURNS syncworker.integrations
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
  RETURN job;
END
$$;

-- Stop a job's runs and keep its schedule: it is not claimed until resume_job (or
-- enable_job).  A run in progress finishes.  Health `paused`.
CREATE FUNCTION syncworker.pause_job(integration_name text, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  job syncworker.integrations := syncworker.job_for_update(integration_name);
BEGIN
  IF NOT job.enabled AND job.paused_at IS NOT NULL THEN
    RETURN 'already paused';
  END IF;
  IF NOT job.enabled THEN
    RAISE EXCEPTION 'integration "%" is disabled%, not running: nothing to pause', integration_name,
      coalesce(' (' || job.disabled_reason || ')', '')
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = format('Enable it with SELECT syncworker.enable_job(%L);', integration_name);
  END IF;
  UPDATE syncworker.integrations
     SET enabled = false, paused_at = now(),
         disabled_reason = 'paused' || coalesce(': ' || nullif(btrim(reason), ''), '')
   WHERE id = job.id;
  RETURN CASE WHEN job.running_run_id IS NULL THEN 'paused'
              ELSE 'paused; the run in progress finishes' END;
END
$$;

-- Undo pause_job: the job runs on its schedule again (a slot missed while paused runs once,
-- at once), with a fresh retry budget.
CREATE FUNCTION syncworker.resume_job(integration_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  job syncworker.integrations := syncworker.job_for_update(integration_name);
BEGIN
  IF job.enabled THEN
    RETURN 'not paused';
  END IF;
  IF job.paused_at IS NULL THEN
    RAISE EXCEPTION 'integration "%" is disabled%, not paused', integration_name,
      coalesce(' (' || job.disabled_reason || ')', '')
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = format('Fix the cause, then enable it: SELECT syncworker.enable_job(%L);', integration_name);
  END IF;
  UPDATE syncworker.integrations SET enabled = true WHERE id = job.id;
  RETURN 'resumed';
END
$$;

-- Enable a disabled or paused job (clears disabled_reason and retry_count; the schedule goes on).
CREATE FUNCTION syncworker.enable_job(integration_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  job syncworker.integrations := syncworker.job_for_update(integration_name);
BEGIN
  IF job.enabled THEN
    RETURN 'already enabled';
  END IF;
  UPDATE syncworker.integrations SET enabled = true WHERE id = job.id;
  RETURN 'enabled';
END
$$;

-- Disable a job, saying why (health `disabled`; a run in progress finishes).
CREATE FUNCTION syncworker.disable_job(integration_name text, reason text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  job syncworker.integrations := syncworker.job_for_update(integration_name);
BEGIN
  IF nullif(btrim(reason), '') IS NULL THEN
    RAISE EXCEPTION 'disabling "%" needs a reason', integration_name
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Say why, for whoever finds it disabled: syncworker.disable_job(name, ''reason'').';
  END IF;
  UPDATE syncworker.integrations
     SET enabled = false, paused_at = NULL, disabled_reason = left(btrim(reason), 1000)
   WHERE id = job.id;
  RETURN CASE WHEN NOT job.enabled AND job.paused_at IS NULL THEN 'already disabled; reason updated'
              WHEN job.running_run_id IS NOT NULL THEN 'disabled; the run in progress finishes'
              ELSE 'disabled' END;
END
$$;

-- Mark a job's unresolved errors (of one type, or all) resolved; returns how many.
CREATE FUNCTION syncworker.resolve_errors(integration_name text, only_type text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  job syncworker.integrations;
  n bigint;
BEGIN
  SELECT * INTO job FROM syncworker.integrations WHERE name = integration_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no integration named "%"', integration_name
      USING ERRCODE = 'no_data_found',
            HINT = 'SELECT name FROM syncworker.integrations lists the names.';
  END IF;
  UPDATE syncworker.sync_errors SET resolved = true
   WHERE integration_id = job.id AND NOT resolved AND (only_type IS NULL OR error_type = only_type);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Alert incidents the leader delivers: one row per incident (a job disabled, failing, stale
-- or overrunning; a rescued run), opened when the condition starts and closed when it ends;
-- the notification and the recovery message are each sent once.
CREATE TABLE syncworker.alerts (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  kind             text NOT NULL,
  integration_id   bigint NOT NULL REFERENCES syncworker.integrations (id) ON DELETE CASCADE,
  run_id           bigint,
  summary          text NOT NULL,
  opened_at        timestamptz NOT NULL DEFAULT now(),
  closed_at        timestamptz,
  sent_at          timestamptz,
  recovery_sent_at timestamptz,
  attempts         integer NOT NULL DEFAULT 0,
  last_error       text,
  CONSTRAINT alerts_kind_known CHECK (kind IN ('disabled', 'failing', 'stale', 'overrunning', 'rescued'))
);
CREATE UNIQUE INDEX alerts_open_idx ON syncworker.alerts (integration_id, kind)
  WHERE closed_at IS NULL AND kind <> 'rescued';
CREATE UNIQUE INDEX alerts_rescued_idx ON syncworker.alerts (run_id) WHERE kind = 'rescued';
CREATE INDEX alerts_pending_idx ON syncworker.alerts (opened_at)
  WHERE sent_at IS NULL OR (closed_at IS NOT NULL AND recovery_sent_at IS NULL);
