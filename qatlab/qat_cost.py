"""What a QAT training step costs next to an fp32 one, and where the extra time goes, on any model.

A QAT step runs the fp32 network plus, for every quantized tensor, an observer (a running
min/max: one reduction) and a fake-quantizer (scale, round, clamp, rescale, and its
straight-through gradient), and, in the PT2E flow, a rewritten conv-BN pattern that folds
the BN scale into the weight before it is fake-quantized and divides it out after the
conv. The extra time per step splits along those switches::

    graph        = t(exported fp32 graph)            - t(fp32 module)
    conv-BN      = t(QAT, observers + fake quant off) - t(exported fp32 graph)
    fake quant   = t(QAT, observers off)              - t(QAT, observers + fake quant off)
    observers    = t(QAT)                             - t(QAT, observers off)

Timings of a busy machine drift, so the variants are **interleaved**: each round times
every variant for a few steps, one after the other, and a ratio is formed within each
round; the median over rounds is the estimate and the spread over rounds its uncertainty
(:func:`interleaved_step_times`, :func:`step_ratio`).
"""

import contextlib
import math
import statistics
import time
from dataclasses import dataclass


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def make_train_step(model, batch, lr=0.01, momentum=0.9):
    """A callable that runs one SGD training step of ``model`` on ``batch = (x, y)``.

    Forward, cross-entropy, backward, ``optimizer.step()``: what one step of QAT or of fp32
    training costs. The model runs in the mode it is in (put it in train mode first).


    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> step = make_train_step(net, (torch.ones(4, 3), torch.tensor([0, 1, 0, 1])))
    >>> before = net.weight.detach().clone(); _ = step(); bool((net.weight != before).any())
    True
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(f"batch must be a pair (x, y), got {type(batch).__name__}")
    x, y = batch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def interleaved_step_times(steps, rounds=5, repeats=2, warmup=1, clock=time.process_time, settle=0):
    """Seconds per call of each step function, measured in interleaved rounds.

    ``steps`` maps a name to a zero-argument callable (one training step). Every callable
    first runs ``warmup`` times untimed; then each of ``rounds`` rounds runs every callable
    ``repeats`` times in a row, in the order given, and records the mean seconds per call;
    with ``settle``, each such block follows ``settle`` untimed calls of the same callable.
    Returns ``{name: [seconds per call in round 1, ..., round rounds]}``.

    ``clock`` is CPU time of this process by default (less disturbed than wall time by other
    programs on a shared machine; with several threads it sums their CPU time). Pass
    ``time.perf_counter`` for wall time.

    >>> times = interleaved_step_times({"a": lambda: None, "b": lambda: None}, rounds=3)
    >>> sorted(times), [len(v) for v in times.values()]
    (['a', 'b'], [3, 3])
    """
    if not isinstance(steps, dict) or not steps:
        raise ValueError(f"steps must be a non-empty dict of name -> callable, got {steps!r}")
    for name, fn in steps.items():
        if not callable(fn):
            raise TypeError(f"steps[{name!r}] must be callable, got {type(fn).__name__}")
    _check_positive_int(rounds, "rounds")
    _check_positive_int(repeats, "repeats")
    for name, value in (("warmup", warmup), ("settle", settle)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(settle):
                fn()
            start = clock()
            for _ in range(repeats):
                fn()
            times[name].append((clock() - start) / repeats)
    return times


@dataclass(frozen=True)
class Ratio:
    """Median over rounds of ``t(num) / t(den)``, with the lowest and highest round."""

    num: str
    den: str
    median: float
    low: float
    high: float
    per_round: tuple

    def __str__(self):
        return (f"{self.num} / {self.den}: {self.median:.2f}x (median of {len(self.per_round)} rounds, "
                f"range {self.low:.2f}-{self.high:.2f})")


def step_ratio(times, num, den):
    """:class:`Ratio` of ``times[num]`` over ``times[den]``, round by round (same round, same load).

    >>> r = step_ratio({"qat": [2.0, 3.0, 2.2], "fp32": [1.0, 1.0, 1.0]}, "qat", "fp32")
    >>> r.median, r.low, r.high
    (2.2, 2.0, 3.0)
    >>> step_ratio({"qat": [1.0]}, "qat", "fp32")
    Traceback (most recent call last):
    ...
    ValueError: no timings named 'fp32'; have: qat
    """
    for name in (num, den):
        if name not in times:
            raise ValueError(f"no timings named {name!r}; have: {', '.join(times)}")
    a, b = times[num], times[den]
    if len(a) != len(b) or not a:
        raise ValueError(f"{num!r} and {den!r} need the same, non-zero number of rounds, got {len(a)} and {len(b)}")
    if any(v <= 0 for v in b):
        raise ValueError(f"timings of {den!r} must be positive, got {b}")
    ratios = tuple(x / y for x, y in zip(a, b))
    return Ratio(num, den, statistics.median(ratios), min(ratios), max(ratios), ratios)


@dataclass(frozen=True)
class Part:
    """One component of the extra time: ``seconds`` per step (median over rounds of the
    within-round difference), as a ``share`` of the whole extra time, and as a ``fraction``
    of the baseline step; ``per_round`` holds the within-round differences themselves."""

    name: str
    seconds: float
    share: float
    fraction: float
    per_round: tuple = ()


def breakdown(times, chain):
    """Split the extra time of the last variant of ``chain`` over the first into parts.

    ``chain`` is ``[(name, variant), ...]`` from the cheapest variant (the baseline, whose
    part name is ignored) to the most expensive; part ``i`` is ``t(variant_i) - t(variant_{i-1})``,
    taken round by round and summarized by the median. ``share`` divides by the median total
    extra time (``t(last) - t(first)``), so shares need not add up to exactly 1.


    >>> t = {"fp32": [1.0, 1.0], "fq": [1.5, 1.7], "qat": [2.0, 2.2]}
    >>> parts = breakdown(t, [("", "fp32"), ("fake quant", "fq"), ("observers", "qat")])
    >>> [(p.name, round(p.seconds, 2), round(p.share, 2)) for p in parts]
    [('fake quant', 0.6, 0.55), ('observers', 0.5, 0.45)]
    >>> [round(d, 2) for d in parts[0].per_round]
    [0.5, 0.7]
    """
    if len(chain) < 2:
        raise ValueError(f"chain needs a baseline and at least one more variant, got {chain!r}")
    for _, variant in chain:
        if variant not in times:
            raise ValueError(f"no timings named {variant!r}; have: {', '.join(times)}")
    base = times[chain[0][1]]
    total = statistics.median([a - b for a, b in zip(times[chain[-1][1]], base)])
    base_median = statistics.median(base)
    parts = []
    for (_, prev), (name, variant) in zip(chain, chain[1:]):
        diffs = tuple(a - b for a, b in zip(times[variant], times[prev]))
        extra = statistics.median(diffs)
        parts.append(Part(name, extra, extra / total if total else math.nan, extra / base_median, diffs))
    return parts


def fake_quantizers(model):
    """The fake-quantize modules of a prepared QAT model (torch.ao's eager ones or torchao's PT2E
    ones): every module with the two switches ``observer_enabled`` and ``fake_quant_enabled``.
    """
    return [m for m in model.modules()
            if hasattr(m, "observer_enabled") and hasattr(m, "fake_quant_enabled")]


@contextlib.contextmanager
def quantizer_switches(model, observers=True, fake_quant=True):
    """Inside the block every fake-quantizer of ``model`` has its observer and its fake
    quantization on or off as asked; on exit each gets its own switches back.

    ``observers=False, fake_quant=False`` leaves a prepared model that computes in float
    (its conv-BN rewrite included).
    """
    for name, value in (("observers", observers), ("fake_quant", fake_quant)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    fqs = fake_quantizers(model)
    if not fqs:
        raise ValueError(f"{type(model).__name__} has no fake-quantizers: prepare it for QAT first")
    saved = [(m, m.observer_enabled.clone(), m.fake_quant_enabled.clone()) for m in fqs]
    try:
        for m in fqs:
            m.observer_enabled.fill_(int(observers))
            m.fake_quant_enabled.fill_(int(fake_quant))
        yield model
    finally:
        for m, obs, fq in saved:
            m.observer_enabled.copy_(obs)
            m.fake_quant_enabled.copy_(fq)


def switched_step(model, step, observers=True, fake_quant=True):
    """``step`` (from :func:`make_train_step`) run with ``model``'s quantizer switches set as asked.

    Lets one prepared model be timed in several configurations, round after round.

    """
    def run():
        with quantizer_switches(model, observers=observers, fake_quant=fake_quant):
            return step()

    return run
