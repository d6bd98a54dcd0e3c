"""Checks for 06_when_qat_pays_off's exercises: the recovered fraction with its
uncertainty, and the layers to keep at 8 bits under a size budget."""

import itertools
import math

from ._common import ExerciseError, passed

# per-seed accuracies (%) of one comparison: fp32 fine-tuned, PTQ and QAT, paired by seed
_RECOVERY_CASES = (
    ([97.9, 97.8, 97.9], [85.0, 68.7, 72.0], [95.7, 94.2, 96.2]),
    ([96.0, 96.4, 95.8, 96.1], [80.0, 90.0, 70.0, 85.0], [94.0, 95.0, 93.0, 92.0]),
)


def _reference_recovery(fp32, ptq, qat):
    fractions = [(q - p) / (f - p) for f, p, q in zip(fp32, ptq, qat)]
    n = len(fractions)
    mean = sum(fractions) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in fractions) / (n - 1))
    return mean, std / math.sqrt(n), fractions


def check_recovered_fraction(recovered_fraction_se):
    """``recovered_fraction_se(fp32_accs, ptq_accs, qat_accs)`` → ``(mean, se)`` over seeds.

    Taught in 06_when_qat_pays_off. Per seed ``r = (qat - ptq) / (fp32 - ptq)``;
    then the mean of ``r`` and its standard error ``std(r, ddof=1) / sqrt(n)``.
    """
    if not callable(recovered_fraction_se):
        raise ExerciseError(f"pass the function itself, got {type(recovered_fraction_se).__name__}")
    for fp32, ptq, qat in _RECOVERY_CASES:
        got = recovered_fraction_se(list(fp32), list(ptq), list(qat))
        if not (isinstance(got, tuple | list) and len(got) == 2):
            raise ExerciseError(f"return a pair (mean, se), got {got!r}")
        try:
            mean, se = float(got[0]), float(got[1])
        except (TypeError, ValueError):
            raise ExerciseError(f"return two numbers (mean, se), got {got!r}") from None
        want_mean, want_se, fractions = _reference_recovery(fp32, ptq, qat)
        n = len(fractions)
        where = f"for {n} seeds with fp32 {fp32}, PTQ {ptq}, QAT {qat}"
        if abs(mean - want_mean) > 1e-6:
            of_means = (sum(qat) - sum(ptq)) / (sum(fp32) - sum(ptq))
            hint = ""
            if abs(mean - of_means) < 1e-6:
                hint = (" That is the fraction of the *means*. Each seed's PTQ model comes from that "
                        "seed's fine-tuned model, so compute the fraction per seed, then average.")
            elif abs(mean - 100 * want_mean) < 1e-4:
                hint = " That is a percentage: return a fraction (0.8, not 80)."
            elif abs(mean - sum((q - p) / (f - q) for f, p, q in zip(fp32, ptq, qat) if f != q) / n) < 1e-6:
                hint = " The denominator is the drop PTQ caused, fp32 - PTQ, not fp32 - QAT."
            raise ExerciseError(f"{where}: mean recovered fraction should be {want_mean:.4f} "
                                f"(per seed {[round(r, 4) for r in fractions]}), got {mean:.4f}.{hint}")
        if abs(se - want_se) > 1e-6:
            std1 = want_se * math.sqrt(n)
            std0 = std1 * math.sqrt((n - 1) / n)
            hint = ""
            if abs(se - std1) < 1e-6:
                hint = " That is the standard deviation: the standard error of a mean divides it by sqrt(n)."
            elif abs(se - std0 / math.sqrt(n)) < 1e-6:
                hint = (" You used the population std (ddof=0); with a handful of seeds use the sample "
                        "std (ddof=1), which divides by n - 1.")
            elif abs(se - std0) < 1e-6:
                hint = " That is the population std: use the sample std (ddof=1) and divide by sqrt(n)."
            raise ExerciseError(f"{where}: standard error should be {want_se:.4f}, got {se:.4f}.{hint}")
    return passed("recovered fraction with its standard error")


