"""A Hydra sweeper that searches multipliers with Optuna, for one objective or several at once.

    python run.py -m hydra/sweeper=optuna 'objectives=[test/error_pct, attack/best/error_pct_l2@1]' \
        'reg.lip=tag(log,interval(1e-3,1))' hydra.sweeper.n_trials=24

Why Tulip's own plugin: hydra-optuna-sweeper (1.3.0, the latest) pins Optuna < 3, whose SQLite storage
fails under SQLAlchemy 2, so its studies could not be resumed on a current stack. This one is a small
Hydra sweeper on current Optuna with the same search-space grammar (``interval``, ``tag(log, …)``,
``choice``, ``range``) and the same contract with the task: run.py returns one float or a tuple, in the
order of the config's ``objectives``.

What it adds for a study:
- The study lives in SQLite inside the sweep folder: running the same command again resumes it (trials
  a killed sweep left running are re-run in their own job folders, resuming their checkpoints), and a
  larger ``n_trials`` extends it.
- ``reseed: [1, 2]`` re-runs every Pareto-optimal trial with those seeds once the search is done, so
  the report can give the front's seed spread. Re-runs are not trials: they do not steer the sampler.
- Job folders are numbered in launch order across resumptions; each trial records its folder.
- A proposal that repeats a finished trial's parameters (NSGA-II's crossover does) takes that trial's
  result without a run: a run is deterministic for its config and seed.

Hydra finds plugins only in the ``hydra_plugins`` package: ``hydra_plugins.tulip_sweeper`` names this
class there (conf/hydra/sweeper/optuna.yaml).
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Annotated, Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import TrialState

from tulip.runs.jobs import summary_or_problem
from tulip.runs.status import STATUS, Status
from tulip.schema import MAX_SEED, ConfigError, Count, Rule, checked, is_int

DIRECTIONS = ("minimize", "maximize")
Directions = Annotated[list | str | None, Rule(
    "minimize | maximize, a list of them (one per objective), or null (minimise every objective)",
    lambda v: v is None or v in DIRECTIONS or (isinstance(v, list) and v and all(d in DIRECTIONS for d in v)))]
SearchSpace = Annotated[dict | None, Rule("a mapping of config keys to search spaces (e.g. {reg.lip: "
                                          "'tag(log,interval(1e-3,1))'}) or null",
                                          lambda v: v is None or isinstance(v, dict))]
Seeds = Annotated[list | None, Rule(f"a list of seeds in [0, {MAX_SEED}] (e.g. [1, 2]) or null",
                                    lambda v: v is None or (isinstance(v, list)
                                                            and all(is_int(s) and 0 <= s <= MAX_SEED for s in v)))]

log = logging.getLogger(__name__)

JOB_ATTR = "job"  # a trial's job folder number (its folder: <sweep dir>/<job>)
NEXT_JOB_ATTR = "next_job"  # the study's next free job folder number
INTERRUPTED_ATTR = "interrupted"  # the study's trials a killed sweep left running (each re-run as a new one)
RESEED_ATTR = "reseeded"  # the study's record of re-runs: {"<trial number>:<seed>": job number}
FRONT_FILE = "pareto_front.yaml"
DUPLICATE_ATTR = "duplicate_of"  # a trial that repeated an earlier one's parameters: that trial's number
SEED_KEY = "seed"  # the config key a re-run of the front changes


def distribution(override: Override) -> BaseDistribution | None:
    """The Optuna distribution of a sweep override, None for a fixed value.

    ``interval(a, b)`` is a float range (``tag(log, interval(…))`` log-uniform; ``tag(int, …)`` integer),
    ``range(a, b[, step])`` an integer grid (end excluded, as in Python), ``a,b,c`` or ``choice(…)`` a
    categorical choice."""
    if not override.is_sweep_override():
        return None
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if "int" in sweep.tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    if isinstance(sweep, RangeSweep):
        if sweep.shuffle or any(isinstance(v, float) and not v.is_integer()
                                for v in (sweep.start, sweep.stop, sweep.step)):
            raise ValueError(f"hydra.sweeper.params.{override.get_key_element()}: range() takes integers; "
                             f"use interval() for a float range")
        return IntDistribution(int(sweep.start), int(sweep.stop) - int(sweep.step), step=int(sweep.step))
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(sweep.list))
    raise ValueError(f"hydra.sweeper.params.{override.get_key_element()}: {type(sweep).__name__} "
                     f"cannot be searched (interval, range or choice)")


def search_space(params: dict[str, Any] | None, arguments: list[str]) -> tuple[dict, list[str]]:
    """The distributions to search and the fixed overrides every trial gets, from the sweep file's
    ``hydra.sweeper.params`` and the command line (the command line wins for a key in both)."""
    texts = {str(key): f"{key}={value}" for key, value in (params or {}).items()}
    parsed = OverridesParser.create().parse_overrides(list(texts.values()) + list(arguments))
    by_key = {override.get_key_element(): override for override in parsed}  # later wins
    space, fixed = {}, []
    for key, override in by_key.items():
        dist = distribution(override)
        if dist is None:
            fixed.append(f"{key}={override.get_value_element_as_str()}")
        else:
            space[key] = dist
    return space, fixed


def trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in params.items()]


def distinct(trials: list) -> list:
    """The trials with parameters no earlier one in the list had (a repeat has the same result)."""
    seen, kept = set(), []
    for trial in trials:
        key = tuple(sorted(trial.params.items()))
        if key not in seen:
            seen.add(key)
            kept.append(trial)
    return kept


def returned_values(returned: Any, count: int) -> list[float] | None:
    """A job's return value as ``count`` finite floats, None when it is not (diverged: NaN)."""
    values = list(returned) if isinstance(returned, (tuple, list)) else [returned]
    if len(values) != count:
        raise ValueError(f"the task returned {len(values)} value(s) for {count} objective(s): set "
                         f"`objectives` to the metrics the sweep optimises (hydra.sweeper.directions "
                         f"has one entry per objective)")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


