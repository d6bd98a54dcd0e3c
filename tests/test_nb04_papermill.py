"""Notebook 04 runs end to end with another seed and a cheaper parameter set, and records sane numbers."""

import math

import pytest


@pytest.mark.notebook
def test_nb04_runs_with_seed_1(run_notebook, notebook_build):
    r = run_notebook("04_qat_training", seed=1, seeds=2, curve_points=2, calib_batches=4)
    assert r["seeds"] == 2  # the multi-seed path (paired_t over seeds needs >= 2) runs
    for key in ("fp32_finetuned_acc", "ptq_int8_acc", "ptq_int8_histogram_acc", "qat_int8_acc",
                "pt2e_qat_fq_acc", "eager_qat_fq_acc"):
        assert 95.0 < r[key] <= 100.0, (key, r[key])
    for key in ("fp32_finetuned_acc_std", "ptq_int8_acc_std", "qat_int8_acc_std", "ptq_w4_acc_std",
                "qat_w4_acc_std"):
        assert 0.0 <= r[key] < 2.0, (key, r[key])
    for key in ("ptq_w4_acc", "qat_w4_acc", "lsq_w4_acc", "lsq_w4_minmax_init_acc", "freeze_none_w4_acc",
                "freeze_both_w4_acc"):
        assert 80.0 < r[key] <= 100.0, (key, r[key])
    # eager and PT2E QAT train the same model with the same recipe and schedule: close, not equal
    assert abs(r["eager_qat_fq_acc"] - r["pt2e_qat_fq_acc"]) < 2.0
    # quantization-aware training must not lose badly to doing nothing at 4 bits
    assert r["qat_w4_acc"] > r["ptq_w4_acc"] - 1.0
    # the paper's LSQ init is coarser than min/max on 9-weight channels, and one epoch barely moves it
    assert r["lsq_paper_init_over_minmax_layer0"] > 1.5
    assert 0 <= r["lsq_max_step_change"] < 0.5
    assert 0 <= r["qat_w4_codes_changed_layer1"] <= 1
    assert 0.2 < r["qat_epoch_over_fp32_epoch"] < 20 and math.isfinite(r["qat_epoch_over_fp32_epoch"])
    for goal in ("goal_qat_int8_met", "goal_speed_met"):
        assert r[goal] in (0, 1)
