-- sync_runs.worker_id says which replica ran a run; it is no longer a foreign key.
-- Every claim took a KEY SHARE lock on its worker's row for that key, and concurrent
-- claims by one replica's sessions turned those locks into a multixact per run. The
-- pruner now clears the ids of the replicas it forgets (prune_workers).
ALTER TABLE syncworker.sync_runs DROP CONSTRAINT sync_runs_worker_id_fkey;
