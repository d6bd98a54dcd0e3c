"""Checks for 02_observers: write MinMaxObserver's forward and calculate_qparams (the
contract of torch's observers, including ``x.detach()``, the eps floor and shape-(1,)
qparams), and write a rule that decides from calibration data alone which observer to
deploy, judged on held-out data."""

import math

import torch

from ._common import ExerciseError, call, passed, require_callable

# Calibration streams: values of both signs, all-positive (post-ReLU) values, an all-zero
# range (where only the eps floor keeps the scale positive), and activations that require grad
# (as during QAT, where an observer must not record autograd history in its buffers).
_STREAMS = {
    "mixed-sign batches": [torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([-3.0, 0.25]),
                           torch.tensor([0.1, 5.0, -0.5])],
    "all-positive batches": [torch.tensor([0.5, 2.0]), torch.tensor([1.0, 3.0])],
    "all-zero batches (a dead ReLU channel)": [torch.zeros(3), torch.zeros(2)],
    "batches that require grad (as in QAT)": [torch.tensor([-0.5, 1.5]), torch.tensor([2.5, -1.0])],
}
_NEEDS_GRAD = "batches that require grad (as in QAT)"


def _fmt(t):
    return [round(v, 6) for v in torch.as_tensor(t).detach().double().reshape(-1).tolist()]


