"""Every metric key Tulip writes, in one place: producers format keys here, readers parse them here.

The keys are the names of the per-epoch rows of metrics.jsonl, of summary.json and of the W&B run:

    epoch, lr                               the epoch (W&B's x-axis) and the learning rate it trained with
    train/loss, train/error_pct             training-set averages of the epoch
    train/penalty_<name>                    each active penalty's term in the loss (its epoch average)
    val/error_pct, val/loss                 on the whole validation split (dataset.val_size images): what
                                            selects the best epoch
    test/error_pct, test/loss               on the whole test set (measured, never deciding)
    lipschitz/loss_grad_max, _mean          max / mean over test images of ‖∇ₓ loss_i‖₂
    lipschitz/jacobian_2inf                 max over test images of max_c ‖∇ₓ f_c(x)‖₂
    weights/product_2inf, _spectral         largest row norm / spectral norm of the linearized network
    weights/layer_norm_product              product of guaranteed bounds on the layers' operator norms: an
                                            upper bound, by theorem, on the logits' L2 Lipschitz constant
                                            (summary.json only: too slow per epoch on a ResNet)
    weights/layer_norm_estimate             the same product of power-iteration estimates (per epoch)
    model/tanh_scale                        the bounded head's t (model.tanh=true only)
    time/epoch_s                            wall time of the epoch, measurements included
    best/epoch, best/val_error_pct          the selected epoch: the lowest validation error (summary.json only)
    best/test_error_pct                     the selected epoch's test error (the one to report)
    test/lowest_error_pct                   the lowest test error of any epoch: optimistic, as the test set
                                            chose it; it decides nothing
    selection                               "val", or "test" when dataset.val_size=0 (the original protocol)
    ci95_low/<key>, ci95_high/<key>         the Wilson 95 % interval of an error rate over its images
    attack/<name>/median_<norm>, mean_<norm>, failures, time_s, error_pct_<norm>@<eps>
    attack/best/...                         the per-image best over all attacks, in every attacked norm
    attack/n, attack/clean_error_pct        how many images the evaluation used, and their error
    attack/split                            which split they come from: "test", or "val" (attack.split=val,
                                            for a sweep's robust objectives); the bounds use the same images
    bounds/<stat>                           lower-bound estimates; bounds/certified_median: the global
                                            certificate m/(√2·K), kept to compare with cert/median_l2
    cert/median_l2, cert/error_pct_l2@<eps> the certificate (pairwise, GloRo's form) and its error curve
    cert/tightness                          median best-attack L2 distance / certified radius (≥ 1)
    cert/lipschitz_upper, _feature_upper    guaranteed K of the logits, and K₋ of the last layer's input
    cert/lipschitz_estimate                 power-iteration estimate of K (not a bound), for comparison
    cert/pairwise                           1 when the pairwise form applied, 0 for the global fallback
    lipschitz/empirical_max                 largest ‖f(x)−f(x′)‖₂/‖x−x′‖₂ found: a lower bound on K
    lipschitz/upper_over_lower              cert/lipschitz_upper / lipschitz/empirical_max (≥ 1)
    nn/<norm>_<stat>                        nearest differently-labelled training image
    summary/<stat>                          mode=summary's statistics of the best checkpoint
    wandb/run_id, run_path, run_name, group the training job's W&B run (summary.json only; absent when
                                            W&B is disabled or did not start): not metrics, but how the
                                            W&B runs of mode=evaluate and mode=summary join its group

A robust-error key ``…error_pct…@<eps>`` holds the % of evaluated images whose distance (adversarial, or
certified radius) is ≤ eps; eps is written with ``%g`` (0.5, 1, 0.0313725). Older runs wrote the
certified curve as ``bounds/certified_error_pct@<eps>``; readers still parse it.
"""
import re
from typing import NamedTuple

NORMS = ("l2", "linf")  # the perturbation norms attacks minimise or are budgeted in

