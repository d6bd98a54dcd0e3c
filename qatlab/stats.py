"""How big a difference in accuracy has to be to mean something.

Taught in 00_start_here; used wherever two models are compared (04 and 06-12).

The tools, from the simplest:

- :func:`accuracy_se`: the binomial standard error of one accuracy measured on
  ``n`` images, ``sqrt(p (1 - p) / n)``. With 1,000 images at 98 % it is 0.44 pp.
- :func:`mcnemar`: two models scored on the **same** images are *paired*: only
  the images where exactly one of them is right carry information. With ``b``
  images where only A is right and ``c`` where only B is right, under "no
  difference" each such image is a fair coin, so ``b ~ Binomial(b + c, 1/2)``;
  the exact two-sided p-value is ``2 * P(X <= min(b, c))`` (capped at 1).
  (McNemar, Psychometrika 1947; the exact binomial form as in Dietterich,
  Neural Computation 1998.)
- :func:`compare_runs` / :func:`welch_t`: accuracies of A and B over several seeds.
  The difference of means, its standard error ``sqrt(s_a**2 / n_a + s_b**2 / n_b)``
  (sample standard deviations over seeds) and Welch's t test with the
  Welch-Satterthwaite degrees of freedom. With 3 seeds a side ``df`` can be as low
  as 2, where ``|t| > 2`` happens by chance 18 % of the time: a fixed "2 SE" rule
  is too weak, so "A beats B" needs ``p < 0.05`` from the t distribution with the
  right ``df`` (Welch, Biometrika 1947).
- :func:`paired_t`: the same seeds (or images) on both sides: the t test on the
  per-seed differences, ``df = n - 1``, with the same ``min_se`` floor as :func:`welch_t`
  (two or three seeds whose differences happen to agree must not claim ``p = 0``);
  :func:`discordant_min_se` computes that floor from the images the two disagree on.
- :func:`tost`: failing to find a difference is not evidence of none. Two one-sided
  tests (Schuirmann 1987) call A and B *equivalent within ±margin* when the
  ``1 - 2 alpha`` confidence interval of the difference lies inside ``±margin``.
- :func:`recovered_fraction_ci`: the fraction of PTQ's accuracy drop that QAT wins
  back, ``(qat - ptq) / (fp32 - ptq)``, with a two-level bootstrap interval that
  covers both sources of noise: which seeds were run, and which test images were
  drawn (Davison & Hinkley 1997, ch. 3.8 on hierarchical data).
- :func:`min_sign_test_p`: the smallest p-value ``n`` seeds can give at all in a
  sign test, ``2 * 0.5**n`` (0.25 for 3 seeds): how many seeds a "wins on every
  seed" claim can rest on.
"""

import math
import numbers
from dataclasses import dataclass


def _as_bools(x, name):
    import torch

    t = torch.as_tensor(x)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-d vector of per-image correctness, "
                         f"got shape {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must hold only True/False (or 0/1), got {t[:5].tolist()}...")
        t = t.bool()
    return t


