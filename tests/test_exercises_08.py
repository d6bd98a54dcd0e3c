"""The 08_qat_at_scale exercise check passes the right answer and names each typical mistake."""

import pytest
import torch
from notebook_solutions import solution
from torch.ao.quantization.observer import MovingAverageMinMaxObserver

from qatlab.exercises import ExerciseError, check_simulate_ranks
from qatlab.exercises.ex08 import reference_ranks


def _solution(batch_max, c, freeze_at, broadcast, *, copy_after=False, copy=True, copy_when_frozen=True,
              observe=lambda t, at: t < at, start=float("-inf")):
    steps, ranks = batch_max.shape
    m = torch.full((ranks,), start)
    for t in range(steps):
        observing = freeze_at is None or observe(t, freeze_at)
        sync = broadcast and copy and (observing or copy_when_frozen)
        if sync and not copy_after:
            m = m[0].repeat(ranks)
        if observing:
            m = torch.where(torch.isinf(m), batch_max[t], m + c * (batch_max[t] - m))
        if sync and copy_after:
            m = m[0].repeat(ranks)
    return m


def test_right_answer_passes():
    assert check_simulate_ranks(_solution) is True


def test_python_floats_pass_too():
    def in_floats(batch_max, c, freeze_at, broadcast):
        rows = batch_max.tolist()
        m = [None] * len(rows[0])
        for t, row in enumerate(rows):
            if broadcast:
                m = [m[0]] * len(m)
            if freeze_at is None or t < freeze_at:
                m = [x if v is None else v + c * (x - v) for v, x in zip(m, row)]
        return m

    assert check_simulate_ranks(in_floats) is True


@pytest.mark.parametrize("kwargs, hint", [
    ({"copy": False}, "yours keep their own running max, as with broadcast=False"),
    ({"observe": lambda t, at: t <= at}, "observers are off AT step freeze_at"),
    ({"observe": lambda t, at: t < at - 1}, "step freeze_at - 1 still updates"),
    ({"copy_when_frozen": False}, "the broadcast does not stop when observers freeze"),
    ({"start": 0.0}, "the first observation sets the running max to that batch's max"),
])
def test_typical_mistakes_get_their_hint(kwargs, hint):
    with pytest.raises(ExerciseError, match=hint.replace("(", r"\(").replace(")", r"\)")):
        check_simulate_ranks(lambda *a: _solution(*a, **kwargs))


def _rank0_batch_for_everyone(batch_max, c, freeze_at, broadcast):
    """Broadcasts the data (rank 0's batch) instead of the buffer."""
    steps, ranks = batch_max.shape
    m = torch.full((ranks,), float("-inf"))
    for t in range(steps):
        seen = batch_max[t, 0].expand(ranks) if broadcast else batch_max[t]
        if freeze_at is None or t < freeze_at:
            m = torch.where(torch.isinf(m), seen, m + c * (seen - m))
    return m


def _copy_once_at_the_end(batch_max, c, freeze_at, broadcast):
    m = _solution(batch_max, c, freeze_at, broadcast=False)
    return m[0].repeat(len(m)) if broadcast else m


@pytest.mark.parametrize("wrong", [lambda *a: _solution(*a, copy_after=True), _rank0_batch_for_everyone,
                                   _copy_once_at_the_end], ids=["copy_after_update", "rank0_batch", "copy_at_end"])
def test_every_rank_on_rank0s_trajectory_gets_the_hint_naming_all_three_slips(wrong):
    """The three slips return the same values (a copy from rank 0 never changes rank 0), so one
    hint names all three."""
    with pytest.raises(ExerciseError, match="AFTER the update.*only once at the end.*rank 0's batch"):
        check_simulate_ranks(wrong)


def test_no_special_first_observation_gives_nan_and_its_hint():
    def no_first_rule(batch_max, c, freeze_at, broadcast):
        steps, ranks = batch_max.shape
        m = torch.full((ranks,), float("-inf"))
        for t in range(steps):
            if broadcast:
                m = m[0].repeat(ranks)
            if freeze_at is None or t < freeze_at:
                m = m + c * (batch_max[t] - m)  # -inf + inf = nan
        return m

    with pytest.raises(ExerciseError, match=r"returns NaN .*the first observation must SET the running max"):
        check_simulate_ranks(no_first_rule)


def test_averaging_instead_of_copying():
    def average(batch_max, c, freeze_at, broadcast):
        steps, ranks = batch_max.shape
        m = torch.full((ranks,), float("-inf"))
        for t in range(steps):
            if broadcast and not torch.isinf(m).any():
                m = m.mean().repeat(ranks)
            if freeze_at is None or t < freeze_at:
                m = torch.where(torch.isinf(m), batch_max[t], m + c * (batch_max[t] - m))
        return m

    with pytest.raises(ExerciseError, match="DDP does not average buffers"):
        check_simulate_ranks(average)


def test_other_wrong_answers_say_where_and_by_how_much():
    with pytest.raises(ExerciseError, match=r"rank \d ends at .* but should end at"):
        check_simulate_ranks(lambda b, c, f, br: b.max(0).values)
    with pytest.raises(ExerciseError, match="one running max per rank \\(2 values\\), got 1"):
        check_simulate_ranks(lambda b, c, f, br: torch.tensor([1.0]))
    with pytest.raises(ExerciseError, match="pass your function itself"):
        check_simulate_ranks(None)


def test_reference_matches_torch_observers_with_ddp_copies():
    """Two torch MovingAverageMinMaxObservers (one per rank) and DDP's rule, applied by hand:
    copy rank 0's buffers into rank 1 at the start of each step; the reference agrees bit for bit."""
    g = torch.Generator().manual_seed(0)
    batch_max = 1.0 + torch.rand(9, 2, generator=g)
    for broadcast, freeze_at in ((True, None), (True, 6), (False, 6)):
        obs = [MovingAverageMinMaxObserver(averaging_constant=0.05) for _ in range(2)]
        for t in range(9):
            if broadcast:
                obs[1].load_state_dict(obs[0].state_dict())
            if freeze_at is None or t < freeze_at:
                for r in range(2):
                    obs[r](torch.tensor([0.0, float(batch_max[t, r])]))
        torch_result = torch.stack([o.max_val for o in obs])
        assert torch.equal(reference_ranks(batch_max, 0.05, freeze_at, broadcast), torch_result)


def test_notebook_solution_passes():
    assert check_simulate_ranks(solution("08_qat_at_scale", "ex08_simulate_ranks")["simulate_ranks"]) is True


def test_started_from_the_first_batch_is_caught_by_the_freeze_at_0_case():
    """Starting every buffer at the first batch's max (not -inf) and looping from t = 1 agrees
    with the reference whenever step 0 observes; only freeze_at=0 tells them apart."""
    def from_first_batch(batch_max, c, freeze_at, broadcast):
        steps, ranks = batch_max.shape
        m = batch_max[0].clone()
        if broadcast:
            m = m[0].repeat(ranks)
            m = batch_max[0].clone()  # rank 0's -inf copied, then each rank's first batch
        for t in range(1, steps):
            if broadcast:
                m = m[0].repeat(ranks)
            if freeze_at is None or t < freeze_at:
                m = m + c * (batch_max[t] - m)
        return m

    with pytest.raises(ExerciseError, match=r"freeze_at=0 no observer ever updates.*-inf"):
        check_simulate_ranks(from_first_batch)


def test_in_place_and_crash_get_hints():
    def in_place(batch_max, c, freeze_at, broadcast):  # keeps each step's running max in batch_max
        m = _solution(batch_max, c, freeze_at, broadcast)
        batch_max[-1] = m
        return batch_max[-1]

    with pytest.raises(ExerciseError, match=r"changed its input \(argument 1\) in place"):
        check_simulate_ranks(in_place)
    with pytest.raises(ExerciseError, match=r"raised TypeError"):
        check_simulate_ranks(lambda batch_max, c, freeze_at, broadcast: batch_max[0] < freeze_at)
