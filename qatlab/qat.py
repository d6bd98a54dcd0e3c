"""Quantization-aware training helpers: n-bit qconfigs, the freeze schedule, and LSQ.

Taught in 04_qat_training; the eager helpers are reused by 05_deployment.

The helpers are thin on purpose: the notebook shows the torch calls
(``fuse_modules_qat`` → ``prepare_qat`` → train → ``disable_observer`` /
``freeze_bn_stats`` → ``convert``) and uses these only to repeat them.

Integer ranges (signed symmetric weights, unsigned affine activations)::

    weights      b bits: [-2**(b-1), 2**(b-1) - 1]      e.g. 4 bits: [-8, 7]
    activations  b bits: [0, 2**b - 1]                  e.g. 8 bits: [0, 255]
                 reduce_range (x86/fbgemm): one bit less, 8 bits: [0, 127]

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) makes the
step size ``s`` a trained parameter::

    x_hat = clamp(round(x / s), qmin, qmax) * s
    d x_hat / d s = round(x/s) - x/s   inside the range
                  = qmin or qmax       below / above it
    and the gradient of s is multiplied by g = 1 / sqrt(N * qmax),
    N = number of elements that share the step size.
"""

import contextlib
import math
from typing import Literal

import torch
from torch import nn

BITS_MIN, BITS_MAX = 2, 8
Observer = Literal["moving_average", "minmax", "histogram"]
_OBSERVERS = ("moving_average", "minmax", "histogram")
Granularity = Literal["per_channel", "per_tensor"]
_GRANULARITIES = ("per_channel", "per_tensor")


def _check_bits(bits, what="bits"):
    if isinstance(bits, bool) or not isinstance(bits, int) or not BITS_MIN <= bits <= BITS_MAX:
        raise ValueError(f"{what} must be an int in {BITS_MIN}..{BITS_MAX}, got {bits!r}")
    return bits


def weight_qrange(bits):
    """Signed symmetric integer range ``(qmin, qmax)`` for ``bits``-bit weights.

    Taught in 04_qat_training.

    >>> weight_qrange(8), weight_qrange(4), weight_qrange(3)
    ((-128, 127), (-8, 7), (-4, 3))
    >>> weight_qrange(1)
    Traceback (most recent call last):
    ...
    ValueError: weight bits must be an int in 2..8, got 1
    """
    _check_bits(bits, "weight bits")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def activation_qrange(bits, reduce_range=False):
    """Unsigned integer range ``(0, qmax)`` for ``bits``-bit activations.

    ``reduce_range=True`` drops one bit, as torch's x86 (fbgemm) default does
    so that its int8 kernels cannot overflow. Taught in 04_qat_training.

    >>> activation_qrange(8), activation_qrange(8, reduce_range=True), activation_qrange(4)
    ((0, 255), (0, 127), (0, 15))
    """
    _check_bits(bits, "activation bits")
    return 0, 2 ** (bits - 1 if reduce_range else bits) - 1


