"""The commands that README.md and docs/*.md show, read from their code blocks, for the tests that
check that those commands work."""
import re
import shlex
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, RangeSweep

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


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


def short_run_commands(text: str) -> list[list[str]]:
    """The short `python run.py` commands of a page: not the SLURM or sweep-file ones, none with <placeholders>."""
    return [args for args in commands(text, "python run.py")
            if not any(a.startswith("--config-dir") or "slurm" in a or "<" in a for a in args)]


def readme_run_commands() -> list[list[str]]:
    """The README's short `python run.py` commands (at least the four everyday ones)."""
    found = short_run_commands(README.read_text())
    assert len(found) >= 4, found
    return found


def first_value(override: str) -> str:
    """`key=a,b,c` -> `key=a`, and a search range (`key=tag(log,interval(a,b))`) -> `key=a`: the first
    point of a sweep; a list value (`key=[a,b]`) is one value, not a sweep."""
    parsed = OverridesParser.create().parse_overrides([override])[0]
    if not parsed.is_sweep_override():
        return override
    sweep = parsed.value()
    first = sweep.start if isinstance(sweep, (IntervalSweep, RangeSweep)) else sweep.list[0]
    return f"{parsed.get_key_element()}={first}"
