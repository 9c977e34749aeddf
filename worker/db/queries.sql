-- Every statement the worker and the CLI run, each under a name.
-- A block starts with "-- name: <name>" and a one-line comment saying what it does.

-- name: environment_server
-- Start-up and `check`: the server, whether it takes writes, and who this session is.
SELECT current_setting('server_version_num')::int, current_setting('server_version'),
       pg_is_in_recovery(), current_setting('transaction_read_only') = 'on',
       current_setting('is_superuser') = 'on', current_user::text, pg_backend_pid();

-- name: environment_timeouts
-- Start-up and `check`: server-side timeouts a session gets by default (server, database, role).
SELECT name, current_setting(name), source FROM pg_settings
 WHERE name = ANY(%(names)s) AND setting <> '0' AND source <> 'default';

-- name: environment_settings
-- Start-up and `check`: the values of settings in this session, by name.
SELECT n, current_setting(n) FROM unnest(%(names)s::text[]) n;

-- name: environment_mark
-- Start-up and `check`: a session setting that must still be there in the next transaction.
SELECT set_config('syncworker.probe', %(token)s, false);

-- name: environment_backend
-- Start-up and `check`: which server session answers, and whether it kept the mark.
SELECT pg_backend_pid(), current_setting('syncworker.probe', true);

-- name: register_worker
-- A new replica announces itself; its session then holds the worker lock.
INSERT INTO syncworker.workers (hostname, pid, version, mode, concurrency)
VALUES (%(hostname)s, %(pid)s, %(version)s, %(mode)s, %(concurrency)s)
RETURNING id;

-- name: lock_worker
-- Held for the life of the listener session: "this worker is alive".
SELECT pg_advisory_lock(syncworker.lock_key('worker'), %(worker_id)s);

-- name: heartbeat
-- Periodic proof of life, with what the replica is doing.  A leader also clears the flag of
-- any other replica that still claims to lead (a frozen one that lost its session).
WITH others AS (
  UPDATE syncworker.workers SET leader = false
   WHERE %(leader)s AND leader AND id <> %(worker_id)s
)
UPDATE syncworker.workers
   SET heartbeat_at = now(), running = %(running)s, leader = %(leader)s, stopped_at = NULL
 WHERE id = %(worker_id)s;

-- name: stop_worker
-- A clean exit.
UPDATE syncworker.workers SET stopped_at = now(), leader = false, running = 0
 WHERE id = %(worker_id)s;

-- name: try_leadership
-- A standby's look (every few seconds): take the leader lock if no one holds it.  No standby
-- waits inside a statement: a statement that waits holds a snapshot, and a snapshot keeps
-- every row version deleted after it from being cleaned up (claims would walk past them all).
SELECT pg_try_advisory_lock(syncworker.lock_key('leader'), 0);

-- name: stay_leader
-- The leader's proof of life, in the transaction its session keeps open, a statement that
-- takes no snapshot: the server ends a session idle in its transaction for longer than its
-- idle_in_transaction_session_timeout, so a frozen leader is replaced.
SET LOCAL syncworker.leader_alive = on;

-- name: claim
-- (config and state come back as text, parsed job by job: a row Python cannot read, say
-- nested thousands deep, fails alone instead of failing the claim of every job with it.)
-- Take up to %(limit)s due jobs and open a run for each, in one statement.  The first
-- %(locks)s of them (a run session claiming what it runs next: 1) also get their integration
-- lock, taken by this session, and locked_at: that session runs it now.  The others wait for
-- their session to take the lock when it starts them (begin_run).  It may run inside a
-- finishing run's transaction, so it reads the clock itself rather than now() (the
-- transaction's start).  With %(announce)s (the worker has no other run going) it wakes every
-- replica's rescuer with a NOTIFY that is delivered if and only if the claim commits.
WITH due AS MATERIALIZED (
  SELECT id, retry_count, pending_trigger, coalesce(scheduled_sync_at, next_sync_at) AS slot,
         next_sync_at
    FROM syncworker.integrations
   WHERE enabled AND running_run_id IS NULL AND next_sync_at <= statement_timestamp()
   ORDER BY next_sync_at, id
   LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED
), ranked AS (
  SELECT due.*, row_number() OVER (ORDER BY next_sync_at, id) <= %(locks)s AS locked FROM due
), runs AS (
  INSERT INTO syncworker.sync_runs
    (integration_id, trigger, attempt, worker_id, scheduled_for, started_at, locked_at)
  SELECT id, coalesce(pending_trigger, CASE WHEN retry_count > 0 THEN 'retry' ELSE 'schedule' END),
         retry_count + 1, %(worker_id)s, slot, clock_timestamp(),
         CASE WHEN locked THEN clock_timestamp() END
    FROM ranked, LATERAL (SELECT CASE WHEN locked THEN
                            pg_advisory_lock(syncworker.lock_key('integration'), ranked.id::integer) END) AS l
   ORDER BY next_sync_at, id
  RETURNING id, integration_id, trigger, attempt, scheduled_for, locked_at
), announced AS (
  SELECT count(pg_notify('syncworker', '{"runs_started": true}')) AS n
   WHERE %(announce)s AND EXISTS (SELECT 1 FROM runs)
)
UPDATE syncworker.integrations i
   SET running_run_id = runs.id, pending_trigger = NULL, scheduled_sync_at = NULL
  FROM runs, announced
 WHERE i.id = runs.integration_id
