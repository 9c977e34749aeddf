"""Daemon settings: every flag of `syncworker run` and its SYNCWORKER_* environment variable."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class SettingsError(ValueError):
    """A flag or environment variable has a value that cannot be used."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise SettingsError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise SettingsError(f"expected a positive number of seconds, got {text!r}")
    return value


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise SettingsError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text.lower()

    return parse


def http_address(text: str) -> str:
    """HOST:PORT, [IPv6]:PORT or a bare PORT (which binds 127.0.0.1); "" or "off": no server."""
    from worker.ops.address import parse_address

    if text.strip().lower() in ("", "off"):
        return ""
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def module_prefixes(text: str) -> str:
    """Comma-separated module names (`myapp.sync,reports`), spaces dropped; "" for none."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if not _MODULE.fullmatch(name):
            raise SettingsError(
                f"expected comma-separated module names (e.g. myapp.sync,reports), got {name!r}"
            )
    return ",".join(names)


def boolean(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return "SYNCWORKER_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# The single list of daemon settings; the CLI, the README table and the tests read it.
SETTINGS = [
    Setting("concurrency", 4, positive_int, "jobs this replica runs at once"),
    Setting(
        "mode",
        "active",
        one_of("active", "single"),
        "active: every replica runs jobs; single: only the leader does, the rest stand by",
    ),
    Setting(
        "poll_interval",
        60.0,
        positive_float,
        "longest sleep between looks at the table (NOTIFY and due times wake it sooner)",
    ),
    Setting(
        "grace_period",
        30.0,
        positive_float,
        "seconds to let running jobs finish after SIGTERM before they are cancelled",
    ),
    Setting(
        "heartbeat_interval",
        30.0,
        positive_float,
        "seconds between heartbeats in syncworker.workers",
    ),
    Setting(
        "rescue_interval",
        1.0,
        positive_float,
        "leader: seconds between checks for runs whose worker died, while runs exist",
    ),
    Setting("retention_days", 30, positive_int, "leader: days to keep finished runs and resolved errors"),
    Setting("max_backoff", 21600.0, positive_float, "longest delay between retries of a failing job"),
    Setting("log_format", "text", one_of("text", "json"), "text or json (one object per line)"),
    Setting("log_level", "info", one_of("debug", "info", "warning", "error"), "log level"),
    Setting(
        "http",
        "",
        http_address,
        "serve /healthz, /readyz, /health, /metrics and the status page on HOST:PORT "
        "(a bare PORT binds 127.0.0.1); off when empty",
    ),
    Setting(
        "http_insecure",
        False,
        boolean,
        "allow --http on a non-loopback address without SYNCWORKER_HTTP_TOKEN",
    ),
    Setting(
        "python_modules",
        "",
        module_prefixes,
        "modules python jobs may call, comma-separated prefixes (reports allows reports.daily); "
        "none when empty",
    ),
    Setting(
        "allow_superuser_jobs",
        False,
        boolean,
        "run sql jobs without run_as even when the worker's login is a superuser (refused otherwise)",
    ),
]


@dataclass(frozen=True)
class Settings:
    concurrency: int = 4
    mode: str = "active"
    poll_interval: float = 60.0
    grace_period: float = 30.0
    heartbeat_interval: float = 30.0
    rescue_interval: float = 1.0
    retention_days: int = 30
    max_backoff: float = 21600.0
    log_format: str = "text"
    log_level: str = "info"
    http: str = ""
    http_insecure: bool = False
    python_modules: str = ""
    allow_superuser_jobs: bool = False
    database_url: str = ""

    @classmethod
    def load(
        cls,
        flags: Mapping[str, str | None],
        env: Mapping[str, str] | None = None,
        database_url: str = "",
    ) -> Settings:
        """Flags win over SYNCWORKER_* variables, which win over defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {"database_url": database_url}
        for setting in SETTINGS:
            raw = flags.get(setting.name)
            source = setting.flag
            if raw is None:
                raw, source = env.get(setting.env), setting.env
            if raw is None or raw == "":
                continue
            try:
                values[setting.name] = setting.parse(str(raw))
            except SettingsError as exc:
                raise SettingsError(f"{source}: {exc}") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


ALLOW_SUPERUSER_JOBS = next(s for s in SETTINGS if s.name == "allow_superuser_jobs")


def allow_superuser_jobs(flag: bool | None = None, env: Mapping[str, str] | None = None) -> bool:
    """--allow-superuser-jobs (`run`, `run-once`, `check`), else SYNCWORKER_ALLOW_SUPERUSER_JOBS."""
    if flag is not None:
        return flag
    raw = (os.environ if env is None else env).get(ALLOW_SUPERUSER_JOBS.env, "")
    try:
        return bool(ALLOW_SUPERUSER_JOBS.parse(raw)) if raw else False
    except SettingsError as exc:
        raise SettingsError(f"{ALLOW_SUPERUSER_JOBS.env}: {exc}") from None


PYTHON_MODULES = next(s for s in SETTINGS if s.name == "python_modules")


def python_modules(env: Mapping[str, str] | None = None) -> list[str]:
    """The module prefixes python jobs may call: SYNCWORKER_PYTHON_MODULES of this process
    (`run --python-modules` sets it for the worker), read each time a job is checked."""
    raw = (os.environ if env is None else env).get(PYTHON_MODULES.env, "")
    parsed: str = PYTHON_MODULES.parse(raw)
    return parsed.split(",") if parsed else []
