"""Claims by a worker that announces its own runs no longer NOTIFY the leader one by one.

Revision ID: 0003
Revises: 0002
"""

from pathlib import Path

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute((HERE / "0003_quiet_claims.sql").read_text())


def downgrade() -> None:
    op.execute(
        """
CREATE OR REPLACE FUNCTION syncworker.notify_runs_started() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows) THEN
    PERFORM pg_notify('syncworker', '{"runs_started": true}');
  END IF;
  RETURN NULL;
END
$$;
"""
    )