def check_minmax_observer(observer_cls):
    """Check a MinMaxObserver class (quint8, per-tensor affine) against torch's, batch by batch.

    ``observer_cls()`` must build an observer whose ``forward(x)`` returns ``x``
    and keeps running ``min_val``/``max_val`` buffers, and whose
    ``calculate_qparams()`` returns ``(scale, zero_point)`` equal to torch's.
    """
    from torch.ao.quantization.observer import MinMaxObserver as TorchMinMax

    require_callable(observer_cls, "MyMinMaxObserver (the class)")
    for stream_name, batches in _STREAMS.items():
        ours, ref = call(observer_cls, "MyMinMaxObserver()"), TorchMinMax(dtype=torch.quint8)
        if not callable(ours) or not callable(getattr(ours, "calculate_qparams", None)):
            raise ExerciseError(f"MyMinMaxObserver() gave a {type(ours).__name__} without forward "
                                f"and calculate_qparams: pass the class, a torch.nn.Module subclass")
        for i, x in enumerate(batches, start=1):
            x_in = x.clone().requires_grad_(stream_name == _NEEDS_GRAD)
            out = call(ours, f"forward on {stream_name}, batch {i}", x_in, allow_none=True)
            ref(x)
            if out is None:
                raise ExerciseError("forward returned None: it must `return x` (the input, "
                                    "unchanged) so the observer can sit inside a model")
            if not isinstance(out, torch.Tensor):
                raise ExerciseError(f"forward returned {type(out).__name__} on {stream_name}, batch "
                                    f"{i}: it must `return x` (the input tensor, unchanged)")
            if out.shape != x.shape or not torch.equal(out.detach().to(x.dtype), x):
                raise ExerciseError(f"forward changed its input on {stream_name}, batch {i}: "
                                    f"got {_fmt(out)}, expected {_fmt(x)} back unchanged")
            if x_in.requires_grad and not getattr(out, "requires_grad", False):
                raise ExerciseError(f"on {stream_name}, forward returned a tensor without "
                                    f"gradient: return x itself, not x.detach(), so that the "
                                    f"gradient flows through the observer during QAT")
            for buf in ("min_val", "max_val"):
                got, want = getattr(ours, buf, None), getattr(ref, buf)
                if got is None:
                    raise ExerciseError(f"the observer has no `{buf}` buffer")
                if isinstance(got, torch.Tensor) and (got.requires_grad or got.grad_fn is not None):
                    raise ExerciseError(
                        f"after {stream_name} batch {i}, {buf} carries autograd history "
                        f"(requires_grad=True): the buffer was computed from x, not x.detach(). "
                        f"The graph of every batch then stays alive through the buffer, and the "
                        f"buffer is no longer a plain statistic: observe x.detach()")
                if not isinstance(got, torch.Tensor) or got.numel() != 1:
                    raise ExerciseError(f"`{buf}` should be a one-element tensor buffer (register_buffer), "
                                        f"got {type(got).__name__} {_fmt(got) if isinstance(got, torch.Tensor) else got!r}")
                if not torch.equal(got.detach().reshape(()).to(want.dtype), want):
                    fn = "min" if buf == "min_val" else "max"
                    batch_only = getattr(x, fn)()
                    hint = ""
                    if torch.equal(torch.as_tensor(got).reshape(()), batch_only):
                        hint = (f": that is this batch's own {fn}; keep the running {fn}, "
                                f"torch.{fn}(self.{buf}, x.{fn}())")
                    raise ExerciseError(f"{buf} after {stream_name} batch {i} is "
                                        f"{float(got):g} but should be {float(want):g}{hint}")
        result = call(ours.calculate_qparams, f"calculate_qparams() after {stream_name}")
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise ExerciseError(f"calculate_qparams must return (scale, zero_point), got {result!r}")
        for what, v in zip(("scale", "zero_point"), result):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (1,):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ExerciseError(f"calculate_qparams must return tensors of shape (1,), like "
                                    f"torch's observers (a per-channel observer returns one value "
                                    f"per channel); {what} is {shape}: use .reshape(1)")
        scale, zero_point = (v.detach().reshape(-1) for v in result)
        ref_scale, ref_zp = ref.calculate_qparams()
        lo, hi = float(ref.min_val), float(ref.max_val)
        if float(scale[0]) == 0 or not math.isfinite(float(scale[0])):
            raise ExerciseError(
                f"scale on {stream_name} is {float(scale[0]):g}: with min_val = max_val = 0 the "
                f"range is empty, so x / scale is 0/0 = nan and the zero-point becomes "
                f"{int(zero_point[0]) if not zero_point.is_floating_point() else zero_point[0]}. "
                f"Floor the scale at torch.finfo(torch.float32).eps = "
                f"{torch.finfo(torch.float32).eps:.3g}, as torch does")
        if zero_point.is_floating_point():
            raise ExerciseError(f"zero_point on {stream_name} has dtype {zero_point.dtype}: it is "
                                f"an integer code; return it as torch.int32, like torch")
        if not torch.allclose(scale.double(), ref_scale.double(), rtol=1e-6, atol=0):
            hint = "scale = (max(max_val, 0) - min(min_val, 0)) / (quant_max - quant_min)"
            if math.isclose(float(scale[0]), (hi - lo) / 255, rel_tol=1e-6):
                hint = (f"you used max_val - min_val = {hi - lo:g}, but the range must "
                        f"include 0: use min(min_val, 0) = {min(lo, 0):g}")
            elif math.isclose(float(scale[0]), (hi - min(lo, 0)) / 256, rel_tol=1e-6):
                hint = "divide by quant_max - quant_min = 255, not 256"
            raise ExerciseError(f"scale on {stream_name} is {float(scale[0]):.6g} but should be "
                                f"{float(ref_scale[0]):.6g}: {hint}")
        if not torch.equal(zero_point.long(), ref_zp.long()):
            hint = "zero_point = clamp(quant_min - round(min(min_val, 0) / scale), 0, 255)"
            wrong_sign = round(min(lo, 0) / float(ref_scale[0]))
            if int(zero_point[0]) == wrong_sign:
                hint = "mind the sign: zero_point = quant_min - round(min(min_val, 0) / scale)"
            raise ExerciseError(f"zero_point on {stream_name} is {int(zero_point[0])} but "
                                f"should be {int(ref_zp[0])}: {hint}")
    return passed("minmax_observer")


OBSERVER_NAMES = ("minmax", "histogram", "percentile")


def reference_sqnrs(x_calib, x_eval, names=OBSERVER_NAMES):
    """``{name: SQNR dB on x_eval}`` after calibrating each observer on ``x_calib``."""
    from ..observers import calibrate, make_observer, measure_quantization_error

    return {name: measure_quantization_error(calibrate(make_observer(name), x_calib),
                                             x_eval)["sqnr_db"] for name in names}


