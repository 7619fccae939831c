"""Shared test helpers: compose the real Hydra config and shrink it; the tiers; the runs tests share.

Tests build their config exactly as `python run.py` does (same conf/ folder, same defaults), then
shrink it with overrides: one epoch, subsets of mnist5k, W&B disabled unless W&B is under test.

A test's tier is the folder it is in (tests/unit, tests/integration, tests/system): its marker is added
here, and system tests get a longer timeout. `python -m pytest -q` runs unit and integration (setup.cfg's
testpaths); `python -m pytest -q tests` runs everything.

Training is what costs: tests that only read a trained run or a multirun share one, built once per session
(`trained_run`, `tiny_multirun`, `interrupted_fault_job`). They are read-only; a test that changes a
run folder copies it to its tmp_path first (`copy_run`).
"""
import copy
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
sys.path.insert(0, str(Path(__file__).parent))  # for tests/support/
from support.jobs import SHORT_LOWER_BOUND  # noqa: E402
# One intra-op thread per process: tests start several jobs at once (multiruns, SLURM), and
# oversubscribed BLAS threads on 2 cores made small SVDs and convolutions 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# One epoch on 512 training and 200 test images of mnist5k, on the CPU, without W&B or attacks; the
# per-epoch figures on all 200 test images, so the summary needs no second measurement.
TINY = ["epochs=1", "batch_size=64", "dataset.train_subset=512", "dataset.test_subset=200",
        "device=cpu", "wandb.mode=disabled", "attack=none", "eval.n=null", *SHORT_LOWER_BOUND]


def compose_with_hydra(*overrides: str, config_dir: Path = CONF_DIR, config_name: str = "config") -> DictConfig:
    """The config with its `hydra` node, as `python run.py [--config-dir D --config-name N] <overrides>`
    composes it (a sweep file in sweeps/ finds conf/ through hydra.searchpath). Each call gets its own
    copy of what Hydra composed for these arguments (once per session)."""
    GlobalHydra.instance().clear()
    return copy.deepcopy(_composed(tuple(overrides), config_dir, config_name))


# A composition costs Hydra 0.1-0.2 s of CPU here, and the tests compose the same few configs hundreds of
# times. A failing composition is not cached: it raises again on every call.
@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...], config_dir: Path, config_name: str) -> DictConfig:
    if config_dir != CONF_DIR:
        overrides = (f"hydra.searchpath=[file://{CONF_DIR}]", *overrides)
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def compose_config(*overrides: str, tiny: bool = True) -> DictConfig:
    """The config `python run.py <overrides>` would get, with Hydra's job info set as in a job."""
    cfg = compose_with_hydra(*(TINY if tiny else []), *overrides)
    HydraConfig.instance().set_config(cfg)  # run() reads the chosen options and overrides here
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# Narrow versions of every model so model and measure tests stay fast on 2 CPU cores.
SHRINK = {
    "mlp": ["model.hidden=[32,16]"],
    "cnn_small": ["model.channels=[4,8]", "model.hidden=16"],
    "cnn_4c3f": ["model.channels=[4,8]", "model.hidden=16"],
    "aol_4c3f": ["model.channels=[4,8]", "model.hidden=16"],
    "sll": ["model.channels=[4,8]", "model.hidden=16", "model.blocks=1"],
    "allcnn": ["model.channels=[4,8]"],
    "resnet18": ["model.width=4", "model.blocks=[1,1,1,1]"],
    "wide_resnet": ["model.depth=10", "model.width=1"],
    "resnext34_2x32": ["model.base_width=4", "model.blocks=[2,1,1]"],
}


def build_model_option(name: str, overrides=(), channels: int = 1, size: int = 28,
                       classes: int = 10) -> torch.nn.Module:
    """The model `model=<name> <overrides>` composes to, for inputs (channels, size, size)."""
    cfg = compose_config(f"model={name}", *overrides, tiny=False)
    return instantiate(cfg.model, in_channels=channels, num_classes=classes, image_size=size)


# (model, regularizer) pairs whose objective precision=bf16 must compute as float32 does: every penalty
# family, on cnn_small (BatchNorm) and on the BatchNorm-free cnn_4c3f that GloRo needs.
BF16_CASES = [("cnn_small", r) for r in ("none", "lip", "gradnorm", "gradnorm_fd", "J1", "J2", "Jinf", "lip+J2",
                                         "pgd_l2", "pgd_linf", "trades")] + \
             [("cnn_4c3f", r) for r in ("none", "lip", "gradnorm", "gradnorm_fd", "J2", "gloro")]


