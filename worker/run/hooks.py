"""Post-success hooks: what a job asks for after its data is committed.

Any job's config may carry, next to its connector's settings::

    "after_success": {"redis_invalidate": {"url": {"env": "CACHE_URL"},
                                           "patterns": ["cache:orders:*"]}}

After a `success` or `partial` run has committed, every key matching a pattern is
removed with SCAN + UNLINK (never KEYS, which blocks Redis).  Running after the
commit means a cache refilled at once reads the new data.  A hook failure is
recorded in `sync_errors` (`hook_failed`) and never changes the run's status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker import secrets
from worker.connectors.config import ConfigError, check_secret, reject_unknown, require

KEY = "after_success"
TIMEOUT_SECONDS = 60.0
SCAN_COUNT = 1000

log = logging.getLogger("syncworker.hooks")


@dataclass(frozen=True)
class RedisInvalidate:
    url: Any  # secret reference
    patterns: tuple[str, ...]

    async def run(self) -> str:
        """Unlink every matching key; returns what was done, for the log."""
        import redis.asyncio as aioredis  # here: a worker without such hooks never loads redis

        client = aioredis.Redis.from_url(
            secrets.resolve(self.url, f"{KEY}.redis_invalidate.url"),
            socket_timeout=10,
            socket_connect_timeout=5,
        )
        removed = 0
        try:
            for pattern in self.patterns:
                batch: list[bytes] = []
                async for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
                    batch.append(key)
                    if len(batch) >= SCAN_COUNT:
                        removed += await client.unlink(*batch)
                        batch = []
                if batch:
                    removed += await client.unlink(*batch)
        finally:
            await client.aclose()
        return f"invalidated {removed} redis key(s) matching {', '.join(self.patterns)}"


Hook = RedisInvalidate


def split(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[Hook]]:
    """The connector's part of a job's config, and its parsed hooks (ConfigError if invalid)."""
    if not isinstance(config, Mapping) or KEY not in config:
        return config, []
    rest = {k: v for k, v in config.items() if k != KEY}
    spec = config[KEY]
    if not isinstance(spec, Mapping):
        raise ConfigError(KEY, 'expected an object like {"redis_invalidate": {...}}')
    reject_unknown(spec, {"redis_invalidate"}, KEY)
    hooks: list[Hook] = []
    if "redis_invalidate" in spec:
        field = f"{KEY}.redis_invalidate"
        inv = spec["redis_invalidate"]
        if not isinstance(inv, Mapping):
            raise ConfigError(
                field, 'expected an object like {"url": {"env": "CACHE_URL"}, "patterns": [...]}'
            )
        reject_unknown(inv, {"url", "patterns"}, field)
        url = check_secret(inv, "url", f"{field}.url", required=True)
        patterns = require(
            inv, "patterns", list, 'a list of key patterns like ["cache:orders:*"]', prefix=field
        )
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"{field}.patterns", "expected a non-empty list of non-empty key patterns")
        if any(p.strip("*") == "" for p in patterns):
            raise ConfigError(f"{field}.patterns", 'a pattern of only "*" would empty the whole database')
        hooks.append(RedisInvalidate(url, tuple(patterns)))
    return rest, hooks


async def run_all(hooks: list[Hook]) -> list[str]:
    """Run every hook; the errors (one line each, secrets masked), in order."""
    errors = []
    for hook in hooks:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                log.info("%s", await hook.run())
        except Exception as exc:
            message = secrets.redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            if isinstance(exc, TimeoutError):
                message = f"the hook did not finish within {TIMEOUT_SECONDS:.0f}s"
            log.warning("post-success hook failed: %s", message)
            errors.append(f"redis_invalidate: {message}")
    return errors
