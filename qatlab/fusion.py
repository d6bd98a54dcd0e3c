"""BatchNorm folding by hand, fused-vs-unfused measurements, and the views of notebook 03.

Taught in 03_fusion. In eval mode a BatchNorm is a fixed per-channel affine map,
so it can be folded into the convolution (or Linear) in front of it::

    bn(conv(x)) = γ · (W*x + b − μ) / √(σ² + ε) + β
                = (W · s) * x + (b − μ) · s + β          with  s = γ / √(σ² + ε)

    W' = W · s        (s broadcast over the output-channel dimension 0)
    b' = (b − μ) · s + β

``fold_bn`` returns that new module and leaves its inputs alone; it agrees with
``torch.nn.utils.fusion.fuse_conv_bn_eval`` to float32 round-off.
"""

import copy
import statistics
import time
from typing import Literal

import torch
from torch import nn

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _check_bn(bn):
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.training:
        raise ValueError(f"{bn} is in training mode: it normalises with batch statistics, which "
                         "cannot be folded; call .eval() first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} has no running statistics (track_running_stats=False): "
                         "there is nothing fixed to fold")


def bn_scale(bn):
    """The per-channel multiplier a BatchNorm applies in eval mode: ``s = γ / √(σ² + ε)``.

    Taught in 03_fusion. ``γ`` is ``bn.weight`` (1 when ``affine=False``), ``σ²`` is
    ``bn.running_var``.

    >>> bn = nn.BatchNorm1d(2).eval()
    >>> bn.running_var.fill_(4.0 - bn.eps)
    tensor([4.0000, 4.0000])
    >>> bn_scale(bn)
    tensor([0.5000, 0.5000])
    """
    _check_bn(bn)
    with torch.no_grad():
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        return (gamma / torch.sqrt(bn.running_var + bn.eps)).detach().clone()


def fold_bn(conv, bn):
    """A new conv (or Linear) that computes ``bn(conv(x))`` in eval mode. Taught in 03_fusion.

    ``W' = W · γ/√(σ²+ε)`` (per output channel) and ``b' = (b − μ) · γ/√(σ²+ε) + β``,
    with ``b = 0`` when the conv has no bias. Works for Conv1d/2d/3d (grouped and
    depthwise too: dimension 0 of the weight is always the output channel) and for
    ``Linear`` followed by ``BatchNorm1d``. ``conv`` and ``bn`` are not modified.

    >>> conv = nn.Conv2d(4, 4, 3, groups=2, bias=False)
    >>> bn = nn.BatchNorm2d(4).eval()
    >>> folded = fold_bn(conv, bn)
    >>> x = torch.randn(1, 4, 5, 5)
    >>> torch.allclose(folded(x), bn(conv(x)), atol=1e-6), conv.bias is None
    (True, True)
    """
    if not isinstance(conv, _FOLDABLE):
        raise TypeError(f"conv must be a Conv1d/2d/3d or Linear, got {type(conv).__name__}")
    _check_bn(bn)
    out_channels = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if bn.num_features != out_channels:
        raise ValueError(f"channel mismatch: {type(conv).__name__} has {out_channels} output "
                         f"channels but {type(bn).__name__} has num_features={bn.num_features}")
    s = bn_scale(bn)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(s)
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(s)
        shape = (-1,) + (1,) * (w.dim() - 1)                 # s per output channel (dim 0)
        folded.weight = nn.Parameter((w * s.reshape(shape)).to(w.dtype))
        folded.bias = nn.Parameter(((b - bn.running_mean) * s + beta).to(w.dtype))
    return folded.eval()


def fold_model_bn(model):
    """A copy of ``model`` in eval mode with every conv/Linear → BatchNorm pair folded.

    Taught in 03_fusion. Pairs are found inside ``nn.Sequential`` containers (as in
    ``SmallCNN``'s blocks): the conv is replaced by :func:`fold_bn`'s result and the
    BatchNorm by ``nn.Identity``. ``model`` itself is not modified.

    >>> from qatlab.models import SmallCNN
    >>> folded = fold_model_bn(SmallCNN().eval())
    >>> sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    0
    """
    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = seq._modules[first], seq._modules[second]
            if isinstance(conv, _FOLDABLE) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                seq._modules[first] = fold_bn(conv, bn)
                seq._modules[second] = nn.Identity()
    return folded


