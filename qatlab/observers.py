"""Observers: modules that watch tensors go by and pick a quantization range.

Taught in 02_observers. Every observer keeps torch's contract
(``torch.ao.quantization.observer``, and its non-deprecated copy in
``torchao.quantization.pt2e``), so a notebook can swap ours for torch's and
compare the buffers one for one:

- ``forward(x)`` updates the buffers from ``x.detach()`` and returns ``x`` unchanged;
- ``calculate_qparams()`` returns ``(scale, zero_point)``, computed by
  :func:`qatlab.quant.choose_qparams` from the chosen range ``[lo, hi]``;
- constructor arguments use torch's names: ``dtype``, ``qscheme``,
  ``quant_min``, ``quant_max``, ``averaging_constant``, ``ch_axis``, ``bins``.

What each one remembers, and the range it hands to ``choose_qparams``:

=============================  =====================================================
observer                       range ``[lo, hi]`` after batches ``X_1 … X_t``
=============================  =====================================================
``MinMaxObserver``             ``lo = min_t min(X_t)``, ``hi = max_t max(X_t)``
``MovingAverageMinMaxObserver``  ``lo ← lo + c·(min(X_t) − lo)`` (same for ``hi``)
``PerChannelMinMaxObserver``   min/max per slice along ``ch_axis``
``HistogramObserver``          the sub-range of a running histogram that minimises
                               the (approximate) L2 quantization error
``PercentileObserver``         the ``(100−p)``-th and ``p``-th percentiles of that
                               histogram (not in torch)
=============================  =====================================================

Unlike torch, bad input is an error, not a warning: an empty tensor, NaN/inf,
a non-float tensor, a ``ch_axis`` out of range, or ``calculate_qparams()``
before any data raise ``ValueError``/``TypeError``/``RuntimeError`` naming
the problem.

>>> import torch
>>> obs = MinMaxObserver()
>>> x = torch.tensor([-1.0, 0.5, 2.0])
>>> obs(x) is x
True
>>> obs.min_val, obs.max_val
(tensor(-1.), tensor(2.))
>>> scale, zero_point = obs.calculate_qparams()
>>> scale, zero_point
(tensor([0.0118]), tensor([85], dtype=torch.int32))
"""


import torch
from torch import nn

# dtype -> (quant_min, quant_max) of the 8-bit types an observer can target
_DTYPE_BOUNDS = {
    torch.quint8: (0, 255),
    torch.uint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.int8: (-128, 127),
}
_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def check_observable(x, name="x"):
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a non-empty, finite float tensor.

    Taught in 02_observers: an observer that silently swallows a NaN or an inf
    picks a useless range, so ours refuse them.

    >>> check_observable(torch.tensor([1.0, float("nan")]))
    Traceback (most recent call last):
    ...
    ValueError: x has 1 NaN and 0 inf values out of 2: an observer needs finite data
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): nothing to observe")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} has {n_nan} NaN and {n_inf} inf values out of {x.numel()}: "
                         "an observer needs finite data")


