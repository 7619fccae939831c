"""compile=true really compiles on the CPU: torch.compile's inductor builds C++ kernels with the machine's
compiler in worker processes (tens of seconds). The fallbacks are tests/integration/test_gpu_path.py."""
import logging

import pytest
import torch

from conftest import compile_records, compose_config
from tulip.build import load_run
from tulip.main import run
from tulip.runs.folder import RunFolder

CPU = torch.device("cpu")
# One training step (64 images, batch 64) without the final evaluation's bounds: the step is what is compiled.
ONE_STEP = ["dataset.train_subset=64", "eval.bounds=false"]


@pytest.mark.slow
def test_compile_trains_the_step_eager_trains(tmp_path, caplog, compile_calls):
    """compile=true with a single-backprop loss: the step runs through torch.compile, its loss is the
    eager step's, and the checkpoint holds the plain model's state_dict. Where torch.compile cannot run
    (no C compiler), the run falls back to the eager model with one log line and still trains."""
    caplog.set_level(logging.INFO, logger="tulip.train.loop")
    eager = run(compose_config(*ONE_STEP), tmp_path / "eager")
    compiled = run(compose_config(*ONE_STEP, "compile=true"), tmp_path / "compiled")
    assert len(compile_calls) == 1
    records = compile_records(caplog)
    if records:  # the fallback: say why, once
        assert len(records) == 1 and "torch.compile failed" in records[0], records
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-5)
    saved = RunFolder(tmp_path / "compiled").load_checkpoint("last")["model"]
    assert saved.keys() == RunFolder(tmp_path / "eager").load_checkpoint("last")["model"].keys()
    assert not any(key.startswith("_orig_mod") for key in saved)
    load_run(tmp_path / "compiled", CPU)  # a plain model loads it
