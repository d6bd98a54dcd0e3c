"""Unit tests for qatlab.qat: n-bit qconfigs, the freeze schedule, LSQ (ours vs torch)."""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qatlab import qat
from qatlab.models import SmallCNN


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def prepared():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return qat.prepare_eager_qat(SmallCNN())


# --- qconfig builders ---------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, "8", True, None])
def test_bad_bits_raise_naming_the_value(bits):
    with pytest.raises(ValueError, match=repr(bits).replace("(", r"\(")):
        qat.make_qconfig(weight_bits=bits)
    with pytest.raises(ValueError, match="activation bits"):
        qat.make_qconfig(activation_bits=bits)


def test_bad_observer_and_fake_quant_flag():
    with pytest.raises(ValueError, match="'percentile'"):
        qat.make_qconfig(observer="percentile")
    with pytest.raises(TypeError, match="'yes'"):
        qat.make_qconfig(fake_quant="yes")


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_range_has_2_pow_bits_levels(bits):
    lo, hi = qat.weight_qrange(bits)
    assert hi - lo + 1 == 2**bits and lo == -(hi + 1)
    fq = qat.make_qconfig(bits, 8).weight()
    assert (fq.quant_min, fq.quant_max) == (lo, hi)


def test_default_matches_torch_x86_qat_qconfig_exactly():
    from torch.ao.quantization import get_default_qat_qconfig

    ours, ref = qat.make_qconfig(), get_default_qat_qconfig("x86")
    torch.manual_seed(0)
    for part in ("activation", "weight"):
        a, b = getattr(ours, part)(), getattr(ref, part)()
        assert isinstance(a, type(b))   # qatlab's subclass: torch's class, a faster per-tensor kernel
        assert type(a.activation_post_process) is type(b.activation_post_process)
        assert (a.quant_min, a.quant_max, a.dtype, a.qscheme, a.ch_axis) == \
               (b.quant_min, b.quant_max, b.dtype, b.qscheme, b.ch_axis)
        for _ in range(3):  # moving averages must evolve identically
            x = torch.randn(4, 3, 5, 5) * 3 + 1
            assert torch.equal(a(x), b(x))
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_ptq_observers_match_torch_default_ptq_weights():
    from torch.ao.quantization import get_default_qconfig

    ours = qat.make_qconfig(8, 8, fake_quant=False, observer="histogram")
    ref = get_default_qconfig("x86")
    a, b = ours.activation(), ref.activation()
    assert type(a) is type(b) and (a.quant_min, a.quant_max) == (b.quant_min, b.quant_max)
    w = torch.randn(6, 3, 3, 3)
    ow, rw = ours.weight(), ref.weight()
    ow(w), rw(w)
    for x, y in zip(ow.calculate_qparams(), rw.calculate_qparams()):
        assert torch.equal(x, y)


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 1000))
def test_fake_quant_output_sits_on_the_n_bit_grid(bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 2, 3, 3, generator=g)
    fq = qat.make_qconfig(bits, 8, observer="minmax").weight()
    out = fq(w)
    scale = fq.scale.reshape(-1, 1, 1, 1)
    q = out / scale
    assert torch.allclose(q, q.round(), atol=1e-4)
    lo, hi = qat.weight_qrange(bits)
    assert q.round().min() >= lo and q.round().max() <= hi


# --- prepare, freeze, evaluate ----------------------------------------------------------

def test_prepare_eager_qat_inserts_fake_quant(prepared):
    block = prepared.features[0][0]
    assert type(block).__name__ == "ConvBnReLU2d"
    assert hasattr(block, "weight_fake_quant") and hasattr(block, "activation_post_process")
    with pytest.raises(TypeError, match="fuse_model"):
        qat.prepare_eager_qat(torch.nn.Linear(2, 2))


def test_freeze_schedule_plan_and_effect(prepared):
    model = copy.deepcopy(prepared)
    cb = qat.freeze_schedule(freeze_observers_at=2, freeze_bn_at=1)
    flags = lambda: (int(model.features[0][0].weight_fake_quant.observer_enabled),
                     bool(model.features[0][0].freeze_bn))
    cb(0, model)
    assert flags() == (1, False)
    cb(1, model)
    assert flags() == (1, True)
    cb(2, model)
    assert flags() == (0, True)
    model.train()  # train() must not unfreeze BN
    assert not model.features[0][0].bn.training
    with pytest.raises(ValueError, match="-1"):
        qat.freeze_schedule(freeze_bn_at=-1)


