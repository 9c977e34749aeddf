"""The `error_type` values of `sync_runs` and `sync_errors`: one enumeration, the codes users
filter on.  Connectors and plugins may add their own; these are the ones syncworker writes."""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    """Each code, with what it means (the README's table lists the same)."""

    CONFIG_INVALID = "config_invalid"  # the row cannot be run: config, kind or schedule (job disabled)
    SECRET_UNAVAILABLE = "secret_unavailable"  # a secret reference could not be read
    TIMEOUT = "timeout"  # the run passed timeout_seconds
    ABANDONED = "abandoned"  # its worker died, lost its session or shut down; the job runs again
    CRASH_LOOP = "crash_loop"  # max_abandons runs in a row were abandoned: the job is disabled
    CONNECTION = "connection"  # a database or network connection failed
    SERVER_TIMEOUT = "server_timeout"  # a timeout of the server's ended the run's session or statement
    SQL_ERROR = "sql_error"  # a statement failed
    EXCEPTION = "exception"  # the job's code raised something else
    BAD_RESULT = "bad_result"  # a python job returned something that is not a result
    CRASHED = "crashed"  # the child process of an isolated python job died during the run
    RECORD_INVALID = "record_invalid"  # one record could not be loaded (the run is partial)
    SOURCE_INVALID = "source_invalid"  # the source table or query is not usable
    DESTINATION_INVALID = "destination_invalid"  # the destination table is not usable
    UPSTREAM_HTTP = "upstream_http"  # an HTTP error status (after retries for 429 and 5xx)
    UPSTREAM_INVALID = "upstream_invalid"  # an upstream answer that is not what the config says
    RESPONSE_TOO_LARGE = "response_too_large"  # a body over max_response_bytes
    PAGINATION_LOOP = "pagination_loop"  # a page seen twice, or max_pages passed
    CIRCUIT_OPEN = "circuit_open"  # the host's circuit breaker is open
    HOOK_FAILED = "hook_failed"  # an after_success hook failed (the run keeps its status)
    SYNC_FAILED = "sync_failed"  # a plugin's SyncError that names no type of its own
    INTERNAL = "internal"  # the worker could not record something (a bug, or a row it cannot write)