EPOCH = "epoch"
LR = "lr"
TRAIN_LOSS = "train/loss"
TRAIN_ERROR = "train/error_pct"
TEST_ERROR = "test/error_pct"
TEST_LOSS = "test/loss"
VAL_ERROR = "val/error_pct"
VAL_LOSS = "val/loss"
LOSS_GRAD_MAX = "lipschitz/loss_grad_max"
LOSS_GRAD_MEAN = "lipschitz/loss_grad_mean"
JACOBIAN_2INF = "lipschitz/jacobian_2inf"
PRODUCT_2INF = "weights/product_2inf"
PRODUCT_SPECTRAL = "weights/product_spectral"
LAYER_NORM_PRODUCT = "weights/layer_norm_product"
LAYER_NORM_ESTIMATE = "weights/layer_norm_estimate"
TANH_SCALE = "model/tanh_scale"
EPOCH_TIME = "time/epoch_s"
# Where a run's time went (seconds), in summary.json: python -m tulip.bench startup reads them.
SETUP_TIME = "time/setup_s"  # data, model, training loss, optimizer: after the imports, before W&B
WANDB_INIT_TIME = "time/wandb_init_s"
TRAIN_TIME = "time/train_s"  # the epochs of this attempt, their per-epoch measurements and checkpoints
EPOCHS_TIME = "time/epochs_s"  # every epoch's time/epoch_s summed, over all attempts: a resumed run's whole cost
FINAL_MEASURE_TIME = "time/final_measure_s"  # the summary's whole-test-set figures, guaranteed bound included
ATTACK_TIME = "time/attacks_s"  # the final evaluation's parts (a re-evaluation replaces those it redoes)
BOUNDS_TIME = "time/bounds_s"  # the lower bounds and the certificate
NN_TIME = "time/nn_s"
BEST_TEST_ERROR = "best/test_error_pct"
BEST_VAL_ERROR = "best/val_error_pct"
BEST_EPOCH = "best/epoch"
LOWEST_TEST_ERROR = "test/lowest_error_pct"
SELECTION = "selection"  # the split that chose the best epoch
# The training job's W&B run (tulip.runs.tracking.Tracker.identity), in summary.json.
WANDB_PREFIX = "wandb/"
WANDB_RUN_ID = "wandb/run_id"
WANDB_RUN_PATH = "wandb/run_path"  # entity/project/id (an offline run: project/id)
WANDB_RUN_NAME = "wandb/run_name"
WANDB_GROUP = "wandb/group"

# Families logged once per epoch (W&B plots them against `epoch`).
EPOCH_PREFIXES = ("train/", "val/", "test/", "lipschitz/", "weights/", "model/", "time/")
# Families of the final evaluation; mode=evaluate replaces a family it recomputes.
ATTACK_PREFIX, BOUNDS_PREFIX, CERT_PREFIX, NN_PREFIX = "attack/", "bounds/", "cert/", "nn/"

ATTACKED_IMAGES = "attack/n"
ATTACKED_CLEAN_ERROR = "attack/clean_error_pct"
ATTACKED_SPLIT = "attack/split"
BEST_ATTACK = "best"  # the attack name of the per-image best over all attacks

BOUNDS_GRAD_NORM_MAX = "bounds/grad_norm_max"
BOUNDS_FIRST_ORDER_MEDIAN = "bounds/first_order_median"
BOUNDS_SECOND_ORDER_MEDIAN = "bounds/second_order_median"
BOUNDS_HESSIAN_NORM_MAX = "bounds/hessian_norm_max"
BOUNDS_CERTIFIED_MEDIAN = "bounds/certified_median"  # the global form m/(√2·K), for comparison

CERT_MEDIAN = "cert/median_l2"
CERTIFIED_ERROR_STEM = "cert/error_pct_l2"
LEGACY_CERTIFIED_ERROR_STEM = "bounds/certified_error_pct"  # older runs' certified curve
CERT_TIGHTNESS = "cert/tightness"
CERT_LIPSCHITZ_UPPER = "cert/lipschitz_upper"
CERT_FEATURE_LIPSCHITZ_UPPER = "cert/lipschitz_feature_upper"
CERT_LIPSCHITZ_ESTIMATE = "cert/lipschitz_estimate"
CERT_PAIRWISE = "cert/pairwise"
CERT_CURVE = "cert/certified_error"  # the W&B table of the certified-error curve
ATTACK_PER_IMAGE = "attack/per_image"  # the W&B table of attacks.csv
LIPSCHITZ_EMPIRICAL_MAX = "lipschitz/empirical_max"
LIPSCHITZ_UPPER_OVER_LOWER = "lipschitz/upper_over_lower"
# What eval.bounds writes: mode=evaluate replaces these (the lipschitz/ keys one by one: that family
# also holds per-epoch measurements).
BOUNDS_FAMILIES = (BOUNDS_PREFIX, CERT_PREFIX, LIPSCHITZ_EMPIRICAL_MAX, LIPSCHITZ_UPPER_OVER_LOWER)


def error_key(split: str) -> str:
    """A split's error rate per epoch: ``val/error_pct`` or ``test/error_pct``."""
    return f"{split}/error_pct"


def loss_key(split: str) -> str:
    return f"{split}/loss"


def penalty(name: str) -> str:
    """A penalty's term in the training loss: ``train/penalty_<name>``."""
    return f"train/penalty_{name}"