# (drops in pp when only that layer is at 2 bits, (weights, channels), budget in bytes)
_CHOICE_CASES = (
    ({"conv0": 1.0, "conv1": 2.0, "conv2": 0.5, "fc": 6.0},
     {"conv0": (144, 16), "conv1": (4608, 32), "conv2": (18432, 64), "fc": (10240, 10)}, 21000),
    # greedy by drop keeps "big" (it fits) and then nothing else fits; "a" + "b" lose more together
    ({"big": 3.0, "a": 2.0, "b": 2.0, "c": 0.1},
     {"big": (8000, 8), "a": (4000, 8), "b": (4000, 8), "c": (8000, 8)}, 12200),
    ({"l1": 0.2, "l2": 0.1, "l3": 0.3},
     {"l1": (1000, 4), "l2": (1000, 4), "l3": (1000, 4)}, 900),
)


def _bytes(sizes, keep, low_bits=2, high_bits=8):
    return sum(math.ceil(n * (high_bits if k in keep else low_bits) / 8) + 4 * ch
               for k, (n, ch) in sizes.items())


def _best(drops, sizes, budget):
    best = None
    for k in range(len(sizes) + 1):
        for keep in itertools.combinations(sizes, k):
            size = _bytes(sizes, keep)
            if size <= budget:
                lost = sum(d for n, d in drops.items() if n not in keep)
                key = (round(lost, 9), size)
                if best is None or key < best[0]:
                    best = (key, set(keep))
    return best


def check_choose_layers(choose_layers):
    """``choose_layers(drops, sizes, budget_bytes)`` → the layers to keep at 8 bits (the rest at 2).

    Taught in 06_when_qat_pays_off. The answer must fit the budget
    (``qatlab.sensitivity.weight_bytes``) and leave the smallest total drop
    (drops treated as additive) among all choices that fit.
    """
    if not callable(choose_layers):
        raise ExerciseError(f"pass the function itself, got {type(choose_layers).__name__}")
    for drops, sizes, budget in _CHOICE_CASES:
        got = choose_layers(dict(drops), dict(sizes), budget)
        try:
            keep = set(got)
        except TypeError:
            raise ExerciseError(f"return a set (or list) of layer names, got {got!r}") from None
        where = f"for drops {drops} and a budget of {budget} bytes"
        unknown = sorted(keep - set(sizes))
        if unknown:
            raise ExerciseError(f"{where}: {unknown} are not layers; choose among {sorted(sizes)}")
        (best_lost, best_size), best_keep = _best(drops, sizes, budget)
        size = _bytes(sizes, keep)
        if size > budget:
            raise ExerciseError(f"{where}: keeping {sorted(keep)} at 8 bits needs {size} bytes, "
                                f"over the budget by {size - budget}. Price each choice with "
                                f"weight_bytes(sizes, bits) and drop the ones that do not fit.")
        lost = sum(d for n, d in drops.items() if n not in keep)
        if lost > best_lost + 1e-9:
            order = sorted(drops, key=drops.get)
            hint = ""
            if keep and all(drops[n] <= min(drops[m] for m in set(sizes) - keep) for n in keep) \
                    and keep != set(sizes):
                hint = (f" You kept the *least* sensitive layers ({sorted(keep)}); keep the ones "
                        f"that lose the most when quantized (order by drop, low to high: {order}).")
            else:
                hint = (" Taking layers one by one from the most sensitive is not enough when a big "
                        "layer uses up the budget: compare whole sets (with a few layers there are "
                        "only 2**n of them, itertools.combinations lists them).")
            raise ExerciseError(f"{where}: your choice {sorted(keep)} ({size} bytes) leaves "
                                f"{lost:.2f} pp at risk, but {sorted(best_keep)} ({best_size} bytes) "
                                f"fits and leaves only {best_lost:.2f} pp.{hint}")
    return passed("layers to keep at 8 bits")
