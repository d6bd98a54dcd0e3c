"""When quantization hurts and what to do about it: sweeps, sensitivity, mixed precision.

Taught in 06_when_qat_pays_off. Five groups of helpers:

- **fair runs**: :func:`finetune_steps` gives every row of a comparison the same
  number of SGD steps on the same data order; :func:`run_sweep` and
  :func:`summarize` repeat a run over configurations and seeds.
- **mixed precision**: :func:`quantizable_layers` names the conv/linear layers,
  :func:`prepare_mixed_qat` gives each its own weight bit width, :func:`calibrate`
  turns a prepared model into a PTQ model, :func:`weight_bytes` counts what the
  weights cost.
- **sensitivity**: :func:`layer_sensitivity` quantizes one layer at a time;
  :func:`activation_sqnr` compares each layer's output with the fp32 model's;
  :func:`channel_ranges` shows why per-tensor weight scales fail after BN folding;
  :func:`choose_high_precision_layers` picks the layers to keep at 8 bits.
- **diagnosing a QAT run that breaks**: :class:`TrainingTrace` records loss,
  per-layer gradient norms, weight changes and how far each channel's batch
  spread drifts from the running statistics a frozen BN divides by;
  :func:`hessian_sharpness` measures the sharpness of the loss, which bounds
  the stable learning rate of SGD with momentum β: ``lr < 2 (1 + β) / λ_max``
  (:func:`stable_lr_limit`).
- **plots**: one message each, ``ax`` in, ``ax`` out.

Signal-to-quantization-noise ratio (SQNR), as everywhere in qatlab::

    SQNR = 10 log10( sum x**2 / sum (x - x_hat)**2 )   dB; +6.02 dB per extra bit
"""

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

_HIGH_BITS = 8


# --- fair runs: fixed steps, same data order --------------------------------------