def eps_text(eps: float) -> str:
    return f"{float(eps):g}"


def attack(name: str, stat: str) -> str:
    """``attack/<name>/<stat>``, e.g. attack("ddn", "time_s"); ``*`` works as a glob."""
    return f"attack/{name}/{stat}"


def attack_median(name: str, norm: str) -> str:
    return attack(name, f"median_{norm}")


def attack_mean(name: str, norm: str) -> str:
    return attack(name, f"mean_{norm}")


def attack_failures(name: str) -> str:
    return attack(name, "failures")


def attack_time(name: str) -> str:
    return attack(name, "time_s")


def robust_error_stem(name: str, norm: str) -> str:
    """The key of a robust-error curve without its ``@<eps>``: ``attack/<name>/error_pct_<norm>``."""
    return attack(name, f"error_pct_{norm}")


def robust_error(name: str, norm: str, eps: float) -> str:
    """% of images an attack fooled within eps: ``attack/<name>/error_pct_<norm>@<eps>``."""
    return f"{robust_error_stem(name, norm)}@{eps_text(eps)}"


def certified_error(eps: float) -> str:
    """% of images not certified at L2 radius eps (misclassified included): ``cert/error_pct_l2@<eps>``."""
    return f"{CERTIFIED_ERROR_STEM}@{eps_text(eps)}"


def epoch_certified_error(split: str, eps: float) -> str:
    """A split's certified error at L2 radius eps, per epoch (eval.certify): ``val/cert_error_pct_l2@<eps>``."""
    return f"{split}/cert_error_pct_l2@{eps_text(eps)}"


# The 95 % interval of an error rate over images (Wilson), next to the rate: ``ci95_low/<key>`` and
# ``ci95_high/<key>``, in percent like the rate itself.
INTERVAL_PREFIXES = ("ci95_low/", "ci95_high/")


def interval_keys(key: str) -> tuple[str, str]:
    """The keys of `key`'s 95 % interval: (``ci95_low/<key>``, ``ci95_high/<key>``)."""
    return tuple(prefix + key for prefix in INTERVAL_PREFIXES)


def interval_of(key: str) -> tuple[str, str] | None:
    """(bound, rate key) for an interval key (bound "low" or "high"), None for any other key."""
    for prefix in INTERVAL_PREFIXES:
        if key.startswith(prefix):
            return prefix[len("ci95_"):-1], key[len(prefix):]
    return None


def epochs_time(history: list[dict]) -> float:
    """EPOCHS_TIME of a run's metrics.jsonl rows: seconds of training, per-epoch measurements and
    checkpoints over every epoch, all attempts included (time/train_s counts the last attempt's)."""
    return sum(row.get(EPOCH_TIME, 0.0) for row in history)


def is_error_rate(key: str) -> bool:
    """A rate of misclassified (or uncertified, or attacked) images in percent, which gets a 95 % interval:
    every ``*error_pct*`` key (``val/error_pct``, ``attack/<name>/error_pct_l2@1``, ``cert/error_pct_l2@0.3``,
    ``best/test_error_pct``), not the interval keys themselves."""
    return "error_pct" in key and interval_of(key) is None


def neighbours(norm: str, stat: str) -> str:
    return f"nn/{norm}_{stat}"


def summary(stat: str) -> str:
    return f"summary/{stat}"


# --- the per-image columns of attacks.csv and bounds.csv --------------------------------------------

# bounds.csv: the certified L2 radius (its curve is cert/error_pct_l2@<eps>), the global certificate kept
# for comparison, and the first/second-order estimates (lower-bound guesses, not attacks). Older runs
# wrote them into attacks.csv.
CERTIFIED_COLUMN = "certified_l2"
CERTIFIED_GLOBAL_COLUMN = "certified_global_l2"
FIRST_ORDER_COLUMN = "first_order_l2"
SECOND_ORDER_COLUMN = "second_order_l2"
BOUNDS_COLUMNS = (CERTIFIED_COLUMN, CERTIFIED_GLOBAL_COLUMN, FIRST_ORDER_COLUMN, SECOND_ORDER_COLUMN)


class DistanceColumn(NamedTuple):
    """An attacks.csv column of per-image distances: `<attack>_<norm>` (the attack, or "best")."""
    attack: str
    norm: str  # one of NORMS

    def __str__(self) -> str:
        return f"{self.attack}_{self.norm}"


_DISTANCE_COLUMN = re.compile(rf"^(?P<attack>.+)_(?P<norm>{'|'.join(NORMS)})$")