RETURNING i.id, i.name, i.kind, i.config::text AS config, i.state::text AS state,
          i.interval_seconds, i.cron, i.timezone,
          i.max_retries, i.retry_backoff_seconds, i.timeout_seconds, i.retry_count,
          runs.id AS run_id, runs.trigger, runs.attempt, runs.scheduled_for, runs.locked_at;

-- name: next_due_in
-- Seconds until the earliest idle job is due, on the database clock (NULL: nothing scheduled).
SELECT extract(epoch FROM min(next_sync_at) - clock_timestamp())::float8
  FROM syncworker.integrations
 WHERE enabled AND running_run_id IS NULL AND next_sync_at IS NOT NULL;

-- name: begin_run
-- Take the integration lock on the run's own session and mark the run as locked (by itself,
-- or inside the transaction that ends the session's previous run).
-- No row back means the run was abandoned meanwhile: release the lock and drop it.
UPDATE syncworker.sync_runs
   SET locked_at = clock_timestamp()
  FROM (SELECT pg_advisory_lock(syncworker.lock_key('integration'), %(integration_id)s)) AS l
 WHERE id = %(run_id)s AND status = 'running'
RETURNING clock_timestamp() AS db_now;

-- name: release_unstarted
-- Runs a session claimed and never started (it stops claiming, or lost its session), given
-- back as if never claimed: their rows go, and their jobs are due as they were, with the
-- trigger and the slot that were claimed.  A run that started (locked_at) is not touched.
WITH run AS (
  DELETE FROM syncworker.sync_runs
   WHERE id = ANY(%(run_ids)s::bigint[]) AND status = 'running' AND locked_at IS NULL
  RETURNING id, integration_id, trigger, scheduled_for
)
UPDATE syncworker.integrations i
   SET running_run_id = NULL,
       pending_trigger = coalesce(i.pending_trigger, CASE WHEN run.trigger IN ('manual', 'realtime', 'rescue')
                                                          THEN run.trigger END),
       scheduled_sync_at = coalesce(i.scheduled_sync_at,
                                    CASE WHEN run.scheduled_for IS DISTINCT FROM i.next_sync_at
                                         THEN run.scheduled_for END)
  FROM run
 WHERE i.id = run.integration_id AND i.running_run_id = run.id;

-- name: unlock_integration
-- Release the run lock; always after the run's final commit.
SELECT pg_advisory_unlock(syncworker.lock_key('integration'), %(integration_id)s);

-- name: save_state
-- A connector's checkpoint: fenced on the run still being the live run.
UPDATE syncworker.integrations SET state = %(state)s
 WHERE id = %(integration_id)s AND running_run_id = %(run_id)s
RETURNING id;