def conv_bn_pairs(model):
    """``[(name, conv, bn), ...]`` for each conv/Linear directly followed by a BatchNorm
    in an ``nn.Sequential`` of ``model`` (the layers the widget of 03_fusion shows)."""
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq.named_children())
        for (n1, conv), (_, bn) in zip(items, items[1:]):
            if isinstance(conv, _FOLDABLE) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                pairs.append((f"{name}.{n1}" if name else n1, conv, bn))
    return pairs


# ---------------------------------------------------------------------------
# measuring fused vs unfused
# ---------------------------------------------------------------------------

def time_forward(model, x, repeats=30, warmup=5, threads=2):
    """Median wall time of ``model(x)`` in seconds. Taught in 03_fusion.

    Runs ``warmup`` untimed calls, then ``repeats`` timed ones, under
    ``torch.inference_mode`` with ``torch.set_num_threads(threads)`` (restored after).
    """
    return _time_many([model], x, repeats, warmup, threads)[0]


def _time_many(models, x, repeats, warmup, threads):
    if not (isinstance(repeats, int) and repeats > 0):
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if not (isinstance(threads, int) and threads > 0):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = [[] for _ in models]
    try:
        with torch.inference_mode():
            for model in models:
                for _ in range(warmup):
                    model(x)
            for _ in range(repeats):  # interleaved: a busy neighbour slows both alike
                for i, model in enumerate(models):
                    start = time.perf_counter()
                    model(x)
                    times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return [statistics.median(t) for t in times]


def measure_fusion(unfused, fused, x, repeats=30, warmup=5, threads=2):
    """Compare an unfused model with its fused copy on the same input. Taught in 03_fusion.

    Returns a dict: ``max_abs_diff`` (largest ``|unfused(x) − fused(x)|``),
    ``unfused_ms`` and ``fused_ms`` (median latency, see :func:`time_forward`;
    the two are timed interleaved) and ``speedup = unfused_ms / fused_ms``.

    >>> from qatlab.models import SmallCNN
    >>> model = SmallCNN().eval()
    >>> x = torch.randn(2, 1, 28, 28)
    >>> m = measure_fusion(model, fold_model_bn(model), x, repeats=3, warmup=1, threads=1)
    >>> m["max_abs_diff"] < 1e-4, sorted(m)
    (True, ['fused_ms', 'max_abs_diff', 'speedup', 'unfused_ms'])
    """
    with torch.inference_mode():
        diff = (unfused(x).double() - fused(x).double()).abs().max().item()
    t_unfused, t_fused = _time_many([unfused, fused], x, repeats, warmup, threads)
    return {"max_abs_diff": diff, "unfused_ms": 1e3 * t_unfused, "fused_ms": 1e3 * t_fused,
            "speedup": t_unfused / t_fused}


# ---------------------------------------------------------------------------
# why fold before quantizing
# ---------------------------------------------------------------------------

def fake_quantize_weight(w, scheme: Literal["per_tensor", "per_channel"] = "per_channel", bits=8):
    """Symmetric signed fake-quantization of a weight (per output channel or per tensor).

    Taught in 03_fusion; built on :func:`qatlab.quant.fake_quantize`. The range is
    ``[-max|w|, max|w|]`` of the tensor or of each output channel (dimension 0), with
    torch's symmetric step ``max|w| / ((quant_max − quant_min) / 2)``.

    >>> w = torch.tensor([[1.0, 0.5], [0.01, 0.02]])
    >>> fake_quantize_weight(w, "per_tensor", bits=4)   # the small channel rounds to 0
    tensor([[0.9333, 0.5333],
            [0.0000, 0.0000]])
    >>> fake_quantize_weight(w, "per_channel", bits=4)  # each channel keeps its own step
    tensor([[0.9333, 0.5333],
            [0.0107, 0.0187]])
    """
    from .quant import choose_qparams, fake_quantize, quant_range

    if scheme not in ("per_tensor", "per_channel"):
        raise ValueError(f"scheme must be 'per_tensor' or 'per_channel', got {scheme!r}")
    qmin, qmax = quant_range(bits)
    w = w.detach()
    if scheme == "per_tensor":
        scale, zp = choose_qparams(w.min(), w.max(), qmin, qmax, symmetric=True)
        return fake_quantize(w, scale, zp, qmin, qmax)
    flat = w.reshape(w.shape[0], -1)
    scale, zp = choose_qparams(flat.min(1).values, flat.max(1).values, qmin, qmax, symmetric=True)
    return fake_quantize(w, scale, zp, qmin, qmax, axis=0)


