"""qatlab.groupwise against torchao 0.18, bit for bit (atol=0, rtol=0), forward and backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatlab import groupwise as gw

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

quant_primitives = pytest.importorskip("torchao.quantization.quant_primitives")
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_  # noqa: E402
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: E402
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # noqa: E402
from torchao.quantization.qat.linear import FakeQuantizedLinear  # noqa: E402
from torchao.quantization.quant_primitives import (  # noqa: E402
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)


def assert_same(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.equal(ours, ref), f"maxdiff {(ours.double() - ref.double()).abs().max()}"


FLOATS = [torch.float32, torch.float16, torch.bfloat16]
#: our scale_dtype -> torchao's scale_precision: float32 is IntxFakeQuantizeConfig's default, None
#: (the input's dtype) is what QATConfig passes for an 8da4w base config
SCALE_DTYPES = [torch.float32, None]


def torchao_weight_fq(bits, group_size, scale_dtype=torch.float32):
    dtype = getattr(torch, f"int{bits}")
    cfg = (IntxFakeQuantizeConfig(dtype, "per_channel", scale_precision=scale_dtype) if group_size is None
           else IntxFakeQuantizeConfig(dtype, group_size=group_size, scale_precision=scale_dtype))
    return IntxFakeQuantizer(cfg)


def torchao_token_fq(scale_dtype=torch.float32):
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False,
                                                    scale_precision=scale_dtype))


def run_both(ours_fn, ref_fn, x, grad):
    """Forward and backward of ours and torchao's on the same input and upstream gradient."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours_fn(x1), ref_fn(x2)
    y1.backward(grad)
    y2.backward(grad)
    return (y1.detach(), x1.grad), (y2.detach(), x2.grad)


# ---------------------------------------------------------------------------
# strategies: weights with ties, clamp edges, zero groups
# ---------------------------------------------------------------------------

@st.composite
def weight_case(draw):
    """(w, bits, group_size or None) in float32, float16 or bfloat16: random values, exact .5 ties,
    clamp ends, all-zero groups, weights around 1e-5, groups with a tiny range."""
    dtype = draw(st.sampled_from(FLOATS))
    bits = draw(st.integers(2, 8))
    out = draw(st.integers(1, 6))
    group = draw(st.sampled_from([2, 4, 8, 16, 32]))
    n_groups = draw(st.integers(1, 4))
    per_channel = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["random", "ties", "ends", "zeros", "tiny", "small", "narrow"]))
    shape = (out, n_groups * group)
    if kind == "random":
        w = torch.randn(shape, generator=g) * float(torch.rand((), generator=g) * 4 + 1e-3)
    elif kind == "tiny":
        w = torch.randn(shape, generator=g) * 1e-30
    elif kind == "small":      # ~1e-5: amax / 7.5 is below float16's smallest normal
        w = torch.randn(shape, generator=g) * 1e-5
        w[:, :group] = 0.0
    elif kind == "narrow":     # one group with a tiny range next to groups with a large one
        w = torch.randn(shape, generator=g)
        w[:, :group] = 1e-3 * torch.rand((out, group), generator=g)
    else:
        qmin, qmax = gw.weight_qrange(bits)
        # scale = 2**-e exactly: amax = 2**-e * (qmax - qmin) / 2 is a float32, and
        # k/2 * scale for integer k is exact, so x * (1/scale) really hits .5
        e = int(torch.randint(0, 8, (), generator=g))
        s = 2.0 ** -e
        halves = torch.randint(2 * qmin - 1, 2 * qmax + 2, shape, generator=g).float() / 2
        w = halves * s
        if kind == "ends":
            w = torch.where(torch.rand(shape, generator=g) < 0.5, torch.full(shape, qmin * s),
                            torch.full(shape, (qmax + 0.5) * s))
        w[:, 0::group] = -(qmax - qmin) / 2 * s  # every group's amax sets scale = s
        if kind == "zeros":
            w[:, :group] = 0.0
    return w.to(dtype), bits, (None if per_channel else group)


