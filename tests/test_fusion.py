"""qatlab.fusion: fold_bn against torch's fuse_conv_bn_eval / fuse_linear_bn_eval, the
whole-model fold, the measuring helpers and the notebook-03 views."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from qatlab import fold_bn, fusion
from qatlab.models import SmallCNN

RTOL, ATOL = 1e-5, 1e-6


def randomize_bn(bn, seed=0):
    """Give a BN non-trivial affine parameters and running statistics, and put it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=gen))
            bn.bias.copy_(torch.randn(n, generator=gen))
        bn.running_mean.copy_(torch.randn(n, generator=gen))
        bn.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.05)
    return bn.eval()


def assert_matches_torch(conv, bn, x, reference=fuse_conv_bn_eval):
    before = copy.deepcopy((conv.state_dict(), bn.state_dict()))
    ours, ref = fold_bn(conv, bn), reference(conv, bn)
    assert type(ours) is type(conv)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=RTOL, atol=1e-5)
        torch.testing.assert_close(ours(x), bn(conv(x)), rtol=RTOL, atol=1e-5)
    # inputs untouched
    for (k, v), (k2, v2) in zip(list(before[0].items()) + list(before[1].items()),
                                list(conv.state_dict().items()) + list(bn.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 6])  # 6 = depthwise
def test_fold_bn_conv2d_matches_torch(bias, groups):
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups, bias=bias).eval()
    bn = randomize_bn(nn.BatchNorm2d(6), seed=groups)
    assert_matches_torch(conv, bn, torch.randn(2, 6, 7, 7))
    if not bias:
        assert conv.bias is None  # fold_bn adds a bias to the copy only


def test_fold_bn_conv1d_conv3d_and_non_affine_bn():
    assert_matches_torch(nn.Conv1d(3, 4, 3).eval(), randomize_bn(nn.BatchNorm1d(4)), torch.randn(2, 3, 9))
    assert_matches_torch(nn.Conv3d(2, 3, 2, bias=False).eval(), randomize_bn(nn.BatchNorm3d(3)),
                         torch.randn(1, 2, 4, 4, 4))
    bn = randomize_bn(nn.BatchNorm2d(4, affine=False))
    conv = nn.Conv2d(3, 4, 1).eval()
    folded = fold_bn(conv, bn)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_fold_bn_linear_bn1d_matches_torch(bias):
    linear = nn.Linear(5, 4, bias=bias).eval()
    bn = randomize_bn(nn.BatchNorm1d(4), seed=1)
    assert_matches_torch(linear, bn, torch.randn(3, 5), reference=fuse_linear_bn_eval)


