"""A run's own bookkeeping fires no trigger: the row triggers fire for what people change,
and a finished run's later slot sends no NOTIFY from inside the run's transaction.

Revision ID: 0010
Revises: 0009
"""

from pathlib import Path

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute((HERE / "0010_quiet_runs.sql").read_text())


def downgrade() -> None:
    op.execute("DROP TRIGGER integrations_before_update ON syncworker.integrations")
    op.execute("DROP TRIGGER integrations_before_write ON syncworker.integrations")
    op.execute(
        "CREATE TRIGGER integrations_before_write BEFORE INSERT OR UPDATE ON syncworker.integrations "
        "FOR EACH ROW EXECUTE FUNCTION syncworker.integrations_before_write()"
    )
    op.execute("DROP TRIGGER integrations_paused_update ON syncworker.integrations")
    op.execute("DROP TRIGGER integrations_paused ON syncworker.integrations")
    op.execute(
        "CREATE TRIGGER integrations_paused BEFORE INSERT OR UPDATE ON syncworker.integrations "
        "FOR EACH ROW EXECUTE FUNCTION syncworker.integrations_paused()"
    )
    op.execute("DROP TRIGGER integrations_notify_update ON syncworker.integrations")
    op.execute(
        "CREATE TRIGGER integrations_notify_update AFTER UPDATE ON syncworker.integrations "
        "FOR EACH ROW WHEN (NEW.enabled AND NEW.running_run_id IS NULL AND NEW.next_sync_at IS NOT NULL "
        "AND (OLD.next_sync_at IS DISTINCT FROM NEW.next_sync_at "
        "OR NOT OLD.enabled OR OLD.running_run_id IS NOT NULL)) "
        "EXECUTE FUNCTION syncworker.notify_due_row()"
    )
