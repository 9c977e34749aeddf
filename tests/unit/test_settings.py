"""Flags, SYNCWORKER_* variables and their errors."""

from __future__ import annotations

import pytest

from worker.daemon.settings import SETTINGS, Settings, SettingsError


def test_defaults() -> None:
    s = Settings.load({}, env={})
    assert (s.concurrency, s.mode, s.grace_period, s.retention_days) == (4, "active", 30.0, 30)


def test_environment_then_flags_win() -> None:
    env = {"SYNCWORKER_CONCURRENCY": "8", "SYNCWORKER_MODE": "single"}
    assert Settings.load({}, env=env).concurrency == 8
    s = Settings.load({"concurrency": "2"}, env=env)
    assert (s.concurrency, s.mode) == (2, "single")


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (
            {},
            {"SYNCWORKER_CONCURRENCY": "many"},
            "SYNCWORKER_CONCURRENCY: expected a positive integer, got 'many'",
        ),
        ({"concurrency": "0"}, {}, "--concurrency: expected a positive integer, got '0'"),
        ({"mode": "leader"}, {}, "--mode: expected one of active, single, got 'leader'"),
        ({"grace_period": "-1"}, {}, "--grace-period: expected a positive number of seconds"),
        ({}, {"SYNCWORKER_LOG_FORMAT": "xml"}, "SYNCWORKER_LOG_FORMAT: expected one of text, json"),
    ],
)
def test_bad_values_name_the_flag_or_variable(
    flags: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.load(flags, env=env)
    assert message in str(err.value)


def test_every_setting_is_a_field() -> None:
    fields = Settings.__dataclass_fields__
    for setting in SETTINGS:
        assert setting.name in fields
        assert fields[setting.name].default == setting.default
