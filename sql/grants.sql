-- Privileges for workers that connect as their own role, not as the role that runs
-- `syncworker migrate` (which creates, and owns, the schema). Run it as that role (or a
-- superuser), in the control database, after the first migrate and again after every
-- upgrade: it is idempotent.
--
--   CREATE ROLE syncworker_worker LOGIN PASSWORD '...';      -- once, by an administrator
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -f sql/grants.sql   -- the role syncworker_worker
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -v worker_role=etl_worker -f sql/grants.sql
--
-- Then give the workers a SYNCWORKER_DATABASE_URL with that role. It needs no superuser and
-- owns nothing: the leader's rescuer may call pg_terminate_backend on sessions of a dead
-- replica, which a role may always do to sessions of its own role. So every replica must
-- connect as the same role (or the worker role needs membership in pg_signal_backend).
--
-- Not covered here, as they depend on your jobs: what `sql` statements and `python`
-- functions do through the run's session, and the destination tables of `http`, `postgres`
-- and `redis` jobs in the control database (INSERT, UPDATE, DELETE and SELECT on each; USAGE
-- and CREATE on its schema when the job has "create_table": true). Jobs with a `dsn` use
-- the role of that DSN.

\if :{?worker_role}
\else
  \set worker_role syncworker_worker
\endif

SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'worker_role') AS worker_role_missing,
       to_regnamespace('syncworker') IS NULL AS schema_missing \gset
\if :worker_role_missing
  \echo 'role' :"worker_role" 'does not exist: create it first (CREATE ROLE' :"worker_role" 'LOGIN PASSWORD ...), then run this file again; nothing was granted'
  \quit
\endif
\if :schema_missing
  \echo 'no syncworker schema in database' :"DBNAME" ': run `syncworker migrate` first; nothing was granted'
  \quit
\endif
SELECT pg_get_userbyid(nspowner) AS schema_owner FROM pg_namespace WHERE nspname = 'syncworker' \gset

BEGIN;

-- Connect, and create the temporary staging tables the loader COPYs into.
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO :"worker_role";

-- The schema: jobs, runs, errors, workers and the http hosts' limits are read and written;
-- the status view and the functions (trigger_sync, the locks, the rate limiter) are used.
GRANT USAGE ON SCHEMA syncworker TO :"worker_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA syncworker TO :"worker_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA syncworker TO :"worker_role";
GRANT EXECUTE ON ALL ROUTINES IN SCHEMA syncworker TO :"worker_role";

-- The same for what later migrations create, when the schema's owner runs them.
ALTER DEFAULT PRIVILEGES FOR ROLE :"schema_owner" IN SCHEMA syncworker
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"worker_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"schema_owner" IN SCHEMA syncworker
  GRANT USAGE, SELECT ON SEQUENCES TO :"worker_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"schema_owner" IN SCHEMA syncworker
  GRANT EXECUTE ON ROUTINES TO :"worker_role";

-- The schema's revision: a worker starts only on the revision it was built for. The table
-- is found on the search_path, as alembic created it (normally public.syncworker_alembic_version).
GRANT SELECT ON syncworker_alembic_version TO :"worker_role";

COMMIT;

\echo 'granted the syncworker worker privileges to' :"worker_role" 'in database' :"DBNAME"
