"""Through the real training and final evaluation, for each regularizer family on the certifiable 4C3F and
for the 1-Lipschitz models: no attack of the ensemble finds an adversarial inside a certified radius."""
import csv

import pytest

from conftest import compose_config
from tulip.main import run


# (model, regularizer, strengths): every regularizer family on the certifiable 4C3F, GloRo's recipe on its
# MinMax version, and the 1-Lipschitz models with the margin loss. GloRo and the margin at small radii: on
# these tiny runs their default radii leave few images correct.
CASES = [*[("cnn_4c3f", regularizer, []) for regularizer in ["none", "lip", "J2", "pgd_l2", "trades", "gradnorm_fd"]],
         ("cnn_4c3f", "gloro", ["reg.gloro=0.1"]),
         ("cnn_4c3f", "gloro_trades", ["model/activation=minmax", "reg.gloro=0.1"]),
         ("aol_4c3f", "margin", ["reg.margin=0.1"]),
         ("sll", "margin", ["reg.margin=0.1", "model.blocks=1"])]


@pytest.mark.slow
@pytest.mark.parametrize("model, regularizer, strengths", CASES, ids=[f"{m}-{r}" for m, r, _ in CASES])
def test_no_attack_of_the_ensemble_lands_inside_a_certified_radius(tmp_path, model, regularizer, strengths):
    """Through the real training and evaluation: every per-image distance that the AutoAttack members, DDN
    and FMN find (attacks.csv) is at least the certified radius (bounds.csv)."""
    run(compose_config(f"model={model}", "model.channels=[8,16]", "model.hidden=64", "dataset.train_subset=2048",
                       "optim=adam", "epochs=2", f"regularizer={regularizer}", *strengths,
                       "attack=[autoattack_fast_l2,square_l2,ddn,fmn_l2]", "attack.n=16",
                       "attack.epsilons.l2=[0.1,0.5,2.0]", "attack.methods.square_l2.n_queries=100",
                       "attack.methods.ddn.steps=20", "attack.methods.fmn_l2.steps=20"), tmp_path)

    def read(name):
        with open(tmp_path / f"{name}.csv") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    found, certified_rows = read("attacks"), read("bounds")
    members = ["apgd_ce_l2", "apgd_t_l2", "fab_t_l2", "square_l2", "ddn", "fmn_l2", "best"]
    assert {f"{m}_l2" for m in members} <= set(found[0])
    assert sum(row["certified_l2"] > 0 for row in certified_rows) >= 4  # radii an attack could violate
    for attacked, bound in zip(found, certified_rows):
        for member in members:
            assert attacked[f"{member}_l2"] >= bound["certified_l2"] * (1 - 1e-6), (member, attacked, bound)
