"""Checks for 02_observers: write MinMaxObserver's forward and calculate_qparams,
and choose an observer for a spiky tensor by measuring, not guessing."""

import math

import torch

from ._common import ExerciseError, passed

# Two calibration streams: values of both signs, and all-positive (post-ReLU) values
_STREAMS = {
    "mixed-sign batches": [torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([-3.0, 0.25]),
                           torch.tensor([0.1, 5.0, -0.5])],
    "all-positive batches": [torch.tensor([0.5, 2.0]), torch.tensor([1.0, 3.0])],
}


def _fmt(t):
    return [round(v, 6) for v in torch.as_tensor(t).detach().double().reshape(-1).tolist()]


def check_minmax_observer(observer_cls):
    """Check a MinMaxObserver class (quint8, per-tensor affine) against torch's, batch by batch.

    ``observer_cls()`` must build an observer whose ``forward(x)`` returns ``x``
    and keeps running ``min_val``/``max_val`` buffers, and whose
    ``calculate_qparams()`` returns ``(scale, zero_point)`` equal to torch's.
    """
    from torch.ao.quantization.observer import MinMaxObserver as TorchMinMax

    for stream_name, batches in _STREAMS.items():
        ours, ref = observer_cls(), TorchMinMax(dtype=torch.quint8)
        for i, x in enumerate(batches, start=1):
            out = ours(x.clone())
            ref(x)
            if out is None:
                raise ExerciseError("forward returned None: it must `return x` (the input, "
                                    "unchanged) so the observer can sit inside a model")
            if not torch.equal(torch.as_tensor(out), x):
                raise ExerciseError(f"forward changed its input on {stream_name}, batch {i}: "
                                    f"got {_fmt(out)}, expected {_fmt(x)} back unchanged")
            for buf in ("min_val", "max_val"):
                got, want = getattr(ours, buf, None), getattr(ref, buf)
                if got is None:
                    raise ExerciseError(f"the observer has no `{buf}` buffer")
                if not torch.equal(torch.as_tensor(got).reshape(()), want):
                    fn = "min" if buf == "min_val" else "max"
                    batch_only = getattr(x, fn)()
                    hint = ""
                    if torch.equal(torch.as_tensor(got).reshape(()), batch_only):
                        hint = (f": that is this batch's own {fn}; keep the running {fn}, "
                                f"torch.{fn}(self.{buf}, x.{fn}())")
                    raise ExerciseError(f"{buf} after {stream_name} batch {i} is "
                                        f"{float(got):g} but should be {float(want):g}{hint}")
        result = ours.calculate_qparams()
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise ExerciseError(f"calculate_qparams must return (scale, zero_point), got {result!r}")
        scale, zero_point = (torch.as_tensor(v).reshape(-1) for v in result)
        ref_scale, ref_zp = ref.calculate_qparams()
        lo, hi = float(ref.min_val), float(ref.max_val)
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


def reference_sqnrs(x_calib, x_eval, names=("minmax", "histogram", "percentile")):
    """``{name: SQNR dB on x_eval}`` after calibrating each observer on ``x_calib``."""
    from ..observers import calibrate, make_observer, measure_quantization_error

    return {name: measure_quantization_error(calibrate(make_observer(name), x_calib),
                                             x_eval)["sqnr_db"] for name in names}


def check_choose_observer(choice, sqnrs, x_calib, x_eval, tol_db=0.05):
    """Check ``sqnrs`` (``{name: SQNR dB}``) against a re-measurement, and ``choice`` against it.

    Each observer in ``("minmax", "histogram", "percentile")`` must be
    calibrated on ``x_calib`` and its SQNR measured on ``x_eval``; ``choice``
    must be the name with the highest measured SQNR.
    """
    want = reference_sqnrs(x_calib, x_eval)
    if not isinstance(sqnrs, dict):
        raise ExerciseError(f"sqnrs must be a dict {{name: SQNR in dB}}, got {type(sqnrs).__name__}")
    missing = [n for n in want if n not in sqnrs]
    if missing:
        raise ExerciseError(f"sqnrs has no entry for {missing}: measure all of {list(want)}")
    swapped = None
    for name, ref in want.items():
        got = float(sqnrs[name])
        if abs(got - ref) > tol_db:
            if swapped is None:
                swapped = reference_sqnrs(x_eval, x_calib)
            hint = "calibrate a fresh observer on x_calib, then fake-quantize x_eval with its qparams"
            if abs(got - swapped[name]) <= tol_db:
                hint = "you swapped them: calibrate on x_calib (with the spikes), measure on x_eval"
            raise ExerciseError(f"sqnrs[{name!r}] is {got:.2f} dB but should be {ref:.2f} dB: {hint}")
    best = max(want, key=want.get)
    if choice != best:
        if choice not in want:
            raise ExerciseError(f"choice must be one of {list(want)}, got {choice!r}")
        raise ExerciseError(f"you chose {choice!r} ({want[choice]:.2f} dB), but your own numbers "
                            f"say {best!r} is {want[best] - want[choice]:.2f} dB better")
    return passed("choose_observer")
