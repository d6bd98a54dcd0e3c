"""Notebook 06 runs end to end with another seed and a cheaper parameter set, and records sane numbers."""

import math

import pytest

CHEAP = dict(seed=1, seeds=2, steps=24, weight_bits=[8, 4, 2], a4_weight_bits=[2], lsq_bits=[2],
             lr_sweep=[0.01, 0.1], probe_images=128, sharpness_max_iters=20)


@pytest.mark.notebook
def test_nb06_runs_with_seed_1_cheaply(run_notebook):
    r = run_notebook("06_when_qat_pays_off", **CHEAP)
    assert r["seeds"] == 2
    for key in ("fp32_finetuned_acc", "fragile_fp32_finetuned_acc", "w8_qat_acc"):
        assert 93.0 < r[key] <= 100.0, (key, r[key])
    # 2-bit weights hurt PTQ. Whether 24 QAT steps win it back depends on the machine's baseline
    # (with one baseline it did not: 83.1 vs PTQ 91.1); the default run's goals say whether QAT pays
    # off. Here: the recovered fraction is a fraction of this drop, and QAT does not beat fp32 by half of it
    assert r["w2_ptq_drop_pp"] > 2.0
    assert math.isfinite(r["w2_qat_recovered"]) and r["w2_qat_recovered"] < 1.5
    assert r["w2_qat_recovered_ci_low"] <= r["w2_qat_recovered_ci_high"]
    # the estimate is the fraction of the seed means: its sign is the sign of QAT - PTQ
    assert (r["w2_qat_recovered"] > 0) == (r["w2_qat_acc"] > r["w2_ptq_acc"])
    # per-tensor 4-bit weights break the depthwise net; per-channel ones do not (much)
    assert r["fragile_per_tensor_w4_ptq_drop_pp"] > r["fragile_per_channel_w4_ptq_drop_pp"] + 2.0
    assert r["fragile_per_channel_w4_ptq_drop_pp"] < 3.0
    assert -1.0 < r["fragile_qat_recovered"] < 1.5
    assert abs(r["fragile_w8_per_tensor_minus_per_channel_pp"]) < 3.0
    # the freeze experiment ran
    assert r["freeze_collapse_reproduced"] in (0, 1) and r["freeze_collapse_lr"] in (0.01, 0.1)
    assert 0 <= r["freeze_collapse_seeds"] <= 2
    # the LR drop's success is a target the notebook reports; with this cheap sweep's lr 0.1 it rescued
    # 1 of 2 seeds on another baseline. Never freezing must train
    assert r["freeze_never_acc"] > 80.0 and 0.0 <= r["freeze_fix_acc"] <= 100.0
    assert r["sharpness_batch_bn"] > 0 and r["sharpness_frozen_bn"] > 0 and r["sharpness_converged"] in (0, 1)
    assert r["fragile_qat_collapsed_seeds"] >= 0
    # mixed precision: within the size budget, and a working model
    assert 0.0 < r["mixed_precision_size_ratio"] <= 0.6
    assert 80.0 < r["mixed_precision_acc"] <= 100.0 and 50.0 < r["mixed_precision_ptq_acc"] <= 100.0
    assert 0.2 < r["qat_over_fp32_run_time"] < 20 and math.isfinite(r["notebook_seconds"])