class _Observer(nn.Module):
    """What all our observers share: the target integer grid and the qparams step."""

    _allowed_qschemes = _PER_TENSOR

    def __init__(self, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                 quant_min=None, quant_max=None):
        super().__init__()
        if dtype not in _DTYPE_BOUNDS:
            raise ValueError(f"dtype must be one of {list(_DTYPE_BOUNDS)}, got {dtype!r}")
        if qscheme not in self._allowed_qschemes:
            raise ValueError(f"{type(self).__name__} supports qscheme in "
                             f"{list(self._allowed_qschemes)}, got {qscheme!r}")
        lo, hi = _DTYPE_BOUNDS[dtype]
        if (quant_min is None) != (quant_max is None):
            raise ValueError(f"give both quant_min and quant_max or neither, got "
                             f"quant_min={quant_min!r}, quant_max={quant_max!r}")
        if quant_min is not None:
            if not (lo <= quant_min <= 0 <= quant_max <= hi and quant_min < quant_max):
                raise ValueError(f"need {lo} <= quant_min <= 0 <= quant_max <= {hi} and "
                                 f"quant_min < quant_max for {dtype}, got "
                                 f"({quant_min}, {quant_max})")
            lo, hi = quant_min, quant_max
        self.dtype, self.qscheme = dtype, qscheme
        self.quant_min, self.quant_max = lo, hi
        self.has_customized_qrange = quant_min is not None  # torch's name; sets the symmetric zp

    @property
    def symmetric(self):
        return self.qscheme in _SYMMETRIC

    def _qparams_from_range(self, lo, hi):
        from .quant import choose_qparams

        return choose_qparams(lo, hi, self.quant_min, self.quant_max, symmetric=self.symmetric,
                              customized_qrange=self.has_customized_qrange)

    def _require_data(self):
        if not self.has_data():
            raise RuntimeError(f"{type(self).__name__}.calculate_qparams() called before any "
                               "data: call the observer on at least one tensor first")

    def calculate_range(self):
        """``(lo, hi)``: the float range this observer would quantize to."""
        self._require_data()
        return self.min_val, self.max_val

    def calculate_qparams(self):
        """``(scale, zero_point)`` of :meth:`calculate_range` (see ``choose_qparams``)."""
        lo, hi = self.calculate_range()
        return self._qparams_from_range(lo, hi)

    def extra_repr(self):
        return f"min_val={self.min_val}, max_val={self.max_val}"


class MinMaxObserver(_Observer):
    r"""Running min and max over every batch seen.

    Taught in 02_observers. After batches :math:`X_1 \dots X_t`:
    ``min_val = min(min_val, min(X_t))`` and ``max_val = max(max_val, max(X_t))``,
    then ``calculate_qparams()`` is ``choose_qparams(min_val, max_val, ...)``.
    One outlier anywhere in calibration stretches the range forever.

    >>> obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    >>> _ = obs(torch.tensor([-0.5, 1.0])); _ = obs(torch.tensor([-2.0, 0.25]))
    >>> obs.min_val, obs.max_val
    (tensor(-2.), tensor(1.))
    >>> obs.calculate_qparams()
    (tensor([0.0157]), tensor([0], dtype=torch.int32))
    """

    def __init__(self, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                 quant_min=None, quant_max=None):
        super().__init__(dtype, qscheme, quant_min, quant_max)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def has_data(self):
        return bool(self.min_val <= self.max_val)

    def forward(self, x_orig):
        check_observable(x_orig)
        x = x_orig.detach().to(self.min_val.dtype)
        batch_min, batch_max = torch.aminmax(x)
        self.min_val.copy_(torch.min(batch_min, self.min_val))
        self.max_val.copy_(torch.max(batch_max, self.max_val))
        return x_orig

    def reset_min_max_vals(self):
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))


class MovingAverageMinMaxObserver(MinMaxObserver):
    r"""An exponential moving average of each batch's min and max.

    Taught in 02_observers. The first batch sets the range; after that
    ``min_val ← min_val + c·(min(X) − min_val)`` and the same for ``max_val``,
    with ``c = averaging_constant`` (torch's default 0.01). A spike moves the
    range by only ``c`` of its size and is forgotten at rate ``(1 − c)`` per
    batch, which is why QAT uses it while weights and activations drift.

    >>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    >>> for hi in (2.0, 4.0, 4.0):
    ...     _ = obs(torch.tensor([0.0, hi]))
    >>> obs.max_val  # 2 -> 2 + 0.5*(4-2) = 3 -> 3 + 0.5*(4-3) = 3.5
    tensor(3.5000)
    """

    def __init__(self, averaging_constant=0.01, dtype=torch.quint8,
                 qscheme=torch.per_tensor_affine, quant_min=None, quant_max=None):
        if not (isinstance(averaging_constant, float | int) and 0 < averaging_constant <= 1):
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        super().__init__(dtype, qscheme, quant_min, quant_max)
        self.averaging_constant = averaging_constant

    def forward(self, x_orig):
        check_observable(x_orig)
        x = x_orig.detach().to(self.min_val.dtype)
        batch_min, batch_max = torch.aminmax(x)
        if not self.has_data():
            new_min, new_max = batch_min, batch_max
        else:
            c = self.averaging_constant
            new_min = self.min_val + c * (batch_min - self.min_val)
            new_max = self.max_val + c * (batch_max - self.max_val)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        return x_orig