class OptunaSweeper(Sweeper):
    """Optuna search over the sweep's parameters; one objective or several (NSGA-II by default)."""

    @checked("hydra.sweeper")  # the arguments' types are their schema (tulip.schema)
    def __init__(self, sampler: optuna.samplers.BaseSampler | None, directions: Directions,
                 n_trials: Count, n_jobs: Count, storage: str | None, study_name: str, params: SearchSpace,
                 reseed: Seeds) -> None:
        self.sampler, self.directions = sampler, directions
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.storage, self.study_name = storage, study_name
        self.params = params
        self.reseed = [int(s) for s in (reseed or [])]

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(config.hydra.sweep.dir)

    # -- the study ------------------------------------------------------------------------------------
    def objectives(self) -> tuple[list[str], list[str]]:
        names = list(self.config.get("objectives") or [])
        if not names:
            raise ValueError("objectives: name at least one metric for hydra/sweeper=optuna to optimise")
        directions = self.directions or "minimize"
        directions = [directions] * len(names) if isinstance(directions, str) else list(directions)
        if len(directions) != len(names):
            raise ConfigError("hydra.sweeper.directions", directions, f"one of minimize | maximize per objective "
                              f"{names}")
        return names, directions

    def open_study(self, names: list[str], directions: list[str]) -> optuna.Study:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # Hydra instantiated hydra.sweeper.sampler (its _target_) when it built this sweeper
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    directions=directions, load_if_exists=True)
        if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            raise ValueError(f"hydra.sweeper.storage {self.storage}: study {self.study_name!r} was made for "
                             f"{len(study.directions)} objective(s) {study.metric_names}; this sweep has "
                             f"{names}: use another study_name or sweep folder")
        if study.metric_names is None:
            with warnings.catch_warnings():  # "experimental" since 3.2, and what the report reads
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        elif list(study.metric_names) != names:
            raise ValueError(f"objectives: {names} differ from the stored study's {study.metric_names} "
                             f"({self.storage}): use another study_name or sweep folder")
        return study

    def requeue_interrupted(self, study: optuna.Study) -> None:
        """Trials a killed sweep left RUNNING run again, in their own folders (which resume from their
        checkpoints); the stale records are closed as failed and marked, so they are not counted."""
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if stale:
            study.set_user_attr(INTERRUPTED_ATTR, study.user_attrs.get(INTERRUPTED_ATTR, [])
                                + [t.number for t in stale])
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={JOB_ATTR: trial.user_attrs.get(JOB_ATTR)})
            log.info(f"trial {trial.number} was interrupted: re-running it in job folder "
                     f"{trial.user_attrs.get(JOB_ATTR)}")

    @staticmethod
    def ended_trials(study: optuna.Study) -> list:
        """The trials that count: complete or failed, less the stale records of interrupted ones."""
        interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
                if t.number not in interrupted]

    def finished(self, study: optuna.Study) -> int:
        return len(self.ended_trials(study))

    def assign_jobs(self, study: optuna.Study, wanted: list[int | None]) -> list[int]:
        """Job folder numbers: the given ones kept (a re-run resumes its folder), new ones for None."""
        fresh = sum(job is None for job in wanted)
        first = int(study.user_attrs.get(NEXT_JOB_ATTR, 0))
        if fresh:
            study.set_user_attr(NEXT_JOB_ATTR, first + fresh)
        numbers = iter(range(first, first + fresh))
        return [next(numbers) if job is None else job for job in wanted]

    def launch(self, overrides: list[list[str]], jobs: list[int]) -> list:
        """One launcher batch. Hydra numbers a batch's jobs from initial_job_idx on, so a batch of
        non-consecutive folders (a resumed job among new ones) goes out one launch per job."""
        if jobs == list(range(jobs[0], jobs[0] + len(jobs))):
            return list(self.launcher.launch(overrides, initial_job_idx=jobs[0]))
        return [ret for job_overrides, job in zip(overrides, jobs)
                for ret in self.launcher.launch([job_overrides], initial_job_idx=job)]

    def sweep(self, arguments: list[str]) -> list:
        names, directions = self.objectives()
        space, fixed = search_space(OmegaConf.to_container(self.params, resolve=True)
                                    if isinstance(self.params, DictConfig) else self.params, arguments)
        if not space:
            raise ValueError("hydra.sweeper.params: nothing to search; give a range, e.g. "
                             "'reg.lip=tag(log,interval(1e-3,1))'")
        study = self.open_study(names, directions)
        if study.get_trials(deepcopy=False) and self.sampler is not None:
            # A seeded sampler restarted on a stored study would propose its first trials again.
            self.sampler.reseed_rng()
        self.requeue_interrupted(study)
        log.info(f"Optuna study {self.study_name!r} in {self.storage}: {self.finished(study)} of "
                 f"{self.n_trials} trials done; objectives {names} ({', '.join(directions)}); "
                 f"searching {', '.join(space)}")
        all_returns = []
        while (todo := self.n_trials - self.finished(study)) > 0:
            trials = [t for t in (study.ask(space) for _ in range(min(self.n_jobs, todo)))
                      if not self.told_as_duplicate(study, t)]
            if not trials:
                continue
            jobs = self.assign_jobs(study, [t.user_attrs.get(JOB_ATTR) for t in trials])
            for trial, job in zip(trials, jobs):  # recorded before the launch: a killed sweep's trial
                trial.set_user_attr(JOB_ATTR, job)  # is then re-run in its own folder
            returns = self.launch([fixed + trial_overrides(t.params) for t in trials], jobs)
            for trial, ret in zip(trials, returns):
                self.tell(study, trial, ret, len(names))
            all_returns.append(returns)
        front = distinct(study.best_trials)
        if self.reseed:
            all_returns.append(self.rerun_front(study, front, fixed))
        self.write_front(study, front, names)
        return all_returns

    def told_as_duplicate(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """A proposal equal to a finished trial (NSGA-II's crossover often repeats a parent) gets that
        trial's result without a run: a run is deterministic for its config and seed."""
        twin = next((t for t in self.ended_trials(study) if t.params == trial.params), None)
        if twin is None:
            return False
        trial.set_user_attr(JOB_ATTR, twin.user_attrs.get(JOB_ATTR))
        trial.set_user_attr(DUPLICATE_ATTR, twin.number)
        if twin.state == TrialState.COMPLETE:
            study.tell(trial, twin.values)
        else:
            study.tell(trial, state=TrialState.FAIL)
        log.info(f"trial {trial.number} repeats trial {twin.number} (job {twin.user_attrs.get(JOB_ATTR)}): "
                 f"its result, without a run")
        return True

    def tell(self, study: optuna.Study, trial: optuna.Trial, ret, count: int) -> None:
        from hydra.core.utils import JobStatus
        values = returned_values(ret.return_value, count) if ret.status == JobStatus.COMPLETED else None
        if values is None:
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"trial {trial.number} (job {trial.user_attrs.get(JOB_ATTR)}): "
                        f"{'raised' if ret.status != JobStatus.COMPLETED else 'no finite objective'}; "
                        f"recorded as failed")
        else:
            study.tell(trial, values)

    def finished_job(self, job: int) -> bool:
        """Whether job folder `job` holds a run that ended (a diverged run is an ended one)."""
        summary, _ = summary_or_problem(self.sweep_dir / str(job))
        return summary.get(STATUS) in (Status.FINISHED, Status.DIVERGED)

    def rerun_front(self, study: optuna.Study, front: list, fixed: list[str]) -> list:
        """Each Pareto-optimal trial once more per seed of ``reseed``. A re-run's folder is recorded
        before its launch; one that a killed sweep left unfinished resumes there."""
        done = dict(study.user_attrs.get(RESEED_ATTR, {}))
        todo = [(t, s) for t in front for s in self.reseed
                if f"{t.number}:{s}" not in done or not self.finished_job(done[f"{t.number}:{s}"])]
        if not todo:
            return []
        log.info(f"re-running {len({t.number for t, _ in todo})} Pareto-optimal trial(s) with "
                 f"{SEED_KEY} ∈ {self.reseed}")
        returns = []
        for start in range(0, len(todo), self.n_jobs):
            chunk = todo[start:start + self.n_jobs]
            jobs = self.assign_jobs(study, [done.get(f"{t.number}:{s}") for t, s in chunk])
            done.update({f"{t.number}:{s}": job for (t, s), job in zip(chunk, jobs)})
            study.set_user_attr(RESEED_ATTR, done)
            returns.append(self.launch([fixed + trial_overrides(t.params) + [f"{SEED_KEY}={s}"]
                                        for t, s in chunk], jobs))
        return returns

    def write_front(self, study: optuna.Study, front: list, names: list[str]) -> None:
        reseeded = study.user_attrs.get(RESEED_ATTR, {})
        rows = [{"trial": t.number, "job": t.user_attrs.get(JOB_ATTR),
                 "params": dict(t.params), "values": dict(zip(names, t.values)),
                 "reseeded_jobs": {int(k.split(":")[1]): v for k, v in reseeded.items()
                                   if k.split(":")[0] == str(t.number)}}
                for t in sorted(front, key=lambda t: t.values)]
        (self.sweep_dir / FRONT_FILE).write_text(yaml.safe_dump(
            {"study": self.study_name, "objectives": names, "trials": self.finished(study), "front": rows},
            sort_keys=False))
        for row in rows:
            log.info(f"Pareto front: trial {row['trial']} (job {row['job']}) {row['params']} → {row['values']}")