def objective_in_fp32_and_bf16(model_name: str, regularizer: str, device):
    """(StepOutput, weight gradient) of `regularizer=<regularizer>` on one batch of 64 digits, in float32
    and under precision=bf16's autocast (tulip.train.step.autocast_for): same weights, batch and random draws,
    each on its own copy of the model (a train-mode step updates BatchNorm's running statistics).

    TRADES' adversary is a chaotic function of the gradients' signs (bf16 changes half of its pixels and
    the KL by 7 %), so TRADES is given the float32 step's adversary: what is compared is its penalty."""
    from tulip.data import load_dataset
    from tulip.train.loss import build_loss
    from tulip.train.step import autocast_for

    cfg = compose_config(f"regularizer={regularizer}", f"model={model_name}", *SHRINK[model_name])
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    x, y = data.train_x[:64].to(device), data.train_y[:64].to(device)
    torch.manual_seed(0)
    model = build_model_option(model_name, SHRINK[model_name]).to(device).train()
    outputs, chosen = [], None
    for precision in ("fp32", "bf16"):
        on_copy = copy.deepcopy(model)
        loss_fn = build_loss(cfg.reg, on_copy)
        if regularizer == "trades":
            torch.manual_seed(1)
            chosen = chosen or loss_fn.batch(on_copy, x, y)
            loss_fn.batch = lambda model, x, y: chosen
        torch.manual_seed(1)  # the same PGD starts
        with autocast_for(precision, torch.device(device))():
            out = loss_fn(on_copy, x, y)
        gradient = torch.autograd.grad(out.loss, list(on_copy.parameters()))  # as training, outside autocast
        outputs.append((out, torch.cat([g.flatten() for g in gradient])))
    return outputs


def train_mnist5k(run_dir, *overrides):
    """Training and its per-epoch measurements: what these tests look at (the final bounds are not)."""
    from tulip.main import run

    return run(compose_config("dataset=mnist5k", "epochs=2", "attack=none", "eval.bounds=false",
                              "wandb.mode=disabled", *overrides, tiny=False), run_dir)


@pytest.fixture
def make_config():
    return compose_config


def compile_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tulip.train.loop" and "compile" in r.getMessage()]


