"""``hydra/launcher=local``: a sweep's jobs side by side on this machine, at most one per CPU at a time,
each in a process forked from the sweep's own.

Hydra's basic launcher runs the jobs one after another in its own process; submitit's local executor
(``hydra/launcher=submitit_local``) starts every job at once as a fresh Python process. A fresh process
pays a fixed start-up before its first step (Python, torch, ``torch._dynamo`` which torch.optim imports,
pandas which dynamo imports, Hydra, W&B), and more jobs than cores only share the cores, so a small grid
took longer through submitit_local than one job after another. This launcher removes both costs (the
figures, from `python -m tulip.bench sweep`: docs/benchmarks.md):

- the jobs are forked from the sweep's process, after it has imported what every job imports
  (``preload``; the sweep imported torch and Tulip already), so a job starts in milliseconds with
  everything loaded, yet in a process of its own: its threads, W&B run, memory and crashes stay its own;
- at most ``array_parallelism`` jobs run at once (the name of the SLURM launcher's cap; ``auto``: one per
  CPU this process was given), the next starting as soon as one ends, and each computes with its share
  of the CPUs (tulip.launch.cpus, tulip.launch.callbacks.ShareCpus).

A job that raised returns normally (Hydra records the error in its result, and the sweep's report names
it). A job process that ends without a result (killed) does not stop the ones after it: its error is
raised once every job has ended. Forking needs a POSIX system; the sweep's process must not have started
threads or CUDA before it forks, which Hydra and Tulip do not.

Hydra loads launchers only from the ``hydra_plugins`` package: ``hydra_plugins.tulip_launcher`` names
this class there; this module imports nothing heavy, as Hydra imports it in every Hydra app's start-up.
"""
import importlib
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Annotated, Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from tulip.schema import Rule, checked, is_int

log = logging.getLogger(__name__)
INTERRUPT_GRACE_S = 10  # how long an interrupted sweep waits for its jobs to stop on their own


Parallelism = Annotated[int | str | None, Rule("auto or an integer >= 1",
                                               lambda v: v in (None, "auto") or (is_int(v) and v >= 1))]


@checked("hydra.launcher")
def parallel_jobs(array_parallelism: Parallelism) -> int:
    """How many jobs run at once: `array_parallelism` (a positive integer), or one per CPU given for
    "auto"/None. A bad value raises ConfigError naming the key."""
    if array_parallelism in (None, "auto"):
        from tulip.launch.cpus import cpus_given  # imports torch: only when a sweep runs
        return cpus_given()
    return array_parallelism


class LocalLauncher(Launcher):
    """At most `array_parallelism` jobs at once, each in a process forked from this one after importing
    the modules `preload` names."""

    def __init__(self, array_parallelism: Parallelism = "auto", preload: Sequence[str] = ()) -> None:
        self.jobs_at_once = parallel_jobs(array_parallelism)  # a bad value fails before any job starts
        self.preload = list(preload)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and job_overrides
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        for name in self.preload:  # once here instead of once per job
            try:
                importlib.import_module(name)
            except ImportError as error:  # only slower: every job imports what it needs itself
                log.warning("hydra.launcher.preload: cannot import %s (%s)", name, error)
        forking = multiprocessing.get_context("fork")
        log.info("Local sweep output dir: %s, %d job%s at a time", sweep_dir, self.jobs_at_once,
                 "s"[:self.jobs_at_once != 1])

        waiting = list(enumerate(job_overrides, start=initial_job_idx))
        running: dict[Connection, tuple[int, Any]] = {}  # result pipe -> (job number, process)
        results: dict[int, JobReturn] = {}
        first_error: BaseException | None = None
        try:
            while waiting or running:
                while waiting and len(running) < self.jobs_at_once:
                    number, overrides = waiting.pop(0)
                    log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
                    receiver, sender = forking.Pipe(duplex=False)
                    process = forking.Process(target=self._run_job, args=(sender, list(overrides), number),
                                              name=f"job {number}")
                    process.start()
                    sender.close()  # the child's copy stays open: end of file once the child has exited
                    running[receiver] = (number, process)
                # a pipe is ready when its job sent its result or its process ended without one
                for receiver in wait(list(running)):
                    number, process = running.pop(receiver)
                    try:
                        results[number] = receiver.recv()
                    except EOFError:
                        process.join()
                        first_error = first_error or RuntimeError(
                            f"job {number} (in {sweep_dir}) ended without a result, exit code {process.exitcode}"
                            + (f" (signal {-process.exitcode})" if process.exitcode < 0 else ""))
                    receiver.close()
                    process.join()
        except BaseException:
            # Interrupted. Ctrl-C in a terminal has sent SIGINT to the jobs too: give them time to write
            # their summaries (a second SIGINT could cut that short), then stop the others as Ctrl-C would.
            deadline = time.monotonic() + INTERRUPT_GRACE_S  # one grace period for all of them, not one each
            for number, process in running.values():
                process.join(timeout=max(0.0, deadline - time.monotonic()))
            for number, process in running.values():
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
                    process.join()
            raise
        if first_error is not None:
            raise first_error
        return [results[number] for number in sorted(results)]

    def _run_job(self, sender: Connection, overrides: list[str], number: int) -> None:
        """In the forked process: the job, as Hydra's basic launcher runs it; its JobReturn goes back
        through `sender`."""
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        try:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(sweep_config.hydra.job) as job:
                job.id, job.num = str(os.getpid()), number
            result = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                             job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        except Exception as error:  # the job could not start (an override Hydra rejects): a failed job
            result = _failed(overrides, error)
        try:
            sender.send(result)
        except Exception as error:  # a return value or exception that does not pickle: send its text
            sender.send(_failed(overrides, RuntimeError(f"job {number}'s result could not be sent back: "
                                                        f"{error}; it was {result._return_value!r}")))


def _failed(overrides: list[str], error: BaseException) -> JobReturn:
    """A JobReturn saying the job failed with `error` (Hydra's sweeper raises it when it reads the result)."""
    result = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    result.return_value = error
    return result
