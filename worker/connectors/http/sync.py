"""One run of an `http` job: every page's records mapped to rows and loaded, then the cursor."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from worker import secrets
from worker.connectors.base import RunContext, RunResult
from worker.connectors.http.config import HttpConfig
from worker.connectors.http.fetch import Fetcher
from worker.connectors.http.pagination import Pager
from worker.connectors.http.paths import MISSING, column_value, cursor_key, dig
from worker.connectors.load import Loader

Conn = AsyncConnection[TupleRow]


@dataclass
class Sync:
    ctx: RunContext
    cfg: HttpConfig
    fetcher: Fetcher
    conn: Conn
    read: int = 0
    cursor: Any = None

    async def run(self) -> RunResult:
        cfg = self.cfg
        columns = list(cfg.mapping)
        loader = Loader(self.conn, cfg.destination, columns, self.ctx, track_seen=cfg.delete_missing)
        await loader.prepare()
        start_cursor = None
        if cfg.incremental is not None:
            start_cursor = self.ctx.state.get("cursor", cfg.incremental.initial)
            if isinstance(start_cursor, Mapping):
                start_cursor = secrets.resolve(start_cursor, "incremental.initial")
            self.cursor = start_cursor
        try:
            async for records in Pager(cfg, self.fetcher).pages(start_cursor):
                rows = [row for row in map(self.to_row, records) if row is not None]
                self.read += len(records)
                if rows:
                    await loader.write_batch(rows)
            if cfg.delete_missing:
                await loader.delete_unseen()  # every page landed: what is missing is gone
        finally:
            await loader.close()
        state = dict(self.ctx.state)
        if cfg.incremental is not None and self.cursor is not None:
            state["cursor"] = self.cursor
        self.ctx.log.info(
            "%s records from %s requests: %s inserted, %s updated, %s deleted",
            self.read,
            self.fetcher.requests,
            loader.counts.inserted,
            loader.counts.updated,
            loader.counts.deleted,
        )
        return loader.counts.result(self.ctx, self.read, state)

    def to_row(self, record: Any) -> tuple[Any, ...] | None:
        """A record as a row of the mapped columns; None (and a record error) if it cannot be."""
        if not isinstance(record, Mapping):
            self.ctx.record_error(None, f"a record is not a JSON object: {json.dumps(record)[:200]}")
            return None
        key_values = [dig(record, self.cfg.mapping[k]) for k in self.cfg.destination.key]
        if any(v is MISSING or v is None for v in key_values):
            shown = ",".join("?" if v is MISSING else str(v) for v in key_values)
            paths = ", ".join(self.cfg.mapping[k] for k in self.cfg.destination.key)
            self.ctx.record_error(
                shown,
                f"record has no key value ({paths})",
                context={"record": _preview(record)},
            )
            return None
        if self.cfg.incremental is not None:
            value = dig(record, self.cfg.incremental.cursor_field)
            present = value is not MISSING and value is not None
            if present and (self.cursor is None or cursor_key(value) > cursor_key(self.cursor)):
                self.cursor = value
        row = []
        for path in self.cfg.mapping.values():
            value = dig(record, path)
            row.append(None if value is MISSING else column_value(value))
        return tuple(row)


def _preview(record: Mapping[str, Any]) -> str:
    text = json.dumps(record, default=str)
    return text if len(text) <= 300 else text[:300] + "…"
