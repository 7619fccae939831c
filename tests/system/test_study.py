"""hydra/sweeper=optuna: multi-objective search over multipliers and resumable studies.

The sweeps here are real: `python run.py -m hydra/sweeper=optuna ...` with the basic launcher and with
Tulip's local launcher (the local SLURM cluster's run, through submitit, is in tests/system/test_slurm.py),
each trial a 1-epoch training. The search space, the objectives' checks and the study's sweep files are
in tests/unit/test_study_files.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from support.jobs import ROOT, RUN_PY, job_folders, output_of, read_summary, run_tulip
from support.study import MO_TINY, OBJECTIVES, assert_report_draws_the_front
from tulip.launch.cpus import cpus_given
from tulip.launch.sweeper import FRONT_FILE


def load_study(sweep_dir, name="tulip") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def non_dominated(points: dict) -> set:
    return {k for k, p in points.items()
            if not any(all(a <= b for a, b in zip(q, p)) and q != p for q in points.values())}


def job_config(job_dir):
    return OmegaConf.load(job_dir / ".hydra" / "config.yaml")


def sweep(tmp_path, *args, timeout=300):
    result = run_tulip(["-m", *MO_TINY, f"hydra.sweep.dir={tmp_path / 'study'}", *args], tmp_path, timeout)
    return result, tmp_path / "study"


# --- real sweeps ------------------------------------------------------------------------------------

def test_six_trial_multi_objective_sweep_records_the_study_and_reruns_the_front(tmp_path):
    result, sweep_dir = sweep(tmp_path, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=3",
                              "hydra.sweeper.sampler.population_size=4", "hydra.sweeper.reseed=[1]")
    assert result.returncode == 0, output_of(result)
    study = load_study(sweep_dir)
    trials = study.get_trials()
    assert study.metric_names == OBJECTIVES
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    values = {}
    for trial in trials:
        assert 1e-3 <= trial.params["reg.lip"] <= 1
        summary = read_summary(sweep_dir / str(trial.user_attrs["job"]))
        # the values the study holds are the trial's own run's summary
        assert trial.values == [summary[k] for k in OBJECTIVES]
        assert job_config(sweep_dir / str(trial.user_attrs["job"])).reg.lip == pytest.approx(trial.params["reg.lip"])
        values[trial.number] = tuple(trial.values)
    assert sorted(t.user_attrs["job"] for t in trials) == list(range(6))
    front = yaml.safe_load((sweep_dir / FRONT_FILE).read_text())
    assert {row["trial"] for row in front["front"]} == non_dominated(values)
    # each front trial once more with seed=1, in its own folder after the trials', not told to the study
    reruns = [job for row in front["front"] for seed, job in row["reseeded_jobs"].items() if seed == 1]
    assert len(reruns) == len(front["front"]) and sorted(reruns) == list(range(6, 6 + len(reruns)))
    for row in front["front"]:
        rerun = sweep_dir / str(row["reseeded_jobs"][1])
        assert read_summary(rerun)["status"] == "finished"
        assert job_config(rerun).seed == 1 and job_config(rerun).reg.lip == pytest.approx(row["params"]["reg.lip"])
    assert len(job_folders(sweep_dir)) == 6 + len(reruns)
    assert_report_draws_the_front(sweep_dir, tmp_path / "report")

    # the same command resumes the study: nothing is re-run; a larger n_trials extends it
    before = {job.name: (job / "summary.json").stat().st_mtime_ns for job in job_folders(sweep_dir)}
    result, _ = sweep(tmp_path, "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=3",
                      "hydra.sweeper.sampler.population_size=4")
    assert result.returncode == 0, output_of(result)
    trials = load_study(sweep_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    # new folders come after the re-runs'; a repeated proposal has its twin's folder and no new one
    new_jobs = sorted(t.user_attrs["job"] for t in trials[6:] if "duplicate_of" not in t.user_attrs)
    assert new_jobs == list(range(6 + len(reruns), 6 + len(reruns) + len(new_jobs)))
    assert len(job_folders(sweep_dir)) == 6 + len(reruns) + len(new_jobs)
    assert all((j / "summary.json").stat().st_mtime_ns == before[j.name]
               for j in job_folders(sweep_dir) if j.name in before)


def test_a_study_proposes_the_same_trials_when_the_test_labels_are_permuted(tmp_path):
    """The objectives read the validation split (tests/support/study.py), so the sampler sees the same
    values and proposes the same trials whatever the test labels are (tests/support/permuted_test_labels.py)."""
    # TPE after 2 random trials: every later proposal moves with the values it was told
    settings = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1", "epochs=2",
                "hydra.sweeper.sampler._target_=optuna.samplers.TPESampler",
                "~hydra.sweeper.sampler.population_size", "+hydra.sweeper.sampler.n_startup_trials=2"]
    studies = {}
    for name, script in (("plain", RUN_PY), ("permuted", ROOT / "tests" / "support" / "permuted_test_labels.py")):
        result = run_tulip(["-m", *MO_TINY, f"hydra.sweep.dir={tmp_path / name}", *settings], tmp_path, 300,
                           script=script)
        assert result.returncode == 0, output_of(result)
        studies[name] = load_study(tmp_path / name).get_trials()
    plain, permuted = studies["plain"], studies["permuted"]
    assert [t.state for t in permuted] == [TrialState.COMPLETE] * 4
    assert [t.params for t in plain] == [t.params for t in permuted]
    assert [t.values for t in plain] == [t.values for t in permuted]
    for trial in permuted:  # and the permutation reached every trial: the test errors differ
        job = str(trial.user_attrs["job"])
        errors = [read_summary(tmp_path / name / job)["test/error_pct"] for name in ("plain", "permuted")]
        assert errors[0] != errors[1], errors


def test_an_interrupted_trial_reruns_in_its_folder_and_failed_trials_do_not_stop_the_study(tmp_path):
    sweep_dir = tmp_path / "study"
    sweep_dir.mkdir()
    # A sweep killed mid-trial leaves the trial RUNNING in the study, its folder number recorded.
    study = optuna.create_study(study_name="tulip", storage=f"sqlite:///{sweep_dir / 'optuna.db'}",
                                directions=["minimize", "minimize"])
    study.set_metric_names(OBJECTIVES)
    stale = study.ask({"reg.lip": FloatDistribution(1e-3, 1, log=True)})
    stale.set_user_attr("job", 0)
    study.set_user_attr("next_job", 1)
    # optim.lr searched too: 1e25 diverges (NaN objectives), which the study records as a failed trial
    result, _ = sweep(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
                      "optim.lr=choice(0.05,1e25)")
    assert result.returncode == 0, output_of(result)
    trials = load_study(sweep_dir).get_trials()
    assert trials[0].state == TrialState.FAIL and load_study(sweep_dir).user_attrs["interrupted"] == [0]
    rerun = trials[1]
    assert rerun.params["reg.lip"] == stale.params["reg.lip"] and rerun.user_attrs["job"] == 0
    assert len(trials) == 4  # the stale record is not counted among the 3
    for trial in trials[1:]:
        summary = read_summary(sweep_dir / str(trial.user_attrs["job"]))
        diverged = trial.params["optim.lr"] == 1e25
        assert summary["status"] == ("diverged" if diverged else "finished"), summary["status"]
        assert trial.state == (TrialState.FAIL if diverged else TrialState.COMPLETE)


def test_a_killed_study_resumes_its_running_trial_from_the_trial_folders_checkpoint(tmp_path):
    """A real SIGKILL of the sweep mid-trial; the same command then finishes the study."""
    args = ["-m", *MO_TINY, f"hydra.sweep.dir={tmp_path / 'study'}", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=1", "epochs=3", "dataset.train_subset=2048"]
    process = subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "study" / "0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (tmp_path / "study" / "0" / "summary.json").exists()

    result = run_tulip(args, tmp_path, 300)
    assert result.returncode == 0, output_of(result)
    study = load_study(tmp_path / "study")
    trials = study.get_trials()
    assert study.user_attrs["interrupted"] == [0] and trials[0].state == TrialState.FAIL
    assert [t.user_attrs["job"] for t in trials[1:]] == [0, 1]  # the re-run in the killed trial's folder
    assert trials[1].params == trials[0].params and trials[1].state == TrialState.COMPLETE
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "study" / "0" / "metrics.jsonl").open()]
    assert epochs == [1, 2, 3]  # resumed from its checkpoint: no epoch trained twice
    assert read_summary(tmp_path / "study" / "0")["status"] == "finished"


def test_a_repeated_proposal_takes_the_earlier_result_without_a_run(tmp_path):
    result, sweep_dir = sweep(tmp_path, "reg.lip=choice(0.01,0.1)", "hydra.sweeper.n_trials=5",
                              "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.population_size=2")
    assert result.returncode == 0, output_of(result)
    trials = load_study(sweep_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    runs = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len({t.params["reg.lip"] for t in runs}) == len(runs) <= 2  # each value trained once
    assert len(job_folders(sweep_dir)) == len(runs)
    for trial in trials:
        twin = trials[trial.user_attrs.get("duplicate_of", trial.number)]
        assert trial.params == twin.params and trial.values == twin.values
        assert trial.user_attrs["job"] == twin.user_attrs["job"]
    front = yaml.safe_load((sweep_dir / FRONT_FILE).read_text())["front"]
    assert len({row["job"] for row in front}) == len(front)  # one row per distinct configuration


def test_the_local_launcher_runs_the_trials_side_by_side(tmp_path):
    # its jobs fork from the sweep's process, which holds the study's database connection
    result, sweep_dir = sweep(tmp_path, "hydra/launcher=local", "hydra.launcher.array_parallelism=2",
                              "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2")
    assert result.returncode == 0, output_of(result)
    trials = load_study(sweep_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        summary = read_summary(sweep_dir / str(trial.user_attrs["job"]))
        assert trial.values == [summary[k] for k in OBJECTIVES]
        assert summary["threads"] == max(1, cpus_given() // 2)  # two jobs at once, each its share of the cores


@pytest.mark.parametrize("args, message", [
    (["hydra.sweeper.directions=[minimize]"], "hydra.sweeper.directions"),
    (["reg.lip=0.1"], "hydra.sweeper.params: nothing to search"),
    (["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials"),
])
def test_bad_sweeper_settings_fail_before_any_trial(tmp_path, args, message):
    result, sweep_dir = sweep(tmp_path, *args, timeout=120)
    assert result.returncode != 0 and message in result.stderr + result.stdout, output_of(result)
    assert not any(sweep_dir.glob("[0-9]*"))


def test_a_study_folder_is_not_reused_for_other_objectives(tmp_path):
    sweep_dir = tmp_path / "study"
    sweep_dir.mkdir()
    optuna.create_study(study_name="tulip", storage=f"sqlite:///{sweep_dir / 'optuna.db'}",
                        directions=["minimize", "minimize"]).set_metric_names(["test/error_pct", "cert/median_l2"])
    result, _ = sweep(tmp_path, timeout=120)
    assert result.returncode != 0 and "use another study_name or sweep folder" in result.stderr, output_of(result)
