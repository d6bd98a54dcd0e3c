"""The 06_when_qat_pays_off exercise checks pass right answers and explain wrong ones."""

import itertools
import math
import statistics

import pytest

from qatlab import sensitivity as sens
from qatlab.exercises import ExerciseError, check_choose_layers, check_recovered_fraction

# --- exercise 1: recovered fraction with its standard error ------------------------------

def _right(fp32, ptq, qat):
    r = [(q - p) / (f - p) for f, p, q in zip(fp32, ptq, qat)]
    return statistics.mean(r), statistics.stdev(r) / math.sqrt(len(r))


def test_recovered_fraction_right():
    assert check_recovered_fraction(_right) is True
    assert check_recovered_fraction(sens.recovered_fraction_stats) is True


def test_recovered_fraction_of_means():
    def of_means(fp32, ptq, qat):
        m = (statistics.mean(qat) - statistics.mean(ptq)) / (statistics.mean(fp32) - statistics.mean(ptq))
        return m, _right(fp32, ptq, qat)[1]

    with pytest.raises(ExerciseError, match=r"fraction of the \*means\*.*per seed"):
        check_recovered_fraction(of_means)


def test_recovered_fraction_std_instead_of_se():
    def std(fp32, ptq, qat):
        m, se = _right(fp32, ptq, qat)
        return m, se * math.sqrt(len(fp32))

    with pytest.raises(ExerciseError, match=r"standard error should be 0\.0\d+, got 0\.\d+\. That is the standard deviation"):
        check_recovered_fraction(std)


def test_recovered_fraction_population_std():
    def pop(fp32, ptq, qat):
        r = [(q - p) / (f - p) for f, p, q in zip(fp32, ptq, qat)]
        return statistics.mean(r), statistics.pstdev(r) / math.sqrt(len(r))

    with pytest.raises(ExerciseError, match=r"population std \(ddof=0\)"):
        check_recovered_fraction(pop)


def test_recovered_fraction_wrong_denominator():
    def wrong(fp32, ptq, qat):
        r = [(q - p) / (f - q) for f, p, q in zip(fp32, ptq, qat)]
        return statistics.mean(r), statistics.stdev(r) / math.sqrt(len(r))

    with pytest.raises(ExerciseError, match=r"should be 0\.8\d+ .*denominator is the drop PTQ caused"):
        check_recovered_fraction(wrong)


def test_recovered_fraction_percentage():
    with pytest.raises(ExerciseError, match="percentage"):
        check_recovered_fraction(lambda *a: (100 * _right(*a)[0], 100 * _right(*a)[1]))


def test_recovered_fraction_returns_one_number():
    with pytest.raises(ExerciseError, match=r"return a pair \(mean, se\)"):
        check_recovered_fraction(lambda *a: _right(*a)[0])


# --- exercise 2: which layers keep 8 bits ------------------------------------------------

def _best(drops, sizes, budget):
    best = None
    for k in range(len(sizes) + 1):
        for keep in itertools.combinations(sizes, k):
            size = sens.weight_bytes(sizes, {n: 8 if n in keep else 2 for n in sizes})
            if size <= budget:
                key = (sum(d for n, d in drops.items() if n not in keep), size)
                if best is None or key < best[0]:
                    best = (key, set(keep))
    return best[1]


def _greedy(drops, sizes, budget):
    keep = set()
    for n in sorted(drops, key=drops.get, reverse=True):
        if sens.weight_bytes(sizes, {m: 8 if m in keep | {n} else 2 for m in sizes}) <= budget:
            keep.add(n)
    return keep


def test_choose_layers_right():
    assert check_choose_layers(_best) is True
    assert check_choose_layers(sens.choose_high_precision_layers) is True


def test_choose_layers_greedy_is_not_enough():
    with pytest.raises(ExerciseError, match=r"\['big'\].*leaves 4\.10 pp.*\['a', 'b'\].*3\.10 pp.*compare whole sets"):
        check_choose_layers(_greedy)


def test_choose_layers_keeps_the_least_sensitive():
    def least(drops, sizes, budget):
        keep = set()
        for n in sorted(drops, key=drops.get):
            if sens.weight_bytes(sizes, {m: 8 if m in keep | {n} else 2 for m in sizes}) <= budget:
                keep.add(n)
        return keep

    with pytest.raises(ExerciseError, match=r"kept the \*least\* sensitive layers"):
        check_choose_layers(least)


def test_choose_layers_ignores_the_budget():
    with pytest.raises(ExerciseError, match=r"needs \d+ bytes, over the budget by \d+"):
        check_choose_layers(lambda drops, sizes, budget: set(drops))


def test_choose_layers_unknown_names_and_bad_types():
    with pytest.raises(ExerciseError, match=r"\['conv9'\] are not layers"):
        check_choose_layers(lambda drops, sizes, budget: {"conv9"})
    with pytest.raises(ExerciseError, match="return a set"):
        check_choose_layers(lambda drops, sizes, budget: None)
    with pytest.raises(ExerciseError, match="pass the function itself"):
        check_choose_layers(None)