-- name: finish_run
-- Close the run and reschedule its job in one statement; raises if the run is no longer live
-- (fenced), which aborts the transaction so that nothing of the run commits.  With
-- %(durable)s it also makes this transaction's commit durable (synchronous_commit on, for this
-- transaction only: a run whose effects are all in this transaction does without), and
-- wakes every replica's dispatcher if the job is due again within 5 minutes (a trigger that
-- came during the run, a retry, a frequent schedule).  A run that disables its job does so
-- next, in the same transaction (disable_after_run).  With %(unlock)s it releases the run's
-- integration lock, held by this session: a rescuer that finds the run without its lock
-- before this transaction commits waits on the rows it holds, then finds the run over.
WITH run AS (
  UPDATE syncworker.sync_runs
     SET status = %(status)s, finished_at = clock_timestamp(),
         duration_ms = (extract(epoch FROM clock_timestamp() - started_at) * 1000)::bigint,
         records_processed = %(records_processed)s, records_failed = %(records_failed)s,
         records_inserted = %(records_inserted)s, records_updated = %(records_updated)s,
         records_deleted = %(records_deleted)s,
         error_type = %(error_type)s, error = %(error)s
   WHERE id = %(run_id)s AND status = 'running'
  RETURNING id, integration_id, finished_at
), job AS (
UPDATE syncworker.integrations i
   SET running_run_id = NULL,
       state = coalesce(%(state)s::jsonb, i.state),
       last_sync_at = run.finished_at,
       last_success_at = CASE WHEN %(status)s IN ('success', 'partial') THEN run.finished_at
                              ELSE i.last_success_at END,
       last_status = %(status)s,
       last_error = %(error)s,
       retry_count = %(retry_count)s,
       abandon_count = 0,
       -- A trigger that arrived during the run gets its one follow-up run now.
       next_sync_at = CASE WHEN i.pending_trigger IS NOT NULL AND %(disabled_reason)s::text IS NULL
                           THEN now() ELSE %(next_sync_at)s::timestamptz END,
       scheduled_sync_at = CASE WHEN i.pending_trigger IS NOT NULL THEN %(slot)s::timestamptz
                                ELSE %(scheduled_sync_at)s::timestamptz END
  FROM run
 WHERE i.id = run.integration_id AND i.running_run_id = run.id
RETURNING i.id, i.enabled, i.next_sync_at
)
SELECT CASE WHEN %(durable)s THEN set_config('synchronous_commit', 'on', true) END,
       CASE WHEN enabled AND next_sync_at <= now() + interval '5 minutes' THEN
         pg_notify('syncworker', json_build_object(
           'due_in', round(extract(epoch FROM next_sync_at - clock_timestamp())::numeric, 3))::text)::text
       END,
       CASE WHEN %(unlock)s THEN pg_advisory_unlock(syncworker.lock_key('integration'), id::integer) END
  FROM job
UNION ALL
SELECT NULL, NULL, NULL WHERE CASE WHEN EXISTS (SELECT 1 FROM job) THEN false
                             ELSE syncworker.fenced(%(run_id)s) END;

-- name: record_error
-- One error, for an operator to read (never a secret).
INSERT INTO syncworker.sync_errors
  (integration_id, run_id, error_type, message, detail, record_key, context)
VALUES (%(integration_id)s, %(run_id)s, %(error_type)s, %(message)s, %(detail)s,
        %(record_key)s, %(context)s);

-- name: disable_after_run
-- The run's end disables its job (its retries are used up, its row cannot be used): after
-- finish_run, in the run's transaction; whoever listens on syncworker_alerts is told.
WITH job AS (
  UPDATE syncworker.integrations SET enabled = false, disabled_reason = %(reason)s
   WHERE id = %(integration_id)s
)
SELECT pg_notify('syncworker_alerts', %(payload)s);

-- name: abandon_run
-- Give a run up (its session is gone, or the worker is shutting down) and rerun the job.  A run
-- lost with its session is %(counted)s toward the job's max_abandons; a graceful stop's is not.
SELECT syncworker.abandon_run(%(run_id)s, %(reason)s, %(counted)s) AS integration_id;

-- name: announce_due
-- Runs of this worker finished with a next slot (a finish sends no NOTIFY for a slot more
-- than 5 minutes away): tell every replica when the earliest idle job is due, on the
-- database clock.
SELECT pg_notify('syncworker', json_build_object(
         'due_in', round(extract(epoch FROM min(next_sync_at) - clock_timestamp())::numeric, 3))::text)
  FROM syncworker.integrations
 WHERE enabled AND running_run_id IS NULL AND next_sync_at IS NOT NULL
HAVING min(next_sync_at) IS NOT NULL;

-- name: announce_runs
-- Wake the leader's rescuer: this worker started running while none of its runs ran.
SELECT pg_notify('syncworker', '{"runs_started": true}');