def distance_column(attack_name: str, norm: str) -> str:
    """The attacks.csv column of an attack's per-image distances in `norm`: ``<attack>_<norm>``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return str(DistanceColumn(attack_name, norm))


def parse_distance_column(column: str) -> DistanceColumn | None:
    """The attack and norm of an attacks.csv distance column; None for the image's own columns (index,
    label, prediction) and the bounds' columns older runs wrote there."""
    match = _DISTANCE_COLUMN.match(column)
    if match is None or column in BOUNDS_COLUMNS:
        return None
    return DistanceColumn(match["attack"], match["norm"])


# Globs for the report's default columns and plots: attacks, the certificate, older runs' certificate.
ROBUST_ERROR_GLOBS = (attack("*", "error_pct*@*"), f"{CERTIFIED_ERROR_STEM}@*", f"{LEGACY_CERTIFIED_ERROR_STEM}@*")


class RobustErrorKey(NamedTuple):
    attack: str  # the attack's name, "best", or "certified" for the certificate
    norm: str  # "l2", "linf", or "" for a key written without its norm
    eps: str  # as written in the key
    stem: str  # the key without "@<eps>"

    @property
    def eps_value(self) -> float:
        try:
            return float(self.eps)
        except ValueError:
            return float("inf")


# attack/<name>/error_pct_<norm>@<eps> (older runs: without _<norm>), cert/error_pct_l2@<eps> and older
# runs' bounds/certified_error_pct@<eps>.
_ROBUST_ERROR = re.compile(r"^(?:attack/(?P<attack>[^/]+)/|(?P<certified>cert/|bounds/certified_))"
                           r"error_pct(?:_(?P<norm>[a-z0-9]+))?@(?P<eps>.+)$")


def canonical(key: str) -> str:
    """A key as Tulip writes it: a robust-error key's eps in ``%g`` form (``…@1.0`` → ``…@1``)."""
    parts = parse_robust_error(key)
    if parts is None or parts.eps_value == float("inf"):
        return key
    return f"{parts.stem}@{eps_text(parts.eps_value)}"


def parse_robust_error(key: str) -> RobustErrorKey | None:
    """The parts of a robust-error or certified-error key, None for any other key."""
    match = _ROBUST_ERROR.match(key)
    if match is None:
        return None
    certified = match["certified"] is not None
    return RobustErrorKey(attack="certified" if certified else match["attack"],
                          norm="l2" if certified else (match["norm"] or ""),
                          eps=match["eps"], stem=key.split("@")[0])


# Every fixed key above that holds one number (not the prefixes, stems, tables or W&B names, nor epoch
# and lr): what `objectives` may name besides the patterned keys.
FIXED_KEYS = frozenset((
    TRAIN_LOSS, TRAIN_ERROR, TEST_ERROR, TEST_LOSS, VAL_ERROR, VAL_LOSS,
    LOSS_GRAD_MAX, LOSS_GRAD_MEAN, JACOBIAN_2INF,
    PRODUCT_2INF, PRODUCT_SPECTRAL, LAYER_NORM_PRODUCT, LAYER_NORM_ESTIMATE, TANH_SCALE,
    EPOCH_TIME, EPOCHS_TIME, SETUP_TIME, TRAIN_TIME, FINAL_MEASURE_TIME, ATTACK_TIME, BOUNDS_TIME, NN_TIME,
    BEST_TEST_ERROR, BEST_VAL_ERROR, BEST_EPOCH, LOWEST_TEST_ERROR,
    ATTACKED_IMAGES, ATTACKED_CLEAN_ERROR,
    BOUNDS_GRAD_NORM_MAX, BOUNDS_FIRST_ORDER_MEDIAN, BOUNDS_SECOND_ORDER_MEDIAN, BOUNDS_HESSIAN_NORM_MAX,
    BOUNDS_CERTIFIED_MEDIAN,
    CERT_MEDIAN, CERT_TIGHTNESS, CERT_LIPSCHITZ_UPPER, CERT_FEATURE_LIPSCHITZ_UPPER, CERT_LIPSCHITZ_ESTIMATE,
    CERT_PAIRWISE,
    LIPSCHITZ_EMPIRICAL_MAX, LIPSCHITZ_UPPER_OVER_LOWER,
))
_ATTACK_DISTANCE = re.compile(r"^attack/[^/]+/(median|mean)_[a-z0-9]+$")


def is_scalar_key(key: str) -> bool:
    """A key that names one number of a run: a fixed key, an attack's distance or a robust-error key."""
    return key in FIXED_KEYS or bool(_ATTACK_DISTANCE.match(key)) or parse_robust_error(key) is not None
