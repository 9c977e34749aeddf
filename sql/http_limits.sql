-- http jobs: each upstream host's fleet-wide rate limit and circuit breaker.
-- Every replica takes request slots from syncworker.rate_limits and asks
-- syncworker.circuit_breakers before each request; both are plain tables.

-- Hosts whose breaker is not closed, and when the next trial request may go.
SELECT b.host, b.state, b.consecutive_failures, b.last_error, b.opened_at,
       coalesce(b.trial_started_at, b.opened_at) AS cooling_since
  FROM syncworker.circuit_breakers b
 WHERE b.state <> 'closed'
 ORDER BY b.opened_at;

-- Requests sent per host since the row was created, and the last one.
SELECT host, requests, last_request_at,
       greatest(tat - clock_timestamp(), interval '0') AS next_free_slot_in
  FROM syncworker.rate_limits
 ORDER BY last_request_at DESC;

-- Close a breaker by hand (the upstream is fixed and you do not want to wait for the
-- cool-down): the next request goes out at once. This file only reads: to write, copy the
-- statement below, uncomment it, put in the host and run it yourself.
-- UPDATE syncworker.circuit_breakers
--    SET state = 'closed', consecutive_failures = 0, opened_at = NULL, trial_started_at = NULL,
--        updated_at = now()
--  WHERE host = 'api.example.com';
