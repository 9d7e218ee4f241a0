"""Inserts on the hot paths, compiled once and run with the driver's ``executemany``.

Every accepted submission inserts a job row and an event, and every state change an event. Through
``conn.execute(insert(table), rows)`` SQLAlchemy rebuilds, for each execution, the statement's cache
key and, for each row, a parameter dict with every column's bind processor applied: on the submission
path that bookkeeping was about 70 % of the insert's CPU, sqlite3's own ``executemany`` about 13 %.

A :class:`PreparedInsert` keeps the statement SQLAlchemy's — compiled by the connection's dialect, its
parameters run through the same bind processors, in the order the compiled statement wants them — and
hands the driver plain tuples through ``exec_driver_sql``, inside the caller's transaction as before.
Only the per-execution bookkeeping goes. Columns must all be given: nothing computes Python-side
defaults here, so a table column with one that is left out is refused when the statement is compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, insert
from sqlalchemy.engine import Dialect


@dataclass(frozen=True)
class _Compiled:
    sql: str
    #: (column name, its bind processor or None) in the statement's parameter order
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]


class PreparedInsert:
    """``INSERT INTO table (columns...)`` for many rows, each a mapping with exactly those keys."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self._table = table
        self._columns = tuple(columns)
        self._column_set = frozenset(columns)
        self._by_dialect: dict[str, _Compiled] = {}

    def execute(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if rows[0].keys() != self._column_set:  # a column added to the rows and not here: never drop it
            raise ValueError(
                f"insert into {self._table.name}: rows have {sorted(rows[0])}, not {self._columns}"
            )
        compiled = self._by_dialect.get(conn.dialect.name) or self._compile(conn.dialect)
        conn.exec_driver_sql(
            compiled.sql,
            [tuple(row[k] if p is None else p(row[k]) for k, p in compiled.binds) for row in rows],
        )

    def _compile(self, dialect: Dialect) -> _Compiled:
        statement = insert(self._table).compile(dialect=dialect, column_keys=list(self._columns))
        order = statement.positiontup
        if order is None:  # a dialect with named parameters: none of ours (sqlite, asyncpg) is one
            raise TypeError(f"PreparedInsert needs a dialect with positional parameters, not {dialect.name}")
        unknown = [k for k in order if k not in self._columns]
        if unknown:  # columns with a Python-side default that were not given
            raise ValueError(f"insert into {self._table.name}: give columns {', '.join(unknown)} too")
        binds: list[tuple[str, Callable[[Any], Any] | None]] = []
        for key in order:
            processor = statement._bind_processors.get(key)
            if processor is not None and not callable(processor):  # a tuple's, not a column's
                raise TypeError(f"insert into {self._table.name}: column {key} binds more than one value")
            binds.append((key, processor))
        compiled = _Compiled(str(statement), tuple(binds))
        self._by_dialect[dialect.name] = compiled
        return compiled
