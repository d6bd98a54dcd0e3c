"""GPTQ from scratch (qatlab.gptq): checked against torchao's own gptq_quantize and round-to-nearest."""

import inspect

import pytest
import torch
from torch import nn

from qatlab.gptq import (
    GPTQResult,
    HessianAccumulator,
    apply_gptq,
    gptq_quantize_linear,
    gptq_quantize_weight,
    hessian_from_inputs,
    inverse_hessian_factor,
    reconstruction_error,
    rtn_quantize_weight,
)
from qatlab.groupwise import choose_qparams_groupwise, quantize_groupwise


def _correlated(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def _torchao_gptq_on_cpu():
    """torchao 0.18's ``gptq_quantize`` with its two CUDA-only lines (an assert and a synchronize) removed.

    The rest of its source runs unchanged, in its own module's namespace.
    """
    api = pytest.importorskip("torchao.prototype.gptq.api")
    src = inspect.getsource(api.gptq_quantize)
    cuda_lines = ('assert device.type == "cuda", "GPTQ only supports CUDA currently"', "torch.cuda.synchronize()")
    for line in cuda_lines:
        assert src.count(line) == 1, f"torchao's gptq_quantize changed: {line!r} not found once"
        src = src.replace(line, "pass")
    ns = dict(vars(api))
    exec(compile(src, api.__file__, "exec"), ns)
    return api, ns["gptq_quantize"]


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_torchao_gptq_int8_per_row(seed):
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerRow

    api, ao_gptq = _torchao_gptq_on_cpu()
    x, w = _correlated(512, 64, seed), torch.randn(32, 64, generator=torch.Generator().manual_seed(seed + 10))
    h = hessian_from_inputs(x)
    # torchao fixes a per-row scale from the first block's columns: one block of all 64 columns = the whole row
    cfg = api.GPTQConfig(step="convert", base_config=Int8WeightOnlyConfig(granularity=PerRow()),
                         gptq_quantize_block_size=64, percdamp=0.01)
    ref = ao_gptq(h.clone(), w.clone(), cfg)
    ours = gptq_quantize_weight(w, h, bits=8, group_size=None, block_size=64, percdamp=0.01)
    same = (ours.codes == ref.qdata).float().mean().item()
    # one code may flip where float32 round-off of the two Cholesky paths straddles a .5; none did here
    assert same >= 0.99, same
    torch.testing.assert_close(ours.scale, ref.scale.reshape(32, 1), rtol=0, atol=0)
    agree = ours.codes == ref.qdata
    torch.testing.assert_close(ours.weight[agree], ref.dequantize(output_dtype=torch.float32)[agree], rtol=0, atol=0)


def test_hessian_accumulator_matches_torchao_observer():
    obs = pytest.importorskip("torchao.prototype.gptq.observer")
    w = torch.randn(4, 6)
    t = obs.GPTQObserverTensor.from_hp(w)
    acc = HessianAccumulator(6)
    for n in (3, 5, 2):
        x = torch.randn(n, 6)
        t.update_2d(x.unsqueeze(0))  # torchao counts a (1, n, K) batch as one sample of n rows
        acc.update(x)
    # torchao averages over batches, we over rows: with rows per batch the same, the two agree
    acc2 = HessianAccumulator(6)
    t2 = obs.GPTQObserverTensor.from_hp(w)
    for _ in range(3):
        x = torch.randn(4, 6)
        t2.update_2d(x)  # a 2-D input is one batch
        acc2.update(x)
    torch.testing.assert_close(acc2.hessian * 4, t2.hessian, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 8), (3, 16), (2, None)])
def test_identity_hessian_is_round_to_nearest(bits, group_size):
    w = torch.randn(8, 32)
    r = gptq_quantize_weight(w, torch.eye(32), bits, group_size)
    scale, _ = choose_qparams_groupwise(w, bits, group_size)
    torch.testing.assert_close(r.scale, scale, rtol=0, atol=0)
    assert torch.equal(r.codes, quantize_groupwise(w, scale, bits))
    codes, _, w_hat = rtn_quantize_weight(w, bits, group_size)
    assert torch.equal(r.codes, codes) and torch.equal(r.weight, w_hat)
    assert r.error == pytest.approx(r.rtn_error, rel=1e-9)


def test_lazy_batches_regroup_the_same_arithmetic():
    x, w = _correlated(400, 48, 3), torch.randn(16, 48)
    h = hessian_from_inputs(x)
    one = gptq_quantize_weight(w, h, 4, 16, block_size=1)
    big = gptq_quantize_weight(w, h, 4, 16, block_size=48)
    mid = gptq_quantize_weight(w, h, 4, 16, block_size=20)  # lowered to 16: a block never cuts a group
    for r in (big, mid):
        # one float32 round-off that straddles a .5 would flip a code and change the rest of its row
        assert (r.codes == one.codes).float().mean().item() >= 0.95
        assert r.error == pytest.approx(one.error, rel=0.05)


