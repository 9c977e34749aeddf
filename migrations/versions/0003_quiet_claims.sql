-- Workers tell the leader themselves when they start running while none of their runs
-- was running (one NOTIFY per such start, not one per claim). Their sessions say so with
-- syncworker.announces_runs = on; any other insert into sync_runs (run-once, an older
-- worker, an operator) still wakes the leader through this trigger.
CREATE OR REPLACE FUNCTION syncworker.notify_runs_started() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF current_setting('syncworker.announces_runs', true) IS DISTINCT FROM 'on'
     AND EXISTS (SELECT 1 FROM new_rows) THEN
    PERFORM pg_notify('syncworker', '{"runs_started": true}');
  END IF;
  RETURN NULL;
END
$$;
