"""A Griffe extension: the reST of jsoftmax's docstrings, rewritten as Markdown for mkdocstrings.

The docstrings follow jax's and optax's house style: Google sections with reST inside them
(``.. math::`` blocks, ``:math:`` and ``:func:`` roles, ```text <url>`_`` links). mkdocstrings
renders docstrings as Markdown, so this extension rewrites those constructs once the package
is loaded, before any docstring is parsed:

* ``.. math::`` and its indented block become a ``$$ ... $$`` block, and ``:math:`x``` becomes
  ``\\(x\\)``; ``pymdownx.arithmatex`` (generic mode) marks both for KaTeX.
* ``:func:``, ``:class:``, ``:mod:``, ``:data:``, ``:attr:`` and ``:meth:`` roles that name a
  public object of the package become cross-references (``[`name`][jsoftmax.name]``), which
  ``mkdocs build --strict`` fails on when the object is missing from the API reference. Roles
  that name anything else (jax, private helpers) become inline code.
* ```text <url>`_`` becomes ``[text](url)``, and a paragraph ending in ``::`` ends in ``:``
  (its indented block is already a Markdown code block).

Only :func:`convert` is needed to test the rewriting; Griffe itself is imported only by the
extension class.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence

_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>\S.*)?$")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|attr|meth|obj|exc):`~?(?P<target>[^`]+)`")
_LINK = re.compile(r"`(?P<text>[^`<]+?)\s*<(?P<url>[a-z]+://[^>]+)>`__?")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_BLOCK.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body = [match.group("inline")] if match.group("inline") else []
        i += 1
        # The directive's content: the following lines indented deeper than the directive,
        # with blank lines inside it (a blank line before the content is usual).
        while i < len(lines) and (
            not lines[i].strip() or _indent_of(lines[i]) > len(indent.expandtabs())
        ):
            body.append(lines[i].strip())
            i += 1
        tex = [line for line in body if line]
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}$$", *(f"{indent}{line}" for line in tex), f"{indent}$$", ""]
    return out


def convert(text: str, resolve: Callable[[str], str | None] = lambda target: None) -> str:
    """Rewrites the reST constructs of one docstring as Markdown.

    Args:
      text: the docstring, dedented (as Griffe stores it).
      resolve: maps a role's target (``cross_entropy``, ``jsoftmax.testing.check_vjp``) to the
        identifier of a documented object, or None when there is none.

    Returns:
      The docstring in Markdown.
    """

    def xref(match: re.Match[str]) -> str:
        target = match.group("target").strip()
        shown = target.removesuffix("()")
        identifier = resolve(shown)
        return f"[`{shown}`][{identifier}]" if identifier else f"`{shown}`"

    lines = _math_blocks(text.splitlines())
    text = "\n".join(_LITERAL_MARKER.sub(":", line) for line in lines)
    text = _MATH_ROLE.sub(lambda m: "\\(" + m.group("tex") + "\\)", text)
    text = _XREF_ROLE.sub(xref, text)
    return _LINK.sub(lambda m: f"[{m.group('text')}]({m.group('url')})", text)


def resolver(public: Collection[str], packages: Sequence[str]) -> Callable[[str], str | None]:
    """A ``resolve`` for :func:`convert`.

    A name is looked up as given, then in each package (``packages[0]`` is the root). A name
    that is not found but reads as a public name of the root package (``jsoftmax.name``, no
    part starting with ``_``) is still made a cross-reference, so that the build fails on it.
    """
    root = packages[0]

    def resolve(target: str) -> str | None:
        for candidate in (target, *(f"{package}.{target}" for package in packages)):
            if candidate in public:
                return candidate
        parts = target.split(".")
        if parts[0] == root and not any(part.startswith("_") for part in parts):
            return target
        return None

    return resolve


try:
    import griffe
except ImportError:  # the tests import convert() without the docs extra
    griffe = None

if griffe is not None:

    class ReSTDocstrings(griffe.Extension):
        """Rewrites every docstring of the loaded package with :func:`convert`."""

        def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
            public = set()
            packages = [pkg.path]
            for name, member in pkg.members.items():
                if name.startswith("_"):
                    continue
                public.add(f"{pkg.path}.{name}")
                if member.is_module:  # a public subpackage, such as jsoftmax.testing
                    packages.append(member.path)
                    public.update(
                        f"{member.path}.{sub}" for sub in member.members if not sub.startswith("_")
                    )
            resolve = resolver(public, packages)
            for obj in _walk(pkg):
                if obj.docstring is not None:
                    obj.docstring.value = convert(obj.docstring.value, resolve)

    def _walk(obj: griffe.Object):
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from _walk(member)
