"""qatlab.qat_cost: interleaved step timing, ratios, the breakdown, and the quantizer switches."""

import pytest
import torch

from qatlab import qat_cost


class FakeClock:
    """A clock that moves only when a step says so: timings become exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def costs(self, seconds):
        def step():
            self.now += seconds
        return step


def test_interleaved_times_are_per_call_and_per_round():
    clock = FakeClock()
    times = qat_cost.interleaved_step_times({"fp32": clock.costs(1.0), "qat": clock.costs(2.5)},
                                            rounds=4, repeats=3, warmup=2, clock=clock)
    assert times == {"fp32": [1.0] * 4, "qat": [2.5] * 4}
    assert clock.now == pytest.approx((2 + 4 * 3) * 3.5)  # warmup runs too, untimed


def test_interleaved_runs_in_the_given_order_each_round():
    order = []
    qat_cost.interleaved_step_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                    rounds=2, repeats=1, warmup=0)
    assert order == ["a", "b", "a", "b"]


def test_ratio_is_formed_within_each_round():
    # a load burst in round 2 slows both variants: the within-round ratio does not move
    times = {"fp32": [1.0, 3.0, 1.0], "qat": [1.5, 4.5, 1.5]}
    r = qat_cost.step_ratio(times, "qat", "fp32")
    assert r.per_round == (1.5, 1.5, 1.5) and r.median == r.low == r.high == 1.5
    assert "1.50x" in str(r)


def test_breakdown_parts_add_up_to_the_total():
    times = {"fp32": [1.0, 1.1, 0.9], "graph": [1.1, 1.2, 1.0], "bn": [1.4, 1.5, 1.3],
             "fq": [2.0, 2.1, 1.9], "qat": [2.3, 2.4, 2.2]}
    chain = [("", "fp32"), ("graph", "graph"), ("conv-BN", "bn"), ("fake quant", "fq"), ("observers", "qat")]
    parts = qat_cost.breakdown(times, chain)
    assert [p.name for p in parts] == ["graph", "conv-BN", "fake quant", "observers"]
    assert [round(p.seconds, 6) for p in parts] == [0.1, 0.3, 0.6, 0.3]
    assert sum(p.share for p in parts) == pytest.approx(1.0)
    assert parts[2].fraction == pytest.approx(0.6 / 1.0)
    assert parts[2].per_round == pytest.approx((0.6, 0.6, 0.6))   # the within-round differences, kept


@pytest.mark.parametrize("bad, match", [({}, "non-empty"), ({"a": 3}, "callable")])
def test_bad_steps_are_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        qat_cost.interleaved_step_times(bad)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rounds must be a positive int, got 0"):
        qat_cost.interleaved_step_times({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="no timings named 'x'"):
        qat_cost.breakdown({"a": [1.0]}, [("", "a"), ("x", "x")])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qat_cost.make_train_step("net", (torch.ones(1), torch.ones(1)))
    with pytest.raises(ValueError, match="has no fake-quantizers"):
        with qat_cost.quantizer_switches(torch.nn.Linear(2, 2)):
            pass


def _prepared_linear():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    exported = torch.export.export(net, (torch.randn(16, 8),)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    return net, prepare_qat_pt2e(exported, quantizer)


def test_switches_match_torchao_and_restore():
    from torchao.quantization.pt2e import (
        disable_fake_quant,
        disable_observer,
        enable_fake_quant,
        enable_observer,
    )

    net, prepared = _prepared_linear()
    x = torch.randn(16, 8)
    prepared(x)  # observers see data: scales are set
    fqs = qat_cost.fake_quantizers(prepared)
    assert len(fqs) >= 4  # input, two weights, activations
    with qat_cost.quantizer_switches(prepared, observers=False, fake_quant=False):
        assert all(int(m.observer_enabled[0]) == 0 and int(m.fake_quant_enabled[0]) == 0 for m in fqs)
        ours = prepared(x)
    assert all(int(m.observer_enabled[0]) == 1 and int(m.fake_quant_enabled[0]) == 1 for m in fqs)
    # the same switches through torchao's own functions give the same output, bit for bit
    prepared.apply(disable_observer)
    prepared.apply(disable_fake_quant)
    ref = prepared(x)
    prepared.apply(enable_observer)
    prepared.apply(enable_fake_quant)
    assert torch.equal(ours, ref)
    # with both off, the prepared graph computes the float net exactly
    assert torch.equal(ours, net(x))
    # and with fake quantization on (observers off), it does not
    with qat_cost.quantizer_switches(prepared, observers=False, fake_quant=True):
        assert not torch.equal(prepared(x), net(x))


def test_switched_step_trains_and_restores():
    _, prepared = _prepared_linear()
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    prepared(batch[0])  # observers see data once: scales are set
    step = qat_cost.switched_step(prepared, qat_cost.make_train_step(prepared, batch), observers=False)
    scales = [m.scale.clone() for m in qat_cost.fake_quantizers(prepared)]
    loss = step()
    assert loss > 0
    # observers were off during the step: no scale moved; afterwards they are on again
    assert all(torch.equal(a, m.scale) for a, m in zip(scales, qat_cost.fake_quantizers(prepared)))
    assert all(int(m.observer_enabled[0]) == 1 for m in qat_cost.fake_quantizers(prepared))


def test_interleaved_step_times_settle_calls_are_untimed_and_adjacent():
    calls, clock = [], iter(range(1000))
    times = qat_cost.interleaved_step_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                            rounds=2, repeats=1, warmup=0, settle=2, clock=lambda: next(clock))
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3   # each timed call right after its own settle calls
    assert times == {"a": [1.0, 1.0], "b": [1.0, 1.0]}              # the clock ticks only around the timed call
    with pytest.raises(ValueError, match="settle must be a non-negative int, got -1"):
        qat_cost.interleaved_step_times({"a": lambda: None}, settle=-1)
