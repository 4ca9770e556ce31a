"""The documentation: README.md and every page under docs/.

- Every fenced ```python block runs as written, each on its own in a fresh temporary directory.
  A block whose first line starts with ``# excerpt`` shows a fragment of a larger program (a
  ``model`` it does not build, a method of a class): it is compiled, not run.
- The errors table of docs/reference/errors.md is the one ``tests/test_bad_input.py`` tests
  (``python tests/test_bad_input.py`` prints it).
- ``mkdocs build --strict`` builds the site (the ``docs`` extra) without a warning: every page in
  the nav, every link and anchor found, every API page rendered from the docstrings.
- README.md's relative links point at files that exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_bad_input import CASES, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
ERRORS = DOCS / "reference" / "errors.md"
# A fence may be indented (inside a list item); it closes at the same indentation.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
EXCERPT = "# excerpt"
# Blocks that take more than a few seconds on 2 CPU cores: (page, block number) -> why.
SLOW: dict[tuple[str, int], str] = {}


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks() -> list:
    params = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for i, match in enumerate(FENCE.finditer(text)):
            code = textwrap.dedent(match["code"])
            line = text.count("\n", 0, match.start("code"))  # lines before the block's first line
            key = (_name(page), i)
            marks = [pytest.mark.slow] if key in SLOW else []
            params.append(pytest.param(page, line, code, id=f"{key[0]}:{i}", marks=marks))
    return params


BLOCKS = _blocks()


@pytest.mark.parametrize(("page", "line", "code"), BLOCKS)
def test_python_block_runs(page: Path, line: int, code: str, tmp_path, monkeypatch) -> None:
    # Padded with blank lines so that a traceback names the page's own line numbers.
    compiled = compile("\n" * line + code, str(page), "exec")
    if code.lstrip().startswith(EXCERPT):
        return  # a fragment: it must parse, it cannot run on its own
    monkeypatch.chdir(tmp_path)
    exec(compiled, {"__name__": "__docs__"})


def test_the_pages_have_runnable_examples() -> None:
    runnable = {
        _name(page) for page, _, code in (b.values for b in BLOCKS) if not code.lstrip().startswith(EXCERPT)
    }
    assert {"README.md", "docs/getting-started.md", "docs/guides/plain-pytorch.md"} <= runnable
    assert {f"{page}:{i}" for page, i in SLOW} <= {b.id for b in BLOCKS}  # SLOW names real blocks


def test_fence_finds_indented_blocks_and_skips_other_languages() -> None:
    text = "a\n```python\nx = 1\n```\n- item\n\n  ```python\n  y = 2\n  ```\n```bash\nls\n```\n"
    assert [textwrap.dedent(m["code"]) for m in FENCE.finditer(text)] == ["x = 1\n", "y = 2\n"]


def _table_rows(path: Path) -> list[str]:
    """The rows of the first Markdown table in ``path`` whose header starts with ``| input |``."""
    rows: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if rows and not line.startswith("|"):
            break
        if line.startswith("| input |") or (rows and line.startswith("|")):
            rows.append(line)
    return rows


def test_errors_page_is_the_tested_table() -> None:
    rows = _table_rows(ERRORS)
    expected = markdown_table().splitlines()
    untested = [r for r in rows if r not in expected]
    missing = [r for r in expected if r not in rows]
    assert not untested, (
        f"rows of {ERRORS.name} without a test (python tests/test_bad_input.py prints the table): {untested}"
    )
    assert not missing, (
        f"tested errors missing from {ERRORS.name} (python tests/test_bad_input.py): {missing}"
    )
    assert rows == expected  # the same order too: the table is pasted as printed
    assert len(rows) == len(CASES) + 2


_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s#]+)(?:#[^)\s]*)?\)")


def test_readme_links_resolve() -> None:
    links = _LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "docs/index.md" in links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _griffe_markdown():
    pytest.importorskip("griffe", reason="the docs extra (mkdocstrings[python]) is not installed")
    path = DOCS / "hooks" / "griffe_markdown.py"
    spec = importlib.util.spec_from_file_location("griffe_markdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstrings_render_doctests_as_code_and_roles_as_code_spans() -> None:
    markdown = _griffe_markdown().markdown
    text = "See :func:`~a.b.f` and :mod:`embconstraint.hf`.\n\n>>> f()\n1\n\n    >>> g()\n\nEnd :class:`C`."
    assert markdown(text).splitlines() == [
        "See `f` and `embconstraint.hf`.",
        "",
        "```pycon",
        ">>> f()",
        "1",
        "```",
        "",
        "    ```pycon",
        "    >>> g()",
        "    ```",
        "",
        "End `C`.",
    ]
    fenced = "```python\nx = ':func:`f`'\n```\n>>> 1\n1"
    assert markdown(fenced).splitlines() == [
        "```python",
        "x = ':func:`f`'",
        "```",
        "```pycon",
        ">>> 1",
        "1",
        "```",
    ]


@pytest.mark.subprocess
def test_mkdocs_build_strict(tmp_path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed")
    pytest.importorskip("material", reason="the docs extra (mkdocs-material) is not installed")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    errors = (site / "reference" / "errors" / "index.html").read_text(encoding="utf-8")
    assert "embedding must be an nn.Embedding" in errors
    api = (site / "reference" / "api" / "embconstraint" / "index.html").read_text(encoding="utf-8")
    assert "embconstraint.constrain" in api and "Reference row" in api  # rendered from the docstrings
    assert '<span class="gp">&gt;&gt;&gt; </span>' in api and "<blockquote>" not in api  # doctests as code
