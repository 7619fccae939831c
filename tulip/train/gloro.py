"""GloRo certified training (Leino, Wang & Fredrikson, "Globally-Robust Neural Networks", ICML 2021,
arXiv 2102.08452): train *through* the certificate.

For a network f = W·h(x) + b whose body h is K₋-Lipschitz in L2, the logit gap f_j − f_i can change by at
most ε·K₋·‖w_j − w_i‖₂ inside an L2 ball of radius ε. GloRo adds a logit ⊥ to the predicted class j's
competitors, f_⊥ = max_{i≠j} f_i + ε·K₋·‖w_i − w_j‖₂, and trains with cross-entropy on [f, f_⊥]: the loss
is low only where the prediction is the label *and* certified at radius ε. Here that is a penalty, the
extra loss mean CE([f, f_⊥]) − mean CE(f), so it composes with the other parts (reg.lip, reg.decay).

Two losses, both GloRo's: the ⊥-augmented cross-entropy (above), and with ``reg.gloro_trades`` = λ > 0 the
TRADES-style loss of GloRo's recipes, CE(f) + λ·KL(softmax(f) ‖ softmax([f, f_⊥])) (the clean prediction,
with probability 0 for ⊥, against the augmented one; ``sparse_trades_kl.λ`` in GloRo's code, λ = 1.5 on
MNIST). The radius may warm up (``reg.radius_warmup``, ``RadiusSchedule``) as GloRo's recipes do.

K₋ must be differentiable and cheap per step: each layer's norm is a power-iteration estimate whose
vectors persist across steps (one iteration per step after a converged start) and go into the checkpoint,
and σ = uᵀ W v (u, v fixed) carries the gradient into the weights (Miyato et al. 2018's spectral norm).
That estimate only guides training; the certificate at evaluation uses a bound by theorem.

Certifiable this way: chains of convolutions without BatchNorm, linear layers, 1-Lipschitz activations
and flatten (e.g. model=cnn_4c3f), and networks that are 1-Lipschitz by construction up to their last
linear layer (model=aol_4c3f, model=sll), whose K₋ is 1. BatchNorm's batch statistics and residual sums
break the per-layer product.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from tulip.nn.lipschitz import conv_adjoint
from tulip.nn.models import ConvBN, Nonlinearity
from tulip.nn.one_lipschitz import OneLipschitz
from tulip.schema import ConfigError, Iterations, NonNegative
from tulip.train.loss import Model, Penalty, TrainingBatch

CERTIFIABLE = ("a chain of convolutions without BatchNorm, linear layers, 1-Lipschitz activations and flatten "
               "(e.g. model=cnn_4c3f), or 1-Lipschitz layers up to the last linear one (model=aol_4c3f, "
               "model=sll)")
# Parts of a body whose L2 Lipschitz constant is at most 1 whatever their weights.
ONE_LIPSCHITZ = (OneLipschitz, nn.PixelUnshuffle, Nonlinearity, nn.ReLU, nn.Flatten, nn.Identity)


def certifiable_layers(model: Model) -> tuple[list[nn.Module], nn.Linear]:
    """(the body's conv/linear layers in order, the last linear layer); ValueError for another structure.
    A body that is 1-Lipschitz by construction has no layers to bound: the list is empty."""
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
        elif not isinstance(child, ONE_LIPSCHITZ):
            raise ValueError(f"{type(model).__name__} contains {type(child).__name__}")
    if body and any(isinstance(child, (OneLipschitz, nn.PixelUnshuffle)) for child in children):
        raise ValueError(f"{type(model).__name__} mixes 1-Lipschitz layers with plain ones")
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


class RadiusSchedule:
    """The training radius over the epochs: ``start``·ε at epoch 1, rising to ``end``·ε at the epoch
    ``until``·epochs, then kept. The rise is GloRo's "log" interpolation, linear in exp(radius):
    r = log(exp(r₀) + (exp(r₁) − exp(r₀))·t) at t = (epoch − 1)/(until·epochs). GloRo's MNIST recipe,
    ``[0.01]-log-[50%:1.1]``, is start 0.01, end 1.1, until 0.5; until 0 is no warm-up (``end``·ε always)."""

    def __init__(self, eps: float, start: float, end: float, until: float):
        self.low, self.high, self.until = eps * start, eps * end, until

    def __call__(self, epoch: int, epochs: int) -> float:
        rising = round(self.until * epochs)
        if epoch > rising:
            return self.high
        t = (epoch - 1) / rising
        return math.log(math.exp(self.low) + (math.exp(self.high) - math.exp(self.low)) * t)


class CertifiedMargin(Penalty):
    """Base of the penalties that train through the pairwise certificate at an L2 radius (``eps``, pixel
    units; GloRo, the Lipschitz margin): ε·K₋·‖w_i − w_j‖₂ is how far the logit gap f_j − f_i can move
    inside the ball, K₋ the body's Lipschitz constant (PowerIterationNorms; 1 for a body that is
    1-Lipschitz by construction). ``iterations``: power-iteration steps per training step (the vectors
    persist, and start from ``warmup`` steps); ``radius_start/end/until``: the RadiusSchedule."""
    switch = "eps"

    def __init__(self, eps: NonNegative = 0.0, iterations: Iterations = 1, warmup: Iterations = 100,
                 radius_start: NonNegative = 1.0, radius_end: NonNegative = 1.0, radius_until: NonNegative = 0.0):
        self.eps = float(eps)
        self.iterations, self.warmup = iterations, warmup
        self.schedule = RadiusSchedule(self.eps, radius_start, radius_end, radius_until)
        self.radius = self.schedule.low if radius_until else self.schedule.high  # until start_epoch
        self.norms: PowerIterationNorms | None = None
        self._saved: dict | None = None

    def prepare(self, model: Model) -> None:
        try:
            self.body, self.head = certifiable_layers(model)
        except ValueError as error:
            raise ConfigError("eps", self.eps, f"a model that is {CERTIFIABLE}; {error}") from None
        if hasattr(model, "input_shape"):  # Tulip's models know it; others start at their first batch
            self._start(tuple(model.input_shape))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.radius = self.schedule(epoch, epochs)

    def _start(self, input_shape: tuple[int, ...]) -> None:
        if not self.body:  # 1-Lipschitz by construction: nothing to estimate
            self.norms = ConstantNorm()
            return
        self.norms = PowerIterationNorms(self.body, input_shape)
        if self._saved is not None:  # resuming: continue from the checkpointed vectors
            self.norms.vectors = [v.to(self.head.weight.device) for v in self._saved["vectors"]]
        else:
            self.norms.iterate(self.warmup)

    def state_dict(self) -> dict:
        return {"vectors": list(self.norms.vectors)} if self.norms is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state
        if self.norms is not None and state:
            self.norms.vectors = [v.to(self.head.weight.device) for v in state["vectors"]]

    def offsets(self, batch: TrainingBatch, against: torch.Tensor) -> torch.Tensor:
        """(B, C): radius·K₋·‖w_i − w_{against_b}‖₂ for every class i of every sample b (0 at i = against_b)."""
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
        return self.radius * body_lipschitz * pairs[against]


class ConstantNorm:
    """K₋ = 1, for a body that is 1-Lipschitz by construction (nothing to iterate or save)."""
    vectors: list = []

    def iterate(self, steps: int) -> None:
        pass

    def product(self) -> float:
        return 1.0


class GloroPenalty(CertifiedMargin):
    """GloRo's loss at L2 training radius ``eps`` (pixel units), as the extra loss over plain cross-entropy
    on the clean batch: the ⊥-augmented cross-entropy, or with ``trades`` = λ > 0 GloRo's TRADES-style
    λ·KL(softmax(f) ‖ softmax([f, f_⊥])). See CertifiedMargin for the other arguments."""

    def __init__(self, eps: NonNegative = 0.0, trades: NonNegative = 0.0, iterations: Iterations = 1,
                 warmup: Iterations = 100, radius_start: NonNegative = 1.0, radius_end: NonNegative = 1.0,
                 radius_until: NonNegative = 0.0):
        super().__init__(eps, iterations, warmup, radius_start, radius_end, radius_until)
        self.trades = float(trades)

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        logits = batch.logits  # (B, C)
        predicted = logits.argmax(1)  # (B,)
        competitors = logits + self.offsets(batch, predicted)  # (B, C)
        competitors = competitors.masked_fill(F.one_hot(predicted, logits.shape[1]).bool(), -math.inf)
        augmented = torch.cat([logits, competitors.amax(1, keepdim=True)], dim=1)  # (B, C + 1): ⊥ last
        if self.trades:
            clean = F.log_softmax(logits, 1)  # (B, C); ⊥ has probability 0 in the clean prediction
            robust = F.log_softmax(augmented, 1)[:, :-1]
            return self.trades * (clean.exp() * (clean - robust)).sum(1).mean()
        return F.cross_entropy(augmented, batch.y) - F.cross_entropy(logits, batch.y)
