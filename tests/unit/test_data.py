"""The dataset loaders: the embedded mnist5k split, and the real torchvision loaders on small files
written in the real on-disk formats (MNIST idx files, CIFAR python pickle batches)."""
import pickle
import struct

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST

from conftest import compose_config
from tulip.data import crop_and_flip, load_dataset
from tulip.schema import ConfigError

CPU = torch.device("cpu")


def test_mnist5k_is_a_stratified_seeded_split_into_train_validation_and_test():
    data = load_dataset(compose_config(tiny=False).dataset, CPU)
    assert data.train_x.shape == (3500, 1, 28, 28) and data.val_x.shape == (500, 1, 28, 28)
    assert data.test_x.shape == (1000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32
    assert 0 <= data.train_x.min() and data.train_x.max() <= 1 and data.train_x.max() > 0.99
    assert torch.bincount(data.train_y, minlength=10).tolist() == [350] * 10
    assert torch.bincount(data.val_y, minlength=10).tolist() == [50] * 10
    assert torch.bincount(data.test_y, minlength=10).tolist() == [100] * 10
    # no image is in two splits
    seen = {}
    for split in ("train", "val", "test"):
        for row in data.split(split)[0].flatten(1):
            assert seen.setdefault(row.numpy().tobytes(), split) == split
    again = load_dataset(compose_config(tiny=False).dataset, CPU)
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(data.split(split), again.split(split)))
    other = load_dataset(compose_config("dataset.split_seed=1", tiny=False).dataset, CPU)
    assert not torch.equal(data.test_y, other.test_y) and not torch.equal(data.val_x, other.val_x)


def test_the_validation_split_is_carved_from_the_training_set_and_zero_keeps_the_original_split():
    original = load_dataset(compose_config("dataset.val_size=0", tiny=False).dataset, CPU)
    assert original.train_x.shape[0] == 4000 and len(original.val_y) == 0
    carved = load_dataset(compose_config(tiny=False).dataset, CPU)
    assert torch.equal(carved.test_x, original.test_x)  # the test set does not move
    # train + validation is the original training set, each part in its original order
    is_val = torch.zeros(4000, dtype=torch.bool)
    rows = {row.numpy().tobytes(): i for i, row in enumerate(original.train_x.flatten(1))}
    val_rows = [rows[row.numpy().tobytes()] for row in carved.val_x.flatten(1)]
    is_val[val_rows] = True
    assert val_rows == sorted(val_rows) and torch.equal(carved.train_x, original.train_x[~is_val])
    # a training subset (a test's shortcut) never changes which images validate
    subset = load_dataset(compose_config("dataset.train_subset=300", tiny=False).dataset, CPU)
    assert torch.equal(subset.val_x, carved.val_x) and torch.equal(subset.train_x, carved.train_x[:300])


def test_a_validation_split_as_large_as_the_training_set_names_the_key():
    with pytest.raises(ConfigError, match=r"dataset.val_size=4000 .*\[0, 3999\]"):
        load_dataset(compose_config("dataset.val_size=4000", tiny=False).dataset, CPU)


def test_subsets_keep_every_class():
    data = load_dataset(compose_config("dataset.train_subset=200", "dataset.test_subset=100").dataset,
                        CPU)
    assert len(data.train_y) == 200 and len(data.test_y) == 100
    assert len(torch.unique(data.train_y)) == 10


