"""The database's cron validator agrees with the worker's parser."""

from __future__ import annotations

import pytest

from helpers import one
from worker.run.cron import CronError, parse

EXPRESSIONS = [
    "* * * * *",
    "*/15 * * * *",
    "0 3 * * *",
    "10-50/20 * * * *",
    "5/15 * * * *",
    "0 9 * * mon-fri",
    "0 0 1 jan,jul *",
    "0 0 * * 7",
    "@daily",
    "@HOURLY",
    "  0   3 * * *  ",
    "59 23 31 12 sat",
    "0 0 29 2 *",
    "0-59 0-23 1-31 1-12 0-7",
    "1,2,3 * * * *",
    "* * * JAN-DEC SUN-SAT",
    "",
    "   ",
    "* * * *",
    "* * * * * *",
    "61 * * * *",
    "* 24 * * *",
    "* * 0 * *",
    "* * * 13 *",
    "* * * * 8",
    "5-1 * * * *",
    "*/0 * * * *",
    "1,,2 * * * *",
    "* * * * funday",
    "x * * * *",
    "* * * mon *",
    "@reboot",
    "*/x * * * *",
    "1-2-3 * * * *",
    "-1 * * * *",
    "1- * * * *",
    "99999999999 * * * *",
    "*/5/2 * * * *",
    ", * * * *",
    "* * * * sun,",
    "0 0 31 2 *",
    "0 0 30,31 2 *",
    "0 0 31 4,6,9,11 *",
    "0 0 31 apr-jun/2 *",
    "0 0 29 2 *",
    "0 0 31 2 mon",
    "0 0 31 2 */2",
    "0 0 30/5 2 *",
    "0 0 */31 2 *",
    "0 0 31 */3 *",
]


def test_sql_and_python_agree(db: str) -> None:
    for expr in EXPRESSIONS:
        try:
            parse(expr)
            python_error = None
        except CronError as exc:
            python_error = str(exc)
        sql_error = one(db, "SELECT syncworker.cron_error(%s)", (expr,))
        assert sql_error == python_error, expr


@pytest.mark.parametrize("expr", ["61 * * * *", "* * * * funday"])
def test_rejected_rows_carry_the_same_message(db: str, expr: str) -> None:
    import psycopg

    with pytest.raises(psycopg.errors.CheckViolation) as err:
        one(db, "INSERT INTO syncworker.integrations (name, kind, cron) VALUES ('c', 'sql', %s)", (expr,))
    with pytest.raises(CronError) as expected:
        parse(expr)
    assert str(expected.value) in str(err.value)