def test_call_every_step_counts_only_training_forwards():
    model = torch.nn.Linear(2, 2)
    seen = []
    handle = qat.call_every_step(model, lambda step, m: seen.append(step))
    x = torch.zeros(1, 2)
    model(x), model(x)
    model.eval()
    model(x)
    model.train()
    model(x)
    handle.remove()
    model(x)
    assert seen == [0, 1, 2]


def test_observers_disabled_restores_flags(prepared):
    model = copy.deepcopy(prepared).train()
    model(torch.randn(2, 1, 28, 28))  # observe once, so the ranges are set
    fq = model.features[1][0].weight_fake_quant
    fq.disable_observer()  # one already off must stay off
    act = model.features[1][0].activation_post_process
    with qat.observers_disabled(model):
        assert int(act.observer_enabled) == 0
        before = act.scale.clone()
        model.eval()
        model(torch.randn(2, 1, 28, 28) * 10)
        assert torch.equal(act.scale, before)
    assert int(act.observer_enabled) == 1 and int(fq.observer_enabled) == 0


def test_track_qparams_records_training_steps_only(prepared):
    model = copy.deepcopy(prepared).train()
    trace, handle = qat.track_qparams(model.features[0][0].activation_post_process)
    model(torch.randn(4, 1, 28, 28))
    model.eval()
    model(torch.randn(4, 1, 28, 28))
    handle.remove()
    assert len(trace["scale"]) == 1 and trace["scale"][0] > 0


def test_folded_weight_agrees_for_plain_and_fused():
    torch.manual_seed(0)
    plain = SmallCNN().eval()
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    fused = qat.prepare_eager_qat(copy.deepcopy(plain))
    a = qat.folded_weight(plain.features[1][0], plain.features[1][1])
    b = qat.folded_weight(fused.features[1][0])
    assert torch.equal(a, b)
    # and it is what fuse_modules (eval) folds into the conv
    folded = copy.deepcopy(plain).fuse_model(is_qat=False)
    assert torch.allclose(folded.features[1][0][0].weight, a, atol=1e-6)


def test_recovered_fraction():
    assert qat.recovered_fraction(98.0, 90.0, 96.0) == 0.75
    assert qat.recovered_fraction(98.0, 90.0, 89.0) < 0


# --- LSQ -------------------------------------------------------------------------------

def _lsq_case(seed, per_channel):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, 3, 3, generator=g) * 0.4
    qmin, qmax = qat.weight_qrange(4)
    s = (w.abs().amax(dim=(1, 2, 3)) / qmax * 0.6) if per_channel else w.abs().max().reshape(1) / qmax * 0.6
    up = torch.randn(w.shape, generator=g)
    return w, s, qmin, qmax, up


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), per_channel=st.booleans())
def test_lsq_matches_torch_learnable_fake_quant(seed, per_channel):
    w, s, qmin, qmax, up = _lsq_case(seed, per_channel)
    g = qat.lsq_grad_scale(w.numel() // s.numel(), qmax)
    x1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    ours = qat.lsq_fake_quantize(x1, s1, qmin, qmax, g)
    ours.backward(up)
    x2, s2 = w.clone().requires_grad_(), s.clone().requires_grad_()
    if per_channel:
        ref = torch._fake_quantize_learnable_per_channel_affine(x2, s2, torch.zeros(6), 0, qmin, qmax, g)
    else:
        ref = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, torch.zeros(1), qmin, qmax, g)
    ref.backward(up)
    assert torch.equal(ours, ref)
    # torch's learnable kernels test the clipping range on round(x/s), so they pass the gradient
    # for x/s in [qmin - 0.5, qmin) and (qmax, qmax + 0.5]; LSQ clips x/s itself
    # (round(clip(x/s)) in the paper). Everywhere else the two agree exactly.
    v = w / (s.reshape(-1, 1, 1, 1) if per_channel else s)
    band = ((v >= qmin - 0.5) & (v < qmin)) | ((v > qmax) & (v <= qmax + 0.5))
    assert torch.equal(x1.grad[~band], x2.grad[~band])
    assert (x1.grad[band] == 0).all() and (x2.grad[band] != 0).all()
    clean = ~band.reshape(band.shape[0], -1).any(1) if per_channel else ~band.any().reshape(1)
    assert torch.allclose(s1.grad[clean], s2.grad[clean], rtol=1e-4, atol=1e-6)


