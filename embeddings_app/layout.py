"""What one column per version costs the live table, and the advice that follows from it: the
table layout for a large or HNSW-indexed table, else room on the pages for a column's backfill.

A backfill writes every row of the table anew (PostgreSQL's MVCC). A new row version that fits
on its page, with no indexed column changed, is a HOT update: no index is touched. One that does
not fit goes to another page and is inserted into every index of the table again, HNSW included,
and an HNSW insert is a graph search. ``benchmarks/layout.py`` measured the backfill 3.3x to 5.5x
slower with an HNSW index on the old version's column at the default fillfactor (100), and 29% to
82% faster than that at fillfactor 70, depending on the room left on the pages (docs/benchmarks.md).
A version in a table of its own (the table layout, ``embeddings_app.stores.TableStore``) never
rewrites the user's table: at 100,000 rows its backfill took 0.03x the time of a column's, the
user's table kept its size (1.00x), and its ``drop`` gives the space back at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection

from . import stores

ADVISED_FILLFACTOR = 70
# Above this many rows (PostgreSQL's estimate), a column version's backfill rewrites a table large
# enough that the space it leaves behind matters: neither drop nor VACUUM gives it back.
LARGE_TABLE_ROWS = 100_000
# The measured reason quoted by layout_advice (docs/benchmarks.md, layout figures).
TABLE_LAYOUT_FIGURE = ("at 100,000 rows, a side table's backfill took 0.03x the time of a column's "
                       "(8.0 s against 253 s) with an HNSW index on the old version")
# Above this, pages are too full for most of a backfill's updates to stay on their page.
ADVICE_ABOVE_FILLFACTOR = 80


@dataclass(frozen=True)
class TableLayout:
    table: str
    fillfactor: int  # 100 when not set: PostgreSQL's default for tables
    hnsw_indexes: tuple[str, ...]
    rows: int  # PostgreSQL's estimate (pg_class.reltuples; 0 before the first ANALYZE)


def table_layout(table: str) -> TableLayout:
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT coalesce((SELECT option_value::int FROM pg_options_to_table(c.reloptions)
                             WHERE option_name = 'fillfactor'), 100),
                   greatest(c.reltuples, 0)::bigint,
                   coalesce(array_agg(i.relname ORDER BY i.relname)
                            FILTER (WHERE am.amname = 'hnsw'), '{}')
            FROM pg_class c
            LEFT JOIN pg_index x ON x.indrelid = c.oid
            LEFT JOIN pg_class i ON i.oid = x.indexrelid
            LEFT JOIN pg_am am ON am.oid = i.relam
            WHERE c.oid = %s::regclass
            GROUP BY c.oid, c.reloptions, c.reltuples
            """,
            [stores.qn(table)],
        )
        fillfactor, rows, hnsw = cursor.fetchone()
    return TableLayout(table, int(fillfactor), tuple(hnsw), int(rows))


def layout_advice(table: str) -> str | None:
    """Why a new version of ``table`` should live in a table of its own, or None if a column
    costs little: the table is large, or carries an HNSW index."""
    layout = table_layout(table)
    reasons = []
    if layout.hnsw_indexes:
        reasons.append(f"carries an HNSW index ({', '.join(layout.hnsw_indexes)}), into which "
                       "a column backfill inserts every row it moves to another page again")
    if layout.rows >= LARGE_TABLE_ROWS:
        reasons.append(f"has about {layout.rows:,} rows, each of which a column backfill "
                       "rewrites, leaving space that neither drop nor VACUUM gives back")
    if not reasons:
        return None
    return (
        f"Consider the table layout for this version: table {table} {' and '.join(reasons)}. "
        "In a table of its own the new vectors are only inserted (docs/benchmarks.md: "
        f"{TABLE_LAYOUT_FIGURE}), the user's table keeps its size, and drop gives the space back "
        "at once. See docs/backfill.md, \"Choosing a layout\"."
    )



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
        f"`{stores.set_fillfactor_sql(table, ADVISED_FILLFACTOR)}` leaves "
        "room on pages written from now on; rewrite the table (pg_repack, or VACUUM FULL "
        "under an exclusive lock) to give the existing pages that room. "
        "See docs/backfill.md, \"Table layout\"."
    )
