import pytest


@pytest.mark.notebook
def test_fusion_notebook_with_another_seed(run_notebook, notebook_build):
    had_baseline = (notebook_build / "checkpoints" / "baseline.pt").exists()
    r = run_notebook("03_fusion", seed=1, n_eval=500, n_calib=128, latency_repeats=15)
    assert 0 <= r["fold_max_abs_diff"] < 1e-4  # float32 round-off only (5.7e-06 measured for seed 0)
    assert r["fold_error_ratio"] > 2  # conv and BN quantized separately is worse (18 measured)
    assert r["fold_error_ratio_per_tensor"] > 1  # (7.6 measured)
    assert 0.5 < r["fusion_speedup_b1"] < 10  # ~1.2 measured; timing on a shared machine is noisy
    assert 0.5 < r["fusion_speedup_b64"] < 10
    assert r["pt2e_fused_conv_bn"] == 3  # prepare_qat_pt2e rewrote all three conv-BN blocks
    if had_baseline:  # otherwise the run includes retraining the baseline
        assert r["seconds"] < 300  # budget 60 s on an idle 2-core machine; CI machines are busier
