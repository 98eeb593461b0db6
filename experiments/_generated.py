"""Generated blocks in the documentation pages: find them, rewrite them, check them.

A page holds a generated block between two marker lines::

    <!-- begin generated: NAME -->
    ...
    <!-- end generated: NAME -->

:func:`replace` puts a freshly rendered body between the markers, :func:`current` reads what is
there, and :func:`diff` says how the two differ. Only the standard library is imported, so the
checks run without JAX.
"""

from __future__ import annotations

import difflib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def markers(name: str) -> tuple[str, str]:
    """The begin and end lines of the block ``name``."""
    return f"<!-- begin generated: {name} -->", f"<!-- end generated: {name} -->"


def _span(text: str, name: str, where: str) -> tuple[int, int]:
    begin, end = markers(name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start or text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{where}: expected one {begin} line followed by one {end} line")
    return start + len(begin), stop


def current(text: str, name: str, where: str = "page") -> str:
    """The body of block ``name`` in ``text`` (between the markers, without them)."""
    start, stop = _span(text, name, where)
    return text[start:stop].strip("\n")


def replace(text: str, name: str, body: str, where: str = "page") -> str:
    """``text`` with the body of block ``name`` replaced by ``body``."""
    start, stop = _span(text, name, where)
    return text[:start] + "\n" + body.strip("\n") + "\n" + text[stop:]


def diff(page: Path, name: str, body: str) -> str:
    """A unified diff from the page's block to ``body``; empty when they are the same."""
    have = current(page.read_text(), name, str(page)).splitlines()
    want = body.strip("\n").splitlines()
    lines = difflib.unified_diff(have, want, f"{page} ({name})", "generated", lineterm="")
    return "\n".join(lines)