def _check_int(value, name, low=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def finetune_steps(model, loader, steps, lr, *, momentum=0.9, on_step=None, lr_drop_at=None,
                   lr_drop=0.1, trace=None, recipe=None):
    """Train ``model`` for exactly ``steps`` SGD steps (cycling over ``loader``); return the losses.

    SGD with ``momentum`` and cross-entropy, the same for every row of a
    comparison, so differences come from quantization and not from training.
    ``on_step(step, model)`` runs before each step (e.g. :func:`qatlab.qat.freeze_schedule`).
    From step ``lr_drop_at`` on the learning rate is ``lr * lr_drop``.
    ``trace`` (a :class:`TrainingTrace`) records per-step signals.
    With ``recipe`` (a :class:`qatlab.recipe.QATRecipe`), the optimizer is the recipe's and
    ``recipe.apply(step, model, optimizer)`` sets the learning rate and the freezes before
    each step (then ``lr`` must equal ``recipe.lr``, and ``momentum`` / ``lr_drop_at`` are
    the recipe's). Leaves ``model`` in eval mode. Taught in 06_when_qat_pays_off.

    >>> net = nn.Linear(2, 2)
    >>> data = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]
    >>> len(finetune_steps(net, data, steps=3, lr=0.1))
    3
    """
    _check_int(steps, "steps")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lr_drop_at is not None:
        _check_int(lr_drop_at, "lr_drop_at")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if recipe is not None:
        if lr != recipe.lr or lr_drop_at is not None:
            raise ValueError(f"with a recipe, lr must be recipe.lr ({recipe.lr!r}, got {lr!r}) and lr_drop_at None "
                             f"(got {lr_drop_at!r}): the recipe sets the learning rate")
        opt = recipe.make_optimizer(model.parameters())
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    losses, step = [], 0
    model.train()
    while step < steps:
        seen = 0
        for x, y in loader:
            if step >= steps:
                break
            seen += 1
            if recipe is not None:
                recipe.apply(step, model, opt)
            if on_step is not None:
                on_step(step, model)
            if lr_drop_at is not None and step == lr_drop_at:
                for group in opt.param_groups:
                    group["lr"] = lr * lr_drop
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if trace is not None:
                trace.after_backward(loss)
            opt.step()
            if trace is not None:
                trace.after_step()
            losses.append(loss.item())
            step += 1
        if seen == 0:
            raise ValueError("loader yielded no batches")
    model.eval()
    return losses


def run_sweep(configs, seeds, run, desc="sweep"):
    """``{config: {seed: run(config, seed)}}`` for every configuration and seed, with a progress bar.

    Taught in 06_when_qat_pays_off.

    >>> run_sweep(["a", "b"], [0, 1], lambda c, s: f"{c}{s}", desc=None)
    {'a': {0: 'a0', 1: 'a1'}, 'b': {0: 'b0', 1: 'b1'}}
    """
    from tqdm.auto import tqdm

    configs, seeds = list(configs), list(seeds)
    if not configs or not seeds:
        raise ValueError(f"need at least one config and one seed, got {configs} and {seeds}")
    out = {c: {} for c in configs}
    jobs = [(c, s) for s in seeds for c in configs]
    for c, s in tqdm(jobs, desc=desc, leave=False, disable=desc is None):
        out[c][s] = run(c, s)
    return out


def summarize(results):
    """``{config: (mean, sample std, n)}`` of ``{config: {seed: value}}``.

    Taught in 06_when_qat_pays_off.

    >>> summarize({"x": {0: 1.0, 1: 3.0}})
    {'x': (2.0, 1.4142135623730951, 2)}
    """
    from .stats import mean_std

    return {c: (*mean_std(list(v.values())), len(v)) for c, v in results.items()}


def recovered_fraction_stats(fp32_accs, ptq_accs, qat_accs):
    """Mean and standard error over seeds of QAT's recovered fraction ``(qat - ptq) / (fp32 - ptq)``.

    The three lists are paired by seed (seed ``i``'s PTQ model is seed ``i``'s
    fine-tuned fp32 model, quantized). ``se = std / sqrt(n)`` (sample std).
    Taught in 06_when_qat_pays_off (an exercise).

    >>> m, se = recovered_fraction_stats([98, 98, 98], [78, 88, 83], [96, 96, 95])
    >>> round(m, 3), round(se, 3)
    (0.833, 0.033)
    """
    from .stats import mean_std

    a, b, c = list(fp32_accs), list(ptq_accs), list(qat_accs)
    if not len(a) == len(b) == len(c) >= 2:
        raise ValueError(f"need the same number (>= 2) of seeds in each list, got {len(a)}, {len(b)}, {len(c)}")
    drops = [f - p for f, p in zip(a, b)]
    if min(drops) <= 0:
        raise ValueError(f"PTQ must lose accuracy in every seed to define a recovered fraction, "
                         f"got drops {[round(d, 2) for d in drops]} pp")
    fractions = [(q - p) / d for q, p, d in zip(c, b, drops)]
    mean, std = mean_std(fractions)
    return mean, std / math.sqrt(len(fractions))


# --- mixed precision ----------------------------------------------------------------

def quantizable_layers(model):
    """Names of the float model's ``Conv2d`` / ``Linear`` layers, in order: the layers a qconfig quantizes.

    Taught in 06_when_qat_pays_off.

    >>> from qatlab.models import SmallCNN
    >>> quantizable_layers(SmallCNN())
    ['features.0.0', 'features.1.0', 'features.2.0', 'fc']
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer")
    return names


def _bits_per_layer(layers, weight_bits, default_bits):
    if isinstance(weight_bits, dict):
        unknown = sorted(set(weight_bits) - set(layers))
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; quantizable layers are {layers}")
        return {n: weight_bits.get(n, default_bits) for n in layers}
    return {n: weight_bits for n in layers}


def prepare_mixed_qat(model, weight_bits, activation_bits=8, *, default_bits=8,
                      weight_granularity="per_channel", observer="moving_average", reduce_range=False):
    """Fuse ``model`` for QAT and give each layer its own weight bit width; in place, returns ``model``.

    ``weight_bits`` is one int for every layer or ``{layer name: bits}`` (layers
    not named get ``default_bits``); names are those of :func:`quantizable_layers`.
    Each fused layer gets its own :func:`qatlab.qat.make_qconfig`, then
    ``prepare_qat``. ``reduce_range=False`` by default: fake-quant runs need no
    x86 overflow headroom, so A8 means [0, 255] and A4 [0, 15].
    Taught in 06_when_qat_pays_off.
    """
    from torch.ao.quantization import prepare_qat

    from .qat import make_qconfig

    layers = quantizable_layers(model)
    bits = _bits_per_layer(layers, weight_bits, default_bits)
    qconfigs = {}

    def qconfig(b):
        if b not in qconfigs:
            qconfigs[b] = make_qconfig(b, activation_bits, observer=observer, reduce_range=reduce_range,
                                       weight_granularity=weight_granularity)
        return qconfigs[b]

    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = qconfig(default_bits)
    for name, b in bits.items():
        model.get_submodule(name).qconfig = qconfig(b)
    return prepare_qat(model, inplace=True)


@torch.no_grad()
def calibrate(model, batches, n_batches):
    """PTQ: run ``n_batches`` batches through a prepared model in eval mode so observers set the ranges.

    Returns ``model`` (eval mode, observers still on: evaluate it with
    :func:`qatlab.qat.evaluate_fake_quant`). Taught in 06_when_qat_pays_off.
    """
    _check_int(n_batches, "n_batches", low=1)
    model.eval()
    seen = 0
    for x, _ in batches:
        if seen >= n_batches:
            break
        model(x)
        seen += 1
    if seen < n_batches:
        raise ValueError(f"asked for {n_batches} calibration batches, the loader has {seen}")
    return model


def layer_sizes(model):
    """``{layer: (weights, output channels)}`` of every quantizable layer (see :func:`quantizable_layers`).

    Taught in 06_when_qat_pays_off.

    >>> from qatlab.models import SmallCNN
    >>> layer_sizes(SmallCNN())["fc"]
    (10240, 10)
    """
    return {n: (model.get_submodule(n).weight.numel(), model.get_submodule(n).weight.shape[0])
            for n in quantizable_layers(model)}


def weight_bytes(sizes, weight_bits, default_bits=8):
    """Bytes of packed weights plus one fp32 scale per output channel.

    ``sum over layers of ceil(weights * bits / 8) + 4 * channels``. ``sizes`` is
    :func:`layer_sizes`; ``weight_bits`` an int or ``{layer: bits}``. Biases are
    not counted: they are the same in every variant. Taught in 06_when_qat_pays_off.

    >>> sizes = {"a": (100, 4), "b": (1000, 10)}
    >>> weight_bytes(sizes, 8), weight_bytes(sizes, 2), weight_bytes(sizes, {"b": 2})
    (1156, 331, 406)
    """
    bits = _bits_per_layer(list(sizes), weight_bits, default_bits)
    for name, b in bits.items():
        _check_int(b, f"bits of {name}", low=1)
    return sum(math.ceil(n * bits[k] / 8) + 4 * ch for k, (n, ch) in sizes.items())


def choose_high_precision_layers(drops, sizes, budget_bytes, low_bits=2, high_bits=_HIGH_BITS):
    """The set of layers to keep at ``high_bits`` that loses the least accuracy within a size budget.

    ``drops[layer]``: accuracy lost (pp) when only that layer is at ``low_bits``
    (:func:`layer_sensitivity`). Every other layer goes to ``low_bits``. Among all
    sets whose :func:`weight_bytes` fit ``budget_bytes`` it returns the one whose
    low-bit layers sum to the smallest drop (drops are treated as additive, a
    first-order assumption), ties broken by fewer bytes. Exhaustive: up to 16 layers.
    Taught in 06_when_qat_pays_off (an exercise).

    >>> drops = {"conv0": 1.0, "conv1": 2.0, "conv2": 0.5, "fc": 6.0}
    >>> sizes = {"conv0": (144, 16), "conv1": (4608, 32), "conv2": (18432, 64), "fc": (10240, 10)}
    >>> sorted(choose_high_precision_layers(drops, sizes, budget_bytes=21000))
    ['conv0', 'conv1', 'fc']
    """
    layers = list(sizes)
    if set(drops) != set(layers):
        raise ValueError(f"drops and sizes must name the same layers, got {sorted(drops)} and {sorted(layers)}")
    if len(layers) > 16:
        raise ValueError(f"exhaustive search is for <= 16 layers, got {len(layers)}")
    best = None
    for k in range(len(layers) + 1):
        for keep in itertools.combinations(layers, k):
            bits = {n: (high_bits if n in keep else low_bits) for n in layers}
            size = weight_bytes(sizes, bits)
            if size > budget_bytes:
                continue
            lost = sum(drops[n] for n in layers if n not in keep)
            key = (round(lost, 9), size)
            if best is None or key < best[0]:
                best = (key, set(keep))
    if best is None:
        floor = weight_bytes(sizes, low_bits)
        raise ValueError(f"budget {budget_bytes} bytes is below the all-{low_bits}-bit size {floor} bytes")
    return best[1]


# --- sensitivity --------------------------------------------------------------------

def layer_sensitivity(make_model, layers, low_bits, evaluate, high_bits=_HIGH_BITS):
    """Accuracy with one layer at a time at ``low_bits`` and every other layer at ``high_bits``.

    ``make_model(bits)`` returns a ready-to-evaluate quantized model for a
    ``{layer: bits}`` dict (e.g. :func:`prepare_mixed_qat` + :func:`calibrate`);
    ``evaluate(model)`` returns its accuracy. Returns ``{layer: accuracy}``.
    Taught in 06_when_qat_pays_off.

    >>> layer_sensitivity(lambda b: b, ["a", "b"], 2, evaluate=lambda b: 90 + (b["a"] > 2))
    {'a': 90, 'b': 91}
    """
    _check_int(low_bits, "low_bits", low=1)
    return {name: evaluate(make_model({n: (low_bits if n == name else high_bits) for n in layers}))
            for name in layers}


def layer_outputs(model, x, names):
    """``{name: output}`` of the named submodules for input ``x`` (forward hooks, eval, no grad).

    Quantized tensors are dequantized. Taught in 06_when_qat_pays_off.
    """
    captured, handles = {}, []
    for name in names:
        def hook(module, args, out, name=name):
            captured[name] = (out.dequantize() if out.is_quantized else out).detach().clone()
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in captured]
    if missing:
        raise ValueError(f"modules {missing} did not run in the forward pass")
    return captured


def activation_sqnr(float_model, quantized_model, x, names):
    """Per-layer SQNR (dB) of ``quantized_model``'s layer outputs against ``float_model``'s.

    Both models see the same input ``x``, so the error *propagates*: a layer's
    SQNR includes what the layers before it lost. Our hooks and
    :func:`qatlab.quant.sqnr_db`; the notebook checks them against torch's
    numeric suite (``torch.ao.ns._numeric_suite.compare_model_outputs``).
    Taught in 06_when_qat_pays_off.
    """
    from .quant import sqnr_db

    ref = layer_outputs(float_model, x, names)
    out = layer_outputs(quantized_model, x, names)
    return {n: sqnr_db(ref[n], out[n]) for n in names}


def channel_ranges(model):
    """``{layer: max |w| per output channel}`` of every conv after BN folding (``w * γ / sqrt(var + ε)``).

    A per-tensor weight scale is set by the largest channel; channels whose
    range is ``r`` times smaller get ``log2(r)`` fewer effective bits.
    Works on the float model (conv → BN pairs inside each block).
    Taught in 06_when_qat_pays_off.
    """
    from .qat import folded_weight

    out = {}
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, nn.Sequential) and len(m) >= 2 and isinstance(m[0], nn.Conv2d) \
                and isinstance(m[1], nn.BatchNorm2d):
            w = folded_weight(m[0], m[1])
            out[f"{name}.0"] = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    if not out:
        raise ValueError(f"{type(model).__name__} has no conv -> BatchNorm blocks")
    return out


# --- diagnosing a QAT run that breaks ----------------------------------------------

class TrainingTrace:
    """Per-step signals of a QAT run with fused conv-BN layers, to see where and when it breaks.

    For every fused ``ConvBn(ReLU)2d`` it records after each step:

    - ``grad_norm[layer]``: the norm of the conv weight's gradient;
    - ``weight_change[layer]``: ``||w_after - w_before|| / ||w_before||``;
    - ``spread_ratio[layer]`` (``spread_min[layer]``): the largest (smallest)
      ratio over channels of the *batch* standard deviation of the conv output
      (BN's input) to ``sqrt(running_var + eps)``: the per-channel gain a frozen
      BN applies, ``γ / sqrt(running_var + eps)``, equals the one of batch
      statistics, ``γ / std_batch``, exactly when this ratio is 1;
    - ``mean_shift[layer]``: the largest over channels of
      ``|mean_batch - running_mean| / sqrt(running_var + eps)``: a frozen BN
      subtracts the running mean instead of the batch's, which shifts the
      channel's output by ``γ (mean_batch - running_mean) / sqrt(running_var + eps)``,
      this many of its ``γ`` units (0 when the two means agree);
    - ``loss``.

    Pass it to :func:`finetune_steps` (``trace=``); call :meth:`remove` when done.
    Taught in 06_when_qat_pays_off.
    """

    def __init__(self, model):
        from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, _ConvBnNd)}
        if not self.layers:
            raise ValueError("model has no fused QAT conv-BN layers: fuse and prepare_qat it first")
        self.loss = []
        self.grad_norm = {n: [] for n in self.layers}
        self.weight_change = {n: [] for n in self.layers}
        self.spread_ratio = {n: [] for n in self.layers}
        self.spread_min = {n: [] for n in self.layers}
        self.mean_shift = {n: [] for n in self.layers}
        self._pending = {}
        self._before = {}
        self._handles = [m.bn.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name):
        def hook(bn, args):
            if torch.is_grad_enabled():
                x = args[0].detach()
                per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
                batch_std = per_channel.std(dim=1, unbiased=False)
                running_std = torch.sqrt(bn.running_var + bn.eps)
                ratio = batch_std / running_std
                shift = (per_channel.mean(dim=1) - bn.running_mean).abs() / running_std
                self._pending[name] = (float(ratio.min()), float(ratio.max()), float(shift.max()))
        return hook

    def after_backward(self, loss):
        """Record the loss, gradient norms, BN spread and mean shift of this step (before ``optimizer.step``)."""
        self.loss.append(loss.item())
        for n, m in self.layers.items():
            g = m.weight.grad
            self.grad_norm[n].append(float(g.norm()) if g is not None else 0.0)
            lo, hi, shift = self._pending.get(n, (float("nan"),) * 3)
            self.spread_ratio[n].append(hi)
            self.spread_min[n].append(lo)
            self.mean_shift[n].append(shift)
            self._before[n] = m.weight.detach().clone()

    def after_step(self):
        """Record each layer's relative weight change in this step."""
        for n, m in self.layers.items():
            before = self._before[n]
            self.weight_change[n].append(float((m.weight.detach() - before).norm() / before.norm()))

    def remove(self):
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def frozen_gain(convbn):
    """The per-channel gain ``γ / sqrt(running_var + eps)`` that a fused ConvBn with frozen BN applies.

    Taught in 06_when_qat_pays_off.
    """
    bn = convbn.bn
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


@dataclass(frozen=True)
class Sharpness:
    """Result of :func:`hessian_sharpness`: the largest-magnitude Hessian eigenvalue and how well
    the power iteration converged.

    ``rel_change`` is the relative change of the Rayleigh quotient ``vᵀHv`` over the last
    iteration, ``residual`` is ``||Hv - λv|| / |λ|`` for the final unit vector ``v`` (0 for an
    exact eigenvector); ``converged`` is ``rel_change <= rtol`` on two iterations in a row.
    """

    value: float
    iters: int
    rel_change: float
    residual: float
    converged: bool

    def __float__(self):
        return self.value

    def __str__(self):
        state = "converged" if self.converged else "NOT converged"
        return (f"lambda_max {self.value:.4g} ({state} after {self.iters} iterations: last change "
                f"{self.rel_change:.1e}, residual {self.residual:.2f})")


def hessian_sharpness(model, x, y, max_iters=100, rtol=1e-3, seed=0):
    """Largest eigenvalue of the Hessian of the cross-entropy loss on ``(x, y)``, by power iteration
    run until the Rayleigh quotient settles; returns a :class:`Sharpness`.

    Each iteration is one Hessian-vector product, the gradient of ``grad(loss) · v``
    (Pearlmutter's trick via double backward), and the estimate is the Rayleigh quotient
    ``λ_k = v_kᵀ H v_k`` of the unit vector ``v_k``. The iteration stops when
    ``|λ_k - λ_{k-1}| <= rtol |λ_k|`` on two iterations in a row, or after ``max_iters``
    (then ``converged`` is False: report it, do not trust the digit). Power iteration finds the
    eigenvalue of largest magnitude; it converges slowly when the top two are close. The model's
    current mode decides how BN behaves (train: batch statistics; eval: running statistics);
    buffers (BN statistics, observer state) are restored afterwards. With momentum ``β``, SGD on
    a quadratic with this curvature is stable only for ``lr < 2 (1 + β) / λ_max``
    (:func:`stable_lr_limit`). Checked against ``torch.autograd.functional.hessian`` in the
    tests. Taught in 06_when_qat_pays_off.

    >>> net = nn.Linear(3, 2)
    >>> s = hessian_sharpness(net, torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> s.converged and s.value > 0
    True
    """
    _check_int(max_iters, "max_iters", low=1)
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not rtol >= 0:
        raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")

    def dot(a, b):
        return sum((s * t).sum() for s, t in zip(a, b))

    try:
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = torch.Generator().manual_seed(seed)
        v = [torch.randn(p.shape, generator=g) for p in params]
        norm = torch.sqrt(dot(v, v))
        v = [t / norm for t in v]
        lam, change, settled, k = None, math.inf, 0, 0
        for k in range(1, max_iters + 1):
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            new = float(dot(hv, v))
            if not math.isfinite(new):
                return Sharpness(new, k, math.nan, math.nan, False)
            change = abs(new - lam) / max(abs(new), 1e-30) if lam is not None else math.inf
            lam = new
            residual = float(torch.sqrt(sum(((a - lam * b) ** 2).sum() for a, b in zip(hv, v))) / max(abs(lam), 1e-30))
            settled = settled + 1 if change <= rtol else 0
            norm = torch.sqrt(dot(hv, hv))
            if settled >= 2 or not norm > 0:
                break
            v = [t / norm for t in hv]
    finally:
        model.load_state_dict(buffers, strict=False)
    return Sharpness(lam, k, change, residual, settled >= 2)


def top_hessian_eigenvalue(model, x, y, iters=20, seed=0):
    """Largest Hessian eigenvalue after exactly ``iters`` power iterations (no convergence check).

    Prefer :func:`hessian_sharpness`, which iterates until the estimate settles and says
    whether it did. Taught in 06_when_qat_pays_off.
    """
    _check_int(iters, "iters", low=1)
    return hessian_sharpness(model, x, y, max_iters=iters, rtol=0.0, seed=seed).value


def stable_lr_limit(sharpness, momentum=0.9):
    """Largest stable learning rate of heavy-ball SGD on a quadratic of curvature ``sharpness``: ``2 (1 + β) / λ``.

    (Goh, "Why Momentum Really Works", Distill 2017.) Taught in 06_when_qat_pays_off.

    >>> round(stable_lr_limit(38.0, momentum=0.9), 6)
    0.1
    """
    if not sharpness > 0:
        raise ValueError(f"sharpness must be positive, got {sharpness!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return 2 * (1 + momentum) / sharpness


# --- plots --------------------------------------------------------------------------

def _axes(ax, figsize=(6.5, 3.6)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def _ylim_note(ax, lows, highs, pad=1.0):
    lo = max(0.0, min(lows) - pad)
    ax.set_ylim(lo, min(100.5, max(highs) + pad))
    return "" if lo == 0 else f" (y axis starts at {lo:.0f} %)"


def plot_bit_sweep(curves, ax=None, reference=None, title="accuracy vs weight bits"):
    """Accuracy (mean ± std over seeds) against weight bit width, one line per method.

    ``curves[label] = {bits: (mean, std)}``; fewer bits to the right. Labels
    containing ``"A4"`` are dashed. ``reference=(mean, std)`` draws the fp32
    model as a grey band. Taught in 06_when_qat_pays_off.
    """
    ax = _axes(ax)
    lows, highs = [], []
    if reference is not None:
        m, sd = reference
        ax.axhspan(m - sd, m + sd, color="0.85")
        ax.axhline(m, color="0.4", linewidth=1, label="fp32 fine-tuned (± std)")
        lows.append(m - sd)
        highs.append(m + sd)
    for i, (label, pts) in enumerate(curves.items()):
        bits = sorted(pts, reverse=True)
        mean = [pts[b][0] for b in bits]
        std = [pts[b][1] for b in bits]
        style = "--" if "A4" in label else "-"
        ax.errorbar(bits, mean, yerr=std, marker="o", capsize=3, linestyle=style, label=label,
                    color=f"C{i % 10}")
        lows += [m - s for m, s in zip(mean, std)]
        highs += [m + s for m, s in zip(mean, std)]
    note = _ylim_note(ax, lows, highs)
    all_bits = sorted({b for pts in curves.values() for b in pts})
    ax.set_xticks(all_bits)
    ax.set_xlim(max(all_bits) + 0.5, min(all_bits) - 0.5)
    ax.set(xlabel="weight bits (fewer to the right)", ylabel="test accuracy (%)", title=title + note)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_channel_ranges(ranges, ax=None, title=None):
    """Per-channel ranges ``max |w|`` after BN folding, one column of dots per layer (log scale).

    The bar at the top of each column is the per-tensor range, which sets the
    per-tensor scale for every channel. Taught in 06_when_qat_pays_off.
    """
    ax = _axes(ax, figsize=(7, 3.6))
    names = list(ranges)
    spreads = []
    for i, n in enumerate(names):
        r = ranges[n].detach().numpy()
        jitter = (torch.arange(len(r)) % 7 - 3).numpy() * 0.04
        ax.scatter(i + jitter, r, s=10, alpha=0.7, color="C0", label="one output channel" if i == 0 else None)
        ax.hlines(r.max(), i - 0.3, i + 0.3, color="C3", label="per-tensor range" if i == 0 else None)
        spreads.append(float(r.max() / max(r.min(), 1e-12)))
        ax.text(i, r.min() * 0.7, f"{spreads[-1]:.0f}×", ha="center", va="top", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="max |weight| of a channel (log)",
           title=title or f"folded weight ranges: up to {max(spreads):.0f}× apart within one layer")
    ax.margins(y=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_layer_sqnr(tables, ax=None, title="per-layer SQNR"):
    """Grouped bars: SQNR (dB) per layer, one bar colour per variant. ``tables[label] = {layer: dB}``.

    Taught in 06_when_qat_pays_off.
    """
    import numpy as np

    ax = _axes(ax, figsize=(7, 3.6))
    labels = list(tables)
    layers = list(next(iter(tables.values())))
    width = 0.8 / len(labels)
    x = np.arange(len(layers))
    for i, label in enumerate(labels):
        ax.bar(x + i * width - 0.4 + width / 2, [tables[label][n] for n in layers], width, label=label)
    ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="SQNR (dB, higher is better)", title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _nanmax(values):
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else float("nan")


def plot_freeze_trace(traces, freeze_step, axes=None):
    """Three panels over training steps (log scales): loss, largest batch/running spread ratio, gradient norm.

    ``traces[label] = TrainingTrace``; a dashed line marks ``freeze_step``.
    Taught in 06_when_qat_pays_off.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
        fig.subplots_adjust(wspace=0.45)
    for i, (label, tr) in enumerate(traces.items()):
        steps = range(len(tr.loss))
        axes[0].plot(tr.loss, color=f"C{i}", label=label)
        axes[1].plot([_nanmax(v[t] for v in tr.spread_ratio.values()) for t in steps], color=f"C{i}")
        axes[2].plot([_nanmax(v[t] for v in tr.grad_norm.values()) for t in steps], color=f"C{i}")
    for ax in axes:
        ax.axvline(freeze_step, color="gray", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("training step (dashed: BN frozen)")
    axes[0].set(ylabel="cross-entropy loss", title="loss")
    axes[1].set(ylabel="batch std / running std\n(largest channel)", title="conv outputs vs frozen BN")
    axes[2].set(ylabel="gradient norm (largest layer)", title="weight gradients")
    axes[0].legend(fontsize=8, loc="upper left")
    return axes


def plot_lr_sweep(results, ax=None, title="final accuracy vs learning rate"):
    """Final accuracy against learning rate (log x), one line per variant: ``results[label] = {lr: acc}``.

    Taught in 06_when_qat_pays_off.
    """
    ax = _axes(ax)
    for i, (label, pts) in enumerate(results.items()):
        lrs = sorted(pts)
        ax.plot(lrs, [pts[r] for r in lrs], marker="o", label=label, color=f"C{i}")
    ax.axhline(10, color="0.5", linestyle=":", linewidth=1, label="chance (10 classes)")
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set(xlabel="learning rate (SGD, momentum 0.9; log)", ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_sharpness(curves, limits, ax=None, title="sharpness of the loss and the stable learning rates"):
    """Largest Hessian eigenvalue against training step, one line per run, and the limit of each learning rate.

    ``curves[label] = {step: λ_max}`` (non-finite values are left out);
    ``limits[lr] = 2 (1 + β) / lr`` (:func:`stable_lr_limit` solved for λ), drawn
    as horizontal lines named in the legend: a curve above a line means SGD at that
    learning rate is unstable there (on a quadratic). Log y axis. Taught in 06_when_qat_pays_off.
    """
    ax = _axes(ax)
    for i, (label, pts) in enumerate(curves.items()):
        steps = [t for t in sorted(pts) if math.isfinite(pts[t])]
        ax.plot(steps, [pts[t] for t in steps], marker="o", label=label, color=f"C{i}")
    styles = ["--", ":", "-."]
    for j, lr in enumerate(sorted(limits)):
        ax.axhline(limits[lr], color="0.4", linestyle=styles[j % 3], linewidth=1,
                   label=f"stability limit of lr {lr:g}")
    ax.set_xticks(sorted({t for pts in curves.values() for t in pts}))
    ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="largest Hessian eigenvalue (log)", title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_pareto(points, ax=None, title="size vs accuracy"):
    """Accuracy (mean ± std) against weight kilobytes; ``points[label] = [(bytes, mean, std, tag), ...]``.

    Points of one label are joined in order of size. Taught in 06_when_qat_pays_off.
    """
    ax = _axes(ax, figsize=(7, 4))
    markers = "osD^v<>"
    lows, highs = [], []
    for i, (label, pts) in enumerate(points.items()):
        pts = sorted(pts)
        kb = [p[0] / 1000 for p in pts]
        ax.errorbar(kb, [p[1] for p in pts], yerr=[p[2] for p in pts], marker=markers[i % 7], capsize=3,
                    linestyle="-" if len(pts) > 1 else "none", label=label, color=f"C{i}")
        for p, k in zip(pts, kb):
            ax.annotate(p[3], (k, p[1]), textcoords="offset points", xytext=(4, 6 if i % 2 else -11),
                        fontsize=7, color=f"C{i}")
        lows += [p[1] - p[2] for p in pts]
        highs += [p[1] + p[2] for p in pts]
    note = _ylim_note(ax, lows, highs)
    ax.set(xlabel="weight storage (kB, packed weights + per-channel scales)", ylabel="test accuracy (%)",
           title=title + note)
    ax.set_xlim(left=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
