"""The GPU training path's settings, checked on the CPU: `precision=bf16` (autocast), `channels_last` and
`compile`. Each is decided once per run (tulip.train.step.prepare_step); the per-epoch measurements, the
checkpoints and the final evaluation stay float32 on the plain model. That bf16 computes each objective as
float32 does is tests/unit/test_bf16_loss.py; a real torch.compile is tests/system/test_compile.py;
tests/system/test_cuda.py repeats the precision and compile checks on a GPU."""
import copy
import dataclasses
import logging

import pytest
import torch

import tulip.train.loop
from conftest import SHRINK, build_model_option, compile_records, compose_config
from tulip.config import ConfigError
from tulip.data import load_dataset
from tulip.nn.lipschitz import layer_norm_bound
from tulip.main import run
from tulip.train.loss import TrainingLoss, build_loss
from tulip.runs.folder import RunFolder
from tulip.runs.tracking import RunContext
from tulip.train.step import prepare_step
from tulip.train.loop import train, train_one_epoch

CPU = torch.device("cpu")
# Runs of one training step (64 images, batch 64) without the final evaluation's bounds: what these tests
# check is the training step.
ONE_STEP = ["dataset.train_subset=64", "eval.bounds=false"]


# --- precision ---------------------------------------------------------------------------------------


def test_bf16_trains_under_autocast_and_measures_in_float32(tmp_path, monkeypatch):
    """precision=bf16: every training step's objective runs under autocast; the per-epoch measurements,
    the guaranteed layer bound, the checkpoint and the final evaluation do not (a certificate computed in
    bf16 would not be sound)."""
    seen = {"step": [], "measure": [], "bound": [], "evaluate": []}

    def recorded(where, real):
        def call(*args, **kwargs):
            seen[where].append(torch.is_autocast_enabled("cpu"))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(TrainingLoss, "__call__", recorded("step", TrainingLoss.__call__))
    monkeypatch.setattr(tulip.train.loop, "measure", recorded("measure", tulip.train.loop.measure))
    monkeypatch.setattr(tulip.train.loop, "layer_norm_bound", recorded("bound", tulip.train.loop.layer_norm_bound))

    def evaluate(model, data, folder, tracker):
        seen["evaluate"].append(torch.is_autocast_enabled("cpu"))
        assert model(data.test_x[:8]).dtype == torch.float32
        return {}

    with RunFolder(tmp_path).writer_lock() as folder:
        train(compose_config("precision=bf16"), folder, RunContext(), evaluate)
    assert len(seen["step"]) == 8 and all(seen["step"])  # 512 images, batch 64
    assert seen["measure"] and seen["bound"] and seen["evaluate"]
    assert not any(seen["measure"] + seen["bound"] + seen["evaluate"])
    saved = RunFolder(tmp_path).load_checkpoint("last")
    assert {v.dtype for v in saved["model"].values() if v.is_floating_point()} == {torch.float32}


def test_precision_is_training_state_and_compile_and_channels_last_are_not(tmp_path, monkeypatch):
    first = run(compose_config(*ONE_STEP), tmp_path)
    checkpoint = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"differs in: precision\)"):
        run(compose_config(*ONE_STEP, "precision=bf16"), tmp_path)
    # Memory layout and compilation change no value: this is the finished run, nothing is retrained.
    monkeypatch.setattr(torch, "compile", lambda model: pytest.fail("a finished run was compiled"))
    again = run(compose_config(*ONE_STEP, "channels_last=true", "compile=true"), tmp_path)
    assert again["test/error_pct"] == first["test/error_pct"]
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == checkpoint
    # A run saved before `precision` existed trained in float32, and is still the same finished run.
    folder = RunFolder(tmp_path)
    for which in ("best", "last"):
        saved = folder.load_checkpoint(which)
        del saved["config"]["precision"]
        folder.save_checkpoint(saved, which)
    assert run(compose_config(*ONE_STEP), tmp_path)["test/error_pct"] == first["test/error_pct"]
    with pytest.raises(ConfigError, match=r"differs in: precision\)"):
        run(compose_config(*ONE_STEP, "precision=bf16"), tmp_path)


# --- channels_last -----------------------------------------------------------------------------------