def make_qconfig(weight_bits=8, activation_bits=8, *, fake_quant=True,
                 observer: Observer = "moving_average", reduce_range=True,
                 weight_granularity: Granularity = "per_channel"):
    """An eager-mode ``QConfig`` for ``weight_bits``-bit weights and ``activation_bits``-bit activations.

    Weights are per-channel symmetric (``qint8`` containers), activations per-tensor
    affine (``quint8``), as in torch's x86 default. ``weight_granularity="per_tensor"``
    gives one symmetric scale for the whole weight tensor instead of one per output
    channel, ``scale = max|w| / ((qmax - qmin) / 2)`` as torch computes it (taught in
    06_when_qat_pays_off, where it breaks a depthwise-separable net). ``fake_quant=True`` gives
    FakeQuantize modules (for ``prepare_qat``, or fake-quant PTQ);
    ``fake_quant=False`` gives bare observers (for ``prepare`` → ``convert`` PTQ).
    ``observer`` picks how activation ranges are measured: ``"moving_average"``
    (QAT), ``"minmax"`` or ``"histogram"`` (PTQ calibration). Weights use a
    min/max observer of their granularity (moving average for ``"moving_average"``).

    With the defaults it matches ``torch.ao.quantization.get_default_qat_qconfig("x86")``; its
    fake-quantizer is :class:`qatlab.fast_fake_quant.FastFusedMovingAvgObsFakeQuantize`, torch's
    class with the same numbers from a faster per-tensor path:

    >>> qc = make_qconfig(8, 8)
    >>> fq = qc.weight()
    >>> (fq.quant_min, fq.quant_max, fq.dtype, fq.qscheme)
    (-128, 127, torch.qint8, torch.per_channel_symmetric)
    >>> act = make_qconfig(4, 8).activation()
    >>> (act.quant_min, act.quant_max, make_qconfig(4, 8).weight().quant_max)
    (0, 127, 7)
    >>> make_qconfig(weight_bits=9)
    Traceback (most recent call last):
    ...
    ValueError: weight bits must be an int in 2..8, got 9
    >>> make_qconfig(4, 8, weight_granularity="per_tensor").weight().qscheme
    torch.per_tensor_symmetric
    >>> make_qconfig(weight_granularity="per_row")
    Traceback (most recent call last):
    ...
    ValueError: weight_granularity must be one of per_channel, per_tensor, got 'per_row'

    Taught in 04_qat_training.
    """
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.fake_quantize import FakeQuantize
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
    )

    from .fast_fake_quant import FastFusedMovingAvgObsFakeQuantize

    wmin, wmax = weight_qrange(weight_bits)
    amin, amax = activation_qrange(activation_bits, reduce_range=reduce_range)
    if observer not in _OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(_OBSERVERS)}, got {observer!r}")
    if not isinstance(fake_quant, bool):
        raise TypeError(f"fake_quant must be a bool, got {fake_quant!r}")
    if weight_granularity not in _GRANULARITIES:
        raise ValueError(f"weight_granularity must be one of {', '.join(_GRANULARITIES)}, "
                         f"got {weight_granularity!r}")
    act_obs = {"moving_average": MovingAverageMinMaxObserver, "minmax": MinMaxObserver,
               "histogram": HistogramObserver}[observer]
    act_args = dict(quant_min=amin, quant_max=amax, dtype=torch.quint8,
                    qscheme=torch.per_tensor_affine)
    if weight_granularity == "per_channel":
        w_obs = MovingAveragePerChannelMinMaxObserver if observer == "moving_average" \
            else PerChannelMinMaxObserver
        w_args = dict(quant_min=wmin, quant_max=wmax, dtype=torch.qint8,
                      qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        w_obs = MovingAverageMinMaxObserver if observer == "moving_average" else MinMaxObserver
        w_args = dict(quant_min=wmin, quant_max=wmax, dtype=torch.qint8,
                      qscheme=torch.per_tensor_symmetric)
    if not fake_quant:
        return QConfig(activation=act_obs.with_args(**act_args), weight=w_obs.with_args(**w_args))
    # torch.ao's fused fake-quantizer, its per-tensor fake quantization as vectorized ops (same numbers)
    fq = FastFusedMovingAvgObsFakeQuantize if observer == "moving_average" else FakeQuantize
    return QConfig(activation=fq.with_args(observer=act_obs, **act_args),
                   weight=fq.with_args(observer=w_obs, **w_args))


def prepare_eager_qat(model, qconfig=None):
    """``model.train()`` → ``fuse_model(is_qat=True)`` → ``qconfig`` → ``prepare_qat``, in place.

    The four calls the notebook shows once; ``qconfig`` defaults to
    :func:`make_qconfig` ``(8, 8)`` (torch's x86 QAT default). Returns ``model``.
    Taught in 04_qat_training, reused in 05_deployment.
    """
    from torch.ao.quantization import prepare_qat

    if not hasattr(model, "fuse_model"):
        raise TypeError(f"model must have a fuse_model(is_qat) method, got {type(model).__name__}")
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = make_qconfig() if qconfig is None else qconfig
    return prepare_qat(model, inplace=True)


def allow_train_eval(graph_module):
    """Let an exported (PT2E) model take ``.train()`` / ``.eval()``, and keep ``.training`` true to it.

    Calls torchao's ``allow_exported_model_train_eval`` (which maps the two calls
    to ``move_exported_model_to_train/eval``) and also sets ``.training``, which
    torchao leaves untouched, so that code which saves and restores the mode
    (``qatlab.evaluate``) restores the right one. Returns the model.
    Taught in 04_qat_training.
    """
    import types

    from torchao.quantization.pt2e import (
        allow_exported_model_train_eval,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    from .patterns import pattern_cache
    from .provenance import shared_provenance

    allow_exported_model_train_eval(graph_module)

    # the switches act on ``self``: a deep copy of the model switches itself, not the original
    def train(self, mode=True):
        with pattern_cache(), shared_provenance():   # torchao matches dropout/BN patterns on every switch: exported once
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    graph_module.train = types.MethodType(train, graph_module)
    graph_module.eval = types.MethodType(eval, graph_module)
    return graph_module


# --- the freeze schedule ------------------------------------------------------------

def freeze_schedule(freeze_observers_at=None, freeze_bn_at=None):
    """A callback ``(t, model)`` that freezes observers and BN statistics on a schedule.

    From ``t >= freeze_observers_at`` every FakeQuantize stops updating its
    scale and zero-point (``torch.ao.quantization.disable_observer``); from
    ``t >= freeze_bn_at`` every fused conv-BN uses its running mean/variance
    and stops updating them (``torch.ao.nn.intrinsic.qat.freeze_bn_stats``).
    ``None`` never freezes. ``t`` is whatever you count: epochs (pass the
    callback as ``qatlab.train(on_epoch_start=...)``) or steps (see
    :func:`call_every_step`). Taught in 04_qat_training.

    >>> cb = freeze_schedule(freeze_observers_at=2, freeze_bn_at=1)
    >>> [cb.plan(t) for t in range(3)]
    [(False, False), (False, True), (True, True)]
    """
    for name, at in (("freeze_observers_at", freeze_observers_at), ("freeze_bn_at", freeze_bn_at)):
        if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
            raise ValueError(f"{name} must be None or a non-negative int, got {at!r}")

    def plan(t):
        """``(observers_frozen, bn_frozen)`` at time ``t``."""
        return (freeze_observers_at is not None and t >= freeze_observers_at,
                freeze_bn_at is not None and t >= freeze_bn_at)

    def callback(t, model):
        from torch.ao.nn.intrinsic.qat import freeze_bn_stats
        from torch.ao.quantization import disable_observer

        observers, bn = plan(t)
        if observers:
            model.apply(disable_observer)
            for m in _fake_quants(model):  # torchao's PT2E FakeQuantize is another class
                m.disable_observer()
        if bn:
            model.apply(freeze_bn_stats)
            if isinstance(model, torch.fx.GraphModule):  # an exported (PT2E) model: edit the graph
                freeze_pt2e_bn_stats(model)

    callback.plan = plan
    return callback


_BN_TRAINING_ARG = 5  # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)


def freeze_pt2e_bn_stats(graph_module):
    """Freeze the BatchNorm statistics of an exported (PT2E) model in place; return how many BNs changed.

    An exported graph has no BN modules to ``freeze_bn_stats``: each BN is an
    ATen op whose ``training`` argument (index 5) is baked into the graph.
    Setting it to ``False`` makes the BN normalise with its running statistics
    and stop updating them, which is what eager ``freeze_bn_stats`` does; the
    graph is recompiled when something changed. This is how torchao's PT2E QAT
    tutorial freezes BN ("Quantization Aware Training (QAT) with PT2E").
    ``move_exported_model_to_train`` sets the flag back, so call this again
    after it (:func:`freeze_schedule` does, at every step). Taught in 04_qat_training.

    >>> import torch
    >>> g = torch.export.export(torch.nn.BatchNorm1d(2).train(), (torch.randn(4, 2),)).module()
    >>> freeze_pt2e_bn_stats(g), freeze_pt2e_bn_stats(g)
    (1, 0)
    """
    if not isinstance(graph_module, torch.fx.GraphModule):
        raise TypeError(f"graph_module must be a torch.fx.GraphModule (an exported model), "
                        f"got {type(graph_module).__name__}")
    targets = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
               torch.ops.aten.cudnn_batch_norm.default, torch.ops.aten.miopen_batch_norm.default}
    changed = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in targets and node.args[_BN_TRAINING_ARG]:
            args = list(node.args)
            args[_BN_TRAINING_ARG] = False
            node.args = tuple(args)
            changed += 1
    if changed:
        graph_module.recompile()
    return changed


def call_every_step(model, fn):
    """Call ``fn(step, model)`` before every training-mode forward of ``model``.

    ``step`` counts from 0. Returns the hook handle (``.remove()`` it when
    done). This lets an epoch-based schedule such as :func:`freeze_schedule`
    run at step granularity. Taught in 04_qat_training.
    """
    state = {"step": 0}

    def hook(module, args):
        if module.training:
            fn(state["step"], module)
            state["step"] += 1

    return model.register_forward_pre_hook(hook)


def _fake_quants(model):
    """FakeQuantize modules of torch.ao (eager) and torchao (PT2E): anything with the two switches."""
    return [m for m in model.modules()
            if hasattr(m, "observer_enabled") and hasattr(m, "disable_observer")]


@contextlib.contextmanager
def observers_disabled(model):
    """Temporarily switch off every FakeQuantize's observer (restored on exit).

    Evaluate a QAT model inside this block: otherwise the observers, which
    stay on in ``eval()`` mode, would fit their ranges to the test data.
    Taught in 04_qat_training.
    """
    saved = [(m, m.observer_enabled.clone()) for m in _fake_quants(model)]
    try:
        for m, _ in saved:
            m.disable_observer()
        yield model
    finally:
        for m, flag in saved:
            m.observer_enabled.copy_(flag)


def evaluate_fake_quant(model, loader):
    """Top-1 % of a fake-quantized model, with its observers off (see :func:`observers_disabled`)."""
    from .training import evaluate

    with observers_disabled(model):
        return evaluate(model, loader)


def track_qparams(fake_quant):
    """Record ``(scale, zero_point)`` of a FakeQuantize after every training forward.

    Returns ``(trace, handle)``: ``trace`` is a dict of lists ``scale`` and
    ``zero_point`` (first channel for per-channel), growing as you train.
    A forward counts as training when autograd is on: ``module.training`` is
    not enough, because once BN is frozen ``model.eval()`` no longer reaches
    the children of a fused ConvBn (torch's ``ConvBn.train`` skips them).
    Taught in 04_qat_training.
    """
    trace = {"scale": [], "zero_point": []}

    def hook(module, args, out):
        if module.training and torch.is_grad_enabled():
            trace["scale"].append(float(module.scale.flatten()[0]))
            trace["zero_point"].append(int(module.zero_point.flatten()[0]))

    return trace, fake_quant.register_forward_hook(hook)


def folded_weight(conv, bn=None):
    """The weight that is quantized for a conv followed by BN: ``w * gamma / sqrt(var + eps)``.

    Accepts a plain ``Conv2d`` with its ``BatchNorm2d``, or a fused QAT
    ``ConvBn(ReLU)2d`` (which carries its own ``.bn``). Taught in 04_qat_training.
    """
    bn = getattr(conv, "bn", None) if bn is None else bn
    if bn is None:
        return conv.weight.detach().clone()
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (conv.weight * factor.reshape(-1, *([1] * (conv.weight.dim() - 1)))).detach()


def recovered_fraction(fp32_acc, ptq_acc, qat_acc):
    """How much of PTQ's accuracy drop QAT wins back: ``(qat - ptq) / (fp32 - ptq)``.

    ``nan`` when there is no drop to recover. Taught in 04_qat_training.

    >>> recovered_fraction(98.0, 94.0, 97.0)
    0.75
    >>> recovered_fraction(98.0, 98.0, 97.0)
    nan
    """
    drop = fp32_acc - ptq_acc
    return float("nan") if drop <= 0 else (qat_acc - ptq_acc) / drop


# --- LSQ: learned step size, from scratch --------------------------------------------

def lsq_grad_scale(numel, qmax):
    """LSQ's gradient scale ``g = 1 / sqrt(numel * qmax)``.

    ``numel`` is the number of elements sharing one step size. Taught in 04_qat_training.

    >>> lsq_grad_scale(100, 4)
    0.05
    """
    if not (isinstance(numel, int) and numel > 0):
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    if not (isinstance(qmax, int) and qmax > 0):
        raise ValueError(f"qmax must be a positive int, got {qmax!r}")
    return 1.0 / math.sqrt(numel * qmax)


def scale_gradient(x, g):
    """Return ``x`` unchanged, but multiply the gradient flowing back into it by ``g``.

    ``(x - g*x).detach() + g*x``: the forward value is ``x`` (up to round-off), the
    backward is ``g * upstream``. Taught in 04_qat_training (an exercise).

    >>> s = torch.tensor(2.0, requires_grad=True)
    >>> scale_gradient(s, 0.1).backward(); s.grad
    tensor(0.1000)
    """
    return (x - g * x).detach() + g * x


def _channel_view(scale, x, ch_axis):
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return scale.reshape(shape)


class LSQFakeQuantizeFunction(torch.autograd.Function):
    """LSQ fake-quant with the paper's gradients written out by hand.

    ``forward(x, scale, qmin, qmax, grad_scale, ch_axis)`` returns
    ``clamp(round(x / s), qmin, qmax) * s`` (round half to even); ``scale`` has
    one element (per tensor) or one per channel along ``ch_axis``. Backward:
    ``dx`` = upstream inside the range, 0 outside (straight-through, clipped);
    ``ds`` = sum of upstream * (``round(x/s) - x/s`` inside, ``qmin``/``qmax``
    outside) * ``grad_scale``. Taught in 04_qat_training.

    "Inside" means ``qmin <= x/s <= qmax``, as in the paper's ``round(clip(x/s))``.
    torch's ``_fake_quantize_learnable_per_*_affine`` tests ``round(x/s)``
    instead, so it differs from this in the half-step bands just outside the range.
    """

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_scale, ch_axis=0):
        s = _channel_view(scale, x, ch_axis)
        v = x * (1.0 / s)  # multiply by the reciprocal, like torch's kernel
        ctx.save_for_backward(v)
        ctx.info = (scale.shape, qmin, qmax, grad_scale, ch_axis)
        return torch.clamp(torch.round(v), qmin, qmax) * s

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        shape, qmin, qmax, grad_scale, ch_axis = ctx.info
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        grad_x = grad * inside
        ds = torch.where(below, float(qmin), torch.where(above, float(qmax), torch.round(v) - v))
        ds = grad * ds
        if math.prod(shape) == 1:
            grad_s = ds.sum().reshape(shape)
        else:
            dims = [d for d in range(v.dim()) if d != ch_axis]
            grad_s = ds.sum(dim=dims).reshape(shape)
        return grad_x, grad_s * grad_scale, None, None, None, None


