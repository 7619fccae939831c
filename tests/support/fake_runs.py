"""Job folders written by hand: the files a job leaves, with chosen numbers and no training, for the
report's tests (tulip.report reads nothing else)."""
import csv
import json
from pathlib import Path

import yaml


def write_run(folder: Path, overrides: list[str], summary: dict, choices: dict | None = None,
              config: dict | None = None, epochs: list[dict] | None = None,
              hydra_overrides: list[str] | None = None) -> Path:
    """A job folder as Hydra and tulip.train.loop leave it: .hydra/{overrides,hydra,config}.yaml, summary.json
    with its own record of the overrides, metrics.jsonl."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(hydra_overrides or overrides))
    hydra = {"hydra": {"runtime": {"choices": choices or {}}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {}))
    summary = {"status": "finished", "overrides": overrides, **summary}
    (folder / "summary.json").write_text(json.dumps(summary))
    if epochs:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in epochs))
    return folder


def write_multirun(root: Path, task: list[str], params: dict):
    """multirun.yaml: the command line's task overrides and the sweep config's sweeper params."""
    root.mkdir(parents=True, exist_ok=True)
    hydra = {"overrides": {"task": task}, "sweeper": {"params": params}}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


def write_per_image(folder: Path, labels, predictions, distances: dict | None = None, certified=None,
                    indices=None) -> Path:
    """attacks.csv (index, label, prediction, then each `<attack>_<norm>` distance column of `distances`)
    and, given `certified` radii, bounds.csv (index, label, prediction, certified_l2), as
    tulip.evaluate.final writes them: one row per image, floats as repr so inf stays inf."""
    indices = list(range(len(labels))) if indices is None else list(indices)
    images = {"index": indices, "label": list(labels), "prediction": list(predictions)}

    def write(name: str, columns: dict):
        with (folder / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(zip(*([repr(float(v)) if isinstance(v, float) else v for v in values]
                                   for values in columns.values())))

    if distances is not None:
        write("attacks", {**images, **distances})
    if certified is not None:
        write("bounds", {**images, "certified_l2": list(certified)})
    return folder
