-- Real time for a `postgres` job: run this on the SOURCE database, for the job's source table.
-- (`syncworker install-trigger NAME` does the same from the job's own config.)
--
--   psql "$SOURCE_DSN" -v schema=public -v table=orders -f sql/realtime_trigger.sql
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