@st.composite
def token_case(draw):
    """Activations of shape (..., hidden) in float32, float16 or bfloat16, with offsets, ties,
    constant and all-zero rows, rows with a small range and values around 1e-5."""
    dtype = draw(st.sampled_from(FLOATS))
    dims = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    hidden = draw(st.integers(2, 40))  # torchao's per-token reference reduces over ALL dims at hidden=1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (*dims, draw(st.integers(1, 5)), hidden)
    kind = draw(st.sampled_from(["random", "positive", "constant", "ties", "zeros", "narrow", "small"]))
    x = torch.randn(shape, generator=g) * float(torch.rand((), generator=g) * 10 + 1e-3)
    if kind == "positive":
        x = x.abs() + 1.0
    elif kind == "constant":
        x = torch.full(shape, float(draw(st.floats(-5, 5, width=32))))
    elif kind == "ties":
        x = torch.randint(-255, 256, shape, generator=g).float() / 4  # steps of 1/4, range ~ +-64
    elif kind == "zeros":
        x[..., 0, :] = 0.0
    elif kind == "narrow":     # range ~1e-3 around an offset: (hi - lo) / 255 is tiny
        x = 2.0 + 1e-3 * torch.rand(shape, generator=g)
    elif kind == "small":
        x = x * 1e-5
    return x.to(dtype)


# ---------------------------------------------------------------------------
# weights: against IntxFakeQuantizer and the primitives
# ---------------------------------------------------------------------------

@SETTINGS
@given(weight_case(), st.sampled_from(SCALE_DTYPES))
def test_weight_fake_quant_matches_torchao_forward_and_backward(case, scale_dtype):
    w, bits, group = case
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(w.dtype)
    (y1, g1), (y2, g2) = run_both(lambda t: gw.fake_quantize_groupwise(t, bits, group, scale_dtype=scale_dtype),
                                  torchao_weight_fq(bits, group, scale_dtype), w, grad)
    assert y1.dtype == g1.dtype == w.dtype
    assert_same(y1, y2)
    assert_same(g1, g2)
    assert torch.isfinite(y1).all() and torch.isfinite(g1).all()


@SETTINGS
@given(weight_case(), st.sampled_from(SCALE_DTYPES))
def test_qparams_quantize_dequantize_match_torchao_primitives(case, scale_dtype):
    w, bits, group = case
    qmin, qmax = gw.weight_qrange(bits)
    block = (1, w.shape[1] if group is None else group)
    s_ref, z_ref = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax,
                                         scale_dtype=scale_dtype, zero_point_dtype=torch.int8, keepdim=True)
    scale, zp = gw.choose_qparams_groupwise(w, bits, group, scale_dtype=scale_dtype)
    assert scale.dtype == (scale_dtype or w.dtype)
    assert_same(scale, s_ref)
    assert torch.equal(zp, z_ref.to(torch.int32)) and not zp.any()
    q_ref = quantize_affine(w, block, s_ref, z_ref, torch.int8, qmin, qmax)
    q = gw.quantize_groupwise(w, scale, bits)
    assert_same(q, q_ref)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    for out_dtype in (torch.float32, w.dtype):
        assert_same(gw.dequantize_groupwise(q, scale, output_dtype=out_dtype),
                    dequantize_affine(q_ref, block, s_ref, z_ref, torch.int8, qmin, qmax, output_dtype=out_dtype))
    # fake quantization is dequantize(quantize(w)), in w's dtype
    assert_same(gw.fake_quantize_groupwise(w, bits, group, scale_dtype=scale_dtype),
                gw.dequantize_groupwise(q, scale, output_dtype=w.dtype))