def test_codes_on_grid_and_weight_is_codes_times_scale():
    x, w = _correlated(300, 32, 4), torch.randn(12, 32)
    r = gptq_quantize_weight(w, hessian_from_inputs(x), 3, 8)
    assert r.codes.dtype == torch.int8 and int(r.codes.min()) >= -4 and int(r.codes.max()) <= 3
    expect = (r.codes.float().reshape(12, 4, 8) * r.scale.unsqueeze(-1)).reshape(12, 32)
    assert torch.equal(r.weight, expect)


def test_reconstruction_error_is_the_mean_squared_output_error():
    x, w = _correlated(200, 16, 5), torch.randn(6, 16)
    w_hat = rtn_quantize_weight(w, 3)[2]
    direct = ((x @ w.T - x @ w_hat.T) ** 2).sum(1).mean().item()
    assert reconstruction_error(w, w_hat, hessian_from_inputs(x)) == pytest.approx(direct, rel=1e-4)


def _trained_mlp(steps=150):
    """A 784-128-64-10 MLP trained briefly on the course's digits (a few seconds on one core)."""
    from qatlab.data import load_dataset

    torch.manual_seed(0)
    loader, _ = load_dataset("mnist5k").loaders(batch_size=64, seed=0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    step, batches = 0, []
    while step < steps:
        for x, y in loader:
            if step >= steps:
                break
            if len(batches) < 6:
                batches.append(x)
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return net.eval(), batches


def test_error_never_exceeds_round_to_nearest_on_trained_layers():
    """On every Linear of a trained MLP, at 4, 3 and 2 bits, per-channel and group-wise: GPTQ <= RTN."""
    import copy

    net, batches = _trained_mlp()
    checked = 0
    for bits, gs in ((4, None), (4, 32), (3, 16), (2, None)):
        res = apply_gptq(copy.deepcopy(net), batches, bits, gs)
        for layer, r in res.items():
            assert r.error <= r.rtn_error * (1 + 1e-6), (layer, bits, gs, r)
            checked += 1
    assert checked == 12


def test_gptq_quantize_linear_and_apply_gptq_in_place():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    before = net[0].weight.detach().clone()
    x = torch.randn(128, 16)
    res = apply_gptq(net, [x[:64], (x[64:], None)], bits=4, group_size=8)
    assert list(res) == ["0", "2"] and isinstance(res["0"], GPTQResult)
    assert not torch.equal(net[0].weight, before) and torch.equal(net[0].weight, res["0"].weight)
    layer = nn.Linear(16, 4)
    r = gptq_quantize_linear(layer, [torch.randn(10, 3, 16)], bits=4, group_size=16)  # (B, T, in) batches
    assert torch.equal(layer.weight, r.weight) and r.scale.shape == (4, 1)
    # 12 does not divide 32: the second layer falls back to per-channel, or raises when told not to
    net2 = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    res2 = apply_gptq(net2, [torch.randn(64, 24)], bits=4, group_size=12)
    assert res2["0"].scale.shape == (32, 2) and res2["2"].scale.shape == (8, 1)
    with pytest.raises(ValueError, match="does not divide"):
        apply_gptq(nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8)), [torch.randn(64, 24)], 4, 12,
                   group_size_fallback=False)


def test_dead_inputs_and_damping():
    x = _correlated(100, 8, 6)
    x[:, 3] = 0.0
    w = torch.randn(4, 8)
    r = gptq_quantize_weight(w, hessian_from_inputs(x), 4)
    assert bool((r.codes[:, 3] == 0).all())
    u = inverse_hessian_factor(hessian_from_inputs(x))
    assert torch.equal(u, torch.triu(u)) and bool((torch.diag(u) > 0).all())


def test_bad_input():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize_weight(w, h, bits=1)
    with pytest.raises(ValueError, match="group_size 3"):
        gptq_quantize_weight(w, h, 4, group_size=3)
    with pytest.raises(ValueError, match="hessian must be \\(8, 8\\)"):
        gptq_quantize_weight(w, torch.eye(4), 4)
    with pytest.raises(TypeError, match="weight"):
        gptq_quantize_weight(torch.zeros(4, 8, dtype=torch.int32), h, 4)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize_weight(w, h, 4, block_size=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        gptq_quantize_linear(nn.Conv2d(1, 1, 1), torch.randn(2, 1), 4)
    with pytest.raises(ValueError, match="in_features = 8"):
        gptq_quantize_linear(nn.Linear(8, 2), torch.randn(2, 5), 4)
    with pytest.raises(ValueError, match="not nn.Linear"):
        apply_gptq(nn.Sequential(nn.Linear(2, 2)), [torch.randn(2, 2)], 4, layers=["fc"])
    with pytest.raises(ValueError, match="no inputs"):
        _ = HessianAccumulator(3).hessian