def test_lsq_grad_matches_autograd_of_straight_through_formula():
    w, s, qmin, qmax, up = _lsq_case(3, True)
    g = qat.lsq_grad_scale(w[0].numel(), qmax)
    s1 = s.clone().requires_grad_()
    qat.lsq_fake_quantize(w, s1, qmin, qmax, g).backward(up)
    s2 = s.clone().requires_grad_()
    sv = qat.scale_gradient(s2, g).reshape(-1, 1, 1, 1)
    v = torch.clamp(w * (1.0 / sv), qmin, qmax)  # the paper: round(clip(x / s)) * s
    ((v + (torch.round(v) - v).detach()) * sv).backward(up)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_lsq_scale_gradient_by_hand():
    # x = [0.26, -1.0, 3.0], s = 0.5, range [-4, 3]: v = [0.52, -2, 6]
    # d/ds = [round(.52)-.52, round(-2)+2, qmax] = [0.48, 0, 3]
    s = torch.tensor([0.5], requires_grad=True)
    x = torch.tensor([0.26, -1.0, 3.0], requires_grad=True)
    qat.lsq_fake_quantize(x, s, -4, 3, grad_scale=0.5).sum().backward()
    assert torch.allclose(s.grad, torch.tensor([(0.48 + 0 + 3) * 0.5]))
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))  # clipped value gets no gradient


def test_lsq_bad_input():
    with pytest.raises(ValueError, match="numel"):
        qat.lsq_grad_scale(0, 7)
    with pytest.raises(ValueError, match="qmin=3"):
        qat.lsq_fake_quantize(torch.zeros(2), torch.ones(1), 3, 3)
    with pytest.raises(ValueError, match="weight bits"):
        qat.LSQFakeQuantize(bits=1)


def test_lsq_module_init_and_training_changes_scale(prepared):
    model = qat.use_lsq_weights(copy.deepcopy(prepared), bits=4)
    fq = model.features[0][0].weight_fake_quant
    assert isinstance(fq, qat.LSQFakeQuantize) and fq.scale.numel() == 16
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    w = qat.folded_weight(model.features[0][0])  # before the forward updates BN's running stats
    expected = 2 * w.reshape(16, -1).abs().mean(1) / 7 ** 0.5
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert bool(fq.initialized)
    init = fq.scale.detach().clone()
    assert torch.allclose(init, expected, rtol=1e-5)
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(fq.scale.detach(), init)
    with pytest.raises(ValueError, match="prepare_qat"):
        qat.use_lsq_weights(torch.nn.Linear(2, 2))


def test_plots_return_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = {"a": {"step_loss": [1.0, 0.8, 0.7, 0.5]}}
    assert qat.plot_loss_curves(h, smooth=2) is not None
    assert qat.plot_accuracy_curves({"a": ((0, 10), (97.0, 98.0))}) is not None
    assert qat.plot_qparams({"scale": [0.1, 0.2], "zero_point": [3, 4]}, freeze_step=1) is not None
    assert qat.plot_weight_histograms(torch.randn(50), torch.randn(50), step=0.5) is not None
    assert qat.plot_accuracy_table({"x": (97.0, 0.2), "y": (95.0, 0.0)}) is not None
    plt.close("all")


def test_plot_qparams_draws_a_constant_zero_point_only_in_the_legend():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = qat.plot_qparams({"scale": [0.1, 0.2, 0.2], "zero_point": [0, 0, 0]})
    assert len(ax.figure.axes) == 1  # no twin axis for a flat line
    assert "zero-point: 0 at every step" in [t.get_text() for t in ax.get_legend().get_texts()]
    ax = qat.plot_qparams({"scale": [0.1, 0.2], "zero_point": [3, 4]})
    assert len(ax.figure.axes) == 2
    plt.close("all")


