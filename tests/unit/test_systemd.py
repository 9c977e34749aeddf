"""sd_notify against a real unix datagram socket, and the unit files' contract."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT
from worker.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_stopping_watchdog_and_status(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    notifier.ready("worker 7 running")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=worker 7 running"
    notifier.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"swtest-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        Notifier().ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_systemd_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()
    notifier.stopping()


def test_a_missing_socket_does_not_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    Notifier().ready()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier().watchdog_interval() == 15
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval() == 15
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier().watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Notifier().watchdog_interval() is None


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / name)
    return parser


@pytest.mark.parametrize("name", ["syncworker.service", "syncworker@.service"])
def test_unit_files(name: str) -> None:
    service = _unit(name)["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    assert int(service["WatchdogSec"]) > 0
    assert int(service["TimeoutStopSec"]) > 30  # above the default grace period
    assert (
        service["EnvironmentFile"].startswith("/etc/syncworker/")
        or "syncworker" in service["EnvironmentFile"]
    )
    assert service["ExecStart"].endswith("syncworker run")
    for key in (
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "RestrictAddressFamilies",
        "CapabilityBoundingSet",
        "SystemCallArchitectures",
    ):
        assert key in service, key
    assert _unit(name)["Install"]["WantedBy"] == "multi-user.target"


def test_template_reads_a_per_instance_environment_file() -> None:
    text = (ROOT / "systemd" / "syncworker@.service").read_text()
    assert "EnvironmentFile=-/etc/syncworker/syncworker-%i.env" in text


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["syncworker.service", "syncworker@.service"])
def test_systemd_analyze_verify_accepts_the_units(name: str, tmp_path: Path) -> None:
    # Point ExecStart at this checkout's executable so that verify can check it exists.
    executable = Path(sys.executable).parent / "syncworker"
    unit = tmp_path / (name.replace("@", "@test") if "@" in name else name)
    text = (ROOT / "systemd" / name).read_text()
    unit.write_text(text.replace("/opt/syncworker/.venv/bin/syncworker", str(executable)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if unit.name in line or "Unknown" in line or "Invalid" in line
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
