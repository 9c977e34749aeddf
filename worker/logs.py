"""Logging: text or JSON lines, each carrying the integration and run it belongs to, secrets masked."""

from __future__ import annotations

import contextvars
import logging
import sys
import time

from worker.secrets import redact

integration_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("integration", default=None)
run_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("run_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(run_tag)s: %(message)s"


class RunContextFilter(logging.Filter):
    """Adds `integration` and `run_id` to every record and masks secrets in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        integration = getattr(record, "integration", None) or integration_var.get()
        run_id = getattr(record, "run_id", None) or run_id_var.get()
        record.integration = integration
        record.run_id = run_id
        shown = integration
        if integration and not integration.isprintable():  # a name with a newline: one line still
            shown = integration.encode("unicode_escape").decode()
        record.run_tag = f" [{shown} run={run_id}]" if integration else ""
        message = redact(record.getMessage())
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _json_formatter() -> logging.Formatter:
    try:
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:  # python-json-logger < 3
        from pythonjsonlogger.jsonlogger import JsonFormatter  # type: ignore[attr-defined]

    formatter: logging.Formatter = JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(integration)s %(run_id)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )
    return formatter


class _TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the time of day formatted once a second rather than once a line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"


def setup(log_format: str = "text", level: str = "INFO") -> None:
    # No line says which source line, thread or process logged it: skip finding out (the
    # stack walk costs more than the rest of a line).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RunContextFilter())
    handler.setFormatter(_json_formatter() if log_format == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at INFO is not useful in a daemon's journal.
    for noisy in ("httpx", "httpcore", "alembic.runtime.migration", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def bind(integration: str | None, run_id: int | None) -> None:
    """Tag every log line of the current task with this integration and run."""
    integration_var.set(integration)
    run_id_var.set(run_id)
