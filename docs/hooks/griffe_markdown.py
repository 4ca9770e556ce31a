"""A griffe extension for the API pages: the package's docstrings are Google style with doctests
and a few reST roles; this turns them into the Markdown mkdocstrings renders.

- a doctest block (``>>>`` lines and their output, up to a blank line) becomes a ``pycon`` fence;
- ``:func:`name``` (and ``:class:``, ``:mod:``, ``:meth:``, ``:attr:``, ``:data:``, ``:exc:``) becomes
  ``name`` in code, ``~`` shortening a dotted path to its last part as Sphinx does.

Only the rendering changes: the docstrings (and the doctests pytest runs) stay as written.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def markdown(text: str) -> str:
    """``text`` with its doctest blocks fenced and its reST roles as code spans (tested in tests/test_docs.py)."""
    out: list[str] = []
    fence: str | None = None  # the indentation of the open pycon fence
    in_code = False  # inside a fence the docstring wrote itself
    for line in text.splitlines():
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if fence is not None and not stripped:
            out += [f"{fence}```", line]
            fence = None
            continue
        if fence is None and stripped.startswith("```"):
            in_code = not in_code
        if fence is None and not in_code and stripped.startswith(">>>"):
            fence = indent
            out.append(f"{indent}```pycon")
        out.append(line if fence is not None or in_code else _ROLE.sub(_role, line))
    if fence is not None:
        out.append(f"{fence}```")
    return "\n".join(out)


class DocstringMarkdown(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`markdown`."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
