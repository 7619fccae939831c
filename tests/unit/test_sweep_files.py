"""The shipped sweep files and launcher configs compose as meant, and the end-of-sweep report of
tulip.launch.callbacks names the jobs that did not finish (on job folders written by hand). The real
multiruns are in tests/system/test_sweeps.py."""
import json

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import CONF_DIR as CONF, compose_with_hydra
from tulip.config import validate
from support.jobs import SWEEPS

# Certified training needs a certifiable network: sweeps/certified.yaml and gloro_mnist.yaml train it
CERTIFIED_TRAINING = {"gloro", "gloro_trades", "margin"}


def expand_sweep(name: str) -> tuple[OmegaConf, list[list[str]]]:
    """Compose sweeps/NAME.yaml with conf/ on the search path (what `run.py --config-dir sweeps
    --config-name NAME` does) and list every job's overrides the way Hydra's basic sweeper expands
    hydra.sweeper.params."""
    cfg = compose_with_hydra(config_dir=SWEEPS, config_name=name)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params)
    return cfg, BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


@pytest.mark.parametrize("name", ["lagrange_grid", "regularizers", "paper_cifar10", "certified", "gloro_mnist",
                                  "one_lipschitz", "certified_compare"])
def test_every_job_of_every_sweep_file_composes(name):
    cfg, jobs = expand_sweep(name)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert len(jobs) >= 2
    parser = OverridesParser.create()
    composed = [compose_with_hydra(*job, config_dir=SWEEPS, config_name=name) for job in jobs]
    for overrides, job in zip(jobs, composed):
        for override in parser.parse_overrides(overrides):
            key, value = override.key_or_group, override.value()
            if key in job.hydra.runtime.choices:  # a config group option
                assert job.hydra.runtime.choices[key] == value
            else:  # the grid value reached the job's config
                assert OmegaConf.select(job, key) == value, (key, value)


def test_lagrange_grid_sweeps_both_multipliers_of_lip_J2():
    cfg, jobs = expand_sweep("lagrange_grid")
    assert cfg.hydra.runtime.choices["regularizer"] == "lip+J2"
    lips = {o for job in jobs for o in job if o.startswith("reg.lip=")}
    j2s = {o for job in jobs for o in job if o.startswith("reg.J2=")}
    assert len(lips) >= 3 and len(j2s) >= 3 and len(jobs) == len(lips) * len(j2s)


def test_regularizers_sweep_covers_every_regularizer_times_three_seeds_with_l2_attack():
    cfg, jobs = expand_sweep("regularizers")
    # certified training needs a certifiable network: sweeps/certified.yaml compares it (tested below)
    shipped = {p.stem for p in (CONF / "regularizer").glob("*.yaml") if not p.stem.startswith("_")} - CERTIFIED_TRAINING
    swept = {o.split("=", 1)[1] for job in jobs for o in job if o.startswith("regularizer=")}
    assert swept == shipped, f"missing from the sweep: {shipped - swept}; unknown: {swept - shipped}"
    assert {o for job in jobs for o in job if o.startswith("seed=")} == {"seed=0", "seed=1", "seed=2"}
    assert len(jobs) == 3 * len(shipped)
    assert cfg.hydra.runtime.choices["attack"] == "ddn"  # a minimisation attack (smallest L2 distance)
    assert len(cfg.attack.epsilons.l2) >= 4  # the L2 robust error curve


def test_paper_cifar10_is_the_papers_recipe_on_slurm_gpu():
    cfg, jobs = expand_sweep("paper_cifar10")
    choices = cfg.hydra.runtime.choices
    assert (choices["model"], choices["dataset"], choices["regularizer"]) == ("resnext34_2x32", "cifar10", "lip+J2")
    assert choices["hydra/launcher"] == "slurm_gpu"
    assert cfg.epochs == 200 and cfg.model.tanh is True and cfg.reg.decay == 5e-4
    assert cfg.hydra.launcher.gpus_per_node == 1
    swept = {o.split("=")[0] for job in jobs for o in job}
    assert swept == {"reg.lip", "reg.J2"}


def test_slurm_gpu_launcher_keys_are_overridable():
    overrides = ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100", "hydra.launcher.account=proj",
                 "hydra.launcher.qos=high", "hydra.launcher.constraint=h100", "hydra.launcher.cpus_per_task=4",
                 "hydra.launcher.mem_gb=16", "hydra.launcher.timeout_min=30",
                 "hydra.launcher.array_parallelism=3", "hydra.launcher.setup=[module load cuda]"]
    default = compose_with_hydra(*overrides[:1])
    custom = compose_with_hydra(*overrides)
    launcher = default.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.max_num_timeout > 0  # timeouts requeue
    assert launcher.partition and launcher.cpus_per_task and launcher.mem_gb and launcher.timeout_min
    launcher = custom.hydra.launcher
    assert (launcher.partition, launcher.account, launcher.qos, launcher.constraint) == ("a100", "proj", "high", "h100")
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.timeout_min, launcher.array_parallelism) == (4, 16, 30, 3)
    assert list(launcher.setup) == ["module load cuda"]


def test_config_enables_the_sweep_report_callback():
    cfg = compose_with_hydra()
    targets = [c._target_ for c in cfg.hydra.callbacks.values()]
    assert "tulip.launch.callbacks.SweepReport" in targets


