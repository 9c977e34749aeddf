"""sync_runs.worker_id is a plain column: claims no longer lock their worker's row.

Revision ID: 0004
Revises: 0003
"""

from pathlib import Path

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute((HERE / "0004_run_worker_plain.sql").read_text())


def downgrade() -> None:
    op.execute(
        """
UPDATE syncworker.sync_runs r SET worker_id = NULL
 WHERE worker_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM syncworker.workers w WHERE w.id = r.worker_id);
ALTER TABLE syncworker.sync_runs ADD CONSTRAINT sync_runs_worker_id_fkey
  FOREIGN KEY (worker_id) REFERENCES syncworker.workers (id) ON DELETE SET NULL;
"""
    )