class PerChannelMinMaxObserver(_Observer):
    r"""Running min and max of each slice along ``ch_axis`` (weights: output channels).

    Taught in 02_observers. For a conv weight of shape ``(out, in, kh, kw)``
    and ``ch_axis=0``, channel ``c`` gets its own
    ``[min(W[c]), max(W[c])]`` and so its own scale: a channel with small
    weights is not forced onto the grid of the largest one.

    >>> obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
    ...                                qscheme=torch.per_channel_symmetric)
    >>> _ = obs(torch.tensor([[0.1, -0.2], [3.0, 1.0]]))
    >>> obs.min_val, obs.max_val
    (tensor([-0.2000,  1.0000]), tensor([0.1000, 3.0000]))
    >>> scale, zero_point = obs.calculate_qparams()
    >>> scale  # 2*max|w| / 255 per channel
    tensor([0.0016, 0.0235])
    """

    _allowed_qschemes = _PER_CHANNEL

    def __init__(self, ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine,
                 quant_min=None, quant_max=None):
        if not isinstance(ch_axis, int) or isinstance(ch_axis, bool):
            raise TypeError(f"ch_axis must be an int, got {ch_axis!r}")
        super().__init__(dtype, qscheme, quant_min, quant_max)
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    def has_data(self):
        return self.min_val.numel() > 0

    def _per_channel_aminmax(self, x_orig):
        check_observable(x_orig)
        if not -x_orig.dim() <= self.ch_axis < x_orig.dim():
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a tensor with "
                             f"{x_orig.dim()} dims (shape {tuple(x_orig.shape)})")
        x = x_orig.detach().to(self.min_val.dtype)
        rows = x.transpose(0, self.ch_axis).flatten(start_dim=1)  # one row per channel
        if self.has_data() and rows.shape[0] != self.min_val.numel():
            raise ValueError(f"got {rows.shape[0]} channels along ch_axis={self.ch_axis}, "
                             f"but earlier batches had {self.min_val.numel()}")
        return torch.aminmax(rows, dim=1)

    def _store(self, new_min, new_max):
        self.min_val.resize_(new_min.shape).copy_(new_min)
        self.max_val.resize_(new_max.shape).copy_(new_max)

    def forward(self, x_orig):
        batch_min, batch_max = self._per_channel_aminmax(x_orig)
        if self.has_data():
            batch_min = torch.min(batch_min, self.min_val)
            batch_max = torch.max(batch_max, self.max_val)
        self._store(batch_min, batch_max)
        return x_orig

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("min_val", "max_val"):  # the buffers start empty: take the saved shape
            if prefix + name in state_dict:
                getattr(self, name).resize_(state_dict[prefix + name].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class HistogramObserver(_Observer):
    r"""A running histogram, then the sub-range that minimises the L2 quantization error.

    Taught in 02_observers. Same algorithm as torch's ``HistogramObserver``
    (which follows caffe2's ``NormMinimization``), written to be read:

    1. ``forward``: keep ``bins`` equal-width bins over ``[min_val, max_val]``.
       When a batch widens the range, the old histogram is re-binned onto the
       new range (each old bin is split into ``upsample_rate`` pieces that
       land in whichever new bin holds their midpoint).
    2. ``calculate_range``: walk inwards from both ends, always trimming the
       side whose next bin holds less mass, and stop as soon as the estimated
       L2 error of quantizing the histogram to ``2**8`` levels over
       ``[lo, hi]`` goes up (:func:`estimate_l2_error`).

    Clipping a lonely outlier costs one large error; keeping it costs a
    coarser grid for every other value. The search weighs the two.
    """

    def __init__(self, bins=2048, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                 quant_min=None, quant_max=None, upsample_rate=16):
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        super().__init__(dtype, qscheme, quant_min, quant_max)
        self.bins, self.upsample_rate = bins, upsample_rate
        self.dst_nbins = 2 ** 8  # levels of the 8-bit target
        self.register_buffer("histogram", torch.zeros(bins))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def has_data(self):
        return bool(self.min_val <= self.max_val)

    def forward(self, x_orig):
        check_observable(x_orig)
        x = x_orig.detach()
        x_min, x_max = torch.aminmax(x)
        if not self.has_data():
            new_hist, new_min, new_max = self._histc(x, x_min, x_max), x_min, x_max
        else:
            old_min, old_max = self.min_val.clone(), self.max_val.clone()
            new_min, new_max = torch.min(old_min, x_min), torch.max(old_max, x_max)
            new_hist = self._histc(x, new_min, new_max)
            if new_min == old_min and new_max == old_max:
                new_hist = new_hist + self.histogram
            elif old_min == old_max:  # all earlier mass sits on one value
                new_hist = new_hist + self._histc(old_min, new_min, new_max) * self.histogram.sum()
            else:
                new_hist = new_hist + self._rebin(self.histogram, old_min, old_max,
                                                  new_min, new_max)
        self.histogram.copy_(new_hist)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        return x_orig

    def _histc(self, x, lo, hi):
        return torch.histc(x, self.bins, min=float(lo), max=float(hi))

    def _rebin(self, hist, old_min, old_max, new_min, new_max):
        """Move ``hist`` (over ``[old_min, old_max]``) onto ``bins`` bins over the new range."""
        up = self.upsample_rate
        pieces = hist.repeat_interleave(up) / up  # each bin split into `up` equal pieces
        piece_width = (old_max - old_min) / (self.bins * up)
        midpoints = torch.linspace(old_min, old_max, self.bins * up + 1)[:-1] + 0.5 * piece_width
        edges = torch.linspace(new_min, new_max, self.bins + 1)
        where = (torch.bucketize(midpoints, edges, right=True) - 1).clamp(0, self.bins - 1)
        return torch.bincount(where, weights=pieces, minlength=self.bins)

    def calculate_range(self):
        """``(lo, hi)`` found by the greedy L2 search over the histogram (see class doc)."""
        self._require_data()
        width = (self.max_val.item() - self.min_val.item()) / self.bins
        start, end = search_histogram_range(self.histogram, self.dst_nbins, width)
        bin_width = (self.max_val - self.min_val) / self.bins
        return self.min_val + bin_width * start, self.min_val + bin_width * (end + 1)

    def extra_repr(self):
        return f"bins={self.bins}, min_val={self.min_val}, max_val={self.max_val}"


class PercentileObserver(HistogramObserver):
    r"""The ``(100 − p)``-th and ``p``-th percentiles of the running histogram.

    Taught in 02_observers; torch does not ship it (TensorRT and many PTQ
    papers do). With ``percentile=99.99`` the top and bottom 0.01 % of the
    values seen are clipped, whatever their size: a rule instead of a search.
    The percentiles are read off the histogram, so they are accurate to one
    bin, ``(max_val - min_val) / bins``.

    >>> obs = PercentileObserver(percentile=99.0, bins=100)
    >>> _ = obs(torch.cat([torch.linspace(0, 1, 999), torch.tensor([50.0])]))
    >>> lo, hi = obs.calculate_range()
    >>> float(lo), float(hi)  # the lonely 50 is ignored
    (0.0, 1.0)
    """

    def __init__(self, percentile=99.99, bins=2048, dtype=torch.quint8,
                 qscheme=torch.per_tensor_affine, quant_min=None, quant_max=None,
                 upsample_rate=16):
        if not (isinstance(percentile, float | int) and 50 < percentile <= 100):
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        super().__init__(bins, dtype, qscheme, quant_min, quant_max, upsample_rate)
        self.percentile = float(percentile)

    def calculate_range(self):
        self._require_data()
        cdf = torch.cumsum(self.histogram.double(), 0) / self.histogram.double().sum()
        tail = 1.0 - self.percentile / 100.0
        start = int(torch.searchsorted(cdf, torch.tensor([tail], dtype=cdf.dtype)))
        end = int(torch.searchsorted(cdf, torch.tensor([1.0 - tail], dtype=cdf.dtype)))
        end = min(max(end, start), self.bins - 1)
        bin_width = (self.max_val - self.min_val) / self.bins
        return self.min_val + bin_width * start, self.min_val + bin_width * (end + 1)

    def extra_repr(self):
        return f"percentile={self.percentile}, " + super().extra_repr()


def estimate_l2_error(histogram, start_bin, end_bin, dst_nbins=256, bin_width=1.0):
    r"""Estimated squared error when bins ``start_bin..end_bin`` are mapped onto ``dst_nbins`` levels.

    Taught in 02_observers. The values in each source bin are taken as uniform
    with density :math:`d = m / w` (mass over bin width), so the part of a bin
    lying between :math:`a` and :math:`b` from the centre of the level it
    rounds to contributes :math:`d\,(b^3 - a^3)/3`. Bins outside
    ``[start_bin, end_bin]`` clip to the first or last level. This is torch's
    ``HistogramObserver._compute_quantization_error``, in the same order of
    float operations.

    Four equal bins kept whole on four levels: each value is within half a
    bin of its level, so the error is :math:`4 \cdot 1/12`:

    >>> float(estimate_l2_error(torch.ones(4), 0, 3, dst_nbins=4))
    0.3333333432674408
    """
    dst_width = bin_width * (end_bin - start_bin + 1) / dst_nbins
    if dst_width == 0.0:
        return torch.tensor(0.0)
    src_begin = (torch.arange(histogram.numel()) - start_bin) * bin_width
    src_end = src_begin + bin_width
    density = histogram / bin_width
    half = dst_width / 2

    def level_of(pos):  # index of the destination level that holds position pos
        return torch.clamp(torch.div(pos, dst_width, rounding_mode="floor"), 0, dst_nbins - 1)

    def cube_integral(a, b):  # density * ∫_a^b t² dt
        return density * ((b * b * b - a * a * a) / 3)

    first, last = level_of(src_begin), level_of(src_end)
    err = cube_integral(src_begin - (first + 0.5) * dst_width, torch.ones_like(src_begin) * half)
    err = err + (last - first - 1) * cube_integral(torch.tensor(-half), torch.tensor(half))
    err = err + cube_integral(torch.tensor(-half), src_end - (last * dst_width + half))
    return err.sum()


def search_histogram_range(histogram, dst_nbins=256, bin_width=1.0, stepsize=1e-5):
    """``(start_bin, end_bin)`` that torch's ``HistogramObserver`` would keep.

    Taught in 02_observers. Move quantile bounds ``alpha`` up from 0 and
    ``beta`` down from 1 in steps of ``stepsize``; each step trims the side
    that gives up fewer bins for the same mass, and the walk stops when the
    :func:`estimate_l2_error` of the trimmed range rises.

    It minimises the error over *all* the values it saw, outlier included: for
    one far outlier it drops the outlier's bin, but not the empty gap below it,
    because clipping the outlier all the way down would cost more than the
    coarser grid does:

    >>> hist = torch.zeros(100); hist[:10] = 1000.0; hist[99] = 1.0
    >>> search_histogram_range(hist)
    (0, 98)
    """
    import numpy as np

    n = histogram.numel()
    csum = torch.cumsum(histogram, 0).tolist()
    total = float(histogram.sum())
    f32 = np.float32  # torch compares a float32 tensor with a Python float in float32
    alpha, beta = 0.0, 1.0
    start, end = 0, n - 1
    best = float("inf")
    while alpha < beta:
        next_alpha, next_beta = alpha + stepsize, beta - stepsize
        lo_bound, hi_bound = f32(next_alpha * total), f32(next_beta * total)
        left, right = start, end
        while left < end and csum[left] < lo_bound:
            left += 1
        while right > start and csum[right] > hi_bound:
            right -= 1
        next_start, next_end = start, end
        if left - start > end - right:
            next_start, alpha = left, next_alpha
        else:
            next_end, beta = right, next_beta
        if (next_start, next_end) == (start, end):
            continue
        err = float(estimate_l2_error(histogram, next_start, next_end, dst_nbins, bin_width))
        if err > best:
            break
        best, start, end = err, next_start, next_end
    return start, end


# ---------------------------------------------------------------------------
# helpers for 02_observers: build, calibrate, measure
# ---------------------------------------------------------------------------

#: short names used by the notebook, the explorer and the exercises
OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "percentile": PercentileObserver,
    "per_channel": PerChannelMinMaxObserver,
}


