"""``python -m tulip.bench sweep``: what a sweep costs beyond its training, per launcher.

Runs the same 4-job grid (optim.lr x seed, `--epochs` (1) of mnist5k, no attack) through `python run.py -m`
with Hydra's basic launcher, submitit_local and the local SLURM cluster (when `scontrol ping`
answers: see tests/slurm/start.sh), and reads each job's summary.json:

- sweep wall time: from the command's start to its exit;
- per-job overhead: from the moment the job could have started to its first training step
  (`time/first_step`). A job can start when the sweep is submitted, or - when all launch slots are busy
  (the basic launcher runs one job at a time, SLURM as many as the node has CPUs for) - when an
  earlier job ends. It includes the Python start, imports, Hydra, submission and scheduling ("launch"),
  and the job's own data loading, model building and W&B start ("setup": `time/job_start` to
  `time/first_step`).

Each job's thread count (tulip.cpus: its share of the cores) is in its summary.json; the `x basic`
column compares each launcher's sweep wall time with the basic launcher's one job after another.
Speed is never asserted here; the goal is <= 10 s overhead per job.
"""
import argparse
import heapq
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRID = ["optim.lr=0.05,0.1", "seed=0,1"]  # 4 jobs of identical cost
JOB = ["dataset=mnist5k", "attack=none"]
LAUNCHERS = {"basic": [], "submitit_local": ["hydra/launcher=submitit_local"],
             "slurm": ["hydra/launcher=slurm_local"]}


def slurm_slots() -> int | None:
    """Jobs the local SLURM runs at once (one CPU each, slurm_local), or None if it is not up."""
    if shutil.which("scontrol") is None:
        return None
    try:
        if subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode != 0:
            return None
        cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=10)
        return int(cpus.stdout.split()[0])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def overheads(jobs: list[dict], submitted: float, slots: int) -> list[float]:
    """First step minus the time a launch slot was free for the job: jobs (sorted by start) take
    the earliest free slot (a slot frees when its job ends)."""
    free = [submitted] * slots
    result = []
    for job in jobs:
        ready = heapq.heappop(free)
        result.append(job["time/first_step"] - ready)
        heapq.heappush(free, max(ready, job["time/job_start"] + job["time/total_s"]))
    return result


def run_sweep(name: str, extra: list[str], workdir: Path, timeout: float) -> dict:
    # no OMP_NUM_THREADS from the caller's shell: each job's thread count is what Tulip chooses
    sweep_dir = workdir / name
    command = [sys.executable, str(ROOT / "run.py"), "-m", *GRID, *JOB, *LAUNCHERS[name], *extra,
               f"hydra.sweep.dir={sweep_dir}"]
    submitted = time.time()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.time() - submitted
    if done.returncode != 0:
        raise RuntimeError(f"{name} sweep failed ({done.returncode}):\n{done.stderr[-3000:]}")
    folders = [f for f in sweep_dir.iterdir() if f.name.isdigit()]
    jobs = [json.loads((f / "summary.json").read_text()) for f in folders]
    jobs.sort(key=lambda job: job["time/job_start"])  # the order they started in
    return {"submitted": submitted, "wall": wall, "jobs": jobs}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tulip.bench sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--launchers", default="basic,submitit_local,slurm",
                        help="comma-separated subset of: " + ",".join(LAUNCHERS))
    parser.add_argument("--wandb", default="offline", choices=["offline", "disabled"])
    parser.add_argument("--epochs", type=int, default=1, help="per job")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per sweep")
    parser.add_argument("--keep", action="store_true", help="keep the sweep folders")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="tulip-bench-sweep-"))
    rows, notes, walls = [], [], {}
    try:
        for name in args.launchers.split(","):
            slots = slurm_slots() if name == "slurm" else 1
            if slots is None:
                notes.append(f"{name}: skipped, no SLURM cluster answers (bash tests/slurm/start.sh; "
                             f"export SLURM_CONF=...)")
                continue
            sweep = run_sweep(name, [f"wandb.mode={args.wandb}", f"epochs={args.epochs}"], workdir, args.timeout)
            jobs = sweep["jobs"]
            if name == "submitit_local":  # starts every job at once
                slots = len(jobs)
            over = overheads(jobs, sweep["submitted"], slots)
            setup = [j["time/first_step"] - j["time/job_start"] for j in jobs]
            train = [j["time/total_s"] - s for j, s in zip(jobs, setup)]
            walls.setdefault("basic", sweep["wall"])
            threads = sorted({str(j.get("threads", "?")) for j in jobs})
            rows.append(f"| {name} | {len(jobs)} | {slots} | {'/'.join(threads)} | {sweep['wall']:.1f} | "
                        f"{sweep['wall'] / walls['basic']:.2f} | "
                        f"{statistics.mean(over):.1f} | {max(over):.1f} | "
                        f"{statistics.mean(o - s for o, s in zip(over, setup)):.1f} | "
                        f"{statistics.mean(setup):.1f} | {statistics.mean(train):.1f} |")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"Sweep overhead: 4-job grid ({' x '.join(GRID)}), epochs={args.epochs} {' '.join(JOB)}, "
          f"wandb.mode={args.wandb}; "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
          + (f"; folders kept in {workdir}" if args.keep else ""))
    print()
    print("| launcher | jobs | slots | threads/job | sweep wall s | × basic | overhead/job s (mean) | max | "
          "launch s | job setup s | train+eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for note in notes:
        print(f"\n{note}")
    print("\noverhead = first training step - time the job could start (sweep submitted, or its launch "
          "slot freed); launch = overhead - job setup; job setup = data, model, W&B start in the job. "
          "Target: overhead <= 10 s per job.")
