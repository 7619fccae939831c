"""What run folders saved by earlier versions spell differently: old `_target_` paths, checkpoint keys,
and config keys added since, with the value those runs trained with.

Every checkpoint (and a Hydra job's .hydra/config.yaml) holds the resolved config it was trained with,
`_target_` paths included. The package was once flat (`tulip.models.CNNSmall`, `tulip.data.mnist5k`,
`tulip.regularizers.PGDBatch`); run folders saved then must still resume, evaluate and appear in reports.
Rather than keep alias modules at the old paths, configs are rewritten once, where they are read back
(`RunFolder.load_checkpoint`, the report's reader), so that a resumed run compares equal to today's
config and nothing but this table remembers the old layout.
"""
import math

# old module -> the module that holds its classes and functions now
MOVED_MODULES = {
    "tulip.models": "tulip.nn.models",
    "tulip.perturbations": "tulip.nn.perturbations",
    "tulip.lipschitz": "tulip.nn.lipschitz",
    "tulip.step": "tulip.train.step",
    "tulip.objective": "tulip.train.loss",
    "tulip.regularizers": "tulip.train.regularizers",
    "tulip.gloro": "tulip.train.gloro",
    "tulip.evaluation": "tulip.evaluate.final",
    "tulip.attacks": "tulip.evaluate.attacks",
    "tulip.autoattack": "tulip.evaluate.autoattack",
    "tulip.bounds": "tulip.evaluate.bounds",
    "tulip.measures": "tulip.evaluate.measures",
    "tulip.neighbours": "tulip.evaluate.neighbours",
    "tulip.launcher": "tulip.launch.launcher",
    "tulip.sweeper": "tulip.launch.sweeper",
    "tulip.callbacks": "tulip.launch.callbacks",
}


def current_target(target: str) -> str:
    """`tulip.models.CNNSmall` -> `tulip.nn.models.CNNSmall`; any other path is returned as it is."""
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def upgrade_targets(config):
    """A copy of a saved (plain, resolved) config with every `_target_` at its current path."""
    if isinstance(config, dict):
        return {k: current_target(v) if k == "_target_" and isinstance(v, str) else upgrade_targets(v)
                for k, v in config.items()}
    if isinstance(config, list):
        return [upgrade_targets(v) for v in config]
    return config


# Config keys added after runs had been saved without them (dotted) -> the value those runs trained with:
# a run from before the validation split trained on the whole training set and selected on the test set;
# one from before GloRo's TRADES-style loss, the radius warm-up and the margin loss trained without them,
# one from before TRADES' norm with TRADES' L∞ adversary.
_NO_WARMUP = {"radius_start": 1.0, "radius_end": 1.0, "radius_until": 0.0}
ADDED_KEYS = {"precision": "fp32", "dataset.val_size": 0, "dataset.split_seed": 0, "select": "val/error_pct",
              "reg.gloro_trades": 0.0, "reg.margin": 0.0, "reg.radius_warmup": {"start": 1.0, "end": 1.0, "until": 0.0},
              "reg.trades.norm": math.inf, "reg.batches.trades.norm": math.inf,
              "reg.penalties.gloro.trades": 0.0, **{f"reg.penalties.gloro.{k}": v for k, v in _NO_WARMUP.items()},
              "reg.penalties.margin": {"_target_": "tulip.train.margin.MarginPenalty", "eps": 0.0, **_NO_WARMUP}}
# Keys added to some model options only: filled in where the saved model is that option.
ADDED_MODEL_KEYS = {"tulip.nn.models.CNN4C3F": {"activation": {"_target_": "tulip.nn.nonlinearities.ReLU",
                                                               "_partial_": True}}}


def with_added_keys(config: dict) -> dict:
    """A copy of a saved config with every key of ADDED_KEYS (and ADDED_MODEL_KEYS) it lacks, at the value
    it trained with."""
    config = dict(config)
    for dotted, value in ADDED_KEYS.items():
        *parents, last = dotted.split(".")
        node = config
        for parent in parents:
            if not isinstance(node.get(parent), dict):
                break
            node[parent] = node = dict(node[parent])
        else:
            node.setdefault(last, value)
    model = config.get("model")
    if isinstance(model, dict) and model.get("_target_") in ADDED_MODEL_KEYS:
        config["model"] = {**ADDED_MODEL_KEYS[model["_target_"]], **model}
    return config


# old checkpoint key -> today's: the training loss's state (its parts' kept state, e.g. GloRo's vectors)
RENAMED_CHECKPOINT_KEYS = {"objective": "loss"}


def upgrade_checkpoint(state: dict) -> dict:
    """A loaded checkpoint with today's keys, its config's `_target_`s at their current paths and the keys
    added since at the values it trained with."""
    for old, new in RENAMED_CHECKPOINT_KEYS.items():
        if old in state and new not in state:
            state[new] = state.pop(old)
    if isinstance(state.get("config"), dict):
        state["config"] = with_added_keys(upgrade_targets(state["config"]))
    return state
