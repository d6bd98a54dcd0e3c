"""Checks for 04_qat_training's exercises: the freeze schedule and LSQ's gradient scaling."""

import torch

from ._common import ExerciseError, call, passed, require_callable


def _tiny_qat_model():
    """A prepared eager QAT model: one fused conv-BN-ReLU block and a linear layer."""
    import warnings

    from torch import nn
    from torch.ao.quantization import (
        QuantStub,
        fuse_modules_qat,
        get_default_qat_qconfig,
        prepare_qat,
    )

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()
            self.block = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2), nn.ReLU())
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.block(self.quant(x)).mean((2, 3)))

    model = Tiny().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuse_modules_qat(model.block, ["0", "1", "2"], inplace=True)
        model.qconfig = get_default_qat_qconfig("x86")
        prepare_qat(model, inplace=True)
    return model


def _state(model):
    """(names of fake-quantizers still observing, names of conv-BN modules with frozen BN)."""
    observing = sorted(n for n, m in model.named_modules()
                       if hasattr(m, "observer_enabled") and int(m.observer_enabled[0]) == 1)
    frozen_bn = sorted(n for n, m in model.named_modules() if getattr(m, "freeze_bn", False))
    return observing, frozen_bn


def _fake_quant_off(model):
    """Names of fake-quantizers whose fake quantization was switched off (it must stay on)."""
    return sorted(n for n, m in model.named_modules()
                  if hasattr(m, "fake_quant_enabled") and int(m.fake_quant_enabled[0]) == 0)


def check_freeze_callback(make_freeze_callback):
    """``make_freeze_callback(freeze_observers_at, freeze_bn_at)`` → ``callback(t, model)``.

    Taught in 04_qat_training. The check runs the callback on a small prepared
    QAT model for ``t = 0..3`` under several schedules and compares which
    observers observe and which BN layers are frozen with the expected plan.
    """
    require_callable(make_freeze_callback, "make_freeze_callback")
    all_observing, _ = _state(_tiny_qat_model())

    def run(callback, t, model, obs_at, bn_at):
        def on_error(e):
            if isinstance(e, TypeError) and (obs_at is None or bn_at is None):
                which = "freeze_observers_at" if obs_at is None else "freeze_bn_at"
                return (f"None means 'never freeze': test `{which} is not None` before "
                        f"comparing t with it")
            return None

        call(callback, f"your callback({t}, model) with freeze_observers_at={obs_at}, "
                       f"freeze_bn_at={bn_at}", t, model, on_error=on_error, allow_none=True)
        off = _fake_quant_off(model)
        if off:
            raise ExerciseError(f"freeze_observers_at={obs_at}, freeze_bn_at={bn_at}, at t={t}: "
                                f"fake quantization is off in {len(off)} modules (e.g. {off[0]!r}). "
                                f"Freezing stops the observers (disable_observer), it does not turn "
                                f"fake quantization off: the model must keep training with the "
                                f"rounding it will have after convert")

    def make(obs_at, bn_at):
        callback = call(make_freeze_callback, f"make_freeze_callback({obs_at}, {bn_at})", obs_at, bn_at)
        if not callable(callback):
            raise ExerciseError(f"make_freeze_callback({obs_at}, {bn_at}) returned "
                                f"{type(callback).__name__}, not a function callback(t, model)")
        return callback

    for obs_at, bn_at in ((2, 1), (1, 3), (None, 0), (0, None), (None, None), (3, 3)):
        model = _tiny_qat_model()
        callback = make(obs_at, bn_at)
        for t in range(4):
            run(callback, t, model, obs_at, bn_at)
            observing, frozen_bn = _state(model)
            want_obs_frozen = obs_at is not None and t >= obs_at
            want_bn_frozen = bn_at is not None and t >= bn_at
            where = f"freeze_observers_at={obs_at}, freeze_bn_at={bn_at}, at t={t}"
            if want_obs_frozen and observing:
                raise ExerciseError(f"{where}: observers should be off, but {len(observing)} still "
                                    f"observe (e.g. {observing[0]!r}). Use >= (freezing starts AT "
                                    f"t = freeze_observers_at) and model.apply(disable_observer).")
            if not want_obs_frozen and observing != all_observing:
                off = sorted(set(all_observing) - set(observing))
                raise ExerciseError(f"{where}: observers should still observe, but {len(off)} are "
                                    f"off (e.g. {off[0]!r}). Did you use > instead of >=, swap the "
                                    f"two thresholds, or freeze when the threshold is None?")
            if want_bn_frozen and frozen_bn != ["block.0"]:
                raise ExerciseError(f"{where}: BN statistics should be frozen in 'block.0' (its "
                                    f"freeze_bn is False). Use model.apply(freeze_bn_stats) from "
                                    f"torch.ao.nn.intrinsic.qat when t >= freeze_bn_at.")
            if not want_bn_frozen and frozen_bn:
                raise ExerciseError(f"{where}: BN statistics should still update, but 'block.0' is "
                                    f"frozen. Check the BN threshold (>=, and None means never).")
    # training resumed from a checkpoint at step 3: a callback that fires only AT the step never fires
    for obs_at, bn_at in ((1, None), (None, 1)):
        model = _tiny_qat_model()
        run(make(obs_at, bn_at), 3, model, obs_at, bn_at)
        observing, frozen_bn = _state(model)
        if obs_at is not None and observing:
            raise ExerciseError(f"freeze_observers_at={obs_at}: a callback first called at t=3 (training "
                                f"resumed from a checkpoint) left {len(observing)} observers on. Freeze "
                                f"for every t >= freeze_observers_at, not only at t == freeze_observers_at.")
        if bn_at is not None and not frozen_bn:
            raise ExerciseError(f"freeze_bn_at={bn_at}: a callback first called at t=3 (training resumed "
                                f"from a checkpoint) left BN statistics updating. Freeze for every "
                                f"t >= freeze_bn_at, not only at t == freeze_bn_at.")
    return passed("freeze schedule")


