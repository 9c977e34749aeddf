-- syncworker schema, version 0008: roles.  Three group roles (NOLOGIN, cluster-wide, shared by
-- every database that runs syncworker) that a site grants to its login roles:
--
--   syncworker_runner    what a worker needs and no more: read and write the schema's tables,
--                        call its functions, temporary tables (the loader's staging tables),
--                        read the schema's revision.  Never adds or deletes jobs.
--   syncworker_operator  read status, runs, errors, workers and alerts, and the jobs without
--                        their config and state; run, pause, resume, enable and disable jobs
--                        and resolve errors, through the functions below (no table writes).
--   syncworker_admin     add, change and delete jobs (the integrations table), plus what the
--                        operator may; not a member of the runner.
--
-- Roles are created by syncworker.setup_roles() when the migrating role may (CREATEROLE or
-- superuser); otherwise it returns the statements to run, and `syncworker migrate` prints them.
-- `syncworker migrate` calls it after every upgrade, so roles created later get their grants
-- then.  A later migration whose objects an operator or admin must use grants them here (a
-- CREATE OR REPLACE of setup_roles); the runner's come with the default privileges below.

-- The operator's functions write what an operator may not write directly: they run with their
-- owner's privileges, with a search_path that a caller cannot point elsewhere.
ALTER FUNCTION syncworker.trigger_sync(text)
  SECURITY DEFINER SET search_path = pg_catalog, syncworker, pg_temp;
ALTER FUNCTION syncworker.pause_job(text, text)
  SECURITY DEFINER SET search_path = pg_catalog, syncworker, pg_temp;
ALTER FUNCTION syncworker.resume_job(text)
  SECURITY DEFINER SET search_path = pg_catalog, syncworker, pg_temp;
ALTER FUNCTION syncworker.enable_job(text)
  SECURITY DEFINER SET search_path = pg_catalog, syncworker, pg_temp;
ALTER FUNCTION syncworker.disable_job(text, text)
  SECURITY DEFINER SET search_path = pg_catalog, syncworker, pg_temp;
ALTER FUNCTION syncworker.resolve_errors(text, text)
  SECURITY DEFINER SET search_path = pg_catalog, syncworker, pg_temp;

-- The names of the roles and what each may use; setup_roles() reads them.
CREATE FUNCTION syncworker.role_names() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
  SELECT ARRAY['syncworker_runner', 'syncworker_operator', 'syncworker_admin']
$$;

-- Create the roles that are missing (when this role may) and grant each what it may use, in
-- this database.  Idempotent; safe while other databases of the cluster do the same (roles are
-- cluster-wide: a role another session creates meanwhile is reused).  Returns the statements
-- this role could not run (CREATE ROLE without CREATEROLE; the database's own privileges when
-- it is not the database's owner), or an empty array when everything is granted.
CREATE FUNCTION syncworker.setup_roles() RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
  role_name text;
  may_create boolean;
  missing text[] := ARRAY[]::text[];
  later text[] := ARRAY[]::text[];
  version_table regclass := to_regclass('syncworker_alembic_version');
  readers constant text[] := ARRAY['syncworker_operator', 'syncworker_admin'];
  visible text;
BEGIN
  SELECT rolsuper OR rolcreaterole INTO may_create FROM pg_roles WHERE rolname = current_user;
  FOREACH role_name IN ARRAY syncworker.role_names() LOOP
    CONTINUE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = role_name);
    IF NOT may_create THEN
      missing := missing || format('CREATE ROLE %I NOLOGIN;', role_name);
      CONTINUE;
    END IF;
    BEGIN
      EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
      NULL;  -- created by a concurrent migrate of another database
    END;
  END LOOP;
  IF cardinality(missing) > 0 THEN
    RETURN missing || format('-- then, as %I: SELECT syncworker.setup_roles(); (or run syncworker migrate again)',
                             current_user);
  END IF;

  -- syncworker_runner: the worker.  (The database's privileges are its owner's to grant; PUBLIC
  -- has both by default.)
  BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO syncworker_runner', current_database());
  EXCEPTION WHEN insufficient_privilege THEN
    later := later || format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO syncworker_runner;', current_database());
  END;
  GRANT USAGE ON SCHEMA syncworker TO syncworker_runner;
  GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA syncworker TO syncworker_runner;
  REVOKE INSERT, DELETE ON syncworker.integrations FROM syncworker_runner;  -- jobs are the admin's
  GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA syncworker TO syncworker_runner;
  GRANT EXECUTE ON ALL ROUTINES IN SCHEMA syncworker TO syncworker_runner;
  REVOKE EXECUTE ON FUNCTION syncworker.setup_roles() FROM syncworker_runner;
  -- What later migrations create, when the same role runs them.
  ALTER DEFAULT PRIVILEGES IN SCHEMA syncworker
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO syncworker_runner;
  ALTER DEFAULT PRIVILEGES IN SCHEMA syncworker GRANT USAGE, SELECT ON SEQUENCES TO syncworker_runner;
  ALTER DEFAULT PRIVILEGES IN SCHEMA syncworker GRANT EXECUTE ON ROUTINES TO syncworker_runner;

  -- syncworker_operator, and the same for syncworker_admin (granted directly, not as a member).
  SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO visible
    FROM pg_attribute
   WHERE attrelid = 'syncworker.integrations'::regclass AND attnum > 0 AND NOT attisdropped
     AND attname NOT IN ('config', 'state');
  FOREACH role_name IN ARRAY readers LOOP
    BEGIN
      EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), role_name);
    EXCEPTION WHEN insufficient_privilege THEN
      later := later || format('GRANT CONNECT ON DATABASE %I TO %I;', current_database(), role_name);
    END;
    EXECUTE format('GRANT USAGE ON SCHEMA syncworker TO %I', role_name);
    EXECUTE format('GRANT SELECT ON syncworker.status, syncworker.sync_runs, syncworker.sync_errors, '
                   'syncworker.workers, syncworker.alerts, syncworker.rate_limits, '
                   'syncworker.circuit_breakers TO %I', role_name);
    EXECUTE format('GRANT SELECT (%s) ON syncworker.integrations TO %I', visible, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION syncworker.trigger_sync(text), '
                   'syncworker.pause_job(text, text), syncworker.resume_job(text), '
                   'syncworker.enable_job(text), syncworker.disable_job(text, text), '
                   'syncworker.resolve_errors(text, text), '
                   'syncworker.stale_after(integer, integer, text), syncworker.lock_key(text), '
                   'syncworker.lock_held(text, bigint) TO %I', role_name);
    IF version_table IS NOT NULL THEN
      EXECUTE format('GRANT SELECT ON %s TO %I', version_table, role_name);
    END IF;
  END LOOP;
  IF version_table IS NOT NULL THEN
    EXECUTE format('GRANT SELECT ON %s TO syncworker_runner', version_table);
  END IF;

  -- syncworker_admin: the jobs themselves (whose triggers check time zones and schedules).
  GRANT SELECT, INSERT, UPDATE, DELETE ON syncworker.integrations TO syncworker_admin;
  GRANT SELECT ON syncworker.timezone_names TO syncworker_admin;
  GRANT EXECUTE ON FUNCTION syncworker.check_timezone(text), syncworker.check_schedule(integer, text),
                            syncworker.cron_error(text) TO syncworker_admin;
  RETURN later;
END
$$;

-- Functions are callable by PUBLIC unless revoked: only the roles above (and the owner) may
-- call these.  (PUBLIC has no USAGE on the schema either; this keeps the runner's functions,
-- such as abandon_run, from a role that has USAGE for other reasons, like the admin.)
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA syncworker FROM PUBLIC;

SELECT syncworker.setup_roles();