def test_ties_round_half_to_even():
    # scale 1 (amax 7.5 in the group): x/scale = 0.5, 1.5, 2.5, -0.5, -2.5, 6.5 -> 0, 2, 2, -0, -2, 6
    w = torch.tensor([[-7.5, 0.5, 1.5, 2.5, -0.5, -2.5, 6.5, 0.0]])
    q = gw.quantize_groupwise(w, gw.choose_qparams_groupwise(w, 4)[0], 4)
    assert q.tolist() == [[-8, 0, 2, 2, 0, -2, 6, 0]]


def test_symmetric_ends_land_on_half_steps_and_clamp():
    # int4: scale = amax / 7.5, so -amax -> -7.5 -> -8 (qmin) and +amax -> 7.5 -> 8 -> clamped to 7
    w = torch.tensor([[3.0, -1.0, 0.0, 1.0], [-3.0, 1.0, 0.0, -1.0]])
    scale, _ = gw.choose_qparams_groupwise(w, 4, group_size=4)
    assert_same(scale, torch.tensor([[0.4], [0.4]]))
    assert gw.quantize_groupwise(w, scale, 4).tolist() == [[7, -2, 0, 2], [-8, 2, 0, -2]]
    # int2: scale = amax / 1.5: +amax clamps to 1, -amax rounds to -2 (dequantized -4/3 amax)
    s2, _ = gw.choose_qparams_groupwise(w, 2, group_size=4)
    q2 = gw.quantize_groupwise(w, s2, 2)
    assert q2.tolist() == [[1, -0, 0, 0], [-2, 0, 0, -0]]
    assert gw.dequantize_groupwise(q2, s2)[1, 0].item() == pytest.approx(-4.0)


def test_gradient_is_zero_at_both_grid_ends_and_past_them():
    # torchao's STE is autograd of torch.clamp, which passes no gradient at exactly qmin / qmax
    w = torch.tensor([[-7.5, -7.4, -6.5, 6.4, 6.6, 7.0, 7.5, 0.0]], requires_grad=True)
    gw.fake_quantize_groupwise(w, 4).sum().backward()
    # codes: -8 (qmin), -7, -6, 6, 7 (qmax), 7, 8 (clamped), 0
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_zero_group_gets_the_eps_scale_and_stays_zero(dtype):
    # the floor is the smallest normal number of the weight's dtype: float32's is 0 in float16
    w = torch.zeros(2, 8, dtype=dtype, requires_grad=True)
    scale, _ = gw.choose_qparams_groupwise(w, 4, 4)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, torch.full((2, 2), torch.finfo(dtype).smallest_normal))
    y = gw.fake_quantize_groupwise(w, 4, 4)
    assert y.dtype == dtype
    assert torch.equal(y, torch.zeros(2, 8, dtype=dtype))
    assert torch.equal(y, torchao_weight_fq(4, 4)(w.detach()))
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(2, 8, dtype=dtype))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_float16_weights_near_1e_5_are_finite_and_match_torchao(scale_dtype):
    # amax / 7.5 ~ 1e-6 is a float16 subnormal: with float32's floor 1 / scale overflowed to inf
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(16, 64, generator=g) * 1e-5).half()
    grad = torch.randn(w.shape, generator=g).half()
    (y1, g1), (y2, g2) = run_both(lambda t: gw.fake_quantize_groupwise(t, 4, 32, scale_dtype=scale_dtype),
                                  torchao_weight_fq(4, 32, scale_dtype), w, grad)
    assert torch.isfinite(y1).all() and torch.isfinite(g1).all()
    assert_same(y1, y2)
    assert_same(g1, g2)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_bfloat16_codes_match_torchao_on_many_seeds(scale_dtype):
    # torchao computes the scale in bfloat16 and casts it to scale_precision; with a float32 scale
    # the bfloat16 weight is quantized in float32
    qmin, qmax = gw.weight_qrange(4)
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(8, 64, generator=g) * 10.0 ** (seed % 7 - 5)).bfloat16()
        s_ref, z_ref = choose_qparams_affine(w, MappingType.SYMMETRIC, (1, 32), torch.int8, qmin, qmax,
                                             scale_dtype=scale_dtype, zero_point_dtype=torch.int8)
        scale, _ = gw.choose_qparams_groupwise(w, 4, 32, scale_dtype=scale_dtype)
        assert_same(gw.quantize_groupwise(w, scale, 4),
                    quantize_affine(w, (1, 32), s_ref.reshape(8, 2), z_ref.reshape(8, 2), torch.int8, qmin, qmax))
        grad = torch.randn(w.shape, generator=g).bfloat16()
        (y1, g1), (y2, g2) = run_both(lambda t: gw.fake_quantize_groupwise(t, 4, 32, scale_dtype=scale_dtype),
                                      torchao_weight_fq(4, 32, scale_dtype), w, grad)
        assert_same(y1, y2)
        assert_same(g1, g2)


