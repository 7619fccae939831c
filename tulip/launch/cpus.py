"""How many CPU threads a job computes with: the CPUs it was given, shared with the jobs started beside it.

PyTorch starts one OpenMP thread per core it sees. Four jobs that a local launcher starts at once on a
2-core machine then run 8 threads on 2 cores, and the cores spend their time switching between threads
(the jobs took far longer together than one after another: docs/benchmarks.md). So a job takes its
share instead:

    CPUs given = the process's CPU affinity mask, capped by SLURM_CPUS_PER_TASK (a SLURM job) and by
                 OMP_NUM_THREADS (a user's or a launcher's explicit choice)
    threads    = `threads` when set, else max(1, CPUs given // jobs started at once)

The number of jobs started at once is only known to the process that launches them: the Hydra callback
`tulip.launch.callbacks.ShareCpus` computes it from the sweep and the launcher, and hands it to the jobs through
the environment variable JOBS_AT_ONCE (a local launcher's jobs inherit the launching process's
environment). A job started any other way counts as alone.
"""
import os

import torch

JOBS_AT_ONCE = "TULIP_JOBS_AT_ONCE"


def _positive_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def cpus_given() -> int:
    """The CPUs this process may run on: its affinity mask, capped by what SLURM and OMP_NUM_THREADS say."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        cpus = os.cpu_count() or 1
    # SLURM may bind the task to its CPUs (then the mask says the same) or not (then the mask is the node)
    caps = [cap for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS") if (cap := _positive_env(name))]
    return max(1, min([cpus, *caps]))


def jobs_at_once() -> int:
    return _positive_env(JOBS_AT_ONCE) or 1


def threads_for_job(threads: int | str = "auto") -> int:
    """`threads` when it is a number, else this job's share of the CPUs it was given."""
    if threads != "auto":
        return int(threads)
    return max(1, cpus_given() // jobs_at_once())


def use_threads(threads: int | str = "auto") -> int:
    """Set PyTorch's intra-op thread count for this job (before any parallel work); return it."""
    count = threads_for_job(threads)
    torch.set_num_threads(count)
    return count
