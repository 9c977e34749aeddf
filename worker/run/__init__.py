"""One run of one job: the runner (I/O), its pure outcome, the schedule and cron math, the
after_success hooks, the row check shared with `syncworker check`, and `run-once`."""