-- name: rescue_abandoned
-- Every replica, while runs exist (idempotent; any one replica is enough):
-- * abandon every running run whose session is gone, so that its job runs again at once.  A
--   run not yet locked belongs to its worker's session until it is a minute old: a claim
--   whose reply never reached the worker is not left running for ever;
-- * stop, from the database, a run well past its timeout that its worker did not stop (a
--   frozen or partitioned worker): its session is terminated and the run abandoned;
-- * note live-looking replicas whose liveness lock is gone (lost_at); one lost for 10 s is
--   marked stopped and its sessions are terminated, releasing whatever they hold.
-- Advisory locks are per database: only this database's count.
WITH held AS MATERIALIZED (
  SELECT classid::bigint AS ns, objid::bigint AS key2, pid FROM pg_locks
   WHERE locktype = 'advisory' AND granted AND objsubid = 2
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
), overdue AS MATERIALIZED (
  SELECT r.id, h.pid, i.timeout_seconds FROM syncworker.sync_runs r
    JOIN syncworker.integrations i ON i.id = r.integration_id
    JOIN held h ON h.ns = syncworker.lock_key('integration') AND h.key2 = r.integration_id
   WHERE r.status = 'running' AND r.locked_at IS NOT NULL
     AND r.locked_at < clock_timestamp()
                       - make_interval(secs => i.timeout_seconds + greatest(5, i.timeout_seconds / 10.0))
), stopped AS (
  SELECT syncworker.abandon_run(id, format('the run passed its timeout (%%s s) and its worker did not '
                                           'stop it; its database session was terminated', timeout_seconds))
           AS integration_id,
         syncworker.terminate_session(pid)
    FROM overdue
), dead AS (
  SELECT r.id, r.locked_at IS NOT NULL AS started,
         EXISTS (SELECT 1 FROM held WHERE ns = syncworker.lock_key('worker') AND key2 = r.worker_id)
           AS claimer_alive
    FROM syncworker.sync_runs r
   WHERE r.status = 'running'
     AND NOT EXISTS (SELECT 1 FROM held WHERE ns = syncworker.lock_key('integration')
                                         AND key2 = r.integration_id)
     AND (r.locked_at IS NOT NULL OR r.worker_id IS NULL
          OR r.started_at < now() - interval '1 minute'
          OR NOT EXISTS (SELECT 1 FROM held WHERE ns = syncworker.lock_key('worker')
                                             AND key2 = r.worker_id))
), rescued AS (
  -- A run that never started (its lock never taken) cannot be what killed its worker: it does
  -- not count toward the job's max_abandons.
  SELECT syncworker.abandon_run(id, CASE WHEN started
                                         THEN 'the worker running it died or lost its database session'
                                         WHEN claimer_alive
                                         THEN 'its worker did not start it within a minute of claiming it'
                                         ELSE 'the worker that claimed it died or lost its database '
                                              'session before the run started' END,
                                started) AS integration_id
    FROM dead
), liveness AS (
  SELECT w.id, w.lost_at,
         EXISTS (SELECT 1 FROM held WHERE ns = syncworker.lock_key('worker') AND key2 = w.id) AS alive
    FROM syncworker.workers w
   WHERE w.stopped_at IS NULL
), marked AS (
  UPDATE syncworker.workers w
     SET lost_at = CASE WHEN l.alive THEN NULL ELSE coalesce(w.lost_at, now()) END,
         stopped_at = CASE WHEN NOT l.alive AND w.lost_at < now() - interval '10 seconds' THEN now() END,
         leader = w.leader AND (l.alive OR w.lost_at IS NULL OR w.lost_at >= now() - interval '10 seconds'),
         running = CASE WHEN NOT l.alive AND w.lost_at < now() - interval '10 seconds' THEN 0
                        ELSE w.running END
    FROM liveness l
   WHERE w.id = l.id AND (NOT l.alive OR l.lost_at IS NOT NULL)
  RETURNING w.id, w.stopped_at IS NOT NULL AS gone
), cut_off AS (
  SELECT syncworker.terminate_session(a.pid) FROM pg_stat_activity a JOIN marked m ON m.gone
   WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
     AND a.application_name LIKE 'syncworker%% w' || m.id
)
SELECT (SELECT count(*) FROM rescued WHERE integration_id IS NOT NULL)
       + (SELECT count(*) FROM stopped WHERE integration_id IS NOT NULL) AS rescued,
       (SELECT count(*) FROM marked WHERE gone) + 0 * (SELECT count(*) FROM cut_off) AS workers_gone,
       (SELECT count(*) FROM syncworker.sync_runs WHERE status = 'running') AS running;

