-- Real time for a `postgres` job: run this on the SOURCE database, for the job's source table.
-- (`syncworker install-trigger NAME` does the same from the job's own config.)
--
--   psql "$SOURCE_DSN" -v schema=public -v table=orders -f sql/realtime_trigger.sql
--   psql "$SOURCE_DSN" -v schema=public -v table=orders -v key=id -f sql/realtime_trigger.sql
--
-- A statement-level trigger that NOTIFYs channel syncworker_changes with the table's name.
-- Postgres folds identical notifications of one transaction into one, so each writing
-- transaction is heard once however many rows or statements it has. The worker's leader
-- LISTENs there for jobs whose config has "realtime": true, and requests one `realtime` run
-- per burst of changes. To remove it:
--   DROP TRIGGER syncworker_notify_change ON public.orders;
--   DROP FUNCTION public.syncworker_notify_change();
\if :{?schema}
\else
  \set schema public
\endif
\if :{?table}
\else
  \set table orders
\endif

SELECT format($f$
CREATE OR REPLACE FUNCTION %1$I.syncworker_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('syncworker_changes', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
  RETURN NULL;
END $$
$f$, :'schema') \gexec

SELECT format($t$
CREATE OR REPLACE TRIGGER syncworker_notify_change
  AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %1$I.%2$I
  FOR EACH STATEMENT EXECUTE FUNCTION %1$I.syncworker_notify_change()
$t$, :'schema', :'table') \gexec

-- Hard deletes: with -v key=id (the job's key columns, comma-separated, e.g. -v key=region,id)
-- this also installs what `install-trigger` installs for a job with "deletes": "hard": a
-- trigger that records each deleted key, with its transaction id, in
-- syncworker_tombstones (in the table's schema), so that runs delete those keys instead of
-- comparing keys. To remove it:
--   DROP TRIGGER syncworker_record_deletes ON public.orders;
--   DROP TRIGGER syncworker_record_truncate ON public.orders;
--   DELETE FROM public.syncworker_tombstone_horizon WHERE relation = 'public.orders';
\if :{?key}
SELECT NOT EXISTS (
  SELECT FROM pg_trigger
   WHERE tgrelid = format('%I.%I', :'schema', :'table')::regclass AND tgname = 'syncworker_record_deletes'
) AS fresh \gset

SELECT format($t$
CREATE TABLE IF NOT EXISTS %1$I.syncworker_tombstones (
  relation text NOT NULL,
  key text[],
  xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  deleted_at timestamptz NOT NULL DEFAULT now()
)
$t$, :'schema') \gexec

SELECT format('CREATE INDEX IF NOT EXISTS syncworker_tombstones_relation_xid'
              ' ON %1$I.syncworker_tombstones (relation, xid)', :'schema') \gexec

SELECT format($t$
CREATE TABLE IF NOT EXISTS %1$I.syncworker_tombstone_horizon (
  relation text PRIMARY KEY, key text[] NOT NULL, complete_from xid8 NOT NULL
)
$t$, :'schema') \gexec

SELECT format($f$
CREATE OR REPLACE FUNCTION %1$I.syncworker_record_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO %1$I.syncworker_tombstones (relation, key) VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, NULL);
  ELSE
    EXECUTE format('INSERT INTO %1$I.syncworker_tombstones (relation, key) SELECT $1, ARRAY[%%s] FROM gone',
                   (SELECT string_agg(format('%%I::text', k), ', ') FROM unnest(TG_ARGV) k))
      USING TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
  END IF;
  RETURN NULL;
END $$
$f$, :'schema') \gexec

SELECT format('CREATE OR REPLACE TRIGGER syncworker_record_deletes AFTER DELETE ON %1$I.%2$I'
              ' REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION %1$I.syncworker_record_deletes(%3$s)',
              :'schema', :'table',
              (SELECT string_agg(quote_literal(trim(k)), ', ') FROM unnest(string_to_array(:'key', ',')) k)) \gexec

SELECT format('CREATE OR REPLACE TRIGGER syncworker_record_truncate AFTER TRUNCATE ON %1$I.%2$I'
              ' FOR EACH STATEMENT EXECUTE FUNCTION %1$I.syncworker_record_deletes()', :'schema', :'table') \gexec

-- From which transaction on every delete is recorded: moved only for a new trigger or key.
SELECT format($h$
INSERT INTO %1$I.syncworker_tombstone_horizon AS h (relation, key, complete_from)
VALUES (%2$L, %3$L::text[], pg_snapshot_xmax(pg_current_snapshot()))
ON CONFLICT (relation) DO UPDATE SET key = EXCLUDED.key, complete_from = EXCLUDED.complete_from
 WHERE %4$L::boolean OR h.key IS DISTINCT FROM EXCLUDED.key
$h$, :'schema', :'schema' || '.' || :'table',
   (SELECT array_agg(trim(k)) FROM unnest(string_to_array(:'key', ',')) k), :'fresh') \gexec
\endif
