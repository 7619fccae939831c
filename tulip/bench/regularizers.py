"""``python -m tulip.bench regularizers``: the cost of every regularizer, Tulip vs a hand-written loop.

In one process, on one model (``--model``, default cnn_small: tulip.nn.models.CNNSmall) and one batch
(default 128) of MNIST-shaped random images (``--shape 3,32,32``: CIFAR-shaped), times a full training
step (forward + backward + SGD step) for every ``conf/regularizer`` option — the Tulip training loss
composed from the real Hydra config — and for the same math written as a minimal hand-written loop with
the same settings. Measurements are interleaved round-robin (a plain, a Tulip and a hand-written step
for each regularizer in turn), so that load from other processes hits all variants alike; the table
gives the medians of the per-round ratios to the plain step and of Tulip / hand-written.

``--precision bf16`` and ``--channels-last`` time the step as ``precision=bf16`` and ``channels_last=true``
train it (both variants alike). On ``--device cuda`` the benchmark also gives the plain step's images/s
and its FLOP rate (matmuls and convolutions, counted by torch.utils.flop_counter) as a fraction of the
GPU's bf16 matmul rate, measured here on an 8192² × 8192 product.
"""
import argparse
import itertools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tulip.config import PRECISIONS
from tulip.config_files import config_dir
from tulip.train.loss import build_loss
from tulip.train.step import autocast_for

CONF = config_dir()
# Targets for the ratio to a plain step; PGD's is k + 1.2 for k steps.
TARGETS = {"lip": 2.0, "J2": 1.6, "lip+J2": 2.7, "gradnorm_fd": 2.2}


# ----------------------------------------------------------------------------------------------------
# The hand-written twins: what one would type in a training script, with the settings of cfg.reg.

def _input_grad(model, x, y):
    """Per-sample input gradients in eval mode (the perturbations' gradient)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    model.train()
    return g


def _ce_and_lip(model, x, y, lam, p=2):
    x = x.clone().requires_grad_(True)
    losses = F.cross_entropy(model(x), y, reduction="none")
    g, = torch.autograd.grad(losses.sum(), x, create_graph=True)
    return losses.mean() + lam * g.flatten(1).norm(p=p, dim=1).max()


def _j1(model, x, y, eps):
    return x + eps * _input_grad(model, x, y).sign() / math.sqrt(x[0].numel())


def _j2(model, x, y, eps):
    g = _input_grad(model, x, y)
    return x + eps * g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)


def _jinf(model, x, y, eps):
    g = _input_grad(model, x, y).flatten(1)
    k = g.abs().argmax(1, keepdim=True)
    return x + eps * torch.zeros_like(g).scatter_(1, k, g.gather(1, k).sign()).view_as(x)


def _pgd(model, x, y, pgd, loss=None):
    loss = loss or (lambda z: F.cross_entropy(model(z), y, reduction="sum"))
    model.eval()
    linf = pgd.norm == math.inf
    if linf:
        x_adv = (x + torch.empty_like(x).uniform_(-pgd.eps, pgd.eps)).clamp(0, 1)
    else:
        d = torch.randn_like(x)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x_adv = (x + pgd.eps * torch.rand(len(x), 1, 1, 1, dtype=x.dtype, device=x.device) * d).clamp(0, 1)
    for _ in range(pgd.steps):
        x_adv.requires_grad_(True)
        g, = torch.autograd.grad(loss(x_adv), x_adv)
        if linf:
            x_adv = torch.min(torch.max(x_adv.detach() + pgd.step_size * g.sign(), x - pgd.eps), x + pgd.eps)
        else:
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
            x_adv = x_adv.detach() + pgd.step_size * g
            delta = x_adv - x
            delta = delta * (pgd.eps / delta.flatten(1).norm(dim=1).clamp_min(pgd.eps)).view(-1, 1, 1, 1)
            x_adv = x + delta
        x_adv = x_adv.clamp(0, 1)
    model.train()
    return x_adv


def _gradnorm(model, x, y, lam):
    x = x.clone().requires_grad_(True)
    losses = F.cross_entropy(model(x), y, reduction="none")
    g, = torch.autograd.grad(losses.sum(), x, create_graph=True)
    return losses.mean() + lam * g.square().sum() / (2 * len(x))


def _gradnorm_fd(model, x, y, r):  # Finlay & Oberman 2019's training loop (fd_norm 2, order 1)
    x = x.clone().requires_grad_(True)
    losses = F.cross_entropy(model(x), y, reduction="none")
    d, = torch.autograd.grad(losses.mean(), x, retain_graph=True)
    v = d / d.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
    lf = F.cross_entropy(model(x.detach() + r.h * v), y, reduction="none")
    return losses.mean() + r.gradnorm_fd * ((lf - losses) / r.h).square().mean() / 2


def _trades(model, x, y, r):
    t = r.trades
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(t.steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
        g, = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + t.step_size * g.sign(), x - t.eps), x + t.eps).clamp(0, 1)
    model.train()
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + t.beta * kl


_GLORO_VECTORS = {}  # id(model) -> the power-iteration vectors, kept across steps as GloRo does


def _body_lipschitz(model, x, warmup=100):
    """(K₋, the last linear layer): K₋ a product of power-iteration norms of the layers before it."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    (*body, head), steps = layers, 1

    def linear_part(layer, v):
        if isinstance(layer, nn.Linear):
            return F.linear(v.flatten(1), layer.weight)
        return F.conv2d(v, layer.weight, stride=layer.stride, padding=layer.padding, groups=layer.groups)

    if id(model) not in _GLORO_VECTORS:  # a seeded start, then `warmup` more iterations
        generator, h, vectors = torch.Generator(device=x.device).manual_seed(0), x[:1] * 0, []
        for layer in body:
            h = h.flatten(1) if isinstance(layer, nn.Linear) else h
            vectors.append(torch.randn(h.shape, generator=generator, device=x.device, dtype=x.dtype))
            h = linear_part(layer, h).detach()
        _GLORO_VECTORS[id(model)], steps = vectors, warmup + 1
    vectors = _GLORO_VECTORS[id(model)]
    for i, layer in enumerate(body):
        v = vectors[i]
        for _ in range(steps):  # v <- AᵀA v / ‖v‖, the adjoint by autograd
            z = v.detach().requires_grad_(True)
            v, = torch.autograd.grad(linear_part(layer, z), z, linear_part(layer, v / v.norm()).detach())
        vectors[i] = v / v.norm()
    return math.prod(linear_part(layer, v).norm() for layer, v in zip(body, vectors)), head


