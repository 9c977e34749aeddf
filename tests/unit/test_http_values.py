"""Pure parts of the `http` connector: JSON paths, cursor order and lookback, Retry-After, backoff."""

from __future__ import annotations

import email.utils
import itertools

import httpx

from worker.connectors.http import cursor_key, dig, retry_after_seconds, retry_waits, with_lookback
from worker.connectors.http.fetch import MAX_RETRY_AFTER, Retryable
from worker.connectors.http.pagination import link_next


def test_dig_follows_dotted_paths_through_objects_and_lists() -> None:
    body = {"data": {"items": [{"id": 1}, {"id": 2}]}, "meta": {"next": None}}
    assert dig(body, "data.items.1.id") == 2
    assert dig(body, "") is body
    assert dig(body, "meta.next") is None  # present and null is not missing
    assert dig(body, "data.items.5") is dig(body, "nope")  # both missing


def test_cursor_values_order_as_times_and_numbers_not_as_text() -> None:
    assert cursor_key("2026-01-01T10:00:00Z") > cursor_key("2026-01-01T09:00:00+00:00")
    assert cursor_key("2026-01-01T10:00:00+02:00") < cursor_key("2026-01-01T09:00:00Z")
    assert cursor_key(10) > cursor_key(9.5)
    assert max(["b", "a", "c"], key=cursor_key) == "c"


def test_lookback_moves_times_and_numbers_back_and_keeps_the_format() -> None:
    assert with_lookback("2026-01-01T00:00:10Z", 60) == "2025-12-31T23:59:10Z"
    assert with_lookback("2026-01-01T00:00:10+00:00", 10) == "2026-01-01T00:00:00+00:00"
    assert with_lookback(1000, 100) == 900
    assert with_lookback("opaque-token", 100) == "opaque-token"
    assert with_lookback("2026-01-01T00:00:10Z", 0) == "2026-01-01T00:00:10Z"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("7") == 7.0
    now = 1_800_000_000.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap() -> None:
    waits = retry_waits(base=1, cap=8, rand=lambda: 1.0)
    next(waits)
    plain = Retryable("HTTP 500", error_type="upstream_http")
    assert [waits.send(plain) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    jittered = retry_waits(base=1, cap=8, rand=lambda: 0.25)
    next(jittered)
    assert list(itertools.islice((jittered.send(plain) for _ in itertools.count()), 3)) == [0.25, 0.5, 1.0]


def test_retry_after_wins_over_backoff_and_is_capped() -> None:
    waits = retry_waits(base=1, cap=8, rand=lambda: 0.0)
    next(waits)
    assert waits.send(Retryable("429", error_type="upstream_http", retry_after=20)) == 20
    assert waits.send(Retryable("429", error_type="upstream_http", retry_after=10**6)) == MAX_RETRY_AFTER


def test_link_header_next_is_found_among_other_relations() -> None:
    headers = httpx.Headers(
        {"Link": '<https://a.test/x?page=1>; rel="first", <https://a.test/x?page=3>; rel="next last"'}
    )
    assert link_next(headers) == "https://a.test/x?page=3"
    assert link_next(httpx.Headers({"Link": '<https://a.test/x?page=1>; rel="prev"'})) is None
    assert link_next(httpx.Headers()) is None
