"""GPTQ from scratch: post-training quantization of ``nn.Linear`` weights with second-order error feedback.

Taught in 11_strongest_ptq (and used on a small language model in 12). Frantar,
Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1.

A linear layer ``y = x W^T`` with weight ``W`` of shape ``(out, in)`` is quantized
row by row to minimize the output error on calibration inputs ``X`` (``n × in``)::

    argmin_{W_hat on the grid}  || X W^T - X W_hat^T ||_F^2
    = sum over rows r of  (w_r - w_hat_r)^T H (w_r - w_hat_r) / 2,   H = (2/n) X^T X

``H`` (``in × in``) is the Hessian of that loss with respect to one row; every
row shares it. Quantize column ``j`` of ``W`` (all rows at once), then spread its
error over the columns not yet quantized, the Optimal Brain Surgeon update
restricted to the remaining columns::

    q_j   = quant(w_j)                                  # round to the column's grid
    e_j   = (w_j - q_j) / U[j, j]                       # U = chol(H^-1), upper triangular
    w_k  -= e_j * U[j, k]     for every k > j           # error feedback

``U``, the upper Cholesky factor of the damped inverse Hessian
``(H + λ · mean(diag H) · I)^-1``, holds every row of the sequence of inverses
that OBS would recompute after each column, so it is computed once. The update
is applied lazily: inside a block of ``block_size`` columns immediately, to the
columns after the block once per block (``W[:, after] -= E_block U[block, after]``),
which is the same arithmetic regrouped (the paper's "lazy batch updates").

The grid is symmetric and group-wise (:mod:`qatlab.groupwise`; torchao's int4
weight-only grid is asymmetric, with zero points, so only the 8-bit per-row case
is compared with torchao code for code, in ``tests/test_gptq.py``): each row is cut into groups of ``group_size``
consecutive input columns, and a group's scale ``amax / ((qmax - qmin) / 2)`` is
fixed from the *current* (already error-corrected) weights when the algorithm
reaches the group's first column, as torchao's ``gptq_quantize`` does.
``group_size=None`` is per-channel (one scale per row).

Round-to-nearest (RTN, :func:`rtn_quantize_weight`) is the same grid without
the feedback; on identity ``H`` GPTQ *is* RTN (``U`` is diagonal).

Public API:

- :func:`hessian_from_inputs` / :class:`HessianAccumulator`: ``H = (2/n) Σ x x^T``;
- :func:`gptq_quantize_weight`: the algorithm on a weight matrix and ``H``;
- :func:`gptq_quantize_linear`: one ``nn.Linear`` from its calibration inputs;
- :func:`apply_gptq`: every (or the named) ``nn.Linear`` of a model, in order,
  each calibrated on the inputs the already-quantized earlier layers produce;
- :func:`reconstruction_error`: ``mean_x || x (W - W_hat)^T ||^2`` from ``H``.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .groupwise import EPS, weight_qrange


@dataclass
class GPTQResult:
    """What :func:`gptq_quantize_weight` returns.

    ``codes`` (int8, ``(out, in)``), ``scale`` (``(out, in // group_size)``), the
    dequantized weight ``weight = codes * scale`` (float32, group-wise), and the
    reconstruction errors of GPTQ and of round-to-nearest on the same ``H``
    (``mean_x || x (W - W_hat)^T ||^2``, see :func:`reconstruction_error`).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    error: float
    rtn_error: float
    bits: int
    group_size: int | None

    def __repr__(self):
        return (f"GPTQResult(shape={tuple(self.codes.shape)}, bits={self.bits}, group_size={self.group_size}, "
                f"error={self.error:.4g}, rtn_error={self.rtn_error:.4g})")


# ---------------------------------------------------------------------------
# the Hessian of the layer-wise loss
# ---------------------------------------------------------------------------

def _check_features(x, in_features=None, name="inputs"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.dim() < 1 or (in_features is not None and x.shape[-1] != in_features):
        raise ValueError(f"{name} must end in the layer's in_features = {in_features}, got shape {tuple(x.shape)}")
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float32)


class HessianAccumulator:
    """Running ``H = (2/n) Σ_i x_i x_i^T`` over every row ``x_i`` of the batches seen.

    Taught in 11_strongest_ptq. ``update(x)`` takes a batch whose last dimension
    is ``in_features`` (a ``(B, T, in)`` batch is ``B·T`` rows). The mean is over
    rows (tokens), so a batch of 3 rows weighs 3 times one of 1 row.

    >>> acc = HessianAccumulator(2)
    >>> acc.update(torch.tensor([[1.0, 0.0]])); acc.update(torch.tensor([[0.0, 2.0], [0.0, 2.0]]))
    >>> acc.hessian
    tensor([[0.6667, 0.0000],
            [0.0000, 5.3333]])
    """

    def __init__(self, in_features):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def update(self, x):
        x = _check_features(x, self.in_features, "x").double()
        self._sum += x.T @ x
        self.n += x.shape[0]

    @property
    def hessian(self):
        if self.n == 0:
            raise ValueError("no inputs seen: call update(x) with calibration batches first")
        return (2.0 / self.n * self._sum).to(torch.float32)


def hessian_from_inputs(inputs):
    """``H = (2/n) X^T X`` of inputs whose last dimension is the layer's ``in_features``.

    Taught in 11_strongest_ptq. ``inputs`` is a tensor or a list of batches.

    >>> hessian_from_inputs(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    tensor([[2., 0.],
            [0., 2.]])
    """
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ValueError("inputs must hold at least one batch")
    acc = HessianAccumulator(_check_features(batches[0]).shape[-1])
    for b in batches:
        acc.update(b)
    return acc.hessian


def reconstruction_error(weight, weight_hat, hessian):
    """Mean squared output error ``mean_x || x (W - W_hat)^T ||^2``, from ``H = (2/n) X^T X``.

    Taught in 11_strongest_ptq. Equals ``trace(D H D^T) / 2`` with ``D = W - W_hat``,
    i.e. the squared error summed over outputs and averaged over the calibration rows,
    without keeping the rows.

    >>> x = torch.randn(50, 4); w = torch.randn(3, 4); w_hat = w.round()
    >>> direct = ((x @ w.T - x @ w_hat.T) ** 2).sum(1).mean()
    >>> bool(torch.isclose(torch.tensor(reconstruction_error(w, w_hat, hessian_from_inputs(x))), direct, rtol=1e-4))
    True
    """
    d = (weight.detach() - weight_hat.detach()).double()
    return float(((d @ hessian.double()) * d).sum() / 2)


# ---------------------------------------------------------------------------
# the grid: symmetric, group-wise (torchao's int4 layout)
# ---------------------------------------------------------------------------

def _check_args(weight, bits, group_size, block_size, percdamp):
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        got = f"dtype {weight.dtype}, shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) \
            else type(weight).__name__
        raise TypeError(f"weight must be a 2-D float (out_features, in_features) tensor, got {got}")
    qmin, qmax = weight_qrange(bits)
    in_features = weight.shape[1]
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None (per-channel), got {group_size!r}")
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, int | float) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0, got {percdamp!r}")
    return qmin, qmax, group_size or in_features


def _group_scale(cols, qmin, qmax, eps=EPS):
    """Symmetric scale of each row of ``cols``: ``max(amax / ((qmax - qmin) / 2), eps)``, shape ``(out,)``."""
    amax = cols.abs().amax(dim=1)
    return torch.clamp(amax / (float(qmax - qmin) / 2), min=eps)


def _quant_column(w, scale, qmin, qmax):
    q = torch.clamp(torch.round(w * (1.0 / scale)), qmin, qmax)
    return q, q * scale


def rtn_quantize_weight(weight, bits, group_size=None):
    """Round-to-nearest on GPTQ's grid: ``(codes, scale, weight_hat)``. Taught in 11_strongest_ptq.

    The baseline GPTQ must beat. Equals :func:`qatlab.groupwise.quantize_groupwise`
    with :func:`~qatlab.groupwise.choose_qparams_groupwise`'s scales (and torchao's
    ``quantize_affine``).

    >>> codes, scale, w_hat = rtn_quantize_weight(torch.tensor([[0.5, -1.5, 0.75, 0.25]]), 4, group_size=2)
    >>> codes, w_hat
    (tensor([[ 2, -8,  7,  2]], dtype=torch.int8), tensor([[ 0.4000, -1.6000,  0.7000,  0.2000]]))
    """
    qmin, qmax, gs = _check_args(weight, bits, group_size, 1, 0.0)
    w = weight.detach().to(torch.float32)
    out, cols = w.shape
    g = w.reshape(out, cols // gs, gs)
    amax = g.abs().amax(dim=-1)
    scale = torch.clamp(amax / (float(qmax - qmin) / 2), min=EPS)
    q = torch.clamp(torch.round(g * (1.0 / scale.unsqueeze(-1))), qmin, qmax)
    return q.reshape(out, cols).to(torch.int8), scale, (q * scale.unsqueeze(-1)).reshape(out, cols)


# ---------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------

def inverse_hessian_factor(hessian, percdamp=0.01):
    """``U = chol((H + λ I)^-1)``, upper triangular, ``λ = percdamp · mean(diag H)``.

    Taught in 11_strongest_ptq. Rows of ``U`` hold, up to a factor, the rows of the
    inverse Hessians OBS would recompute after each quantized column
    (``U[j, j:] = H_j^-1[j, j:] / sqrt(H_j^-1[j, j])`` with ``H_j`` restricted to the
    columns from ``j`` on). Columns never seen (``H[j, j] = 0``) get ``H[j, j] = 1``.
    Computed in float64 and returned as float32.

    >>> inverse_hessian_factor(torch.eye(2) * 4, percdamp=0.0).diag()
    tensor([0.5000, 0.5000])
    """
    h = torch.as_tensor(hessian).detach().double().clone()
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be a square matrix, got shape {tuple(h.shape)}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0])
    h[idx, idx] += percdamp * torch.mean(torch.diag(h))
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"hessian is not positive definite even after damping with percdamp={percdamp}: "
                         f"raise percdamp or give more calibration inputs") from e
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True).to(torch.float32)


