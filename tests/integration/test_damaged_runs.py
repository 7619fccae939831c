"""A damaged or hostile run folder stops the run naming the file and is left as it is: a damaged checkpoint
or summary, a checkpoint that would run code, an unwritable folder, a full disk (the last good checkpoint
stays). In this process; the kills and the command line are tests/system/test_reliability.py."""
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import FAULT_JOB, TRAINED_RUN, compose_config, copy_run
from support.damage import scramble, truncate
from tulip import report
from tulip.main import run
from tulip.runs.folder import RunFolder, RunFolderError


@pytest.fixture
def interrupted(interrupted_fault_job, tmp_path) -> Path:
    """A copy of the session's folder holding epoch 1 of FAULT_JOB, as after a preemption in epoch 2."""
    return copy_run(interrupted_fault_job, tmp_path / "run")


@pytest.mark.parametrize("which, damage", [("last", truncate), ("best", scramble), ("last", scramble)])
def test_a_damaged_checkpoint_stops_the_resume_naming_it_and_stays(interrupted, which, damage):
    folder = RunFolder(interrupted)
    damage(folder.checkpoint(which))
    before = {p.name: p.read_bytes() for p in folder.checkpoint("last").parent.iterdir()}
    with pytest.raises(RunFolderError, match=rf"{which}\.pt.*left as it is.*copy it over"):
        run(compose_config(*FAULT_JOB), interrupted)
    assert {p.name: p.read_bytes() for p in folder.checkpoint("last").parent.iterdir()} == before


def test_a_damaged_summary_stops_evaluate_before_its_work_and_stays(tmp_path, trained_run):
    copy_run(trained_run.folder, tmp_path)
    attacks_before = (tmp_path / "attacks.csv").read_bytes()
    (tmp_path / "summary.json").write_text('{"status": "finis')
    with pytest.raises(RunFolderError, match="summary.json is not valid JSON.*left as it is"):
        run(compose_config("mode=evaluate", f"run_dir={tmp_path}", "attack=ddn"))
    assert (tmp_path / "summary.json").read_text() == '{"status": "finis'
    assert (tmp_path / "attacks.csv").read_bytes() == attacks_before  # no attack ran


class Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(tmp_path, trained_run):
    copy_run(trained_run.folder, tmp_path)
    marker = tmp_path.parent / "payload-ran"
    folder = RunFolder(tmp_path)
    for which in ("last", "best"):
        state = torch.load(folder.checkpoint(which), weights_only=True)
        torch.save({**state, "history": Payload(marker)}, folder.checkpoint(which))
    for cfg in (compose_config(*TRAINED_RUN, "epochs=2"),  # resume
                compose_config("mode=evaluate", f"run_dir={tmp_path}", "attack=ddn"),
                compose_config("mode=summary", f"run_dir={tmp_path}")):
        with pytest.raises(RunFolderError, match=r"cannot read checkpoint .*\.pt"):
            run(cfg, tmp_path)
        assert not marker.exists()
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    assert not marker.exists()


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFolderError, match=f"cannot write the run folder {blocker / 'run'}"):
        run(compose_config(), blocker / "run")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The third checkpoint write (epoch 2's first) fails after writing part of its bytes."""
    real_save, calls = torch.save, []

    def disk_full_on_the_third(state, f):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"\x00" * 1000)
            raise OSError(28, "No space left on device")
        real_save(state, f)

    monkeypatch.setattr(torch, "save", disk_full_on_the_third)
    with pytest.raises(RunFolderError, match=r"(best|last)\.pt \(No space left on device\); the previous "
                                             r"\1\.pt is intact"):
        run(compose_config("epochs=3", "scheduler.milestones=[2]"), tmp_path)
    for which in ("best", "last"):
        assert RunFolder(tmp_path).load_checkpoint(which)["epoch"] == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    assert not list(tmp_path.rglob("*.tmp"))
