"""Result tables in the docs, made from committed CSV files by a command, and the check that they still are.

A generated table in a markdown page sits right under an HTML comment holding the command that makes it
(lines may end in `\\`, as in a shell); the table runs from the line after `-->` to the first blank line,
which is where markdown ends a table anyway:

    <!-- table: tulip-report --markdown sweeps/results/regularizers_report.csv --order none,lip \\
      --column regularizer:code=regularizer --column 'test/error_pct=test error %' -->
    | regularizer | test error % |
    |---|---:|
    | `none` | 3.33 ± 0.4 |

`tulip-report --markdown CSV` prints such a table (`make_table`): one row per CSV row, or with `--by KEY`
one row per value of KEY and the mean ± sample std (pandas) of each number over its rows; the options'
meaning is in `add_table_arguments`. This module also makes a page's tables again, or checks them:

    python -m tulip.report.doc_tables README.md docs/*.md          # rewrite every table from its command
    python -m tulip.report.doc_tables --check README.md docs/*.md  # exit 1 naming each stale table

A command's CSV path is relative to the folder it runs in: `--root`, by default the current one (the
repository root, where the docs' commands are meant to run).
"""
import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PROGRAM = "tulip-report"
MARKER = "<!-- table:"
COMMENT_END = "-->"
MISSING = "–"  # a cell whose run did not record the figure
SPREADS = ("std", "ci", "none")
DEFAULT_FORMAT = ".3g"
TEXT_FORMATS = ("code", "list", "set")


class TableError(ValueError):
    """A table that cannot be made: a bad option, an unreadable CSV, a key it lacks, no row left."""


@dataclass(frozen=True)
class Column:
    keys: tuple[str, ...]
    format: str
    header: str

    @classmethod
    def parse(cls, spec: str, default_format: str = DEFAULT_FORMAT) -> "Column":
        """`KEYS[:FORMAT][=HEADER]`: no metric key holds `:` or `=`, a header may hold both."""
        left, _, header = spec.partition("=")
        names, _, form = left.partition(":")
        keys = tuple(key.strip() for key in names.split(",") if key.strip())
        if not keys:
            raise TableError(f"--column {spec!r}: no key (KEYS[:FORMAT][=HEADER])")
        form = form.strip() or default_format
        if form not in TEXT_FORMATS:
            check_number_format(form, f"--column {spec!r}")
        return cls(keys, form, header.strip() or " / ".join(keys))


def check_number_format(spec: str, where: str):
    try:
        format(1.5, spec)
    except ValueError as error:
        raise TableError(f"{where}: {spec!r} is not a format for numbers ({error})") from None


