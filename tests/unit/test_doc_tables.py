"""The docs' result tables are made from committed CSV files (tulip.report.doc_tables): every generated table
in README.md and docs/*.md equals what its command prints now, every result table of the README and
docs/results.md is a generated one, and a changed number in a CSV is caught by --check and fixed by the
rewrite. No training: the CSV files are committed."""
import csv
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from tulip import report
from tulip.report import doc_tables
from tulip.report.doc_tables import Column, TableError, find_blocks, make_table, refresh

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the pages held to "every table of numbers is generated" (docs/study.md joins once its tables are)
RESULT_PAGES = [ROOT / "README.md", ROOT / "docs" / "results.md", ROOT / "docs" / "study.md"]
# (page, header line) of tables with numbers that are not results, e.g. configuration tables: none yet
NOT_RESULTS: set[tuple[str, str]] = set()
SEPARATOR = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def markdown_tables(text: str) -> list[tuple[int, list[str]]]:
    """Every markdown table outside code blocks: (index of its header line, its lines)."""
    lines, tables, fenced, i = text.splitlines(), [], False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        elif (not fenced and lines[i].startswith("|") and i + 1 < len(lines)
              and SEPARATOR.match(lines[i + 1])):
            end = i + 2
            while end < len(lines) and lines[end].strip():
                end += 1
            tables.append((i, lines[i:end]))
            i = end
            continue
        i += 1
    return tables


def holds_numbers(table: list[str]) -> bool:
    """A data cell with a digit outside `code`: a result (file names and keys are in backticks)."""
    cells = [cell for row in table[2:] for cell in row.strip().strip("|").split("|")]
    return any(re.search(r"\d", re.sub(r"`[^`]*`", "", cell)) for cell in cells)


