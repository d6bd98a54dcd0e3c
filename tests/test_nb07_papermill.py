"""Notebook 07 runs end to end with another seed and a cheaper parameter set, and its metrics are sane."""

import pytest


@pytest.mark.notebook
def test_nb07_runs_with_seed_1(run_notebook, papermill_build):
    # one torch thread (the notebook's default too): this model's ops are too small to gain much
    # from a second one, and a second thread stalls every op when the machine is busy
    r = run_notebook("07_qat_transformers", seed=1, seeds=2, extra_steps=16, repeats=6, threads=1)
    assert r["groupwise_bitexact"] == 1
    assert r["seeds"] == 2
    assert 85.0 < r["fp32_acc"] <= 100.0
    for key in ("fp32_finetuned_acc", "ptq_8da4w_acc", "qat_8da4w_acc", "ptq_w4_weight_only_acc",
                "qat_w4_weight_only_acc", "qat_8da2w_group_acc", "qat_8da2w_per_channel_acc"):
        assert 85.0 < r[key] <= 100.0, (key, r[key])
    # GPTQ at 8da4w: a sane accuracy, and the recorded gap is what the two accuracies say
    assert 85.0 < r["gptq_8da4w_acc"] <= 100.0
    assert r["gptq_vs_qat_int4_pp"] == pytest.approx(r["qat_8da4w_acc"] - r["gptq_8da4w_acc"], abs=1e-9)
    assert 0.0 <= r["gptq_vs_qat_int4_p"] <= 1.0
    for key in ("ptq_8da2w_group_acc", "ptq_8da2w_per_channel_acc"):
        assert 60.0 < r[key] <= 100.0, (key, r[key])
    # int4 with groups loses little; int2 per-channel is the scheme with the least SQNR
    assert r["sqnr_int4_group32_db"] > r["sqnr_int2_group32_db"] > r["sqnr_int2_per_channel_db"] > 3.0
    assert abs(r["int2_ptq_drop_pp"] - (r["fp32_finetuned_acc"] - r["ptq_8da2w_per_channel_acc"])) < 1e-6
    # a recovered fraction (and the goal judged on it) only where PTQ's int2 drop is detected (paired t, p < 0.05)
    assert 0.0 <= r["int2_ptq_drop_p"] <= 1.0
    detected = r["int2_ptq_drop_p"] < 0.05 and r["int2_ptq_drop_pp"] > 0
    if not detected:
        assert "int2_qat_recovered" not in r and "goal_int2_qat_recovered_met" not in r, r
    if "int2_qat_recovered" in r:
        assert r["int2_qat_recovered_ci_low"] <= r["int2_qat_recovered"]
    if "goal_int2_qat_recovered_met" in r:
        assert "int2_qat_recovered" in r and r["int2_ptq_drop_pp"] >= 5.0
    # quantization-aware training must not lose badly to doing nothing at 2 bits
    assert r["qat_8da2w_per_channel_acc"] > r["ptq_8da2w_per_channel_acc"] - 1.0
    assert r["mha_fake_quantized_weight_fraction"] == 0.5  # only the MLP's two Linear layers per block
    # ExecuTorch: ~37 kB of int4 weights and bf16 scales + 23 kB of float parameters + the program
    assert 50_000 < r["et_8da4w_pte_bytes"] < 150_000
    assert r["et_8da4w_size_ratio"] < 0.5
    assert r["et_8da4w_top1_agreement"] >= 98.0   # the 99.5 % goal is judged (MET/MISSED) in the notebook
    assert 0 < r["et_8da4w_over_fp32_latency"] < 20
    assert 0.0 <= r["et_8da4w_vs_fp32_latency_p"] <= 1.0
    # eager PyTorch pays per-op overhead, so it is slower than ExecuTorch; > 20x would be a broken timing
    # (the notebook prints a warning then), so only a sane range is asserted here
    assert 0.5 < r["eager_fp32_over_et_fp32_latency"] < 1000
    for goal in ("goal_groupwise_bitexact_met", "goal_seeds_met", "goal_et_8da4w_top1_agreement_met"):
        assert r[goal] in (0, 1)
    assert r["goal_seeds_met"] == 0  # 2 seeds: reported as MISSED, not hidden
    for name in ("tinyvit_fp32.pte", "tinyvit_8da4w.pte"):
        assert (papermill_build / "artifacts" / "07_qat_transformers" / name).stat().st_size > 50_000
