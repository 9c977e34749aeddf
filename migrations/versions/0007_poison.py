"""Poison jobs: abandoned runs are counted per job (`abandon_count`, `max_abandons`), rescued
with a growing delay after the first, and the job is disabled as a crash loop at the limit.

Revision ID: 0007
Revises: 0006
"""

from pathlib import Path

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute((HERE / "0007_poison.sql").read_text())


def downgrade() -> None:
    op.execute("DROP FUNCTION syncworker.abandon_run(bigint, text, boolean)")
    op.execute("DROP FUNCTION syncworker.rescue_delay(integer)")
    # The functions of 0005 come back from its file.
    previous = (HERE / "0005_hostile_rows.sql").read_text()
    for start in (
        "CREATE OR REPLACE FUNCTION syncworker.integrations_before_write()",
        "CREATE OR REPLACE FUNCTION syncworker.abandon_run(",
    ):
        body = previous[previous.index(start) :]
        op.execute(body[: body.index("$$;\n", body.index("$$") + 2) + 4])
    op.execute("ALTER TABLE syncworker.integrations DROP COLUMN max_abandons, DROP COLUMN abandon_count")