def _first_radius(eps, r):
    """The training radius of the first epoch: the warm-up's start, or its end without a warm-up."""
    return eps * (r.radius_warmup.start if r.radius_warmup.until else r.radius_warmup.end)


def _margins(model, x, r, eps, against):
    """(logits, offsets (B, C)): radius·K₋·‖w_i − w_{against}‖ for every class i."""
    k, head = _body_lipschitz(model, x)
    logits, w = model(x), head.weight
    pairs = ((w[:, None] - w[None]).square().sum(-1) + 1e-12).sqrt()
    return logits, _first_radius(eps, r) * k * pairs[against(logits)]


def _gloro(model, x, y, r):
    """GloRo's loss (Leino et al. 2021): CE on [f, f_⊥], or CE(f) + λ KL(softmax f ‖ softmax [f, f_⊥])."""
    logits, offsets = _margins(model, x, r, r.gloro, lambda logits: logits.argmax(1))
    j = logits.argmax(1)
    bot = (logits + offsets).masked_fill(F.one_hot(j, logits.shape[1]).bool(), -math.inf).amax(1, keepdim=True)
    augmented = torch.cat([logits, bot], 1)
    if not r.gloro_trades:
        return F.cross_entropy(augmented, y)
    p = F.softmax(logits, 1)
    kl = (p * (p.log() - F.log_softmax(augmented, 1)[:, :-1])).sum(1).mean()
    return F.cross_entropy(logits, y) + r.gloro_trades * kl


def _margin(model, x, y, r):
    """Lipschitz-margin training (Tsuzuku et al. 2018): CE on f_i + ε K₋ ‖w_i − w_y‖ (i ≠ y)."""
    logits, offsets = _margins(model, x, r, r.margin, lambda logits: y)
    return F.cross_entropy(logits + offsets, y)


