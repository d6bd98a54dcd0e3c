"""Unit tests for qatlab.sensitivity (notebook 06) and make_qconfig's per-tensor weights."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from qatlab import qat
from qatlab import sensitivity as sens
from qatlab.models import SmallCNN, TinyMobileNet


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _batches(n=3, b=8, seed=0, size=28):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, size, size, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


# --- make_qconfig(weight_granularity=...) --------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_per_tensor_weights_match_torch_fake_quantize_exactly(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.logspace(-2, 0, 6).reshape(-1, 1, 1, 1)
    fq = qat.make_qconfig(bits, 8, observer="minmax", weight_granularity="per_tensor").weight()
    out = fq(w)
    lo, hi = qat.weight_qrange(bits)
    scale = w.abs().max() / ((hi - lo) / 2)
    assert torch.allclose(fq.scale, scale.reshape(1))
    ref = torch.fake_quantize_per_tensor_affine(w, float(fq.scale), 0, lo, hi)
    assert torch.equal(out, ref)
    assert fq.qscheme == torch.per_tensor_symmetric and fq.scale.numel() == 1


def test_per_channel_is_still_the_default_and_bad_granularity_raises():
    assert qat.make_qconfig(4, 8).weight().qscheme == torch.per_channel_symmetric
    with pytest.raises(ValueError, match="'per_row'"):
        qat.make_qconfig(weight_granularity="per_row")


def test_per_tensor_qat_model_converts():
    m = sens.prepare_mixed_qat(SmallCNN(), 4, 8, weight_granularity="per_tensor")
    sens.calibrate(m, _batches(), 2)
    q = torch.ao.quantization.convert(copy.deepcopy(m))
    w = q.features[0][0].weight()
    assert w.qscheme() == torch.per_tensor_affine and w.q_zero_point() == 0  # symmetric, stored as affine
    assert w.int_repr().abs().max() <= 8  # 4-bit values in an int8 container
    assert q(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --- fair runs ----------------------------------------------------------------------

def test_finetune_steps_counts_steps_cycles_and_drops_lr():
    net = nn.Linear(2, 2)
    data = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))] * 2
    seen = []
    losses = sens.finetune_steps(net, data, steps=5, lr=0.1, on_step=lambda t, m: seen.append(t),
                                 lr_drop_at=3, lr_drop=0.5)
    assert len(losses) == 5 and seen == [0, 1, 2, 3, 4] and not net.training


def test_finetune_steps_lr_drop_changes_the_update():
    torch.manual_seed(0)
    data = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    sens.finetune_steps(a, data, steps=3, lr=0.1, momentum=0.0)
    sens.finetune_steps(b, data, steps=3, lr=0.1, momentum=0.0, lr_drop_at=1, lr_drop=0.0001)
    assert not torch.allclose(a.weight, b.weight)


@pytest.mark.parametrize("kwargs, match", [({"steps": -1}, "-1"), ({"lr": 0}, "0"), ({"steps": 1.5}, "1.5"),
                                           ({"momentum": 1.0}, "1.0"), ({"lr_drop_at": -2}, "-2")])
def test_finetune_steps_rejects_bad_arguments(kwargs, match):
    args = {"steps": 2, "lr": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        sens.finetune_steps(nn.Linear(2, 2), [(torch.randn(1, 2), torch.tensor([0]))], **args)


def test_finetune_steps_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        sens.finetune_steps(nn.Linear(2, 2), [], steps=1, lr=0.1)


def test_run_sweep_and_summarize():
    calls = []
    out = sens.run_sweep(["a", "b"], [0, 1, 2], lambda c, s: calls.append((c, s)) or s * 1.0, desc=None)
    assert calls[:2] == [("a", 0), ("b", 0)]  # seeds outer: per-seed caches fill once
    summary = sens.summarize(out)
    assert summary["a"] == (1.0, 1.0, 3)
    with pytest.raises(ValueError):
        sens.run_sweep([], [0], lambda c, s: 0)


def test_recovered_fraction_stats_matches_per_seed_formula():
    m, se = sens.recovered_fraction_stats([98, 97], [88, 87], [96, 94])
    assert math.isclose(m, 0.75) and math.isclose(se, 0.05)
    with pytest.raises(ValueError, match="drops"):
        sens.recovered_fraction_stats([98, 97], [98, 90], [98, 96])
    with pytest.raises(ValueError, match="same number"):
        sens.recovered_fraction_stats([98], [90], [95])


# --- mixed precision ----------------------------------------------------------------

def test_quantizable_layers_of_both_cnns():
    assert sens.quantizable_layers(SmallCNN()) == ["features.0.0", "features.1.0", "features.2.0", "fc"]
    names = sens.quantizable_layers(TinyMobileNet())
    assert names[0] == "features.0.0" and names[-1] == "fc" and "features.1.0.0" in names
    with pytest.raises(ValueError):
        sens.quantizable_layers(nn.ReLU())


def test_prepare_mixed_qat_gives_each_layer_its_bits():
    m = sens.prepare_mixed_qat(SmallCNN(), {"fc": 2, "features.1.0": 4}, 8)
    assert m.fc.weight_fake_quant.quant_max == 1
    assert m.features[1][0].weight_fake_quant.quant_max == 7
    assert m.features[0][0].weight_fake_quant.quant_max == 127
    assert m.features[0][0].activation_post_process.quant_max == 255  # reduce_range=False
    with pytest.raises(ValueError, match="unknown layer"):
        sens.prepare_mixed_qat(SmallCNN(), {"conv9": 2}, 8)


def test_mixed_with_one_width_equals_uniform():
    torch.manual_seed(0)
    base = SmallCNN()
    base.train()
    base(torch.randn(16, 1, 28, 28))
    base.eval()
    a = sens.calibrate(sens.prepare_mixed_qat(copy.deepcopy(base), 3, 8, observer="minmax"), _batches(), 3)
    b = sens.calibrate(sens.prepare_mixed_qat(copy.deepcopy(base), {n: 3 for n in sens.quantizable_layers(base)}, 8,
                                              observer="minmax"), _batches(), 3)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(a(x), b(x))


def test_calibrate_needs_enough_batches():
    m = sens.prepare_mixed_qat(SmallCNN(), 8, 8, observer="minmax")
    with pytest.raises(ValueError, match="has 3"):
        sens.calibrate(m, _batches(3), 5)
    with pytest.raises(ValueError, match="n_batches"):
        sens.calibrate(m, _batches(3), 0)


def test_weight_bytes_and_layer_sizes():
    sizes = sens.layer_sizes(SmallCNN())
    assert sizes == {"features.0.0": (144, 16), "features.1.0": (4608, 32), "features.2.0": (18432, 64),
                     "fc": (10240, 10)}
    w8 = sens.weight_bytes(sizes, 8)
    assert w8 == 144 + 4608 + 18432 + 10240 + 4 * 122
    assert sens.weight_bytes(sizes, 4) == (144 + 4608 + 18432 + 10240) // 2 + 4 * 122
    assert sens.weight_bytes({"a": (3, 1)}, 2) == 1 + 4  # 6 bits round up to one byte
    with pytest.raises(ValueError, match="bits of a"):
        sens.weight_bytes({"a": (3, 1)}, 0)


def test_choose_high_precision_layers_is_optimal_by_brute_force():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(20):
        names = [f"l{i}" for i in range(5)]
        sizes = {n: (rng.randint(10, 5000), rng.randint(1, 16)) for n in names}
        drops = {n: rng.uniform(-0.5, 5) for n in names}
        budget = rng.uniform(sens.weight_bytes(sizes, 2), sens.weight_bytes(sizes, 8))
        keep = sens.choose_high_precision_layers(drops, sizes, budget)
        assert sens.weight_bytes(sizes, {n: 8 if n in keep else 2 for n in names}) <= budget
        lost = sum(drops[n] for n in names if n not in keep)
        for k in range(6):
            for other in itertools.combinations(names, k):
                if sens.weight_bytes(sizes, {n: 8 if n in other else 2 for n in names}) <= budget:
                    assert lost <= sum(drops[n] for n in names if n not in other) + 1e-9


def test_choose_high_precision_layers_rejects_bad_input():
    sizes = {"a": (100, 1), "b": (100, 1)}
    with pytest.raises(ValueError, match="same layers"):
        sens.choose_high_precision_layers({"a": 1.0}, sizes, 1000)
    with pytest.raises(ValueError, match="below the all-2-bit size"):
        sens.choose_high_precision_layers({"a": 1.0, "b": 1.0}, sizes, 10)


# --- sensitivity ----------------------------------------------------------------------

def test_layer_sensitivity_quantizes_one_layer_at_a_time():
    seen = []
    out = sens.layer_sensitivity(lambda b: seen.append(dict(b)) or b, ["a", "b", "c"], 3,
                                 evaluate=lambda b: sum(b.values()))
    assert seen == [{"a": 3, "b": 8, "c": 8}, {"a": 8, "b": 3, "c": 8}, {"a": 8, "b": 8, "c": 3}]
    assert out == {"a": 19, "b": 19, "c": 19}


def test_activation_sqnr_matches_torch_numeric_suite():
    import torch.ao.ns._numeric_suite as ns
    from torch.ao.ns.fx.utils import compute_sqnr

    torch.manual_seed(0)
    base = TinyMobileNet()
    base.train()
    base(torch.randn(32, 1, 28, 28))
    base.eval()
    fused = copy.deepcopy(base).fuse_model(is_qat=False)
    q = torch.ao.quantization.convert(
        sens.calibrate(sens.prepare_mixed_qat(copy.deepcopy(base), 4, 8, observer="minmax"), _batches(), 3))
    x = torch.randn(16, 1, 28, 28)
    ref = ns.compare_model_outputs(copy.deepcopy(fused), copy.deepcopy(q), x)
    ref = {k.removesuffix(".stats"): float(compute_sqnr(v["float"][0], v["quantized"][0].dequantize()))
           for k, v in ref.items() if k != "quant.stats"}
    ours = sens.activation_sqnr(fused, q, x, list(ref))
    assert list(ours) == list(ref)
    for n in ref:
        assert abs(ours[n] - ref[n]) < 0.01, n  # dB; torch computes in float32, ours in float64


def test_layer_outputs_names_a_module_that_did_not_run():
    m = SmallCNN().eval()
    m.unused = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unused"):
        sens.layer_outputs(m, torch.randn(1, 1, 28, 28), ["fc", "unused"])


def test_channel_ranges_are_folded_weight_maxima():
    torch.manual_seed(0)
    m = SmallCNN()
    for bn in (m.features[i][1] for i in range(3)):
        bn.weight.data.uniform_(0.5, 2)
        bn.running_var.uniform_(0.1, 3)
    r = sens.channel_ranges(m)
    assert list(r) == ["features.0.0", "features.1.0", "features.2.0"]
    conv, bn = m.features[1][0], m.features[1][1]
    w = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    assert torch.allclose(r["features.1.0"], w.detach().abs().amax(dim=(1, 2, 3)))
    with pytest.raises(ValueError):
        sens.channel_ranges(nn.Linear(2, 2))


# --- diagnosing a QAT run -------------------------------------------------------------

def test_training_trace_records_every_step_and_unit_ratio_in_batch_mode():
    torch.manual_seed(0)
    m = sens.prepare_mixed_qat(TinyMobileNet(), 8, 8)
    tr = sens.TrainingTrace(m)
    sens.finetune_steps(m, _batches(2), steps=3, lr=0.01, trace=tr)
    tr.remove()
    assert len(tr.loss) == 3 and all(len(v) == 3 for v in tr.grad_norm.values())
    assert all(len(v) == 3 for v in tr.weight_change.values())
    assert all(c > 0 for v in tr.weight_change.values() for c in v)
    # step 0: running var is 1 (fresh BN) and the batch std is whatever it is; then it tracks
    assert all(lo <= hi for n in tr.layers for lo, hi in zip(tr.spread_min[n], tr.spread_ratio[n]))
    assert not tr._handles
    with pytest.raises(ValueError, match="fused"):
        sens.TrainingTrace(SmallCNN())


def test_training_trace_mean_shift_is_batch_mean_against_running_mean_in_running_std_units():
    torch.manual_seed(0)
    m = sens.prepare_mixed_qat(TinyMobileNet(), 8, 8)
    tr = sens.TrainingTrace(m)
    name, convbn = next(iter(tr.layers.items()))
    bn = convbn.bn
    bn.running_mean.copy_(torch.linspace(-1.0, 1.0, bn.num_features))
    bn.running_var.fill_(4.0)
    seen = {}

    def grab(mod, args):            # BN's input and the running statistics it is compared with
        seen["x"], seen["mean"], seen["var"] = args[0].detach(), mod.running_mean.clone(), mod.running_var.clone()

    h = bn.register_forward_pre_hook(grab)
    sens.finetune_steps(m, _batches(1), steps=1, lr=0.01, trace=tr)
    h.remove()
    tr.remove()
    x = seen["x"]
    expected = ((x.mean(dim=(0, 2, 3)) - seen["mean"]).abs() / torch.sqrt(seen["var"] + bn.eps)).max()
    assert tr.mean_shift[name] == [pytest.approx(float(expected), rel=1e-5)]
    assert all(len(v) == 1 and v[0] >= 0 for v in tr.mean_shift.values())


def test_frozen_gain_is_gamma_over_running_std():
    m = sens.prepare_mixed_qat(SmallCNN(), 8, 8)
    convbn = m.features[0][0]
    convbn.bn.running_var.fill_(4.0)
    convbn.bn.weight.data.fill_(3.0)
    assert torch.allclose(sens.frozen_gain(convbn), torch.full((16,), 3.0 / math.sqrt(4.0 + convbn.bn.eps)))


def test_top_hessian_eigenvalue_matches_autograd_hessian_and_restores_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat):
        chunks, i = [], 0
        for s in shapes:
            n = math.prod(s)
            chunks.append(flat[i:i + n].reshape(s))
            i += n
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return nn.functional.cross_entropy(h @ chunks[2].T + chunks[3], y)

    flat = torch.cat([p.detach().flatten() for p in params])
    hess = torch.autograd.functional.hessian(loss_of, flat)
    top = float(torch.linalg.eigvalsh(hess).abs().max())
    ours = sens.top_hessian_eigenvalue(net, x, y, iters=200)
    assert abs(abs(ours) - top) / top < 1e-3

    bn_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)).train()
    before = bn_net[1].running_var.clone()
    sens.top_hessian_eigenvalue(bn_net, torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), iters=2)
    assert torch.equal(bn_net[1].running_var, before)


def test_stable_lr_limit_validates():
    assert math.isclose(sens.stable_lr_limit(2.0, momentum=0.0), 1.0)
    with pytest.raises(ValueError, match="sharpness"):
        sens.stable_lr_limit(0.0)
    with pytest.raises(ValueError, match="momentum"):
        sens.stable_lr_limit(1.0, momentum=1.0)


# --- plots ----------------------------------------------------------------------------

def test_plots_return_their_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = sens.plot_bit_sweep({"PTQ A8": {8: (98, 0.1), 2: (80, 5)}, "QAT A4": {8: (97, 0.2)}}, reference=(98, 0.1))
    assert "y axis starts" in ax.get_title()
    ax = sens.plot_channel_ranges({"a": torch.tensor([1.0, 0.01]), "b": torch.tensor([0.5, 0.4])})
    assert "100×" in ax.get_title()
    assert sens.plot_layer_sqnr({"x": {"a": 10.0, "b": 20.0}}) is not None
    m = sens.prepare_mixed_qat(TinyMobileNet(), 8, 8)
    tr = sens.TrainingTrace(m)
    sens.finetune_steps(m, _batches(1), steps=2, lr=0.01, trace=tr)
    tr.remove()
    assert len(sens.plot_freeze_trace({"run": tr}, freeze_step=1)) == 3
    assert sens.plot_lr_sweep({"a": {0.01: 90.0, 0.1: 10.0}}).get_xscale() == "log"
    ax = sens.plot_sharpness({"frozen": {20: 38.0, 22: 110.0, 24: float("nan")}, "batch": {20: 5.0}},
                             {0.05: 76.0, 0.1: 38.0})
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 4
    assert list(ax.get_lines()[0].get_xdata()) == [20, 22]  # the nan is left out
    assert sens.plot_pareto({"u": [(1000, 97.0, 0.1, "W8"), (500, 96.0, 0.3, "W4")]}) is not None
    plt.close("all")


def _tiny_net_and_exact_top_eigenvalue():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat):
        chunks, i = [], 0
        for s in shapes:
            n = math.prod(s)
            chunks.append(flat[i:i + n].reshape(s))
            i += n
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return nn.functional.cross_entropy(h @ chunks[2].T + chunks[3], y)

    flat = torch.cat([p.detach().flatten() for p in params])
    eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    return net, x, y, eig[eig.abs().argmax()].item()


def test_hessian_sharpness_converges_to_the_exact_top_eigenvalue_and_says_so():
    net, x, y, top = _tiny_net_and_exact_top_eigenvalue()
    s = sens.hessian_sharpness(net, x, y, max_iters=500, rtol=1e-7)
    assert s.converged and s.iters < 500
    assert abs(s.value - top) / abs(top) < 1e-3
    assert s.residual < 0.1 and float(s) == s.value and "converged" in str(s)


def test_hessian_sharpness_reports_an_unconverged_iteration():
    net, x, y, _ = _tiny_net_and_exact_top_eigenvalue()
    s = sens.hessian_sharpness(net, x, y, max_iters=2, rtol=1e-12)
    assert not s.converged and s.iters == 2 and "NOT converged" in str(s)
    # the fixed-iteration form is the same iteration without the stopping rule
    assert sens.top_hessian_eigenvalue(net, x, y, iters=2) == s.value


def test_hessian_sharpness_restores_buffers_and_rejects_bad_arguments():
    bn_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)).train()
    before = bn_net[1].running_var.clone()
    sens.hessian_sharpness(bn_net, torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), max_iters=3)
    assert torch.equal(bn_net[1].running_var, before)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="max_iters"):
        sens.hessian_sharpness(nn.Linear(3, 2), x, y, max_iters=0)
    with pytest.raises(ValueError, match="rtol"):
        sens.hessian_sharpness(nn.Linear(3, 2), x, y, rtol=-1)


def test_finetune_steps_follows_a_recipe_learning_rate_and_freezes():
    from qatlab.recipe import QATRecipe

    torch.manual_seed(0)
    m = sens.prepare_mixed_qat(SmallCNN(), 8, 8)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    recipe = QATRecipe(steps=4, lr=0.01)
    seen = []
    sens.finetune_steps(m, batches, 4, 0.01, recipe=recipe,
                        on_step=lambda t, model: seen.append((t, model.features[0][0].freeze_bn)))
    # the recipe freezes BN at step 2, before on_step runs
    assert seen == [(0, False), (1, False), (2, True), (3, True)]
    with pytest.raises(ValueError, match="recipe"):
        sens.finetune_steps(m, batches, 4, 0.1, recipe=recipe)
