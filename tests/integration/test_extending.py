"""Extending Tulip in one place: a new penalty is one class plus one composed option, nothing else;
and the metric keys the docs name are keys a run writes.

The class below is not part of Tulip; the option is registered the way an option file would add it.
It declares that it needs the input gradients with a graph (double backprop), so this also proves that
the objective computes what a part declares.
"""
import json
import math
import re

import pytest
import torch
from hydra.core.config_store import ConfigStore

from conftest import ROOT, compose_config
from tulip.main import run
from tulip.schema import NonNegative
from tulip.train.loss import Penalty, TrainingBatch


class InputGradientL1Penalty(Penalty):
    """λ · mean_i ‖∇ₓ ℓ_i‖₁: an L1 cousin of the gradient-norm penalties."""
    switch, needs_input_grad, needs_graph = "lam", True, True

    def __init__(self, lam: NonNegative = 0.0):  # its type is its schema: checked before training
        self.lam = float(lam)

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        return self.lam * batch.input_grad.flatten(1).abs().sum(1).mean()


# What conf/regularizer/grad_l1.yaml would hold (`# @package reg`).
ConfigStore.instance().store(group="regularizer", name="grad_l1", package="reg", node={
    "grad_l1": 0.05,
    "penalties": {"grad_l1": {"_target_": f"{__name__}.InputGradientL1Penalty", "lam": "${reg.grad_l1}"}},
})


def test_a_new_penalty_trains_through_run_and_combines_with_built_in_options(tmp_path):
    trained = ["regularizer=[J2,grad_l1]", "reg.decay=1e-4", "eval.bounds=false"]  # training is what is checked
    on = run(compose_config(*trained), tmp_path / "on")
    off = run(compose_config(*trained, "reg.grad_l1=0"), tmp_path / "off")
    assert on["train/penalty_grad_l1"] > 0 and math.isfinite(on["test/loss"])
    assert "train/penalty_decay" in on and "train/penalty_grad_l1" not in off  # 0 is off
    assert on["train/loss"] != off["train/loss"]  # it changed what was trained
    assert (tmp_path / "on" / "summary.json").exists()


def test_a_bad_value_of_the_new_option_names_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"reg\.grad_l1=-1 is invalid"):
        run(compose_config("regularizer=grad_l1", "reg.grad_l1=-1"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def documented_keys() -> set[str]:
    """The metric keys named in `backticks` in the README and docs/*.md and in the comments of conf/ and
    sweeps/."""
    texts = [(ROOT / "README.md").read_text()] + [path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))]
    texts += [path.read_text() for folder in ("conf", "sweeps") for path in (ROOT / folder).rglob("*.yaml")]
    families = "train|test|lipschitz|weights|model|time|best|attack|bounds|nn|summary"
    found = set()
    for text in texts:
        found |= set(re.findall(rf"`((?:{families})/[^`\s]*)`", text))
        # yaml comments name keys without backticks
        found |= {key for line in text.splitlines() if "#" in line
                  for key in re.findall(rf"\b((?:{families})/[\w<>@.*{{}},/]+)", line.split("#", 1)[1])}
    # config groups such as `model/activation` (model/activation=minmax) are no metric keys
    groups = {path.relative_to(ROOT / "conf").as_posix() for path in (ROOT / "conf").rglob("*") if path.is_dir()}
    return {key for key in found if key.split("=")[0] not in groups}


def as_pattern(documented: str) -> re.Pattern:
    """`nn/{l2,linf}_<stat>` -> a regex: {a,b} alternatives, <placeholder>, * and ... wildcards."""
    parts = re.split(r"(\{[^}]*\}|<[^>]*>|\*|\.\.\.)", documented.rstrip(",") if documented.endswith("...")
                     else documented.rstrip(".,"))
    regex = "".join("(?:" + "|".join(map(re.escape, p[1:-1].split(","))) + ")" if p.startswith("{")
                    else ".+" if p.startswith("<") or p in ("*", "...") else re.escape(p) for p in parts)
    return re.compile(regex + "$")


def test_every_documented_metric_key_is_written(tmp_path):
    """README, docs/ and yaml comments name only keys that a run really writes (here: a smooth model with the
    bounded head, every family of metrics switched on, then mode=summary)."""
    run(compose_config("model=mlp", "model.hidden=[]", "model.tanh=true", "regularizer=[lip,grad_l1]",
                       "attack=[ddn,fgsm,apgd_ce_l2,square_linf]", "attack.n=20", "attack.methods.ddn.steps=10",
                       "attack.methods.apgd_ce_l2.n_iter=5", "attack.methods.square_linf.n_queries=20",
                       "eval.nn=true"), tmp_path)
    run(compose_config("mode=summary", f"run_dir={tmp_path}"))
    written = set(json.loads((tmp_path / "summary.json").read_text()))
    written |= {key for line in (tmp_path / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    documented = documented_keys()
    assert len(documented) >= 25
    # a key, or a family such as `attack/best` whose keys are written
    missing = sorted(key for key in documented
                     if not any(as_pattern(key).match(w) or w.startswith(key + "/") for w in written))
    assert not missing, missing


def test_the_documented_key_patterns_expand_as_meant():
    assert as_pattern("nn/{l2,linf}_{mean,median}").match("nn/linf_median")
    assert as_pattern("attack/<name>/error_pct_<norm>@<eps>").match("attack/ddn/error_pct_l2@0.5")
    assert not as_pattern("attack/<name>/error_pct_<norm>@<eps>").match("attack/ddn/error_pct@0.5")
    assert as_pattern("attack/best/...").match("attack/best/median_l2")
