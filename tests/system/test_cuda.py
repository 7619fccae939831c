"""On a CUDA device: data and model stay on the GPU, the training loop never waits for it, every
regularizer family trains as it does on the CPU, the guaranteed bounds do not change, the certificate
stays sound under the GPU's convolution arithmetic (TF32 on recent cards), checkpoints move between
devices, and an interrupted run resumes exactly. The GPU path (precision=bf16, channels_last, compile=true)
runs compiled, NHWC and in bf16 without waiting for the GPU either, and bf16 computes every objective as
float32 does, to bf16's rounding.

These tests need a GPU and are skipped without one (`pytest -m cuda` runs only them)."""
import contextlib
import copy
import csv
import dataclasses
import json
import os
import warnings

import pytest
import torch

# Deterministic cuBLAS (for the exact-resume test) needs this before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from conftest import (BF16_CASES, SHRINK, build_model_option, compose_config, objective_in_fp32_and_bf16,  # noqa: E402
                      run_interrupted_in_second_epoch)
from tulip.runs import metric_keys  # noqa: E402
from tulip.data import load_dataset  # noqa: E402
from tulip.nn.lipschitz import layer_norm_bound  # noqa: E402
from tulip.main import run  # noqa: E402
from tulip.train.loss import build_loss  # noqa: E402
from tulip.build import load_run  # noqa: E402
from tulip.train.step import prepare_step
from tulip.train.loop import train_one_epoch  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
FAMILIES = ["none", "lip", "J2", "lip+J2", "Jinf", "gradnorm", "gradnorm_fd", "pgd_l2", "pgd_linf", "trades",
            "gloro"]