-- name: release_stray_locks
-- Integration locks this session holds besides its run's own (%(keep)s, or none), released.
-- A session-level advisory lock outlives the rollback of the transaction that took it: a
-- finishing transaction that fails after claiming the next job would otherwise keep that
-- job's lock, and a pooled session could carry it for an hour.
SELECT count(*) FILTER (WHERE pg_advisory_unlock(syncworker.lock_key('integration'), objid::bigint::integer))
  FROM pg_locks
 WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND pid = pg_backend_pid()
   AND classid = syncworker.lock_key('integration')::oid
   AND objid::bigint IS DISTINCT FROM %(keep)s::bigint;

-- name: disable_invalid
-- A job whose config a service cannot use: disabled with the reason, recorded, alerted.
WITH job AS (
  UPDATE syncworker.integrations
     SET enabled = false, disabled_reason = %(reason)s, last_error = %(reason)s
   WHERE id = %(integration_id)s AND enabled
  RETURNING id, name
), recorded AS (
  INSERT INTO syncworker.sync_errors (integration_id, error_type, message)
  SELECT id, 'config_invalid', %(reason)s FROM job
)
SELECT pg_notify('syncworker_alerts', json_build_object(
         'integration', left(name, 200), 'integration_id', id, 'run_id', NULL,
         'error_type', 'config_invalid', 'reason', left(%(reason)s, 1000))::text)
  FROM job;

-- name: prune_runs
-- Leader: delete one batch of finished runs older than the retention.
DELETE FROM syncworker.sync_runs WHERE id IN (
  SELECT id FROM syncworker.sync_runs
   WHERE finished_at < now() - make_interval(days => %(retention_days)s)
   LIMIT %(batch)s);

-- name: prune_errors
-- Leader: delete one batch of resolved errors older than the retention.
DELETE FROM syncworker.sync_errors WHERE id IN (
  SELECT id FROM syncworker.sync_errors
   WHERE resolved AND created_at < now() - make_interval(days => %(retention_days)s)
   LIMIT %(batch)s);

-- name: prune_workers
-- Leader: forget replicas that stopped longer ago than the retention (one row back for each);
-- the runs that name them keep a NULL worker_id.
WITH gone AS (
  DELETE FROM syncworker.workers
   WHERE stopped_at < now() - make_interval(days => %(retention_days)s)
  RETURNING id
), unlinked AS (
  UPDATE syncworker.sync_runs SET worker_id = NULL WHERE worker_id IN (SELECT id FROM gone)
)
SELECT id FROM gone;

-- name: status
-- The status view, for `syncworker status` (which lists the worst first).
SELECT name, kind, enabled, health, schedule, running, last_status, last_sync_at, next_sync_at,
       retry_count, runs_24h, success_rate_24h, mean_duration_ms_24h, unresolved_errors,
       coalesce(disabled_reason, last_error) AS problem
  FROM syncworker.status ORDER BY name;

-- name: trigger_sync
-- Run a job now (coalesced with a run in progress).
SELECT syncworker.trigger_sync(%(name)s) AS result;

-- name: integration_by_name
-- One job by name.
SELECT id, name, kind, config::text AS config, state::text AS state, interval_seconds, cron, timezone, enabled,
       max_retries, retry_backoff_seconds, timeout_seconds, retry_count
  FROM syncworker.integrations WHERE name = %(name)s;

-- name: history
-- The latest runs of one job.
SELECT r.id, r.status, r.trigger, r.attempt, r.started_at, r.duration_ms,
       r.records_processed, r.records_failed, r.error_type, r.error
  FROM syncworker.sync_runs r
 WHERE r.integration_id = %(integration_id)s
 ORDER BY r.started_at DESC, r.id DESC
 LIMIT %(limit)s;

-- name: unresolved_errors
-- Unresolved errors, newest first, optionally for one job.
SELECT e.id, i.name, e.created_at, e.error_type, e.record_key, e.message, e.run_id
  FROM syncworker.sync_errors e JOIN syncworker.integrations i ON i.id = e.integration_id
 WHERE NOT e.resolved AND (%(name)s::text IS NULL OR i.name = %(name)s)
 ORDER BY e.created_at DESC, e.id DESC
 LIMIT %(limit)s;

