"""mkdocs hooks: the experiments' figures, served from where the experiments write them.

* The pages show the PNGs that ``experiments/*.py`` write to ``experiments/results/``, linked
  as ``../experiments/results/NAME.png`` (a path that also works when a page is read on its
  own, outside the site). mkdocs serves only ``docs/``, so :func:`on_files` adds every such
  PNG to the site as ``figures/NAME.png`` and :func:`on_page_markdown` points the links there.
  Nothing is copied into ``docs/``, and the site shows whatever the last run wrote.
* :func:`on_page_content` refuses reST that reached a page unconverted (``.. math::``, a
  ``:func:`` role), which would show as raw text: with ``--strict`` the build fails.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.plugins.jsoftmax")

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"
FIGURES = "figures"
_RESULTS_LINK = re.compile(r"\]\((?:\.\./)+experiments/results/([^)\s]+\.png)\)")
_REST_LEFT = re.compile(r"\.\. math::|:(?:math|func|class|mod|data|attr|meth):`")


def on_files(files: Files, config, **kwargs) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{FIGURES}/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page, config, files: Files, **kwargs) -> str:
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth + FIGURES
    return _RESULTS_LINK.sub(lambda m: f"]({prefix}/{m.group(1)})", markdown)


def on_page_content(html: str, page, config, files: Files, **kwargs) -> str:
    for match in _REST_LEFT.finditer(html):
        start = max(0, match.start() - 60)
        log.warning(
            "%s: reST left unconverted: %r", page.file.src_uri, html[start : match.end() + 40]
        )
    return html