def make_observer(name, **kwargs):
    """A fresh observer by short name (see :data:`OBSERVERS`). Taught in 02_observers.

    >>> make_observer("percentile", percentile=99.9)
    PercentileObserver(percentile=99.9, bins=2048, min_val=inf, max_val=-inf)
    >>> make_observer("mse")
    Traceback (most recent call last):
    ...
    ValueError: unknown observer 'mse'; valid names: minmax, moving_average, histogram, percentile, per_channel
    """
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; valid names: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](**kwargs)


def calibrate(observer, batches):
    """Feed every tensor in ``batches`` to ``observer`` and return it. Taught in 02_observers."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    for x in batches:
        observer(x)
    return observer


def measure_quantization_error(observer, x):
    """``{"mse", "sqnr_db"}`` of fake-quantizing ``x`` with the observer's qparams.

    Taught in 02_observers. The observer must already be calibrated; ``x`` is
    the data the range has to serve (often not the calibration data).

    >>> obs = calibrate(MinMaxObserver(), torch.linspace(0, 1, 101))
    >>> err = measure_quantization_error(obs, torch.linspace(0, 1, 101))
    >>> round(err["sqnr_db"], 1)
    54.2
    """
    from .quant import fake_quantize, sqnr_db

    check_observable(x)
    scale, zero_point = observer.calculate_qparams()
    axis = getattr(observer, "ch_axis", None)
    if axis is not None:
        axis = axis % x.dim()
    x_hat = fake_quantize(x.detach(), scale, zero_point, observer.quant_min, observer.quant_max,
                          axis=axis)
    mse = float((x.detach().double() - x_hat.double()).pow(2).mean())
    return {"mse": mse, "sqnr_db": sqnr_db(x.detach(), x_hat)}


def inject_outlier(x, value, index=0):
    """A copy of ``x`` with the element at flat ``index`` set to ``value``. Taught in 02_observers.

    >>> inject_outlier(torch.zeros(2, 2), 9.0, index=3)
    tensor([[0., 0.],
            [0., 9.]])
    """
    out = x.detach().clone()
    out.view(-1)[index] = value
    return out


def capture_activations(model, x, modules):
    """Run ``model(x)`` and return ``{name: output}`` of each module in ``modules``.

    Taught in 02_observers. ``modules`` maps a label to a submodule; a forward
    hook on each copies its output (detached) as the model runs.
    """
    captured, handles = {}, []
    for name, module in modules.items():
        def hook(mod, inputs, output, name=name):
            captured[name] = output.detach().clone()
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def trace_running_range(observer, batches):
    """``(mins, maxs)``: the observer's range after each batch. Taught in 02_observers."""
    mins, maxs = [], []
    for x in batches:
        observer(x)
        lo, hi = observer.calculate_range()
        mins.append(float(lo))
        maxs.append(float(hi))
    return mins, maxs


