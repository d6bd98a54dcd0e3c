"""The PTQ harness (qatlab.ptq): weights equal torch's observers + fake quantization, activations hook in."""

import pytest
import torch
from torch import nn

from qatlab import ptq
from qatlab.fusion import fold_model_bn
from qatlab.models import SmallCNN


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [4, 2])
def test_weights_equal_torch_observer_and_fake_quant(granularity, bits):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    torch.manual_seed(0)
    net = fold_model_bn(SmallCNN().eval())
    ref = {n: m.weight.detach().clone() for n, m in ptq.weight_layers(net)}
    ptq.quantize_weights(net, bits, granularity)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for name, m in ptq.weight_layers(net):
        w = ref[name]
        if granularity == "per_channel":
            obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                           quant_min=qmin, quant_max=qmax)
            obs(w)
            s, zp = obs.calculate_qparams()
            want = torch.fake_quantize_per_channel_affine(w, s, zp.int(), 0, qmin, qmax)
        else:
            obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=qmin, quant_max=qmax)
            obs(w)
            s, zp = obs.calculate_qparams()
            want = torch.fake_quantize_per_tensor_affine(w, s, zp, qmin, qmax)
        torch.testing.assert_close(m.weight.detach(), want, rtol=0, atol=0)


def test_activation_quant_calibrates_then_quantizes_and_removes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    x = torch.rand(8, 4) * 2
    aq = ptq.quantize_activations(net, [x])
    assert aq.ranges["0"] == (float(x.min()), float(x.max()))
    seen = []
    h = net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # runs after ours
    net(x)
    h.remove()
    levels = torch.unique(seen[0])
    assert len(levels) <= 256 and not torch.equal(seen[0], x)
    aq.remove()
    with torch.no_grad():
        torch.testing.assert_close(net(x), nn.functional.linear(x, net[0].weight, net[0].bias))


def test_bad_input():
    with pytest.raises(ValueError, match="granularity"):
        ptq.weight_qparams(torch.ones(2, 2), 4, "per_row")
    with pytest.raises(ValueError, match="empty"):
        ptq.quantize_activations(nn.Linear(2, 2), [])


def test_layer_inputs_stop_at_the_layer_and_equal_a_full_forward():
    torch.manual_seed(0)
    net = fold_model_bn(SmallCNN().eval())
    x = torch.randn(70, 1, 28, 28)
    for name, layer in ptq.weight_layers(net):
        seen = []
        h = layer.register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0]))
        with torch.no_grad():
            for i in range(0, len(x), 32):
                net(x[i:i + 32])
        h.remove()
        assert torch.equal(ptq.layer_inputs(net, name, x, batch_size=32), torch.cat(seen))
    calls = []
    last = ptq.weight_layers(net)[-1][1]
    h = last.register_forward_hook(lambda *a: calls.append(1))
    ptq.layer_inputs(net, ptq.weight_layers(net)[0][0], x, batch_size=32)
    h.remove()
    assert calls == []   # the layers after the captured one did not run

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="'unused' ran in 0 of 1 forward passes"):
        ptq.layer_inputs(Skips(), "unused", torch.zeros(3, 2))
