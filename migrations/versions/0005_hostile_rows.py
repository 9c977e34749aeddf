"""Refuse rows no worker can use (a cron that never fires, infinite due times, huge names);
max_retries counts retries after the first failure; workers.lost_at; the `overrunning` health.

Revision ID: 0005
Revises: 0004
"""

from pathlib import Path

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute((HERE / "0005_hostile_rows.sql").read_text())


def downgrade() -> None:
    op.execute("DROP TRIGGER integrations_realtime_insert ON syncworker.integrations")
    op.execute("DROP TRIGGER integrations_realtime_update ON syncworker.integrations")
    op.execute("DROP FUNCTION syncworker.notify_realtime_jobs()")
    op.execute("DROP FUNCTION syncworker.terminate_session(integer)")
    op.execute("ALTER TABLE syncworker.workers DROP COLUMN lost_at")
    op.execute("ALTER TABLE syncworker.integrations DROP CONSTRAINT integrations_max_retries_not_negative")
    op.execute("UPDATE syncworker.integrations SET max_retries = max_retries + 1")
    op.execute(
        "ALTER TABLE syncworker.integrations "
        "ADD CONSTRAINT integrations_max_retries_positive CHECK (max_retries >= 1)"
    )
    op.execute(
        "ALTER TABLE syncworker.integrations "
        "ADD CONSTRAINT integrations_timezone_known CHECK (syncworker.check_timezone(timezone)) NOT VALID, "
        "ADD CONSTRAINT integrations_schedule_valid "
        "CHECK (syncworker.check_schedule(interval_seconds, cron)) NOT VALID"
    )
    # The older functions and view come back from the earlier revisions' files.
    op.execute((HERE / "cron_check.sql").read_text())
    initial = (HERE / "0001_initial.sql").read_text()
    for start, end in (
        ("CREATE FUNCTION syncworker.integrations_before_write()", "$$;\n"),
        ("CREATE FUNCTION syncworker.lock_held(", "$$;\n"),
        ("CREATE FUNCTION syncworker.abandon_run(", "$$;\n"),
        ("CREATE FUNCTION syncworker.fenced(", "$$;\n"),
    ):
        body = initial[initial.index(start) :]
        body = body[: body.index(end, body.index("$$") + 2) + len(end)]
        op.execute(body.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    view = initial[initial.index("CREATE VIEW syncworker.status AS") :]
    view = view[: view.index(") e ON true;") + len(") e ON true;")]
    op.execute(view.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