def _fake_quantize_activation(y, bits):
    from .quant import choose_qparams, fake_quantize, quant_range

    qmin, qmax = quant_range(bits, signed=False)
    scale, zp = choose_qparams(y.min(), y.max(), qmin, qmax)
    return fake_quantize(y, scale, zp, qmin, qmax)


def measure_fold_error(conv, bn, x, scheme: Literal["per_tensor", "per_channel"] = "per_channel",
                       bits=8):
    """Quantization error of conv → BN done separately vs folded first. Taught in 03_fusion.

    The reference is the float ``y = bn(conv(x))`` (eval mode). Two int8 versions:

    - **separate**: the conv runs with fake-quantized ``W``; its output, the tensor
      that exists between two unfused ops, is fake-quantized (unsigned affine,
      min/max of this batch); then the BN runs with a fake-quantized scale
      ``s = γ/√(σ²+ε)`` (symmetric, per tensor) and a float shift.
    - **folded**: one conv with fake-quantized ``W' = W·s`` and float bias ``b'``.

    Weights use ``scheme`` (symmetric, ``bits`` bits). Returns a dict with the two
    mean squared errors against ``y`` (``separate_mse``, ``folded_mse``), their
    ``ratio = separate_mse / folded_mse``, and each weight's error
    (``weight_mse_separate`` for ``q(W)·s``, ``weight_mse_folded`` for ``q(W·s)``,
    both against ``W·s``).
    """
    folded = fold_bn(conv, bn)
    s = bn_scale(bn)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    with torch.no_grad():
        y = bn(conv(x))
        w_q = fake_quantize_weight(conv.weight, scheme, bits)
        y_conv = conv._conv_forward(x, w_q, conv.bias) if hasattr(conv, "_conv_forward") \
            else nn.functional.linear(x, w_q, conv.bias)
        y_conv = _fake_quantize_activation(y_conv, bits)
        s_q = fake_quantize_weight(s, "per_tensor", bits)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(s)
        shift = beta - bn.running_mean * s
        y_sep = y_conv * s_q.reshape(shape) + shift.reshape(shape)
        wf_q = fake_quantize_weight(folded.weight, scheme, bits)
        y_fold = folded._conv_forward(x, wf_q, folded.bias) if hasattr(folded, "_conv_forward") \
            else nn.functional.linear(x, wf_q, folded.bias)
        w_shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        sep_mse = (y_sep - y).pow(2).mean().item()
        fold_mse = (y_fold - y).pow(2).mean().item()
        return {
            "separate_mse": sep_mse,
            "folded_mse": fold_mse,
            "ratio": sep_mse / fold_mse,
            "weight_mse_separate": (w_q * s.reshape(w_shape) - folded.weight).pow(2).mean().item(),
            "weight_mse_folded": (wf_q - folded.weight).pow(2).mean().item(),
        }


# ---------------------------------------------------------------------------
# PT2E graphs
# ---------------------------------------------------------------------------

def format_nodes(graph_module, last_target="batch_norm", skip=0):
    """Lines ``name = target(args)`` of the compute nodes that feed one node. Taught in 03_fusion.

    The node is the ``skip``-th (from 0) whose target name contains ``last_target``
    (default: the first ``batch_norm``, i.e. the first conv-BN block). Listed are it and
    every ``call_function``/``call_module`` node it depends on, in graph order, which
    prints one conv-BN block of an exported or PT2E-prepared graph.
    """
    nodes = [n for n in graph_module.graph.nodes if n.op in ("call_function", "call_module")]
    hits = [n for n in nodes if last_target in _target_name(n)]
    if len(hits) <= skip:
        raise ValueError(f"the graph has {len(hits)} nodes matching {last_target!r}, "
                         f"so skip={skip} is out of range")
    keep, todo = set(), [hits[skip]]
    while todo:
        node = todo.pop()
        if node in keep or node.op not in ("call_function", "call_module"):
            continue
        keep.add(node)
        todo.extend(node.all_input_nodes)
    return [f"{n.name} = {_target_name(n)}({', '.join(str(a) for a in n.args)})"
            for n in nodes if n in keep]


