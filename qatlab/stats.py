"""How big a difference in accuracy has to be to mean something.

Taught in 00_start_here; used wherever two models are compared (04, 06-08).

Three tools, from the simplest:

- :func:`accuracy_se`: the binomial standard error of one accuracy measured on
  ``n`` images, ``sqrt(p (1 - p) / n)``. With 1,000 images at 98 % it is 0.44 pp.
- :func:`mcnemar`: two models scored on the **same** images are *paired*: only
  the images where exactly one of them is right carry information. With ``b``
  images where only A is right and ``c`` where only B is right, under "no
  difference" each such image is a fair coin, so ``b ~ Binomial(b + c, 1/2)``;
  the exact two-sided p-value is ``2 * P(X <= min(b, c))`` (capped at 1).
  (McNemar, Psychometrika 1947; the exact binomial form as in Dietterich,
  Neural Computation 1998.)
- :func:`compare_runs`: accuracies of A and B over several seeds. The difference
  of means and its standard error ``sqrt(s_a**2 / n_a + s_b**2 / n_b)`` (sample
  standard deviations over seeds); "A beats B" is claimed only when the difference
  is larger than twice that standard error.
"""

import math
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
        verdict = "a real difference" if self.significant else "within noise"
        return (f"McNemar: {self.only_a} images only A gets right, {self.only_b} only B; "
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
    n, k = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return McNemar(only_a, only_b, min(1.0, 2 * tail))


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare_runs`: means, difference ``a - b``, its standard error, seeds."""

    mean_a: float
    mean_b: float
    diff: float
    se: float
    n_a: int
    n_b: int

    @property
    def a_beats_b(self):
        """``diff > 2 * se``: A is better by more than twice the standard error."""
        return self.diff > 2 * self.se

    @property
    def z(self):
        return self.diff / self.se if self.se > 0 else math.copysign(math.inf, self.diff) \
            if self.diff else 0.0

    def __str__(self):
        verdict = ("A beats B" if self.a_beats_b else
                   "B beats A" if -self.diff > 2 * self.se else "no difference beyond 2 SE")
        return (f"{self.mean_a:.2f} vs {self.mean_b:.2f}: difference {self.diff:+.2f} pp, "
                f"SE {self.se:.2f} pp ({self.n_a} vs {self.n_b} seeds), "
                f"|diff| / SE = {abs(self.z):.2f} -> {verdict}")


def compare_runs(acc_a, acc_b, min_se=0.0):
    """Compare accuracies of A and B over seeds: difference of means and its standard error.

    ``se = sqrt(s_a**2 / n_a + s_b**2 / n_b)`` with sample standard deviations
    (``ddof=1``), floored at ``min_se`` (pass e.g. ``accuracy_se(acc, n) / sqrt(seeds)``
    so that three identical-looking seeds do not claim infinite precision).
    Needs at least 2 seeds on each side.

    >>> c = compare_runs([96.0, 95.5, 96.1], [85.0, 88.7, 78.5])
    >>> round(c.diff, 2), round(c.se, 2), c.a_beats_b
    (11.8, 2.99, True)
    >>> compare_runs([96.0], [85.0])
    Traceback (most recent call last):
    ...
    ValueError: need at least 2 runs on each side to estimate a spread, got 1 and 1
    """
    a, b = [float(v) for v in acc_a], [float(v) for v in acc_b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 runs on each side to estimate a spread, "
                         f"got {len(a)} and {len(b)}")
    if not all(math.isfinite(v) for v in a + b):
        raise ValueError(f"accuracies must be finite numbers, got {a} and {b}")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1)
    se = max(math.sqrt(va / len(a) + vb / len(b)), float(min_se))
    return Comparison(ma, mb, ma - mb, se, len(a), len(b))


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
