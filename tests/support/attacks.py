"""The attack options of conf/attack/ and a small model to attack, for tests/unit/test_attacks.py and
tests/unit/test_autoattack.py."""
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tulip.data import mnist5k
from tulip.nn.models import MLP

ATTACK_DIR = Path(__file__).resolve().parents[2] / "conf" / "attack"
NOT_ATTACKS = {"none", "default"}
# The Foolbox options: those built by tulip.evaluate.attacks (the AutoAttack ones: tests/unit/test_autoattack.py).
ATTACK_NAMES = sorted(p.stem for p in ATTACK_DIR.glob("*.yaml") if p.stem not in NOT_ATTACKS
                      and str(OmegaConf.load(p).get("_target_", "")).startswith("tulip.evaluate.attacks."))


def attack_config(name: str) -> dict:
    """conf/attack/<name>.yaml without its defaults list and Hydra header."""
    cfg = OmegaConf.to_container(OmegaConf.load(ATTACK_DIR / f"{name}.yaml"))
    cfg.pop("defaults", None)
    return cfg


def trained_mlp_and_images() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A linear-ish MLP after one quick epoch on mnist5k, and 24 test images, 3 of them misclassified
    on purpose (their labels are changed)."""
    torch.manual_seed(0)
    digits = mnist5k(train_subset=2000, val_size=0)
    model = MLP(1, 10, 28, hidden=[32])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for start in range(0, 2000, 100):
        loss = F.cross_entropy(model(digits.train_x[start:start + 100]), digits.train_y[start:start + 100])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = digits.test_x[:40]
    predicted = model(x).argmax(1)
    keep = (predicted == digits.test_y[:40]).nonzero().squeeze(1)[:24]  # correctly classified ones
    x, y = x[keep], predicted[keep].clone()
    y[:3] = (y[:3] + 1) % 10  # now misclassified
    return model, x, y