def _tail_ratio(x, q=0.999):
    """``max(x) / quantile(x, q)``: how far the largest value sits above the bulk."""
    flat = x.detach().reshape(-1).float()
    top = float(torch.quantile(flat[:: flat.numel() // 1_000_000 + 1], q))  # quantile's size limit
    return float(flat.max()) / top if top > 0 else math.inf


def reference_choose_observer(x_calib, ratio=3.0):
    """The rule of 02_observers, section 3: ``"percentile"`` when the calibration max sits more
    than ``ratio`` times above the 99.9th percentile (an isolated outlier), else ``"minmax"``.

    The 99.9th percentile is read from every ``(numel // 10**6 + 1)``-th value, since
    ``torch.quantile`` takes at most 16 million; the max from all of them.

    >>> x = torch.arange(1.0, 10_001.0)
    >>> reference_choose_observer(x), reference_choose_observer(torch.cat([x, torch.tensor([1e5])]))
    ('minmax', 'percentile')
    """
    flat = x_calib.detach().reshape(-1).float()
    top = torch.quantile(flat[:: flat.numel() // 1_000_000 + 1], 0.999)
    return "percentile" if flat.max() > ratio * top else "minmax"


def check_choose_observer(choose_observer, cases, tol_db=0.5):
    """Check a rule ``choose_observer(x_calib) -> name`` that picks an observer from calibration data alone.

    ``cases`` maps a label to ``(x_calib, x_eval)``. For each case the rule sees
    only ``x_calib``, and its choice is scored by the SQNR that observer reaches on
    the held-out ``x_eval``. The bar is set by this run's data, not by a margin
    measured once: a choice passes when it reaches, within ``tol_db``, the SQNR of
    the observer that :func:`reference_choose_observer` (the rule taught in section 3)
    picks from the same ``x_calib`` (so any choice within ``tol_db`` of the best of
    ``("minmax", "histogram", "percentile")`` passes too). Every machine
    trains its own model, so on a clean layer Histogram or Percentile can edge out
    MinMax by a few dB on one machine and lose on another; the rule's choice, and
    the held-out SQNRs, are measured on the same tensors as the learner's choice.
    Taught in 02_observers.
    """
    require_callable(choose_observer, "choose_observer")
    if not isinstance(cases, dict) or not cases:
        raise ValueError(f"cases must be a non-empty dict {{label: (x_calib, x_eval)}}, got {cases!r}")
    if isinstance(tol_db, bool) or not isinstance(tol_db, int | float) or not 0 <= tol_db < math.inf:
        raise ValueError(f"tol_db must be a finite number >= 0, got {tol_db!r}")
    for label, pair in cases.items():
        if not (isinstance(pair, tuple | list) and len(pair) == 2
                and all(isinstance(t, torch.Tensor) for t in pair)):
            raise ValueError(f"cases[{label!r}] must be a pair of tensors (x_calib, x_eval), got {pair!r}")
    for label, (x_calib, x_eval) in cases.items():
        choice = call(choose_observer, f"on {label}: choose_observer(x_calib)", x_calib.clone())
        if isinstance(choice, str):
            choice = choice.strip().lower()
        if choice not in OBSERVER_NAMES:
            raise ExerciseError(f"on {label}: choose_observer returned {choice!r}; return one of "
                                f"{list(OBSERVER_NAMES)}")
        want = reference_sqnrs(x_calib, x_eval)
        best = max(want, key=want.get)
        rule = reference_choose_observer(x_calib)
        if want[choice] >= want[rule] - tol_db:  # want[rule] <= want[best]: the rule's is the bar
            continue
        ratio = _tail_ratio(x_calib)
        head = (f"on {label}: you chose {choice!r}, which reaches {want[choice]:.1f} dB on the "
                f"held-out batch, but {best!r} reaches {want[best]:.1f} dB "
                f"({want[best] - want[choice]:.1f} dB better)")
        if rule == "percentile":
            why = (f"the calibration max is {ratio:.0f}x the 99.9th percentile: a few isolated "
                   f"values stretch the range, {choice!r} keeps them, and every ordinary value "
                   f"lands on a grid that much coarser")
        elif choice == "percentile":
            why = (f"nothing here looks like an outlier (the max is only {ratio:.2f}x the 99.9th "
                   f"percentile), so dropping the top 0.01 % clips real values that come back in "
                   f"the held-out data")
        else:
            why = (f"nothing here looks like an outlier (the max is only {ratio:.2f}x the 99.9th "
                   f"percentile), so MinMax, which keeps every real value, reaches "
                   f"{want['minmax']:.1f} dB; compare how each observer sets the range on data "
                   f"like this (sections 3 and 4)")
        self_sqnr = reference_sqnrs(x_calib, x_calib)
        if choice == max(self_sqnr, key=self_sqnr.get) and choice != best:
            why += (". Scoring the observers on the calibration tensor itself does not work: "
                    "there the outliers dominate the signal power, so keeping them looks best. "
                    "Decide by what the range does to the values that come after calibration")
        raise ExerciseError(f"{head}: {why}")
    return passed("choose_observer")