def lsq_fake_quantize(x, scale, qmin, qmax, grad_scale=1.0, ch_axis=0):
    """Functional LSQ fake-quant (see :class:`LSQFakeQuantizeFunction`).

    >>> x = torch.tensor([0.26, -1.0, 3.0])
    >>> lsq_fake_quantize(x, torch.tensor([0.5]), -4, 3)
    tensor([ 0.5000, -1.0000,  1.5000])

    Taught in 04_qat_training.
    """
    if qmin >= qmax:
        raise ValueError(f"need qmin < qmax, got qmin={qmin!r}, qmax={qmax!r}")
    return LSQFakeQuantizeFunction.apply(x, scale, qmin, qmax, grad_scale, ch_axis)


class LSQFakeQuantize(nn.Module):
    """A weight fake-quantizer whose step size is an ``nn.Parameter`` (LSQ, symmetric).

    ``channels`` step sizes (1 = per tensor), initialised on the first forward
    (per channel) by ``init``: ``"paper"`` is LSQ's ``2 * mean(|w|) / sqrt(qmax)``;
    ``"minmax"`` is the symmetric min/max step ``max(|w|) / ((qmax - qmin) / 2)``,
    the step a min/max observer would choose. The gradient of the step
    size is scaled by ``g = 1 / sqrt(N * qmax)`` with ``N`` the elements per
    step size. Drop-in for a QAT module's ``weight_fake_quant``
    (see :func:`use_lsq_weights`). Taught in 04_qat_training.

    >>> fq = LSQFakeQuantize(bits=4, channels=2)
    >>> w = torch.tensor([[0.1, -0.2], [0.4, 0.8]])
    >>> fq(w).shape, fq.scale.requires_grad
    (torch.Size([2, 2]), True)
    >>> mm = LSQFakeQuantize(bits=4, channels=2, init="minmax")
    >>> _ = mm(w); mm.scale.detach() * 7.5  # max |w| per channel over (qmax - qmin) / 2
    tensor([0.2000, 0.8000])
    """

    def __init__(self, bits=4, channels=1, init: Literal["paper", "minmax"] = "paper"):
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = weight_qrange(bits)
        if not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if init not in ("paper", "minmax"):
            raise ValueError(f"init must be 'paper' or 'minmax', got {init!r}")
        self.init = init
        self.scale = nn.Parameter(torch.ones(channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init_scale(self, w):
        flat = w.detach().reshape(w.shape[0], -1) if self.scale.numel() > 1 else w.reshape(1, -1)
        if self.init == "paper":
            init = 2 * flat.abs().mean(dim=1) / math.sqrt(self.qmax)
        else:
            init = flat.abs().amax(dim=1) / ((self.qmax - self.qmin) / 2)
        self.scale.copy_(init.clamp_min(1e-8))
        self.initialized.fill_(True)

    def forward(self, w):
        if not bool(self.initialized):
            self._init_scale(w)
        per = w.numel() // self.scale.numel()
        g = lsq_grad_scale(per, self.qmax)
        return lsq_fake_quantize(w, self.scale, self.qmin, self.qmax, g, ch_axis=0)

    def extra_repr(self):
        return (f"bits={self.bits}, channels={self.scale.numel()}, qrange=[{self.qmin}, {self.qmax}], "
                f"init={self.init}")


def use_lsq_weights(model, bits=4, init="paper"):
    """Replace every ``weight_fake_quant`` of a ``prepare_qat`` model by :class:`LSQFakeQuantize`.

    Activations keep their FakeQuantize. ``init`` picks the step-size
    initialisation (see :class:`LSQFakeQuantize`). Build the optimizer *after*
    this call, so it sees the new step-size parameters. Returns ``model``.
    Taught in 04_qat_training.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "weight_fake_quant") and hasattr(module, "weight"):
            module.weight_fake_quant = LSQFakeQuantize(bits, channels=module.weight.shape[0], init=init)
            n += 1
    if n == 0:
        raise ValueError("model has no weight_fake_quant modules: call prepare_qat on it first")
    return model


# --- plots --------------------------------------------------------------------------

def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 3.5))
    return ax


def plot_loss_curves(histories, ax=None, smooth=10):
    """Training loss per step (moving average over ``smooth`` steps, drawn at each window's centre), one line per run.

    ``histories`` maps a label to a :func:`qatlab.train` history. Taught in 04_qat_training.
    """
    import numpy as np

    ax = _axes(ax)
    for label, h in histories.items():
        loss = np.asarray(h["step_loss"], dtype=float)
        k = max(1, min(smooth, len(loss)))
        averaged = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(averaged)) + (k - 1) / 2, averaged, label=label)  # at each window's centre
    ax.set(xlabel="training step", ylabel=f"loss (mean of {smooth} steps)", title="training loss")
    ax.legend(fontsize=8)
    return ax


def plot_accuracy_curves(curves, ax=None):
    """Test accuracy against training step, one line per run: ``{label: (steps, accs)}``.

    Taught in 04_qat_training.
    """
    ax = _axes(ax)
    for label, (steps, accs) in curves.items():
        ax.plot(steps, accs, marker="o", label=label)
    ax.set(xlabel="training step", ylabel="test accuracy (%)", title="test accuracy")
    ax.legend(fontsize=8)
    return ax


def plot_qparams(trace, ax=None, freeze_step=None, title="activation qparams during QAT"):
    """Scale per step from :func:`track_qparams`; the zero-point too, on a right axis, if it moved.

    A zero-point that never changes (e.g. 0 after a ReLU, whose minimum is 0)
    is written in the legend instead of drawn as a flat line.
    Taught in 04_qat_training.
    """
    ax = _axes(ax)
    ax.plot(trace["scale"], color="C0", label="scale")
    ax.set(xlabel="training step", ylabel="scale (input units per integer step)", title=title)
    lines = []
    zps = set(trace["zero_point"])
    if len(zps) > 1:
        ax2 = ax.twinx()
        ax2.plot(trace["zero_point"], color="C1", drawstyle="steps-post", label="zero-point")
        ax2.set_ylabel("zero-point (integer)")
        lines += ax2.get_lines()
    elif zps:
        ax.plot([], [], " ", label=f"zero-point: {zps.pop()} at every step")
    if freeze_step is not None:
        ax.axvline(freeze_step, color="gray", linestyle="--", label="observers frozen")
    lines = ax.get_lines() + lines
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.02 if len(zps) <= 1 else 1.12, 1.0))
    return ax


def plot_weight_histograms(before, after, ax=None, step=None, bins=80,
                           labels=("before QAT", "after QAT")):
    """Overlaid histograms of two weight tensors; with ``step``, one bin per grid point.

    With ``step`` the bin edges are the rounding boundaries ``(k + 1/2) * step``,
    so each bar counts the weights that round to grid point ``k * step``.
    Taught in 04_qat_training.
    """
    import numpy as np

    ax = _axes(ax)
    b, a = before.detach().flatten().numpy(), after.detach().flatten().numpy()
    lo, hi = min(b.min(), a.min()), max(b.max(), a.max())
    if step is not None:
        k = int(math.ceil(max(abs(lo), abs(hi)) / step))
        edges = (np.arange(-k, k + 2) - 0.5) * step
        ax.hist([b, a], bins=edges, label=list(labels))
        ax.set_xlabel(f"weight value (bins: one per grid point, step {step:.3g})")
    else:
        ax.hist(b, bins=bins, range=(lo, hi), alpha=0.5, label=labels[0])
        ax.hist(a, bins=bins, range=(lo, hi), alpha=0.5, label=labels[1])
        ax.set_xlabel("weight value")
    ax.set(ylabel="number of weights", title="weights (BN folded)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_weight_shift(before, after, step, ax=None, title=None):
    """Histogram of how far each weight moved, in units of its quantization step.

    ``step`` is one step per output channel (or a scalar). Bars are 0.05 step
    wide; the dashed lines at ±1/2 step mark the distance beyond which a weight
    that sat on a grid point would round to its neighbour. Weights that moved
    more than 1.5 steps are counted in the outermost bars. Taught in 04_qat_training.
    """
    import numpy as np

    ax = _axes(ax)
    step = torch.as_tensor(step, dtype=before.dtype)
    if step.numel() > 1:
        step = step.reshape(-1, *([1] * (before.dim() - 1)))
    shift = ((after - before) / step).detach().flatten().numpy()
    edges = np.linspace(-1.5, 1.5, 61)
    ax.hist(np.clip(shift, -1.5, 1.5), bins=edges, color="C0")
    for x in (-0.5, 0.5):
        ax.axvline(x, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="change of the weight during QAT (in quantization steps)",
           ylabel="number of weights", title=title or "how far QAT moved each weight")
    return ax


def _row_color(label):
    low = label.lower()
    return "C7" if low.startswith("fp32") else "C1" if low.startswith("ptq") else "C0"


def plot_accuracy_table(rows, ax=None, title="same checkpoint, same extra epochs", points=None):
    """Horizontal bars of ``{label: (mean, std)}`` test accuracies, with ±1 std error bars.

    Bars are coloured by method (grey: fp32, orange: PTQ, blue: QAT, from the
    label's first word); ``points`` (``{label: [accuracy per seed]}``) adds one
    dot per seed. The x-axis does not start at 0 (it says so). Taught in 04_qat_training.
    """
    ax = _axes(ax)
    labels = list(rows)
    means = [rows[k][0] for k in labels]
    stds = [rows[k][1] for k in labels]
    ys = list(range(len(labels)))
    ax.barh(ys, means, xerr=stds, color=[_row_color(k) for k in labels], alpha=0.85, capsize=3)
    if points:
        for y, k in zip(ys, labels):
            pts = points.get(k, [])
            ax.plot(pts, [y] * len(pts), "k.", markersize=4)
    lows = [m - max(s, 0.0) for m, s in zip(means, stds)] + [p for k in (points or {}) for p in points[k]]
    highs = [m + max(s, 0.0) for m, s in zip(means, stds)] + [p for k in (points or {}) for p in points[k]]
    ax.set_xlim(max(0.0, min(lows) - 1.0), min(100.0, max(highs) + 0.6))
    for y, m in zip(ys, means):
        ax.text(ax.get_xlim()[1], y, f" {m:.2f}", va="center", fontsize=8)
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()
    n = len(next(iter(points.values()))) if points else None
    extra = f"; bars: mean ± 1 std over {n} seeds, dots: seeds" if n else ""
    ax.set(xlabel=f"test accuracy (%) — axis does not start at 0{extra}", title=title)
    from matplotlib.patches import Patch

    used = dict.fromkeys(_row_color(k) for k in labels)
    names = {"C7": "fp32", "C1": "PTQ", "C0": "QAT"}
    ax.legend(handles=[Patch(color=c, alpha=0.85, label=names[c]) for c in used], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.14, 1.0))
    return ax
