"""Notebook 11 runs end to end with another seed and a cheaper parameter set, and records sane numbers."""

import math

import pytest

CHEAP = dict(seed=1, seeds=2, weight_bits=[3, 2], adaround_iters=5, qat_steps=5, calib_images=32, gptq_bits=[3])


@pytest.mark.notebook
def test_nb11_runs_with_seed_1_cheaply(run_notebook):
    r = run_notebook("11_strongest_ptq", **CHEAP)
    # exact identities, whatever the machine's baselines
    assert 0 <= r["cle_output_max_abs_diff"] <= 1e-4
    assert r["adaround_codes_on_grid"] == 1
    assert 0 < r["gptq_fc_error_ratio"] <= 1 + 1e-6 and r["gptq_fc_heldout_error_ratio"] > 0
    # sane ranges (accuracies in %, differences in pp); nothing here rests on a margin of one machine
    assert 0.0 <= r["best_ptq_w2_acc"] <= 100.0 and 0.0 <= r["cle_fragile_per_tensor_w4_acc"] <= 100.0
    assert -100.0 <= r["qat_w2_minus_best_ptq_pp"] <= 100.0 and 0.0 <= r["qat_w2_minus_best_ptq_p"] <= 1.0
    assert math.isfinite(r["adaround_w3_recovered"]) and r["adaround_w3_recovered_ci_low"] <= r["adaround_w3_recovered"]
    assert r["fragile_per_tensor_w4_collapse_pp"] > -100.0
    assert 0 <= r["configs_needing_training"] <= 4
    assert 0 < r["notebook_seconds"]