def check_scale_gradient(scale_gradient):
    """``scale_gradient(x, g)``: forward value ``x``, gradient multiplied by ``g``.

    Taught in 04_qat_training (LSQ's gradient scaling).
    """
    require_callable(scale_gradient, "scale_gradient")
    cases = [
        (torch.tensor([0.5, -1.25, 2.0], requires_grad=True), 0.125, torch.tensor([1.0, 2.0, -3.0])),
        # LSQ's step size is one number: a 0-d tensor, with g = 1 / sqrt(numel * qmax)
        (torch.tensor(0.03, requires_grad=True), 1 / (1000 * 127) ** 0.5, torch.tensor(2.0)),
        (torch.full((2, 3), 0.25).requires_grad_(True), 0.3, torch.arange(6.0).reshape(2, 3) - 2),
    ]
    for x, g, upstream in cases:
        _check_scale_gradient_case(scale_gradient, x, g, upstream)
    return passed("LSQ gradient scaling")


def _check_scale_gradient_case(scale_gradient, x, g, upstream):
    what = f"scale_gradient(x of shape {tuple(x.shape)}, g={g:.4g})"
    out = call(scale_gradient, what, x, g)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExerciseError(f"{what}: return a tensor shaped like x {tuple(x.shape)}, got {shape}")
    value = out.detach().reshape(-1).double()
    xv = x.detach().reshape(-1).double()
    diff = (value - xv).abs()
    if diff.max() > 1e-6 * max(1.0, float(xv.abs().max())):
        i = int((diff > 1e-6 * max(1.0, float(xv.abs().max()))).nonzero()[0])  # the first element that differs
        ratio = float(value[i] / xv[i])
        raise ExerciseError(f"{what}: the forward value must stay x: element [{i}] is {float(value[i]):.4g} "
                            f"but x[{i}] is {float(xv[i]):.4g} (ratio {ratio:.4g}"
                            f"{', that is g: did you return x * g?' if abs(ratio - g) < 1e-6 else ''})")
    if not out.requires_grad:
        raise ExerciseError("no gradient reaches x: the whole expression is detached. Keep a "
                            "term g * x outside .detach()")
    want = g * upstream
    # LSQ calls scale_gradient on the same step-size parameter at every training step
    for step in range(3):
        if step:
            x.grad = None
            out = call(scale_gradient, what, x, g)
        out.backward(upstream)
        got = None if x.grad is None else x.grad.detach()
        if got is not None and got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-7):
            continue
        hint = ""
        if got is not None and torch.allclose(got, upstream):
            hint = " The gradient is unscaled: did you return x itself?"
        elif got is not None and torch.allclose(got, upstream / g):
            hint = " The gradient is divided by g instead of multiplied."
        elif got is not None and step and torch.allclose(got, g ** (step + 1) * upstream):
            hint = (f" At call {step + 1} on the same tensor the gradient was scaled by g**{step + 1}: "
                    f"a hook registered on x stays on x, and one more piles up at every call "
                    f"(LSQ calls this at every step). Build the scaling into the returned "
                    f"expression instead of x.register_hook.")
        raise ExerciseError(f"{what}, call {step + 1}: for upstream gradient {upstream.tolist()} and "
                            f"g={g:.4g}, x.grad should be {want.tolist()}, got "
                            f"{None if got is None else got.tolist()}.{hint}")
