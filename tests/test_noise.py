"""qatlab.noise: loggers, warnings and native stderr lines that teach nothing are quieted."""

import logging
import os
import warnings

import pytest

from qatlab import noise


def test_silence_noise_raises_logger_level_and_ignores_noisy_warnings():
    logger = logging.getLogger("torch.utils._pytree")
    old = logger.level
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert noise.silence_noise() == ["torch.utils._pytree"]
            warnings.warn("Please use quant_min and quant_max to specify the range for observers.",
                          UserWarning, stacklevel=1)
            warnings.warn("a warning that matters", UserWarning, stacklevel=1)
        assert logger.level == logging.ERROR
        assert [str(w.message) for w in caught] == ["a warning that matters"]
    finally:
        logger.setLevel(old)
    with pytest.raises(TypeError, match="'loud'"):
        noise.silence_noise("loud")


def test_silence_noise_keeps_the_torch_observer_warning_quiet_in_practice():
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noise.silence_noise()
        torch.ao.quantization.get_default_qat_qconfig("x86").activation()
    assert not [w for w in caught if "quant_min and quant_max" in str(w.message)]


def test_silence_legacy_api_ignores_only_the_deprecation():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert noise.silence_legacy_api() == 2
        warnings.warn("torch.ao.quantization is deprecated and will be removed", DeprecationWarning, stacklevel=1)
        warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_native_stderr_filtered_drops_noise_and_passes_real_errors(capfd):
    with noise.native_stderr_filtered() as out:
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
        os.write(2, b"[threadpool.cpp:66] Resetting threadpool to 2 threads.\n")
        os.write(2, b"[tensor_impl.cpp:156] Attempted to resize a bounded tensor\n")
    err = capfd.readouterr().err
    assert "tensor_impl.cpp:156" in err  # a real error reaches the reader
    assert "cpuinfo" not in err and "Resetting threadpool" not in err
    assert len(out.dropped) == 2 and out.kept == ["[tensor_impl.cpp:156] Attempted to resize a bounded tensor"]
    os.write(2, b"after the block\n")  # descriptor 2 is restored
    assert capfd.readouterr().err == "after the block\n"


def test_native_stderr_filtered_restores_on_exception(capfd):
    with pytest.raises(RuntimeError, match="boom"):
        with noise.native_stderr_filtered():
            os.write(2, b"kept line\n")
            raise RuntimeError("boom")
    assert "kept line" in capfd.readouterr().err
    os.write(2, b"still here\n")
    assert capfd.readouterr().err == "still here\n"


def test_native_stderr_filtered_custom_patterns_and_bad_input(capfd):
    with noise.native_stderr_filtered(patterns=(r"^drop me",)) as out:
        os.write(2, b"drop me please\nkeep me\n")
    assert out.dropped == ["drop me please"] and "keep me" in capfd.readouterr().err
    with pytest.raises(TypeError, match="sequence of regex strings"):
        with noise.native_stderr_filtered(patterns="^x"):
            pass


def test_executorch_load_is_quiet(tmp_path, capfd):
    """Loading a .pte prints no cpuinfo / thread-pool lines (they are native writes)."""
    import torch
    from torch import nn

    from qatlab import deploy

    model = nn.Sequential(nn.Linear(4, 2)).eval()
    deploy.export_executorch(model, (torch.randn(1, 4),), tmp_path / "m.pte")
    capfd.readouterr()
    run = deploy.load_executorch(tmp_path / "m.pte")
    run(torch.randn(1, 4))
    err = capfd.readouterr().err
    assert "cpuinfo_utils" not in err and "Resetting threadpool" not in err


def test_native_stderr_filtered_also_catches_python_level_pieces(capsys):
    import sys

    with noise.native_stderr_filtered() as out:
        for piece in ("[", "cpuinfo_utils.cpp", ":", "71", "] ", "Reading file x\n", "a real message\n"):
            sys.stderr.write(piece)
    assert out.dropped == ["[cpuinfo_utils.cpp:71] Reading file x"]
    assert capsys.readouterr().err == "a real message\n"


def test_plain_warnings_drops_the_source_location_and_shortens_build_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path / "b"))
    previous = noise.plain_warnings()
    try:
        text = warnings.formatwarning(f"no checkpoint at {tmp_path / 'b' / 'checkpoints' / 'x.pt'}: training it now",
                                      UserWarning, "/abs/qatlab/baseline.py", 119, "net = load_baseline()")
        assert text == "UserWarning: no checkpoint at build/checkpoints/x.pt: training it now\n"
    finally:
        warnings.formatwarning = previous
    assert warnings.formatwarning is previous
    assert "baseline.py:119" in warnings.formatwarning("m", UserWarning, "/abs/qatlab/baseline.py", 119)
