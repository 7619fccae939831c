"""W&B in a real `python run.py` process: wandb.mode=disabled never imports W&B, and an offline job's folder
(Hydra's .hydra/ files and job log included) holds no API key."""
import json
import os
import subprocess
import sys

from conftest import ROOT, TINY
from support.api_key import API_KEY, assert_no_file_holds_the_key
from support.wandb_records import records, run_file

# A few seconds per run: a small MLP, fewer images, no bounds.
FAST = ["model=mlp", "model.hidden=[32,16]", "dataset.train_subset=256", "dataset.test_subset=100",
        "eval.bounds=false"]


def test_disabled_wandb_is_never_imported(tmp_path):
    """wandb.mode=disabled spares every job W&B's import (0.4 s of its start-up): a whole run in a fresh
    process ends without the module loaded."""
    probe = ("import atexit, runpy, sys; "
             "atexit.register(lambda: print('wandb imported:', 'wandb' in sys.modules)); "
             "sys.argv = ['run.py', *sys.argv[1:]]; runpy.run_path('run.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe, *FAST, "epochs=1", "attack=none",
                             "wandb.mode=disabled", f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wandb imported: False" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"


def test_offline_job_folder_holds_no_api_key(tmp_path):
    """`python run.py` as a job runs it: Hydra's .hydra/ files and job log are in the folder too."""
    out_dir = tmp_path / "job"
    result = subprocess.run(
        [sys.executable, "run.py", *[o for o in TINY if not o.startswith("wandb.")], *FAST,
         "wandb.mode=offline", f"hydra.run.dir={out_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_API_KEY": API_KEY, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    assert (out_dir / ".hydra" / "config.yaml").is_file() and (out_dir / "run.log").is_file()
    assert any(r.WhichOneof("record_type") == "exit" for r in records(run_file(out_dir)))
    assert_no_file_holds_the_key(out_dir)
