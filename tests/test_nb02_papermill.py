"""Notebook 02 runs end to end with a second parameter set and records sane metrics."""

import pytest


@pytest.mark.notebook
def test_nb02_observers_runs_with_other_parameters(run_notebook):
    results = run_notebook("02_observers", seed=1, calib_sizes=[1, 2, 8], outlier_layer="block3",
                           outlier_factor=20.0, stream_steps=40)
    for name in ("ptq_int8_acc_minmax", "ptq_int8_acc_histogram"):
        assert 90 < results[name] <= 100, (name, results[name])
    assert results["ptq_int8_acc_per_tensor_weights"] > 80
    assert 90 < results["ptq_int8_acc_minmax_8bit_activations"] <= 100
    assert 0 < results["outlier_sqnr_db_minmax"] < results["outlier_sqnr_db_best"] < 80
    assert results["outlier_sqnr_db_best"] > results["outlier_sqnr_db_minmax"] + 3