def test_empty_inputs():
    # no columns: no group to take a scale from (torchao fails with a bare assertion / IndexError)
    with pytest.raises(ValueError, match=r"w has no input columns \(shape \(4, 0\)\)"):
        gw.fake_quantize_groupwise(torch.zeros(4, 0), 4)
    with pytest.raises(ValueError, match=r"w has no input columns"):
        gw.choose_qparams_groupwise(torch.zeros(4, 0), 4, 2)
    with pytest.raises(ValueError, match=r"x has tokens of length 0 \(shape \(3, 0\)\)"):
        gw.fake_quantize_per_token(torch.zeros(3, 0))
    # no rows or no tokens: nothing to quantize, an empty result of the same shape
    assert gw.fake_quantize_groupwise(torch.zeros(0, 8), 4, 4).shape == (0, 8)
    assert gw.choose_qparams_groupwise(torch.zeros(0, 8), 4, 4)[0].shape == (0, 2)
    assert gw.fake_quantize_per_token(torch.zeros(2, 0, 5)).shape == (2, 0, 5)


def test_per_channel_is_group_size_in_features():
    w = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    assert_same(gw.fake_quantize_groupwise(w, 3, None), gw.fake_quantize_groupwise(w, 3, 24))
    assert gw.choose_qparams_groupwise(w, 3)[0].shape == (5, 1)


# ---------------------------------------------------------------------------
# activations: per token, against IntxFakeQuantizer and the converted model's op
# ---------------------------------------------------------------------------

@SETTINGS
@given(token_case(), st.sampled_from(SCALE_DTYPES))
def test_per_token_fake_quant_matches_torchao_forward_and_backward(x, scale_dtype):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    (y1, g1), (y2, g2) = run_both(lambda t: gw.fake_quantize_per_token(t, scale_dtype=scale_dtype),
                                  torchao_token_fq(scale_dtype), x, grad)
    assert y1.dtype == g1.dtype == x.dtype
    assert_same(y1, y2)
    assert_same(g1, g2)
    assert torch.isfinite(y1).all() and torch.isfinite(g1).all()


@SETTINGS
@given(token_case(), st.sampled_from(SCALE_DTYPES))
def test_per_token_qparams_match_choose_qparams_affine_and_converted_op(x, scale_dtype):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    s_ref, z_ref = choose_qparams_affine(x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127,
                                         scale_dtype=scale_dtype)
    scale, zp = gw.choose_qparams_per_token(x, scale_dtype=scale_dtype)
    assert_same(scale, s_ref)
    assert_same(zp, z_ref)
    # what a converted 8da4w Linear does to its input at inference: scales in the input's dtype
    assert_same(gw.fake_quantize_per_token(x, scale_dtype=None), _apply_int8_act_asym_per_token_quant_dequant(x))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_float16_per_token_zero_row_and_small_range_are_finite(scale_dtype):
    # float32's floor is 0 in float16: a zero row divided 0 by 0, a small range overflowed 1 / scale
    x = torch.stack([torch.zeros(16), 3.0 + 1e-4 * torch.arange(16.0), 1e-5 * torch.randn(16)]).half()
    grad = torch.ones_like(x)
    (y1, g1), (y2, g2) = run_both(lambda t: gw.fake_quantize_per_token(t, scale_dtype=scale_dtype),
                                  torchao_token_fq(scale_dtype), x, grad)
    assert torch.isfinite(y1).all() and torch.isfinite(g1).all()
    assert torch.equal(y1[0], torch.zeros(16, dtype=torch.float16))
    assert_same(y1, y2)
    assert_same(g1, g2)


