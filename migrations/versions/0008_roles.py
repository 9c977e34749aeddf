"""Roles: syncworker_runner, syncworker_operator and syncworker_admin, created when the
migrating role may and granted in this database; the operator's functions run with their
owner's privileges and a pinned search_path; no function of the schema is callable by PUBLIC.

Revision ID: 0008
Revises: 0007
"""

from pathlib import Path

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

HERE = Path(__file__).parent

OPERATOR_FUNCTIONS = (
    "trigger_sync(text)",
    "pause_job(text, text)",
    "resume_job(text)",
    "enable_job(text)",
    "disable_job(text, text)",
    "resolve_errors(text, text)",
)


def upgrade() -> None:
    op.execute((HERE / "0008_roles.sql").read_text())


def downgrade() -> None:
    # The roles stay (other databases may use them); their privileges here go with the
    # functions' return to PUBLIC.
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'syncworker_runner') THEN "
        "ALTER DEFAULT PRIVILEGES IN SCHEMA syncworker REVOKE ALL ON TABLES FROM syncworker_runner; "
        "ALTER DEFAULT PRIVILEGES IN SCHEMA syncworker REVOKE ALL ON SEQUENCES FROM syncworker_runner; "
        "ALTER DEFAULT PRIVILEGES IN SCHEMA syncworker REVOKE ALL ON ROUTINES FROM syncworker_runner; "
        "END IF; END $$"
    )
    op.execute("GRANT EXECUTE ON ALL ROUTINES IN SCHEMA syncworker TO PUBLIC")
    op.execute("DROP FUNCTION syncworker.setup_roles()")
    op.execute("DROP FUNCTION syncworker.role_names()")
    for function in OPERATOR_FUNCTIONS:
        op.execute(f"ALTER FUNCTION syncworker.{function} SECURITY INVOKER RESET search_path")
