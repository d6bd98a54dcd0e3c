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
    assert c.se < 1e-9 and c.a_beats_b  # zero spread: any difference is exact ...
    c = compare_runs([97.0, 97.0, 97.0], [96.9, 96.9, 96.9], min_se=accuracy_se(97, 1000) / 3 ** 0.5)
    assert not c.a_beats_b  # ... unless the test-set noise floors the standard error
    assert "no difference detected" in str(c)
    assert mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        compare_runs([1.0, float("nan")], [1.0, 2.0])


# --- t tests with the right degrees of freedom, TOST, the recovered fraction's interval ---

from scipy import stats as scipy_stats  # noqa: E402

from qatlab.stats import (  # noqa: E402
    min_sign_test_p,
    paired_t,
    recovered_fraction_ci,
    tost,
    welch_t,
)

RUNS = [([95.9, 94.8, 96.2], [86.0, 92.0, 80.1]), ([97.0, 97.2], [96.1, 96.9]),
        ([90.0, 91.0, 89.5, 92.0], [88.0, 91.5, 90.0, 87.0])]


@pytest.mark.parametrize("a, b", RUNS)
def test_welch_t_is_scipys(a, b):
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    r = welch_t(a, b)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.df == pytest.approx(ref.df, rel=1e-9)
    lo, hi = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == (pytest.approx(lo), pytest.approx(hi))


@pytest.mark.parametrize("a, b", RUNS)
def test_paired_t_is_scipys(a, b):
    ref = scipy_stats.ttest_rel(a, b)
    r = paired_t(a, b)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9) and r.df == len(a) - 1


def test_two_se_rule_is_too_weak_for_three_seeds():
    # |diff| / SE = 2.77 > 2, yet with Welch's df of about 2 this happens by chance 10 % of the time
    c = compare_runs(*RUNS[0])
    assert abs(c.z) > 2 and c.p_value > 0.05 and not c.a_beats_b
    assert "no difference detected" in str(c)


@pytest.mark.parametrize("a, b, margin", [([97.1, 97.3, 97.2], [97.0, 97.3, 97.1], 0.5),
                                          ([97.1, 96.3, 97.9], [97.0, 97.3, 96.1], 0.5),
                                          ([90.0, 91.0, 89.5, 92.0], [88.0, 91.5, 90.0, 87.0], 3.0)])
def test_tost_is_two_one_sided_scipy_tests(a, b, margin):
    d = [x - y for x, y in zip(a, b)]
    p_lower = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    p_upper = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
    r = tost(a, b, margin)
    assert r.p_value == pytest.approx(max(p_lower, p_upper), rel=1e-9)
    assert r.equivalent == (-margin < r.ci_low and r.ci_high < margin)


def test_tost_does_not_call_a_large_noisy_gap_equivalent():
    # a collapsed seed: the mean gap is large and the spread huge; no margin of 1 pp is shown
    r = tost([95.8, 95.7, 16.2], [95.8, 95.7, 95.8], margin=1.0)
    assert not r.equivalent
    with pytest.raises(ValueError, match="margin"):
        tost([1.0, 2.0], [1.0, 2.0], margin=-1)


def test_min_sign_test_p():
    assert min_sign_test_p(3) == 0.25 and min_sign_test_p(5) == 0.0625
    with pytest.raises(ValueError, match="positive int"):
        min_sign_test_p(0)


def _bools(p, n, g):
    return torch.rand(n, generator=g) < p


def test_recovered_fraction_ci_covers_both_noise_sources():
    g = torch.Generator().manual_seed(1)
    fp32 = _bools(0.97, 1000, g)
    ptq = [_bools(0.85, 1000, g) for _ in range(3)]
    qat = [_bools(0.95, 1000, g) for _ in range(3)]
    r = recovered_fraction_ci(fp32, ptq, qat, n_boot=1000)
    assert r.ci_low < r.estimate < r.ci_high
    # seeds that disagree widen the interval over the same images
    qat_spread = [_bools(0.90, 1000, g), _bools(0.95, 1000, g), _bools(0.99, 1000, g)]
    wide = recovered_fraction_ci(fp32, ptq, qat_spread, n_boot=1000)
    assert wide.ci_high - wide.ci_low > r.ci_high - r.ci_low
    # the image-level noise alone: one seed each still has an interval of positive width
    one = recovered_fraction_ci(fp32, ptq[0], qat[0], n_boot=1000)
    assert one.ci_high - one.ci_low > 0.05
    assert one.meets(one.ci_low) and not one.meets(one.ci_low + 1e-9)


