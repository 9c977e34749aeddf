"""Per-host rate limits and circuit breakers for the http connector, shared by all replicas.

Revision ID: 0002
Revises: 0001
"""

from pathlib import Path

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent


def upgrade() -> None:
    op.execute((HERE / "0002_http_hosts.sql").read_text())


def downgrade() -> None:
    op.execute("DROP FUNCTION syncworker.circuit_record(text, boolean, int, text)")
    op.execute("DROP FUNCTION syncworker.circuit_allow(text, double precision)")
    op.execute("DROP FUNCTION syncworker.take_request_slot(text, float8, float8, float8)")
    op.execute("DROP TABLE syncworker.circuit_breakers")
    op.execute("DROP TABLE syncworker.rate_limits")