@settings(max_examples=15, deadline=None)
@given(out_per_group=st.integers(1, 3), in_per_group=st.integers(1, 3), groups=st.integers(1, 3),
       k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_fold_bn_random_grouped_convs(out_per_group, in_per_group, groups, k, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_per_group * groups, out_per_group * groups, k, groups=groups,
                     bias=bool(seed % 2)).eval()
    bn = randomize_bn(nn.BatchNorm2d(out_per_group * groups), seed=seed)
    assert_matches_torch(conv, bn, torch.randn(2, in_per_group * groups, 5, 5))


def test_fold_bn_bad_inputs_raise_clear_errors():
    conv = nn.Conv2d(3, 8, 3).eval()
    with pytest.raises(ValueError, match="8 output channels.*num_features=4"):
        fold_bn(conv, nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match="training mode"):
        fold_bn(conv, nn.BatchNorm2d(8))  # a fresh module is in train mode
    with pytest.raises(ValueError, match="no running statistics"):
        fold_bn(conv, nn.BatchNorm2d(8, track_running_stats=False).eval())
    with pytest.raises(TypeError, match="ReLU"):
        fold_bn(nn.ReLU(), nn.BatchNorm2d(8).eval())
    with pytest.raises(TypeError, match="BatchNorm"):
        fold_bn(conv, nn.LayerNorm(8))


def test_bn_scale_formula():
    bn = randomize_bn(nn.BatchNorm2d(3))
    expected = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(fusion.bn_scale(bn), expected, rtol=0, atol=0)


def trained_like_cnn():
    model = SmallCNN()
    for i, block in enumerate(model.features):
        randomize_bn(block[1], seed=i)
    return model.eval()


def test_fold_model_bn_matches_model_and_torch_fuse():
    model = trained_like_cnn()
    folded = fusion.fold_model_bn(model)
    torch_fused = copy.deepcopy(model).fuse_model(is_qat=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3  # original untouched
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded(x), torch_fused(x), rtol=RTOL, atol=1e-5)
    assert [name for name, _, _ in fusion.conv_bn_pairs(model)] == [
        "features.0.0", "features.1.0", "features.2.0"]


def test_measure_fusion_and_timing():
    model = trained_like_cnn()
    r = fusion.measure_fusion(model, fusion.fold_model_bn(model), torch.randn(2, 1, 28, 28),
                              repeats=3, warmup=1, threads=1)
    assert r["max_abs_diff"] < 1e-4
    assert r["unfused_ms"] > 0 and r["fused_ms"] > 0
    assert r["speedup"] == pytest.approx(r["unfused_ms"] / r["fused_ms"])
    threads = torch.get_num_threads()
    assert fusion.time_forward(model, torch.randn(1, 1, 28, 28), repeats=2, threads=1) > 0
    assert torch.get_num_threads() == threads  # restored
    with pytest.raises(ValueError, match="repeats"):
        fusion.time_forward(model, torch.randn(1, 1, 28, 28), repeats=0)
    with pytest.raises(ValueError, match="threads"):
        fusion.time_forward(model, torch.randn(1, 1, 28, 28), threads=0)


def test_fake_quantize_weight_per_channel_commutes_with_positive_scale():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    s = torch.rand(4) + 0.1
    scaled_then_q = fusion.fake_quantize_weight(w * s.reshape(-1, 1, 1, 1), "per_channel")
    q_then_scaled = fusion.fake_quantize_weight(w, "per_channel") * s.reshape(-1, 1, 1, 1)
    # equal except where float round-off moves a value across a rounding tie
    off = ((scaled_then_q - q_then_scaled).abs() > 1e-5).float().mean().item()
    assert off < 0.05
    # the per-tensor version does not commute
    assert not torch.allclose(fusion.fake_quantize_weight(w * s.reshape(-1, 1, 1, 1), "per_tensor"),
                              fusion.fake_quantize_weight(w, "per_tensor") * s.reshape(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="per_row"):
        fusion.fake_quantize_weight(w, "per_row")


def test_measure_fold_error_separate_is_worse_and_weight_errors_agree_per_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).eval()
    bn = randomize_bn(nn.BatchNorm2d(8), seed=2)
    with torch.no_grad():
        bn.weight.abs_()  # s > 0, as in trained models
    x = torch.randn(16, 3, 8, 8)
    r = fusion.measure_fold_error(conv, bn, x, scheme="per_channel")
    assert r["ratio"] == pytest.approx(r["separate_mse"] / r["folded_mse"])
    assert r["ratio"] > 1
    assert r["weight_mse_separate"] == pytest.approx(r["weight_mse_folded"], rel=1e-3)
    r8, r4 = (fusion.measure_fold_error(conv, bn, x, scheme="per_tensor", bits=b) for b in (8, 4))
    assert r4["folded_mse"] > r8["folded_mse"]  # fewer bits, more error


class TwoBlocks(nn.Module):
    """conv → bn → relu → conv → bn written with functionals, so fx records call_function nodes."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(2, 1, 3, 3)), nn.Parameter(torch.randn(2, 2, 3, 3))
        for i in (1, 2):
            self.register_buffer(f"mean{i}", torch.zeros(2))
            self.register_buffer(f"var{i}", torch.ones(2))

    def forward(self, x):
        x = nn.functional.conv2d(x, self.w1)
        x = nn.functional.relu(nn.functional.batch_norm(x, self.mean1, self.var1))
        x = nn.functional.conv2d(x, self.w2)
        return nn.functional.batch_norm(x, self.mean2, self.var2)


def test_format_nodes_lists_one_conv_bn_block():
    gm = torch.fx.symbolic_trace(TwoBlocks())
    first = fusion.format_nodes(gm)
    assert [line.split(" = ")[1].split("(")[0] for line in first] == ["conv2d", "batch_norm"]
    assert first[0] == "conv2d = conv2d(x, w1)"
    second = fusion.format_nodes(gm, skip=1)
    assert second[-1].startswith("batch_norm_1 = ") and any(line.startswith("relu") for line in second)
    with pytest.raises(ValueError, match="skip=2"):
        fusion.format_nodes(gm, skip=2)


def test_plots_return_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = trained_like_cnn()
    axes = fusion.plot_fold_layer(model, layer=1)
    assert len(axes) == 2 and "features.1.0" in axes[0].get_title()
    ax = fusion.plot_latency({"batch 1": {"unfused_ms": 2.0, "fused_ms": 1.0, "speedup": 2.0}})
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="layer"):
        fusion.plot_fold_layer(model, layer=3)
    plt.close("all")