# Each conf/regularizer option's twin, a loss of (model, x, y, its cfg.reg): an option without one is timed
# without one (tests/unit/test_regularizers.py asks for one per option).
HAND_WRITTEN = {
    "none": lambda m, x, y, r: F.cross_entropy(m(x), y),
    "lip": lambda m, x, y, r: _ce_and_lip(m, x, y, r.lip),
    "J1": lambda m, x, y, r: F.cross_entropy(m(_j1(m, x, y, r.J1)), y),
    "J2": lambda m, x, y, r: F.cross_entropy(m(_j2(m, x, y, r.J2)), y),
    "Jinf": lambda m, x, y, r: F.cross_entropy(m(_jinf(m, x, y, r.Jinf)), y),
    "lip+J1": lambda m, x, y, r: _ce_and_lip(m, _j1(m, x, y, r.J1), y, r.lip),
    "lip+J2": lambda m, x, y, r: _ce_and_lip(m, _j2(m, x, y, r.J2), y, r.lip),
    "lip+Jinf": lambda m, x, y, r: _ce_and_lip(m, _jinf(m, x, y, r.Jinf), y, r.lip),
    "pgd_linf": lambda m, x, y, r: F.cross_entropy(m(_pgd(m, x, y, r.pgd)), y),
    "pgd_l2": lambda m, x, y, r: F.cross_entropy(m(_pgd(m, x, y, r.pgd)), y),  # the norm is in r.pgd
    "lip+pgd_linf": lambda m, x, y, r: _ce_and_lip(m, _pgd(m, x, y, r.pgd), y, r.lip),
    "gradnorm": lambda m, x, y, r: _gradnorm(m, x, y, r.gradnorm),
    "gradnorm_fd": _gradnorm_fd,
    "trades": _trades,
    "gloro": _gloro,
    "gloro_trades": _gloro,
    "margin": _margin,
}


def hand_written(option: str):
    """The hand-written twin of a conf/regularizer option, or None."""
    return HAND_WRITTEN.get(option)


def options() -> list[str]:
    return sorted(p.stem for p in (CONF / "regularizer").glob("*.yaml") if not p.stem.startswith("_"))


# ----------------------------------------------------------------------------------------------------

def target(name: str, reg) -> str:
    if name in TARGETS:
        return f"≤ {TARGETS[name]:.1f}×"
    if name.startswith("pgd"):
        return f"≤ {reg.pgd.steps + 1.2:.1f}× ({reg.pgd.steps} steps)"
    return ""