def as_number(text) -> float | None:
    """A CSV cell as a number (`inf` included), None for text and empty cells."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def same_value(cell, wanted) -> bool:
    """`0.10` in a CSV is `0.1` on the command line: numbers compare as numbers, the rest as text."""
    a, b = as_number(cell), as_number(wanted)
    return a == b if a is not None and b is not None else str(cell).strip() == str(wanted).strip()


def number_text(value: float, spec: str) -> str:
    if math.isnan(value):
        return MISSING
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    text = format(value, spec)
    # a `g` format writes 156 to 2 digits as 1.6e+02: a table reads better with 160
    return format(float(text), ".0f") if "e+" in text else text


def spread_format(spec: str) -> str:
    """A fixed-point mean (.1f) gets a spread with as many decimals, any other one 2 significant digits."""
    return spec if spec.endswith("f") else ".2g"


def cell_text(value: float, spec: str, spread=None, interval=None, count=None, rows=None) -> str:
    """`mean ± std`, `mean [low, high]` or the value alone; `(n=2)` when only `count` of `rows` had it."""
    text = number_text(value, spec)
    if spread is not None and math.isfinite(value) and math.isfinite(spread):
        text += f" ± {number_text(spread, spread_format(spec))}"
    if interval is not None and math.isfinite(value) and all(math.isfinite(v) for v in interval):
        text += f" [{number_text(interval[0], spec)}, {number_text(interval[1], spec)}]"
    if count is not None and 0 < count < rows:
        text += f" (n={count})"
    return text


def text_cell(value, form: str, key: str = "") -> str:
    """A value shown as the CSV writes it (a `list` column's seeds, a strength), in backticks for `code`;
    for `set`, `key=value` in backticks where the value is set (not empty, not 0), else ''."""
    text = str(value).strip()
    if form == "set":
        return f"`{key}={text}`" if text and as_number(text) != 0 else ""
    if not text:
        return MISSING
    number = as_number(text)
    if number is not None and math.isinf(number):
        text = number_text(number, DEFAULT_FORMAT)
    return f"`{text}`" if form == "code" else text


def numbers_of(cells: pd.Series) -> pd.Series:
    return pd.Series([as_number(cell) if str(cell).strip() else math.nan for cell in cells], dtype=float)


def is_numeric(cells: pd.Series) -> bool:
    return all(as_number(cell) is not None for cell in cells if str(cell).strip())


def read_table(path: Path) -> pd.DataFrame:
    try:
        # as text, so that `0.30` or `lip+J2` reach the table as written and empty cells stay empty
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise TableError(f"{path}: not a readable CSV ({error})") from None


def make_table(path: Path, columns: list[Column], by=(), where=(), order=(), spread="std") -> str:
    """The markdown table (header, alignment, rows), each line ending in a newline."""
    if not columns:
        raise TableError("--markdown needs at least one --column KEYS[:FORMAT][=HEADER]")
    if spread == "ci" and by:
        raise TableError("--spread ci shows a report.csv's <key>_ci_low/_ci_high columns; with --by the "
                         "spread is the std over the rows")
    filters = []
    for condition in where:
        key, equals, values = condition.partition("=")
        if not equals or not key.strip():
            raise TableError(f"--where {condition!r}: expected KEY=V1,V2,...")
        filters.append((key.strip(), values.split(",")))
    frame = read_table(path)
    order_key = by[0] if by else columns[0].keys[0]
    wanted = {key for column in columns for key in column.keys} | set(by) | {key for key, _ in filters}
    missing = sorted(wanted - set(frame.columns))
    if missing:
        raise TableError(f"{path}: no column {', '.join(missing)} (it has: {', '.join(frame.columns)})")
    for key, values in filters:
        frame = frame[[any(same_value(cell, value) for value in values) for cell in frame[key]]]
    if frame.empty:
        raise TableError(f"{path}: no row left after {' '.join('--where ' + w for w in where)}")

    rows = aggregated_rows(frame, by, columns) if by else plain_rows(frame, columns, spread)
    # the values --order lists first, in its order; the others after them, in the order they came
    rows.sort(key=lambda row: next((i for i, value in enumerate(order) if same_value(row[0][order_key], value)),
                                   len(order)))
    textual = [column.format in ("code", "set") or not all(is_numeric(frame[key]) for key in column.keys)
               for column in columns]
    lines = ["| " + " | ".join(escape(column.header) for column in columns) + " |",
             "|" + "|".join("---" if text else "---:" for text in textual) + "|"]
    for _, cells in rows:
        lines.append("| " + " | ".join(escape(joined([cells[key] for key in column.keys], column.format))
                                       for column in columns) + " |")
    return "\n".join(lines) + "\n"


def joined(parts: list[str], form: str = DEFAULT_FORMAT) -> str:
    if form == "set":  # only the keys that are set, e.g. the one strength of each method
        return " ".join(part for part in parts if part) or MISSING
    return MISSING if all(part == MISSING for part in parts) else " / ".join(parts)


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def plain_rows(frame: pd.DataFrame, columns: list[Column], spread: str) -> list[tuple[dict, dict]]:
    """One row per CSV row: (its values, its cells by key)."""
    rows = []
    for record in frame.to_dict("records"):
        cells = {}
        for column in columns:
            for key in column.keys:
                value = as_number(record[key])
                if column.format in TEXT_FORMATS or value is None:
                    cells[key] = text_cell(record[key], column.format, key)
                    continue
                std = as_number(record.get(f"{key}_std")) if spread == "std" else None
                low, high = (as_number(record.get(f"{key}_ci_{end}")) for end in ("low", "high"))
                interval = (low, high) if spread == "ci" and low is not None and high is not None else None
                cells[key] = cell_text(value, column.format, std, interval)
        rows.append((record, cells))
    return rows


def aggregated_rows(frame: pd.DataFrame, by: list[str], columns: list[Column]) -> list[tuple[dict, dict]]:
    """One row per value of the `by` keys, in the order they first appear: a number as the mean ± sample
    std (ddof=1) over the group's rows, text and `list` columns as the group's distinct values."""
    rows = []
    for group, members in frame.groupby(by, sort=False):
        values = dict(zip(by, group if isinstance(group, tuple) else (group,)))
        cells = {}
        for column in columns:
            for key in column.keys:
                if key in by or column.format in TEXT_FORMATS or not is_numeric(members[key]):
                    cells[key] = ", ".join(dict.fromkeys(filter(None, (text_cell(c, column.format, key)
                                                                      for c in members[key]))))
                    continue
                numbers = numbers_of(members[key])
                with np.errstate(invalid="ignore"):  # inf - inf in the std of infinite values: NaN is right
                    std = numbers.std(ddof=1)
                cells[key] = cell_text(numbers.mean(), column.format, std, None, int(numbers.count()), len(numbers))
        rows.append((values, cells))
    return rows


# ---------------------------------------------------------------------------------------------------
# The options, shared by `tulip-report --markdown` and the commands in the pages


class _RaisingParser(argparse.ArgumentParser):
    """A page's command with a bad option is a problem of that page, not the end of the check."""

    def error(self, message):
        raise TableError(message)


def add_table_arguments(parser: argparse.ArgumentParser):
    """The options only --markdown uses (tulip-report has its own --by and --order, read the same way)."""
    parser.add_argument("--markdown", type=Path, default=None, metavar="CSV",
                        help="print a markdown table of a CSV (a report.csv, a runs.csv, any table) for the "
                             "docs, nothing else; its options: --column, --where, --by, --order, --spread, "
                             "--format. `python -m tulip.report.doc_tables` rewrites the docs' tables")
    parser.add_argument("--column", action="append", default=[], metavar="KEYS[:FORMAT][=HEADER]",
                        help="with --markdown, a column: a CSV key, or keys joined by commas shown as "
                             "'a / b'; FORMAT a Python format spec (.1f), code (in backticks), list (with "
                             "--by: the distinct values) or set (`key=value` of the keys whose value is "
                             "not 0 or empty, e.g. each method's strength); HEADER its title; repeatable, "
                             "in table order")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=V1,V2",
                        help="with --markdown, keep the rows whose KEY is one of the values; repeatable")
    parser.add_argument("--spread", choices=SPREADS, default="std",
                        help="with --markdown, a number's spread from the CSV: std (<key>_std, as "
                             "'mean ± std'; with --by the std over the rows), ci (<key>_ci_low/_ci_high, "
                             "as 'mean [low, high]') or none")
    parser.add_argument("--format", default=DEFAULT_FORMAT, metavar="SPEC",
                        help=f"with --markdown, the numbers' default format spec (default {DEFAULT_FORMAT}: 3 "
                             "significant digits, the spread 2; a fixed-point spec such as .1f gives the "
                             "spread as many decimals)")


