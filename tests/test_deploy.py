"""qatlab.deploy: sizes, timing, parity, and a .pte / .onnx round trip on a tiny model."""

import copy
import warnings

import pytest
import torch
from torch import nn

from qatlab import deploy


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


@pytest.fixture(scope="module")
def int8_tiny():
    """A PT2E int8 (convert_pt2e) tiny model, calibrated on random data."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model, x = tiny_model(), torch.randn(2, 1, 8, 8)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    batch = torch.export.Dim("batch", min=1, max=64)  # any batch size, for the references
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, quantizer)
    prepared(torch.randn(16, 1, 8, 8))  # calibrate
    converted = convert_pt2e(prepared)
    converted.training = False  # no BN/dropout to move; the flag the ONNX exporter reads
    return converted


def test_file_size_and_state_dict(tmp_path):
    model = tiny_model()
    n = deploy.save_state_dict(model, tmp_path / "m.pt")
    n_params = sum(p.numel() for p in model.parameters())
    assert 4 * n_params < n < 4 * n_params + 4000  # fp32 weights + pickle overhead
    with pytest.raises(FileNotFoundError, match="nope"):
        deploy.file_size(tmp_path / "nope")


def test_benchmark_median_iqr_and_threads():
    calls = []
    timing = deploy.benchmark(lambda: calls.append(1), warmup=2, repeats=7, threads=1)
    assert len(calls) == 9 and timing.repeats == 7 and timing.threads == 1
    times = sorted(timing.times_ms)
    assert timing.median_ms == times[3] and timing.q1_ms <= timing.median_ms <= timing.q3_ms
    assert timing.iqr_ms == pytest.approx(timing.q3_ms - timing.q1_ms)
    before = torch.get_num_threads()
    deploy.benchmark(lambda: None, repeats=2, threads=1)
    assert torch.get_num_threads() == before  # restored
    with pytest.raises(ValueError, match="repeats"):
        deploy.benchmark(lambda: None, repeats=1)
    with pytest.raises(TypeError, match="callable"):
        deploy.benchmark(3)


def test_benchmark_sees_slow_calls():
    import time

    fast = deploy.benchmark(lambda: None, repeats=5, warmup=0)
    slow = deploy.benchmark(time.sleep, 0.01, repeats=5, warmup=0)
    assert slow.median_ms >= 10 > fast.median_ms


class FakeClock:
    """A clock that advances only when a fake workload says so: timings without a real machine."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, seconds):
        def run():
            self.now += seconds()
        return run


def test_compare_speed_interleaves_and_tests_over_rounds():
    clock, order = FakeClock(), []
    a = clock.work(lambda: order.append("a") or 1.0)
    b = clock.work(lambda: order.append("b") or 2.0)
    c = deploy.compare_speed(a, b, (), names=("a", "b"), rounds=10, calls=3, warmup=1, settle=0, clock=clock)
    # warm-up, then interleaved rounds, A first in even rounds and B first in odd ones
    assert order == ["a", "b"] + (["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3) * 5
    # with settle, each timed block follows untimed calls of the same function (not timed: the ratios stay 2)
    order.clear()
    s = deploy.compare_speed(a, b, (), rounds=4, calls=3, warmup=1, settle=2, clock=clock)
    assert order == ["a", "b"] + (["a"] * 5 + ["b"] * 5 + ["b"] * 5 + ["a"] * 5) * 2
    assert s.ratios == (2.0,) * 4
    assert c.ratios == (2.0,) * 10 and c.a_faster_rounds == 10 and c.b_faster_rounds == 0
    assert c.p_value == pytest.approx(2 * 0.5 ** 10) and c.significant
    assert (c.median_ms_a, c.median_ms_b) == (1e3, 2e3)
    assert str(c).startswith("a: 2.00x faster than b (a faster in 10 of 10 interleaved rounds")
    # the other way round: slower
    assert str(deploy.compare_speed(b, a, (), names=("b", "a"), clock=clock)).startswith("b: 2.00x slower than a")


def test_compare_speed_needs_consistent_rounds_not_a_large_median():
    # b is 10x slower in 6 rounds and 10x faster in 4: the medians differ a lot, the sign test does not call it
    clock, slow_b = FakeClock(), iter([10.0] * 6 + [0.1] * 4)
    a = clock.work(lambda: 1.0)
    b = clock.work(lambda: next(slow_b))
    c = deploy.compare_speed(a, b, (), names=("x", "y"), rounds=10, calls=1, warmup=0, settle=0, clock=clock)
    assert (c.a_faster_rounds, c.b_faster_rounds) == (6, 4) and c.ratio > 5
    assert not c.significant and str(c).startswith("x vs y: no difference detected")
    # five rounds can never reach p < 0.05 (the smallest two-sided p is 2 / 2**5)
    fast = deploy.compare_speed(clock.work(lambda: 1.0), clock.work(lambda: 3.0), (), rounds=5, calls=1,
                                warmup=0, clock=clock)
    assert fast.a_faster_rounds == 5 and fast.p_value == pytest.approx(0.0625) and not fast.significant


def test_compare_speed_sees_real_slow_calls_and_restores_threads():
    import time

    before = torch.get_num_threads()
    c = deploy.compare_speed(lambda: None, time.sleep, (), (0.002,), names=("none", "sleep"), rounds=6, calls=1,
                             threads=1)
    assert c.a_faster_rounds == 6 and c.significant and torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(a=3), TypeError, "a must be callable"),
    (dict(args_a=[1]), TypeError, "args_a must be a tuple"),
    (dict(names=("a",)), TypeError, "names must be two strings"),
    (dict(rounds=1), ValueError, "rounds must be an int >= 2, got 1"),
    (dict(calls=0), ValueError, "calls must be an int >= 1, got 0"),
    (dict(settle=-1), ValueError, "settle must be an int >= 0, got -1"),
    (dict(warmup=1.5), ValueError, "warmup must be an int >= 0, got 1.5"),
    (dict(threads=0), ValueError, "threads must be an int >= 1, got 0"),
])
def test_compare_speed_rejects_bad_input(kwargs, error, match):
    args = dict(a=lambda: None, b=lambda: None, args_a=()) | kwargs
    with pytest.raises(error, match=match):
        deploy.compare_speed(**args)


