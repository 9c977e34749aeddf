"""Pagination of `http` jobs: the pages of one read, followed until a stop condition.

The types: `none`, `page` (a page number), `offset`, `cursor` (from the body), `next_url`
(from the body) and `link_header` (`rel="next"`).  A page asked for twice, or the same page
answered twice, is a pagination loop and fails the run.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from worker.connectors.base import SyncError
from worker.connectors.http.config import HttpConfig
from worker.connectors.http.fetch import Fetcher, Page, safe_url
from worker.connectors.http.paths import MISSING, dig, with_lookback
from worker.errors import ErrorType


@dataclass
class Pager:
    """Walks the pages of one read; remembers what it asked for and what came back."""

    cfg: HttpConfig
    fetcher: Fetcher
    seen_requests: set[str] = field(default_factory=set)
    seen_pages: set[str] = field(default_factory=set)

    async def pages(self, start_cursor: Any) -> AsyncIterator[list[Any]]:
        """Every page's records, following the configured pagination until a stop condition."""
        p = self.cfg.pagination
        params: dict[str, Any] = dict(self.fetcher.base_params)
        if self.cfg.incremental is not None and start_cursor is not None:
            params[self.cfg.incremental.param] = with_lookback(start_cursor, self.cfg.incremental.lookback)
        if p.size is not None and p.size_param:
            params[p.size_param] = p.size
        url: str | None = self.cfg.url
        number = p.start if p.type == "page" else 0
        read = 0
        for index in range(p.max_pages + 1):
            if index == p.max_pages:
                raise SyncError(
                    f"stopped after pagination.max_pages ({p.max_pages}) pages",
                    error_type=ErrorType.PAGINATION_LOOP,
                )
            assert url is not None
            if p.type in ("page", "offset"):
                params[p.param] = number if p.type == "page" else read
            page, records = await self._fetch(url, params)
            read += len(records)
            yield records
            if not records or p.type == "none" or self._read_all(page, read):
                return
            number += 1
            url, params = self._next(page, url, params)
            if url is None:
                return

    async def _fetch(self, url: str, params: dict[str, Any]) -> tuple[Page, list[Any]]:
        """One page and its records; a page asked for or answered twice is a pagination loop."""
        request_id = url + "?" + json.dumps(params, sort_keys=True, default=str)
        if request_id in self.seen_requests:
            raise SyncError(
                f"{safe_url(url)}: the same page was requested twice", error_type=ErrorType.PAGINATION_LOOP
            )
        self.seen_requests.add(request_id)
        page = await self.fetcher.get(url, params)
        records = dig(page.body, self.cfg.records_path)
        if records is MISSING or not isinstance(records, list):
            raise SyncError(
                f"{safe_url(url)}: no list of records at records_path {self.cfg.records_path!r}",
                error_type=ErrorType.UPSTREAM_INVALID,
            )
        if records and page.digest in self.seen_pages:
            raise SyncError(
                f"{safe_url(url)}: the same page came back twice", error_type=ErrorType.PAGINATION_LOOP
            )
        self.seen_pages.add(page.digest)
        return page, records

    def _read_all(self, page: Page, read: int) -> bool:
        """Does the page say there is no more (has_more_path false, total_path reached)?"""
        p = self.cfg.pagination
        if p.has_more_path is not None and not dig(page.body, p.has_more_path):
            return True
        total = dig(page.body, p.total_path) if p.total_path is not None else None
        return isinstance(total, int | float) and read >= total

    def _next(self, page: Page, url: str, params: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Where the next page is (the URL, or None when there is none) and its parameters."""
        p = self.cfg.pagination
        if p.type == "cursor":
            cursor = dig(page.body, p.cursor_path)
            if cursor is MISSING or cursor in (None, ""):
                return None, params
            return url, {**params, p.param: cursor}
        if p.type in ("next_url", "link_header"):
            nxt = dig(page.body, p.next_url_path) if p.type == "next_url" else link_next(page.headers)
            if nxt is MISSING or not nxt:
                return None, params
            url = urljoin(page.url, str(nxt))
            # the next URL carries its own query: keep only what must go with every request
            return url, dict(self.fetcher.base_params) if urlsplit(url).query == "" else {}
        return url, params


def link_next(headers: httpx.Headers) -> str | None:
    for part in headers.get_list("Link", split_commas=True):
        match = re.match(r"\s*<([^>]*)>\s*;(.*)", part)
        if match and re.search(r'rel\s*=\s*"?([^";]*\s)?next(\s[^";]*)?"?', match.group(2)):
            return match.group(1)
    return None