def write_idx(path, array: np.ndarray):
    """IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_files(root, dataset_class, n_train=30, n_test=20):
    raw = root / dataset_class.__name__ / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("option, dataset_class", [("mnist", MNIST), ("fashion_mnist", FashionMNIST)])
def test_mnist_like_loaders_read_idx_files(tmp_path, option, dataset_class):
    arrays = write_mnist_files(tmp_path, dataset_class)
    cfg = compose_config(f"dataset={option}", f"dataset.root={tmp_path}", "dataset.val_size=0", tiny=False)
    data = load_dataset(cfg.dataset, CPU)
    images, labels = arrays["train"]
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (20, 1, 28, 28)
    assert torch.allclose(data.train_x[:, 0] * 255, torch.from_numpy(images).float())
    assert data.train_y.tolist() == labels.tolist()
    # the default validation split (5,000 of the real 60,000) does not fit these 30 images: named early
    with pytest.raises(ConfigError, match=r"dataset.val_size=5000 .*\[0, 29\]"):
        load_dataset(compose_config(f"dataset={option}", f"dataset.root={tmp_path}", tiny=False).dataset, CPU)
    carved = load_dataset(compose_config(f"dataset={option}", f"dataset.root={tmp_path}", "dataset.val_size=10",
                                         tiny=False).dataset, CPU)
    assert (len(carved.train_y), len(carved.val_y), len(carved.test_y)) == (20, 10, 20)
    assert data.num_classes == 10
    assert torch.equal(data.augment(data.train_x), data.train_x)


def write_cifar_files(root, dataset_class, n_train=25, n_test=10):
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if dataset_class is CIFAR10 else "fine_labels"
    num_classes = 10 if dataset_class is CIFAR10 else 100
    train_files = [name for name, _ in dataset_class.train_list]
    per_file = -(-n_train // len(train_files))
    expected = {"train": [], "test": []}
    for split, names, n in (("train", train_files, per_file), ("test", [name for name, _ in dataset_class.test_list], n_test)):
        for name in names:
            # a batch: 'data' is (n, 3072) uint8, channel-major rows of 32x32 images
            images = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
            labels = list(rng.integers(0, num_classes, n))
            with open(folder / name, "wb") as f:
                pickle.dump({"data": images, label_key: labels}, f)
            expected[split].append((images, labels))
    meta_key = "label_names" if dataset_class is CIFAR10 else "fine_label_names"
    with open(folder / dataset_class.meta["filename"], "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(num_classes)]}, f)
    return expected, num_classes


@pytest.mark.parametrize("option, dataset_class", [("cifar10", CIFAR10), ("cifar100", CIFAR100)])
def test_cifar_loaders_read_pickle_batches(tmp_path, monkeypatch, option, dataset_class):
    expected, num_classes = write_cifar_files(tmp_path, dataset_class)
    # Our files are in the real format but are not the real bytes: drop the md5 table, keep the loader.
    monkeypatch.setattr(dataset_class, "train_list", [[n, None] for n, _ in dataset_class.train_list])
    monkeypatch.setattr(dataset_class, "test_list", [[n, None] for n, _ in dataset_class.test_list])
    monkeypatch.setattr(dataset_class, "meta", {**dataset_class.meta, "md5": None})
    data = load_dataset(compose_config(f"dataset={option}", f"dataset.root={tmp_path}", "dataset.val_size=0",
                                       tiny=False).dataset, CPU)
    first_images, first_labels = expected["train"][0]
    assert data.train_x.shape[1:] == (3, 32, 32) and data.num_classes == num_classes
    assert torch.allclose(data.train_x[0] * 255,
                          torch.from_numpy(first_images[0].reshape(3, 32, 32)).float())
    assert data.train_y[: len(first_labels)].tolist() == [int(v) for v in first_labels]
    assert data.test_x.shape[0] == 10


@pytest.mark.parametrize("option", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_files_name_the_folder_and_the_flag(tmp_path, option):
    cfg = compose_config(f"dataset={option}", f"dataset.root={tmp_path / 'nowhere'}", tiny=False)
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(cfg.dataset, CPU)
    assert str(tmp_path / "nowhere") in str(error.value)
    assert "dataset.download=true" in str(error.value)


def test_crop_and_flip_shifts_and_flips_whole_images():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    out = crop_and_flip(x)
    assert out.shape == x.shape
    for image, augmented in zip(x, out):
        # the crop of the zero-padded image must appear in it, possibly mirrored
        padded = torch.nn.functional.pad(image, (4,) * 4)
        windows = padded.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
        candidates = windows.permute(1, 2, 0, 3, 4).reshape(-1, 3, 32, 32)
        match = (candidates == augmented).flatten(1).all(1) | (candidates.flip(-1) == augmented).flatten(1).all(1)
        assert match.any()
    assert not torch.equal(out, x)