def test_sweep_report_names_jobs_that_did_not_finish(tmp_path, capsys):
    from tulip.launch.callbacks import SweepReport
    outcomes = {"0": {"status": "finished", "test/error_pct": 3.25}, "1": {"status": "diverged"},
                "2": None, "3": {"status": "failed", "error": "ValueError: reg.lip=-1 must be >= 0"}}
    for job, summary in outcomes.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"seed={job}"]), tmp_path / job / ".hydra" / "overrides.yaml")
        if summary is not None:  # job 2 was killed before writing one
            (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    report = SweepReport()
    report.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    report.on_multirun_end(OmegaConf.create({}))
    report.report()  # at exit: already reported, prints nothing more
    out = capsys.readouterr().out
    assert out.count("Sweep ") == 1
    assert "4 jobs" in out and "3.25" in out and "seed=2" in out and "reg.lip=-1 must be" in out
    assert "NOT FINISHED: job 1 (diverged), job 2 (missing), job 3 (failed)" in out


def test_sweep_report_of_a_sweep_that_started_no_job_says_so(tmp_path):
    from tulip.launch.callbacks import format_report
    assert format_report(tmp_path, []) == f"Sweep {tmp_path}: no job started."


def test_certified_sweep_compares_gloro_with_the_others_on_one_certifiable_network():
    cfg, jobs = expand_sweep("certified")
    choices = cfg.hydra.runtime.choices
    assert (choices["model"], choices["optim"], choices["attack"]) == ("cnn_4c3f", "adam", "autoattack_l2")
    swept = {o.split("=", 1)[1] for job in jobs for o in job if o.startswith("regularizer=")}
    assert swept == {"gloro", "none", "lip", "lip+J2", "pgd_l2", "trades"} and len(jobs) == 18
    assert list(cfg.attack.epsilons.l2) == [0.3, 1.0, 1.58]  # GloRo's MNIST radii
    assert cfg.attack.methods.apgd_ce_l2.n_iter == 100  # the standard ensemble


def test_gloro_mnist_is_gloros_recipe_chosen_on_validation_and_judged_on_the_test_set():
    cfg, jobs = expand_sweep("gloro_mnist")
    assert len(jobs) == 6  # 2 radii x 3 seeds
    for job in jobs:
        run = compose_with_hydra(*job, config_dir=SWEEPS, config_name="gloro_mnist")
        choices, radius = run.hydra.runtime.choices, run.reg.gloro
        assert (choices["model"], choices["model/activation"], choices["regularizer"]) == ("cnn_4c3f", "minmax",
                                                                                            "gloro_trades")
        assert run.reg.gloro_trades == 1.5 and dict(run.reg.radius_warmup) == {"start": 0.01, "end": 1.1, "until": 0.5}
        # best.pt on the validation certified error at the training radius; the test set once, all of it
        assert run.select == f"val/cert_error_pct_l2@{radius:g}" and list(run.eval.certify) == [radius]
        assert (run.attack.split, run.attack.n) == ("test", None)
        assert set(run.attack.methods) == {"ddn"} and radius in run.attack.epsilons.l2


@pytest.mark.parametrize("radius", [0.3, 1.58])
def test_certified_compare_trains_the_others_under_gloros_recipe(radius):
    """PGD-L2 and TRADES-L2 at the training radius, on the recipe's network, optimizer and batch."""
    recipe = compose_with_hydra(f"reg.gloro={radius}", config_dir=SWEEPS, config_name="gloro_mnist")
    for method in (["regularizer=pgd_l2", f"reg.pgd.eps={radius}"],
                   ["regularizer=trades", "reg.trades.norm=2", f"reg.trades.eps={radius}"]):
        run = compose_with_hydra(*method, config_dir=SWEEPS, config_name="certified_compare")
        for key in ("model", "optim", "scheduler._target_", "dataset", "batch_size", "attack.split", "attack.n",
                    "attack.epsilons"):
            assert OmegaConf.select(run, key) == OmegaConf.select(recipe, key), key
        batch = run.reg.batches.pgd if "pgd_l2" in method[0] else run.reg.batches.trades
        assert (batch.eps, batch.norm) == (radius, 2)
        assert run.select == "val/error_pct" and radius in run.eval.certify  # they certify too, best.pt on clean


def test_gloro_mnist_trains_its_0_3_model_at_1_5x_and_chooses_it_at_0_3():
    """The header's command: a multirun of seeds at reg.gloro=0.45, best.pt on the certified error at 0.3."""
    overrides = ["reg.gloro=0.45", "eval.certify=[0.3,0.45]", "select=val/cert_error_pct_l2@0.3"]
    cfg, _ = expand_sweep("gloro_mnist")
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()] + overrides
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), max_batch_size=None)[0]
    assert len(jobs) == 3  # the command line's reg.gloro replaces the file's two radii: seeds 0, 1, 2
    for job in jobs:
        run = compose_with_hydra(*job, config_dir=SWEEPS, config_name="gloro_mnist")
        validate(run)
        assert run.reg.penalties.gloro.eps == 0.45 and run.select == "val/cert_error_pct_l2@0.3"