def command_parser() -> argparse.ArgumentParser:
    parser = _RaisingParser(prog=PROGRAM, add_help=False)
    add_table_arguments(parser)
    parser.add_argument("--by", default=None)
    parser.add_argument("--order", default=None, type=lambda text: [v for v in text.split(",") if v])
    return parser


def table_from_args(args) -> str:
    check_number_format(args.format, "--format")
    columns = [Column.parse(spec, args.format) for spec in args.column]
    by = [key for key in (args.by or "").split(",") if key]
    return make_table(args.markdown, columns, by, args.where, args.order or (), args.spread)


def print_table(args) -> int:
    """`tulip-report --markdown`: the table on stdout; 1 for a CSV that cannot be read, 2 for bad options."""
    try:
        print(table_from_args(args), end="")
    except (TableError, OSError) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2 if isinstance(error, TableError) else 1
    return 0


def run_command(command: str, root: Path) -> str:
    """The table a page's command prints, made here rather than in a subprocess (the same options and code)."""
    words = shlex.split(command)
    if words[:1] != [PROGRAM] or "--markdown" not in words:
        raise TableError(f"expected `{PROGRAM} --markdown CSV ...`, got {command!r}")
    args = command_parser().parse_args(words[1:])
    if not args.markdown.is_absolute():
        args.markdown = root / args.markdown
    if not args.markdown.is_file():
        raise TableError(f"{args.markdown}: no such CSV file")
    return table_from_args(args)