def read_csv(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_data_and_augmentation_stay_on_the_device():
    cfg = compose_config("dataset=mnist5k")
    data = load_dataset(cfg.dataset, CUDA)
    assert {t.device.type for t in (data.train_x, data.train_y, data.test_x, data.test_y)} == {"cuda"}
    assert data.augment(data.train_x[:8]).device.type == "cuda"


def assert_the_loop_never_waits(model, loss_fn, data, **step) -> None:
    """A step that reads a value back (`.item()`, a data-dependent shape) stalls the GPU every step. The
    loop's synchronizations are the end-of-epoch checks alone: as many for 12 steps as for 4. `step`:
    train_one_epoch's autocast and memory_format."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def synchronizations(steps: int) -> list[str]:
        subset = dataclasses.replace(data, train_x=data.train_x[:64 * steps], train_y=data.train_y[:64 * steps])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(model, loss_fn, optimizer, subset, 64, epoch=1, progress=False, **step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

    synchronizations(1)  # warm-up: lazy initialisation may synchronize once
    few, many = synchronizations(4), synchronizations(12)
    assert len(many) == len(few), f"{len(few)} synchronizations in 4 steps, {len(many)} in 12"


@pytest.mark.parametrize("regularizer", FAMILIES)
def test_the_training_loop_never_waits_for_the_device(regularizer):
    cfg = compose_config(f"regularizer={regularizer}", "model=cnn_4c3f", *SHRINK["cnn_4c3f"], "device=cuda")
    data = load_dataset(cfg.dataset, CUDA)
    torch.manual_seed(0)
    model = build_model_option("cnn_4c3f", SHRINK["cnn_4c3f"]).to(CUDA)
    assert_the_loop_never_waits(model, build_loss(cfg.reg, model), data)


@pytest.mark.parametrize("regularizer", ["none", "pgd_linf"])
def test_the_bf16_channels_last_compiled_loop_never_waits_for_the_device(regularizer, monkeypatch):
    """The GPU path a user turns on (precision=bf16 compile=true; channels_last=auto is on for a conv
    model on CUDA): the step really runs compiled, NHWC and in bf16, and still never waits for the GPU."""
    cfg = compose_config(f"regularizer={regularizer}", *SHRINK["cnn_small"], "device=cuda", "precision=bf16",
                         "compile=true")
    data = load_dataset(cfg.dataset, CUDA)
    torch.manual_seed(0)
    model = build_model_option("cnn_small", SHRINK["cnn_small"]).to(CUDA)
    loss_fn = build_loss(cfg.reg, model)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    setup = prepare_step(cfg, model, loss_fn, data, CUDA)
    assert setup.model is not model and setup.model._orig_mod is model  # compiled, not fallen back
    assert setup.memory_format == torch.channels_last and torch.backends.cudnn.benchmark
    with setup.autocast():
        assert setup.model(data.train_x[:64].contiguous(memory_format=setup.memory_format)).dtype == torch.bfloat16
    assert_the_loop_never_waits(setup.model, loss_fn, data, autocast=setup.autocast,
                                memory_format=setup.memory_format)
    assert not any(key.startswith("_orig_mod") for key in model.state_dict())


@pytest.mark.parametrize("model_name, regularizer", BF16_CASES)
def test_bf16_loss_on_cuda_computes_what_float32_computes(model_name, regularizer, monkeypatch):
    """tests/unit/test_bf16_loss.py's check on the GPU: under bf16 autocast the loss and every penalty are
    float32's to 1 % (TF32 off, so that the reference is float32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    (fp32, fp32_gradient), (bf16, bf16_gradient) = objective_in_fp32_and_bf16(model_name, regularizer, CUDA)
    assert fp32.logits.dtype == torch.float32 and bf16.logits.dtype == torch.bfloat16
    assert bf16.loss.item() == pytest.approx(fp32.loss.item(), rel=1e-2)
    assert bf16.logs.keys() == fp32.logs.keys()
    for name, value in fp32.logs.items():
        assert bf16.logs[name].item() == pytest.approx(value.item(), rel=1e-2), name
    if model_name == "cnn_4c3f":  # BatchNorm-free: the weight gradients too (see tests/unit/test_bf16_loss.py)
        assert (bf16_gradient - fp32_gradient).norm() <= 5e-2 * fp32_gradient.norm()


@contextlib.contextmanager
def draws_from_one_cpu_generator(seed: int = 0):
    """Every random draw of the objectives (PGD/TRADES starts, GloRo's power-iteration start) made by one
    seeded CPU generator and then moved to the tensor's device: both devices see the same numbers."""
    cpu = torch.Generator().manual_seed(seed)
    rand, randn, uniform_ = torch.rand, torch.randn, torch.Tensor.uniform_

    def on_cpu(real):
        def draw(*size, generator=None, device=None, dtype=None, **kwargs):
            return real(*size, generator=cpu, dtype=dtype).to(device or "cpu")
        return draw

    def uniform_on_cpu(tensor, a=0.0, b=1.0, generator=None):
        return tensor.copy_(uniform_(torch.empty(tensor.shape, dtype=tensor.dtype), a, b, generator=cpu))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "rand", on_cpu(rand))
        patch.setattr(torch, "randn", on_cpu(randn))
        patch.setattr(torch, "randn_like", lambda t, **kwargs: on_cpu(randn)(t.shape, dtype=t.dtype, device=t.device))
        patch.setattr(torch.Tensor, "uniform_", uniform_on_cpu)
        yield


@pytest.mark.parametrize("regularizer", FAMILIES)
def test_each_objective_computes_on_cuda_what_it_computes_on_the_cpu(regularizer, monkeypatch):
    """Same weights, same batch, same random draws: the GPU's loss and weight gradients are the CPU's up to
    float32 rounding. TF32 is off here: it rounds convolution inputs to 10 mantissa bits, and that is a
    precision choice of the card, not a difference in what Tulip computes."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = compose_config(f"regularizer={regularizer}", "model=cnn_4c3f", *SHRINK["cnn_4c3f"])
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    x, y = data.train_x[:64], data.train_y[:64]
    torch.manual_seed(0)
    model = build_model_option("cnn_4c3f", SHRINK["cnn_4c3f"])

    def loss_and_gradients(device):
        on_device = copy.deepcopy(model).to(device).train()
        with draws_from_one_cpu_generator():
            loss = build_loss(cfg.reg, on_device)(on_device, x.to(device), y.to(device)).loss
        gradients = torch.autograd.grad(loss, list(on_device.parameters()))
        return loss.item(), torch.cat([g.flatten() for g in gradients]).cpu()

    (gpu_loss, gpu_gradient), (cpu_loss, cpu_gradient) = loss_and_gradients(CUDA), loss_and_gradients("cpu")
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert (gpu_gradient - cpu_gradient).norm() <= 1e-3 * cpu_gradient.norm()


def test_guaranteed_bounds_are_the_same_on_the_gpu():
    """The Gram-iteration bounds run in float64 on the layer's device; cuFFT and the CPU FFT agree far
    inside the bound's rounding slack."""
    for name in SHRINK:
        torch.manual_seed(0)
        model = build_model_option(name, SHRINK[name]).eval()
        on_cpu = layer_norm_bound(model)
        assert layer_norm_bound(model.to(CUDA)) == pytest.approx(on_cpu, rel=1e-6), name