def accuracy_se(acc_pct, n):
    """Binomial standard error, in percentage points, of an accuracy of ``acc_pct`` % on ``n`` images.

    >>> round(accuracy_se(98.0, 1000), 3)
    0.443
    >>> accuracy_se(101, 1000)
    Traceback (most recent call last):
    ...
    ValueError: acc_pct must be a percentage in [0, 100], got 101
    """
    if not isinstance(acc_pct, int | float) or isinstance(acc_pct, bool) or not 0 <= acc_pct <= 100:
        raise ValueError(f"acc_pct must be a percentage in [0, 100], got {acc_pct!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    p = acc_pct / 100
    return 100 * math.sqrt(p * (1 - p) / n)


@dataclass(frozen=True)
class McNemar:
    """Result of :func:`mcnemar`: ``only_a`` / ``only_b`` right, the exact two-sided ``p_value``."""

    only_a: int
    only_b: int
    p_value: float

    @property
    def significant(self):
        """``p_value < 0.05``."""
        return self.p_value < 0.05

    def __str__(self):
        verdict = "a real difference" if self.significant else "no difference detected"
        images = "image" if self.only_a == 1 else "images"
        return (f"McNemar: {self.only_a} {images} only A gets right, {self.only_b} only B; "
                f"exact p = {self.p_value:.3g} -> {verdict} (at 5 %)")


def mcnemar(correct_a, correct_b):
    """Exact McNemar test of two models' per-image correctness on the same images.

    ``correct_a`` and ``correct_b`` are boolean vectors (``logits.argmax(1) == labels``).

    >>> import torch
    >>> a = torch.tensor([True] * 90 + [False] * 10)
    >>> b = torch.tensor([True] * 80 + [False] * 20)
    >>> r = mcnemar(a, b); (r.only_a, r.only_b, round(r.p_value, 4))
    (10, 0, 0.002)
    >>> mcnemar(a, a).p_value
    1.0
    """
    a, b = _as_bools(correct_a, "correct_a"), _as_bools(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must score the same images, "
                         f"got {a.numel()} and {b.numel()}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return McNemar(only_a, only_b, sign_test_p(only_a, only_b))


def sign_test_p(wins_a, wins_b):
    """Exact two-sided sign test: ``p = min(1, 2 * P(X <= min(a, b)))``, ``X ~ Binomial(a + b, 1/2)``.

    ``wins_a`` / ``wins_b`` count the pairs each side won (ties left out). McNemar's test is this
    test on the images exactly one model gets right; :func:`qatlab.deploy.compare_speed` uses it
    on timing rounds.

    >>> sign_test_p(10, 0), sign_test_p(9, 1), sign_test_p(0, 0)
    (0.001953125, 0.021484375, 1.0)
    """
    n, k = wins_a + wins_b, min(wins_a, wins_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return min(1.0, 2 * tail)


def _t_sf(t, df):
    """``P(T > t)`` for Student's t with ``df`` degrees of freedom (``df = inf``: normal)."""
    from scipy.stats import t as student_t

    return float(student_t.sf(t, df))


def _t_quantile(q, df):
    from scipy.stats import t as student_t

    return float(student_t.ppf(q, df))


def _as_runs(values, name, at_least=2):
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of per-seed numbers, got {values!r}")
    v = [float(x) for x in values]
    if len(v) < at_least:
        raise ValueError(f"need at least {at_least} runs in {name} to estimate a spread, got {len(v)}")
    if not all(math.isfinite(x) for x in v):
        raise ValueError(f"{name} must hold finite numbers, got {v}")
    return v


def _mean_var(v):
    m = sum(v) / len(v)
    return m, sum((x - m) ** 2 for x in v) / (len(v) - 1)


@dataclass(frozen=True)
class TTest:
    """Result of :func:`welch_t` / :func:`paired_t`: difference ``a - b``, its standard error,
    degrees of freedom, t statistic, two-sided p-value and the ``1 - alpha`` confidence interval."""

    diff: float
    se: float
    df: float
    t: float
    p_value: float
    ci_low: float
    ci_high: float
    alpha: float = 0.05

    @property
    def significant(self):
        """``p_value < alpha``."""
        return self.p_value < self.alpha

    @property
    def a_beats_b(self):
        return self.significant and self.diff > 0

    @property
    def b_beats_a(self):
        return self.significant and self.diff < 0

    def verdict(self, a="A", b="B"):
        """``"A beats B"``, ``"B beats A"`` or ``"no difference detected"`` (never "ties":
        use :func:`tost` for that)."""
        return (f"{a} beats {b}" if self.a_beats_b else f"{b} beats {a}" if self.b_beats_a
                else "no difference detected")

    def __str__(self):
        level = round(100 * (1 - self.alpha))
        return (f"difference {self.diff:+.2f} pp, SE {self.se:.2f} pp, t = {self.t:.2f} "
                f"(df {self.df:.1f}), p = {self.p_value:.3g}, {level} % CI "
                f"[{self.ci_low:+.2f}, {self.ci_high:+.2f}] -> {self.verdict()}")


def _t_result(diff, se, df, alpha):
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if se > 0:
        t = diff / se
        p = min(1.0, 2 * _t_sf(abs(t), df))
        half = _t_quantile(1 - alpha / 2, df) * se
    else:  # no spread at all: any difference is exact, none is no evidence
        t = math.copysign(math.inf, diff) if diff else 0.0
        p, half = (0.0 if diff else 1.0), 0.0
    return TTest(diff, se, df, t, p, diff - half, diff + half, alpha)


def welch_t(acc_a, acc_b, alpha=0.05, min_se=0.0):
    """Welch's two-sample t test of the mean of ``acc_a`` against ``acc_b`` (runs need not pair).

    ``se = sqrt(s_a**2/n_a + s_b**2/n_b)`` (floored at ``min_se``) and Welch-Satterthwaite
    ``df = se**4 / ((s_a**2/n_a)**2/(n_a-1) + (s_b**2/n_b)**2/(n_b-1))``.

    >>> r = welch_t([95.9, 94.8, 96.2], [86.0, 92.0, 80.1])  # 3 vs 3 seeds, unequal spread
    >>> round(r.diff, 2), round(r.df, 1), round(r.p_value, 3), r.verdict()
    (9.6, 2.1, 0.106, 'no difference detected')
    """
    a, b = _as_runs(acc_a, "acc_a"), _as_runs(acc_b, "acc_b")
    min_se = _as_min_se(min_se)
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    ua, ub = va / len(a), vb / len(b)
    se = math.sqrt(ua + ub)
    if se > 0:
        df = (ua + ub) ** 2 / (ua ** 2 / (len(a) - 1) + ub ** 2 / (len(b) - 1))
    else:
        df = float(len(a) + len(b) - 2)
    return _t_result(ma - mb, max(se, min_se), df, alpha)


def _as_min_se(min_se):
    if isinstance(min_se, bool) or not isinstance(min_se, numbers.Real) or not math.isfinite(min_se) \
            or min_se < 0:
        raise ValueError(f"min_se must be a finite number >= 0 (percentage points), got {min_se!r}")
    return float(min_se)


def discordant_min_se(hits_a, hits_b):
    """The image-level floor of a seed-level standard error, in percentage points.

    ``hits_a`` and ``hits_b`` are lists over seeds of per-image correctness on the **same** ``N``
    images. With ``e_j = mean_i(a_ij - b_ij)`` the difference on image ``j`` averaged over the
    ``n`` seeds, the mean accuracy difference is ``100 * mean_j(e_j)``, and sampling the images
    gives it a standard error of about ``100 * sqrt(sum_j e_j**2) / N`` under "no difference"
    (McNemar's variance, over the images the two disagree on; at least one image per seed).
    Seeds that disagree on different images average their noise away: ``sum_j e_j**2 =
    mean(b + c) / n``, the floor ``100 * sqrt(mean(b + c)) / N / sqrt(n)``. Seeds that disagree
    on the same images do not, because the images are shared: ``sum_j e_j**2 = b + c``, the floor
    ``100 * sqrt(b + c) / N``, as for one seed. Taught in 06_when_qat_pays_off and 10_qat_your_own_model.

    >>> import torch
    >>> a = [torch.arange(1000) < 980] * 3
    >>> b = [torch.arange(1000) < 972] * 3          # the same 8 images apart in every seed
    >>> round(discordant_min_se(a, b), 3)          # 100 * sqrt(8) / 1000: three seeds, one image sample
    0.283
    >>> a = [torch.ones(1000, dtype=torch.bool)] * 3
    >>> b = [(torch.arange(1000) // 8) != i for i in range(3)]   # 8 images apart, different ones each seed
    >>> round(discordant_min_se(a, b), 3)          # 100 * sqrt(8) / 1000 / sqrt(3)
    0.163
    """
    a, b = _as_seed_matrix(hits_a, "hits_a"), _as_seed_matrix(hits_b, "hits_b")
    if a.shape != b.shape:
        raise ValueError(f"hits_a and hits_b must be the same seeds x images, got {tuple(a.shape)} and {tuple(b.shape)}")
    n_seeds, n_images = a.shape
    e = (a.double() - b.double()).mean(dim=0)
    return 100 * math.sqrt(max(float((e * e).sum()), 1.0 / n_seeds)) / n_images


def paired_t(acc_a, acc_b, alpha=0.05, min_se=0.0):
    """Paired t test: ``a[i]`` and ``b[i]`` share seed ``i`` (same data order, same images).

    ``d = a - b``, ``se = max(s_d / sqrt(n), min_se)``, ``t = mean(d) / se``, ``df = n - 1``.

    ``min_se`` is a floor on the standard error, as in :func:`welch_t`. With 2 or 3 seeds the
    sample spread ``s_d`` of the differences can come out near 0 by chance (every seed differs
    by the same few images), and then ``t`` explodes although the test images alone make each
    ``d[i]`` uncertain. A floor that covers that image-level noise: with ``N`` test images and
    ``b_i + c_i`` images on which the two models disagree in seed ``i`` (McNemar's discordant
    pairs), each ``d[i]`` has a binomial SE of about ``100 * sqrt(b_i + c_i) / N`` pp under
    "no difference"; the mean over seeds has ``1 / sqrt(n)`` of it only if the seeds disagree on
    different images (they share the test images). :func:`discordant_min_se` computes the floor
    from the per-image correctness, between those two cases. The default 0
    is the textbook test (scipy's ``ttest_rel``).

    >>> r = paired_t([95.6, 94.9, 96.4], [86.0, 85.1, 87.0])
    >>> round(r.diff, 2), r.df, round(r.p_value, 5), r.verdict("QAT", "PTQ")
    (9.6, 2.0, 0.00014, 'QAT beats PTQ')
    >>> r = paired_t([97.3, 97.1, 97.2], [97.1, 96.9, 97.0])  # every seed +0.2 pp: s_d = 0
    >>> r.p_value < 1e-12, r.verdict()  # s_d is 0 up to float round-off
    (True, 'A beats B')
    >>> r = paired_t([97.3, 97.1, 97.2], [97.1, 96.9, 97.0], min_se=100 * 8 ** 0.5 / 1000 / 3 ** 0.5)
    >>> round(r.se, 3), round(r.p_value, 2), r.verdict()  # 8 discordant images a seed, different ones
    (0.163, 0.35, 'no difference detected')
    """
    a, b = _as_runs(acc_a, "acc_a"), _as_runs(acc_b, "acc_b")
    if len(a) != len(b):
        raise ValueError(f"paired runs need the same number of seeds, got {len(a)} and {len(b)}")
    min_se = _as_min_se(min_se)
    md, vd = _mean_var([x - y for x, y in zip(a, b)])
    return _t_result(md, max(math.sqrt(vd / len(a)), min_se), float(len(a) - 1), alpha)


@dataclass(frozen=True)
class Equivalence:
    """Result of :func:`tost`: the difference, its ``1 - 2 alpha`` interval, the margin, the
    TOST p-value (the larger of the two one-sided p-values) and the verdict."""

    diff: float
    ci_low: float
    ci_high: float
    margin: float
    p_value: float
    alpha: float = 0.05

    @property
    def equivalent(self):
        return self.p_value < self.alpha

    def __str__(self):
        level = round(100 * (1 - 2 * self.alpha))
        verdict = (f"equivalent within ±{self.margin:g} pp" if self.equivalent else
                   f"equivalence within ±{self.margin:g} pp not shown")
        return (f"difference {self.diff:+.2f} pp, {level} % CI [{self.ci_low:+.2f}, "
                f"{self.ci_high:+.2f}], TOST p = {self.p_value:.3g} -> {verdict}")


def tost(acc_a, acc_b, margin, paired=True, alpha=0.05, min_se=0.0):
    """Two one-sided t tests of ``|mean(a - b)| < margin`` (Schuirmann 1987).

    ``p = max(P(T > (d + margin) / se), P(T < (d - margin) / se))``; equivalent when
    ``p < alpha``, which is the same as the ``1 - 2 alpha`` interval lying inside ``±margin``.
    ``se`` is :func:`paired_t`'s (or :func:`welch_t`'s with ``paired=False``), floored at
    ``min_se`` as there: without a floor, two or three seeds that happen to agree to the image
    give ``se`` near 0 and "prove" equivalence that the test images cannot support. Pass the
    same floor as the difference test beside it (:func:`discordant_min_se` for paired runs).

    >>> r = tost([97.1, 97.3, 97.2], [97.0, 97.3, 97.1], margin=0.5)
    >>> r.equivalent, round(r.p_value, 4)
    (True, 0.0029)
    >>> r = tost([97.1, 97.3, 97.2], [97.0, 97.3, 97.1], margin=0.5, min_se=0.3)  # image noise of 0.3 pp
    >>> r.equivalent, round(r.p_value, 2)
    (False, 0.14)
    >>> tost([97.1, 97.3, 97.2], [97.0, 97.3, 97.1], margin=0.0)
    Traceback (most recent call last):
    ...
    ValueError: margin must be a positive number of percentage points, got 0.0
    """
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not margin > 0 \
            or not math.isfinite(margin):
        raise ValueError(f"margin must be a positive number of percentage points, got {margin!r}")
    r = paired_t(acc_a, acc_b, alpha, min_se=min_se) if paired else welch_t(acc_a, acc_b, alpha, min_se=min_se)
    if r.se > 0:
        p = max(_t_sf((r.diff + margin) / r.se, r.df), 1 - _t_sf((r.diff - margin) / r.se, r.df))
        half = _t_quantile(1 - alpha, r.df) * r.se
    else:
        p, half = (0.0 if abs(r.diff) < margin else 1.0), 0.0
    return Equivalence(r.diff, r.diff - half, r.diff + half, float(margin), p, alpha)


def min_sign_test_p(n):
    """The smallest two-sided p-value a sign test over ``n`` seeds can reach: ``2 * 0.5**n``.

    >>> min_sign_test_p(3), min_sign_test_p(6)
    (0.25, 0.03125)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (seeds), got {n!r}")
    return min(1.0, 2 * 0.5 ** n)


@dataclass(frozen=True)
class Recovered:
    """Result of :func:`recovered_fraction_ci`: the point estimate and its bootstrap interval."""

    estimate: float
    ci_low: float
    ci_high: float
    level: float
    n_boot: int
    undefined: int  # bootstrap replicates where PTQ lost nothing (fraction undefined, dropped)
    items: str = "images"  # what the arms were scored on, and the bootstrap resampled

    def meets(self, goal):
        """Judged on the lower confidence bound: ``ci_low >= goal``."""
        return self.ci_low >= goal

    def __str__(self):
        return (f"recovered {self.estimate:.2f} ({round(100 * self.level)} % CI "
                f"[{self.ci_low:.2f}, {self.ci_high:.2f}], bootstrap over seeds and {self.items})")


def _as_scores(x, name):
    import torch

    t = torch.as_tensor(x)
    if t.dim() != 1 or t.numel() == 0 or not t.dtype.is_floating_point or not bool(t.isfinite().all()):
        raise ValueError(f"{name} must be a non-empty 1-d float vector of finite per-item losses, "
                         f"got {t.dtype} of shape {tuple(t.shape)}")
    return t.double()


def _as_seed_matrix(x, name, losses=False):
    import torch

    runs = [x] if (hasattr(x, "dim") and x.dim() == 1) or (
        isinstance(x, list | tuple) and x and isinstance(x[0], bool | int | float)) else list(x)
    if not runs:
        raise ValueError(f"{name} must hold at least one seed's per-item scores")
    rows = [_as_scores(r, name) if losses else _as_bools(r, name) for r in runs]
    if len({r.numel() for r in rows}) != 1:
        raise ValueError(f"every seed of {name} must score the same items, got sizes "
                         f"{[r.numel() for r in rows]}")
    return torch.stack(rows).double() if losses else torch.stack(rows).float()


def recovered_fraction_ci(fp32, ptq, qat, n_boot=2000, seed=0, level=0.95, lower_is_better=False,
                          items="images", paired_seeds=False):
    """``(qat - ptq) / (fp32 - ptq)`` with a two-level bootstrap interval over seeds and items.

    Each argument is a list over seeds of per-image correctness vectors on the **same** test
    images (a single vector is one seed). One bootstrap replicate draws, for each arm, its seeds
    with replacement, and one set of images with replacement shared by all three arms (the arms
    are paired on images); the accuracy of an arm is the mean over its drawn seeds and images.
    The interval is the percentile interval of the replicates; replicates where PTQ lost nothing
    (``fp32 <= ptq``) have no fraction and are dropped (counted in ``undefined``).

    **Few seeds.** A percentile bootstrap over ``n`` seeds understates the seed-to-seed spread: the
    resampled mean has variance ``(n - 1) / n * s^2 / n`` and normal tails, so its "95 %" interval
    of a mean covers about half the time with 2 seeds and three quarters with 3. Each arm's seed
    level is therefore widened to a t interval's width: the drawn seed mean ``m*`` is replaced by
    ``m + c_n (m* - m)`` (``m``: the mean of all its seeds on the drawn images), with
    ``c_n = t_{n-1} / z * sqrt(n / (n - 1))`` at the interval's level (2.7 for 3 seeds at 95 %,
    9.2 for 2). The image level needs no such factor (1,000 images).

    **Seeds paired across arms** (``paired_seeds=True``): where seed ``i`` of every arm belongs
    to one experiment (the fp32 fine-tune of seed ``i``, the PTQ of that fine-tune and the QAT run
    of seed ``i`` share their data order, 10_qat_your_own_model), a replicate draws one set of
    seed indices for all three arms, as a paired design is resampled; a seed that is hard for
    every arm then moves the numerator and the denominator together. The arms must hold the
    same number of seeds. The default draws each arm's seeds on their own, which suits arms
    whose seeds are unrelated.

    ``lower_is_better=True`` takes per-item **losses** instead (float vectors, e.g. the bits per
    byte of each evaluation window of a language model, 12_qat_language_model): the fraction is
    then ``(ptq - qat) / (ptq - fp32)``, the same formula on the negated scores, and a replicate
    is undefined where PTQ's loss is not above fp32's. ``items`` names what was scored, for
    messages and the printed interval.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> fp32 = torch.rand(1000, generator=g) < 0.98
    >>> ptq = [torch.rand(1000, generator=g) < 0.80 for _ in range(3)]
    >>> qat = [torch.rand(1000, generator=g) < 0.96 for _ in range(3)]
    >>> r = recovered_fraction_ci(fp32, ptq, qat)
    >>> 0.8 < r.estimate < 1.0 and r.ci_low < r.estimate < r.ci_high
    True
    >>> p = recovered_fraction_ci(fp32, ptq, qat, paired_seeds=True)   # one fp32 seed: an error
    Traceback (most recent call last):
    ...
    ValueError: paired_seeds=True needs the same number of seeds in every arm, got fp32 1, ptq 3, qat 3
    >>> bpb = 2.6 + 0.3 * torch.rand(64, generator=g)             # a loss per evaluation window
    >>> r = recovered_fraction_ci(bpb, bpb + 0.5, bpb + 0.1, lower_is_better=True, items="windows")
    >>> round(r.estimate, 6), r.items
    (0.8, 'windows')
    """
    import torch

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}")
    arms = [_as_seed_matrix(x, name, losses=lower_is_better)
            for x, name in ((fp32, "fp32"), (ptq, "ptq"), (qat, "qat"))]
    if lower_is_better:
        arms = [-a for a in arms]   # a loss, negated, is a score: the same formula and the same drops
    n_img = arms[0].shape[1]
    if any(a.shape[1] != n_img for a in arms):
        raise ValueError(f"fp32, ptq and qat must score the same {items}, got "
                         f"{[a.shape[1] for a in arms]}")
    if not isinstance(paired_seeds, bool):
        raise TypeError(f"paired_seeds must be True or False, got {paired_seeds!r}")
    if paired_seeds and len({a.shape[0] for a in arms}) != 1:
        raise ValueError("paired_seeds=True needs the same number of seeds in every arm, got "
                         + ", ".join(f"{name} {a.shape[0]}" for name, a in zip(("fp32", "ptq", "qat"), arms)))
    acc = [a.mean().item() for a in arms]
    if not acc[0] > acc[1]:
        what = (f"fp32 {-acc[0]:.4f}, PTQ {-acc[1]:.4f}" if lower_is_better
                else f"fp32 {100 * acc[0]:.2f} %, PTQ {100 * acc[1]:.2f} %")
        raise ValueError(f"PTQ loses nothing ({what}): there is no drop to recover")
    estimate = (acc[2] - acc[1]) / (acc[0] - acc[1])
    z = _t_quantile((1 + level) / 2, math.inf)   # the normal quantile
    widen = [1.0 if a.shape[0] < 2 else
             _t_quantile((1 + level) / 2, a.shape[0] - 1) / z * math.sqrt(a.shape[0] / (a.shape[0] - 1))
             for a in arms]
    g = torch.Generator().manual_seed(seed)
    boot = []
    for start in range(0, n_boot, 250):  # chunks bound the memory: seeds x chunk x images
        b = min(250, n_boot - start)
        images = torch.randint(0, n_img, (b, n_img), generator=g)
        means = []
        shared = torch.randint(0, arms[0].shape[0], (b, arms[0].shape[0]), generator=g) if paired_seeds else None
        for a, c in zip(arms, widen):
            per_seed = a[:, images].mean(dim=2)  # seeds x b
            pick = shared if paired_seeds else torch.randint(0, a.shape[0], (b, a.shape[0]), generator=g)
            centre = per_seed.mean(dim=0)
            means.append(centre + c * (per_seed.gather(0, pick.T).mean(dim=0) - centre))
        boot.append((means[2] - means[1]) / (means[0] - means[1]).where(means[0] > means[1],
                                                                          torch.tensor(float("nan"))))
    boot = torch.cat(boot)
    ok = boot[~boot.isnan()]
    if ok.numel() < n_boot // 2:
        raise ValueError(f"PTQ's drop is within noise: in {n_boot - ok.numel()} of {n_boot} bootstrap "
                         f"replicates PTQ lost nothing, so the recovered fraction is undefined")
    q = torch.quantile(ok.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Recovered(estimate, q[0].item(), q[1].item(), level, n_boot, n_boot - ok.numel(), items)


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare_runs`: means, difference ``a - b``, its standard error, seeds,
    and Welch's t test (``df``, ``p_value``)."""

    mean_a: float
    mean_b: float
    diff: float
    se: float
    n_a: int
    n_b: int
    df: float = math.inf
    p_value: float = 1.0

    @property
    def a_beats_b(self):
        """Welch's ``p_value < 0.05`` and ``diff > 0``."""
        return self.p_value < 0.05 and self.diff > 0

    @property
    def b_beats_a(self):
        return self.p_value < 0.05 and self.diff < 0

    @property
    def z(self):
        return self.diff / self.se if self.se > 0 else math.copysign(math.inf, self.diff) \
            if self.diff else 0.0

    def __str__(self):
        verdict = ("A beats B" if self.a_beats_b else "B beats A" if self.b_beats_a
                   else "no difference detected")
        return (f"{self.mean_a:.2f} vs {self.mean_b:.2f}: difference {self.diff:+.2f} pp, "
                f"SE {self.se:.2f} pp ({self.n_a} vs {self.n_b} seeds), "
                f"Welch t = {self.z:.2f} (df {self.df:.1f}), p = {self.p_value:.3g} -> {verdict}")


def compare_runs(acc_a, acc_b, min_se=0.0):
    """Compare accuracies of A and B over seeds: difference of means, its standard error, and
    Welch's t test with the right degrees of freedom (see :func:`welch_t`).

    ``se = sqrt(s_a**2 / n_a + s_b**2 / n_b)`` with sample standard deviations
    (``ddof=1``), floored at ``min_se`` (pass e.g. :func:`discordant_min_se` of the per-image
    correctness, so that three identical-looking seeds do not claim infinite precision).
    Needs at least 2 seeds on each side.

    >>> c = compare_runs([96.0, 95.5, 96.1], [85.0, 88.7, 78.5])
    >>> round(c.diff, 2), round(c.se, 2), round(c.df, 1), round(c.p_value, 3), c.a_beats_b
    (11.8, 2.99, 2.0, 0.058, False)
    >>> compare_runs([96.0], [85.0])
    Traceback (most recent call last):
    ...
    ValueError: need at least 2 runs in acc_a to estimate a spread, got 1
    """
    r = welch_t(acc_a, acc_b, min_se=min_se)
    a, b = list(acc_a), list(acc_b)
    return Comparison(sum(map(float, a)) / len(a), sum(map(float, b)) / len(b), r.diff, r.se,
                      len(a), len(b), r.df, r.p_value)


def mean_std(values):
    """``(mean, sample std)`` of a list of numbers (std 0.0 for a single value).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    v = [float(x) for x in values]
    if not v:
        raise ValueError("values must not be empty")
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s