def test_parity():
    a = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 5.0], [1.0, 0.0]])
    assert deploy.parity(a, a) == {"top1_agreement": 100.0, "max_abs_diff": 0.0}
    b = a.clone()
    b[3] = torch.tensor([0.0, 1.5])
    assert deploy.parity(a, b) == {"top1_agreement": 75.0, "max_abs_diff": 1.5}
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(3, 2\)"):
        deploy.parity(a, a[:3])


def test_cpu_flags_keys():
    flags = deploy.cpu_flags()
    assert set(flags) == set(deploy.CPU_FLAGS) and all(isinstance(v, bool) for v in flags.values())


def test_executorch_round_trip(int8_tiny, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    summary = deploy.export_executorch(int8_tiny, (x,), tmp_path / "tiny.pte")
    assert summary.bytes == deploy.file_size(tmp_path / "tiny.pte") > 0
    assert summary.delegated_nodes > 0  # XNNPACK took the quantized conv / linear
    batches = [torch.randn(4, 1, 8, 8), torch.randn(2, 1, 8, 8)]  # split into the program's 2 rows
    ours = deploy.run_executorch(tmp_path / "tiny.pte", batches)
    ref = int8_tiny(torch.cat(batches))
    result = deploy.parity(ours, ref)
    assert result["max_abs_diff"] < 0.1 and result["top1_agreement"] >= 80
    with pytest.raises(ValueError, match="does not split"):
        deploy.run_executorch(tmp_path / "tiny.pte", [torch.randn(3, 1, 8, 8)])


def test_executorch_bounded_dynamic_batch(tmp_path):
    """One .pte for batches 1..16: ExecuTorch plans memory for the bound, and refuses beyond it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    path = tmp_path / "dyn.pte"
    summary = deploy.export_executorch(model, (torch.randn(2, 8),), path, max_batch=16)
    assert summary.max_batch == 16 and summary.delegated_nodes > 0
    run = deploy.load_executorch(path)
    assert run.max_batch == 16 and run.input_shape == (16, 8)  # memory planned for the bound
    for rows in (1, 5, 15, 16):
        x = torch.randn(rows, 8)
        assert torch.allclose(torch.as_tensor(run(x)), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="runs batches of 1..16 rows, got 17"):
        run(torch.randn(17, 8))
    # run_executorch splits a larger batch into chunks of at most 16 rows
    x = torch.randn(40, 8)
    assert torch.allclose(deploy.run_executorch(path, [x]), model(x), atol=1e-5)


def test_executorch_dynamic_batch_narrowed_by_a_lowering_guard(int8_tiny, tmp_path):
    """A conv model lowered to XNNPACK: the planned bound is what the program runs, and it is enforced."""
    path = tmp_path / "conv.pte"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = deploy.export_executorch(int8_tiny, (torch.randn(2, 1, 8, 8),), path, max_batch=32)
    run = deploy.load_executorch(path)
    narrowed = [w for w in caught if "narrowed the batch range" in str(w.message)]
    assert 2 <= summary.max_batch <= 32 and run.max_batch == summary.max_batch
    assert bool(narrowed) == (summary.max_batch < 32)  # warned exactly when narrowed
    assert run.input_shape[0] >= run.max_batch
    for rows in (1, run.max_batch):
        x = torch.randn(rows, 1, 8, 8)
        assert deploy.parity(torch.as_tensor(run(x)), int8_tiny(x))["max_abs_diff"] < 0.1
    with pytest.raises(ValueError, match=f"1..{run.max_batch} rows, got {run.max_batch + 1}"):
        run(torch.randn(run.max_batch + 1, 1, 8, 8))


def test_executorch_static_program_refuses_other_batch_sizes(int8_tiny, tmp_path):
    path = tmp_path / "static.pte"
    summary = deploy.export_executorch(int8_tiny, (torch.randn(2, 1, 8, 8),), path)
    assert summary.max_batch is None
    run = deploy.load_executorch(path)
    assert run.max_batch is None and run.input_shape[0] == 2
    with pytest.raises(ValueError, match="exported for batch 2, got 3 rows"):
        run(torch.randn(3, 1, 8, 8))


def test_executorch_dynamic_program_from_elsewhere_takes_a_bound(tmp_path):
    """A .pte written without qatlab (no get_max_batch method): the caller names the bound."""
    from executorch.exir import to_edge_transform_and_lower

    model = nn.Sequential(nn.Linear(8, 3)).eval()
    batch = torch.export.Dim("batch", min=1, max=10)
    program = torch.export.export(model, (torch.randn(2, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path / "plain.pte"
    path.write_bytes(to_edge_transform_and_lower(program).to_executorch().buffer)
    assert deploy.load_executorch(path).max_batch is None  # looks static without the bound
    run = deploy.load_executorch(path, max_batch=10)
    assert run.max_batch == 10 and torch.as_tensor(run(torch.randn(3, 8))).shape == (3, 3)
    assert deploy.load_executorch(path, max_batch=99).max_batch == 10  # capped at the planned size
    x = torch.randn(25, 8)
    assert torch.allclose(deploy.run_executorch(path, [x], max_batch=10), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="max_batch must be None or a positive int"):
        deploy.load_executorch(path, max_batch=0)


def test_export_executorch_bad_max_batch(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="max_batch must be None or an int >= 2, got 1"):
        deploy.export_executorch(model, (torch.randn(2, 1, 8, 8),), tmp_path / "x.pte", max_batch=1)
    with pytest.raises(ValueError, match="example batch must have 2..4 rows"):
        deploy.export_executorch(model, (torch.randn(1, 1, 8, 8),), tmp_path / "x.pte", max_batch=4)


def test_onnx_metadata_is_stripped(int8_tiny, tmp_path):
    import onnx

    kept = deploy.export_onnx(int8_tiny, (torch.randn(2, 1, 8, 8),), tmp_path / "kept.onnx",
                              strip_metadata=False)
    stripped = deploy.export_onnx(int8_tiny, (torch.randn(2, 1, 8, 8),), tmp_path / "stripped.onnx")
    assert stripped < kept
    nodes = onnx.load(str(tmp_path / "stripped.onnx")).graph.node
    assert nodes and not any(n.metadata_props for n in nodes)
    assert any(n.metadata_props for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node)
    assert deploy.strip_onnx_metadata(tmp_path / "kept.onnx") == kept - stripped


def test_onnx_round_trip(int8_tiny, tmp_path):
    import onnx

    path = tmp_path / "tiny.onnx"
    n = deploy.export_onnx(int8_tiny, (torch.randn(2, 1, 8, 8),), path)
    assert n == deploy.file_size(path)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # a QDQ graph
    assert not list(tmp_path.glob(".tiny*"))  # no temporary files left behind
    batches = [torch.randn(1, 1, 8, 8), torch.randn(5, 1, 8, 8)]  # dynamic batch
    ours = deploy.run_onnx(path, batches)
    ref = int8_tiny(torch.cat(batches))
    assert ours.shape == (6, 3)
    assert deploy.parity(ours, ref)["max_abs_diff"] < 0.1
    basic = deploy.run_onnx(path, batches, optimization="basic")
    assert deploy.parity(basic, ref)["max_abs_diff"] < 0.1
    with pytest.raises(ValueError, match="'fast'"):
        deploy.load_onnx(path, optimization="fast")


def test_invalid_files_are_named(tmp_path):
    bad = tmp_path / "junk.pte"
    bad.write_bytes(b"not a program at all")
    with pytest.raises(ValueError, match="junk.pte.*not an ExecuTorch program"):
        deploy.load_executorch(bad)
    bad_onnx = tmp_path / "junk.onnx"
    bad_onnx.write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="junk.onnx.*not a valid ONNX model"):
        deploy.load_onnx(bad_onnx)
    with pytest.raises(FileNotFoundError):
        deploy.run_executorch(tmp_path / "missing.pte", [])


def test_missing_runtime_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(__import__("sys").modules, "onnxruntime", raising=False)
    with pytest.raises(ImportError, match="load_onnx needs the 'onnxruntime' package"):
        deploy.load_onnx("whatever.onnx")


def test_format_table_and_plots():
    rows = [{"runtime": "eager", "precision": "fp32", "b1_ms": 2.0, "b1_iqr_ms": 0.1, "bytes": 4000},
            {"runtime": "eager", "precision": "int8", "b1_ms": 1.0, "b1_iqr_ms": 0.1, "bytes": 1000},
            {"runtime": "et", "precision": "int8", "b1_ms": None, "bytes": None}]
    text = deploy.format_table(rows, ["runtime", "precision", "b1_ms"])
    assert text.splitlines()[2].split(" | ")[2].strip() == "2.000" and "—" in text
    import matplotlib

    matplotlib.use("Agg")
    ax = deploy.plot_latency(rows)
    assert len(ax.patches) == 2
    assert ax.get_ylabel() == "median latency per call (ms)"
    wide = rows[:2] + [{"runtime": "et", "precision": "int8", "b1_ms": 0.05, "b1_iqr_ms": 0.01}]
    assert deploy.plot_latency(wide).get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["eager"]
    assert [t.get_text() for t in ax.texts] == ["2.00x"]  # fp32 / int8 above the int8 bar
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"fp32", "int8", "interquartile range"}
    assert len(deploy.plot_sizes(rows).patches) == 2


def _conv_gemm_biases(model):
    """{op type: how its bias arrives} for the Conv/Gemm/QLinearConv/QGemm nodes of an ONNX graph."""
    import onnx

    inits = {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    bias_input = {"Conv": 2, "Gemm": 2, "QLinearConv": 8, "QGemm": 6}
    found = {}
    for n in model.graph.node:
        if n.op_type in bias_input:
            b = n.input[bias_input[n.op_type]]
            found[n.op_type] = inits[b] if b in inits else f"{producer[b].op_type}({inits[producer[b].input[0]]})"
    return found


def test_onnx_saves_the_graph_each_optimization_level_runs(int8_tiny, tmp_path):
    """none: the literal QDQ graph (float bias); basic: int32 bias behind DequantizeLinear; all: QLinearConv."""
    import onnx

    path = tmp_path / "tiny.onnx"
    deploy.export_onnx(int8_tiny, (torch.randn(2, 1, 8, 8),), path)
    x = [torch.randn(3, 1, 8, 8)]
    graphs = {}
    for level in ("none", "basic", "all"):
        saved = tmp_path / f"tiny.{level}.onnx"
        logits = deploy.run_onnx(path, x, optimization=level, optimized_model_path=saved)
        assert logits.shape == (3, 3)
        graphs[level] = _conv_gemm_biases(onnx.load(str(saved)))
    assert graphs["none"] == {"Conv": "FLOAT", "Gemm": "FLOAT"}
    assert graphs["basic"] == {"Conv": "DequantizeLinear(INT32)", "Gemm": "DequantizeLinear(INT32)"}
    assert set(graphs["all"]) <= {"QLinearConv", "QGemm"} and "QLinearConv" in graphs["all"]
    assert "INT32" in graphs["all"]["QLinearConv"]
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, moved into place
    with pytest.raises(TypeError, match="optimized_model_path"):
        deploy.load_onnx(path, optimized_model_path=3)


def test_a_program_loaded_before_a_pool_resize_refuses_to_run(int8_tiny, tmp_path):
    """Resizing ExecuTorch's pool leaves earlier programs holding the old one (a segfault was seen):
    they raise instead, and a load at the current size resizes nothing."""
    x = torch.randn(2, 1, 8, 8)
    deploy.export_executorch(int8_tiny, (x,), tmp_path / "tiny.pte")
    first = deploy.load_executorch(tmp_path / "tiny.pte", threads=1)
    expected = first(x)
    second = deploy.load_executorch(tmp_path / "tiny.pte", threads=2)
    with pytest.raises(RuntimeError, match="tiny.pte was loaded .*load it again"):
        first(x)
    third = deploy.load_executorch(tmp_path / "tiny.pte", threads=2)   # same size: no resize
    assert torch.equal(second(x), expected) and torch.equal(third(x), expected)


def test_benchmark_records_the_threads_of_the_runtime_that_ran(int8_tiny, tmp_path):
    """ExecuTorch's pool and ORT's session threads, not torch's count, for their runners."""
    import executorch.extension.pybindings.portable_lib as portable

    x = torch.randn(2, 1, 8, 8)
    deploy.export_executorch(int8_tiny, (x,), tmp_path / "tiny.pte")
    deploy.export_onnx(int8_tiny, (x,), tmp_path / "tiny.onnx")
    for threads in (1, 2):
        et = deploy.load_executorch(tmp_path / "tiny.pte", threads=threads)
        t = deploy.benchmark(et, x, warmup=1, repeats=2, threads=3 - threads)  # torch: the other count
        assert (t.runtime, t.threads) == ("ExecuTorch", threads) == ("ExecuTorch", et.thread_count())
        assert t.threads == portable._threadpool_get_thread_count()
        ort_run = deploy.load_onnx(tmp_path / "tiny.onnx", threads=threads)
        t = deploy.benchmark(ort_run, x, warmup=1, repeats=2, threads=3 - threads)
        assert (t.runtime, t.threads) == ("ONNX Runtime", threads)
        assert str(t).endswith(f"{threads} ONNX Runtime thread{'s' if threads > 1 else ''})")
    t = deploy.benchmark(int8_tiny, x, warmup=1, repeats=2, threads=1)
    assert (t.runtime, t.threads) == ("PyTorch", 1)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            deploy.load_onnx(tmp_path / "tiny.onnx", threads=bad)
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            deploy.load_executorch(tmp_path / "tiny.pte", threads=bad)


def test_export_executorch_reuses_a_file_only_for_the_same_program(int8_tiny, tmp_path):
    """reuse=True keeps a .pte whose stored digest matches the program; any change of weights,
    example shape or batch bound lowers again, and a lowering without reuse drops the stale digest."""
    path = tmp_path / "tiny.pte"
    x = torch.randn(4, 1, 8, 8)
    first = deploy.export_executorch(int8_tiny, (x,), path, reuse=True)
    assert not first.reused and (tmp_path / "tiny.pte.json").exists()
    again = deploy.export_executorch(int8_tiny, (x,), path, reuse=True)
    assert again.reused and again.bytes == first.bytes == deploy.file_size(path)
    assert (again.delegated_nodes, again.max_batch) == (first.delegated_nodes, first.max_batch)
    program = torch.export.export(int8_tiny, (x,))
    digest = deploy.program_digest(program, (x,))
    assert digest != deploy.program_digest(program, (x[:2],))             # another example shape
    assert digest != deploy.program_digest(program, (x,), max_batch=8)    # another batch bound
    other = copy.deepcopy(int8_tiny)
    with torch.no_grad():
        next(p for p in other.parameters() if p.dtype.is_floating_point).add_(1.0)
    assert not deploy.export_executorch(other, (x,), path, reuse=True).reused   # other weights: lowered again
    deploy.export_executorch(int8_tiny, (x,), path)                      # no reuse: the stale digest is removed
    assert not (tmp_path / "tiny.pte.json").exists()


def test_program_digest_sees_torchao_quantized_weights():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def quantized(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(64, 32))
        quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
        return torch.export.export(m, (torch.randn(2, 64),))

    x = (torch.randn(2, 64),)
    a, b, c = quantized(0), quantized(0), quantized(1)
    assert deploy.program_digest(a, x) == deploy.program_digest(b, x) != deploy.program_digest(c, x)