def test_certificate_is_sound_on_the_gpu(tmp_path):
    """Trained and attacked on the GPU: no AutoAttack member, DDN or FMN finds an adversarial inside a
    certified radius, and the K the GPU computes is the CPU's."""
    run(compose_config("model=cnn_4c3f", "model.channels=[8,16]", "model.hidden=64", "dataset.train_subset=2048",
                       "optim=adam", "epochs=2", "regularizer=gloro", "reg.gloro=0.1", "device=cuda",
                       "attack=[autoattack_fast_l2,ddn,fmn_l2]", "attack.n=100",
                       "attack.epsilons.l2=[0.1,0.5,2.0]"), tmp_path)
    found, certified = read_csv(tmp_path / "attacks.csv"), read_csv(tmp_path / "bounds.csv")
    assert sum(row["certified_l2"] > 0 for row in certified) >= 20
    for attacked, bound in zip(found, certified):
        for member in ["apgd_ce_l2", "apgd_t_l2", "fab_t_l2", "ddn", "fmn_l2", "best"]:
            assert attacked[f"{member}_l2"] >= bound["certified_l2"] * (1 - 1e-6), (member, attacked, bound)
    summary = json.loads((tmp_path / "summary.json").read_text())
    on_cpu = load_run(tmp_path, torch.device("cpu"))
    assert layer_norm_bound(on_cpu.model) == pytest.approx(summary["cert/lipschitz_upper"], rel=1e-6)


def test_a_gpu_run_resumes_on_the_cpu(tmp_path, monkeypatch):
    """A GPU job interrupted after epoch 1 (GloRo, whose power-iteration vectors are checkpointed) goes
    on on the CPU: every tensor of the checkpoint loads onto the CPU, and the run finishes."""
    def compose(device):
        return compose_config("model=cnn_4c3f", *SHRINK["cnn_4c3f"], "regularizer=gloro", "reg.gloro=0.1",
                              "epochs=2", f"device={device}")

    run_interrupted_in_second_epoch(compose("cuda"), tmp_path, monkeypatch)
    assert json.loads((tmp_path / "summary.json").read_text())["epoch"] == 1
    metrics = run(compose("cpu"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and metrics[metric_keys.TEST_ERROR] < 100.0
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("regularizer", ["none", "pgd_l2"])
def test_an_interrupted_gpu_run_resumes_exactly(tmp_path, monkeypatch, regularizer):
    """With deterministic kernels, the resumed run repeats the uninterrupted one bit for bit: the
    checkpoint holds the CUDA generator's state (PGD-L2 draws its random starts from it)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.use_deterministic_algorithms(True)
    try:
        def compose():
            return compose_config("epochs=3", f"regularizer={regularizer}", "device=cuda")

        whole = run(compose(), tmp_path / "whole")
        run_interrupted_in_second_epoch(compose(), tmp_path / "split", monkeypatch)
        resumed = run(compose(), tmp_path / "split")
    finally:
        torch.use_deterministic_algorithms(False)

    def without_times(metrics):
        return {k: v for k, v in metrics.items() if not k.startswith("time/")}

    assert without_times(resumed) == without_times(whole)


def test_a_local_sweep_trains_its_jobs_side_by_side_on_the_gpu(tmp_path):
    """hydra/launcher=local forks its jobs from the sweep's process, which must not have initialised
    CUDA (a forked child could not): two jobs at once with device=cuda both train and finish."""
    from support.jobs import TINY_JOB as TINY, job_folders, output_of, read_summary, run_tulip
    sweep_dir = tmp_path / "sweep"
    result = run_tulip(["-m", "seed=0,1", *TINY, "device=cuda", "hydra/launcher=local",
                        "hydra.launcher.array_parallelism=2", f"hydra.sweep.dir={sweep_dir}"],
                       cwd=tmp_path, timeout=300)
    assert result.returncode == 0, output_of(result)
    assert [read_summary(job)["status"] for job in job_folders(sweep_dir)] == ["finished", "finished"]
