-- Give a login role one of the syncworker roles, after `syncworker migrate` has created them
-- (see README, "Roles and privileges"). Roles and memberships are cluster-wide: once is enough,
-- for every database and every later upgrade.
--
--   psql "$URL" -v ON_ERROR_STOP=1 -f sql/grants.sql                                   -- syncworker_worker: a worker
--   psql "$URL" -v ON_ERROR_STOP=1 -v worker_role=etl -f sql/grants.sql                -- etl: a worker
--   psql "$URL" -v ON_ERROR_STOP=1 -v worker_role=alice -v grant=syncworker_operator -f sql/grants.sql
--
-- `grant` is syncworker_runner (the default: what a worker needs), syncworker_operator (on-call:
-- read status, runs and errors; run, pause, resume, enable, disable; resolve errors) or
-- syncworker_admin (job authors: add, change and delete jobs, and what the operator may). Run
-- it as a role that may grant that role: a superuser, or (PostgreSQL 16 and later) the role with
-- CREATEROLE that created it; before 16, any role with CREATEROLE. It is the same as
--   GRANT syncworker_runner TO etl;
-- after checking that both roles exist.
--
-- A worker role needs no superuser. The leader's rescuer may call pg_terminate_backend on the
-- sessions a dead replica left behind, which a role may always do to sessions of its own role:
-- so every replica connects as the same login (or that login is granted pg_signal_backend).
-- What the jobs touch is not covered: give each `sql` job a "run_as" role with what it needs,
-- and grant the worker's login that role; destination tables of `http`, `postgres` and `redis`
-- jobs in the control database need INSERT, UPDATE, DELETE and SELECT for the worker's login
-- (USAGE and CREATE on their schema for "create_table": true).

\if :{?worker_role}
\else
  \set worker_role syncworker_worker
\endif
\if :{?grant}
\else
  \set grant syncworker_runner
\endif

SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'worker_role') AS login_missing,
       :'grant' NOT IN ('syncworker_runner', 'syncworker_operator', 'syncworker_admin') AS grant_unknown,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'grant') AS grant_missing \gset
\if :grant_unknown
  \echo 'grant must be syncworker_runner, syncworker_operator or syncworker_admin, not' :"grant" '; nothing was granted'
  \quit
\endif
\if :login_missing
  \echo 'role' :"worker_role" 'does not exist: create it first (CREATE ROLE' :"worker_role" 'LOGIN PASSWORD ...), then run this file again; nothing was granted'
  \quit
\endif
\if :grant_missing
  \echo 'role' :"grant" 'does not exist: run `syncworker migrate` as a role with CREATEROLE (or the statements it printed) first; nothing was granted'
  \quit
\endif

GRANT :"grant" TO :"worker_role";

\echo 'granted' :grant 'to' :"worker_role"