def generated_lines(text: str) -> set[int]:
    return {i for block in find_blocks(text.splitlines()) for i in range(block.first, block.end)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_generated_table_equals_what_its_command_prints(page):
    fresh, _, problems = refresh(page.read_text(), ROOT)
    assert not problems, [f"{page.name}:{p.line}: {p.message}" for p in problems]
    assert fresh == page.read_text()


def test_the_result_pages_have_their_generated_tables():
    counts = {page.name: len(find_blocks(page.read_text().splitlines())) for page in RESULT_PAGES}
    assert counts["README.md"] >= 2 and counts["results.md"] >= 4 and counts["study.md"] >= 10, counts
    # the README's tables are results.md's and study.md's commands, so one set of numbers; the README's
    # study table is the verdicts' rows at L2 1
    commands = {page.name: {b.command for b in find_blocks(page.read_text().splitlines())} for page in RESULT_PAGES}
    study_rows = {c for c in commands["README.md"] if "study_compare.csv" in c}
    assert commands["README.md"] - study_rows <= commands["results.md"] and len(study_rows) == 1


@pytest.mark.parametrize("page", RESULT_PAGES, ids=lambda p: p.name)
def test_every_result_table_is_generated(page):
    text = page.read_text()
    generated = generated_lines(text)
    by_hand = [f"{page.name}:{i + 1}: {lines[0][:80]}" for i, lines in markdown_tables(text)
               if holds_numbers(lines) and i not in generated and (page.name, lines[0]) not in NOT_RESULTS]
    assert not by_hand, by_hand


def test_the_table_finder_sees_a_result_typed_by_hand():
    text = ("# Page\n\n| file | what |\n|---|---|\n| `a.csv` | per image |\n\n"
            "| method | error % |\n|---|---:|\n| `none` | 3.3 |\n")
    tables = markdown_tables(text)
    assert [holds_numbers(lines) for _, lines in tables] == [False, True]
    assert not generated_lines(text)


def write_page(folder: Path, command_lines: list[str], body: str = "") -> Path:
    page = folder / "page.md"
    page.write_text("# Results\n\nText above.\n\n" + "\n".join(command_lines) + "\n" + body + "\nText below.\n")
    return page


def readme_regularizer_block() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = next(b for b in find_blocks(lines) if "regularizers_report.csv" in b.command)
    return lines[block.line - 1:block.end]


def test_check_names_a_stale_table_and_the_rewrite_fixes_it(tmp_path, capsys):
    """A copy of the README's regularizer table and its CSV: one number changed in the CSV makes --check
    fail naming the page and line, the rewrite puts the new number in, and --check passes again."""
    (tmp_path / "sweeps" / "results").mkdir(parents=True)
    data = tmp_path / "sweeps" / "results" / "regularizers_report.csv"
    shutil.copy(ROOT / "sweeps" / "results" / "regularizers_report.csv", data)
    page = write_page(tmp_path, readme_regularizer_block())
    marker_line = page.read_text().splitlines().index(readme_regularizer_block()[0]) + 1
    check = ["--check", str(page), "--root", str(tmp_path)]
    assert doc_tables.main(check) == 0

    rows = list(csv.DictReader(data.open(newline="")))
    assert "| `none` | 3.33 ± 0.4 |" in page.read_text()
    next(row for row in rows if row["regularizer"] == "none")["test/error_pct"] = "9.87"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = page.read_text()
    capsys.readouterr()
    assert doc_tables.main(check) == 1
    assert f"{page}:{marker_line}: stale table" in capsys.readouterr().err
    assert page.read_text() == before  # --check writes nothing

    assert doc_tables.main([str(page), "--root", str(tmp_path)]) == 0
    text = page.read_text()
    assert "| `none` | 9.87 ± 0.4 |" in text and "3.33 ± 0.4" not in text
    assert text.startswith("# Results\n\nText above.\n") and text.endswith("\nText below.\n")
    assert doc_tables.main(check) == 0


def test_a_table_whose_csv_is_missing_fails(tmp_path, capsys):
    page = write_page(tmp_path, ["<!-- table: tulip-report --markdown sweeps/results/gone.csv --column a -->"],
                      "| a |\n|---:|\n| 1 |\n")
    assert doc_tables.main(["--check", str(page), "--root", str(tmp_path)]) == 1
    assert f"{page}:5: cannot make the table" in capsys.readouterr().err
    # the rewrite cannot fix it either, and leaves the table as it was
    assert doc_tables.main([str(page), "--root", str(tmp_path)]) == 1
    assert "| 1 |" in page.read_text()


def test_a_comment_that_is_not_a_table_command_fails(tmp_path):
    for command in ("python make_table.py x.csv", "tulip-report --markdown x.csv --no-such-option",
                    "tulip-report multirun/x"):
        page = write_page(tmp_path, [f"<!-- table: {command} -->"])
        assert doc_tables.main(["--check", str(page), "--root", str(tmp_path)]) == 1, command


def test_tulip_report_prints_what_the_readme_holds(capsys, monkeypatch):
    """The page's command run as `tulip-report` (its own parser) prints the table the README holds."""
    lines = (ROOT / "README.md").read_text().splitlines()
    block = next(b for b in find_blocks(lines) if "regularizers_report.csv" in b.command)
    words = shlex.split(block.command)
    assert words[0] == "tulip-report"
    monkeypatch.chdir(ROOT)
    assert report.main(words[1:]) == 0
    assert capsys.readouterr().out.splitlines() == lines[block.first:block.end]


def test_markdown_is_a_mode_of_its_own(capsys):
    for argv in (["--markdown", "x.csv", "multirun/x"], ["--markdown", "x.csv", "--out", "o"],
                 ["multirun/x", "--column", "a"]):
        with pytest.raises(SystemExit):
            report.main(argv)
    assert report.main(["--markdown", "no/such.csv", "--column", "a"]) == 1


# ---------------------------------------------------------------------------------------------------
# The table itself


@pytest.fixture
def runs_csv(tmp_path):
    path = tmp_path / "runs.csv"
    pd.DataFrame({"method": ["a", "a", "a", "b", "b", "c"], "seed": [0, 1, 2, 0, 1, 0],
                  "error": [1.0, 2.0, 4.0, 10.0, "", 7.25], "radius": [0.5, 0.25, "inf", 2.0, 1.5, 1234.5],
                  "note": ["x", "x", "y", "", "", "z|w"]}).to_csv(path, index=False)
    return path


def rows_of(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table.splitlines()]


def test_one_row_per_csv_row_with_formats_and_joined_cells(runs_csv):
    table = make_table(runs_csv, [Column.parse("method:code=method"), Column.parse("seed"),
                                  Column.parse("error,radius:.1f=error / radius"), Column.parse("note")])
    assert rows_of(table) == [
        ["method", "seed", "error / radius", "note"], ["---", "---:", "---:", "---"],
        ["`a`", "0", "1.0 / 0.5", "x"], ["`a`", "1", "2.0 / 0.2", "x"], ["`a`", "2", "4.0 / ∞", "y"],
        ["`b`", "0", "10.0 / 2.0", "–"], ["`b`", "1", "– / 1.5", "–"], ["`c`", "0", "7.2 / 1234.5", "z\\|w"]]


def test_a_set_column_names_the_keys_whose_value_is_set(tmp_path):
    """Each method's own strength among keys that are 0 or empty for the others."""
    path = tmp_path / "report.csv"
    pd.DataFrame({"method": ["pgd", "lip", "none", "pgd"], "reg.pgd.eps": [0.30, 0, 0, 1.58],
                  "reg.lip": [0, 0.1, "", 0]}).to_csv(path, index=False)
    column = Column.parse("reg.pgd.eps,reg.lip:set=strength")
    assert [row[1] for row in rows_of(make_table(path, [Column.parse("method"), column]))[2:]] == [
        "`reg.pgd.eps=0.3`", "`reg.lip=0.1`", "–", "`reg.pgd.eps=1.58`"]
    by_method = rows_of(make_table(path, [Column.parse("method"), column], by=["method"]))
    assert by_method[2] == ["pgd", "`reg.pgd.eps=0.3`, `reg.pgd.eps=1.58`"]


def test_by_gives_the_mean_and_std_over_each_groups_rows(runs_csv):
    table = make_table(runs_csv, [Column.parse("method"), Column.parse("seed:list=seeds"), Column.parse("error"),
                                  Column.parse("radius")], by=["method"], order=["c", "b"])
    frame = pd.read_csv(runs_csv)
    a = frame[frame.method == "a"]["error"]
    assert rows_of(table)[2:] == [
        ["c", "0", "7.25", "1230"],  # one run: no spread; 3 digits of 1234.5 as 1230, not 1.23e+03
        ["b", "0, 1", "10 (n=1)", "1.75 ± 0.35"],  # the run without the figure is counted, not hidden
        ["a", "0, 1, 2", f"{a.mean():.3g} ± {a.std(ddof=1):.2g}", "∞"]]  # a mean over inf is inf, with no std
    assert rows_of(make_table(runs_csv, [Column.parse("error:.2f")], by=["method"]))[2] == ["2.33 ± 1.53"]


def test_where_keeps_rows_by_value_and_numbers_compare_as_numbers(runs_csv):
    table = make_table(runs_csv, [Column.parse("method"), Column.parse("seed")], where=["seed=0.0", "method=a,c"])
    assert rows_of(table)[2:] == [["a", "0"], ["c", "0"]]
    with pytest.raises(TableError, match="no row left"):
        make_table(runs_csv, [Column.parse("method")], where=["method=d"])


def test_a_report_csv_shows_its_std_or_interval_columns(tmp_path):
    path = tmp_path / "report.csv"
    pd.DataFrame({"regularizer": ["none"], "seeds": [3], "test/error_pct": [3.3333], "test/error_pct_std": [0.4],
                  "test/error_pct_ci_low": [2.34], "test/error_pct_ci_high": [4.33]}).to_csv(path, index=False)
    columns = [Column.parse("test/error_pct")]
    assert rows_of(make_table(path, columns))[2] == ["3.33 ± 0.4"]
    assert rows_of(make_table(path, columns, spread="ci"))[2] == ["3.33 [2.34, 4.33]"]
    assert rows_of(make_table(path, columns, spread="none"))[2] == ["3.33"]


def test_bad_columns_and_formats_are_named(runs_csv):
    with pytest.raises(TableError, match="no column nothere"):
        make_table(runs_csv, [Column.parse("nothere")])
    with pytest.raises(TableError, match="not a format"):
        Column.parse("error:.1q")
    with pytest.raises(TableError, match="KEYS"):
        Column.parse(":.1f=x")
    with pytest.raises(TableError, match="at least one --column"):
        make_table(runs_csv, [])


def test_a_comment_without_its_end_is_an_error(tmp_path):
    _, _, problems = refresh("<!-- table: tulip-report --markdown x.csv\n| a |\n", tmp_path)
    assert problems and "no end" in problems[0].message


def test_the_spread_of_a_fixed_point_format_has_as_many_decimals():
    assert doc_tables.cell_text(17.0, ".0f", np.std([14, 19, 17], ddof=1)) == "17 ± 3"
    assert doc_tables.cell_text(155.8, ".3g", 155.8) == "156 ± 160"
