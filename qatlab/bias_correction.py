"""Bias correction: put back the mean shift that quantized weights add to a layer's output.

Taught in 11_strongest_ptq. Nagel, van Baalen, Blankevoort, Welling, "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019
(arXiv:1906.04721), section 4.2.

With ``ε = W_hat - W`` the quantization error of a layer's weights, its output is
``W_hat x = W x + ε x``, whose mean over the data is off by ``ε E[x]``, one number per
output channel. Rounding errors do not cancel in that sum when ``E[x]`` is large
(after a ReLU every input is >= 0), so subtract it from the bias::

    b_corrected = b - ε E[x]                      (for a conv: Σ over input channels
                                                    and kernel positions of ε · E[x_c])

Two ways to know ``E[x]``:

- **empirical**: run calibration images through the network quantized so far, and take
  the mean over images and positions of ``conv(x, ε)`` directly (this also counts the
  zero padding at the borders);
- **analytic (data-free)**: the layer before is BN → ReLU, so its pre-activation of
  channel ``c`` is roughly ``N(β_c, γ_c²)`` and after the ReLU (Nagel et al. eq. 19)::

      E[relu(z)] = μ Φ(μ / σ) + σ φ(μ / σ),      z ~ N(μ, σ²)

  (``Φ``, ``φ``: the standard normal CDF and density). Padding is ignored, and the
  first layer (whose input is the image, with no BN before it) is left alone.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .equalize import relu_conv_chain
from .ptq import layer_inputs, weight_layers


def relu_gaussian_mean(mu, sigma):
    """``E[max(0, z)]`` for ``z ~ N(mu, sigma²)``: ``mu Φ(mu/sigma) + sigma φ(mu/sigma)``. Taught in 11_strongest_ptq.

    >>> relu_gaussian_mean(torch.tensor([0.0, 5.0, -5.0]), torch.tensor([1.0, 1.0, 1.0]))
    tensor([3.9894e-01, 5.0000e+00, 5.3462e-08])
    """
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64).abs()
    if bool((sigma == 0).any()):
        return torch.where(sigma == 0, mu.clamp(min=0), relu_gaussian_mean(mu, sigma.clamp(min=1e-30))).float()
    t = mu / sigma
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return (mu * cdf + sigma * pdf).float()


def mean_shift(layer, weight_error, input_mean):
    """``ε E[x]`` per output channel for a conv / linear, from the per-input-channel means ``E[x_c]``.

    Taught in 11_strongest_ptq. Conv: ``Σ_{c, kh, kw} ε[o, c, kh, kw] E[x_c]`` (a depthwise
    conv's filter ``o`` sees channel ``o`` only); linear: ``ε @ E[x]``.
    """
    e = weight_error.detach()
    m = torch.as_tensor(input_mean, dtype=e.dtype)
    if isinstance(layer, nn.Linear):
        return e @ m
    if layer.groups == 1:
        return (e.sum(dim=(2, 3)) * m.unsqueeze(0)).sum(1)
    if layer.groups == layer.in_channels == layer.out_channels:
        return e.sum(dim=(1, 2, 3)) * m
    raise ValueError(f"grouped conv with groups={layer.groups} is not supported")


@torch.no_grad()
def correct_bias(layer, shift):
    """``b -= ε E[x]`` in place (a layer without bias gets one). Returns the shift."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    layer.bias.sub_(shift.to(layer.bias.dtype))
    return shift


def _conv_error_mean(layer, x, weight_error, batch_size=256):
    total, n = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if isinstance(layer, nn.Conv2d):
            y = F.conv2d(xb, weight_error, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            total = total + y.sum(dim=(0, 2, 3))
            n += y.shape[0] * y.shape[2] * y.shape[3]
        else:
            y = F.linear(xb, weight_error)
            total = total + y.sum(0)
            n += y.shape[0]
    return total / n


@torch.no_grad()
def apply_empirical_bias_correction(float_model, quant_model, calib_x, batch_size=256):
    """Empirical bias correction of every conv / linear of ``quant_model``, in order, in place.

    Taught in 11_strongest_ptq. ``quant_model`` holds quantized weights,
    ``float_model`` the same network in float (same layer names). Layer by layer,
    the inputs come from ``quant_model`` with every earlier layer already corrected,
    and ``E[conv(x, ε)]`` over images and positions is subtracted from the bias.
    Returns ``{name: shift}``.
    """
    shifts = {}
    for name, layer in weight_layers(quant_model):
        ins = layer_inputs(quant_model, name, calib_x, batch_size)
        err = layer.weight.detach() - float_model.get_submodule(name).weight.detach()
        shifts[name] = correct_bias(layer, _conv_error_mean(layer, ins, err))
    return shifts


def bn_input_means(bn_model, folded_model):
    """``{layer name: E[x]}`` of every conv / linear input after a BN → ReLU, from BN's ``β`` and ``γ`` alone.

    Taught in 11_strongest_ptq. ``bn_model`` is the network before folding (its BN
    layers give ``μ = β``, ``σ = |γ|`` of each pre-activation); ``folded_model`` the
    folded (and possibly equalized) one whose layers are corrected. Equalization
    divides output channel ``c`` by ``s_c``, which divides ``μ`` and ``σ`` alike:
    ``s_c`` is read off as the ratio of the channel's weight range before and after.
    The classifier after an average pool sees the same means (pooling is linear),
    repeated over the pooled positions.
    """
    from .fusion import fold_model_bn

    bns = [m for m in bn_model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    plain = relu_conv_chain(fold_model_bn(bn_model))
    convs = relu_conv_chain(folded_model)
    if not (len(bns) == len(plain) == len(convs)):
        raise ValueError(f"models do not match: {len(bns)} BN layers, {len(plain)} and {len(convs)} convs")
    names = {id(m): n for n, m in folded_model.named_modules()}
    means = {}
    for bn, before, after, nxt in zip(bns, plain, convs, convs[1:] + [None]):
        r0 = before.weight.detach().abs().reshape(before.weight.shape[0], -1).amax(1)
        r1 = after.weight.detach().abs().reshape(after.weight.shape[0], -1).amax(1)
        ratio = torch.where(r0 > 0, r1 / torch.where(r0 > 0, r0, torch.ones_like(r0)), torch.ones_like(r0))
        m = relu_gaussian_mean(bn.bias.detach() * ratio, bn.weight.detach() * ratio)
        if nxt is not None:
            means[names[id(nxt)]] = m
        else:
            fc = [(n, mod) for n, mod in folded_model.named_modules() if isinstance(mod, nn.Linear)]
            if len(fc) == 1:
                name, lin = fc[0]
                means[name] = m.repeat_interleave(lin.in_features // m.numel())
    return means


@torch.no_grad()
def apply_analytic_bias_correction(float_model, quant_model, input_means):
    """Data-free bias correction: ``b -= ε E[x]`` with ``E[x]`` from :func:`bn_input_means`; in place.

    Taught in 11_strongest_ptq. Layers missing from ``input_means`` (the first conv)
    are left alone. Returns ``{name: shift}``.
    """
    shifts = {}
    for name, layer in weight_layers(quant_model):
        if name not in input_means:
            continue
        err = layer.weight.detach() - float_model.get_submodule(name).weight.detach()
        shifts[name] = correct_bias(layer, mean_shift(layer, err, input_means[name]))
    return shifts
