"""Cross-layer equalization (CLE): rescale conv → ReLU → conv chains so per-tensor scales fit every channel.

Taught in 11_strongest_ptq. Nagel, van Baalen, Blankevoort, Welling, "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019
(arXiv:1906.04721), section 4.1.

ReLU is positively homogeneous: ``relu(x / s) = relu(x) / s`` for ``s > 0``. So for
two layers with a ReLU between them, dividing output channel ``i`` of the first
layer (its weights and bias) by ``s_i`` and multiplying input channel ``i`` of the
second layer's weights by ``s_i`` leaves the network's function unchanged, in exact
arithmetic::

    W1'[i] = W1[i] / s_i,   b1'[i] = b1[i] / s_i,   W2'[:, i] = W2[:, i] * s_i

The choice that maximizes the smaller of the two layers' per-channel precisions
(the paper's eq. 10) makes both ranges equal::

    r1_i = max |W1[i, ...]|      (output channel i of layer 1)
    r2_i = max |W2[:, i, ...]|   (input channel i of layer 2)
    s_i  = sqrt(r1_i / r2_i)     →  r1_i / s_i = r2_i · s_i = sqrt(r1_i r2_i)

A depthwise second layer (``groups = channels``) has one filter per channel, so its
"input channel i" is its filter ``i``. A chain ``a → b → c`` is equalized pair by pair,
repeatedly, until the scales stop moving (the paper iterates the same way).
BatchNorm must be folded first (:func:`qatlab.fusion.fold_model_bn`).
"""

import torch
from torch import nn


def _check_pair(first, second):
    for name, m in (("first", first), ("second", second)):
        if not isinstance(m, nn.Conv2d | nn.Linear):
            raise TypeError(f"{name} must be an nn.Conv2d or nn.Linear, got {type(m).__name__}")
    out1 = first.weight.shape[0]
    depthwise = isinstance(second, nn.Conv2d) and second.groups > 1
    if depthwise and not (second.groups == second.in_channels == second.out_channels):
        raise ValueError(f"second is a grouped conv with groups={second.groups}: only depthwise "
                         f"(groups = in = out channels) or ungrouped layers can be equalized")
    in2 = second.weight.shape[0] if depthwise else second.weight.shape[1]
    if out1 != in2:
        raise ValueError(f"first has {out1} output channels but second takes {in2} input channels")
    return depthwise


def equalization_scales(first, second):
    """``s_i = sqrt(r1_i / r2_i)`` for the channels between two layers (1.0 where a range is 0).

    Taught in 11_strongest_ptq. ``r1_i`` is the largest magnitude in output channel
    ``i`` of ``first``, ``r2_i`` that of input channel ``i`` of ``second`` (filter
    ``i`` when ``second`` is depthwise).

    >>> a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad(): _ = a.weight.copy_(torch.tensor([[4.0, 1.0], [0.5, 0.2]])); _ = b.weight.fill_(1.0)
    >>> equalization_scales(a, b)
    tensor([2.0000, 0.7071])
    """
    depthwise = _check_pair(first, second)
    w1, w2 = first.weight.detach(), second.weight.detach()
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(dim=1)
    if depthwise:
        r2 = w2.abs().reshape(w2.shape[0], -1).amax(dim=1)
    else:
        r2 = w2.abs().transpose(0, 1).reshape(w2.shape[1], -1).amax(dim=1)
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))


@torch.no_grad()
def equalize_pair(first, second, scales=None):
    """Rescale ``first``'s output channels by ``1/s`` and ``second``'s input channels by ``s``, in place.

    Taught in 11_strongest_ptq. ``scales`` defaults to :func:`equalization_scales`.
    Only valid with a positively homogeneous function (ReLU, identity, average
    pooling) between the two. Returns the scales used.

    >>> a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    >>> x = torch.randn(5, 3); before = b(torch.relu(a(x)))
    >>> _ = equalize_pair(a, b)
    >>> bool(torch.allclose(b(torch.relu(a(x))), before, atol=1e-6))
    True
    """
    depthwise = _check_pair(first, second)
    s = equalization_scales(first, second) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
    if s.shape != (first.weight.shape[0],) or not bool((s > 0).all()):
        raise ValueError(f"scales must be {first.weight.shape[0]} positive numbers, got shape {tuple(s.shape)}")
    shape1 = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.div_(s.reshape(shape1).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.div_(s.to(first.bias.dtype))
    if depthwise:
        second.weight.mul_(s.reshape((-1,) + (1,) * (second.weight.dim() - 1)).to(second.weight.dtype))
    else:
        second.weight.mul_(s.reshape((1, -1) + (1,) * (second.weight.dim() - 2)).to(second.weight.dtype))
    return s


def equalize_chain(layers, iterations=20, tol=1e-4):
    """Equalize consecutive pairs of ``layers`` (each followed by a ReLU), repeatedly; in place.

    Taught in 11_strongest_ptq. One pass equalizes ``(layers[0], layers[1])``,
    ``(layers[1], layers[2])``, ...; a middle layer is rescaled on both sides, so
    passes repeat until every scale of a pass is within ``tol`` of 1 or after
    ``iterations`` passes. Returns the number of passes made.
    """
    layers = list(layers)
    if len(layers) < 2:
        raise ValueError(f"a chain needs at least two layers, got {len(layers)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    for n in range(1, iterations + 1):
        moved = 0.0
        for a, b in zip(layers, layers[1:]):
            s = equalize_pair(a, b)
            moved = max(moved, float((s - 1).abs().max()))
        if moved < tol:
            return n
    return iterations


def relu_conv_chain(model):
    """The ``Conv2d`` layers of a folded SmallCNN / TinyMobileNet in order: each feeds the next through a ReLU.

    Taught in 11_strongest_ptq. Looks at ``model.features`` (the layers whose
    output goes through BN-folded ``Sequential(conv, Identity, ReLU)`` blocks).
    The last conv feeds the pooling and classifier, which are left alone.
    """
    if not hasattr(model, "features"):
        raise TypeError(f"model must have a .features stack of conv blocks, got {type(model).__name__}")
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    if any(isinstance(m, nn.BatchNorm2d) for m in model.features.modules()):
        raise ValueError("fold BatchNorm first (qatlab.fusion.fold_model_bn): CLE rescales conv weights and biases")
    return convs


def equalize_model(model, iterations=20):
    """CLE on a BN-folded SmallCNN / TinyMobileNet, in place (see :func:`relu_conv_chain`); returns ``model``.

    Taught in 11_strongest_ptq.
    """
    equalize_chain(relu_conv_chain(model), iterations=iterations)
    return model


def channel_ranges(layer):
    """``max |W|`` of each output channel of a conv / linear weight (what a per-tensor scale must cover)."""
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(dim=1)
