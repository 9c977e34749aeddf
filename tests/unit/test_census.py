"""When a worker wakes the leader: only as it starts running while none of its runs ran."""

from __future__ import annotations

from worker.run.census import Census


def census() -> tuple[Census, list[int]]:
    calls: list[int] = []
    return Census(lambda: calls.append(1)), calls


def test_the_first_claim_of_an_idle_worker_is_announced_once() -> None:
    c, calls = census()
    c.claimed([1, 2, 3])
    c.claimed([4])
    assert len(calls) == 1 and len(c) == 4


def test_a_claim_while_another_run_still_runs_is_not_announced() -> None:
    c, calls = census()
    c.claimed([1])
    c.claimed([2])
    c.finishing(1)
    c.claimed([3])
    assert len(calls) == 1


def test_a_claim_after_every_run_began_finishing_is_announced_again() -> None:
    c, calls = census()
    c.claimed([1])
    c.finishing(1)
    c.finishing(1)  # idempotent: a run's end may be reported from several places
    c.claimed([2])
    assert len(calls) == 2 and len(c) == 1


def test_a_job_claimed_in_the_same_commit_as_the_previous_runs_end_is_not_announced() -> None:
    c, calls = census()
    c.claimed([1])
    c.finishing(1)
    c.claimed([2], replacing=True)
    c.finishing(2)
    c.claimed([3], replacing=True)
    assert len(calls) == 1 and len(c) == 1


def test_an_empty_claim_announces_nothing() -> None:
    c, calls = census()
    c.claimed([])
    assert calls == [] and len(c) == 0
