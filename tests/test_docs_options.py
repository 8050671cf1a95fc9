"""
The configuration table of the docs agrees with the options the server
takes: every option of C{twistd rendezvous} (however it was declared, read
from L{rendezvous_twisted.tap.settings}) has exactly one row, with its
C{.tac} environment variable and its default, and no row names an option
that does not exist.  The table's prose (the "Meaning" column) is the docs'
own: it says more than the one-line help can, so it is checked, not
generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rendezvous_twisted.tap import Setting, settings

REPO = Path(__file__).resolve().parent.parent
#: The page that holds the configuration table, once the docs are split by
#: reader; until then, the README holds it.
CONFIGURATION_PAGE = REPO / "docs" / "configuration.md"
FALLBACK_PAGE = REPO / "README.md"

_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_CODE = re.compile(r"`([^`]*)`")


@dataclass(frozen=True)
class Row:
    """
    One row of the table: the option it names, its variable, its default
    cell, and the line it is on.
    """

    option: str
    variable: str | None
    default: str
    line: int


def page() -> Path:
    return CONFIGURATION_PAGE if CONFIGURATION_PAGE.exists() else FALLBACK_PAGE


def table_rows(text: str) -> list[Row]:
    """
    The rows of the first Markdown table whose first header is "Option".
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _cells(line)[:1] == ["Option"]), None)
    assert start is not None, "no table whose first column is 'Option'"
    header = [cell.lower() for cell in _cells(lines[start])]
    variable_column = next(i for i, name in enumerate(header) if "variable" in name)
    default_column = header.index("default")
    rows = []
    for number, line in enumerate(lines[start + 2 :], start + 3):
        if not line.startswith("|"):
            break
        row = _cells(line)
        option = re.search(r"`--([a-z0-9][a-z0-9-]*)", row[0])
        assert option, f"line {number}: no --option in {row[0]!r}"
        variable = re.search(r"RENDEZVOUS_[A-Z0-9_]+", row[variable_column])
        rows.append(
            Row(
                option.group(1),
                variable.group(0) if variable else None,
                row[default_column],
                number,
            )
        )
    return rows


def _cells(line: str) -> list[str]:
    line = line.strip()
    if not line.startswith("|"):
        return []
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(line.strip("|"))]


def as_written(default: Any) -> str | None:
    """
    A default as the docs write it (C{60}, C{0.5}, C{memory:}), or None
    for an option that is off or empty by default (the docs say so in words).
    """
    if isinstance(default, list):
        default = default[0] if len(default) == 1 else None
    if default is None or default is False or (default == 0 and isinstance(default, int)):
        return None
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return table_rows(page().read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def options() -> dict[str, Setting]:
    return {setting.option: setting for setting in settings()}


def test_every_option_has_one_row(rows: list[Row], options: dict[str, Setting]) -> None:
    """Each option of twistd rendezvous has exactly one row, and each row is an option."""
    named = [row.option for row in rows]
    assert sorted(set(named)) == sorted(named), f"rows repeated in {page().name}: {named}"
    missing = sorted(set(options) - set(named))
    unknown = sorted(set(named) - set(options))
    assert not missing, f"{page().name} has no row for: {', '.join('--' + o for o in missing)}"
    assert not unknown, f"{page().name} documents options that do not exist: {unknown}"


def test_each_row_names_the_options_variable(rows: list[Row], options: dict[str, Setting]) -> None:
    """Each row gives the .tac's environment variable of its option."""
    for row in rows:
        assert row.variable == options[row.option].variable, (
            f"{page().name}:{row.line}: --{row.option} is {options[row.option].variable}, "
            f"not {row.variable}"
        )


def test_each_row_gives_the_options_default(rows: list[Row], options: dict[str, Setting]) -> None:
    """A default the server has is the row's first code span; one it lacks is said in words."""
    for row in rows:
        expected = as_written(options[row.option].default)
        first = _CODE.match(row.default)
        where = f"{page().name}:{row.line}: --{row.option}"
        if expected is None:
            assert first is None, f"{where} has no default value, the row says {row.default!r}"
        else:
            assert first is not None and first.group(1) == expected, (
                f"{where} defaults to {expected}, the row says {row.default!r}"
            )


def test_the_check_reads_tables_as_written() -> None:
    """The table reader finds options, variables and defaults, escaped pipes included."""
    text = (
        "| Option | `.tac` environment variable | Default | Meaning |\n"
        "|---|---|---|---|\n"
        "| `--log-format text\\|json` | `RENDEZVOUS_LOG_FORMAT` | `text` | a \\| b |\n"
        "| `--no-access-log` | `RENDEZVOUS_NO_ACCESS_LOG=1` | access log on | x |\n"
        "\n"
        "| Option | other |\n"
    )
    assert table_rows(text) == [
        Row("log-format", "RENDEZVOUS_LOG_FORMAT", "`text`", 3),
        Row("no-access-log", "RENDEZVOUS_NO_ACCESS_LOG", "access log on", 4),
    ]
    assert [as_written(v) for v in (60.0, 0.5, 10240, ["tcp:8080"], [], None, 0)] == [
        "60",
        "0.5",
        "10240",
        "tcp:8080",
        None,
        None,
        None,
    ]