def calibration_sweep(model, qconfig, batches, sizes, test_loader, return_correct=False):
    """PTQ accuracy after calibrating on the first ``n`` batches, for each ``n`` in ``sizes``.

    Taught in 02_observers (LEGACY eager API: ``torch.ao.quantization``
    ``prepare``/``convert``; torch's deprecation warning sends eager users to
    torchao's ``quantize_``). The model is fused and prepared once; calibration
    continues batch by batch and a copy is converted to int8 and evaluated at
    each size, so the sweep costs ``max(sizes)`` calibration batches, not
    ``sum(sizes)``. Returns ``{n: top-1 %}``; with ``return_correct=True`` also
    ``{n: bool tensor}``, which test image each int8 model got right (for the
    paired test, :func:`qatlab.stats.mcnemar`).
    """
    import copy

    from torch.ao.quantization import convert, prepare

    from .training import predict

    sizes = sorted(sizes)
    if not sizes or sizes[0] < 1 or sizes[-1] > len(batches):
        raise ValueError(f"sizes must be between 1 and len(batches)={len(batches)}, got {sizes}")
    prepared = copy.deepcopy(model).eval().fuse_model(is_qat=False)
    prepared.qconfig = qconfig
    prepare(prepared, inplace=True)
    accs, correct, seen = {}, {}, 0
    with torch.no_grad():
        for n in sizes:
            while seen < n:
                prepared(batches[seen])
                seen += 1
            logits, labels = predict(convert(copy.deepcopy(prepared)), test_loader)
            correct[n] = logits.argmax(1) == labels
            accs[n] = 100.0 * correct[n].float().mean().item()
    return (accs, correct) if return_correct else accs


