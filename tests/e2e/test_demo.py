"""The README's first command, `bash .ci/demo`, exactly as written: it sets up, migrates a demo
database, adds the example jobs and runs the worker in the foreground until stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import ADMIN_URL, ROOT, db_prefix, drop_database, one, url_for_db, wait_for

pytestmark = pytest.mark.e2e


def test_the_demo_command_runs_the_example_jobs_and_stops_cleanly(tmp_path: Path) -> None:
    name = f"{db_prefix()}{uuid.uuid4().hex[:12]}"
    url = url_for_db(name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env.update(SYNCWORKER_DEMO_DB=name, SYNCWORKER_DEMO_ADMIN_URL=ADMIN_URL, SYNCWORKER_DATABASE_URL=url)
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen(["bash", ".ci/demo"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "worker starting" in log.read_text(errors="replace"), timeout=240, what="the demo")
        wait_for(
            lambda: (one(url, "SELECT count(*) FROM public.demo_ticks") or 0) >= 1,
            timeout=30,
            what="the example job's first run",
        )
        assert one(url, "SELECT count(*) FROM syncworker.integrations") == 2
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if demo.poll() is None:
            demo.kill()
        drop_database(name)