-- name: all_integrations
-- Every job, for `syncworker check`.
SELECT id, name, kind, config::text AS config, interval_seconds, cron, timezone, enabled
  FROM syncworker.integrations ORDER BY name;

-- name: claim_by_name
-- `run-once`: open a manual run of one job now, if it is not already running.
WITH job AS (
  SELECT id, coalesce(scheduled_sync_at, next_sync_at) AS slot, retry_count
    FROM syncworker.integrations
   WHERE name = %(name)s AND running_run_id IS NULL
     FOR UPDATE NOWAIT
), runs AS (
  INSERT INTO syncworker.sync_runs (integration_id, trigger, attempt, worker_id, scheduled_for, locked_at)
  SELECT id, 'manual', retry_count + 1, NULL, slot, clock_timestamp() FROM job
  RETURNING id, integration_id, trigger, attempt, scheduled_for, locked_at
)
UPDATE syncworker.integrations i
   SET running_run_id = runs.id, pending_trigger = NULL, scheduled_sync_at = NULL
  FROM runs
 WHERE i.id = runs.integration_id
RETURNING i.id, i.name, i.kind, i.config::text AS config, i.state::text AS state,
          i.interval_seconds, i.cron, i.timezone,
          i.max_retries, i.retry_backoff_seconds, i.timeout_seconds, i.retry_count,
          runs.id AS run_id, runs.trigger, runs.attempt, runs.scheduled_for, runs.locked_at;

-- name: try_lock_integration
-- `run-once`: take the integration lock unless a run holds it.
SELECT pg_try_advisory_lock(syncworker.lock_key('integration'), %(integration_id)s) AS locked;

-- name: realtime_jobs
-- Leader: enabled jobs that asked for runs on change ({"realtime": true} in their config).
SELECT id, name, kind, config::text AS config FROM syncworker.integrations
 WHERE enabled AND config @> '{"realtime": true}'
 ORDER BY id;

-- name: request_realtime_run
-- Leader: a source changed; run these jobs now, or once more after their current run.
SELECT syncworker.request_run(id, 'realtime') FROM unnest(%(ids)s::bigint[]) AS id;

-- name: take_request_slot
-- http: one request slot for a host under its fleet-wide rate limit; 0 or seconds to wait.
SELECT syncworker.take_request_slot(%(host)s, %(emission)s, %(burst)s, %(gap)s) AS wait;

-- name: circuit_allow
-- http: may a request go to this host now? closed / trial / open.
SELECT syncworker.circuit_allow(%(host)s, %(cooldown)s) AS state;

-- name: circuit_record
-- http: a request's outcome for the host's circuit breaker; returns the breaker's state.
SELECT syncworker.circuit_record(%(host)s, %(ok)s, %(threshold)s, %(error)s) AS state;

-- name: pause_job
-- `syncworker pause`: stop a job's runs, keep its schedule.
SELECT syncworker.pause_job(%(name)s, %(reason)s) AS result;

-- name: resume_job
-- `syncworker resume`: a paused job runs on its schedule again.
SELECT syncworker.resume_job(%(name)s) AS result;

-- name: enable_job
-- `syncworker enable`: enable a disabled or paused job.
SELECT syncworker.enable_job(%(name)s) AS result;

-- name: disable_job
-- `syncworker disable`: disable a job with a reason.
SELECT syncworker.disable_job(%(name)s, %(reason)s) AS result;

-- name: resolve_errors
-- `syncworker resolve`: mark a job's unresolved errors (of one type, or all) resolved.
SELECT syncworker.resolve_errors(%(name)s, %(error_type)s) AS resolved;

-- name: runs
-- `syncworker runs`: the latest runs of every job (or only those running), where and how long.
SELECT r.id, i.name, r.status, r.trigger, r.attempt, r.worker_id, w.hostname, w.pid,
       r.started_at, r.finished_at,
       coalesce(r.duration_ms, (extract(epoch FROM clock_timestamp() - r.started_at) * 1000)::bigint)
         AS duration_ms,
       i.timeout_seconds,
       r.status = 'running' AND r.started_at < clock_timestamp() - make_interval(secs => i.timeout_seconds)
         AS past_timeout,
       r.records_processed, r.records_failed, r.error_type, r.error
  FROM syncworker.sync_runs r
  JOIN syncworker.integrations i ON i.id = r.integration_id
  LEFT JOIN syncworker.workers w ON w.id = r.worker_id
 WHERE NOT %(running)s OR r.status = 'running'
 ORDER BY r.started_at DESC, r.id DESC
 LIMIT %(limit)s;

