-- Per-host state shared by every replica for the http connector: a fleet-wide rate limit
-- and a circuit breaker. Both are plain tables an operator can read (and reset).

CREATE TABLE syncworker.rate_limits (
  host            text PRIMARY KEY,
  -- generic cell rate algorithm: the theoretical arrival time of the next request
  tat             timestamptz NOT NULL DEFAULT 'epoch',
  last_request_at timestamptz NOT NULL DEFAULT 'epoch',
  requests        bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE syncworker.rate_limits IS
  'http connector: one row per upstream host; request slots are taken here by every replica';

CREATE TABLE syncworker.circuit_breakers (
  host                 text PRIMARY KEY,
  state                text NOT NULL DEFAULT 'closed'
                         CONSTRAINT circuit_breakers_state_check
                         CHECK (state IN ('closed', 'open', 'half_open')),
  consecutive_failures int NOT NULL DEFAULT 0,
  opened_at            timestamptz,
  trial_started_at     timestamptz,
  last_error           text,
  updated_at           timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE syncworker.circuit_breakers IS
  'http connector: one row per upstream host; open = requests fail fast until the cool-down ends';

-- Take one request slot for `host`: 0 when granted, else the seconds to wait before asking
-- again. `emission` = per_seconds / requests, `burst` = how far ahead of schedule requests may
-- run (per_seconds - emission: a full budget at once), `gap` = the minimum seconds between
-- two requests. Atomic across replicas (the row is locked while it is decided).
CREATE FUNCTION syncworker.take_request_slot(p_host text, emission double precision,
                                             burst double precision, gap double precision)
RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
  r syncworker.rate_limits;
  now_ timestamptz := clock_timestamp();
  wait double precision;
BEGIN
  INSERT INTO syncworker.rate_limits (host) VALUES (p_host) ON CONFLICT (host) DO NOTHING;
  SELECT * INTO r FROM syncworker.rate_limits WHERE host = p_host FOR UPDATE;
  wait := greatest(
    extract(epoch FROM greatest(r.tat, now_) - now_) - burst,
    extract(epoch FROM r.last_request_at - now_) + gap,
    0);
  IF wait > 0 THEN
    RETURN wait;
  END IF;
  UPDATE syncworker.rate_limits
     SET tat = greatest(tat, now_) + make_interval(secs => emission),
         last_request_at = now_, requests = requests + 1
   WHERE host = p_host;
  RETURN 0;
END $$;

-- May a request go to `host` now? 'closed' (yes), 'trial' (yes: the one request that tests
-- a host whose breaker has cooled down; no other replica gets one until it reports), or
-- 'open' (no). A trial that never reported (its worker died) is given again after the
-- cool-down.
CREATE FUNCTION syncworker.circuit_allow(p_host text, cooldown double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  b syncworker.circuit_breakers;
BEGIN
  SELECT * INTO b FROM syncworker.circuit_breakers WHERE host = p_host FOR UPDATE;
  IF NOT FOUND OR b.state = 'closed' THEN
    RETURN 'closed';
  END IF;
  IF coalesce(b.trial_started_at, b.opened_at) + make_interval(secs => cooldown) > clock_timestamp() THEN
    RETURN 'open';
  END IF;
  UPDATE syncworker.circuit_breakers
     SET state = 'half_open', trial_started_at = clock_timestamp(), updated_at = clock_timestamp()
   WHERE host = p_host;
  RETURN 'trial';
END $$;

-- Report a request's outcome: a success closes the breaker; a failure counts, and opens it
-- at `threshold` failures in a row, or at once when it was a trial.
CREATE FUNCTION syncworker.circuit_record(p_host text, ok boolean, threshold int, error text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  result text;
BEGIN
  IF ok THEN
    UPDATE syncworker.circuit_breakers
       SET state = 'closed', consecutive_failures = 0, opened_at = NULL, trial_started_at = NULL,
           updated_at = clock_timestamp()
     WHERE host = p_host AND (state <> 'closed' OR consecutive_failures > 0);
    RETURN 'closed';
  END IF;
  INSERT INTO syncworker.circuit_breakers AS b (host, consecutive_failures, last_error, updated_at)
  VALUES (p_host, 1, error, clock_timestamp())
  ON CONFLICT (host) DO UPDATE
     SET consecutive_failures = b.consecutive_failures + 1, last_error = EXCLUDED.last_error,
         updated_at = EXCLUDED.updated_at
  RETURNING CASE WHEN b.state = 'half_open' OR b.consecutive_failures >= threshold THEN 'open'
                 ELSE b.state END INTO result;
  IF result = 'open' THEN
    UPDATE syncworker.circuit_breakers
       SET state = 'open', opened_at = clock_timestamp(), trial_started_at = NULL
     WHERE host = p_host;
  END IF;
  RETURN result;
END $$;
