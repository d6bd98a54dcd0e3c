"""A plain post-training quantization harness: W{b}A8 fake quantization of a BN-folded model.

Taught in 11_strongest_ptq, where it is the common ground on which CLE
(:mod:`qatlab.equalize`), bias correction (:mod:`qatlab.bias_correction`) and
AdaRound (:mod:`qatlab.adaround`) are compared with round-to-nearest (RTN).

- **weights**: symmetric, per-tensor or per-output-channel, min/max range, as torch's
  ``MinMaxObserver`` / ``PerChannelMinMaxObserver`` with ``per_*_symmetric`` give::

      scale = max|W| / ((qmax - qmin) / 2),   W_hat = clamp(round(W / scale), qmin, qmax) · scale

  (:func:`qatlab.quant.choose_qparams` and :func:`qatlab.quant.fake_quantize`, bit for
  bit torch's).
- **activations**: the input of every conv / linear layer, affine uint8 per-tensor,
  min/max over the calibration batches (a forward pre-hook).
"""

import copy
from typing import Literal

import torch
from torch import nn

from .quant import choose_qparams, fake_quantize, quant_range

Granularity = Literal["per_tensor", "per_channel"]


def weight_layers(model):
    """``[(name, module)]`` of every ``nn.Conv2d`` / ``nn.Linear`` of ``model``, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


class _Captured(Exception):
    """Raised by :func:`layer_inputs`'s hook: the layers after the one captured need not run."""


def layer_inputs(model, name, x, batch_size=256):
    """The inputs that layer ``name`` of ``model`` receives on images ``x``, concatenated.

    Each forward pass stops at the layer (its hook raises), so the layers after it cost
    nothing: capturing every layer of an L-layer network in turn runs about L/2 networks'
    worth of layers, not L. Used by AdaRound and bias correction, which need each layer's
    inputs with the layers before it already rounded.
    """
    module = model.get_submodule(name)
    ins = []

    def hook(_m, args):
        ins.append(args[0].detach())
        raise _Captured

    n_batches = -(-len(x) // batch_size)
    h = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                try:
                    model(x[i:i + batch_size])
                except _Captured:
                    pass
    finally:
        h.remove()
    if len(ins) != n_batches:
        raise ValueError(f"layer {name!r} ran in {len(ins)} of {n_batches} forward passes of the model: "
                         f"its inputs need a layer that runs in every forward pass")
    return torch.cat(ins)


def weight_qparams(w, bits, granularity: Granularity = "per_channel"):
    """``(scale, zero_point, qmin, qmax, axis)`` of a symmetric ``bits``-bit weight grid.

    Taught in 11_strongest_ptq. Per-channel: one scale per output channel (axis 0).

    >>> s, zp, qmin, qmax, axis = weight_qparams(torch.tensor([[1.0, -3.0], [0.5, 0.25]]), 4)
    >>> s, (qmin, qmax), axis
    (tensor([0.4000, 0.0667]), (-8, 7), 0)
    """
    if granularity not in ("per_tensor", "per_channel"):
        raise ValueError(f"granularity must be 'per_tensor' or 'per_channel', got {granularity!r}")
    qmin, qmax = quant_range(bits)
    w = w.detach()
    if granularity == "per_channel":
        flat = w.reshape(w.shape[0], -1)
        scale, zp = choose_qparams(flat.amin(1), flat.amax(1), qmin, qmax, symmetric=True)
        return scale, zp, qmin, qmax, 0
    scale, zp = choose_qparams(w.min(), w.max(), qmin, qmax, symmetric=True)
    return scale, zp, qmin, qmax, None


@torch.no_grad()
def quantize_weights(model, bits, granularity: Granularity = "per_channel", skip=()):
    """Round-to-nearest: replace every conv / linear weight by its fake-quantized copy, in place.

    Taught in 11_strongest_ptq. Layers named in ``skip`` keep their float weights
    (e.g. those AdaRound already set). Returns ``{name: scale}``.
    """
    scales = {}
    for name, m in weight_layers(model):
        scale, zp, qmin, qmax, axis = weight_qparams(m.weight, bits, granularity)
        scales[name] = scale
        if name not in skip:
            m.weight.copy_(fake_quantize(m.weight, scale, zp, qmin, qmax, axis=axis))
    return scales


class ActivationQuant:
    """Forward pre-hooks that fake-quantize every conv / linear input to ``bits``-bit affine uint8.

    Taught in 11_strongest_ptq. While ``calibrating`` the hooks record each input's
    min and max (over every batch seen); afterwards they apply
    ``(clamp(round(x / s) + zp, 0, 2^bits - 1) - zp) · s`` with the min/max qparams.
    ``remove()`` takes the hooks off.
    """

    def __init__(self, model, bits=8):
        self.bits, self.calibrating = bits, True
        self.ranges, self._handles = {}, []
        self.qmin, self.qmax = quant_range(bits, signed=False)
        for name, m in weight_layers(model):
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, args):
            x = args[0]
            if self.calibrating:
                lo, hi = float(x.min()), float(x.max())
                old = self.ranges.get(name, (lo, hi))
                self.ranges[name] = (min(lo, old[0]), max(hi, old[1]))
                return None
            lo, hi = self.ranges[name]
            scale, zp = choose_qparams(lo, hi, self.qmin, self.qmax)
            return (fake_quantize(x, scale, zp, self.qmin, self.qmax),)
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def quantize_activations(model, calib_batches, bits=8):
    """Calibrate min/max of every conv / linear input on ``calib_batches``, then fake-quantize them.

    Taught in 11_strongest_ptq. Returns the :class:`ActivationQuant` (call ``.remove()``
    to go back to float activations).
    """
    aq = ActivationQuant(model, bits)
    model.eval()
    for x in calib_batches:
        model(x)
    if not aq.ranges:
        raise ValueError("calib_batches was empty: no activation range was measured")
    aq.calibrating = False
    return aq


@torch.no_grad()
def correct(model, x, y, batch_size=500):
    """Per-image correctness (bool) of ``model`` on images ``x`` with labels ``y``, in eval mode."""
    model.eval()
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) == y


def calibration_images(data, n, seed):
    """``n`` training images drawn at random with ``seed`` (the random part of every PTQ method)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(data.x_train):
        raise ValueError(f"n must be an int in 1..{len(data.x_train)}, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    return data.x_train[torch.randperm(len(data.x_train), generator=g)[:n]]


def clone(model):
    """A deep copy in eval mode (every PTQ method starts from its own copy of the folded model)."""
    return copy.deepcopy(model).eval()