-- name: fleet
-- --http (/metrics, /health, the status page): every job's status, unresolved errors by type
-- and the replicas, in one statement (times as Unix seconds).
SELECT
  (SELECT coalesce(json_agg(json_build_object(
            'name', s.name, 'kind', s.kind, 'enabled', s.enabled, 'health', s.health,
            'schedule', s.schedule, 'running', s.running,
            'running_since_epoch', extract(epoch FROM s.running_since),
            'last_status', s.last_status, 'last_sync_epoch', extract(epoch FROM s.last_sync_at),
            'last_success_epoch', extract(epoch FROM s.last_success_at),
            'next_sync_epoch', extract(epoch FROM s.next_sync_at), 'retry_count', s.retry_count,
            'runs_24h', s.runs_24h, 'success_rate_24h', s.success_rate_24h,
            'mean_duration_ms_24h', s.mean_duration_ms_24h, 'unresolved_errors', s.unresolved_errors,
            'last_duration_ms', s.last_duration_ms,
            'problem', left(coalesce(s.disabled_reason, s.last_error), 500),
            'stale_after_seconds', s.stale_after_seconds) ORDER BY s.name), '[]'::json)
     FROM syncworker.status s) AS jobs,
  (SELECT coalesce(json_object_agg(e.error_type, e.n), '{}'::json)
     FROM (SELECT error_type, count(*) AS n FROM syncworker.sync_errors
            WHERE NOT resolved GROUP BY error_type) e) AS errors,
  (SELECT coalesce(json_agg(json_build_object(
            'id', w.id, 'hostname', w.hostname, 'pid', w.pid, 'version', w.version,
            'mode', w.mode, 'concurrency', w.concurrency, 'running', w.running, 'leader', w.leader,
            'heartbeat_epoch', extract(epoch FROM w.heartbeat_at),
            'started_epoch', extract(epoch FROM w.started_at),
            'alive', syncworker.lock_held('worker', w.id)) ORDER BY w.id), '[]'::json)
     FROM syncworker.workers w WHERE w.stopped_at IS NULL) AS workers,
  extract(epoch FROM now())::float8 AS db_now;

