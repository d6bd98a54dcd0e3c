"""The 06_when_qat_pays_off exercise checks pass right answers and explain wrong ones."""

import itertools
import math
import statistics

import pytest
from notebook_solutions import solution

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
    with pytest.raises(ExerciseError, match=r"should return \(mean, se\)"):
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
    with pytest.raises(ExerciseError, match="return a set|returned None"):
        check_choose_layers(lambda drops, sizes, budget: None)
    with pytest.raises(ExerciseError, match="pass your function itself"):
        check_choose_layers(None)


# --- the notebook's solutions, other styles, and wrong answers the first cases let through ---

@pytest.mark.parametrize("grade_id, name, check", [
    ("ex06_recovered_fraction", "recovered_fraction_se", check_recovered_fraction),
    ("ex06_choose_layers", "choose_layers", check_choose_layers),
])
def test_notebook_solutions_pass(grade_id, name, check):
    assert check(solution("06_when_qat_pays_off", grade_id)[name]) is True


def test_recovered_fraction_numpy_and_torch_styles_pass():
    import numpy as np
    import torch

    def with_numpy(fp32, ptq, qat):
        r = (np.array(qat) - np.array(ptq)) / (np.array(fp32) - np.array(ptq))
        return np.array([r.mean(), r.std(ddof=1) / np.sqrt(len(r))])

    def with_torch(fp32, ptq, qat):
        r = (torch.tensor(qat) - torch.tensor(ptq)) / (torch.tensor(fp32) - torch.tensor(ptq))
        return r.double().mean(), r.double().std() / len(r) ** 0.5

    assert check_recovered_fraction(with_numpy) is True
    assert check_recovered_fraction(with_torch) is True


def test_recovered_fraction_clipped_to_0_1():
    def clipped(fp32, ptq, qat):
        r = [min(max((q - p) / (f - p), 0.0), 1.0) for f, p, q in zip(fp32, ptq, qat)]
        return statistics.mean(r), statistics.stdev(r) / math.sqrt(len(r))

    with pytest.raises(ExerciseError, match=r"clipped each seed's fraction to \[0, 1\]"):
        check_recovered_fraction(clipped)


def test_recovered_fraction_median():
    def median(fp32, ptq, qat):
        r = [(q - p) / (f - p) for f, p, q in zip(fp32, ptq, qat)]
        return statistics.median(r), statistics.stdev(r) / math.sqrt(len(r))

    with pytest.raises(ExerciseError, match=r"That is the median"):
        check_recovered_fraction(median)


def test_recovered_fraction_slips_get_hints():
    with pytest.raises(ExerciseError, match=r"should return \(mean, se\), got float"):
        check_recovered_fraction(lambda f, p, q: 0.8)
    with pytest.raises(ExerciseError, match=r"raised ZeroDivisionError"):
        check_recovered_fraction(lambda f, p, q: (1 / 0, 0))
    with pytest.raises(ExerciseError, match=r"returned None"):
        check_recovered_fraction(lambda f, p, q: None)


def _exhaustive(drops, sizes, budget, *, fits=lambda size, budget: size <= budget, low=2,
                price=None, ks=None):
    best = None
    for k in (ks if ks is not None else range(len(sizes) + 1)):
        for keep in itertools.combinations(sizes, k):
            bits = {n: 8 if n in keep else low for n in sizes}
            size = price(sizes, bits) if price else sens.weight_bytes(sizes, bits)
            if fits(size, budget):
                lost = sum(d for n, d in drops.items() if n not in keep)
                if best is None or lost < best[0]:
                    best = (lost, set(keep))
    return best[1] if best else set()


def greedy_per_byte(drops, sizes, budget):
    keep = set()
    for n in sorted(sizes, key=lambda n: -drops[n] / sizes[n][0]):
        if sens.weight_bytes(sizes, {m: 8 if m in keep | {n} else 2 for m in sizes}) <= budget:
            keep.add(n)
    return keep


@pytest.mark.parametrize("wrong, hint", [
    (greedy_per_byte, r"by drop per byte, is not enough"),
    (lambda d, s, b: _exhaustive(d, s, b, fits=lambda size, budget: size < budget), r"exactly .* bytes, the budget.*<= budget_bytes"),
    (lambda d, s, b: _exhaustive(d, s, b, ks=range(len(s))), r"Keeping every layer fits here"),
    (lambda d, s, b: _exhaustive(d, s, b, price=lambda sizes, bits: sum(
        math.ceil(n * bits[k] / 8) for k, (n, _) in sizes.items())), r"left out the fp32 scale of each output channel"),
    (lambda d, s, b: "fc", r"got the string 'fc'"),
])
def test_choose_layers_wrong_answers_the_first_cases_let_through(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_choose_layers(wrong)


def test_choose_layers_returns_a_list_or_dict_keys():
    assert check_choose_layers(lambda d, s, b: sorted(_exhaustive(d, s, b))) is True
    assert check_choose_layers(lambda d, s, b: dict.fromkeys(_exhaustive(d, s, b), 8).keys()) is True
