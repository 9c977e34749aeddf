"""Alembic environment: runs migrations over psycopg 3, URL from syncworker's settings."""

from alembic import context
from sqlalchemy import create_engine, pool

from worker.db import database_url, sqlalchemy_url

# The version table has its own name so it never collides with an application's
# own alembic history in the same database.
VERSION_TABLE = "syncworker_alembic_version"

url = context.config.attributes.get("url") or database_url()
connection = context.config.attributes.get("connection")


def run(conn: object) -> None:
    context.configure(connection=conn, version_table=VERSION_TABLE, transactional_ddl=True)
    with context.begin_transaction():
        # Replicas starting together may all run `migrate`: one at a time, the
        # others then find the schema already at head.
        context.execute("SELECT pg_advisory_xact_lock(1398230784)")
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as conn:
        run(conn)
    engine.dispose()
