"""How a `postgres` mirror finds what changed in its source without trusting clocks.

Three tools, all read-only on the source:

* **The xmin cursor.**  Every row version carries `xmin`, the id of the transaction that
  wrote it.  A run reads the source in one REPEATABLE READ snapshot and saves, as its
  cursor, the oldest transaction that snapshot may not see: its oldest running transaction
  of the source's own database (those of other databases cannot write the table), or its
  `xmax` when none runs, as a 64-bit `xid8` (the epoch is kept).  Every transaction whose
  rows the snapshot did not see has an id at or above the cursor, so the next run reads
  the rows whose `xmin` is at or above it, and nothing older.  A row written in a
  subtransaction carries the subtransaction's id, which is above its parent's: such rows
  are caught too (this is why the cursor is not compared with the snapshot's list of
  running transactions, which only holds top-level ones).  Rows of transactions that
  committed between the cursor and the snapshot are read once more.  Row `xmin`s are
  32-bit: they are compared through `age()`, which counts back from the current
  transaction id, so the comparison is exact while the cursor is less than 2^31
  transactions old (checked: an older cursor reads the whole table once).
* **Tombstones.**  `syncworker install-trigger` on a job with `"deletes": "hard"` adds a
  statement-level delete trigger that records each deleted key with the deleting
  transaction's `xid8` in `syncworker_tombstones`; a run reads the tombstones since its
  cursor in the same snapshot as the rows.
* **Key buckets.**  Without tombstones, deletes are found by comparing the row count and
  a sum of key hashes on both sides, then the same per bucket of keys (about 32 rows per
  bucket, 16,384 to 131,072 buckets), re-reading only the keys of the buckets that differ.
"""

from __future__ import annotations

import itertools

from psycopg import sql

# How a run finds what changed: by `xmin` (a table on a primary), by `updated_at` after a
# watermark (a query, a view, a standby), or not at all (every row, every run).
BY_XMIN, BY_UPDATED_AT, EVERYTHING = "xmin", "updated_at", "everything"

# A saved cursor this many transactions behind the current one is too old for 32-bit xmin
# comparisons (they wrap at 2^31): the table is read in full once instead.
MAX_CURSOR_AGE = (1 << 31) - (1 << 27)

# A table of at least SPLIT_PAGES pages is read for its changes in SCAN_PARTS ranges of
# pages, the last first (see `page_ranges`).
SPLIT_PAGES = 1024
SCAN_PARTS = 8

TOMBSTONES = "syncworker_tombstones"
HORIZON = "syncworker_tombstone_horizon"
DELETE_TRIGGER = "syncworker_record_deletes"
TRUNCATE_TRIGGER = "syncworker_record_truncate"
# Tombstones older than this are pruned by the runs that read them.
TOMBSTONE_RETENTION_DAYS = 7

# Key buckets compared per side when looking for hard deletes: about ROWS_PER_BUCKET rows
# each, within these bounds (a power of two).
MIN_BUCKETS = 1 << 14
MAX_BUCKETS = 1 << 17
ROWS_PER_BUCKET = 32
INTEGER_TYPES = {"smallint", "integer", "bigint"}


def changed_since(cursor: int) -> tuple[sql.Composable, list[str]]:
    """`WHERE` condition and parameters for rows written by transactions at or after `cursor`.

    `age(xmin)` is the distance from the current transaction id back to the row's; it is
    between 0 and `age(cursor)` exactly when the row's transaction is not older than the
    cursor.  Frozen and bootstrap rows have an age of 2^31 - 1 and are never selected.
    """
    low = str(cursor % (1 << 32))
    return sql.SQL("age(xmin) BETWEEN 0 AND age(%s::xid)"), [low]


