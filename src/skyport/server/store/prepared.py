"""Statements on the hot paths, compiled once and run with the driver's ``executemany``.

Every accepted submission inserts a job row and an event, and every state change updates the job and
inserts an event. Through ``conn.execute(statement, rows)`` SQLAlchemy rebuilds, for each execution,
the statement's cache key and, for each row, a parameter dict with every bind processor applied: on
the submission path that bookkeeping was about 70 % of the insert's CPU, sqlite3's own ``executemany``
about 13 %.

A prepared statement stays SQLAlchemy's — compiled by the connection's dialect, its parameters run
through the same bind processors, in the order the compiled statement wants them — and hands the
driver plain tuples through ``exec_driver_sql``, inside the caller's transaction as before. Only the
per-execution bookkeeping goes. Every parameter must be given: nothing computes Python-side defaults
here, so a statement that would need one is refused when it is compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import UpdateBase


@dataclass(frozen=True)
class _Compiled:
    sql: str
    #: (parameter name, its bind processor or None) in the statement's parameter order
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]


class PreparedStatement:
    """A DML statement whose parameters are all explicit: rows are mappings from parameter names (the
    ``bindparam`` names, or the column names of an insert's ``columns``) to values."""

    def __init__(self, statement: UpdateBase, parameters: Sequence[str], *, columns: bool = False) -> None:
        self._statement = statement
        self._parameters = frozenset(parameters)
        self._column_keys = list(parameters) if columns else None
        self._by_dialect: dict[str, _Compiled] = {}

    def execute(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """Run the statement once per row; the number of rows it matched (-1 if the driver cannot say)."""
        if not rows:
            return 0
        if rows[0].keys() != self._parameters:  # a value added to the rows and not here: never drop it
            raise ValueError(
                f"rows have {', '.join(sorted(rows[0]))}, the statement {sorted(self._parameters)}"
            )
        compiled = self._by_dialect.get(conn.dialect.name) or self._compile(conn.dialect)
        if len(rows) <= _ROW_BY_ROW:
            params = [tuple(row[k] if p is None else p(row[k]) for k, p in compiled.binds) for row in rows]
        else:
            params = list(zip(*[_bound(rows, key, p) for key, p in compiled.binds], strict=True))
        result = conn.exec_driver_sql(compiled.sql, params)
        return result.rowcount

    def _compile(self, dialect: Dialect) -> _Compiled:
        statement = self._statement.compile(dialect=dialect, column_keys=self._column_keys)
        order = statement.positiontup
        if order is None:  # a dialect with named parameters: none of ours (sqlite, asyncpg) is one
            raise TypeError(f"a prepared statement needs positional parameters, which {dialect.name} lacks")
        unknown = [k for k in order if k not in self._parameters]
        if unknown:  # e.g. columns with a Python-side default that were not given
            raise ValueError(f"{statement}: give {', '.join(unknown)} too")
        binds: list[tuple[str, Callable[[Any], Any] | None]] = []
        for key in order:
            processor = statement._bind_processors.get(key)
            if processor is not None and not callable(processor):  # a tuple's, not a column's
                raise TypeError(f"{statement}: parameter {key} binds more than one value")
            binds.append((key, processor))
        compiled = _Compiled(str(statement), tuple(binds))
        self._by_dialect[dialect.name] = compiled
        return compiled


#: Up to this many rows (a submission's one or two), parameters are processed row by row; beyond, column
#: by column (:func:`_bound`). Measured on the jobs' insert: 2 rows, 18 against 24 us a row; 16 rows,
#: 21 against 10.
_ROW_BY_ROW = 2


def _bound(rows: Sequence[Mapping[str, Any]], key: str, processor: Callable[[Any], Any] | None) -> list[Any]:
    """One parameter's values for all rows, through its bind processor. A value shared by every row (the
    transaction's ``now`` in a state change's times, its reason) is processed once: a datetime's
    processor costs ~4 us, and a state change binds three of them per row."""
    values = [row[key] for row in rows]
    if processor is None:
        return values
    first = values[0]
    if all(value is first for value in values):
        return [processor(first)] * len(values)
    return [processor(value) for value in values]


class PreparedInsert(PreparedStatement):
    """``INSERT INTO table (columns...)`` for many rows, each a mapping with exactly those columns."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        super().__init__(insert(table), columns, columns=True)