def _nested_block_size(block_size, group_size):
    """The largest block size ``<= block_size`` whose blocks never cut a group.

    A multiple of ``group_size`` when a group fits in a block, else a divisor of it:
    a group's scale is then always taken from fully error-corrected weights.

    >>> _nested_block_size(128, 32), _nested_block_size(20, 16), _nested_block_size(128, 784)
    (128, 16, 112)
    """
    if group_size <= block_size:
        return block_size // group_size * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def gptq_quantize_weight(weight, hessian, bits, group_size=None, *, block_size=128, percdamp=0.01):
    """GPTQ (Frantar et al. 2022, Algorithm 1) on a ``(out, in)`` weight; returns a :class:`GPTQResult`.

    Taught in 11_strongest_ptq. ``hessian`` is ``(2/n) X^T X`` of the layer's
    calibration inputs (:func:`hessian_from_inputs`). Column by column, with the
    error of each quantized column pushed onto the columns after it::

        U = chol((H + λ mean(diag H) I)^-1)^T           # upper
        for each block of ``block_size`` columns:
            for j in block:
                if j starts a group: scale_g = amax(W[:, group]) / ((qmax - qmin) / 2)
                q_j = clamp(round(W[:, j] / scale_g), qmin, qmax) · scale_g
                e_j = (W[:, j] - q_j) / U[j, j]
                W[:, j:block_end] -= e_j U[j, j:block_end]
            W[:, block_end:] -= E_block U[block, block_end:]   # lazy batch update

    ``group_size=None`` is per-channel. Blocks never cut a group (``block_size`` is
    lowered to a multiple or a divisor of the group size), so each group's scale sees
    its fully corrected weights; torchao's loop instead takes it from the part of
    the group inside the current block, which differs when a block cuts a group.
    Columns with ``H[j, j] = 0`` (inputs always 0)
    are set to 0 first, as in the paper's code. The weight is not modified.

    >>> _ = torch.manual_seed(0); x = torch.randn(256, 8); w = torch.randn(4, 8)
    >>> r = gptq_quantize_weight(w, hessian_from_inputs(x @ torch.randn(8, 8)), bits=3)
    >>> r.codes.dtype, bool((r.weight == r.codes * r.scale).all()), r.error <= r.rtn_error
    (torch.int8, True, True)
    """
    qmin, qmax, gs = _check_args(weight, bits, group_size, block_size, percdamp)
    w0 = weight.detach().to(torch.float32)
    out, cols = w0.shape
    h = torch.as_tensor(hessian).detach().to(torch.float32)
    if h.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight with {cols} input columns, "
                         f"got {tuple(h.shape)}")
    dead = torch.diag(h) == 0
    w = w0.clone()
    w[:, dead] = 0.0
    u = inverse_hessian_factor(h, percdamp)
    block_size = _nested_block_size(block_size, gs)

    codes = torch.zeros(out, cols, dtype=torch.float32)
    scale = torch.zeros(out, cols // gs, dtype=torch.float32)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        err = torch.zeros(out, b1 - b0, dtype=torch.float32)
        for j in range(b0, b1):
            if j % gs == 0:  # the group's grid is fixed from the weights as they are now
                scale[:, j // gs] = _group_scale(w[:, j:j + gs], qmin, qmax)
            s = scale[:, j // gs]
            q, w_hat = _quant_column(w[:, j], s, qmin, qmax)
            codes[:, j] = q
            e = (w[:, j] - w_hat) / u[j, j]
            w[:, j:b1] -= e.unsqueeze(1) * u[j, j:b1].unsqueeze(0)
            err[:, j - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]

    weight_hat = (codes.reshape(out, cols // gs, gs) * scale.unsqueeze(-1)).reshape(out, cols)
    _, _, rtn_hat = rtn_quantize_weight(w0, bits, group_size)
    return GPTQResult(codes=codes.to(torch.int8), scale=scale, weight=weight_hat,
                      error=reconstruction_error(w0, weight_hat, h), rtn_error=reconstruction_error(w0, rtn_hat, h),
                      bits=bits, group_size=group_size)


def gptq_quantize_linear(layer, inputs, bits, group_size=None, *, block_size=128, percdamp=0.01):
    """Quantize one ``nn.Linear`` with GPTQ from its calibration ``inputs``, in place; return a :class:`GPTQResult`.

    Taught in 11_strongest_ptq. ``inputs``: a tensor or a list of batches whose
    last dimension is ``in_features`` (what the layer sees, e.g. ``(B, T, in)``).
    ``layer.weight`` becomes the dequantized weight (``codes * scale``, float);
    the bias stays float.

    >>> _ = torch.manual_seed(0); layer = nn.Linear(16, 4)
    >>> r = gptq_quantize_linear(layer, torch.randn(64, 16), bits=4, group_size=8)
    >>> r.scale.shape, bool((layer.weight == r.weight).all())
    (torch.Size([4, 2]), True)
    """
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ValueError("inputs must hold at least one batch")
    acc = HessianAccumulator(layer.in_features)
    for b in batches:
        acc.update(b)
    result = gptq_quantize_weight(layer.weight, acc.hessian, bits, group_size,
                                  block_size=block_size, percdamp=percdamp)
    with torch.no_grad():
        layer.weight.copy_(result.weight.to(layer.weight.dtype))
    return result


def _linear_names(model, layers):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if layers is None:
        return names
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(f"layers {unknown} are not nn.Linear modules of the model; its Linear layers: {names}")
    return [n for n in names if n in layers]  # model order


def _run(model, batch):
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


@torch.no_grad()
def apply_gptq(model, calib_batches, bits, group_size=None, *, layers=None, block_size=128, percdamp=0.01,
               group_size_fallback=True):
    """GPTQ on every ``nn.Linear`` of ``model`` (or those named in ``layers``), in place; ``{name: GPTQResult}``.

    Taught in 11_strongest_ptq. Layers are quantized one at a time in model order;
    each one's Hessian is accumulated from a forward pass of the calibration batches
    through the model *as quantized so far*, so later layers correct for the errors
    of earlier ones (the paper's sequential scheme). ``calib_batches``: tensors,
    ``(x, y)`` pairs (``x`` is used) or keyword dicts. A layer whose
    ``in_features`` ``group_size`` does not divide falls back to per-channel
    (``group_size_fallback=True``) or raises. The model is left in eval mode.

    >>> _ = torch.manual_seed(0); net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> res = apply_gptq(net, [torch.randn(32, 8) for _ in range(2)], bits=4)
    >>> list(res), all(r.error <= r.rtn_error for r in res.values())
    (['0', '2'], True)
    """
    batches = list(calib_batches)
    if not batches:
        raise ValueError("calib_batches must hold at least one batch")
    names = _linear_names(model, layers)
    if not names:
        raise ValueError("model has no nn.Linear layer to quantize")
    modules = dict(model.named_modules())
    model.eval()
    results = {}
    for name in names:
        layer = modules[name]
        gs = group_size
        if gs is not None and layer.in_features % gs:
            if not group_size_fallback:
                raise ValueError(f"group_size {gs} does not divide {name}.in_features = {layer.in_features}")
            gs = None
        acc = HessianAccumulator(layer.in_features)
        handle = layer.register_forward_pre_hook(lambda _m, args, acc=acc: acc.update(args[0]))
        try:
            for b in batches:
                _run(model, b)
        finally:
            handle.remove()
        result = gptq_quantize_weight(layer.weight, acc.hessian, bits, gs, block_size=block_size, percdamp=percdamp)
        layer.weight.copy_(result.weight.to(layer.weight.dtype))
        results[name] = result
    return results
