"""The README stays short, its links and the docs' links lead somewhere, and the commands it shows work:
the `python run.py` commands compose with Hydra and run with tiny settings, `python -m tulip.bench NAME`
names a benchmark, and every `tulip-report` option it uses exists."""
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, RangeSweep

from conftest import ROOT, compose_with_hydra
from tulip.bench.__main__ import BENCHMARKS

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](path) and ![alt](path)


def code_lines(text: str) -> list[str]:
    """The commands in the fenced (```) and indented code blocks, continuation lines joined."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            lines.append(line.strip())
    joined, current = [], ""
    for line in lines:
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return joined


def commands(text: str, program: str) -> list[list[str]]:
    """Every `program ...` command of the code blocks as its arguments, comments dropped."""
    found = []
    for line in code_lines(text):
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            n = len(program.split())
            for i in range(len(words) - n + 1):
                if words[i:i + n] == program.split():
                    found.append(words[i + n:])
                    break
    return found


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_keeps_its_two_fresh_machine_commands():
    text = README.read_text()
    assert "## Two commands on a fresh machine" in text
    assert '\n    pip install -e ".[test]" && python run.py\n' in text
    assert "\n    python -m pytest -q\n" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # http(s), mailto, an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, broken


def short_run_commands(text: str) -> list[list[str]]:
    """The short `python run.py` commands of a page: not the SLURM or sweep-file ones, none with <placeholders>."""
    return [args for args in commands(text, "python run.py")
            if not any(a.startswith("--config-dir") or "slurm" in a or "<" in a for a in args)]


def run_commands() -> list[list[str]]:
    found = short_run_commands(README.read_text())
    assert len(found) >= 4, found
    return found


def test_the_readme_run_commands_compose():
    for args in run_commands():
        overrides = [a for a in args if a != "-m"]
        if "-m" in args:  # a grid: compose its first point
            overrides = [first_value(a) for a in overrides]
        cfg = compose_with_hydra(*overrides)
        assert cfg.epochs > 0, args


@pytest.mark.slow
def test_the_readme_everyday_commands_run_with_tiny_settings(tmp_path):
    """Each README `python run.py` command trains for real with the tests' tiny settings (a grid at its
    first point), its `mode=evaluate` command evaluates the first of those runs (on 20 images), and
    `tulip-report` reads them all."""
    from conftest import compose_config
    from tulip import report
    from tulip.main import run
    trained, evaluated = [], 0
    for number, args in enumerate(run_commands()):
        overrides = [first_value(a) for a in args if a != "-m"]
        if any(o.startswith("run_dir=") for o in overrides):
            overrides = [f"run_dir={trained[0]}" if o.startswith("run_dir=") else o for o in overrides]
            metrics = run(compose_config(*overrides, "attack.n=20"))
            assert any(key.startswith("attack/") for key in metrics), (args, metrics)
            evaluated += 1
        else:
            folder = tmp_path / "runs" / str(number)
            metrics = run(compose_config(*overrides), folder)
            assert 0 <= metrics["test/error_pct"] < 90, (args, metrics)
            trained.append(folder)
    assert len(trained) >= 3 and evaluated == 1
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "runs.csv").read_text().count("\n") == len(trained) + 1


def test_the_docs_run_commands_compose():
    """The docs pages' short `python run.py` commands compose too: a renamed key or option fails here."""
    found = [args for page in PAGES[1:] for args in short_run_commands(page.read_text())]
    assert len(found) >= 5, found
    for args in found:
        cfg = compose_with_hydra(*[first_value(a) for a in args if a != "-m"])
        assert cfg.epochs > 0, args


def first_value(override: str) -> str:
    """`key=a,b,c` -> `key=a`, and a search range (`key=tag(log,interval(a,b))`) -> `key=a`: the first
    point of a sweep; a list value (`key=[a,b]`) is one value, not a sweep."""
    parsed = OverridesParser.create().parse_overrides([override])[0]
    if not parsed.is_sweep_override():
        return override
    sweep = parsed.value()
    first = sweep.start if isinstance(sweep, (IntervalSweep, RangeSweep)) else sweep.list[0]
    return f"{parsed.get_key_element()}={first}"


def test_first_value_splits_only_sweeps():
    assert first_value("regularizer=none,lip") == "regularizer=none"
    assert first_value("'regularizer=[lip,J2]'".strip("'")) == "regularizer=[lip,J2]"
    assert first_value("reg.lip=0.1") == "reg.lip=0.1"
    assert first_value("reg.lip=tag(log,interval(1e-3,3))") == "reg.lip=0.001"


def test_every_benchmark_command_names_a_benchmark():
    named = [args[0] for page in PAGES for args in commands(page.read_text(), "python -m tulip.bench") if args]
    named += re.findall(r"python -m tulip\.bench (\w+)", "".join(p.read_text() for p in PAGES))
    assert named
    assert set(named) <= set(BENCHMARKS), set(named) - set(BENCHMARKS)


def test_every_report_option_exists():
    exe = shutil.which("tulip-report")
    command = [exe] if exe else [sys.executable, "-m", "tulip.report"]
    help_text = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True).stdout
    used = {word.split("=")[0] for page in PAGES for args in commands(page.read_text(), "tulip-report")
            for word in args if word.startswith("--")}
    used |= set(re.findall(r"`(--[a-z][\w-]*)", (ROOT / "docs" / "report.md").read_text()))
    assert {"--out", "--from-csv"} <= used
    missing = sorted(option for option in used if not re.search(rf"(^|\s){re.escape(option)}\b", help_text))
    assert not missing, missing
