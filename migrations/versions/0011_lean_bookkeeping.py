"""A run's bookkeeping prepares no trigger condition and no CHECK expression: the checks of
what a person writes move into integrations_before_write (same names and messages), and the
triggers fire for what people change.

Revision ID: 0011
Revises: 0010
"""

import re
from pathlib import Path

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent

CHECKS = {
    "integrations_config_is_object": "jsonb_typeof(config) = 'object'",
    "integrations_kind_not_blank": "btrim(kind) <> ''",
    "integrations_max_abandons_positive": "max_abandons >= 1",
    "integrations_max_retries_not_negative": "max_retries >= 0",
    "integrations_name_not_blank": "btrim(name) <> ''",
    "integrations_pending_trigger_known": "pending_trigger IN ('manual', 'realtime', 'rescue')",
    "integrations_retry_backoff_positive": "retry_backoff_seconds >= 1",
    "integrations_retry_count_not_negative": "retry_count >= 0",
    "integrations_stale_after_positive": "stale_after_seconds > 0",
    "integrations_state_is_object": "jsonb_typeof(state) = 'object'",
    "integrations_timeout_positive": "timeout_seconds >= 1",
}


def upgrade() -> None:
    op.execute((HERE / "0011_lean_bookkeeping.sql").read_text())


def _function(file: str, name: str) -> str:
    """A function's definition as an earlier revision's file has it (CREATE OR REPLACE)."""
    text = (HERE / file).read_text()
    found = re.search(rf"^CREATE (OR REPLACE )?FUNCTION syncworker\.{name}\(", text, re.MULTILINE)
    assert found is not None, (file, name)
    start = found.start()
    body = text[start : text.index("$$;\n", text.index("$$", start) + 2) + 4]
    return body.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def downgrade() -> None:
    op.execute(
        "ALTER TABLE syncworker.integrations "
        + ", ".join(f"ADD CONSTRAINT {name} CHECK ({check})" for name, check in CHECKS.items())
    )
    op.execute(_function("0007_poison.sql", "integrations_before_write"))
    op.execute(_function("0007_poison.sql", "abandon_run"))
    op.execute(_function("0001_initial.sql", "notify_due_row"))
    op.execute(_function("0003_quiet_claims.sql", "notify_runs_started"))
    op.execute("DROP TRIGGER sync_runs_notify_insert ON syncworker.sync_runs")
    op.execute(
        "CREATE TRIGGER sync_runs_notify_insert AFTER INSERT ON syncworker.sync_runs "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION syncworker.notify_runs_started()"
    )
    # The triggers of 0010 come back from its file.
    previous = (HERE / "0010_quiet_runs.sql").read_text()
    for trigger in ("integrations_before_update", "integrations_paused_update", "integrations_notify_update"):
        op.execute(f"DROP TRIGGER {trigger} ON syncworker.integrations")
        start = previous.index(f"CREATE TRIGGER {trigger} ")
        op.execute(previous[start : previous.index(";\n", start) + 2])