def bf16_matmul_rate(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of an n×n by n×n bf16 matmul on `device`: the rate a step's FLOPs are compared with (a
    measured one, not the datasheet's, which no real kernel reaches)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel, the clocks ramp up
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def step_flops(loss_fn, model, x, y, autocast) -> int:
    """The FLOPs of one step's forward and backward passes (matmuls and convolutions; the elementwise
    work and the optimizer step are not counted, so the fraction below is a lower bound)."""
    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = loss_fn(model, x, y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tulip.bench regularizers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="timed round-robin rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="cnn_small", help="a conf/model option (default cnn_small)")
    parser.add_argument("--shape", default="1,28,28", type=lambda text: tuple(int(v) for v in text.split(",")),
                        help="C,H,W of the random images (default 1,28,28, MNIST; 3,32,32 for CIFAR)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time, which other processes' "
                             "load disturbs less (use with --threads 1; CPU device only)")
    parser.add_argument("--only", nargs="*", default=None, help="regularizer options to time (default: all)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: every step under bf16 autocast, as precision=bf16 trains (default fp32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC model and batch, as channels_last=true trains")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    names = list(args.only or options())
    unknown = set(names) - set(options())
    if unknown:
        raise SystemExit(f"unknown regularizer(s) {sorted(unknown)}; known: {', '.join(options())}")
    if "none" not in names:
        names = ["none", *names]
    with initialize_config_dir(str(CONF), version_base=None):
        configs = {name: compose("config", overrides=[f"regularizer={name}", f"model={args.model}"])
                   for name in names}
    regs = {name: cfg.reg for name, cfg in configs.items()}

    torch.manual_seed(0)  # a model and a batch of random images of --shape
    channels, height, width = args.shape
    model = instantiate(configs["none"].model, in_channels=channels, num_classes=10,
                        image_size=height).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch_size, channels, height, width, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = autocast_for(args.precision, device)

    variants = {}  # (name, "tulip" | "hand") -> loss function of (model, x, y)
    skipped = {}  # name -> why this model cannot train with it (GloRo needs a BatchNorm-free chain)
    for name in list(names):
        try:
            loss_fn = build_loss(regs[name], model)
        except ValueError as error:  # build_loss names the reg.* key the model fails
            if args.only:
                raise SystemExit(f"regularizer={name} with model={args.model}: {error}")
            skipped[name] = str(error)
            names.remove(name)
            continue
        reg, hand = regs[name], hand_written(name)
        variants[name, "tulip"] = lambda m, x, y, loss_fn=loss_fn: loss_fn(m, x, y).loss
        if hand is not None:
            variants[name, "hand"] = lambda m, x, y, reg=reg, hand=hand: hand(m, x, y, reg)

    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def step(loss_fn) -> float:
        sync()
        start = clock()
        with autocast():
            loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return clock() - start

    # Each round times, per regularizer, a triple of steps: plain, Tulip and hand-written, in an order
    # that cycles through all 6 permutations (the first step after a switch runs on colder caches), and
    # keeps the ratios within the triple: load from other processes changes slowly compared with one
    # triple, so the per-triple ratios stay fair on a busy machine.
    orders = list(itertools.permutations(("plain", "tulip", "hand")))
    ratios = {key: [] for key in variants}  # (name, kind) -> [step / plain step of the same triple]
    pair = {name: [] for name in names}  # name -> [tulip step / hand step]
    plain_times = []
    for round_ in range(args.warmup + args.rounds):
        for i, name in enumerate(names):
            kinds = {"plain": variants["none", "hand"], "tulip": variants[name, "tulip"],
                     "hand": variants.get((name, "hand"))}
            order = [kind for kind in orders[(round_ + i) % len(orders)] if kinds[kind] is not None]
            elapsed = {kind: step(kinds[kind]) for kind in order}
            if round_ >= args.warmup:
                plain_times.append(elapsed["plain"])
                for kind in ("tulip", "hand"):
                    if kind in elapsed:
                        ratios[name, kind].append(elapsed[kind] / elapsed["plain"])
                if "hand" in elapsed:
                    pair[name].append(elapsed["tulip"] / elapsed["hand"])
    median = {key: statistics.median(r) for key, r in ratios.items()}
    plain = statistics.median(plain_times)

    def cell(values, digits):
        return f"{statistics.median(values):.{digits}f}" if values else "— (no hand-written twin)"

    gpu_path = "".join([f", {args.precision}" if args.precision != "fp32" else "",
                        ", channels_last" if args.channels_last else ""])
    print(f"{type(model).__name__}, batch {args.batch_size}, {device}{gpu_path}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, {args.rounds} rounds; plain step {1000 * plain:.1f} ms (hand-written, median); "
          f"medians of per-round ratios\n")
    print("| regularizer | Tulip × plain | hand-written × plain | Tulip / hand-written | target |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        print(f"| {name} | {median[name, 'tulip']:.2f} | {cell(ratios.get((name, 'hand'), []), 2)} | "
              f"{cell(pair[name], 3)} | {target(name, regs[name])} |")
    for name, why in skipped.items():
        print(f"\nnot timed: {name} cannot train {type(model).__name__} ({why}); time it with --model cnn_4c3f")

    print(f"\nplain step: {args.batch_size / plain:,.0f} images/s")
    if device.type != "cuda":
        print("(its fraction of the bf16 matmul rate is measured with --device cuda only)")
        return
    flops = step_flops(variants["none", "hand"], model, x, y, autocast)
    rate = bf16_matmul_rate(device)
    print(f"plain step: {flops / 1e9:.3g} GFLOP (forward + backward, matmuls and convolutions) in "
          f"{1000 * plain:.2f} ms = {flops / plain / 1e12:.3g} TFLOP/s, {100 * flops / plain / rate:.2f} % of "
          f"this GPU's measured bf16 matmul rate ({rate / 1e12:.0f} TFLOP/s, 8192² × 8192)")
