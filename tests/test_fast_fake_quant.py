"""qatlab.fast_fake_quant against torch's kernels, bit for bit: outputs, gradients, observer buffers, training."""

import copy

import numpy as np
import pytest
import torch

from qatlab import conversion
from qatlab.fast_fake_quant import (
    fake_quantize_per_tensor,
    mask_interval,
    observe_moving_average_minmax,
    takes_fast_path,
)

RANGES = [(-128, 127), (0, 255), (-8, 7), (-2, 1)]


def _probe_values(scale, zero_point, qmin, qmax, seed):
    """Random values over the range and beyond, every tie (k + 1/2) s, its two neighbouring floats,
    and the float32 values around both ends of the range."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(scale, dtype=torch.float32)
    k = torch.arange(qmin - zero_point - 3, qmax - zero_point + 3, dtype=torch.float32)
    ties = (k + 0.5) * s
    up, down = torch.full_like(ties, float("inf")), torch.full_like(ties, -float("inf"))
    grid = k * s
    return torch.cat([torch.randn(4000, generator=g) * s * (qmax - qmin), ties, torch.nextafter(ties, up),
                      torch.nextafter(ties, down), grid, torch.zeros(3)])


def _torch_fq(x, scale, zero_point, qmin, qmax):
    return torch.fake_quantize_per_tensor_affine(x, torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32),
                                                 qmin, qmax)


@pytest.mark.parametrize("qmin,qmax", RANGES)
def test_outputs_and_gradients_are_torchs_bit_for_bit(qmin, qmax):
    g = torch.Generator().manual_seed(qmax)
    for trial in range(40):
        scale = float(np.float32(10 ** torch.empty(1).uniform_(-5, 1, generator=g).item()))
        zero_point = int(torch.randint(qmin, qmax + 1, (1,), generator=g))
        x = _probe_values(scale, zero_point, qmin, qmax, trial)
        grad = torch.randn(x.shape, generator=g)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = _torch_fq(a, scale, zero_point, qmin, qmax), fake_quantize_per_tensor(b, scale, zero_point, qmin, qmax)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(ya, yb), (scale, zero_point)
        assert torch.equal(a.grad, b.grad), (scale, zero_point)


def test_the_interval_is_where_torchs_gradient_passes():
    for scale, zero_point, qmin, qmax in [(0.5, 0, -128, 127), (0.1, 3, -128, 127), (0.0173, 255, 0, 255),
                                          (2.5e-4, -8, -8, 7), (0.7, 0, -2, 1)]:
        lo, hi, below, above = mask_interval(scale, zero_point, qmin, qmax)
        assert below < lo <= hi < above
        assert np.nextafter(np.float32(below), np.float32(np.inf)) == np.float32(lo)   # neighbours: no float between
        assert np.nextafter(np.float32(hi), np.float32(np.inf)) == np.float32(above)
        x = torch.tensor([below, lo, hi, above], requires_grad=True)
        _torch_fq(x, scale, zero_point, qmin, qmax).sum().backward()
        assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0], (scale, zero_point)


def test_ties_round_to_even_in_the_interval():
    assert mask_interval(0.5, 0, -128, 127)[:2] == (-64.25, float(np.nextafter(np.float32(63.75), np.float32(0))))


@pytest.mark.parametrize("scale,zero_point", [(0.0, 0), (-0.1, 0), (float("inf"), 0), (float("nan"), 0),
                                              (1e-40, 0), (0.1, 200), (0.1, -129)])
def test_scales_without_an_interval_fall_back_to_torchs_kernel(scale, zero_point):
    assert mask_interval(scale, zero_point, -128, 127) is None
    if np.isfinite(scale) and scale > 0:
        x = torch.randn(100, requires_grad=True)
        y = fake_quantize_per_tensor(x, scale, zero_point, -128, 127)
        ref = torch.fake_quantize_per_tensor_affine(x, torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32),
                                                    -128, 127)
        assert torch.equal(y, ref)


def _fake_quantizers(per_channel=False):
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )

    if per_channel:
        kwargs = dict(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-7, quant_max=7, dtype=torch.int8,
                      qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        kwargs = dict(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
                      qscheme=torch.per_tensor_affine, averaging_constant=0.01)
    ours = conversion.KernelQParamsFakeQuantize(**kwargs)
    return ours, FusedMovingAvgObsFakeQuantize(**kwargs)


def test_kernel_qparams_fake_quantize_matches_torchaos_module_call_by_call():
    """Observer on (first call from +inf, then moving averages), then off: the same outputs,
    gradients, running min/max, scale and zero-point after every call."""
    ours, theirs = _fake_quantizers()
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        if step == 5:
            ours.disable_observer()
            theirs.disable_observer()
        x = (torch.randn(4, 8, 5, 5, generator=g) * (1 + step) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        assert takes_fast_path(ours, x)
        y1, y2 = ours(x), theirs(x2)
        grad = torch.randn(y1.shape, generator=g)
        y1.backward(grad)
        y2.backward(grad)
        assert torch.equal(y1, y2) and torch.equal(x.grad, x2.grad), step
        for name in ("scale", "zero_point", "activation_post_process.min_val", "activation_post_process.max_val"):
            assert torch.equal(ours.get_buffer(name), theirs.get_buffer(name)), (step, name)


def test_observer_step_is_the_fused_kernels():
    ours, theirs = _fake_quantizers()
    for step in range(4):
        x = torch.randn(1000) * (step + 1) - step
        observe_moving_average_minmax(ours.activation_post_process, x)
        obs = theirs.activation_post_process
        torch.fused_moving_avg_obs_fake_quant(x, torch.tensor([1]), torch.tensor([0]), obs.min_val, obs.max_val,
                                              theirs.scale, theirs.zero_point, obs.averaging_constant,
                                              obs.quant_min, obs.quant_max, 0, False, False)
        assert torch.equal(ours.activation_post_process.min_val, obs.min_val)
        assert torch.equal(ours.activation_post_process.max_val, obs.max_val)


def test_other_inputs_go_to_torchs_op():
    ours, _ = _fake_quantizers()
    assert not takes_fast_path(ours, torch.randn(3, dtype=torch.float64))
    ours.disable_fake_quant()
    assert not takes_fast_path(ours, torch.randn(3))
    weights, theirs = _fake_quantizers(per_channel=True)
    w = torch.randn(6, 3, 3, 3)
    assert not takes_fast_path(weights, w)
    assert torch.equal(weights(w), theirs(w))


def test_pt2e_qat_training_is_bit_identical_to_torchaos_fake_quantizer(monkeypatch):
    """A residual net through conversion.prepare_pt2e: 5 SGD steps with qatlab's forward and 5 with
    torchao's (observers frozen after 3): identical losses, gradients and final state."""
    from torch import nn
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = torch.relu(self.b2(self.c2(h)) + h)
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    prepared = conversion.prepare_pt2e(Res(), (3, 12, 12), weight_bits=4)
    runs = []
    for forward in (None, FusedMovingAvgObsFakeQuantize.forward):
        if forward is not None:
            monkeypatch.setattr(conversion.KernelQParamsFakeQuantize, "forward", forward)
        model = copy.deepcopy(prepared)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        record = []
        for step in range(5):
            if step == 3:
                for m in model.modules():
                    if isinstance(m, FusedMovingAvgObsFakeQuantize):
                        m.disable_observer()
            x, y = torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            record.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
        runs.append((record, model.state_dict()))
    (fast, fast_state), (ref, ref_state) = runs
    for (la, ga), (lb, gb) in zip(fast, ref):
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert fast_state.keys() == ref_state.keys()
    assert all(torch.equal(fast_state[k], ref_state[k]) for k in fast_state)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_eager_qat_training_is_bit_identical_to_torchs_fake_quantizer(monkeypatch, granularity):
    """make_qconfig's fake-quantizer (qatlab's subclass) against torch.ao's own class: 4 SGD steps of
    eager QAT on the SmallCNN, observers frozen after 2; per-tensor weights take the fast path too."""
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize

    from qatlab import models, qat
    from qatlab.fast_fake_quant import FastFusedMovingAvgObsFakeQuantize

    torch.manual_seed(0)
    base = models.SmallCNN()
    qc = qat.make_qconfig(4, 8, weight_granularity=granularity)
    assert isinstance(qc.activation(), FastFusedMovingAvgObsFakeQuantize)
    runs = []
    for forward in (None, FusedMovingAvgObsFakeQuantize.forward):
        if forward is not None:
            monkeypatch.setattr(FastFusedMovingAvgObsFakeQuantize, "forward", forward)
        model = qat.prepare_eager_qat(copy.deepcopy(base), qc)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(2)
        losses = []
        for step in range(4):
            if step == 2:
                model.apply(torch.ao.quantization.disable_observer)
            x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((losses, model.state_dict()))
    (fast, fast_state), (ref, ref_state) = runs
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    assert all(torch.equal(fast_state[k], ref_state[k]) for k in fast_state)


def test_use_torch_kernel_switches_every_fake_quantizer_back_and_nests():
    from qatlab.fast_fake_quant import use_torch_kernel

    ours, _ = _fake_quantizers()
    x = torch.randn(2, 3, 4, 4)
    assert takes_fast_path(ours, x)
    with use_torch_kernel():
        assert not takes_fast_path(ours, x)
        with use_torch_kernel():
            assert not takes_fast_path(ours, x)
        assert not takes_fast_path(ours, x)
    assert takes_fast_path(ours, x)
