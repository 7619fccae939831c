"""Per-epoch measurements of a classifier, as in Finlay, Oberman & Abbasi (arXiv 1810.00953).

``measure(model, x, y, batch_size)`` evaluates on a test set in eval mode and returns

    test/error_pct, test/loss             % misclassified, mean cross-entropy
    lipschitz/loss_grad_max, _mean        max / mean over images of the per-sample ||grad_x loss_i||_2
    lipschitz/jacobian_2inf               max over images of max_c ||grad_x f_c(x)||_2
    weights/product_2inf                  largest row 2-norm of M, where x -> M x + b is the linearized
    weights/product_spectral              network (see ``tulip.nn.models.linearized``), and M's spectral norm
    weights/layer_norm_product            product of guaranteed bounds on the layers' operator norms
                                          (``tulip.nn.lipschitz.layer_norm_bound``): an upper bound, by
                                          theorem, on the L2 Lipschitz constant of the logits
    weights/layer_norm_estimate           the same product of power-iteration estimates (per epoch)
    model/tanh_scale                      the bounded head's t (only with ``model.tanh=true``)

During training (`tulip.train.loop`) the test error and loss are measured on the whole test set every
epoch (one forward pass), the rest every `eval.every` epochs on `eval.n` test images
(the same class-balanced images every epoch), since they cost C + 1 backward passes per
image, and without the guaranteed layer bound (25 s per call for a ResNet-18 on 2 CPU cores; its
estimate takes 2 s); after the last epoch everything is measured once more on the whole test set, with
the bound, for the summary.

In eval mode every sample's output depends on that sample only, so the input gradient of the *sum* of
the losses holds exactly the per-sample gradients (the original code differentiated the batch mean,
which scales every gradient by 1/batch).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from tulip.runs import metric_keys
from tulip.evaluate.bounds import error_curve, last_layer_radii
from tulip.nn.lipschitz import last_layer, layer_norm_bound, layer_norm_estimate
from tulip.nn.models import Classifier, eval_mode, linearized
from tulip.nn.perturbations import input_grad
from tulip.stats import error_interval


def _input_grads(x: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """input_grad of each output, one backward pass each (the graph is kept until the last one)."""
    last = len(outputs) - 1
    return [input_grad(output, x, retain_graph=i < last) for i, output in enumerate(outputs)]


def linearized_matrix(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """M (C, d) of the linearized network x -> M x + b: row c is grad_x f_c, one backward pass each.

    Only the shape (after the batch dimension), dtype and device of the input batch ``x`` are used.
    """
    with linearized(model), torch.enable_grad():
        zero = torch.zeros_like(x[:1]).requires_grad_(True)
        logits = model(zero)
        rows = _input_grads(zero, [logits[0, c] for c in range(logits.shape[1])])
    return torch.stack(rows).flatten(1)


@torch.no_grad()
def error_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   split: str = "test") -> dict[str, float]:
    """Error and mean cross-entropy on (x, y), the images of `split`: one forward pass, no gradients."""
    # summed on the device, read once: no wait for the device per batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    wrong = torch.zeros((), dtype=torch.long, device=x.device)
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            yb = y[start:start + batch_size]
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            wrong += (logits.argmax(1) != yb).sum()
    return {metric_keys.error_key(split): 100.0 * wrong.item() / len(x),
            metric_keys.loss_key(split): loss_sum.item() / len(x)}


@torch.no_grad()
def certified_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, radii,
                     split: str = "val") -> dict[str, float]:
    """% of (x, y) whose pairwise certificate (tulip.evaluate.bounds) is at most each L2 radius: misclassified
    or not certified. One forward pass and the layers' bounds; the model must end in a linear layer."""
    last = last_layer(model)
    if last is None:
        raise ValueError(f"eval.certify needs a model that ends in a linear layer; {type(model).__name__} does not")
    with eval_mode(model):
        logits = torch.cat([model(x[start:start + batch_size]) for start in range(0, len(x), batch_size)])
    curve = error_curve(last_layer_radii(last, logits, y), radii)
    return {metric_keys.epoch_certified_error(split, eps): error for eps, error in curve}


@torch.no_grad()
def lipschitz_figures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                      guaranteed_bound: bool = True) -> dict[str, float]:
    """The gradient, Jacobian and weight figures of the module docstring on (x, y), in eval mode. They
    cost C + 1 backward passes per image (C classes), against one forward pass for the test error; the
    guaranteed layer bound (`guaranteed_bound`) costs more than all of them on a ResNet."""
    grad_norms, jacobian_2inf = [], torch.zeros((), device=x.device)  # read once, at the end
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            yb = y[start:start + batch_size]
            with torch.enable_grad():
                xb = x[start:start + batch_size].detach().requires_grad_(True)
                logits = model(xb)  # (B, C)
                losses = F.cross_entropy(logits, yb, reduction="none")  # (B,)
                # sums over the batch: in eval mode their input gradients are the per-sample ones
                loss_grads, *class_grads = _input_grads(
                    xb, [losses.sum()] + [logits[:, c].sum() for c in range(logits.shape[1])])
            grad_norms.append(loss_grads.flatten(1).norm(dim=1))
            for grads in class_grads:  # (B, C_in, H, W) = grad_x f_c(x_i)
                jacobian_2inf = torch.maximum(jacobian_2inf, grads.flatten(1).norm(dim=1).max())
        grad_norms = torch.cat(grad_norms)
        rows = linearized_matrix(model, x)
        metrics = {
            metric_keys.LOSS_GRAD_MAX: grad_norms.max().item(),
            metric_keys.LOSS_GRAD_MEAN: grad_norms.mean().item(),
            metric_keys.JACOBIAN_2INF: jacobian_2inf.item(),
            metric_keys.PRODUCT_2INF: rows.norm(dim=1).max().item(),
            metric_keys.PRODUCT_SPECTRAL: torch.linalg.matrix_norm(rows, ord=2).item(),
            metric_keys.LAYER_NORM_ESTIMATE: layer_norm_estimate(model, x.shape[1:]),
        }
        if guaranteed_bound:
            metrics[metric_keys.LAYER_NORM_PRODUCT] = layer_norm_bound(model, x.shape[1:])
    return metrics


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
            lipschitz_images: torch.Tensor | None = None, lipschitz: bool = True,
            guaranteed_bound: bool = True) -> dict[str, float]:
    """Test error and loss on all of (x, y); the Lipschitz figures too (`lipschitz`), on the images
    `lipschitz_images` (indices; None: all of them), with the guaranteed layer bound (`guaranteed_bound`)."""
    metrics = error_and_loss(model, x, y, batch_size)
    if isinstance(model, Classifier) and model.tanh_scale is not None:
        metrics[metric_keys.TANH_SCALE] = model.tanh_scale.item()
    if lipschitz:
        if lipschitz_images is not None:
            x, y = x[lipschitz_images], y[lipschitz_images]
        metrics.update(lipschitz_figures(model, x, y, batch_size, guaranteed_bound))
    return metrics


def error_intervals(metrics: dict[str, float], images: int, keys) -> dict[str, float]:
    """The Wilson 95 % interval (tulip.stats) of each error rate `keys` names, each over the same
    `images` images: {ci95_low/<key>: %, ci95_high/<key>: %}. Rates that are not finite get none."""
    intervals = {}
    for key in keys:
        rate = metrics.get(key)
        if rate is None or not math.isfinite(rate):
            continue
        # the rate is a count of images over `images`, written as a percentage
        low, high = error_interval(round(rate * images / 100.0), images)
        intervals.update(zip(metric_keys.interval_keys(key), (low, high)))
    return intervals