def test_plot_weight_histograms_bins_are_the_rounding_cells():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = torch.tensor([0.0, 0.24, 0.26, 0.5, -0.74])
    ax = qat.plot_weight_histograms(w, w, step=0.5)
    first = [p for p in ax.patches][: len(ax.patches) // 2]  # the "before" bars, grid points -2..2
    # 0.24 rounds to 0 and 0.26 to 1 (edge at 0.25 = step / 2); -0.74 to -1
    assert [p.get_height() for p in first] == [0, 1, 2, 2, 0]
    plt.close("all")


def test_plot_weight_shift_and_accuracy_table():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = torch.zeros(2, 3)
    after = torch.tensor([[0.1, 0.0, 0.3], [0.0, 0.0, 5.0]])
    ax = qat.plot_weight_shift(before, after, torch.tensor([0.1, 1.0]))
    assert sum(p.get_height() for p in ax.patches) == 6  # every weight counted (5 steps clipped)
    ax = qat.plot_accuracy_table({"fp32 x": (97.0, 0.2), "PTQ y": (95.0, 0.1), "QAT z": (96.0, 0.3)},
                                 points={"fp32 x": [96.8, 97.2], "PTQ y": [94.9, 95.1], "QAT z": [95.7, 96.3]})
    colors = [p.get_facecolor()[:3] for p in ax.patches]
    assert len(set(colors)) == 3  # one colour per method
    assert "does not start at 0" in ax.get_xlabel() and "2 seeds" in ax.get_xlabel()
    plt.close("all")


def test_freeze_pt2e_bn_stats_matches_eager_frozen_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    model.train()(torch.randn(16, 1, 6, 6) * 2 + 1)  # give BN running statistics
    x = torch.randn(4, 1, 6, 6)
    graph = torch.export.export(model.train(), (x,)).module()
    mean_before = model[1].running_mean.clone()
    assert qat.freeze_pt2e_bn_stats(graph) == 1
    assert qat.freeze_pt2e_bn_stats(graph) == 0  # idempotent
    out = graph(x)
    assert torch.allclose(out, model.eval()(x), atol=1e-6)  # normalised with running statistics
    buffers = dict(graph.named_buffers())
    running = next(v for k, v in buffers.items() if k.endswith("running_mean"))
    assert torch.equal(running, mean_before)  # and not updated
    with pytest.raises(TypeError, match="GraphModule"):
        qat.freeze_pt2e_bn_stats(model)


def test_freeze_schedule_freezes_bn_of_an_exported_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    graph = torch.export.export(model, (torch.randn(4, 1, 6, 6),)).module()
    qat.freeze_schedule(freeze_bn_at=1)(0, graph)
    bn = [n for n in graph.graph.nodes if "batch_norm" in str(n.target)]
    assert bn and all(n.args[5] for n in bn)
    qat.freeze_schedule(freeze_bn_at=1)(1, graph)
    assert all(not n.args[5] for n in bn)


def test_lsq_minmax_init_and_bad_init():
    w = torch.tensor([[0.1, -0.3], [0.8, 0.2]])
    fq = qat.LSQFakeQuantize(bits=4, channels=2, init="minmax")
    fq(w)
    assert torch.allclose(fq.scale.detach(), torch.tensor([0.3, 0.8]) / 7.5)
    paper = qat.LSQFakeQuantize(bits=4, channels=2)
    paper(w)
    assert torch.allclose(paper.scale.detach(), 2 * torch.tensor([0.2, 0.5]) / 7 ** 0.5)
    with pytest.raises(ValueError, match="'mse'"):
        qat.LSQFakeQuantize(init="mse")


def test_allow_train_eval_switches_a_deep_copy_not_the_original():
    import copy

    import torch
    from torch import nn

    from qatlab import qat
    from qatlab.conversion import prepare_pt2e

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(2, 1, 8, 8))
    gm = qat.allow_train_eval(prepare_pt2e(net.train(), (1, 8, 8)))
    twin = copy.deepcopy(gm)
    twin.eval()
    assert twin.training is False and gm.training is True
    x = torch.randn(4, 1, 8, 8)
    gm.train()
    before = [b.clone() for b in gm.buffers()]
    gm(x)  # the original still trains: its BN running statistics move
    assert any(not torch.equal(a, b) for a, b in zip(before, gm.buffers()))
