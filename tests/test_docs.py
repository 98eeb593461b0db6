"""The documentation says what the code and the experiments say.

The pages' generated tables must match the JSON that the experiments wrote, every public name
must be in the API reference, the figures the pages show must exist, and the docstrings' reST
must come out as Markdown. ``make docs`` (``mkdocs build --strict``) checks the rest: broken
links and cross-references fail the build.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

import jsoftmax
import jsoftmax.testing

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def doc_tables():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        yield _load(REPO / "experiments" / "doc_tables.py")
    finally:
        sys.path.remove(str(REPO / "experiments"))


def test_generated_tables_match_their_sources(doc_tables):
    stale = doc_tables.stale()
    assert not stale, (
        "pages differ from the experiments' results; run "
        "`python experiments/doc_tables.py --write`:\n" + "\n".join(stale.values())
    )


def test_a_changed_result_makes_its_table_stale(doc_tables, tmp_path, monkeypatch):
    page = tmp_path / "scaling-out.md"
    page.write_text((DOCS / "scaling-out.md").read_text().replace("| 2 | ", "| 3 | ", 1))
    monkeypatch.setattr(doc_tables, "DOCS", tmp_path)
    assert list(doc_tables.stale(["bench-sharded"])) == ["bench-sharded"]
    assert doc_tables.write(["bench-sharded"]) == ["bench-sharded"]
    assert doc_tables.stale(["bench-sharded"]) == {}
    assert page.read_text() == (DOCS / "scaling-out.md").read_text()


def _documented() -> set[str]:
    names = set()
    for page in (DOCS / "api").glob("*.md"):
        names.update(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M))
    return names


def test_every_public_name_is_in_the_api_reference():
    public = {f"jsoftmax.{name}" for name in jsoftmax.__all__ if name != "testing"}
    public |= {f"jsoftmax.testing.{name}" for name in jsoftmax.testing.__all__}
    missing = public - _documented()
    assert not missing, f"add `::: NAME` to a page under docs/api/ for {sorted(missing)}"
    assert not _documented() - public, "the API reference documents a name that is not public"


def test_pages_and_nav_agree():
    config = (REPO / "mkdocs.yml").read_text()
    in_nav = set(re.findall(r":\s+([\w/.-]+\.md)\s*$", config, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
    assert in_nav == pages


def test_figures_shown_by_the_pages_exist():
    shown = set()
    for page in DOCS.rglob("*.md"):
        for link in re.findall(r"\]\(((?:\.\./)+experiments/results/[^)\s]+)\)", page.read_text()):
            assert (page.parent / link).resolve().is_file(), f"{page.name}: {link}"
            shown.add(Path(link).name)
    assert {"accuracy.png", "bench_loss.png", "bench_linear.png", "bench_sharded.png"} <= shown


def test_rest_docstrings_become_markdown():
    rst = _load(DOCS / "_hooks" / "griffe_rst.py")
    resolve = rst.resolver({"jsoftmax.cross_entropy", "jsoftmax.testing.check_vjp"}, ["jsoftmax"])
    text = "\n".join(
        [
            "Summary with :math:`a_i = e^{z_i}` and :func:`cross_entropy`.",
            "",
            ".. math::",
            "",
            "   \\ell = -\\sum_i y_i \\log a_i,",
            "   \\qquad a = \\mathrm{softmax}(z)",
            "",
            "See :func:`jsoftmax.testing.check_vjp`, :func:`jax.shard_map`, :mod:`jsoftmax._x`",
            "and `PaLM <https://arxiv.org/abs/2204.02311>`_. Example::",
            "",
            "    python -m jsoftmax verify",
        ]
    )
    assert rst.convert(text, resolve).splitlines() == [
        "Summary with \\(a_i = e^{z_i}\\) and [`cross_entropy`][jsoftmax.cross_entropy].",
        "",
        "$$",
        "\\ell = -\\sum_i y_i \\log a_i,",
        "\\qquad a = \\mathrm{softmax}(z)",
        "$$",
        "",
        "See [`jsoftmax.testing.check_vjp`][jsoftmax.testing.check_vjp], `jax.shard_map`, "
        "`jsoftmax._x`",
        "and [PaLM](https://arxiv.org/abs/2204.02311). Example:",
        "",
        "    python -m jsoftmax verify",
    ]


def test_a_public_looking_name_that_does_not_exist_stays_a_reference():
    # so that `mkdocs build --strict` fails on it instead of showing it as plain code
    rst = _load(DOCS / "_hooks" / "griffe_rst.py")
    resolve = rst.resolver({"jsoftmax.softmax"}, ["jsoftmax", "jsoftmax.testing"])
    assert rst.convert(":func:`jsoftmax.sofmax`", resolve) == "[`jsoftmax.sofmax`][jsoftmax.sofmax]"
    assert rst.convert(":func:`sofmax`", resolve) == "`sofmax`"
    assert rst.convert(":func:`jsoftmax._numerics.raw_max`", resolve) == (
        "`jsoftmax._numerics.raw_max`"
    )


def test_math_in_an_indented_section_keeps_its_indentation():
    rst = _load(DOCS / "_hooks" / "griffe_rst.py")
    text = "* item:\n\n  .. math::\n\n     x = 1\n\n  after"
    assert rst.convert(text) == "* item:\n\n  $$\n  x = 1\n  $$\n\n  after"


def test_readme_is_short_and_states_the_tested_range():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert readme.index("make demo") < readme.index("```python")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floor = next(d for d in project["dependencies"] if d.startswith("jax"))
    assert floor.startswith("jax>="), floor
    assert f"jax {floor.removeprefix('jax>=')}" in readme, "README: state the lowest tested jax"
    for link in re.findall(r"\]\((docs/[^)#\s]+)", readme):
        assert (REPO / link).is_file(), link


def test_floor_constraints_pin_the_declared_floor():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floor = next(d for d in project["dependencies"] if d.startswith("jax")).removeprefix("jax>=")
    pins = dict(
        line.split("==")
        for line in (REPO / ".ci" / "jax-floor.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins["jax"] == pins["jaxlib"] == floor


def test_changelog_has_the_current_version():
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(jsoftmax.__version__)}\]", changelog, flags=re.M)