def page_ranges(pages: int) -> list[tuple[int | None, int | None]]:
    """A table of `pages` pages as ranges of pages [from, to), the end of the table first.

    The first range has no upper bound and the last no lower one: each row version is in
    exactly one of them, however the table grows.  A small table is one range.
    """
    if pages < SPLIT_PAGES:
        return [(None, None)]
    bounds: list[int | None] = [None, *(pages * i // SCAN_PARTS for i in range(1, SCAN_PARTS)), None]
    return list(itertools.pairwise(bounds))[::-1]


def pages_between(first: int | None, end: int | None) -> sql.Composable:
    """The condition for row versions in pages `first` to `end` (excluded); either may be open."""
    parts = [
        sql.SQL("ctid {} {}::tid").format(sql.SQL(op), sql.Literal(f"({page},0)"))
        for op, page in ((">=", first), ("<", end))
        if page is not None
    ]
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")


def cursor_problem(cursor: int, snapshot_xmax: int) -> str | None:
    """Why a saved cursor cannot be compared with this snapshot's rows (None: it can)."""
    if cursor > snapshot_xmax:
        return "the saved cursor is ahead of the source (a restored or different server)"
    if snapshot_xmax - cursor >= MAX_CURSOR_AGE:
        return "the saved cursor is more than 2 billion transactions old"
    return None


def key_hash(key: tuple[str, ...], types: dict[str, str], alias: str | None = None) -> sql.Composable:
    """A 32-bit hash of a row's key that both sides compute alike.

    A single integer key is hashed as a bigint (`hashint8`); other keys as the text of their
    columns.  Two servers that hash differently only make every bucket differ: slower,
    never wrong.
    """

    def col(name: str) -> sql.Composable:
        return sql.Identifier(alias, name) if alias else sql.Identifier(name)

    if len(key) == 1 and types.get(key[0]) in INTEGER_TYPES:
        return sql.SQL("hashint8({}::bigint)").format(col(key[0]))
    parts = sql.SQL(", ").join(sql.SQL("{}::text").format(col(k)) for k in key)
    return sql.SQL("hashtext(concat_ws(chr(31), {}))").format(parts)


def bucket_count(rows: int) -> int:
    """How many buckets to compare for a table of `rows` rows."""
    wanted = max(1, rows // ROWS_PER_BUCKET)
    return min(MAX_BUCKETS, max(MIN_BUCKETS, 1 << (wanted - 1).bit_length()))


def bucket_of(hash_expr: sql.Composable, buckets: int) -> sql.Composable:
    return sql.SQL("({} & {})").format(hash_expr, sql.Literal(buckets - 1))


# long: the SQL of the tombstone table and its trigger, statement after statement
def tombstone_statements(schema: str, table: str, key: tuple[str, ...], fresh: bool) -> list[sql.Composed]:
    """The tombstone table, its horizon and the delete/truncate triggers on `schema.table`.

    The horizon row says from which transaction id on every delete is recorded: a run whose
    cursor is older cannot rely on the tombstones and compares key buckets instead.  It is
    set to the install's snapshot `xmax` (a transaction that deleted rows earlier has
    committed: CREATE TRIGGER waits for it), and moved only when the trigger is new
    (`fresh`) or its key changed.
    """
    tomb = sql.Identifier(schema, TOMBSTONES)
    horizon = sql.Identifier(schema, HORIZON)
    function = sql.Identifier(schema, DELETE_TRIGGER)
    target = sql.Identifier(schema, table)
    relation = sql.Literal(f"{schema}.{table}")
    keys = sql.SQL(", ").join(sql.Literal(k) for k in key)
    move_always = sql.Literal(fresh)
    return [
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {tomb} (
              relation text NOT NULL,
              key text[],
              xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
              deleted_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ).format(tomb=tomb),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (relation, xid)").format(
            sql.Identifier(f"{TOMBSTONES}_relation_xid"), tomb
        ),
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {horizon} (
              relation text PRIMARY KEY, key text[] NOT NULL, complete_from xid8 NOT NULL
            )
            """
        ).format(horizon=horizon),
        sql.SQL(
            """
            CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF TG_OP = 'TRUNCATE' THEN
                INSERT INTO {tomb} (relation, key) VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, NULL);
              ELSE
                EXECUTE format('INSERT INTO {tomb} (relation, key) SELECT $1, ARRAY[%s] FROM gone',
                               (SELECT string_agg(format('%I::text', k), ', ') FROM unnest(TG_ARGV) k))
                  USING TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
              END IF;
              RETURN NULL;
            END $$
            """
        ).format(function=function, tomb=tomb),
        sql.SQL(
            """
            CREATE OR REPLACE TRIGGER {trigger} AFTER DELETE ON {target}
              REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION {function}({keys})
            """
        ).format(trigger=sql.Identifier(DELETE_TRIGGER), target=target, function=function, keys=keys),
        sql.SQL(
            """
            CREATE OR REPLACE TRIGGER {trigger} AFTER TRUNCATE ON {target}
              FOR EACH STATEMENT EXECUTE FUNCTION {function}()
            """
        ).format(trigger=sql.Identifier(TRUNCATE_TRIGGER), target=target, function=function),
        sql.SQL(
            """
            INSERT INTO {horizon} AS h (relation, key, complete_from)
            VALUES ({relation}, ARRAY[{keys}]::text[], pg_snapshot_xmax(pg_current_snapshot()))
            ON CONFLICT (relation) DO UPDATE SET key = EXCLUDED.key, complete_from = EXCLUDED.complete_from
             WHERE {move_always} OR h.key IS DISTINCT FROM EXCLUDED.key
            """
        ).format(horizon=horizon, relation=relation, keys=keys, move_always=move_always),
    ]
