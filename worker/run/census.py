"""This worker's runs that are certainly running, so that it wakes the rescuers without a
NOTIFY per run."""

from __future__ import annotations

from collections.abc import Callable


class Census:
    """This worker's runs that are certainly running, so that it can wake the leader without
    a NOTIFY per run.

    The leader's rescuer sleeps while no run exists anywhere and wakes on a "runs_started"
    NOTIFY.  A worker announces a claim only when none of its other runs is certainly
    running.  That is enough: if the leader last saw no run at all, the first run claimed
    after that is claimed by a worker that has no run counted here, so it announces it.  A
    run stops counting before anything that may end it is sent (`finishing`), and a job
    claimed in the same commit as the previous run's end (`replacing=True`) needs no
    announcement: the leader sees either the old run or the new one.
    """

    def __init__(self, announce: Callable[[], None] = lambda: None) -> None:
        self.announce = announce
        self._runs: set[int] = set()

    def quiet(self) -> bool:
        """No run of this worker is certainly running: its next claim must wake the rescuers
        (the claim statement sends that NOTIFY itself, so that it commits with the claim)."""
        return not self._runs

    def claimed(self, run_ids: list[int], *, replacing: bool = False, announced: bool = False) -> None:
        """Runs whose claim has just been committed (`announced`: by a claim that woke the rescuers)."""
        if run_ids and not self._runs and not replacing and not announced:
            self.announce()
        self._runs.update(run_ids)

    def finishing(self, run_id: int) -> None:
        """The run may end from now on (idempotent)."""
        self._runs.discard(run_id)

    def __len__(self) -> int:
        return len(self._runs)
