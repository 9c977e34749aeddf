-- syncworker schema, version 0009: the `no_leader` alert.  When no replica has led for a
-- while (SYNCWORKER_ALERT_NO_LEADER seconds), any replica opens one incident for the whole
-- fleet and delivers it; the next leader's alert scan closes it and sends the recovery.  Such
-- an incident belongs to no job.

ALTER TABLE syncworker.alerts ALTER COLUMN integration_id DROP NOT NULL;
ALTER TABLE syncworker.alerts DROP CONSTRAINT alerts_kind_known;
ALTER TABLE syncworker.alerts
  ADD CONSTRAINT alerts_kind_known
    CHECK (kind IN ('disabled', 'failing', 'stale', 'overrunning', 'rescued', 'no_leader')),
  ADD CONSTRAINT alerts_job_unless_fleet CHECK ((integration_id IS NULL) = (kind = 'no_leader'));
-- At most one open no_leader incident, whichever replica opens it.
CREATE UNIQUE INDEX alerts_no_leader_idx ON syncworker.alerts (kind)
  WHERE kind = 'no_leader' AND closed_at IS NULL;
