"""`http`: a paginated JSON API into a table.

One run walks the pages, maps each record to columns and loads each page through
the staging loader.  State (the incremental cursor) is saved only when every page
has landed, in the same transaction as the data when the destination is the
control database: a crash or a failure re-reads from the old cursor, and upserts
make the repeat harmless.

Every request first takes a slot from the host's fleet-wide rate limit and asks the
host's circuit breaker (both kept in Postgres, shared by all replicas); it is
retried with exponential backoff and jitter (or after `Retry-After`) on connection
errors, timeouts, 429 and 5xx, and a truncated body; any other 4xx fails at once.

The parts: `config` (the job's settings, checked), `paths` (JSON paths and cursor
values), `limits` (rate limit and circuit breaker), `fetch` (one request, retried),
`pagination` (the pages of one read) and `sync` (one run).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.connectors.base import Connector, RunContext, RunResult
from worker.connectors.http.config import HttpConfig, parse_config
from worker.connectors.http.fetch import Fetcher, retry_after_seconds, retry_waits
from worker.connectors.http.limits import Host
from worker.connectors.http.paths import cursor_key, dig, with_lookback
from worker.connectors.http.sync import Sync
from worker.connectors.load import destination_session


class HttpConnector(Connector):
    kind = "http"

    def validate(self, config: Mapping[str, Any]) -> HttpConfig:
        return parse_config(config)

    async def run(self, ctx: RunContext) -> RunResult:
        cfg: HttpConfig = ctx.config
        async with (
            Host(ctx.conn, cfg) as host,
            Fetcher(cfg, host, ctx) as fetcher,
            destination_session(ctx, cfg.destination) as dest,
        ):
            return await Sync(ctx, cfg, fetcher, dest).run()


__all__ = [
    "HttpConfig",
    "HttpConnector",
    "cursor_key",
    "dig",
    "retry_after_seconds",
    "retry_waits",
    "with_lookback",
]