# ---------------------------------------------------------------------------
# plots for 02_observers
# ---------------------------------------------------------------------------

_COLORS = {"minmax": "tab:red", "moving_average": "tab:orange", "histogram": "tab:blue",
           "percentile": "tab:green", "per_channel": "tab:purple"}


def _axes(ax, figsize=(6, 3.5)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_histogram_ranges(x, ranges, ax=None, bins=120, title=None, log=True):
    """Histogram of ``x`` with each observer's chosen range drawn as a shaded span.

    Taught in 02_observers. ``ranges`` maps a label to ``(lo, hi)``.
    """
    ax = _axes(ax)
    values = x.detach().flatten().float().numpy()
    ax.hist(values, bins=bins, color="0.6", log=log)
    for i, (name, (lo, hi)) in enumerate(ranges.items()):
        color = _COLORS.get(name, f"C{i}")
        lo, hi = float(lo), float(hi)
        ax.axvline(lo, color=color, ls="--", lw=1.2)
        ax.axvline(hi, color=color, ls="--", lw=1.2, label=f"{name}: [{lo:.2f}, {hi:.2f}]")
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)" if log else "count")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def explore_observer(x, observer="histogram", outlier=0.0, x_eval=None, ax=None):
    """Calibrate ``observer`` on ``x`` (plus one ``outlier`` value if nonzero) and plot it.

    Taught in 02_observers: the function behind the ipywidgets explorer. The
    figure shows the calibration histogram, the chosen range and, in the
    title, the SQNR on ``x_eval`` (default: ``x`` without the outlier).
    Returns the ``ax``; its title holds the numbers.
    """
    if observer not in ("minmax", "moving_average", "histogram", "percentile"):
        raise ValueError(f"observer must be a per-tensor observer name, got {observer!r}")
    x_cal = inject_outlier(x, outlier) if outlier else x
    obs = calibrate(make_observer(observer), x_cal)
    lo, hi = obs.calculate_range()
    err = measure_quantization_error(obs, x if x_eval is None else x_eval)
    scale = float(obs.calculate_qparams()[0])
    ax = plot_histogram_ranges(x_cal, {observer: (lo, hi)}, ax=ax)
    ax.set_title(f"{observer}, outlier={outlier:g}: scale={scale:.4f}, "
                 f"SQNR={err['sqnr_db']:.1f} dB", fontsize=9)
    return ax