def _target_name(node):
    return getattr(node.target, "__name__", str(node.target))


# ---------------------------------------------------------------------------
# plots and the widget view
# ---------------------------------------------------------------------------

def _axes(ax, figsize=(5, 3.2)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_bn_scale(bn, ax=None, title=None):
    """Bar chart of each channel's BN scale ``γ/√(σ²+ε)``. Taught in 03_fusion."""
    s = bn_scale(bn)
    ax = _axes(ax)
    ax.bar(range(len(s)), s.numpy(), color="tab:purple")
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="output channel", ylabel="γ/√(σ²+ε)", title=title or "BN scale per channel")
    return ax


def plot_weight_range(conv, bn=None, ax=None, title=None):
    """Per-channel min/max of the (folded, if ``bn`` is given) weight, with the one
    per-tensor range drawn across. Taught in 03_fusion."""
    w = (fold_bn(conv, bn) if bn is not None else conv).weight.detach()
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.min(1).values.numpy(), flat.max(1).values.numpy()
    ax = _axes(ax)
    channels = range(len(lo))
    ax.vlines(channels, lo, hi, color="tab:blue", lw=3, label="per-channel range")
    bound = float(flat.abs().max())
    ax.axhline(bound, color="tab:red", ls="--", lw=1, label="per-tensor ±max|w|")
    ax.axhline(-bound, color="tab:red", ls="--", lw=1)
    ax.set(xlabel="output channel", ylabel="weight value",
           title=title or ("folded weight range" if bn is not None else "weight range"))
    ax.set_ylim(-1.35 * bound, 1.6 * bound)  # headroom for the legend
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    return ax


def plot_fold_layer(model, layer=0, axes=None):
    """The BN scale and the folded weight range of one layer, side by side. Taught in 03_fusion.

    ``layer`` indexes :func:`conv_bn_pairs`. Returns the two axes.
    """
    import matplotlib.pyplot as plt

    pairs = conv_bn_pairs(model)
    if not (isinstance(layer, int) and 0 <= layer < len(pairs)):
        raise ValueError(f"layer must be an int in [0, {len(pairs)}), got {layer!r}")
    name, conv, bn = pairs[layer]
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    plot_bn_scale(bn, ax=axes[0], title=f"{name}: BN scale γ/√(σ²+ε)")
    plot_weight_range(conv, bn, ax=axes[1], title=f"{name}: folded weight W·s")
    s = bn_scale(bn).abs()
    axes[0].figure.suptitle(f"scale spread max/min = {float(s.max() / s.min()):.1f}×", fontsize=9)
    axes[0].figure.tight_layout()
    return axes


def show_fold_layer(model, layer=0):
    """Draw :func:`plot_fold_layer` and show it: what the ipywidgets view of 03_fusion calls."""
    import matplotlib.pyplot as plt

    plot_fold_layer(model, layer)
    plt.show()


def explore_fold_layers(model):
    """The ipywidgets view of 03_fusion: a layer slider over :func:`show_fold_layer`
    (:func:`qatlab.interactive.interact`: drawn once for layer 0 in a headless run)."""
    from ipywidgets import IntSlider, fixed

    from .interactive import interact

    interact(show_fold_layer, model=fixed(model),
             layer=IntSlider(value=0, min=0, max=len(conv_bn_pairs(model)) - 1, description="layer"))


def plot_latency(rows, ax=None):
    """Grouped bars of unfused vs fused latency; ``rows`` maps a label (e.g. ``"batch 1"``)
    to a :func:`measure_fusion` dict. Taught in 03_fusion."""
    ax = _axes(ax)
    labels = list(rows)
    for i, label in enumerate(labels):
        r = rows[label]
        ax.bar(i - 0.2, r["unfused_ms"], 0.4, color="tab:gray", label="unfused" if i == 0 else None)
        ax.bar(i + 0.2, r["fused_ms"], 0.4, color="tab:green", label="fused" if i == 0 else None)
        ax.text(i, max(r["unfused_ms"], r["fused_ms"]), f"{r['speedup']:.2f}×", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    top = max(max(r["unfused_ms"], r["fused_ms"]) for r in rows.values())
    ax.set_ylim(top=3 * top)  # room for the speedup labels
    ax.set(ylabel="median latency (ms, log)", title="fp32 latency before and after folding")
    ax.legend(fontsize=8)
    return ax