# ---------------------------------------------------------------------------------------------------
# The pages


@dataclass(frozen=True)
class Block:
    line: int  # of the comment, counted from 1
    command: str
    first: int  # index of the table's first line
    end: int  # index after its last line


def find_blocks(lines: list[str]) -> list[Block]:
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith(MARKER):
            i += 1
            continue
        last = next((j for j in range(i, len(lines)) if COMMENT_END in lines[j]), None)
        if last is None:
            raise TableError(f"line {i + 1}: the table comment has no end ({COMMENT_END})")
        parts = [line.strip().removesuffix("\\") for line in lines[i:last + 1]]
        command = " ".join(parts)[len(MARKER):].split(COMMENT_END, 1)[0].strip()
        end = last + 1
        while end < len(lines) and lines[end].strip():
            end += 1
        blocks.append(Block(i + 1, command, last + 1, end))
        i = end
    return blocks


@dataclass(frozen=True)
class Problem:
    line: int  # of the table's comment (0: the page as a whole)
    message: str
    fixed_by_rewrite: bool  # a stale table, which the rewrite makes again; not a command that fails


def refresh(text: str, root: Path) -> tuple[str, int, list[Problem]]:
    """The page with every table made again by its command, how many tables it has, and its problems."""
    lines = text.splitlines()
    try:
        blocks = find_blocks(lines)
    except TableError as error:
        return text, 0, [Problem(0, str(error), False)]
    problems, fresh, copied = [], [], 0
    for block in blocks:
        fresh += lines[copied:block.first]
        current = lines[block.first:block.end]
        try:
            made = run_command(block.command, root).splitlines()
        except (TableError, OSError) as error:
            problems.append(Problem(block.line, f"cannot make the table: {error}", False))
            made = current
        if made != current:
            at = next((i for i, (old, new) in enumerate(zip(current, made)) if old != new),
                      min(len(current), len(made)))
            old, new = (rows[at] if at < len(rows) else "(no line)" for rows in (current, made))
            problems.append(Problem(block.line, f"stale table: line {block.first + at + 1} is {old!r}, its "
                                                f"command prints {new!r}", True))
        fresh += made
        copied = block.end
    fresh += lines[copied:]
    return "\n".join(fresh) + ("\n" if text.endswith("\n") else ""), len(blocks), problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tulip.report.doc_tables",
        description="Make every generated table of markdown pages again from its command (the HTML comment "
                    "above it), or with --check only name the tables that differ from what it prints now.")
    parser.add_argument("pages", nargs="+", type=Path, help="markdown files, e.g. README.md docs/*.md")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale table")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the folder the commands' CSV paths are relative to (default: the current one)")
    args = parser.parse_args(argv)
    failed, tables = False, 0
    for page in args.pages:
        text = page.read_text()
        fresh, count, problems = refresh(text, args.root)
        tables += count
        for problem in problems:
            if problem.fixed_by_rewrite and not args.check:
                print(f"{page}:{problem.line}: made again ({problem.message})")
            else:
                print(f"{page}:{problem.line}: {problem.message}", file=sys.stderr)
                failed = True
        if not args.check and fresh != text:
            page.write_text(fresh)
    print(f"{tables} generated tables in {len(args.pages)} pages " + ("checked" if args.check else "made")
          + (": see above" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
