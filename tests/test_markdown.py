"""Every markdown table the project commits has as many cells in each row as in its header.

A row one cell wider renders without error but with its cells under the wrong column names
and its last cell dropped (the plan-quality tables had 11 columns and 12 cells per row)."""

import re
from pathlib import Path

import pytest

from adainfer.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def table_width_errors(text: str) -> list[str]:
    """'line N: W cells under H columns' for each table row whose width differs from its
    header's (a table: consecutive lines starting with '|'; an escaped '\\|' is no border)."""
    errors, header = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("|"):
            header = None
            continue
        width = len(re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|")))
        if header is None:
            header = width
        elif width != header:
            errors.append(f"line {number}: {width} cells under {header} columns")
    return errors


def committed_markdown() -> list[Path]:
    return sorted(
        p
        for p in [*ROOT.glob("*.md"), *(ROOT / "results").rglob("*.md"), *ROOT.glob("bench/*.md")]
        if ".venv" not in p.parts
    )


def test_the_checker_sees_a_row_wider_than_its_header():
    good = "| a | b |\n|---|---|\n| 1 | 2 \\| 3 |\n"
    assert table_width_errors(good) == []
    bad = "text\n| a | b |\n|---|---|\n| 1 | 2 | 3 |\n\n| c |\n|---|\n| 4 |\n"
    assert table_width_errors(bad) == ["line 4: 3 cells under 2 columns"]


@pytest.mark.parametrize("path", committed_markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_tables_have_rows_as_wide_as_their_header(path):
    assert table_width_errors(path.read_text()) == []


def test_markdown_table_refuses_a_row_of_another_width():
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    for row in ([1, 2, 3], [1], ["x | y", 2]):
        with pytest.raises(ValueError, match="2 columns"):
            markdown_table(["a", "b"], [row])
