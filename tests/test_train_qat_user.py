"""``python -m qatlab.train_qat --model FILE.py:CALLABLE --data FILE.py:CALLABLE``: your model and data.

Bad specs fail before anything is trained or written, with a message naming the spec; a
residual model (adds, concatenation, max/avg pooling, BN) goes through PT2E QAT to an XNNPACK
``.pte``; a PT2E run stopped mid-way resumes bit for bit.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from qatlab import distributed, train_qat
from qatlab.user_spec import SpecError, load_callable, load_user_data

FIXTURE = Path(__file__).with_name("user_model_fixture.py")
MODEL = f"{FIXTURE}:residual_net"
DATA = f"{FIXTURE}:quadrants"
FAST = ["--threads", "1", "--no-progress", "--global-batch-size", "32", "--calib-batches", "2"]


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --- specs: loading, and every way they can be wrong ---------------------------------------------

def test_specs_load_from_a_file_path_or_a_module_name():
    from qatlab import models

    assert load_callable("qatlab.models:SmallCNN") is models.SmallCNN
    net = load_callable(MODEL)()
    assert type(net).__name__ == "ResidualNet"
    train, test, shape = load_user_data(DATA)
    assert shape == (3, 16, 16) and len(train) == 256 and len(test) == 128


@pytest.mark.parametrize("model, data, message", [
    ("no_such_module_xyz:net", DATA, "--model 'no_such_module_xyz:net': module 'no_such_module_xyz' not found"),
    ("/no/such/dir/m.py:net", DATA, "--model '/no/such/dir/m.py:net': module file '/no/such/dir/m.py' not found"),
    (f"{FIXTURE}:nope", DATA, f"--model '{FIXTURE}:nope': '{FIXTURE}' has no callable 'nope' (it has: "),
    (f"{FIXTURE}:NOT_CALLABLE", DATA, "'NOT_CALLABLE' is a int, not a callable"),
    (f"{FIXTURE}:returns_int", DATA, f"--model '{FIXTURE}:returns_int' returned a int, not a torch.nn.Module"),
    (MODEL, f"{FIXTURE}:returns_int", f"--data '{FIXTURE}:returns_int' must return (train_dataset, test_dataset), "
                                      f"got a int"),
    (MODEL, f"{FIXTURE}:one_dataset", "must return (train_dataset, test_dataset), got a TensorDataset"),
    (MODEL, f"{FIXTURE}:triples", "train items must be (input, label) pairs, got a tuple of 3"),
    (MODEL, f"{FIXTURE}:images_only", "train items must be (input, label) pairs, got a Tensor(3, 16, 16)"),
    (MODEL, f"{FIXTURE}:gray_quadrants", f"--model '{MODEL}' refuses inputs of shape (1, 16, 16) (from --data "
                                         f"'{FIXTURE}:gray_quadrants'; a batch of 2): RuntimeError"),
])
def test_a_bad_spec_is_named_and_nothing_is_written(model, data, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SpecError) as e:
        train_qat.main(["--model", model, "--data", data, "--out", str(out), *FAST])
    assert message in str(e.value)
    assert not out.exists()


def test_wrong_init_and_eager_without_fuse_model_are_named(tmp_path):
    init = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2)}, init)
    out = tmp_path / "run"
    with pytest.raises(SpecError, match=f"--init '{init}' does not fit --model '{MODEL}'"):
        train_qat.main(["--model", MODEL, "--data", DATA, "--init", str(init), "--out", str(out), *FAST])
    with pytest.raises(SpecError, match="--init '.*missing.pt': no such file"):
        train_qat.main(["--model", MODEL, "--data", DATA, "--init", str(tmp_path / "missing.pt"), "--out", str(out)])
    with pytest.raises(TypeError, match="--api eager needs --model .* to have a fuse_model"):
        train_qat.main(["--model", MODEL, "--data", DATA, "--api", "eager", "--out", str(out), *FAST])
    assert not out.exists()


def test_cli_prints_a_bad_spec_as_one_error_line():
    cmd = [sys.executable, "-m", "qatlab.train_qat", "--model", "no_such_module_xyz:net", "--data", DATA]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "train_qat: error: --model 'no_such_module_xyz:net': module 'no_such_module_xyz' not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_device_and_amp_are_checked():
    from qatlab.distributed import Dist

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
            train_qat.resolve_device(train_qat.Config(device="cuda"), Dist())
    with pytest.raises(ValueError, match=r"--amp \(bfloat16 autocast\) is for CUDA; this run trains on cpu"):
        train_qat.resolve_device(train_qat.Config(device="cpu", amp=True), Dist(device="cuda"))
    with pytest.raises(ValueError, match="--device cpu cannot use the nccl backend"):
        train_qat.resolve_device(train_qat.Config(device="cpu"), Dist(backend="nccl", device="cuda:0"))


def test_amp_keeps_fake_quantizers_in_float32():
    """The AMP code path, on the CPU (autocast is the same call with device 'cpu'): matmuls in
    bfloat16, every fake-quantizer fed float32."""
    from qatlab import models, qat

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qat.prepare_eager_qat(models.SmallCNN().train())
    raw, seen = [], []
    fqs = [m for _, m in train_qat.fake_quant_modules(model)]
    spies = [m.register_forward_pre_hook(lambda mod, args: raw.append(args[0].dtype)) for m in fqs]
    handles = train_qat.keep_fake_quant_fp32(model)   # pre-hooks run in the order they were registered
    spies += [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype)) for m in fqs]
    with train_qat.autocast("cpu", True):
        out = model(torch.randn(4, 1, 28, 28))
    assert torch.bfloat16 in raw                                   # the convolutions ran in bfloat16
    assert seen and set(seen) == {torch.float32}                   # every fake-quantizer got float32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()   # the last op is a fake-quantizer
    for h in handles + spies:
        h.remove()


def test_eager_api_on_a_fusable_user_model(tmp_path, keep_threads, capsys):
    """--api eager where the model can be fused: a module name (qatlab.models:SmallCNN has
    fuse_model and QuantStubs), eager QAT + PTQ + convert; the shipped file reloads bit for bit."""
    out = tmp_path / "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train_qat.main(["--model", "qatlab.models:SmallCNN", "--data", f"{FIXTURE}:mnist_like",
                                  "--api", "eager", "--steps", "4", "--out", str(out), *FAST])
        int8 = train_qat.load_int8_model(out / "model_int8.pt")
    capsys.readouterr()
    assert metrics["api"] == "eager" and metrics["pte_file"] is None and "pte_bytes" not in metrics["sizes"]
    assert distributed.state_digest(int8.state_dict()) == metrics["shipped_digest_per_rank"][0]
    assert metrics["lr_per_step"] == [0.01, 0.01, 0.001, 0.001]
    assert 0 <= metrics["ptq_int8_acc"] <= 100 and metrics["calib_images"] == 64


# --- a residual model, PT2E, end to end to a .pte ------------------------------------------------

def _trained_init(path):
    """fp32 weights for the fixture model, trained a little on its data (what --init gets)."""
    from torch.utils.data import DataLoader

    net = load_callable(MODEL)()
    train, _, _ = load_user_data(DATA)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(2):
        for x, y in DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(net.state_dict(), path)
    return path


def test_residual_model_pt2e_end_to_end_to_pte(tmp_path, keep_threads, capsys):
    from qatlab import deploy
    from qatlab.noise import native_stderr_filtered

    init = _trained_init(tmp_path / "fp32.pt")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train_qat.main(["--model", MODEL, "--data", DATA, "--init", str(init), "--steps", "6",
                                  "--log-every", "2", "--out", str(out), *FAST])
    printed = capsys.readouterr().out
    assert "train_qat: step 2/6" in printed and "train_qat: step 6/6" in printed   # progress, not silence
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["api"] == "pt2e" and metrics["input_shape"] == [3, 16, 16] and metrics["test_images"] == 128
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "model_int8.pt2",
                                                     "model_int8.pte", "model_int8.pte.json",
                                                     "predictions.pt"]   # no temporary file left
    assert metrics["pte_reused"] is False and "kept from an earlier run" not in printed
    # the recipe's schedule: BN frozen at 3 with the LR drop, observers at 4
    assert metrics["lr_per_step"] == [0.01] * 3 + [0.01 * 0.1] * 3
    assert metrics["qat_recipe"]["freeze_bn_at"] == 3 and metrics["bn_freeze_timing"] == "late"
    # sizes are the files' sizes
    sizes = metrics["sizes"]
    assert sizes["pte_bytes"] == (out / "model_int8.pte").stat().st_size
    assert sizes["int8_file_bytes"] == (out / "model_int8.pt2").stat().st_size
    # the agreement is what the shipped files give: rerun the .pte and the saved int8 graph
    _, test, _ = load_user_data(DATA)
    loader = torch.utils.data.DataLoader(test, batch_size=500)
    with native_stderr_filtered():
        pte_logits = deploy.run_executorch(out / "model_int8.pte", loader)
    int8 = train_qat.load_int8_model(out / "model_int8.pt2")
    from qatlab.training import predict

    int8_logits, labels = predict(int8, loader)
    assert deploy.parity(pte_logits, int8_logits)["top1_agreement"] == metrics["pte_top1_agreement_vs_int8"]
    assert 100 * (pte_logits.argmax(1) == labels).float().mean().item() == metrics["pte_acc"]
    assert 100 * (int8_logits.argmax(1) == labels).float().mean().item() == metrics["qat_int8_acc"]
    # the per-image predictions, for paired tests between runs: what the shipped files predict
    preds = torch.load(metrics["predictions_file"], weights_only=True)
    assert metrics["predictions_file"] == str(out / "predictions.pt")
    assert sorted(preds) == ["fake_quant", "int8", "labels", "pte", "ptq"]
    assert torch.equal(preds["labels"], labels) and torch.equal(preds["pte"], pte_logits.argmax(1))
    assert torch.equal(preds["int8"], int8_logits.argmax(1))
    for key, acc in (("fake_quant", "qat_fake_quant_acc"), ("ptq", "ptq_int8_acc"), ("pte", "pte_acc")):
        assert 100 * (preds[key] == labels).float().mean().item() == pytest.approx(metrics[acc], abs=1e-9), key
    # sanity bounds (a broken export or conversion lands near chance, 25 %, on 4 classes)
    assert metrics["pte_top1_agreement_vs_fake_quant"] >= 90 and metrics["pte_top1_agreement_vs_int8"] >= 90
    assert metrics["pte_delegated_nodes"] > 0
    for key in ("qat_fake_quant_acc", "qat_int8_acc", "ptq_int8_acc", "pte_acc"):
        assert 0 <= metrics[key] <= 100, key
    # the same run again (training is deterministic): the same converted program, so the .pte is kept
    pte_bytes = (out / "model_int8.pte").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = train_qat.main(["--model", MODEL, "--data", DATA, "--init", str(init), "--steps", "6",
                                "--log-every", "6", "--out", str(out), "--no-ptq", *FAST])
    assert "kept from an earlier run: the same program" in capsys.readouterr().out
    assert again["pte_reused"] is True and (out / "model_int8.pte").read_bytes() == pte_bytes
    for key in ("pte_acc", "pte_top1_agreement_vs_fake_quant", "pte_max_batch", "qat_int8_acc"):
        assert again[key] == metrics[key], key


# --- PT2E: a run stopped mid-way resumes bit for bit --------------------------------------------------

def test_pt2e_run_resumes_bit_exact(tmp_path, keep_threads, capsys):
    """As the eager one-process test: 6 steps in one go, against 3 steps then --resume to 6 (BN
    frozen at step 2, between the two halves; observers at 4; random shifts make the RNG matter).
    Training only (ship=False): the comparison is the checkpoint, bit for bit."""
    common = ["--model", MODEL, "--data", DATA, *FAST, "--freeze-bn-at", "2", "--freeze-observers-at", "4",
              "--augment-shift", "1", "--seed", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = train_qat.run(train_qat.parse_args([*common, "--steps", "6", "--out", str(tmp_path / "a")]),
                              ship=False)
        half = train_qat.run(train_qat.parse_args([*common, "--steps", "3", "--out", str(tmp_path / "b")]),
                             ship=False)
        resumed = train_qat.run(train_qat.parse_args([*common, "--steps", "6", "--resume",
                                                      "--out", str(tmp_path / "b")]), ship=False)
    assert half["step"] == 3 and resumed["step"] == 6
    assert "resumed from" in capsys.readouterr().out
    compared, differing = train_qat.checkpoint_differences(tmp_path / "a" / "checkpoint.pt",
                                                           tmp_path / "b" / "checkpoint.pt")
    assert compared > 40 and differing == []
    assert resumed["loss"] == whole["loss"] and resumed["lr"] == whole["lr"] == [0.01] * 2 + [0.001] * 4
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["freeze"] == {"observers_frozen": True, "bn_frozen": True}
    assert distributed.state_digest(ckpt["optimizer"]) == distributed.state_digest(
        torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["optimizer"])


# --- PT2E below 8 weight bits -----------------------------------------------------------------------

def test_pt2e_w4_weights_take_at_most_16_values_per_channel(tmp_path, keep_threads, capsys):
    """--api pt2e --weight-bits 4: XNNPACK's quantizer with weight_qmin/qmax = -8/7. The shipped
    int8 graph holds every conv / linear weight as int8 codes in [-8, 7], at most 16 per output
    channel; --no-pte and --no-ptq leave their entries out of metrics and predictions."""
    out = tmp_path / "w4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train_qat.main(["--model", MODEL, "--data", DATA, "--weight-bits", "4", "--steps", "4",
                                  "--no-pte", "--no-ptq", "--out", str(out), *FAST])
        int8 = train_qat.load_int8_model(out / "model_int8.pt2")
    capsys.readouterr()
    assert metrics["config"]["weight_bits"] == 4 and metrics["api"] == "pt2e"
    assert metrics["pte_file"] is None and metrics["ptq_int8_acc"] is None and metrics["calib_images"] is None
    codes = [t for t in list(int8.state_dict().values()) + [getattr(int8, n) for n, _ in int8.named_buffers()]
             if isinstance(t, torch.Tensor) and t.dtype == torch.int8 and t.dim() >= 2]
    assert len(codes) >= 6   # 5 convs and the linear layer of the fixture
    for w in codes:
        assert int(w.min()) >= -8 and int(w.max()) <= 7
        assert max(len(torch.unique(c)) for c in w.flatten(1)) <= 16
    preds = torch.load(out / "predictions.pt", weights_only=True)
    assert preds["pte"] is None and preds["ptq"] is None and preds["int8"].shape == preds["labels"].shape


def test_pt2e_rejects_activation_bits_other_than_8(tmp_path):
    out = tmp_path / "a4"
    with pytest.raises(SystemExit):
        train_qat.main(["--model", MODEL, "--data", DATA, "--activation-bits", "4", "--out", str(out), *FAST])
    with pytest.raises(ValueError, match="--api pt2e quantizes activations to 8 bits.*got --activation-bits 4"):
        train_qat.Config(model=MODEL, data=DATA, activation_bits=4)
    from qatlab.conversion import ptq_int8

    with pytest.raises(ValueError, match="activation_bits=6"):
        ptq_int8(torch.nn.Linear(2, 2), [], api="pt2e", input_shape=(2,), activation_bits=6)
    assert not out.exists()


def test_converted_pt2e_model_rounds_on_the_grid_qat_trained_on(keep_threads):
    """The fused fake-quantizer trains with the kernel's scale, max(|min| / 2^(b-1), max / (2^(b-1) - 1));
    stock torchao's convert_pt2e asks the inner observer, max|w| / ((qmax - qmin) / 2): at 3 bits a
    grid up to 1/7 apart. qatlab's KernelQParamsFakeQuantize makes convert use the trained scales:
    every per-channel scale of the converted graph is one of the QAT model's, bit for bit."""
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    from qatlab import conversion, recipe

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = load_callable(MODEL)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat_model = conversion.prepare_pt2e(net.train(), (3, 16, 16), weight_bits=3)
        qat_model(torch.randn(8, 3, 16, 16))   # one training forward sets the scales
        converted = conversion.convert_int8(qat_model)
    weight_fqs = [m for _, m in recipe.fake_quant_modules(qat_model) if m.scale.numel() > 1]
    assert weight_fqs and all(isinstance(m, conversion.KernelQParamsFakeQuantize) for m in weight_fqs)
    stock = [FusedMovingAvgObsFakeQuantize.calculate_qparams(m)[0] for m in weight_fqs]
    assert any(not torch.equal(s, m.scale) for s, m in zip(stock, weight_fqs))   # the mismatch is real
    scales = [getattr(converted, n.args[1].target) for n in converted.graph.nodes
              if n.op == "call_function" and "dequantize_per_channel" in str(n.target)]
    assert len(scales) == len(weight_fqs)
    for m in weight_fqs:
        assert any(s.shape == m.scale.shape and torch.equal(s, m.scale) for s in scales)
