"""Operating it: pausing a job, the `paused` and `stale` health words, the functions behind
the operator commands, and the alert incidents the leader delivers.

Revision ID: 0006
Revises: 0005
"""

from pathlib import Path

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute((HERE / "0006_operations.sql").read_text())


def downgrade() -> None:
    op.execute("DROP TABLE syncworker.alerts")
    for function in (
        "resolve_errors(text, text)",
        "disable_job(text, text)",
        "enable_job(text)",
        "resume_job(text)",
        "pause_job(text, text)",
        "job_for_update(text)",
    ):
        op.execute(f"DROP FUNCTION syncworker.{function}")
    op.execute("DROP TRIGGER integrations_paused ON syncworker.integrations")
    op.execute("DROP FUNCTION syncworker.integrations_paused()")
    # The view of 0005 comes back from its file.
    previous = (HERE / "0005_hostile_rows.sql").read_text()
    op.execute("DROP VIEW syncworker.status")
    op.execute("DROP FUNCTION syncworker.stale_after(integer, integer, text)")
    view = previous[previous.index("CREATE OR REPLACE VIEW syncworker.status AS") :]
    op.execute(view[: view.index(") e ON true;") + len(") e ON true;")])
    op.execute("ALTER TABLE syncworker.integrations DROP COLUMN stale_after_seconds")
    op.execute("ALTER TABLE syncworker.integrations DROP COLUMN paused_at")
