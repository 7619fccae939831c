"""The activations of Tulip's models, each a ``Nonlinearity``: 1-Lipschitz in L2, and switchable to its
linearization (``tulip.nn.models.linearized``) without knowing the architecture."""
import torch
import torch.nn.functional as F
from torch import nn


class Nonlinearity(nn.Module):
    """A 1-Lipschitz nonlinearity that ``linearized`` can replace by its linearization."""

    def __init__(self):
        super().__init__()
        self.linear = False  # set by `linearized`; a module flag, not configuration

    def nonlinear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linearization(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linearization(x) if self.linear else self.nonlinear(x)


class ReLU(Nonlinearity):
    """max(x, 0); linearized as the identity (the paper's convention)."""

    def nonlinear(self, x):
        return F.relu(x)

    def linearization(self, x):
        return x


class MinMax(Nonlinearity):
    """MaxMin, GroupSort with groups of 2 (Anil, Lucas & Grosse, "Sorting out Lipschitz function
    approximation", ICML 2019, arXiv 1811.05381): the channels (dim 1) in two halves a, b ->
    (max(a, b), min(a, b)). At every input it permutes its coordinates, so it is 1-Lipschitz in L2 and
    keeps gradient norms (ReLU halves them on average), which is why 1-Lipschitz networks use it.
    Linearized as the identity, as ReLU is. Needs an even number of channels."""

    def nonlinear(self, x):
        if x.shape[1] % 2:
            raise ValueError(f"MinMax pairs channels: it needs an even number of them, got {x.shape[1]}")
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def linearization(self, x):
        return x
