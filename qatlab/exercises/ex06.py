"""Checks for 06_when_qat_pays_off's exercises: the recovered fraction with its
uncertainty, and the layers to keep at 8 bits under a size budget."""

import itertools
import math
import statistics

from ._common import ExerciseError, as_number, as_sequence, call, passed, require_callable

# per-seed accuracies (%) of one comparison: fp32 fine-tuned, PTQ and QAT, paired by seed
_RECOVERY_CASES = (
    ([97.9, 97.8, 97.9], [85.0, 68.7, 72.0], [95.7, 94.2, 96.2]),
    ([96.0, 96.4, 95.8, 96.1], [80.0, 90.0, 70.0, 85.0], [94.0, 95.0, 93.0, 92.0]),
    # QAT above fp32 in one seed (r > 1) and below PTQ in another (r < 0): no clipping to [0, 1]
    ([97.0, 96.5, 97.2], [90.0, 93.5, 88.0], [97.5, 93.0, 95.0]),
    # two seeds (one degree of freedom) and five
    ([98.0, 97.0], [60.0, 95.0], [90.0, 96.0]),
    ([95.0, 95.5, 94.8, 95.2, 95.1], [50.0, 60.0, 55.0, 52.5, 58.0], [94.0, 70.0, 90.0, 93.0, 80.0]),
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
    require_callable(recovered_fraction_se, "recovered_fraction_se")
    for fp32, ptq, qat in _RECOVERY_CASES:
        where = f"for {len(fp32)} seeds with fp32 {list(fp32)}, PTQ {list(ptq)}, QAT {list(qat)}"
        got = call(recovered_fraction_se, f"recovered_fraction_se {where}", list(fp32), list(ptq), list(qat))
        mean, se = as_sequence(got, 2, "recovered_fraction_se", names=("mean", "se"))
        mean, se = as_number(mean, f"{where}: mean"), as_number(se, f"{where}: se")
        want_mean, want_se, fractions = _reference_recovery(fp32, ptq, qat)
        n = len(fractions)
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
            elif abs(mean - sum(min(max(r, 0.0), 1.0) for r in fractions) / n) < 1e-6:
                hint = (" You clipped each seed's fraction to [0, 1]. A seed where QAT beats fp32 "
                        "(r > 1) or loses to PTQ (r < 0) is a real measurement of the noise: "
                        "clipping it biases the mean and hides the spread.")
            elif abs(mean - sorted(fractions)[n // 2]) < 1e-6 or abs(mean - statistics.median(fractions)) < 1e-6:
                hint = " That is the median; the exercise asks for the mean over seeds."
            raise ExerciseError(f"{where}: the mean recovered fraction should be {want_mean:.4f} "
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
    # by drop per byte, "b" (2.5 pp for 1,002 bytes more) looks better than "a" (10 pp for 6,000),
    # and after "b" "a" no longer fits
    ({"a": 10.0, "b": 2.5, "c": 0.3},
     {"a": (8000, 16), "b": (1336, 16), "c": (400, 4)}, 2000 + 64 + 334 + 64 + 100 + 16 + 6000 + 50),
    # the best choice needs exactly the budget: it fits (<=, not <)
    ({"p": 1.0, "q": 2.0, "r": 0.1}, {"p": (800, 4), "q": (800, 4), "r": (800, 4)}, 1848),
    # a budget the whole 8-bit model (1,664 bytes) fits: keep every layer; a float budget, as
    # the notebook's 0.6 * W8 bytes
    ({"x": 0.5, "y": 1.5}, {"x": (640, 8), "y": (960, 8)}, 1700.5),
    # the 4-byte scales of 100 channels per layer decide: without them every choice would fit
    # (800 bytes at most); with them only the all-2-bit one does (1,000 bytes; keeping one: 1,300)
    ({"v": 1.0, "w": 3.0}, {"v": (400, 100), "w": (400, 100)}, 1299),
)


def _bytes(sizes, keep, low_bits=2, high_bits=8):
    return sum(math.ceil(n * (high_bits if k in keep else low_bits) / 8) + 4 * ch
               for k, (n, ch) in sizes.items())


def _best(drops, sizes, budget, strict=False, ks=None):
    """((lost, bytes), keep) of the best choice; ``strict`` and ``ks`` give two usual slips."""
    best = None
    for k in (ks if ks is not None else range(len(sizes) + 1)):
        for keep in itertools.combinations(sizes, k):
            size = _bytes(sizes, keep)
            if size < budget or (size == budget and not strict):
                lost = sum(d for n, d in drops.items() if n not in keep)
                key = (round(lost, 9), size)
                if best is None or key < best[0]:
                    best = (key, set(keep))
    return best


def _greedy(sizes, budget, order):
    """Layers taken in ``order`` while they fit: the usual shortcut, which can miss the best set."""
    keep = set()
    for name in order:
        if _bytes(sizes, keep | {name}) <= budget:
            keep.add(name)
    return keep


def _worst(drops, sizes, budget):
    """The fitting set that leaves the LARGEST drop at risk (the objective's sign flipped)."""
    worst = _best({n: -d for n, d in drops.items()}, sizes, budget)
    return None if worst is None else worst[1]


def check_choose_layers(choose_layers):
    """``choose_layers(drops, sizes, budget_bytes)`` → the layers to keep at 8 bits (the rest at 2).

    Taught in 06_when_qat_pays_off. The answer must fit the budget
    (``qatlab.sensitivity.weight_bytes``) and leave the smallest total drop
    (drops treated as additive) among all choices that fit.
    """
    require_callable(choose_layers, "choose_layers")
    for drops, sizes, budget in _CHOICE_CASES:
        where = f"for drops {drops}, sizes {sizes} and a budget of {budget:g} bytes"
        got = call(choose_layers, f"choose_layers {where}", dict(drops), dict(sizes), budget)
        if isinstance(got, str):
            raise ExerciseError(f"{where}: return a set of layer names, got the string {got!r} "
                                f"(set('fc') is {{'f', 'c'}}: wrap one name as {{{got!r}}})")
        try:
            keep = set(got)
        except TypeError:
            raise ExerciseError(f"{where}: return a set (or list) of layer names, got {got!r}") from None
        unknown = sorted(keep - set(sizes))
        if unknown:
            raise ExerciseError(f"{where}: {unknown} are not layers; choose among {sorted(sizes)}")
        (best_lost, best_size), best_keep = _best(drops, sizes, budget)
        size = _bytes(sizes, keep)
        if size > budget:
            no_scales = size - sum(4 * ch for _, ch in sizes.values())
            hint = (" You left out the fp32 scale of each output channel (4 bytes per channel): "
                    "weight_bytes counts them" if no_scales <= budget else
                    " Price each choice with weight_bytes(sizes, bits) and drop the ones that do not fit")
            raise ExerciseError(f"{where}: keeping {sorted(keep)} at 8 bits needs {size} bytes, "
                                f"over the budget by {size - budget:g}.{hint}.")
        lost = sum(d for n, d in drops.items() if n not in keep)
        if lost > best_lost + 1e-9:
            order = sorted(drops, key=drops.get)
            hint = ""
            strict = _best(drops, sizes, budget, strict=True)
            not_all = _best(drops, sizes, budget, ks=range(len(sizes)))
            if best_size == budget and strict is not None and abs(lost - strict[0][0]) < 1e-9:
                hint = (f" {sorted(best_keep)} needs exactly {best_size} bytes, the budget: a choice "
                        f"fits when its size is <= budget_bytes, not < budget_bytes.")
            elif best_keep == set(sizes) and not_all is not None and abs(lost - not_all[0][0]) < 1e-9:
                hint = (" Keeping every layer fits here (the whole 8-bit model is within the budget): "
                        "the candidate sets run from none to all, range(len(sizes) + 1) in "
                        "itertools.combinations.")
            elif keep in (_greedy(sizes, budget, order[::-1]),
                          _greedy(sizes, budget, sorted(drops, key=lambda n: -drops[n] / sizes[n][0]))):
                hint = (" Taking layers one by one, from the most sensitive or by drop per byte, is "
                        "not enough when a big layer uses up the budget: compare whole sets (with a "
                        "few layers there are only 2**n of them, itertools.combinations lists them).")
            elif keep == _greedy(sizes, budget, order) or keep == _worst(drops, sizes, budget):
                hint = (f" You kept the *least* sensitive layers ({sorted(keep)}); keep the ones "
                        f"that lose the most when quantized (order by drop, low to high: {order}).")
            else:
                hint = (" Compare whole sets: with a few layers there are only 2**n of them "
                        "(itertools.combinations lists them); keep the one that fits and leaves the "
                        "smallest sum of drops of the layers NOT kept.")
            raise ExerciseError(f"{where}: your choice {sorted(keep)} ({size} bytes) leaves "
                                f"{lost:.2f} pp at risk, but {sorted(best_keep)} ({best_size} bytes) "
                                f"fits and leaves only {best_lost:.2f} pp.{hint}")
    return passed("layers to keep at 8 bits")
