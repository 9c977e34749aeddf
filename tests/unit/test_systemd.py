"""sd_notify against a real unix datagram socket, and the unit files' contract."""

from __future__ import annotations

import configparser
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT
from worker.daemon import systemd
from worker.daemon.settings import SETTINGS, Settings
from worker.daemon.systemd import Notifier, watchdog_interval

UNITS = ["syncworker.service", "syncworker@.service"]


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def notifier() -> Iterator[Notifier]:
    notifier = Notifier()
    yield notifier
    notifier.close()


def nothing_arrives(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    return False


# -- messages -------------------------------------------------------------------------------


def test_ready(notify_socket: socket.socket, notifier: Notifier) -> None:
    assert notifier.enabled
    notifier.ready()
    assert notify_socket.recv(4096) == b"READY=1"


def test_ready_with_status(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.ready("worker 7 running")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=worker 7 running"


def test_stopping(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_watchdog(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_status(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.status("3 running, 12 due")
    assert notify_socket.recv(4096) == b"STATUS=3 running, 12 due"


def test_notify_sends_every_field_in_one_datagram(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.notify(status="reloading", reloading=1, errno=0)
    assert notify_socket.recv(4096) == b"STATUS=reloading\nRELOADING=1\nERRNO=0"
    assert nothing_arrives(notify_socket)


def test_a_newline_in_a_value_cannot_add_a_field(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.status("bad\nSTOPPING=1")
    assert notify_socket.recv(4096) == b"STATUS=bad STOPPING=1"


def test_non_ascii_status(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.status("synchronisé ✓")
    assert notify_socket.recv(4096).decode() == "STATUS=synchronisé ✓"


def test_one_socket_is_reused_until_closed(notify_socket: socket.socket, notifier: Notifier) -> None:
    notifier.ready()
    first = notifier._socket
    notifier.watchdog()
    assert notifier._socket is first is not None
    assert [notify_socket.recv(4096), notify_socket.recv(4096)] == [b"READY=1", b"WATCHDOG=1"]
    notifier.close()
    assert notifier._socket is None
    notifier.close()  # twice is fine


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"swtest-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    notifier = Notifier()
    try:
        notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        notifier.close()
        sock.close()


# -- failures -------------------------------------------------------------------------------


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    try:
        assert not notifier.enabled
        notifier.ready("x")
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        notifier.notify(ready=1)
        assert notifier._socket is None  # not even a file descriptor
        notifier.close()
        assert nothing_arrives(listener)
    finally:
        listener.close()


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_an_unusable_address_disables_notifications(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()
    assert notifier._socket is None


def test_a_missing_socket_does_not_raise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notifier = Notifier()
    with caplog.at_level(logging.DEBUG, logger="syncworker.systemd"):
        notifier.ready("x")
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    assert len(caplog.records) == 3
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert "READY=1" in caplog.records[0].getMessage()


def test_a_socket_that_goes_away_and_comes_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier()
    notifier.ready()  # nobody listening yet
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.close()
        sock.close()


def test_a_full_socket_drops_messages_instead_of_blocking(
    notify_socket: socket.socket, notifier: Notifier
) -> None:
    # The receiver never reads: its queue fills after a few datagrams (net.unix.max_dgram_qlen).
    started = time.monotonic()
    for _ in range(1000):
        notifier.watchdog()
    assert time.monotonic() - started < 5
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_a_path_too_long_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/" + "x" * 200)
    notifier = Notifier()
    notifier.ready()
    notifier.close()


# -- watchdog interval ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("1000000", None, 0.5),
        ("3", None, 0.0000015),
        ("30000000", "other", None),
        (None, None, None),
        (None, "self", None),
        ("0", None, None),
        ("", None, None),
        ("thirty", None, None),
        ("-30000000", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
            monkeypatch.setenv(name, pids.get(value, value))
    if expected is None:
        assert watchdog_interval() is None
    else:
        assert watchdog_interval() == pytest.approx(expected)


def test_watchdog_interval_reads_the_environment_on_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None


# -- unit files -----------------------------------------------------------------------------

SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
}


def _unit(name: str) -> configparser.ConfigParser:
    # strict=False: systemd allows repeated keys (EnvironmentFile=); the last one wins here.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((ROOT / "systemd" / name).read_text())
    return parser


def _values(name: str, key: str) -> list[str]:
    """Every value of a repeated key, in order."""
    pattern = re.compile(rf"^{key}=(.*)$", re.MULTILINE)
    return pattern.findall((ROOT / "systemd" / name).read_text())


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, f"not a plain number of seconds: {value!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.mark.parametrize("name", UNITS)
def test_unit_contract(name: str) -> None:
    unit = _unit(name)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "/opt/syncworker/.venv/bin/syncworker run"
    assert service["Restart"] == "always"
    assert service["RestartSec"] == "2"
    assert _seconds(service["WatchdogSec"]) > 0
    assert _seconds(service["TimeoutStopSec"]) > Settings().grace_period
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert service.get("DynamicUser") == "yes" or service.get("User", "root") != "root"
    for key, value in SANDBOX.items():
        assert service.get(key) == value, key
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    assert {"network-online.target", "postgresql.service"} <= set(unit["Unit"]["After"].split())
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert _values(name, "EnvironmentFile")[0] == "/etc/syncworker/syncworker.env"


def test_the_template_adds_an_optional_per_instance_environment_file() -> None:
    assert _values("syncworker@.service", "EnvironmentFile") == [
        "/etc/syncworker/syncworker.env",
        "-/etc/syncworker/syncworker-%i.env",
    ]
    assert _values("syncworker.service", "EnvironmentFile") == ["/etc/syncworker/syncworker.env"]


def test_the_template_has_the_same_service_settings() -> None:
    single = dict(_unit("syncworker.service")["Service"])
    template = dict(_unit("syncworker@.service")["Service"])
    single.pop("EnvironmentFile")
    template.pop("EnvironmentFile")
    assert single == template
    assert dict(_unit("syncworker.service")["Install"]) == dict(_unit("syncworker@.service")["Install"])


def test_only_real_settings_are_mentioned() -> None:
    known = {"SYNCWORKER_DATABASE_URL"} | {s.env for s in SETTINGS}
    for name in [*UNITS, "syncworker.env.example"]:
        mentioned = set(re.findall(r"SYNCWORKER_[A-Z_]+", (ROOT / "systemd" / name).read_text()))
        assert mentioned <= known, (name, mentioned - known)


def test_the_environment_example_sets_the_database_url() -> None:
    lines = (ROOT / "systemd" / "syncworker.env.example").read_text().splitlines()
    active = [line for line in lines if line and not line.startswith("#")]
    assert [line.split("=", 1)[0] for line in active] == ["SYNCWORKER_DATABASE_URL"]
    commented = {line[1:].split("=", 1)[0] for line in lines if re.match(r"#SYNCWORKER_\w+=", line)}
    assert commented == {
        "SYNCWORKER_CONCURRENCY",
        "SYNCWORKER_MODE",
        "SYNCWORKER_GRACE_PERIOD",
        "SYNCWORKER_LOG_FORMAT",
        "SYNCWORKER_LOG_LEVEL",
        "SYNCWORKER_PYTHON_MODULES",
    }


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_accepts_the_units(name: str, tmp_path: Path) -> None:
    # Point ExecStart at this checkout's executable: verify checks that it exists.
    executable = Path(sys.executable).parent / "syncworker"
    unit = tmp_path / name.replace("@", "@test")
    text = (ROOT / "systemd" / name).read_text()
    unit.write_text(text.replace("/opt/syncworker/.venv/bin/syncworker", str(executable)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "System has not been booted with systemd" in output:
        pytest.skip("systemd-analyze verify cannot run here")
    # Unknown keys are only warnings (exit status 0), printed with the file's name.
    problems = [line for line in output.splitlines() if unit.name in line]
    assert result.returncode == 0 and not problems, output