def test_per_token_row_min_and_max_are_exact_ends():
    x = torch.tensor([[-1.0, 0.25, 2.0], [0.5, 1.0, 1.5]], requires_grad=True)
    scale, zp = gw.choose_qparams_per_token(x)
    # an all-positive row stretches its range down to 0, so zero is exactly representable
    assert zp.tolist() == [-43, -128]
    y = gw.fake_quantize_per_token(x)
    assert y[1].tolist()[0] == pytest.approx(0.5, abs=float(scale[1]) / 2)
    y.sum().backward()
    # row 0's min and max sit exactly on -128 and 127: no gradient (torchao's clamp); row 1's min
    # 0.5 is inside (the range starts at 0), its max 1.5 is on 127
    assert x.grad.tolist() == [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


# ---------------------------------------------------------------------------
# the modules QATConfig inserts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits, granularity", [(4, PerGroup(32)), (2, PerGroup(16)), (3, PerAxis(0))])
def test_fake_quantized_linear_equals_our_two_fake_quants(bits, granularity, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 24)).to(dtype)
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                                 weight_granularity=granularity)
    fq = copy.deepcopy(lin)
    quantize_(fq, QATConfig(base, step="prepare"))
    assert isinstance(fq[0], FakeQuantizedLinear)
    # QATConfig keeps the 8da4w scales in the input's dtype: our scale_dtype=None
    assert fq[0].weight_fake_quantizer.config.scale_precision is None
    x = torch.randn(3, 7, 64).to(dtype)
    grad = torch.randn(3, 7, 24).to(dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = lin[0].weight.detach().clone().requires_grad_(True)
    group = granularity.group_size if isinstance(granularity, PerGroup) else None
    ours = F.linear(gw.fake_quantize_per_token(x1, scale_dtype=None),
                    gw.fake_quantize_groupwise(w, bits, group, scale_dtype=None), lin[0].bias)
    ref = fq(x2)
    assert_same(ours.detach(), ref.detach())
    ours.backward(grad)
    ref.backward(grad)
    assert_same(x1.grad, x2.grad)
    assert_same(w.grad, fq[0].weight.grad)


def test_converted_model_equals_the_fake_quant_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(16))
    quantize_(model, QATConfig(base, step="prepare"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        fake = model(x)
        quantize_(model, QATConfig(base, step="convert"))
        assert_same(model(x), fake)
    w = model[0].weight
    assert torch.equal(w.qdata, gw.quantize_groupwise(w.dequantize(), w.scale, 4))


# ---------------------------------------------------------------------------
# filter rule, storage, SQNR
# ---------------------------------------------------------------------------

def _net():
    return torch.nn.Sequential(torch.nn.Linear(49, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128),
                               torch.nn.Linear(128, 10))


def test_make_group_filter_raises_naming_the_layer_or_skips_it():
    with pytest.raises(ValueError, match=r"layer '0' \(Linear, in_features=49\) cannot take group_size=32"):
        gw.make_group_filter(_net(), 32)
    f = gw.make_group_filter(_net(), 32, on_mismatch="skip")
    assert f.selected == ["2", "3"] and list(f.skipped) == ["0"]
    model = _net()
    quantize_(model, QATConfig(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4), step="prepare"),
              filter_fn=f)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "FakeQuantizedLinear", "FakeQuantizedLinear"]
    assert gw.make_group_filter(_net(), None).selected == ["0", "2", "3"]   # per-channel: all fit
    assert gw.make_group_filter(_net(), 1).selected == ["0", "2", "3"]


