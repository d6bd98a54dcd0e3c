"""AdaRound from scratch: learn, layer by layer, whether each weight rounds down or up.

Taught in 11_strongest_ptq. Nagel, Amjad, van Baalen, Louizos, Blankevoort,
"Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020
(arXiv:2004.10568).

Round-to-nearest minimizes each weight's own error, not the layer's output error.
AdaRound keeps the grid (the scale ``s``) and lets every weight pick its floor or
its ceiling code, through a continuous variable ``V`` of the weight's shape::

    W_soft = s · clamp(floor(W / s) + h(V), qmin, qmax)
    h(V)   = clamp(sigmoid(V) · (ζ - γ) + γ, 0, 1)          rectified sigmoid, ζ = 1.1, γ = -0.1

and minimizes, on calibration inputs, the reconstruction of the layer's output
(after its ReLU when it has one) plus a regularizer that pushes every ``h`` to 0 or 1::

    loss = || f(W x_q) - f(W_soft x_q) ||^2  +  λ · Σ (1 - |2 h(V) - 1|^β)

``x_q`` is what the layer sees in the network whose earlier layers are already
rounded (activations in float), and ``f`` is the ReLU after a conv, the identity
for a linear layer. The squared error is summed over output channels and averaged
over positions and the images of a mini-batch. Both terms take the same inputs
``x_q``: :func:`apply_adaround` builds the target ``f(W x_q)`` by applying the
*float* layer to the quantized network's inputs, so each layer is fitted to what
its own float weights would do with the inputs it actually gets. This is not the
paper's asymmetric reconstruction, ``|| f(W x) - f(W_soft x_q) ||^2`` with ``x``
from the float network, which also lets a layer absorb part of the error of the
layers before it.

Settings (the defaults of :func:`apply_adaround` and :func:`adaround_layer`): Adam
on ``V`` with learning rate ``lr = 0.01``, ``λ = reg_weight = 0.01``, no regularizer
during a warm-up of the first 20 % of the iterations, then ``β`` annealed linearly
from 20 to 2 (:func:`beta_schedule`): high ``β`` leaves ``h`` free to move, low
``β`` forces a decision. At the end every weight is set hard:
``code = floor(W / s) + [V >= 0]``, exactly its floor or its ceiling code. ``V`` starts where ``h(V)`` equals the fractional part of
``W / s`` (so ``W_soft = W`` before the first step).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ptq import layer_inputs, weight_layers, weight_qparams

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v, zeta=ZETA, gamma=GAMMA):
    """``h(V) = clamp(sigmoid(V) · (ζ - γ) + γ, 0, 1)``: reaches 0 and 1 at finite ``V``. Taught in 11_strongest_ptq.

    >>> rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    tensor([0.0000, 0.5000, 1.0000])
    """
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def rounding_regularizer(h, beta):
    """``Σ (1 - |2h - 1|^β)``: 0 when every ``h`` is 0 or 1, largest at ``h = 1/2``. Taught in 11_strongest_ptq.

    >>> rounding_regularizer(torch.tensor([0.0, 1.0, 0.5]), beta=2.0)
    tensor(1.)
    """
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_schedule(step, iters, warmup=0.2, start=20.0, end=2.0):
    """``β`` at ``step``: ``None`` during the warm-up (no regularizer), then linear from ``start`` to ``end``.

    >>> [beta_schedule(s, 11) for s in (0, 2, 6, 10)]
    [None, 20.0, 11.0, 2.0]
    """
    w = int(warmup * iters)
    if step < w:
        return None
    span = max(iters - 1 - w, 1)
    return start + (end - start) * (step - w) / span


def init_v(w_over_s, zeta=ZETA, gamma=GAMMA):
    """``V`` with ``h(V) = W/s - floor(W/s)`` (``W_soft = W`` at the start): ``-log((ζ-γ)/(rest-γ) - 1)``."""
    rest = w_over_s - torch.floor(w_over_s)
    return -torch.log((zeta - gamma) / (rest - gamma) - 1.0)


def _apply(layer, x, weight):
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def adaround_layer(layer, inputs, targets, scale, qmin, qmax, *, iters=200, lr=1e-2, batch_size=32,
                   reg_weight=0.01, relu=True, seed=0):
    """AdaRound one conv / linear layer; returns ``(codes, floor_codes, w_hat, losses)``. The layer is not changed.

    Taught in 11_strongest_ptq. ``inputs``: what the layer sees in the quantized
    network (``x_q``); ``targets``: the outputs to reconstruct for those same inputs,
    pre-ReLU (``relu=True`` compares after the ReLU); :func:`apply_adaround` passes
    the float layer applied to ``x_q``. Loss per step: the squared error summed over
    output channels, averaged over positions and a mini-batch of ``batch_size``
    inputs, plus ``reg_weight`` (λ) times the rounding regularizer once the warm-up
    of :func:`beta_schedule` is over. ``scale`` broadcasts against
    the weight (one per output channel, or one). Adam on ``V`` with mini-batches
    drawn with ``seed``. ``codes`` are integers in ``[qmin, qmax]``, each equal to
    ``floor_codes`` or ``floor_codes + 1``; ``w_hat = codes · scale``.
    """
    if not isinstance(layer, nn.Conv2d | nn.Linear):
        raise TypeError(f"layer must be an nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must hold the same images, got {inputs.shape[0]} and {targets.shape[0]}")
    w = layer.weight.detach()
    s = torch.as_tensor(scale, dtype=w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))
    floor = torch.floor(w * (1.0 / s))
    v = init_v(w * (1.0 / s)).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    g = torch.Generator().manual_seed(seed)
    act = F.relu if relu else (lambda t: t)
    goal = act(targets.detach())
    losses = []
    for step in range(iters):
        idx = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=g)
        w_soft = s * torch.clamp(floor + rectified_sigmoid(v), qmin, qmax)
        out = act(_apply(layer, inputs[idx], w_soft))
        rec = (out - goal[idx]).pow(2).sum(1).mean()
        beta = beta_schedule(step, iters)
        loss = rec if beta is None else rec + reg_weight * rounding_regularizer(rectified_sigmoid(v), beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(rec.item())
    with torch.no_grad():
        codes = torch.clamp(floor + (v >= 0).to(w.dtype), qmin, qmax)
    return codes, floor, codes * s, losses


def output_error(layer, inputs, targets, weight, relu=True):
    """Mean over images of ``|| f(W x) - f(W_hat x) ||^2`` (summed over channels and positions)."""
    act = F.relu if relu else (lambda t: t)
    with torch.no_grad():
        d = act(_apply(layer, inputs, weight)) - act(targets)
    return float(d.pow(2).reshape(d.shape[0], -1).sum(1).mean())


def apply_adaround(float_model, quant_model, calib_x, bits, granularity="per_channel", *, iters=200, lr=1e-2,
                   batch_size=32, reg_weight=0.01, seed=0):
    """AdaRound every conv / linear of ``quant_model``, in order, in place; returns a per-layer report.

    Taught in 11_strongest_ptq. ``float_model`` and ``quant_model`` start as the same
    BN-folded float network, with the same weights layer by layer (to AdaRound an
    equalized network, pass the equalized float network as ``float_model``: the
    targets come from its layers, so being the same function is not enough). Each layer sees the inputs ``x_q`` produced
    by the layers before it *as already rounded* (activations in float), and its
    target is the float layer of ``float_model`` applied to those same inputs,
    ``f(W x_q)``, not the float network's own activations (the paper's asymmetric
    reconstruction uses ``f(W x)``). Convs are followed by a ReLU (as in SmallCNN /
    TinyMobileNet), the classifier is not.
    Report: ``{name: {"rtn_error", "adaround_error", "on_grid", "seconds"}}`` with the
    output errors of round-to-nearest and AdaRound on the calibration images, and
    whether every code is the weight's floor or ceiling code.
    """
    import time

    from .quant import fake_quantize

    report = {}
    for i, (name, layer) in enumerate(weight_layers(quant_model)):
        start = time.perf_counter()
        inputs = layer_inputs(quant_model, name, calib_x)
        float_layer = float_model.get_submodule(name)
        targets = _apply(float_layer, inputs, float_layer.weight.detach())
        relu = isinstance(layer, nn.Conv2d)
        scale, zp, qmin, qmax, axis = weight_qparams(layer.weight, bits, granularity)
        codes, floor, w_hat, _ = adaround_layer(layer, inputs, targets, scale, qmin, qmax, iters=iters, lr=lr,
                                                batch_size=batch_size, reg_weight=reg_weight, relu=relu,
                                                seed=seed * 1000 + i)
        rtn = fake_quantize(layer.weight.detach(), scale, zp, qmin, qmax, axis=axis)
        on_grid = bool((((codes - floor) == 0) | ((codes - floor) == 1)).all()) and \
            bool((codes == torch.round(codes)).all())
        report[name] = {"rtn_error": output_error(layer, inputs, targets, rtn, relu),
                        "adaround_error": output_error(layer, inputs, targets, w_hat, relu),
                        "on_grid": on_grid, "seconds": time.perf_counter() - start}
        with torch.no_grad():
            layer.weight.copy_(w_hat)
    return report


def fraction_changed(report):
    """Layers where AdaRound's output error is below RTN's, as a fraction (``math.nan`` for no layers)."""
    if not report:
        return math.nan
    return sum(r["adaround_error"] < r["rtn_error"] for r in report.values()) / len(report)
