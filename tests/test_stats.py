"""qatlab.stats against scipy's exact binomial test, and its input checks."""

import math

import pytest
import torch
from scipy.stats import binomtest

from qatlab.stats import accuracy_se, compare_runs, mcnemar, mean_std


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (1, 0), (10, 0), (7, 3), (20, 25), (3, 40)])
def test_mcnemar_is_scipys_exact_binomial_test(only_a, only_b):
    both, neither = 50, 5
    a = torch.tensor([True] * both + [True] * only_a + [False] * only_b + [False] * neither)
    b = torch.tensor([True] * both + [False] * only_a + [True] * only_b + [False] * neither)
    r = mcnemar(a, b)
    assert (r.only_a, r.only_b) == (only_a, only_b)
    want = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert math.isclose(r.p_value, want, rel_tol=1e-9)
    assert mcnemar(b, a).p_value == r.p_value  # symmetric


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="same images"):
        mcnemar(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="True/False"):
        mcnemar(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="1-d"):
        mcnemar(torch.ones(2, 2), torch.ones(2, 2))


def test_accuracy_se_and_compare_runs():
    assert accuracy_se(50, 100) == pytest.approx(5.0)
    assert accuracy_se(100, 1000) == 0.0
    with pytest.raises(ValueError, match="n must be a positive int"):
        accuracy_se(90, 0)
    c = compare_runs([97.0, 97.0, 97.0], [96.9, 96.9, 96.9])
    assert c.se < 1e-9 and c.a_beats_b  # zero spread: any difference "beats" ...
    c = compare_runs([97.0, 97.0, 97.0], [96.9, 96.9, 96.9], min_se=accuracy_se(97, 1000) / 3 ** 0.5)
    assert not c.a_beats_b  # ... unless the test-set noise floors the standard error
    assert "no difference beyond 2 SE" in str(c)
    assert mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        compare_runs([1.0, float("nan")], [1.0, 2.0])
