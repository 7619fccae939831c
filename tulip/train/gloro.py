"""GloRo certified training (Leino, Wang & Fredrikson, "Globally-Robust Neural Networks", ICML 2021,
arXiv 2102.08452): train *through* the certificate.

For a network f = W·h(x) + b whose body h is K₋-Lipschitz in L2, the logit gap f_j − f_i can change by at
most ε·K₋·‖w_j − w_i‖₂ inside an L2 ball of radius ε. GloRo adds a logit ⊥ to the predicted class j's
competitors, f_⊥ = max_{i≠j} f_i + ε·K₋·‖w_i − w_j‖₂, and trains with cross-entropy on [f, f_⊥]: the loss
is low only where the prediction is the label *and* certified at radius ε. Here that is a penalty, the
extra loss mean CE([f, f_⊥]) − mean CE(f), so it composes with the other parts (reg.lip, reg.decay).

K₋ must be differentiable and cheap per step: each layer's norm is a power-iteration estimate whose
vectors persist across steps (one iteration per step after a converged start) and go into the checkpoint,
and σ = uᵀ W v (u, v fixed) carries the gradient into the weights (Miyato et al. 2018's spectral norm).
That estimate only guides training; the certificate at evaluation uses a bound by theorem.

Only chains of convolutions without BatchNorm, linear layers, ReLU and flatten are certifiable this way
(e.g. model=cnn_4c3f): BatchNorm's batch statistics and residual sums break the per-layer product.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from tulip.nn.lipschitz import conv_adjoint
from tulip.nn.models import ConvBN, ReLU
from tulip.schema import ConfigError, Iterations, NonNegative
from tulip.train.loss import Model, Penalty, TrainingBatch

CERTIFIABLE = "a chain of convolutions without BatchNorm, linear layers, ReLU and flatten (e.g. model=cnn_4c3f)"


def certifiable_layers(model: Model) -> tuple[list[nn.Module], nn.Linear]:
    """(the body's conv/linear layers in order, the last linear layer); ValueError for another structure."""
    children = list(model.children())
    if not children or not isinstance(children[-1], nn.Linear):
        last = type(children[-1]).__name__ if children else "nothing"
        raise ValueError(f"{type(model).__name__} ends in {last}, not in a linear layer")
    body = []
    for child in children[:-1]:
        if isinstance(child, ConvBN) and "bn" not in child._modules:
            body.append(child.conv)
        elif isinstance(child, (nn.Conv2d, nn.Linear)):
            body.append(child)
        elif not isinstance(child, (ReLU, nn.ReLU, nn.Flatten, nn.Identity)):
            raise ValueError(f"{type(model).__name__} contains {type(child).__name__}")
    return body, children[-1]


class PowerIterationNorms:
    """Per-layer L2 operator-norm estimates of a conv/linear chain; differentiable in the weights."""

    def __init__(self, layers: list[nn.Module], input_shape: tuple[int, ...]):
        self.layers, self.shapes, self.vectors = layers, [], []
        weight = layers[0].weight
        x = torch.zeros(1, *input_shape, device=weight.device, dtype=weight.dtype)
        generator = torch.Generator(device=x.device).manual_seed(0)  # a seeded start: runs repeat exactly
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    x = x.flatten(1)
                self.shapes.append(tuple(x.shape))
                self.vectors.append(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
                x = self._apply(layer, x)

    @staticmethod
    def _apply(layer: nn.Module, v: torch.Tensor) -> torch.Tensor:
        """The layer's linear part (no bias) on v."""
        if isinstance(layer, nn.Linear):
            return F.linear(v, layer.weight)
        return F.conv2d(v, layer.weight, stride=layer.stride, padding=layer.padding, groups=layer.groups)

    @staticmethod
    def _adjoint(layer: nn.Module, u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if isinstance(layer, nn.Linear):
            return F.linear(u, layer.weight.t())
        return conv_adjoint(u, layer.weight, shape, layer.stride, layer.padding, layer.groups)

    def _full_precision(self):
        """Autocast off (precision=bf16 trains under it): the vectors persist across steps and go into the
        checkpoint, so bf16 rounding would build up in them; one vector per layer costs next to nothing."""
        return torch.autocast(self.layers[0].weight.device.type, enabled=False)

    @torch.no_grad()
    def iterate(self, steps: int) -> None:
        with self._full_precision():
            for i, (layer, shape) in enumerate(zip(self.layers, self.shapes)):
                v = self.vectors[i]
                for _ in range(steps):
                    v = self._adjoint(layer, self._apply(layer, v / v.norm()), shape)
                self.vectors[i] = v / v.norm()

    def product(self) -> torch.Tensor:
        """Π_l ‖A_l v_l‖ with the current unit vectors v_l: a scalar with a graph into the weights."""
        with self._full_precision():
            return math.prod(self._apply(layer, v).norm() for layer, v in zip(self.layers, self.vectors))


class GloroPenalty(Penalty):
    """GloRo's ⊥-augmented cross-entropy at L2 training radius ``eps`` (pixel units), as the extra
    loss over plain cross-entropy. ``iterations``: power-iteration steps per training step (default 1;
    the vectors persist, and start from ``warmup`` steps, default 100)."""
    switch = "eps"

    def __init__(self, eps: NonNegative = 0.0, iterations: Iterations = 1, warmup: Iterations = 100):
        self.eps = float(eps)
        self.iterations, self.warmup = iterations, warmup
        self.norms: PowerIterationNorms | None = None
        self._saved: dict | None = None

    def prepare(self, model: Model) -> None:
        try:
            self.body, self.head = certifiable_layers(model)
        except ValueError as error:
            raise ConfigError("eps", self.eps, f"a model that is {CERTIFIABLE}; {error}") from None
        if hasattr(model, "input_shape"):  # Tulip's models know it; others start at their first batch
            self._start(tuple(model.input_shape))

    def _start(self, input_shape: tuple[int, ...]) -> None:
        self.norms = PowerIterationNorms(self.body, input_shape)
        if self._saved is not None:  # resuming: continue from the checkpointed vectors
            self.norms.vectors = [v.to(self.head.weight.device) for v in self._saved["vectors"]]
        else:
            self.norms.iterate(self.warmup)

    def state_dict(self) -> dict:
        return {"vectors": list(self.norms.vectors)} if self.norms is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state
        if self.norms is not None:
            self.norms.vectors = [v.to(self.head.weight.device) for v in state["vectors"]]

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        if self.norms is None:
            if not hasattr(self, "head"):
                self.prepare(batch.model)
            if self.norms is None:
                self._start(tuple(batch.x.shape[1:]))
        self.norms.iterate(self.iterations)
        body_lipschitz = self.norms.product()  # K₋, differentiable
        w = self.head.weight  # (C, d)
        # ‖w_i − w_j‖₂ for every pair (C, C); the tiny floor keeps the diagonal's gradient finite
        pairs = ((w[:, None, :] - w[None, :, :]).square().sum(-1) + 1e-12).sqrt()
        logits = batch.logits  # (B, C)
        predicted = logits.argmax(1)  # (B,)
        competitors = logits + self.eps * body_lipschitz * pairs[predicted]  # (B, C)
        competitors = competitors.masked_fill(F.one_hot(predicted, logits.shape[1]).bool(), -math.inf)
        augmented = torch.cat([logits, competitors.amax(1, keepdim=True)], dim=1)  # (B, C + 1): ⊥ last
        return F.cross_entropy(augmented, batch.y) - F.cross_entropy(logits, batch.y)
