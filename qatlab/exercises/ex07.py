"""Checks for the exercises of 07_qat_transformers: group-wise scales, and bits per weight.

Each check runs the learner's function on cases chosen to expose the usual
mistakes (a group whose largest magnitude is negative, an all-zero group,
int2, per-channel) and, when an answer differs, says where, by how much and,
when a known mistake reproduces it exactly, which one.
"""

import math

import torch

from ._common import ExerciseError, passed

# ---------------------------------------------------------------------------
# exercise 1: group-wise symmetric scales
# ---------------------------------------------------------------------------


def _scale_cases():
    """(w, bits, group_size): random, negative-dominated groups, int2, an all-zero group, per-channel."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 8, generator=g)
    neg = w.clone()
    neg[:, :4] = -neg[:, :4].abs() * 3 - 0.5      # these groups' largest magnitude is negative
    neg[:, 4:] = neg[:, 4:].abs()                 # ... these are all positive
    zero = torch.randn(3, 8, generator=g)
    zero[1, 4:] = 0.0                             # one all-zero group
    return [
        (w, 4, 4),
        (neg, 4, 4),
        (torch.randn(2, 6, generator=g) * 0.1, 2, 2),
        (zero, 4, 4),
        (torch.randn(3, 16, generator=g), 3, 16),  # group_size = in_features: per-channel
    ]


def _reference_scales(w, bits, group_size):
    from ..groupwise import choose_qparams_groupwise

    return choose_qparams_groupwise(w, bits, group_size)[0]


def _scale_diagnosis(w, bits, group_size, got):
    """Which usual mistake reproduces ``got`` (up to float round-off)? A hint, or ''."""
    from ..groupwise import EPS, weight_qrange

    qmin, qmax = weight_qrange(bits)
    groups = w.reshape(w.shape[0], -1, group_size)
    amax = groups.abs().amax(-1)
    half = (qmax - qmin) / 2
    candidates = [
        (torch.clamp(amax / qmax, min=EPS),
         f"You divided amax by qmax = {qmax}. The symmetric grid puts 0 in the middle of the "
         f"{qmax - qmin} steps from qmin = {qmin} to qmax = {qmax}, so [-amax, amax] spans them: "
         f"scale = 2·amax / (qmax - qmin) = amax / {half:g}"),
        (torch.clamp(amax / (qmax - qmin), min=EPS),
         f"You divided amax by qmax - qmin = {qmax - qmin}: that maps [0, amax] onto the whole grid. "
         f"The symmetric range is [-amax, amax], twice as wide: divide by (qmax - qmin) / 2 = {half:g}"),
        (torch.clamp(amax / (2**bits - 1), min=EPS),
         f"You divided amax by 2**bits - 1 = {2**bits - 1}; the symmetric range [-amax, amax] "
         f"spans (qmax - qmin) = {qmax - qmin} steps, so divide amax by {half:g}"),
        (torch.clamp(torch.clamp(groups.amax(-1), min=0) / half, min=EPS),
         "You used each group's maximum, not its largest magnitude: a group whose most extreme "
         "value is negative gets too small a scale. Use amax = max(|w|) over the group"),
        (amax / half,
         "An all-zero group gets scale 0, and w / 0 is NaN. Floor the scale at "
         "torch.finfo(torch.float32).smallest_normal, as torchao does: torch.clamp(scale, min=eps)"),
        (torch.clamp(amax / half, min=torch.finfo(torch.float32).eps),
         "The floor is torch.finfo(torch.float32).eps (torch's observers' floor); torchao's is "
         "torch.finfo(torch.float32).smallest_normal, so an all-zero group's scale differs"),
    ]
    for alt, hint in candidates:
        if alt.shape == got.shape and torch.allclose(got.double(), alt.double(), rtol=1e-6, atol=0):
            return hint
    return ""


def check_group_scales(group_scales):
    """``group_scales(w, bits, group_size)`` → symmetric per-group scales, shape ``(out, in // group_size)``.

    Taught in 07_qat_transformers. Compared with
    :func:`qatlab.groupwise.choose_qparams_groupwise` (itself bit-exact with
    torchao's ``choose_qparams_affine``) on five weights; the values must agree
    to float32 round-off (relative 1e-6).
    """
    if not callable(group_scales):
        raise ExerciseError(f"pass the function itself, got {type(group_scales).__name__}")
    for w, bits, group_size in _scale_cases():
        want = _reference_scales(w, bits, group_size)
        what = f"group_scales(w of shape {tuple(w.shape)}, bits={bits}, group_size={group_size})"
        got = group_scales(w.clone(), bits, group_size)
        if not isinstance(got, torch.Tensor):
            raise ExerciseError(f"{what} should return a torch.Tensor, got {type(got).__name__}")
        got = got.detach()
        if got.shape != want.shape:
            hint = ""
            if got.numel() == w.shape[0]:
                hint = (" That is one scale per row: split each row into groups of group_size "
                        "consecutive input columns, w.reshape(out, in // group_size, group_size)")
            elif got.numel() == w.numel():
                hint = " That is one value per weight: reduce each group to its largest magnitude"
            elif got.shape == want.shape[::-1] or got.numel() == want.numel():
                hint = (" The groups run along the input dimension (dim 1): group j of row r is "
                        "w[r, j*group_size:(j+1)*group_size]")
            raise ExerciseError(f"{what} returned shape {tuple(got.shape)}, expected "
                                f"{tuple(want.shape)} (out_features, in_features // group_size).{hint}")
        if not torch.isfinite(got).all() or not (got > 0).all():
            bad = (~(torch.isfinite(got) & (got > 0))).nonzero()[0].tolist()
            raise ExerciseError(f"{what}: scale{bad} is {got[tuple(bad)].item()}; every scale must be "
                                f"positive and finite, even for an all-zero group. "
                                + _scale_diagnosis(w, bits, group_size, got))
        close = torch.isclose(got.double(), want.double(), rtol=1e-6, atol=0)
        if not close.all():
            r, j = (~close).nonzero()[0].tolist()
            ratio = got[r, j].item() / want[r, j].item()
            hint = _scale_diagnosis(w, bits, group_size, got)
            raise ExerciseError(f"{what}: scale[{r}, {j}] (row {r}, columns {j * group_size}.."
                                f"{(j + 1) * group_size - 1}) is {got[r, j].item():.6g}, expected "
                                f"{want[r, j].item():.6g} (ratio {ratio:.4g}). {hint}".rstrip())
    return passed("group-wise scales")


# ---------------------------------------------------------------------------
# exercise 2: bits per weight, scales included
# ---------------------------------------------------------------------------

_BITS_CASES = [  # (bits, group_size, in_features, scale_bits)
    (4, 32, 64, 32),
    (4, None, 64, 32),
    (2, 16, 128, 16),
    (8, 64, 128, 32),
    (3, None, 128, 16),
]


def _bits_reference(bits, group_size, in_features, scale_bits):
    return bits + scale_bits / (in_features if group_size is None else group_size)


def _bits_diagnosis(bits, group_size, in_features, scale_bits, got):
    g = in_features if group_size is None else group_size
    n_groups = in_features // g
    candidates = [
        (bits, "The scales are missing: each group of weights also stores one scale"),
        (bits + scale_bits / 8 / g,
         "The scale's size was counted in bytes; scale_bits is already in bits (32 for fp32)"),
        (bits + scale_bits / n_groups,
         f"You divided by the number of groups per row ({n_groups}); one scale is shared by the "
         f"{g} weights of its group, so it adds scale_bits / group_size bits per weight"),
        (bits + scale_bits,
         "That is one scale per weight; a scale is shared by a whole group"),
        (bits + scale_bits / in_features,
         "That is one scale per row (per-channel) even though a group size was given: with groups "
         "there is one scale per group of group_size weights"),
    ]
    if group_size is None:
        candidates.insert(0, (bits + 0.0, "Per-channel (group_size=None) still stores one scale per "
                                          "row, shared by the in_features weights of that row"))
    for alt, hint in candidates:
        if math.isclose(got, alt, rel_tol=1e-9):
            return hint
    return ""


def check_bits_per_weight(bits_per_weight):
    """``bits_per_weight(bits, group_size, in_features, scale_bits=32)`` → storage per weight, in bits.

    Taught in 07_qat_transformers. The answer counts the weight's own bits plus
    its share of its group's scale (symmetric: no zero-point is needed);
    ``group_size=None`` is per-channel (one scale per row of ``in_features``).
    """
    if not callable(bits_per_weight):
        raise ExerciseError(f"pass the function itself, got {type(bits_per_weight).__name__}")
    for bits, group_size, in_features, scale_bits in _BITS_CASES:
        what = (f"bits_per_weight(bits={bits}, group_size={group_size}, in_features={in_features}, "
                f"scale_bits={scale_bits})")
        try:
            got = bits_per_weight(bits, group_size, in_features, scale_bits)
        except TypeError as e:
            if group_size is None:
                raise ExerciseError(f"{what} raised TypeError ({e}): group_size=None means "
                                    f"per-channel, one group per row of in_features weights") from e
            raise
        if not isinstance(got, int | float) or isinstance(got, bool):
            raise ExerciseError(f"{what} should return a number, got {type(got).__name__}")
        want = _bits_reference(bits, group_size, in_features, scale_bits)
        if not math.isclose(got, want, rel_tol=1e-9):
            hint = _bits_diagnosis(bits, group_size, in_features, scale_bits, got)
            raise ExerciseError(f"{what} returned {got:g}, expected {want:g}. {hint}".rstrip())
    return passed("bits per weight")
