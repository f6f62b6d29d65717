"""What one column per version costs the live table, and the advice that follows from it.

A backfill writes every row of the table anew (PostgreSQL's MVCC). A new row version that fits
on its page, with no indexed column changed, is a HOT update: no index is touched. One that does
not fit goes to another page and is inserted into every index of the table again, HNSW included,
and an HNSW insert is a graph search. ``benchmarks/layout.py`` measured the backfill 3.3x to 5.5x
slower with an HNSW index on the old version's column at the default fillfactor (100), and 29% to
82% faster than that at fillfactor 70, depending on the room left on the pages (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection

from . import storage

ADVISED_FILLFACTOR = 70
# Above this, pages are too full for most of a backfill's updates to stay on their page.
ADVICE_ABOVE_FILLFACTOR = 80


@dataclass(frozen=True)
class TableLayout:
    table: str
    fillfactor: int  # 100 when not set: PostgreSQL's default for tables
    hnsw_indexes: tuple[str, ...]


def table_layout(table: str) -> TableLayout:
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT coalesce((SELECT option_value::int FROM pg_options_to_table(c.reloptions)
                             WHERE option_name = 'fillfactor'), 100),
                   coalesce(array_agg(i.relname ORDER BY i.relname)
                            FILTER (WHERE am.amname = 'hnsw'), '{}')
            FROM pg_class c
            LEFT JOIN pg_index x ON x.indrelid = c.oid
            LEFT JOIN pg_class i ON i.oid = x.indexrelid
            LEFT JOIN pg_am am ON am.oid = i.relam
            WHERE c.oid = %s::regclass
            GROUP BY c.oid, c.reloptions
            """,
            [storage.qn(table)],
        )
        fillfactor, hnsw = cursor.fetchone()
    return TableLayout(table, int(fillfactor), tuple(hnsw))


def backfill_advice(table: str) -> str | None:
    """A note for whoever is about to backfill a version of ``table``, or None if its layout
    does not slow a backfill down."""
    layout = table_layout(table)
    if not layout.hnsw_indexes or layout.fillfactor <= ADVICE_ABOVE_FILLFACTOR:
        return None
    names = ", ".join(layout.hnsw_indexes)
    return (
        f"Table {table} has fillfactor {layout.fillfactor} and an HNSW index ({names}): a "
        "backfill writes every row anew, and each row that no longer fits on its page is "
        "inserted into that index again (3.3x to 5.5x slower in docs/benchmarks.md). "
        f"`ALTER TABLE {storage.qn(table)} SET (fillfactor = {ADVISED_FILLFACTOR})` leaves "
        "room on pages written from now on; rewrite the table (pg_repack, or VACUUM FULL "
        "under an exclusive lock) to give the existing pages that room. "
        "See docs/backfill.md, \"Table layout\"."
    )
