"""The `no_leader` alert: an incident of the whole fleet (no job), opened by any replica.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from pathlib import Path

    op.execute((Path(__file__).parent / "0009_no_leader.sql").read_text())


def downgrade() -> None:
    op.execute("DELETE FROM syncworker.alerts WHERE kind = 'no_leader'")
    op.execute("DROP INDEX syncworker.alerts_no_leader_idx")
    op.execute(
        "ALTER TABLE syncworker.alerts DROP CONSTRAINT alerts_job_unless_fleet, "
        "DROP CONSTRAINT alerts_kind_known, "
        "ADD CONSTRAINT alerts_kind_known "
        "CHECK (kind IN ('disabled', 'failing', 'stale', 'overrunning', 'rescued'))"
    )
    op.execute("ALTER TABLE syncworker.alerts ALTER COLUMN integration_id SET NOT NULL")
