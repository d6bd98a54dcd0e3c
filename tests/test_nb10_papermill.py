"""Notebook 10 runs end to end with another seed and a cheaper parameter set, and records sane numbers.

What is asserted holds on every machine: identities (the recovered fraction is what the accuracies
say, its interval holds it, folding and CLE leave the function unchanged), rankings that hold by
construction, and sanity ranges; no margin one machine happened to show."""

import math

import pytest

CHEAP = dict(seed=1, seeds=2, steps=8, weight_bits=[2], calib_batches=1, adaround_iters=2,
             cost_rounds=2, cost_repeats=1, n_boot=200)


@pytest.mark.notebook
def test_nb10_runs_with_seed_1_cheaply(run_notebook):
    r = run_notebook("10_qat_your_own_model", **CHEAP)
    assert r["seeds"] == 2 and r["capstone_weight_bits"] == 2
    assert r["capstone_fp32_acc"] > 80.0
    # the best PTQ is the better of the two PTQ arms, by construction
    assert r["capstone_best_ptq_acc"] == max(r["capstone_xnnpack_ptq_acc"], r["capstone_strong_ptq_acc"])
    assert r["capstone_ptq_drop_pp"] == pytest.approx(r["capstone_fp32_acc"] - r["capstone_best_ptq_acc"], abs=1e-9)
    # the recovered fraction is what the accuracies say, and its interval holds it
    if r["capstone_ptq_drop_pp"] != 0:
        rec = (r["capstone_qat_acc"] - r["capstone_best_ptq_acc"]) / r["capstone_ptq_drop_pp"]
        assert r["capstone_qat_recovered"] == pytest.approx(rec, abs=1e-5)   # float32 accuracies vs bool counts
    assert r["capstone_qat_recovered_ci_low"] <= r["capstone_qat_recovered"]
    assert r["capstone_qat_recovered_ci_low_unpaired"] <= r["capstone_qat_recovered"]
    assert 0.0 <= r["capstone_qat_vs_ptq_p"] <= 1.0
    assert 0.0 <= r["capstone_fold_max_abs_diff"] < 1e-3
    # the shipped file: an int8 program smaller than the fp32 weights, computing the model QAT measured
    assert 0.0 < r["capstone_pte_bytes"] < 4 * 0.28e6
    for key in ("capstone_pte_top1_agreement", "capstone_int8_top1_agreement", "capstone_stock_convert_top1_agreement"):
        assert 0.0 <= r[key] <= 100.0, key
    assert r["capstone_int8_top1_agreement"] >= 90.0   # a broken conversion lands near chance, 10 %
    # a QAT step does more work than an fp32 step; the slowest round is at least the median
    assert 1.0 < r["capstone_qat_step_over_fp32_step"] <= r["capstone_qat_step_over_fp32_step_max"] < 50
    assert 1.0 < r["capstone_qat_step_torch_kernel_over_fp32_step"] < 50
    assert r["capstone_fake_quant_kernel_speedup"] > 0   # a timing: its size is machine-dependent
    assert math.isfinite(r["notebook_seconds"]) and r["notebook_seconds"] > 0