-- name: alerts_scan
-- Leader, alert delivery: open an incident for each job disabled, failing %(failures)s times or
-- more in a row, stale or overrunning, and for each run rescued in the last hour (not one a
-- graceful stop handed back); close the incidents whose condition is over; forget closed ones
-- older than the retention.
WITH jobs AS MATERIALIZED (
  SELECT s.id, s.name, s.health, s.retry_count, s.disabled_reason, s.last_error, s.last_success_at,
         s.running_since, s.stale_after_seconds
    FROM syncworker.status s
), conditions AS MATERIALIZED (
  SELECT j.id, c.kind, left(c.summary, 2000) AS summary
    FROM jobs j
   CROSS JOIN LATERAL (VALUES
     ('disabled', j.health = 'disabled',
      format('%%s is disabled: %%s', j.name, coalesce(j.disabled_reason, 'no reason given'))),
     ('failing', j.retry_count >= %(failures)s,
      format('%%s has failed %%s times in a row: %%s', j.name, j.retry_count, coalesce(j.last_error, '-'))),
     ('stale', j.health = 'stale',
      format('%%s has had no success since %%s (stale after %%s s)', j.name,
             coalesce(to_char(j.last_success_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'),
                      'it was created'),
             j.stale_after_seconds)),
     ('overrunning', j.health = 'overrunning',
      format('%%s has been running since %%s', j.name,
             to_char(j.running_since AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"')))
   ) AS c(kind, active, summary)
   WHERE c.active
), opened AS (
  INSERT INTO syncworker.alerts (kind, integration_id, summary)
  SELECT kind, id, summary FROM conditions
  ON CONFLICT (integration_id, kind) WHERE closed_at IS NULL AND kind <> 'rescued' DO NOTHING
  RETURNING id
), closed AS (
  UPDATE syncworker.alerts a SET closed_at = now()
   WHERE a.closed_at IS NULL AND a.kind <> 'rescued'
     AND NOT EXISTS (SELECT 1 FROM conditions c WHERE c.id = a.integration_id AND c.kind = a.kind)
  RETURNING a.id
), rescued AS (
  INSERT INTO syncworker.alerts (kind, integration_id, run_id, summary, opened_at, closed_at)
  SELECT 'rescued', r.integration_id, r.id,
         left(format('run %%s of %%s was rescued and its job runs again: %%s', r.id, i.name, r.error), 2000),
         r.finished_at, r.finished_at
    FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id
   WHERE r.status = 'abandoned' AND r.finished_at > now() - interval '1 hour'
     AND r.error IS DISTINCT FROM 'the worker shut down before the run finished'
  ON CONFLICT (run_id) WHERE kind = 'rescued' DO NOTHING
  RETURNING id
), pruned AS (
  DELETE FROM syncworker.alerts
   WHERE closed_at < now() - make_interval(days => %(retention_days)s)
     AND sent_at IS NOT NULL AND (recovery_sent_at IS NOT NULL OR kind = 'rescued')
  RETURNING id
)
SELECT (SELECT count(*) FROM opened) AS opened, (SELECT count(*) FROM closed) AS closed,
       (SELECT count(*) FROM rescued) AS rescued, (SELECT count(*) FROM pruned) AS pruned;

-- name: alerts_pending
-- Leader, alert delivery: the messages still to send, oldest first (event open, recovered, or
-- skip: an incident over before its first message went out).
SELECT a.id, a.kind, a.integration_id, i.name AS integration, a.run_id, a.summary,
       a.opened_at, a.closed_at,
       CASE WHEN a.sent_at IS NULL AND (a.closed_at IS NULL OR a.kind = 'rescued') THEN 'open'
            WHEN a.sent_at IS NULL THEN 'skip'
            ELSE 'recovered' END AS event
  FROM syncworker.alerts a LEFT JOIN syncworker.integrations i ON i.id = a.integration_id
 WHERE a.sent_at IS NULL
    OR (a.closed_at IS NOT NULL AND a.recovery_sent_at IS NULL AND a.kind <> 'rescued')
 ORDER BY a.opened_at, a.id
 LIMIT 200;

-- name: leader_seen
-- Every replica, when alerts are configured: does a live replica say it leads?
SELECT EXISTS (SELECT 1 FROM syncworker.workers w
                WHERE w.leader AND w.stopped_at IS NULL AND syncworker.lock_held('worker', w.id)) AS led;

-- name: open_no_leader
-- A replica that has seen no leader for long enough opens the fleet's no_leader incident;
-- the one whose insert opened it gets the row back and delivers it.
INSERT INTO syncworker.alerts (kind, summary) VALUES ('no_leader', %(summary)s)
ON CONFLICT (kind) WHERE kind = 'no_leader' AND closed_at IS NULL DO NOTHING
RETURNING id, kind, integration_id, NULL::text AS integration, run_id, summary, opened_at, closed_at;

-- name: alert_delivered
-- Leader, alert delivery: a message went out (or was given up), or an attempt failed.
UPDATE syncworker.alerts
   SET sent_at = CASE WHEN %(opened)s THEN coalesce(sent_at, now()) ELSE sent_at END,
       recovery_sent_at = CASE WHEN %(recovered)s THEN coalesce(recovery_sent_at, now())
                               ELSE recovery_sent_at END,
       attempts = attempts + %(attempts)s,
       last_error = coalesce(%(error)s, last_error)
 WHERE id = %(id)s;

-- name: run_as_check
-- sql jobs: who this session is, and whether it may run a job as `role` (NULL: no run_as).
SELECT current_user AS login, current_setting('is_superuser') = 'on' AS login_superuser,
       r.oid IS NOT NULL AS found,
       coalesce(pg_has_role(current_user, r.oid, 'MEMBER'), false) AS member,
       coalesce(r.rolsuper, false) AS role_superuser
  FROM (SELECT %(role)s::text AS name) wanted
  LEFT JOIN pg_catalog.pg_roles r ON r.rolname = wanted.name;

-- name: integration_id_by_name
-- A job's id by name, for the commands an operator may run (no config, no state).
SELECT id FROM syncworker.integrations WHERE name = %(name)s;