def plot_calibration_sweep(accs, fp32_acc=None, n_test=None, ax=None):
    """PTQ accuracy against the number of calibration batches, one line per observer.

    Taught in 02_observers. ``accs`` maps an observer name to ``{n_batches: acc}``.
    With ``n_test`` (test images), each point gets a ±1 standard-error bar
    (:func:`qatlab.stats.accuracy_se`) and the fp32 line a ±2 SE band: points
    inside the band are within noise of fp32. The title says whether all are.
    """
    import numpy as np

    from .stats import accuracy_se

    ax = _axes(ax, figsize=(7, 3.6))
    names = list(accs)
    ns_all = sorted({n for by_n in accs.values() for n in by_n})
    offsets = {name: (i - (len(names) - 1) / 2) * 0.06 for i, name in enumerate(names)}
    inside, all_ys = True, []
    for i, name in enumerate(names):
        by_n = accs[name]
        ns = sorted(by_n)
        ys = np.array([by_n[n] for n in ns])
        all_ys.extend(ys.tolist())
        xs = np.array(ns, dtype=float) * 2 ** offsets[name]  # side by side, not on top
        err = [accuracy_se(float(y), n_test) for y in ys] if n_test else None
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=_COLORS.get(name, f"C{i}"),
                    label=f"{name}" + (" (±1 SE)" if n_test else ""))
        if n_test and fp32_acc is not None:
            inside &= bool(np.all(np.abs(ys - fp32_acc) <= 2 * accuracy_se(fp32_acc, n_test)))
    if fp32_acc is not None:
        ax.axhline(fp32_acc, color="k", ls=":", label=f"fp32 {fp32_acc:.1f}%")
        if n_test:
            band = 2 * accuracy_se(fp32_acc, n_test)
            ax.axhspan(fp32_acc - band, fp32_acc + band, color="0.85", alpha=0.6, lw=0,
                       label="fp32 ± 2 SE")
            ax.set_ylim(min(fp32_acc - 4 * band, min(all_ys) - band),
                        min(100.0, max(fp32_acc + 3 * band, max(all_ys) + band)))
            ax.set_title("every int8 accuracy within 2 SE of fp32" if inside else
                         "some int8 accuracies outside 2 SE of fp32", fontsize=10)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns_all, [str(n) for n in ns_all])
    ax.set_xlabel("calibration batches (log scale)")
    ax.set_ylabel("int8 test accuracy (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def plot_running_range(traces, ax=None, title=None):
    """Each observer's ``(mins, maxs)`` after every batch (see :func:`trace_running_range`).

    Taught in 02_observers. ``traces`` maps a label to ``(mins, maxs)``.
    """
    ax = _axes(ax)
    for i, (name, (mins, maxs)) in enumerate(traces.items()):
        steps = range(1, len(maxs) + 1)
        ax.plot(steps, maxs, color=f"C{i}", label=f"{name} max")
        ax.plot(steps, mins, color=f"C{i}", ls="--")
    ax.set_xlabel("batch")
    ax.set_ylabel("observed range (max solid, min dashed)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_weight_sqnr(per_tensor, per_channel, ax=None):
    """Weight SQNR per layer, per-tensor vs per-channel, as two markers joined by the gain.

    Taught in 02_observers. ``per_tensor`` and ``per_channel`` map a layer name
    to SQNR in dB. The y-axis is fitted to the data (it does not start at 0).
    """
    import numpy as np

    ax = _axes(ax, figsize=(6.5, 3.4))
    names = list(per_tensor)
    pos = np.arange(len(names))
    pt = np.array([per_tensor[n] for n in names])
    pc = np.array([per_channel[n] for n in names])
    ax.vlines(pos, pt, pc, color="0.7", lw=2)
    ax.plot(pos, pt, "o", color="tab:red", label="per-tensor")
    ax.plot(pos, pc, "o", color="tab:purple", label="per-channel")
    for p, a, b in zip(pos, pt, pc):
        ax.annotate(f"{b - a:+.1f} dB", (p, (a + b) / 2), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_xticks(pos, names)
    ax.set_xlim(-0.5, len(names) - 0.3)
    ax.set_ylabel("weight SQNR (dB, axis not from 0)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax
