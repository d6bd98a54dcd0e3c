"""Checks for 08_qat_at_scale's exercise: what DDP's buffer broadcast does to observers.

The exercise models one activation observer on every rank. Each rank keeps a running
maximum of what it sees (torch's ``MovingAverageMinMaxObserver``): the first batch sets it,
then ``m <- m + c * (batch_max - m)``. With ``broadcast=True`` DDP copies rank 0's buffers to
every rank **at the start of each forward**, before the observers see the batch; observers
stop updating from step ``freeze_at`` on (``None``: never), but the copy goes on.
"""

import torch

from ._common import ExerciseError, call, passed, require_callable


def reference_ranks(batch_max, c, freeze_at, broadcast):
    """Each rank's running max after the last step (float32, like torch's observer buffers).

    ``batch_max[t, r]`` is the largest activation rank ``r`` sees at step ``t``.
    Taught in 08_qat_at_scale.

    >>> x = torch.tensor([[2.0, 4.0], [3.0, 1.0]])
    >>> reference_ranks(x, 0.5, None, broadcast=False)
    tensor([2.5000, 2.5000])
    >>> reference_ranks(x, 0.5, None, broadcast=True)
    tensor([2.5000, 1.5000])
    >>> reference_ranks(x, 0.5, 1, broadcast=True)
    tensor([2., 2.])
    """
    return _simulate(batch_max, c, freeze_at, broadcast)


def _simulate(batch_max, c, freeze_at, broadcast, *, when="before", observe_cmp=None,
              sync="copy", sync_after_freeze=True, init="first"):
    """The reference, and (with other keywords) the typical wrong answers."""
    x = torch.as_tensor(batch_max, dtype=torch.float32)
    steps, ranks = x.shape
    running = torch.full((ranks,), float("-inf")) if init == "first" else torch.zeros(ranks)
    observe_cmp = observe_cmp or (lambda t, at: t < at)

    def sync_now(r):
        if sync == "none":
            return r
        return (r[0] if sync == "copy" else r.mean()).expand(ranks).clone()

    for t in range(steps):
        observing = freeze_at is None or observe_cmp(t, freeze_at)
        do_sync = broadcast and (observing or sync_after_freeze)
        if do_sync and when == "before":
            running = sync_now(running)
        if observing:
            running = torch.where(torch.isinf(running), x[t], running + c * (x[t] - running))
        if do_sync and when == "after":
            running = sync_now(running)
    return running


# (name, keywords for _simulate, hint)
_WRONG = (
    # Three slips return exactly this (rank 0's own trajectory, on every rank): copying rank 0's
    # buffer after the update, copying it once at the end, and giving every rank rank 0's batch.
    # A copy *from* rank 0 never changes rank 0, so no returned value can tell them apart.
    ("after", {"when": "after"},
     "every rank ends with exactly rank 0's value while the observers still learn, as if all ranks "
     "had seen rank 0's batches. Three slips give this: copying rank 0's buffer AFTER the update, "
     "copying it only once at the end, or giving every rank rank 0's batch (the data) instead of "
     "its buffer. DDP copies the buffer at the START of every forward, and then each rank updates "
     "it from its OWN batch, so after every step the ranks differ by what that step added"),
    ("ignored", {"sync": "none"},
     "with broadcast=True every rank must start each step from rank 0's value; yours keep their "
     "own running max, as with broadcast=False"),
    ("freeze_late", {"observe_cmp": lambda t, at: t <= at},
     "off by one at the freeze: observers are off AT step freeze_at (update only while t < freeze_at)"),
    ("freeze_early", {"observe_cmp": lambda t, at: t < at - 1},
     "off by one at the freeze: step freeze_at - 1 still updates (update while t < freeze_at)"),
    ("stop_sync", {"sync_after_freeze": False},
     "the broadcast does not stop when observers freeze: DDP copies every buffer of rank 0 at "
     "every forward, frozen or not, so after the freeze all ranks hold rank 0's frozen value"),
    ("average", {"sync": "mean"},
     "DDP does not average buffers across ranks, it copies rank 0's (authoritative rank) to all"),
    ("zero_init", {"init": "zero"},
     "the first observation sets the running max to that batch's max (the buffer starts at "
     "-inf, not 0); only later steps move it by c * (batch_max - m)"),
)


def _cases():
    g = torch.Generator().manual_seed(8)
    two = 1.0 + 4.0 * torch.rand(6, 2, generator=g)
    three = 1.0 + 4.0 * torch.rand(7, 3, generator=g)
    one = 1.0 + 4.0 * torch.rand(5, 1, generator=g)
    return [(two, 0.25, None, True), (two, 0.25, 4, True), (two, 0.25, 4, False),
            (two, 0.25, None, False), (three, 0.1, 5, True), (three, 0.5, None, True),
            (three, 0.5, 3, False),
            # edges: frozen from the start (every buffer keeps -inf), frozen after the first step,
            # a freeze step past the end, c = 1 (the buffer is the last batch's max), one rank
            (two, 0.25, 0, True), (three, 0.3, 1, True), (two, 0.25, 10, True), (two, 1.0, None, True),
            (one, 0.3, 2, True)]


def _as_vector(got, ranks, where):
    if isinstance(got, list | tuple):  # a rank that never observed may be written as None
        got = [float("-inf") if v is None else v for v in got]
    try:
        v = torch.as_tensor(got, dtype=torch.float64).flatten()
    except Exception:
        raise ExerciseError(f"{where}: return one number per rank (a tensor or a list), got "
                            f"{type(got).__name__}") from None
    if v.numel() != ranks:
        raise ExerciseError(f"{where}: return one running max per rank ({ranks} values), got {v.numel()}")
    return v


def _close(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def check_simulate_ranks(simulate_ranks):
    """``simulate_ranks(batch_max, c, freeze_at, broadcast)`` → each rank's final running max.

    Taught in 08_qat_at_scale. Runs seven cases (2 and 3 ranks, with and without broadcast and
    freezing) against :func:`reference_ranks`; a wrong answer that matches a typical mistake
    gets that mistake's hint, any other one the first case and rank that differ.
    """
    require_callable(simulate_ranks, "simulate_ranks")
    cases = _cases()
    results = []
    for batch_max, c, freeze_at, broadcast in cases:
        where = (f"simulate_ranks(batch_max of shape {tuple(batch_max.shape)}, c={c}, "
                 f"freeze_at={freeze_at}, broadcast={broadcast})")
        got = call(simulate_ranks, where, batch_max.clone(), c, freeze_at, broadcast)
        results.append((where, _as_vector(got, batch_max.shape[1], where)))
    first_bad = next(((i, w, got) for i, (w, got) in enumerate(results)
                      if not _close(got, reference_ranks(*cases[i]))), None)
    if first_bad is None:
        return passed("DDP buffer broadcast and observers")
    for _, keywords, hint in _WRONG:
        if all(_close(got, _simulate(*cases[i], **keywords)) for i, (_, got) in enumerate(results)):
            raise ExerciseError(hint)
    nan = next(((w, got) for w, got in results if torch.isnan(got).any()), None)
    if nan is not None:
        raise ExerciseError(f"{nan[0]} returns NaN ({[round(v, 4) for v in nan[1].tolist()]}). With the buffer "
                            "at its start value -inf, m + c * (batch_max - m) is -inf + inf = NaN: the first "
                            "observation must SET the running max to that batch's max (torch's observer does "
                            "so while its buffer still holds -inf); only later steps move it by "
                            "c * (batch_max - m)")
    i, where, got = first_bad
    want = reference_ranks(*cases[i]).double()
    if torch.isinf(want).all() and torch.isfinite(got).any():
        raise ExerciseError(f"{where}: with freeze_at=0 no observer ever updates, so every rank keeps "
                            f"its start value -inf; yours end at {[round(v, 4) for v in got.tolist()]}. "
                            f"Did you start the buffers from the first batch instead of -inf, or "
                            f"update before testing t < freeze_at?")
    r = int((got - want).abs().argmax())
    raise ExerciseError(f"{where}: rank {r} ends at {float(got[r]):.6g} but should end at "
                        f"{float(want[r]):.6g} (all ranks: yours {[round(v, 4) for v in got.tolist()]}, "
                        f"expected {[round(v, 4) for v in want.tolist()]})")
