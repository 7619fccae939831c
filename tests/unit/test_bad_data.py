"""Bad data fails when it is loaded, before training, with one error naming the dataset and the problem:
NaN/Inf pixels, pixels outside [0, 1], labels outside the classes, wrong dtypes or shapes, an empty
split, and a training set smaller than one batch."""
import json

import pytest
import torch
from torchvision.datasets import MNIST

from conftest import compose_config
from test_data import write_mnist_files
from tulip.data import Data, check_data, load_dataset, mnist5k, no_augmentation
from tulip.main import run

CPU = torch.device("cpu")


def small_data(**changes) -> Data:
    """6 train and 4 test 1x4x4 images of 3 classes, valid until `changes` replace a field."""
    generator = torch.Generator().manual_seed(0)
    fields = dict(train_x=torch.rand(6, 1, 4, 4, generator=generator), train_y=torch.tensor([0, 1, 2, 0, 1, 2]),
                  test_x=torch.rand(4, 1, 4, 4, generator=generator), test_y=torch.tensor([2, 1, 0, 2]),
                  num_classes=3, augment=no_augmentation)
    return Data(**{**fields, **changes})


def with_pixel(x: torch.Tensor, image: int, value: float) -> torch.Tensor:
    x = x.clone()
    x[image, 0, 1, 2] = value
    return x


VALID = small_data()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("changes, expected", [
    (dict(train_x=with_pixel(VALID.train_x, 3, NAN)),
     r"train_x holds NaN/Inf pixels in 1 of 6 images \(the first: image 3\); pixels must be finite and in \[0, 1"),
    (dict(test_x=with_pixel(VALID.test_x, 2, INF)),
     r"test_x holds NaN/Inf pixels in 1 of 4 images \(the first: image 2\)"),
    (dict(train_x=with_pixel(VALID.train_x, 1, -INF)), r"train_x holds NaN/Inf pixels in 1 of 6 images"),
    (dict(train_x=with_pixel(VALID.train_x, 4, 1.5)),
     r"train_x holds pixels in \[0\.?\d*, 1\.5\] in 1 of 6 images \(the first: image 4\)"),
    (dict(test_x=(VALID.test_x - 0.5) / 0.25),
     r"test_x holds pixels in \[-1\.\d+, 1\.\d+\] in 4 of 4 images .*not normalised"),
    (dict(train_y=torch.tensor([0, 1, 2, 3, 1, 2])),
     r"train_y holds labels in \[0, 3\] \(the first outside: image 3\), expected labels of the 3 classes, 0 to 2"),
    (dict(test_y=torch.tensor([2, -1, 0, 2])), r"test_y holds labels in \[-1, 2\] \(the first outside: image 1\)"),
    (dict(train_y=VALID.train_y.float()), r"train_y is torch.float32 \(6,\), expected int64 labels"),
    (dict(test_y=VALID.test_y[:3]), r"test_y is torch.int64 \(3,\), expected int64 labels \(4,\), one per image"),
    (dict(train_x=(VALID.train_x * 255).to(torch.uint8)), r"train_x is torch.uint8 \(6, 1, 4, 4\), expected float32"),
    (dict(test_x=VALID.test_x[:0], test_y=VALID.test_y[:0]), r"the test set is empty"),
    (dict(test_x=torch.rand(4, 3, 4, 4)), r"train images are \(1, 4, 4\) but test images \(3, 4, 4\)"),
    (dict(num_classes=1), r"num_classes=1, expected an integer >= 2"),
])
def test_check_data_names_the_dataset_and_the_problem(changes, expected):
    check_data(VALID, "tiny")  # the same data without the change is fine
    with pytest.raises(ValueError, match=rf"^dataset tiny: {expected}"):
        check_data(small_data(**changes), "tiny")


def test_pixels_of_exactly_0_and_1_are_fine():
    x = VALID.train_x.clone()
    x[0], x[1] = 0.0, 1.0
    check_data(small_data(train_x=x), "tiny")


def test_labels_outside_the_classes_in_real_mnist_files(tmp_path):
    write_mnist_files(tmp_path, MNIST)
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[8 + 5] = 12  # the idx header is 8 bytes; image 5 of the test set gets label 12 of 10 classes
    labels.write_bytes(bytes(raw))
    cfg = compose_config("dataset=mnist", f"dataset.root={tmp_path}", "dataset.val_size=10", tiny=False)
    with pytest.raises(ValueError, match=r"^dataset tulip\.data\.mnist: test_y holds labels in \[0, 12\] "
                                         r"\(the first outside: image 5\)"):
        load_dataset(cfg.dataset, CPU)


def corrupted_mnist5k(problem: str, **mnist5k_arguments) -> Data:
    """mnist5k (with the config's subsets) with one problem: a loader for `dataset._target_`."""
    data = mnist5k(**mnist5k_arguments)
    train_x, train_y, test_x, test_y = data.train_x.clone(), data.train_y.clone(), data.test_x, data.test_y
    if problem == "nan_pixel":
        train_x[7, 0, 10, 10] = NAN
    elif problem == "inf_pixel":
        test_x = with_pixel(test_x, 0, INF)
    elif problem == "normalised":
        train_x = (train_x - 0.1307) / 0.3081  # MNIST's usual mean and std
    elif problem == "label_10":
        train_y[11] = 10
    elif problem == "ten_images":
        train_x, train_y = train_x[:10], train_y[:10]
    elif problem == "no_test_images":
        test_x, test_y = test_x[:0], test_y[:0]
    return Data(train_x, train_y, test_x, test_y, data.num_classes, data.augment)


def corrupted(problem: str, *overrides: str):
    return compose_config("dataset._target_=test_bad_data.corrupted_mnist5k", f"+dataset.problem={problem}",
                          *overrides)


CORRUPTED = r"^dataset test_bad_data\.corrupted_mnist5k: "


@pytest.mark.parametrize("problem, message", [
    ("nan_pixel", CORRUPTED + r"train_x holds NaN/Inf pixels in 1 of 512 images \(the first: image 7\)"),
    ("inf_pixel", CORRUPTED + r"test_x holds NaN/Inf pixels in 1 of 200 images \(the first: image 0\)"),
    ("normalised", CORRUPTED + r"train_x holds pixels in \[-0\.4242, 2\.821\] in 512 of 512 images"),
    ("label_10", CORRUPTED + r"train_y holds labels in \[0, 10\] \(the first outside: image 11\)"),
    ("no_test_images", CORRUPTED + r"the test set is empty"),
    # a training set smaller than one batch: no step could be taken
    ("ten_images", r"^batch_size=64 is invalid: expected at most the training set's size .*only 10 training images"),
])
def test_bad_data_fails_before_training(problem, message, tmp_path):
    with pytest.raises(ValueError, match=message) as error:
        run(corrupted(problem), tmp_path)
    assert error.value.__cause__ is None
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epoch"] == 0
    assert str(error.value) in summary["error"]


def test_the_same_loader_without_a_problem_trains(tmp_path):
    run(corrupted("none", "dataset.train_subset=128", "dataset.test_subset=50", "eval.bounds=false"), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"


def test_ten_images_train_with_a_batch_that_fits(tmp_path):
    run(corrupted("ten_images", "batch_size=10", "dataset.test_subset=50", "eval.bounds=false"), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