@pytest.fixture
def compile_calls(monkeypatch):
    """The models torch.compile was called on (it still compiles them)."""
    calls, real = [], torch.compile

    def spy(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    return calls


@pytest.fixture(scope="session")
def model_and_images():
    """A quickly trained MLP and 24 test images, 3 of them misclassified, for the attack tests (read-only)."""
    from support.attacks import trained_mlp_and_images
    return trained_mlp_and_images()


def dense_matrix(linear_map, shape):
    """The matrix of a linear map on inputs of `shape`, column by column (small shapes only)."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).view(d, *shape)
    return linear_map(basis).reshape(d, -1).T


def with_random_statistics(layer: torch.nn.Module) -> torch.nn.Module:
    """`layer` in float64 and eval mode, its BatchNorms with nontrivial running statistics and scales."""
    torch.manual_seed(0)
    layer = layer.double()
    for module in layer.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.uniform_(0.1, 4.0)
            module.running_mean.normal_()
            module.weight.data.normal_()
    return layer.eval()


@torch.no_grad()
def exact_operator_norm(layer: torch.nn.Module, shape) -> float:
    """The L2 operator norm of an affine layer's linear part on inputs of `shape`, by a dense SVD."""
    offset = layer(torch.zeros(1, *shape, dtype=torch.float64))  # BN / bias shift
    return torch.linalg.svdvals(dense_matrix(lambda v: layer(v) - offset, shape))[0].item()


def run_interrupted_in_second_epoch(cfg: DictConfig, run_dir: Path, monkeypatch) -> None:
    """Run `cfg` in `run_dir`, killed (KeyboardInterrupt) during epoch 2's measurements: the folder then
    holds epoch 1's checkpoint, as after a preemption."""
    import tulip.train.loop
    from tulip.main import run

    real_measure, calls = tulip.train.loop.measure, []

    def crash_on_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(tulip.train.loop, "measure", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir)
    monkeypatch.setattr(tulip.train.loop, "measure", real_measure)


# --- tiers -----------------------------------------------------------------------------------------

TIERS = ("system", "integration", "unit")  # heaviest first: the order tests start in
# Subprocess sweeps and studies train several jobs each and wait on them; setup.cfg's timeout is for the rest.
SYSTEM_TIMEOUT_S = 900


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, and one more when the system tier runs: its tests mostly wait on
    their subprocesses, SIGKILLs and the SLURM cluster, and a third worker fills those waits."""
    cores = len(os.sched_getaffinity(0))
    tests = Path(__file__).parent
    system = tests / "system"
    runs_system = any(Path(str(arg).split("::")[0]).resolve() in (tests, system)
                      or system in Path(str(arg).split("::")[0]).resolve().parents for arg in config.args)
    return cores + 1 if runs_system else cores


def _tier(item) -> str | None:
    tests = Path(__file__).parent
    return item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else None


def pytest_collection_modifyitems(config, items):
    """The tier marker from the test's folder (tests/<tier>/...), whoever wrote the file. The heavier
    tiers run first: the workers (pytest-xdist) then fill their last minutes with short unit tests
    instead of one worker finishing a long run while the other waits."""
    items.sort(key=lambda item: TIERS.index(_tier(item)) if _tier(item) in TIERS else len(TIERS))
    for item in items:
        tier = _tier(item)
        if tier not in TIERS:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "system" and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SYSTEM_TIMEOUT_S))
        if item.get_closest_marker("slurm") is not None:  # one cluster: its tests one after another
            item.add_marker(pytest.mark.xdist_group("slurm"))


# --- runs that tests share -------------------------------------------------------------------------

def copy_run(source: Path, target: Path) -> Path:
    """A copy of a shared run folder that a test may change (milliseconds: the runs are tiny)."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


# Taking a folder's writer lock rewrites the lock file (holder and time) without changing the run.
NOT_THE_RUN = {".tulip.lock"}


def folder_fingerprint(folder: Path) -> dict[str, str]:
    """A digest of every file under `folder`: a shared run must end the session as it began."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name not in NOT_THE_RUN}


def assert_unchanged(folder: Path, fingerprint: dict[str, str]) -> None:
    now = folder_fingerprint(folder)
    changed = sorted(name for name in fingerprint.keys() | now.keys() if fingerprint.get(name) != now.get(name))
    assert not changed, f"a test changed the shared run folder {folder} ({changed}); copy it first (conftest.copy_run)"


@dataclass(frozen=True)
class TrainedRun:
    folder: Path
    metrics: dict  # what run() returned


# One epoch of cnn_small (TINY), then three attacks (ddn, pgd_l2, fgsm) on 40 test images, the bounds and
# the nearest-neighbour distances: a run folder holding every file a training run writes.
TRAINED_RUN_L2_EPS = [0.5, 1.0, 2.0]
TRAINED_RUN_LINF_EPS = [0.005, 0.02]  # FGSM fails at these on almost every image: failures must be +inf
TRAINED_RUN = ["attack=[ddn,pgd_l2,fgsm]", "attack.n=40", "attack.methods.ddn.steps=20",
               "attack.methods.pgd_l2.steps=10", "attack.methods.pgd_l2.rel_stepsize=0.2",
               f"attack.epsilons.l2=[{','.join(map(str, TRAINED_RUN_L2_EPS))}]",
               f"attack.epsilons.linf=[{','.join(map(str, TRAINED_RUN_LINF_EPS))}]", "eval.nn=true"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """`run(compose_config(*TRAINED_RUN))` once per session; read-only (copy_run it to change it)."""
    from tulip.main import run
    folder = tmp_path_factory.mktemp("trained_run")
    metrics = run(compose_config(*TRAINED_RUN), folder)
    fingerprint = folder_fingerprint(folder)
    yield TrainedRun(folder, metrics)
    assert_unchanged(folder, fingerprint)


@dataclass(frozen=True)
class Multirun:
    folder: Path
    command: subprocess.CompletedProcess  # `python run.py -m ...`: its exit code and output


# `python run.py -m` as a user runs it: 3 Lipschitz multipliers x 2 seeds, 1 epoch each, with a
# minimisation attack. reg.lip=-1 is rejected by the config check: jobs 0 and 1 fail for real, before
# training, and the four after them must still run.
TINY_MULTIRUN = ["regularizer=lip", "reg.lip=-1,0,0.1", "seed=0,1", "epochs=1", "wandb.mode=disabled",
                 "dataset.train_subset=512", "dataset.test_subset=100", "attack=ddn", "attack.n=30",
                 "attack.methods.ddn.steps=10", *SHORT_LOWER_BOUND]


@pytest.fixture(scope="session")
def tiny_multirun(tmp_path_factory) -> Multirun:
    """TINY_MULTIRUN once per session; read-only (copy_run it to change it)."""
    folder = tmp_path_factory.mktemp("multirun")
    # One BLAS/OpenMP thread: on a shared 2-core machine two threads per process make torch's SVD and
    # convolutions many times slower under load.
    command = subprocess.run([sys.executable, "run.py", "-m", *TINY_MULTIRUN, f"hydra.sweep.dir={folder}"],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
    jobs = sorted(p for p in folder.iterdir() if p.name.isdigit())
    assert len(jobs) == 6, command.stderr[-3000:]
    fingerprint = folder_fingerprint(folder)
    yield Multirun(folder, command)
    assert_unchanged(folder, fingerprint)


# The job of tests/support/fault_driver.py, which kills it at chosen moments: 3 epochs and DDN.
FAULT_JOB = ["epochs=3", "attack=ddn", "attack.n=20", "attack.methods.ddn.steps=10", "scheduler.milestones=[2]",
             *SHORT_LOWER_BOUND]


@pytest.fixture(scope="session")
def interrupted_fault_job(tmp_path_factory) -> Path:
    """A folder holding epoch 1 of FAULT_JOB, as after a preemption in epoch 2; read-only."""
    folder = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_interrupted_in_second_epoch(compose_config(*FAULT_JOB), folder, monkeypatch)
    fingerprint = folder_fingerprint(folder)
    yield folder
    assert_unchanged(folder, fingerprint)