def test_make_group_filter_prints_skipped_layers(capsys):
    gw.make_group_filter(_net(), 64, on_mismatch="skip", verbose=True)
    assert "kept in float: '0' (in_features=49 is not a multiple of group_size=64)" in capsys.readouterr().out


def test_multihead_attention_projections_are_not_swappable():
    mha = torch.nn.MultiheadAttention(16, 2)
    assert not gw.is_swappable_linear(mha.out_proj)  # MHA reads out_proj.weight directly
    assert gw.make_group_filter(torch.nn.ModuleList([mha]), 8).selected == []


@pytest.mark.parametrize("call, exc, match", [
    (lambda: gw.make_group_filter(_net(), 32, on_mismatch="warn"), ValueError, "'warn'"),
    (lambda: gw.make_group_filter(_net(), 0), ValueError, "group_size.*0"),
    (lambda: gw.fake_quantize_groupwise(torch.ones(4, 6), 4, 4), ValueError, "group_size 4 does not divide in_features 6"),
    (lambda: gw.fake_quantize_groupwise(torch.ones(4), 4), ValueError, r"2-D.*\(4,\)"),
    (lambda: gw.fake_quantize_groupwise(torch.ones(2, 4, dtype=torch.int32), 4), TypeError, "int32"),
    (lambda: gw.fake_quantize_groupwise(torch.ones(2, 4), 9), ValueError, "bits.*9"),
    (lambda: gw.fake_quantize_groupwise(torch.ones(2, 4), 1), ValueError, "bits.*1"),
    (lambda: gw.quantize_groupwise(torch.ones(2, 4), torch.ones(3, 1), 4), ValueError, r"scale.*\(3, 1\)"),
    (lambda: gw.quantize_groupwise(torch.ones(2, 4), torch.zeros(2, 1), 4), ValueError, "positive"),
    (lambda: gw.fake_quantize_per_token(torch.ones(3, dtype=torch.int64)), TypeError, "int64"),
    (lambda: gw.fake_quantize_per_token(torch.ones(3, dtype=torch.float64)), TypeError, "float64"),
    (lambda: gw.fake_quantize_groupwise(torch.ones(2, 4, dtype=torch.float64), 4), TypeError, "float64"),
    (lambda: gw.fake_quantize_groupwise(torch.ones(2, 4), 4, scale_dtype=torch.int8), ValueError,
     "scale_dtype.*int8"),
    (lambda: gw.choose_qparams_groupwise(torch.ones(2, 4), 4, eps=0.0), ValueError, "eps.*0.0"),
    (lambda: gw.choose_qparams_per_token(torch.ones(2, 4), eps=-1.0), ValueError, "eps.*-1.0"),
    (lambda: gw.dequantize_groupwise(torch.ones(2, 4, dtype=torch.int8), torch.ones(2, 1), torch.int32),
     ValueError, "output_dtype.*int32"),
    (lambda: gw.bits_per_weight(4, 0), ValueError, "group_size.*0"),
])
def test_bad_input_raises_naming_the_value(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bits_per_weight_and_sqnr_table():
    assert gw.bits_per_weight(4, 32) == 5.0
    assert gw.bits_per_weight(2, 64, scale_bits=16) == 2.25
    assert gw.bits_per_weight(8, 16, scale_bits=32, zero_point_bits=8) == 10.5
    ws = [torch.randn(32, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    t = gw.sqnr_table(ws, [8, 4, 3, 2], [16, 32, 64, None])
    for gs in (16, 32, 64, None):
        assert t[8, gs] > t[4, gs] > t[3, gs] > t[2, gs]
    for bits in (8, 4, 3, 2):
        assert t[bits, 16] > t[bits, 32] > t[bits, 64]
    # 8 -> 4 bits on Gaussian weights: close to 6.02 dB per bit
    assert 20 < t[8, 32] - t[4, 32] < 28
    assert gw.rule_of_thumb_db(8, 0.0) == pytest.approx(48.16, abs=0.01)
