"""Who may run a `sql` job: the pure rule behind run_as and the superuser refusal."""

from __future__ import annotations

import pytest

from worker.connectors.base import ConfigError
from worker.connectors.sql import Session, SqlConnector, on_control_session, refusal

LOGIN = Session("etl", login_superuser=False)
SUPERUSER = Session("postgres", login_superuser=True)


def member(of_superuser: bool = False, login: Session = LOGIN) -> Session:
    return Session(login.login, login.login_superuser, found=True, member=True, role_superuser=of_superuser)


def test_a_login_that_is_not_a_superuser_runs_jobs_without_run_as() -> None:
    assert refusal(None, LOGIN, allow_superuser=False) is None


def test_a_superusers_session_refuses_jobs_without_run_as_and_says_how_to_fix_it() -> None:
    reason = refusal(None, SUPERUSER, allow_superuser=False)
    assert reason is not None
    for fix in ('"postgres", a superuser', "set run_as", "not a superuser", "--allow-superuser-jobs"):
        assert fix in reason
    assert refusal(None, SUPERUSER, allow_superuser=True) is None
    assert refusal("reporting", member(login=SUPERUSER), allow_superuser=False) is None


def test_run_as_needs_an_existing_role_the_login_is_a_member_of_and_no_superuser() -> None:
    assert refusal("gone", LOGIN, allow_superuser=False) == 'role "gone" does not exist'
    stranger = Session("etl", False, found=True, member=False)
    assert refusal("reporting", stranger, allow_superuser=True) == (
        'the worker\'s login "etl" is not a member of role "reporting": GRANT "reporting" TO "etl"'
    )
    assert refusal("reporting", member(), allow_superuser=False) is None
    reason = refusal("admin", member(of_superuser=True), allow_superuser=False)
    assert reason is not None and 'role "admin" is a superuser' in reason
    assert refusal("admin", member(of_superuser=True), allow_superuser=True) is None


@pytest.mark.parametrize(
    ("run_as", "problem"),
    [(42, "run_as: expected the name of a role"), ("", "run_as: expected a role name of 1 to 63 bytes")],
)
def test_run_as_must_be_a_role_name(run_as: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        SqlConnector().validate({"statement": "SELECT 1", "run_as": run_as})
    assert SqlConnector().validate({"statement": "SELECT 1", "run_as": "reporting"}).run_as == "reporting"


def test_check_and_run_once_ask_their_session_only_about_jobs_on_the_control_database() -> None:
    assert on_control_session("sql", {"statement": "SELECT 1"}) == (None,)
    assert on_control_session("sql", {"statement": "SELECT 1", "run_as": "r"}) == ("r",)
    assert on_control_session("sql", {"statement": "SELECT 1", "dsn": {"env": "X"}}) is None
    assert on_control_session("python", {"callable": "m:f"}) is None