def test_channels_last_trains_the_same_step_and_keeps_the_bounds(monkeypatch):
    """channels_last=true on the CPU: NHWC weights and inputs, the same loss and weights after a step as
    NCHW, the same guaranteed Lipschitz bound; channels_last=auto leaves a CPU run NCHW. On three-channel
    images: with one channel NHWC and NCHW are the same layout."""
    cfg = compose_config("channels_last=true", "dataset.val_size=0", *SHRINK["cnn_small"])
    digits = load_dataset(cfg.dataset, CPU)
    x = digits.train_x[:64]
    data = dataclasses.replace(digits, train_x=torch.cat([x, 1 - x, x.flip(-1)], 1), train_y=digits.train_y[:64])
    torch.manual_seed(0)
    nchw = build_model_option("cnn_small", SHRINK["cnn_small"], channels=3)
    nhwc = copy.deepcopy(nchw)
    loss_fn = build_loss(cfg.reg, nhwc)
    setup = prepare_step(cfg, nhwc, loss_fn, data, CPU)
    assert setup.model is nhwc and setup.memory_format == torch.channels_last
    convolutions = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                for w in convolutions)
    assert layer_norm_bound(nhwc) == pytest.approx(layer_norm_bound(nchw), rel=1e-6)

    inputs = []
    real_call = TrainingLoss.__call__

    def record_input(self, model, x, y):
        inputs.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return real_call(self, model, x, y)

    monkeypatch.setattr(TrainingLoss, "__call__", record_input)
    losses = {}
    for name, model, memory_format in [("nchw", nchw, torch.contiguous_format),
                                       ("nhwc", nhwc, setup.memory_format)]:
        torch.manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[name] = train_one_epoch(model, loss_fn, optimizer, data, 64, epoch=1, progress=False,
                                       memory_format=memory_format)["train/loss"]
    assert inputs == [False, True]
    assert losses["nhwc"] == pytest.approx(losses["nchw"], rel=1e-5)
    for a, b in zip(nchw.state_dict().values(), nhwc.state_dict().values()):  # BatchNorm statistics too
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    model = build_model_option("cnn_small", SHRINK["cnn_small"], channels=3)
    auto = compose_config(*SHRINK["cnn_small"])  # channels_last=auto, on the CPU
    assert prepare_step(auto, model, loss_fn, data, CPU).memory_format == torch.contiguous_format
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Conv2d))


# --- compile -----------------------------------------------------------------------------------------

def test_compile_falls_back_for_double_backprop(tmp_path, caplog, compile_calls):
    caplog.set_level(logging.INFO, logger="tulip.train.loop")
    metrics = run(compose_config(*ONE_STEP, "regularizer=lip", "compile=true"), tmp_path)
    assert compile_calls == []
    records = compile_records(caplog)
    assert len(records) == 1 and "reg.penalties.lip needs double backprop" in records[0], records
    assert metrics["train/penalty_lip"] > 0


def test_compile_failure_falls_back_to_the_same_run(tmp_path, caplog, monkeypatch):
    """torch.compile failing at the first call (as without a C compiler) leaves one log line and the run
    eager training gives, bit for bit: the probe step that found the failure changed no BatchNorm
    statistic, random generator or weight."""
    caplog.set_level(logging.INFO, logger="tulip.train.loop")
    two_steps = ["dataset.train_subset=128", "eval.bounds=false"]  # a moved generator changes the batches
    eager = run(compose_config(*two_steps), tmp_path / "eager")

    class FailsWhenCalled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            self.model(x)  # a train-mode forward pass moves BatchNorm's statistics, as a real try's would
            torch.rand(1)  # and a draw moves the generator
            raise RuntimeError("InvalidCxxCompiler: No working C compiler found\nmore details")

    monkeypatch.setattr(torch, "compile", FailsWhenCalled)
    fell_back = run(compose_config(*two_steps, "compile=true"), tmp_path / "fell_back")
    records = compile_records(caplog)
    assert records == ["compile=true: training the eager model: torch.compile failed "
                       "(RuntimeError: InvalidCxxCompiler: No working C compiler found)"]
    assert {k: v for k, v in fell_back.items() if not k.startswith("time/")} == \
           {k: v for k, v in eager.items() if not k.startswith("time/")}
