"""qatlab.integer: the integer kernels, bit for bit against torch's int8 kernels and ExecuTorch/XNNPACK."""

import copy
import os
import random
import subprocess
import sys
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

from qatlab import integer as I
from qatlab.deploy import cpu_flags

HAS_VNNI = cpu_flags(("avx512_vnni",))["avx512_vnni"]
ENGINES = [e for e in ("fbgemm", "qnnpack", "onednn", "x86") if e in torch.backends.quantized.supported_engines]


@pytest.fixture(autouse=True)
def _quiet_and_restore_engine():
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's quantized-tensor deprecation notices
        yield
    torch.backends.quantized.engine = engine


def qweight(w_q, scale):
    if scale.numel() > 1:
        return torch._make_per_channel_quantized_tensor(w_q, scale.double(),
                                                        torch.zeros(scale.numel(), dtype=torch.long), 0)
    return torch._make_per_tensor_quantized_tensor(w_q, float(scale), 0)


def skip_unverified(engine):
    if engine == "onednn" and not HAS_VNNI:
        pytest.skip("oneDNN's int8 kernels are reproduced here for CPUs with AVX-512 VNNI (the only "
                    "ones torch's x86 engine sends to oneDNN)")


def conv_case(rng, x_hi):
    """A random quantized conv: shapes, groups (incl. depthwise), stride, padding < kernel, scales."""
    groups = rng.choice([1, 1, 2, 3, "dw"])
    c = rng.choice([1, 2, 4, 8, 16])
    if groups == "dw":
        groups, c = c, c
        o = c * rng.choice([1, 2])
    else:
        c, o = c * groups, groups * rng.randint(1, 5)
    k = rng.choice([1, 2, 3, 5])
    h = rng.randint(k, 9)
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    x_q = torch.randint(0, x_hi + 1, (rng.randint(1, 3), c, h, h + rng.randint(0, 2)), dtype=torch.uint8,
                        generator=g)
    w_q = torch.randint(-128, 128, (o, c // groups, k, k), dtype=torch.int8, generator=g)
    per_channel = rng.random() < 0.6
    w_scale = (torch.rand(o, generator=g) * 0.02 + 1e-3) if per_channel else torch.tensor([0.004 + 0.01 * rng.random()])
    s_x = 0.001 + 0.05 * rng.random()
    fan = c // groups * k * k
    return dict(x_q=x_q, w_q=w_q, bias=torch.randn(o, generator=g) * 2 if rng.random() < 0.75 else None,
                s_x=s_x, z_x=rng.randint(0, x_hi), w_scale=w_scale,
                s_y=s_x * float(w_scale.mean()) * 64 * fan**0.5 * rng.choice([0.5, 1.0, 2.0]),
                z_y=rng.randint(0, 255), stride=rng.choice([1, 2]), padding=rng.randint(0, k - 1),
                groups=groups, relu=rng.random() < 0.5)


def torch_conv(engine, case):
    torch.backends.quantized.engine = engine
    x = torch._make_per_tensor_quantized_tensor(case["x_q"], case["s_x"], case["z_x"])
    s, p = case["stride"], case["padding"]
    packed = torch.ops.quantized.conv2d_prepack(qweight(case["w_q"], case["w_scale"]), case["bias"], [s, s],
                                                [p, p], [1, 1], case["groups"])
    op = torch.ops.quantized.conv2d_relu if case["relu"] else torch.ops.quantized.conv2d
    return op(x, packed, case["s_y"], case["z_y"]).int_repr()


def our_conv(kernel, case):
    return I.conv2d_int8(case["x_q"], case["w_q"], case["bias"], input_scale=case["s_x"],
                         input_zero_point=case["z_x"], weight_scale=case["w_scale"], output_scale=case["s_y"],
                         output_zero_point=case["z_y"], stride=case["stride"], padding=case["padding"],
                         groups=case["groups"], relu=case["relu"], kernel=kernel)


def x86_kernel(case):
    return I.select_x86_conv_kernel(torch.zeros(1), case["groups"], has_avx512_vnni=HAS_VNNI,
                                    linux=sys.platform.startswith("linux"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("x_hi", [127, 255])      # with and without reduce_range
def test_conv2d_bit_exact_on_random_shapes(engine, x_hi):
    skip_unverified(engine)
    rng = random.Random(f"{engine}-{x_hi}")
    for _ in range(40):
        case = conv_case(rng, x_hi)
        kernel = x86_kernel(case) if engine == "x86" else engine
        ref, ours = torch_conv(engine, case), our_conv(kernel, case)
        assert torch.equal(ours, ref), (engine, {k: v for k, v in case.items() if not torch.is_tensor(v)},
                                        I.step_differences(ours, ref))


@pytest.mark.parametrize("engine", ENGINES)
def test_linear_bit_exact_on_random_shapes(engine):
    skip_unverified(engine)
    rng = random.Random(engine)
    for _ in range(40):
        g = torch.Generator().manual_seed(rng.randint(0, 2**31))
        k, o = rng.randint(1, 70), rng.randint(1, 24)
        x_q = torch.randint(0, rng.choice([128, 256]), (rng.randint(1, 7), k), dtype=torch.uint8, generator=g)
        w_q = torch.randint(-128, 128, (o, k), dtype=torch.int8, generator=g)
        w_scale = torch.rand(o, generator=g) * 0.02 + 1e-3 if rng.random() < 0.6 else torch.tensor([0.01])
        bias = torch.randn(o, generator=g) if rng.random() < 0.75 else None
        s_x, z_x, z_y, relu = 0.001 + 0.05 * rng.random(), rng.randint(0, 127), rng.randint(0, 255), rng.random() < 0.5
        s_y = s_x * float(w_scale.mean()) * 64 * k**0.5
        torch.backends.quantized.engine = engine
        x = torch._make_per_tensor_quantized_tensor(x_q, s_x, z_x)
        packed = torch.ops.quantized.linear_prepack(qweight(w_q, w_scale), bias)
        ref = (torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear)(x, packed, s_y, z_y).int_repr()
        ours = I.linear_int8(x_q, w_q, bias, input_scale=s_x, input_zero_point=z_x, weight_scale=w_scale,
                             output_scale=s_y, output_zero_point=z_y, relu=relu,
                             kernel="fbgemm" if engine == "x86" else engine)
        assert torch.equal(ours, ref), (engine, k, o, relu, I.step_differences(ours, ref))


def test_fbgemm_depthwise_saturates_even_with_vnni():
    """FBGEMM's depthwise kernels are AVX2 code: full-range inputs saturate int16 pair sums."""
    torch.manual_seed(0)
    case = dict(x_q=torch.full((1, 8, 6, 6), 255, dtype=torch.uint8), w_q=torch.full((8, 1, 3, 3), 127, dtype=torch.int8),
                bias=None, s_x=1.0, z_x=0, w_scale=torch.tensor([1.0]), s_y=512.0, z_y=0, stride=1, padding=1,
                groups=8, relu=False)
    assert I.fbgemm_conv_path(8, 8, 3, padding=1, groups=8) == "depthwise"
    ref = torch_conv("fbgemm", case)
    assert torch.equal(our_conv("fbgemm", case), ref)
    exact = I.conv2d_int8(case["x_q"], case["w_q"], None, input_scale=1.0, input_zero_point=0, weight_scale=1.0,
                          output_scale=512.0, output_zero_point=0, padding=1, groups=8, kernel="onednn")
    assert not torch.equal(ref, exact)     # the saturation is real: 4·32767 + 255·127 instead of 9·255·127


_AVX2_SCRIPT = r"""
import random, sys, warnings
import torch
warnings.simplefilter("ignore")
from qatlab import integer as I
assert I.fbgemm_isa() == "avx2", I.fbgemm_isa()
torch.backends.quantized.engine = "fbgemm"
rng, sat, bad = random.Random(5), 0, []
for t in range(30):
    g = torch.Generator().manual_seed(t)
    if t % 3 == 0:   # linear
        k, o = rng.randint(2, 40), rng.randint(1, 9)
        x_q = torch.randint(0, 256, (4, k), dtype=torch.uint8, generator=g)
        w_q = torch.randint(-128, 128, (o, k), dtype=torch.int8, generator=g)
        ws = torch.rand(o, generator=g) * 0.01 + 1e-3
        x = torch._make_per_tensor_quantized_tensor(x_q, 0.05, 9)
        w = torch._make_per_channel_quantized_tensor(w_q, ws.double(), torch.zeros(o, dtype=torch.long), 0)
        s_y = 0.05 * float(ws.mean()) * 256 * k ** 0.5
        ref = torch.ops.quantized.linear(x, torch.ops.quantized.linear_prepack(w, None), s_y, 3).int_repr()
        ours = I.linear_int8(x_q, w_q, None, input_scale=0.05, input_zero_point=9, weight_scale=ws,
                             output_scale=s_y, output_zero_point=3, kernel="fbgemm")
        sat += I.count_saturating_pairs(x_q, w_q)[0]
    else:            # conv without groups (im2col / pointwise GEMM paths)
        c, o, k = rng.randint(1, 9), rng.randint(1, 9), rng.choice([1, 3])
        p = 0 if k == 1 else 1
        x_q = torch.randint(0, 256, (2, c, 7, 7), dtype=torch.uint8, generator=g)
        w_q = torch.randint(-128, 128, (o, c, k, k), dtype=torch.int8, generator=g)
        ws = torch.rand(o, generator=g) * 0.01 + 1e-3
        x = torch._make_per_tensor_quantized_tensor(x_q, 0.05, 9)
        w = torch._make_per_channel_quantized_tensor(w_q, ws.double(), torch.zeros(o, dtype=torch.long), 0)
        s_y = 0.05 * float(ws.mean()) * 256 * (c * k * k) ** 0.5
        packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [p, p], [1, 1], 1)
        ref = torch.ops.quantized.conv2d(x, packed, s_y, 3).int_repr()
        ours = I.conv2d_int8(x_q, w_q, None, input_scale=0.05, input_zero_point=9, weight_scale=ws,
                             output_scale=s_y, output_zero_point=3, padding=p, kernel="fbgemm")
        rows = I.im2col_fbgemm(x_q, x_zero_point=9, kernel_size=k, padding=p)
        sat += I.count_saturating_pairs(rows, I.weights_fbgemm(w_q))[0]
    if not torch.equal(ours, ref):
        bad.append((t, dict(I.step_differences(ours, ref))))
print(sat, bad)
"""


def test_fbgemm_avx2_saturation_matches_the_real_kernel():
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 runs FBGEMM's AVX2 GEMM kernels on this CPU (in a child process)."""
    if I.fbgemm_isa(env="") is None:
        pytest.skip("FBGEMM needs AVX2")
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    saturating, bad = out.stdout.strip().rsplit("\n", 1)[-1].split(" ", 1)
    assert bad == "[]", bad
    assert int(saturating) > 0       # the cases really did saturate


def test_fbgemm_isa_and_paths():
    vnni = {"avx2": True, "avx512f": True, "avx512bw": True, "avx512dq": True, "avx512vl": True, "avx512_vnni": True}
    assert I.fbgemm_isa(vnni, env="") == "avx512_vnni"
    assert I.fbgemm_isa(vnni, env="AVX512") == "avx512"
    assert I.fbgemm_isa({**vnni, "avx512_vnni": False}, env="AVX512_E1") == "avx512"   # cannot force up
    assert I.fbgemm_isa({"avx2": False}, env="") is None
    assert I.fbgemm_conv_path(16, 32, 3, stride=2, padding=1, groups=16) == "depthwise"
    assert I.fbgemm_conv_path(16, 16, 3, padding=0, groups=16) == "im2col"      # not "same" padding
    assert I.fbgemm_conv_path(12, 12, 3, padding=1, groups=12) == "im2col"      # groups % 8
    assert I.fbgemm_conv_path(8, 4, 1) == "pointwise"
    assert I.fbgemm_saturates("gemm", "avx2") and not I.fbgemm_saturates("pointwise", "avx512_vnni")


def test_select_x86_conv_kernel_follows_torchs_rule():
    zeros = torch.zeros(4)
    assert I.select_x86_conv_kernel(zeros, 100, has_avx512_vnni=True) == "onednn"
    assert I.select_x86_conv_kernel(zeros, 101, has_avx512_vnni=True) == "fbgemm"
    assert I.select_x86_conv_kernel(torch.tensor([0, 1]), 1, has_avx512_vnni=True) == "fbgemm"
    assert I.select_x86_conv_kernel(zeros, 1, has_avx512_vnni=True, linux=False) == "fbgemm"


def test_vpmaddubsw_and_vpdpbusd():
    a = torch.tensor([255, 255, 255, 255, 0, 7], dtype=torch.uint8)
    b = torch.tensor([127, 127, -128, -128, -128, 3], dtype=torch.int8)
    assert I.vpmaddubsw(a, b).tolist() == [32767, -32768, 21]
    acc = I.vpdpbusd(torch.tensor([5], dtype=torch.int32), a[:4], b[:4])
    assert acc.tolist() == [5 + 2 * 255 * 127 - 2 * 255 * 128]


def test_count_saturating_pairs_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    for groups, k in ((1, 7), (2, 10), (4, 9)):
        a = torch.randint(0, 256, (50, groups, k), dtype=torch.uint8, generator=g)
        w = torch.randint(-128, 128, (8, k), dtype=torch.int8, generator=g)
        brute, og = 0, 8 // groups
        for o in range(8):
            for m in range(50):
                terms = (a[m, o // og].long() * w[o].long()).tolist() + [0]
                brute += sum(not -32768 <= terms[i] + terms[i + 1] <= 32767 for i in range(0, k, 2))
        assert I.count_saturating_pairs(a, w, groups)[0] == brute


def test_pair_sum_range_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-128, 128, (5, 7), dtype=torch.int8, generator=g)
    sums = []
    for row in nn.functional.pad(w.long(), (0, 1)).reshape(5, -1, 2).reshape(-1, 2).tolist():
        sums += [x0 * row[0] + x1 * row[1] for x0 in (0, 200) for x1 in (0, 200)]
    assert I.pair_sum_range(w, 200) == (min(sums), max(sums))


def test_quantize_bias_equals_the_decomposed_ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers quantized_decomposed ops)

    g = torch.Generator().manual_seed(2)
    bias, w_scale = torch.randn(16, generator=g) * 3, torch.rand(16, generator=g) * 0.01 + 1e-4
    ref = torch.ops.quantized_decomposed.quantize_per_channel(bias, w_scale * 0.0231, torch.zeros(16, dtype=torch.long),
                                                               0, -(2**31), 2**31 - 1, torch.int32)
    assert torch.equal(I.quantize_bias(bias, 0.0231, w_scale), ref)
    ref = torch.ops.quantized_decomposed.quantize_per_tensor(bias, 0.004 * 0.0231, 0, -(2**31), 2**31 - 1, torch.int32)
    assert torch.equal(I.quantize_bias(bias, 0.0231, 0.004), ref)


def test_quantize_bias_saturates_like_torchs_qint32_quantizer():
    # b / (s_x s_w) = +-1e10, and 2**31 - 128 (the largest float32 below 2**31, exact with these
    # power-of-two scales); torch.quantize_per_* to qint32 saturates
    s_x = 2.0**-10
    bias = torch.tensor([1.0, -1.0, (2**31 - 128) * 2.0**-30, 0.25])
    w_scale = torch.tensor([1e-7, 1e-7, 2.0**-20, 0.01])
    ours = I.quantize_bias(bias, s_x, w_scale)
    assert ours.tolist()[:3] == [2**31 - 1, -(2**31), 2**31 - 128]     # the sign is kept
    ref = torch.quantize_per_channel(bias, (w_scale.double() * s_x), torch.zeros(4, dtype=torch.long), 0,
                                     torch.qint32).int_repr()
    assert torch.equal(ours, ref)
    ours_t = I.quantize_bias(bias[:2], s_x, 1e-7)
    assert torch.equal(ours_t, torch.quantize_per_tensor(bias[:2], 1e-7 * s_x, 0, torch.qint32).int_repr())
    assert torch.equal(ours_t, I.quantize_bias(bias[:2], s_x, 1e-7, divide=True))
    with pytest.raises(ValueError, match="bias must be finite"):
        I.quantize_bias(torch.tensor([float("inf"), 0.0]), 0.1, 0.1)


def _qnnpack_layer(op, x_q, w_q, w_scale, bias, s_x, z_x, s_y, z_y):
    """torch's qnnpack linear or 1x1 conv, and ours, on the same integers."""
    torch.backends.quantized.engine = "qnnpack"
    if op == "linear":
        x = torch._make_per_tensor_quantized_tensor(x_q, s_x, z_x)
        packed = torch.ops.quantized.linear_prepack(qweight(w_q, w_scale), bias)
        ref = torch.ops.quantized.linear(x, packed, s_y, z_y).int_repr()
        ours = I.linear_int8(x_q, w_q, bias, input_scale=s_x, input_zero_point=z_x, weight_scale=w_scale,
                             output_scale=s_y, output_zero_point=z_y, kernel="qnnpack")
        return ours, ref
    x4, w4 = x_q[:, :, None, None].contiguous(), w_q[:, :, None, None].contiguous()
    x = torch._make_per_tensor_quantized_tensor(x4, s_x, z_x)
    packed = torch.ops.quantized.conv2d_prepack(qweight(w4, w_scale), bias, [1, 1], [0, 0], [1, 1], 1)
    ref = torch.ops.quantized.conv2d(x, packed, s_y, z_y).int_repr()
    ours = I.conv2d_int8(x4, w4, bias, input_scale=s_x, input_zero_point=z_x, weight_scale=w_scale,
                         output_scale=s_y, output_zero_point=z_y, kernel="qnnpack")
    return ours, ref


@pytest.mark.skipif("qnnpack" not in ENGINES, reason="torch built without QNNPACK")
@pytest.mark.parametrize("op", ["linear", "conv"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qnnpack_bias_scale_is_the_double_product_of_the_scales(op, per_channel):
    # biases exactly at (n + 1/2) * s_x * s_w in double: the float32 bias scale decides the tie. torch
    # multiplies the two scales in double (q_scale() is a double); rounding s_x to float32 first
    # (0.1 is not a float32) moves some of these biases, and their outputs, by one step
    moved = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        k, o = 8, 16
        x_q = torch.randint(0, 256, (4, k), dtype=torch.uint8, generator=g)
        w_q = torch.randint(-128, 128, (o, k), dtype=torch.int8, generator=g)
        w_scale = torch.rand(o, generator=g) * 0.02 + 1e-3 if per_channel else torch.tensor([0.003 + 0.01 * seed / 40])
        s_x = 0.1
        n = torch.randint(-1000, 1000, (o,), generator=g).double()
        bias = ((n + 0.5) * w_scale.double() * s_x).float()
        ours, ref = _qnnpack_layer(op, x_q, w_q, w_scale, bias, s_x, 3, 0.05, 100)
        assert torch.equal(ours, ref), (seed, I.step_differences(ours, ref))
        single = (w_scale.to(torch.float32) * torch.tensor(s_x, dtype=torch.float32)).double()
        moved += int((torch.round(bias * (1 / single.float())) != torch.round(bias * (1 / (w_scale.double() * s_x)).float())).sum())
    assert moved > 0     # the cases do tell the two bias scales apart


@pytest.mark.skipif("qnnpack" not in ENGINES, reason="torch built without QNNPACK")
@pytest.mark.parametrize("op", ["linear", "conv"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qnnpack_saturating_bias_equals_torch(op, per_channel):
    # s_x s_w = 1e-10: b / (s_x s_w) = +-1e10 saturates to the int32 ends, and acc + b_q wraps around
    # where acc has the bias's sign (channels 0 and 1: the output lands on the side of z_y opposite to
    # the bias's sign; channels 2 and 3 do not wrap and keep it)
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(1, 256, (3, 6), dtype=torch.uint8, generator=g)
    pos, neg = torch.randint(1, 128, (2, 6), generator=g), -torch.randint(1, 128, (2, 6), generator=g)
    w_q = torch.stack([pos[0], neg[0], neg[1], pos[1]]).to(torch.int8)
    bias = torch.tensor([1.0, -1.0, 1.0, -1.0])
    w_scale = torch.full((4,), 1e-7) if per_channel else torch.tensor([1e-7])
    ours, ref = _qnnpack_layer(op, x_q, w_q, w_scale, bias, 1e-3, 0, 0.0021, 128)
    assert torch.equal(ours, ref), I.step_differences(ours, ref)
    ours = ours.reshape(3, 4).to(torch.int64)
    assert bool((ours[:, [0, 3]] < 128).all()) and bool((ours[:, [1, 2]] > 128).all())


def _onnx_qlinear(op, w_q, w_scale, bias_q, s_x, z_x, s_y, z_y, **attrs):
    """A one-node ONNX model: QLinearConv or com.microsoft QGemm (u8 activations, s8 weights, zp 0)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def init(name, value, dtype):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    inits = [init("xs", s_x, np.float32), init("xz", z_x, np.uint8), init("w", w_q.numpy(), np.int8),
             init("ws", w_scale.numpy(), np.float32), init("wz", np.zeros(w_q.shape[0]), np.int8),
             init("b", bias_q.numpy(), np.int32), init("ys", s_y, np.float32), init("yz", z_y, np.uint8)]
    if op == "QLinearConv":
        node = helper.make_node(op, ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                                kernel_shape=list(w_q.shape[2:]), **attrs)
    else:
        node = helper.make_node(op, ["x", "xs", "xz", "w", "ws", "wz", "b", "ys", "yz"], ["y"],
                                domain="com.microsoft", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def _run_onnx(model, x_q):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x_q.numpy()})[0])


@pytest.mark.parametrize("case", [
    ("conv", 1, 16, 1, 1), ("conv", 16, 32, 2, 1), ("conv", 3, 8, 1, 0), ("conv", 5, 8, 2, 1),
    ("linear", 64, 10, 5, 0), ("linear", 1024, 10, 1, 0), ("linear", 33, 5, 3, 0)])
def test_mlas_accumulators_equal_onnxruntime(case):
    # inputs near 255 and weights of magnitude 60..127: many u8 x s8 pair sums leave int16. ORT's
    # QLinearConv / QGemm equal ours with the pair saturation of this CPU's MLAS kernel, and (where that
    # kernel saturates) differ from the exact int32 sum
    pytest.importorskip("onnxruntime")
    kernel = I.mlas_u8s8_kernel()
    if not kernel.startswith("avx"):
        pytest.skip(f"MLAS's {kernel} kernels are not reproduced here (x86 only)")
    saturates = kernel in I.MLAS_SATURATING
    op, c, o, third, pad = case
    g = torch.Generator().manual_seed(c * 100 + o)
    shape = (2, c, 9, 9) if op == "conv" else (third, c)
    wshape = (o, c, 3, 3) if op == "conv" else (o, c)
    x_q = torch.randint(200, 256, shape, dtype=torch.uint8, generator=g)
    sign = torch.where(torch.rand(wshape, generator=g) < 0.5, 1, -1)
    w_q = (torch.randint(60, 128, wshape, generator=g) * sign).to(torch.int8)
    w_scale = torch.rand(o, generator=g) * 0.01 + 0.001
    s_x, z_x, z_y = 0.02, 3, 128
    bias_q = torch.randint(-1000, 1000, (o,), dtype=torch.int32, generator=g)
    if op == "conv":
        def acc_fn(sat):
            return I.accumulate_conv2d_mlas(x_q, w_q, x_zero_point=z_x, stride=third, padding=pad, saturate=sat)
    else:
        def acc_fn(sat):
            return I.accumulate_linear_mlas(x_q, w_q, x_zero_point=z_x, saturate=sat)
    exact = acc_fn(False)
    s_y = float(s_x * w_scale.mean() * exact.float().std() / 40)
    if op == "conv":
        model = _onnx_qlinear("QLinearConv", w_q, w_scale, bias_q, s_x, z_x, s_y, z_y, strides=[third, third],
                              pads=[pad] * 4)
    else:
        model = _onnx_qlinear("QGemm", w_q, w_scale, bias_q, s_x, z_x, s_y, z_y)
    ref = _run_onnx(model, x_q)
    m = I.xnnpack_multiplier(s_x, w_scale, s_y)

    def out(acc):
        return I.requantize(acc + I._channel_view(bias_q, acc.dim()), m, z_y, 0, 255)

    assert torch.equal(out(acc_fn(saturates)), ref), (kernel, I.step_differences(out(acc_fn(saturates)), ref))
    assert torch.equal(acc_fn(None), acc_fn(saturates))
    if saturates:
        assert not torch.equal(out(exact), ref)      # the case does exercise the saturation


def gemmlowp_scalar(acc, m0, shift, zp, lo, hi):
    """gemmlowp's MultiplyByQuantizedMultiplierSmallerThanOne, transcribed on Python ints."""
    prod = acc * m0
    nudge = (1 << 30) if prod >= 0 else 1 - (1 << 30)
    high = int((prod + nudge) / (1 << 31)) if abs(prod + nudge) < 2**52 else (prod + nudge) // (1 << 31)
    if prod + nudge < 0 and (prod + nudge) % (1 << 31):
        high = -((-(prod + nudge)) // (1 << 31))           # truncation toward zero
    mask = (1 << shift) - 1
    remainder, threshold = high & mask, (mask >> 1) + (1 if high < 0 else 0)
    return max(lo, min(hi, (high >> shift) + (1 if remainder > threshold else 0) + zp))


def test_fixed_point_requantization():
    g = torch.Generator().manual_seed(4)
    acc = torch.randint(-200000, 200000, (1, 300), dtype=torch.int32, generator=g)
    for m in (0.25, 0.000731, 0.0123, 0.499999, 0.9):
        m0, shift = I.quantize_multiplier(m)
        assert 2**30 <= int(m0) < 2**31 and abs(int(m0) * 2.0 ** (-31 - int(shift)) - m) <= 2.0 ** (-31 - int(shift))
        ours = I.requantize_fixed_point(acc, m0, shift, 0, -128, 127).long()
        scalar = [gemmlowp_scalar(a, int(m0), int(shift), 0, -128, 127) for a in acc.reshape(-1).tolist()]
        assert ours.reshape(-1).tolist() == scalar
        exact = [max(-128, min(127, round(Fraction(a) * Fraction(int(m0), 2 ** (31 + int(shift))))))
                 for a in acc.reshape(-1).tolist()]
        assert max(abs(o - e) for o, e in zip(ours.reshape(-1).tolist(), exact)) <= 1   # rounds twice


@pytest.mark.parametrize("channels_last", [False, True])
def test_adaptive_avg_pool2d_bit_exact(channels_last):
    torch.backends.quantized.engine = "x86" if "x86" in ENGINES else "fbgemm"
    g = torch.Generator().manual_seed(6)
    for shape, out in (((2, 16, 7, 7), 4), ((1, 32, 9, 5), (3, 2)), ((3, 8, 4, 4), 4)):
        x_q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        x = torch._make_per_tensor_quantized_tensor(x_q, 0.037, 11)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ref = nn.functional.adaptive_avg_pool2d(x, out).int_repr()
        ours = I.adaptive_avg_pool2d_int8(x_q, out, input_scale=0.037, input_zero_point=11, output_scale=0.037,
                                          output_zero_point=11, channels_last=channels_last)
        assert torch.equal(ours, ref)


@pytest.fixture(scope="module")
def small_eager_models():
    """A tiny conv net (incl. a depthwise conv) converted for every engine, calibrated on random data."""
    from torch.ao import quantization as tq

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.c1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(3), nn.Linear(72, 5)

        def forward(self, x):
            x = self.pool(self.dw(self.c1(self.quant(x))))
            return self.dequant(self.fc(x.flatten(1)))

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(16, 1, 10, 10)
    models = {}
    warnings.filterwarnings("ignore", message="Please use quant_min and quant_max")
    for engine in ENGINES:
        torch.backends.quantized.engine = engine
        m = copy.deepcopy(net)
        tq.fuse_modules(m, [["c1.0", "c1.1"]], inplace=True)
        m.qconfig = tq.get_default_qconfig(engine)
        tq.prepare(m, inplace=True)
        m(x)
        models[engine] = tq.convert(m)
    return models, x


@pytest.mark.parametrize("engine", ENGINES)
def test_integer_kernels_end_to_end(engine, small_eager_models):
    skip_unverified(engine)
    models, x = small_eager_models
    torch.backends.quantized.engine = engine
    model = models[engine]
    with torch.no_grad():
        ref = model(x)
        with I.integer_kernels(model, engine=engine):
            ours = model(x)
        assert torch.equal(ours, ref)
        assert torch.equal(model(x), ref)           # the model is torch's again after the block
        with I.integer_kernels(model, engine=engine, scheme="reference"):
            ref_scheme = model(x)
    assert (ref_scheme - ref).abs().max() < 0.5    # fake quant differs by a few output steps at most


def test_bad_inputs_raise_clear_errors():
    x_u8 = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    w = torch.zeros(3, 2, 3, 3, dtype=torch.int8)
    common = dict(input_scale=0.1, input_zero_point=0, weight_scale=0.1, output_scale=0.1, output_zero_point=0)
    with pytest.raises(TypeError, match="x_q must have dtype uint8, got float32"):
        I.conv2d_int8(x_u8.float(), w, None, **common)
    with pytest.raises(TypeError, match="x_q must have dtype int8, got uint8"):
        I.conv2d_int8(x_u8, w, None, kernel="xnnpack", **common)
    with pytest.raises(TypeError, match=r"quantized tensor; pass its integers with x_q.int_repr\(\)"):
        I.accumulate_conv2d(torch.quantize_per_tensor(torch.zeros(1, 2, 4, 4), 0.1, 0, torch.quint8), w,
                            x_zero_point=0)
    with pytest.raises(ValueError, match="weight_scale has 2 values, expected 1 or one per output channel"):
        I.conv2d_int8(x_u8, w, None, **{**common, "weight_scale": torch.tensor([0.1, 0.2])})
    with pytest.raises(ValueError, match="output_scale must be positive"):
        I.conv2d_int8(x_u8, w, None, **{**common, "output_scale": -1.0})
    with pytest.raises(ValueError, match=r"x_zero_point must lie in \[0, 255\], got 300"):
        I.accumulate_conv2d(x_u8, w, x_zero_point=300)
    with pytest.raises(ValueError, match="x_q has 2 channels and w_q expects 4 per group"):
        I.accumulate_conv2d(x_u8, torch.zeros(3, 4, 3, 3, dtype=torch.int8), x_zero_point=0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        I.conv2d_int8(x_u8, w, None, kernel="tflite", **common)
    with pytest.raises(TypeError, match="bias must be a 1-d float tensor"):
        I.quantize_bias(torch.ones(3, dtype=torch.int32), 0.1, 0.1)
    with pytest.raises(ValueError, match="multiplier must be < 1"):
        I.quantize_multiplier(1.5)
    with pytest.raises(ValueError, match="x_max must be an int in"):
        I.pair_sum_range(w.reshape(3, -1), 300)
    with pytest.raises(ValueError, match="engine must be one of"):
        with I.integer_kernels(nn.Identity(), engine="cuda"):
            pass


@pytest.fixture(scope="module")
def executorch_program(tmp_path_factory):
    """A small PT2E int8 model with every intermediate output, lowered to ExecuTorch/XNNPACK."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from qatlab import deploy

    class Taps(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.g = nn.Conv2d(8, 8, 1, groups=2)
            self.fc = nn.Linear(8 * 16, 6)

        def forward(self, x):
            a = torch.relu(self.c1(x))
            b = self.dw(a)
            c = torch.relu(self.g(b))
            return a, b, c, self.fc(c.flatten(1))

    torch.manual_seed(0)
    model, x = Taps().eval(), torch.randn(4, 3, 8, 8)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    for _ in range(8):
        prepared(torch.randn(4, 3, 8, 8))     # calibrate (the graph has the example's batch size)
    converted = convert_pt2e(prepared)
    path = tmp_path_factory.mktemp("pte") / "taps.pte"
    deploy.export_executorch(converted, (x,), path)
    return converted, deploy.load_executorch(path, threads=1).program, x


def test_xnnpack_layers_bit_exact_against_executorch(executorch_program):
    converted, program, x = executorch_program
    outputs = program.load_method("forward").execute((x,))
    layers = I.pt2e_layers(converted)
    assert [layer["kind"] for layer in layers] == ["conv2d", "conv2d", "conv2d", "linear"]
    from qatlab.quant import quantize

    h = quantize(x, layers[0]["input_scale"], layers[0]["input_zero_point"], -128, 127)
    for layer, out in zip(layers, outputs):
        if layer["kind"] == "linear":
            h = h.flatten(1)
        h = I.run_pt2e_layer(layer, h)
        # the delegate returns (q − z)·s in float32; recover q exactly
        q_et = torch.round(out / torch.tensor(layer["output_scale"])) + layer["output_zero_point"]
        assert torch.equal(h.long(), q_et.long().reshape(h.shape)), (layer["name"], I.step_differences(h, q_et))


def _float_neighbours(x, n):
    """``x`` and its ``n`` nearest float32 neighbours on each side."""
    out, lo, hi = [x], x, x
    for _ in range(n):
        lo, hi = torch.nextafter(lo, lo - 1), torch.nextafter(hi, hi + 1)
        out += [lo, hi]
    return out


def test_quantize_bias_divide_equals_onnx_runtime_where_the_two_roundings_disagree(tmp_path):
    """ORT quantizes a QDQ graph's float bias as round(b / (s_x s_w)); ExecuTorch multiplies by 1/s."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from onnx import numpy_helper
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from qatlab import deploy

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()).eval(), torch.randn(2, 1, 6, 6)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    prepared(x)
    layer, = I.pt2e_layers(converted := convert_pt2e(prepared))
    path = tmp_path / "conv.onnx"
    deploy.export_onnx(converted, (x,), path)

    # per channel, a bias whose b / s sits just above a half-integer: b * (1/s) lands on the other side
    s = layer["weight_scale"] * float(layer["input_scale"])
    g, bias = torch.Generator().manual_seed(0), torch.full((8,), float("nan"))
    for c in range(8):
        # walk the float32 neighbours of (k + 1/2) s: where b / s and b * (1/s) fall on either side
        # of the half-integer, the two roundings disagree (a few ulps wide, when it exists for this k)
        for k in torch.randint(-1000, 1000, (200,), generator=g).tolist():
            mid = torch.tensor((k + 0.5) * s[c].item(), dtype=torch.float32)
            found = [b for b in _float_neighbours(mid, 8)
                     if torch.round(b * (1.0 / s[c])) != torch.round(b / s[c])]
            if found:
                bias[c] = found[0]
                break
    assert not bias.isnan().any(), "no bias found where the two roundings disagree"
    graph = onnx.load(path)
    init, = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [8]
             and numpy_helper.to_array(i).tolist() == pytest.approx(layer["bias"].tolist())]
    init.CopyFrom(numpy_helper.from_array(bias.numpy(), init.name))
    onnx.save(graph, path)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "conv.basic.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ort_bias, = [torch.from_numpy(numpy_helper.to_array(i).copy())
                 for i in onnx.load(options.optimized_model_filepath).graph.initializer
                 if i.data_type == onnx.TensorProto.INT32 and list(i.dims) == [8]]
    divided = I.quantize_bias(bias, layer["input_scale"], layer["weight_scale"], divide=True)
    multiplied = I.quantize_bias(bias, layer["input_scale"], layer["weight_scale"])
    assert torch.equal(ort_bias, divided)
    assert (ort_bias - multiplied).abs().tolist() == [1] * 8


def test_quantize_bias_rejects_a_non_bool_divide():
    with pytest.raises(TypeError, match="divide must be True or False, got 'yes'"):
        I.quantize_bias(torch.ones(2), 0.1, 0.1, divide="yes")
