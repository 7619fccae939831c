"""A test-only hook: Tulip with the test set's labels permuted, to show that no choice reads them.

    python tests/support/permuted_test_labels.py [run.py's overrides]   # Tulip's app, labels permuted

The test labels change every test metric; if any choice read them (the best epoch, and with it best.pt
and every figure of the final evaluation; a sweep's objectives, and with them the sampler's next
proposals), that choice would change too. tests/integration/test_selection.py and
tests/system/test_study.py compare a run, and a study, with and without it.
"""
from dataclasses import replace

import torch

import tulip.train.loop

PERMUTATION_SEED = 12345


def permute_test_labels(load_dataset):
    """`load_dataset` whose Data has its test labels shuffled among the test images (a fixed permutation)."""
    def load_with_permuted_test_labels(*args, **kwargs):
        data = load_dataset(*args, **kwargs)
        generator = torch.Generator().manual_seed(PERMUTATION_SEED)
        order = torch.randperm(len(data.test_y), generator=generator).to(data.test_y.device)
        return replace(data, test_y=data.test_y[order])
    return load_with_permuted_test_labels


def install(monkeypatch=None) -> None:
    """Permute the test labels of every run this process trains (with pytest's monkeypatch: for one test)."""
    patched = permute_test_labels(tulip.train.loop.load_dataset)
    if monkeypatch is None:
        tulip.train.loop.load_dataset = patched
    else:
        monkeypatch.setattr(tulip.train.loop, "load_dataset", patched)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's hydra_plugins, as for run.py
    from tulip.run import main

    install()
    main()
