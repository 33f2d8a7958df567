"""Writes the notebooks in colab/ from their sources, the ``colab/NN_name.py`` files.

Each source is a Python file in jupytext's "percent" format, so that it is reviewed,
linted and formatted as code:

- ``# %%`` starts a code cell; a commented magic such as ``# %matplotlib inline`` becomes
  the magic ``%matplotlib inline`` again in the notebook;
- ``# %% [markdown]`` starts a markdown cell, whose lines are comments (``# text``, or a
  bare ``#`` for an empty line);
- lines before the first ``# %%`` (such as a ``# ruff: noqa`` line) are not part of the
  notebook, and blank lines around a cell (ruff puts two after a function) are dropped.

Edit a source, then run ``python colab/build.py`` from the repository root and commit both
files. The notebooks are written without outputs and with stable cell ids;
``tests/test_notebooks.py`` checks that the committed ones equal what this script writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("[0-9][0-9]_*.py"))
CELL_MARKER = re.compile(r"# %%( \[markdown\])?")
COMMENTED_MAGIC = re.compile(r"^# (%[^%\s].*)$", flags=re.MULTILINE)


def _markdown_text(lines: list[str], *, source: str, first_line: int) -> str:
    text = []
    for offset, line in enumerate(lines):
        if line != "#" and not line.startswith("# "):
            where = f"{source}:{first_line + offset}"
            raise ValueError(f"{where}: a markdown cell's lines start with '# ' (or are '#')")
        text.append(line[2:])
    return "\n".join(text)


def parse_cells(text: str, *, source: str = "<source>") -> list[nbformat.NotebookNode]:
    """The notebook cells of a percent-format source.

    Args:
        text: the source file's text.
        source: its name, for error messages.

    Returns:
        The code and markdown cells, in order, without ids.

    Raises:
        ValueError: a markdown cell has a line that is not a comment.

    >>> text = "# %% [markdown]\\n# # Title\\n#\\n# Text.\\n\\n# %%\\n# %time x = 1\\n"
    >>> cells = parse_cells(text)
    >>> [(cell.cell_type, cell.source) for cell in cells]
    [('markdown', '# Title\\n\\nText.'), ('code', '%time x = 1')]
    """
    cells = []
    lines = text.splitlines()
    starts = [index for index, line in enumerate(lines) if CELL_MARKER.fullmatch(line)]
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        first = start + 1
        while first < end and not lines[first].strip():
            first += 1
        last = end
        while last > first and not lines[last - 1].strip():
            last -= 1
        body = lines[first:last]
        if lines[start].endswith("[markdown]"):
            markdown = _markdown_text(body, source=source, first_line=first + 1)
            cells.append(new_markdown_cell(markdown))
        else:
            cells.append(new_code_cell(COMMENTED_MAGIC.sub(r"\1", "\n".join(body))))
    return cells


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook of ``source``, without outputs and with stable cell ids.

    >>> build(HERE / "01_quickstart.py").metadata["colab"]["name"]
    '01_quickstart.ipynb'
    """
    name = f"{source.stem}.ipynb"
    cells = parse_cells(source.read_text(encoding="utf-8"), source=source.name)
    for index, cell in enumerate(cells):
        cell["id"] = f"{source.stem[:2]}-{index:02d}"  # stable ids keep regenerated diffs empty
    notebook = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "colab": {"name": name, "provenance": []},
        },
    )
    nbformat.validate(notebook)
    return notebook


def render(source: Path) -> str:
    """The text that this script writes to the notebook of ``source``.

    >>> render(HERE / "01_quickstart.py").startswith('{\\n "cells": [')
    True
    """
    return nbformat.writes(build(source)) + "\n"


def main() -> int:
    for source in SOURCES:
        path = source.with_suffix(".ipynb")
        path.write_text(render(source), encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
