"""The README stays short, its links and the docs' links lead somewhere, and the commands it shows are
valid: the `python run.py` commands compose with Hydra and `python -m tulip.bench NAME` names a benchmark.
That they also run is tests/system/test_docs_run.py; that every `tulip-report` option they use
exists, tests/system/test_report.py."""
import re

import pytest

from conftest import ROOT, compose_with_hydra
from support.docs import PAGES, README, commands, first_value, readme_run_commands, short_run_commands
from tulip.bench.__main__ import BENCHMARKS

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](path) and ![alt](path)


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


def test_the_readme_run_commands_compose():
    for args in readme_run_commands():
        overrides = [a for a in args if a != "-m"]
        if "-m" in args:  # a grid: compose its first point
            overrides = [first_value(a) for a in overrides]
        cfg = compose_with_hydra(*overrides)
        assert cfg.epochs > 0, args


def test_the_docs_run_commands_compose():
    """The docs pages' short `python run.py` commands compose too: a renamed key or option fails here."""
    found = [args for page in PAGES[1:] for args in short_run_commands(page.read_text())]
    assert len(found) >= 5, found
    for args in found:
        cfg = compose_with_hydra(*[first_value(a) for a in args if a != "-m"])
        assert cfg.epochs > 0, args


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
