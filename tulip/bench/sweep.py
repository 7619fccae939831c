"""``python -m tulip.bench sweep``: what a sweep costs beyond its training, per launcher.

Runs the same 4-job grid (optim.lr x seed, `--epochs` (1) of mnist5k, no attack) through
`python -m tulip.run -m` (run.py's app, from any install) with Hydra's basic launcher, Tulip's `local`
(one job per CPU at a time), submitit_local (every job at once) and the local SLURM cluster (when
`scontrol ping` answers: see tests/slurm/start.sh), and reads each job's summary.json:

- sweep wall time: from the command's start to its exit;
- per-job overhead: from the moment the job could have started to its first training step
  (`time/first_step`). A job can start when the sweep is submitted, or - when all launch slots are busy
  (the basic launcher runs one job at a time, `local` one per CPU, SLURM as many as the node has CPUs
  for) - when an earlier job ends. It includes the Python start, imports, Hydra, submission and
  scheduling ("launch"), and the job's own data loading, model building and W&B start ("setup":
  `time/job_start` to `time/first_step`).

Each job's thread count (tulip.launch.cpus: its share of the cores) is in its summary.json; the `x basic`
column compares each launcher's sweep wall time with the basic launcher's one job after another, in the
same round (`--rounds N` runs every launcher N times, interleaved, and prints medians).
Speed is never asserted here; the goal is <= 10 s overhead per job.
"""
import argparse
import heapq
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tulip.launch.launcher import parallel_jobs

TULIP = [sys.executable, "-m", "tulip.run"]
GRID = ["optim.lr=0.05,0.1", "seed=0,1"]  # 4 jobs of identical cost
JOB = ["dataset=mnist5k", "attack=none"]
LAUNCHERS = {"basic": [], "local": ["hydra/launcher=local"], "submitit_local": ["hydra/launcher=submitit_local"],
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
    workdir.mkdir(parents=True, exist_ok=True)
    command = [*TULIP, "-m", *GRID, *JOB, *LAUNCHERS[name], *extra,
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
    parser.add_argument("--launchers", default="basic,local,submitit_local,slurm",
                        help="comma-separated subset of: " + ",".join(LAUNCHERS))
    parser.add_argument("--wandb", default="offline", choices=["offline", "disabled"])
    parser.add_argument("--epochs", type=int, default=1, help="per job")
    parser.add_argument("--rounds", type=int, default=1, help="each launcher's sweep this many times, "
                        "interleaved; medians (× basic: of the ratios within a round)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per sweep")
    parser.add_argument("--keep", action="store_true", help="keep the sweep folders")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="tulip-bench-sweep-"))
    names = args.launchers.split(",")
    measured: dict[str, list[dict]] = {name: [] for name in names}  # per launcher, one dict per round
    notes = []
    try:
        for round_ in range(args.rounds):  # launchers interleaved: each round compares them side by side
            basic_wall = None
            for name in names:
                slots = {"slurm": slurm_slots, "local": lambda: parallel_jobs("auto")}.get(name, lambda: 1)()
                if slots is None:
                    if round_ == 0:
                        notes.append(f"{name}: skipped, no SLURM cluster answers (bash tests/slurm/start.sh; "
                                     f"export SLURM_CONF=...)")
                    continue
                sweep = run_sweep(name, [f"wandb.mode={args.wandb}", f"epochs={args.epochs}"],
                                  workdir / f"round{round_}", args.timeout)
                jobs = sweep["jobs"]
                slots = len(jobs) if name == "submitit_local" else min(slots, len(jobs))  # all at once
                over = overheads(jobs, sweep["submitted"], slots)
                setup = [j["time/first_step"] - j["time/job_start"] for j in jobs]
                basic_wall = basic_wall or (sweep["wall"] if name == "basic" else None)
                measured[name].append({
                    "jobs": len(jobs), "slots": slots,
                    "threads": "/".join(sorted({str(j.get("threads", "?")) for j in jobs})),
                    "wall": sweep["wall"], "ratio": sweep["wall"] / basic_wall if basic_wall else math.nan,
                    "over": statistics.mean(over), "over_max": max(over),
                    "launch": statistics.mean(o - s for o, s in zip(over, setup)),
                    "setup": statistics.mean(setup),
                    "train": statistics.mean(j["time/total_s"] - s for j, s in zip(jobs, setup))})
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for name, rounds in measured.items():
        if rounds:
            median = {key: statistics.median(r[key] for r in rounds)
                      for key in ("wall", "ratio", "over", "over_max", "launch", "setup", "train")}
            rows.append(f"| {name} | {rounds[0]['jobs']} | {rounds[0]['slots']} | {rounds[0]['threads']} | "
                        f"{median['wall']:.1f} | {median['ratio']:.2f} | {median['over']:.1f} | "
                        f"{median['over_max']:.1f} | {median['launch']:.1f} | {median['setup']:.1f} | "
                        f"{median['train']:.1f} |")
    print(f"Sweep overhead: 4-job grid ({' x '.join(GRID)}), epochs={args.epochs} {' '.join(JOB)}, "
          f"wandb.mode={args.wandb}; medians of {args.rounds} round(s); "
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