def test_recovered_fraction_ci_rejects_bad_input():
    g = torch.Generator().manual_seed(2)
    a = _bools(0.9, 200, g)
    with pytest.raises(ValueError, match="no drop to recover"):
        recovered_fraction_ci(a, a, a)
    with pytest.raises(ValueError, match="same images"):
        recovered_fraction_ci(a, [a[:100]], [a])
    with pytest.raises(ValueError, match="n_boot"):
        recovered_fraction_ci(a, a, a, n_boot=10)


def test_paired_t_min_se_floors_the_standard_error_only_from_below():
    a, b = [97.3, 97.1, 97.2], [97.1, 96.9, 97.0]  # every seed +0.2 pp: s_d is round-off
    assert paired_t(a, b).p_value < 1e-12
    floor = 100 * 8 ** 0.5 / 1000 / 3 ** 0.5  # 8 discordant images of 1,000 per seed, 3 seeds
    r = paired_t(a, b, min_se=floor)
    assert r.se == floor and r.df == 2 and r.diff == pytest.approx(0.2)
    assert r.p_value == pytest.approx(2 * scipy_stats.t.sf(0.2 / floor, 2), rel=1e-9)
    assert not r.significant and r.verdict() == "no difference detected"
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=r.diff, scale=floor)
    assert (r.ci_low, r.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    # a floor below the measured SE changes nothing: the textbook (scipy) test
    for x, y in RUNS:
        ref = paired_t(x, y)
        assert paired_t(x, y, min_se=ref.se / 2) == ref
        assert paired_t(x, y, min_se=2 * ref.se).se == 2 * ref.se


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_t_tests_reject_a_bad_min_se(bad):
    for test in (paired_t, welch_t):
        with pytest.raises(ValueError, match="min_se must be a finite number >= 0"):
            test([1.0, 2.0], [1.5, 2.5], min_se=bad)


def test_recovered_fraction_of_a_loss_identities():
    """lower_is_better: per-window losses (bits per byte), the fraction (ptq - qat) / (ptq - fp32)."""
    import torch

    g = torch.Generator().manual_seed(0)
    fp32 = [torch.rand(40, generator=g) + 2 for _ in range(3)]
    ptq = [f + 1 for f in fp32]
    full = recovered_fraction_ci(fp32, ptq, [f.clone() for f in fp32], n_boot=200, lower_is_better=True)
    none = recovered_fraction_ci(fp32, ptq, [p.clone() for p in ptq], n_boot=200, lower_is_better=True)
    half = recovered_fraction_ci(fp32, ptq, [f + 0.5 for f in fp32], n_boot=200, lower_is_better=True)
    assert full.estimate == pytest.approx(1.0) and none.estimate == pytest.approx(0.0)
    assert half.estimate == pytest.approx(0.5)
    assert half.ci_low < 0.5 < half.ci_high   # seeds are resampled per arm: their spread widens the interval
    # one seed: the windows are shared by the arms, and the same shift in every window leaves no spread
    one = recovered_fraction_ci(fp32[0], ptq[0], fp32[0] + 0.5, n_boot=200, lower_is_better=True)
    assert one.ci_low == pytest.approx(0.5) and one.ci_high == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no drop to recover"):
        recovered_fraction_ci(ptq, fp32, fp32, n_boot=200, lower_is_better=True)
    with pytest.raises(ValueError, match="float vector of finite per-item losses"):   # correctness is not a loss
        recovered_fraction_ci([f > 2.5 for f in fp32], ptq, ptq, lower_is_better=True)
    with pytest.raises(ValueError, match="same windows"):
        recovered_fraction_ci(fp32, ptq, [p[:10] for p in ptq], lower_is_better=True, items="windows")


def test_discordant_min_se_is_the_binomial_noise_of_the_disagreeing_images():
    import torch

    from qatlab.stats import discordant_min_se

    g = torch.Generator().manual_seed(0)
    a = [torch.rand(500, generator=g) < 0.9 for _ in range(3)]
    b = [torch.rand(500, generator=g) < 0.9 for _ in range(3)]
    e = sum(x.double() - y.double() for x, y in zip(a, b)) / 3          # per image, averaged over seeds
    assert discordant_min_se(a, b) == pytest.approx(100 * math.sqrt(float((e * e).sum())) / 500)
    assert discordant_min_se(a, a) == pytest.approx(100 / 500 / math.sqrt(3))   # at least one image
    # the same disagreements in every seed: one image sample, the floor of one seed (seeds do not average it)
    assert discordant_min_se([a[0]] * 3, [b[0]] * 3) == pytest.approx(discordant_min_se([a[0]], [b[0]]))
    assert discordant_min_se([a[0]] * 3, [b[0]] * 3) == pytest.approx(100 * math.sqrt(int((a[0] != b[0]).sum())) / 500)
    # disjoint disagreements: averaged over seeds, 1/sqrt(n) of one seed's
    one = torch.ones(600, dtype=torch.bool)
    apart = [torch.arange(600) // 20 != i for i in range(3)]             # 20 images each, different ones
    assert discordant_min_se([one] * 3, apart) == pytest.approx(100 * math.sqrt(20) / 600 / math.sqrt(3))
    # disagreements that cancel on an image (A right in one seed, B in another) leave no noise there
    x = [torch.tensor([True, False]), torch.tensor([False, True])]
    assert discordant_min_se(x, x[::-1]) == pytest.approx(100 * math.sqrt(0.5) / 2)       # only the 1-image floor
    with pytest.raises(ValueError, match="same seeds x images"):
        discordant_min_se(a, b[:2])


def test_tost_floor_stops_agreeing_seeds_from_proving_equivalence():
    from qatlab.stats import discordant_min_se, tost

    a, b = [97.3, 97.1, 97.2], [97.1, 96.9, 97.0]   # every seed +0.2 pp: s_d = 0
    assert tost(a, b, margin=1.0).p_value < 1e-12   # without a floor: "equivalent" from 3 seeds
    hits_a = [torch.zeros(1000, dtype=torch.bool) for _ in range(3)]
    hits_b = [torch.zeros(1000, dtype=torch.bool) for _ in range(3)]
    for h in hits_a:
        h[:40] = True                                # 40 discordant images a seed
    floor = discordant_min_se(hits_a, hits_b)
    r = tost(a, b, margin=1.0, min_se=floor)
    assert r.p_value > 0.05 and not r.equivalent     # the images alone leave ±0.37 pp of noise per seed
    assert tost(a, b, margin=5.0, min_se=floor).equivalent
    w = tost(a, b, margin=1.0, paired=False, min_se=floor)   # Welch's SE, floored the same way
    assert w.ci_low < w.diff < w.ci_high and w.ci_high - w.ci_low > 1.0


def test_recovered_fraction_ci_widens_the_seed_level_to_a_t_interval():
    """Two seeds whose PTQ accuracies differ by 10 pp: a plain percentile bootstrap over the two seeds
    would keep the PTQ mean within [75, 85] % (r within about [0.67, 0.83]); the t-sized seed level lets
    it range as far as a t interval with 1 degree of freedom does."""
    from qatlab.stats import recovered_fraction_ci

    def hits(k):
        v = torch.zeros(1000, dtype=torch.bool)
        v[:k] = True
        return v

    fp32, ptq, qat = hits(970), [hits(750), hits(850)], [hits(930), hits(930)]
    r = recovered_fraction_ci(fp32, ptq, qat, n_boot=1000, seed=0)
    assert r.estimate == pytest.approx((0.93 - 0.80) / (0.97 - 0.80))
    assert r.ci_high > 0.9 and r.undefined > 0       # PTQ's mean drawn far below and above its two seeds
    same = recovered_fraction_ci(fp32, [hits(800), hits(800)], qat, n_boot=1000, seed=0)
    assert same.ci_high - same.ci_low < 0.2           # seeds that agree: only the images' noise is left


def test_recovered_fraction_ci_paired_seeds_moves_the_arms_together():
    """Seed 1 is harder than seed 0 for every arm, by the same amount, so the fraction of each seed
    is the same (0.8): drawn per arm, the seeds mix an easy QAT with a hard PTQ and widen the interval;
    drawn once for all arms (the paired design), the seeds' shifts cancel in the fraction and the
    interval is far narrower."""
    from qatlab.stats import recovered_fraction_ci

    def hits(k):
        v = torch.zeros(1000, dtype=torch.bool)
        v[:k] = True
        return v

    fp32, ptq, qat = [hits(970), hits(930)], [hits(870), hits(830)], [hits(950), hits(910)]
    apart = recovered_fraction_ci(fp32, ptq, qat, n_boot=1000, seed=0)
    paired = recovered_fraction_ci(fp32, ptq, qat, n_boot=1000, seed=0, paired_seeds=True)
    assert apart.estimate == paired.estimate == pytest.approx(0.8)
    assert paired.ci_low < 0.8 < paired.ci_high
    assert paired.ci_high - paired.ci_low < 0.5 * (apart.ci_high - apart.ci_low)
    with pytest.raises(ValueError, match="same number of seeds in every arm, got fp32 2, ptq 1, qat 2"):
        recovered_fraction_ci(fp32, ptq[:1], qat, paired_seeds=True)
    with pytest.raises(TypeError, match="paired_seeds must be True or False, got 'yes'"):
        recovered_fraction_ci(fp32, ptq, qat, paired_seeds="yes")
