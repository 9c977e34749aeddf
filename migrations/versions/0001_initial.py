"""Initial schema: integrations, sync_runs, sync_errors, workers and the SQL surface.

Revision ID: 0001
Revises:
"""

from pathlib import Path

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS syncworker")
    op.execute((HERE / "cron_check.sql").read_text())
    op.execute((HERE / "0001_initial.sql").read_text())


def downgrade() -> None:
    op.execute("DROP SCHEMA syncworker CASCADE")
