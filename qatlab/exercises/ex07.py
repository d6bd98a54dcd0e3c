"""Checks for the exercises of 07_qat_transformers: group-wise scales, and bits per weight.

Each check runs the learner's function on cases chosen to expose the usual
mistakes (a group whose largest magnitude is negative, an all-zero group,
int2, per-channel, a per-channel row whose length does not divide the scale's
bits) and, when an answer differs, says where, by how much and, when a known
mistake reproduces the answer, which one.
"""

import math

import torch

from ._common import ExerciseError, as_number, as_tensor_result, call, passed, require_callable

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
        # a layer-sized case: 5 rows of 96, groups of 32, rows of very different magnitudes
        (torch.randn(5, 96, generator=g) * torch.tensor([[1e-3], [0.1], [1.0], [10.0], [300.0]]), 4, 32),
    ]


def _reference_scales(w, bits, group_size):
    from ..groupwise import choose_qparams_groupwise

    return choose_qparams_groupwise(w, bits, group_size)[0]


def _scale_candidates(w, bits, group_size):
    """``[(tensor, hint)]``: what each usual mistake returns on this case."""
    from ..groupwise import EPS, weight_qrange

    qmin, qmax = weight_qrange(bits)
    out, n = w.shape[0], w.shape[1] // group_size
    groups = w.reshape(out, n, group_size)
    amax = groups.abs().amax(-1)
    half = (qmax - qmin) / 2
    rule = f"scale = amax / ((qmax - qmin) / 2) = amax / {half:g}"

    def floor(s):
        return torch.clamp(s, min=EPS)

    return [
        (floor(amax / qmax),
         f"You divided amax by {qmax} = qmax (or by (qmax - qmin) // 2, which floors {half:g} to "
         f"{qmax}). The symmetric grid puts 0 in the middle of the {qmax - qmin} steps from "
         f"qmin = {qmin} to qmax = {qmax}, so [-amax, amax] spans all of them: {rule}, "
         f"not an integer"),
        (floor(amax / 2 ** (bits - 1)),
         f"You divided amax by {2 ** (bits - 1)} = 2**(bits - 1) = -qmin (or rounded (qmax - qmin) / 2 = "
         f"{half:g} to {2 ** (bits - 1)}). [-amax, amax] spans the {qmax - qmin} steps between qmin and "
         f"qmax, so {rule}, a half-integer"),
        (floor(amax / (qmax - qmin)),
         f"You divided amax by qmax - qmin = {qmax - qmin}: that maps [0, amax] onto the whole grid. "
         f"The symmetric range is [-amax, amax], twice as wide: {rule}"),
        (floor(amax / 2 ** bits),
         f"You divided amax by the number of levels, 2**bits = {2 ** bits}. A grid of {2 ** bits} "
         f"levels has {qmax - qmin} steps, and [-amax, amax] spans them all: {rule}"),
        (floor(torch.clamp(groups.amax(-1), min=0) / half),
         "You used each group's maximum, not its largest magnitude: a group whose most extreme "
         "value is negative gets too small a scale. Use amax = max(|w|) over the group"),
        (floor((torch.clamp(groups.amax(-1), min=0) - torch.clamp(groups.amin(-1), max=0)) / (qmax - qmin)),
         f"That is the asymmetric rule, (max - min) / (qmax - qmin). The symmetric scale comes from "
         f"the largest magnitude alone: {rule}"),
        (floor((groups.amax(-1) - groups.amin(-1)) / (qmax - qmin)),
         f"That is an asymmetric rule, (max - min) / (qmax - qmin). The symmetric scale comes from "
         f"the largest magnitude alone: {rule}"),
        (floor(groups.abs().mean(-1) / half),
         "You used each group's mean magnitude; the scale comes from its largest magnitude, "
         "amax = max(|w|) over the group, so that no weight of the group is clipped"),
        (floor(w.abs().amax(1, keepdim=True) / half).expand(out, n),
         "Every group of a row got the row's scale (per-channel). Each group of group_size "
         "consecutive input columns needs its own amax"),
        (floor(w.reshape(out, group_size, n).abs().amax(1) / half),
         "Your groups are strided: w.reshape(out, group_size, -1) reduced over dim 1 puts columns "
         "j, j + in // group_size, j + 2 * (in // group_size), ... into one group. A group is "
         "group_size consecutive columns: w.reshape(out, in // group_size, group_size), then reduce "
         "the last dimension"),
        (floor(w.reshape(out, group_size, n).abs().amax(-1) / half),
         "You reshaped to (out, group_size, in // group_size) and reduced the last dimension: that "
         "makes group_size groups of in // group_size columns, the two sizes swapped. Reshape to "
         "(out, in // group_size, group_size): in // group_size groups of group_size columns"),
        (amax / half,
         "An all-zero group gets scale 0, and w / 0 is NaN. Floor the scale at "
         "torch.finfo(torch.float32).smallest_normal, as torchao does: torch.clamp(scale, min=eps)"),
        (torch.clamp(amax, min=EPS) / half,
         f"You floored amax before dividing: an all-zero group then gets smallest_normal / {half:g}. "
         f"Floor the scale itself, after the division: torch.clamp(amax / {half:g}, min=eps)"),
        (torch.clamp(amax / half, min=1e-12),
         "An all-zero group's scale must be torchao's floor, torch.finfo(torch.float32).smallest_normal "
         "(about 1.18e-38), not a round number such as 1e-12"),
        (torch.clamp(amax / half, min=1e-8),
         "An all-zero group's scale must be torchao's floor, torch.finfo(torch.float32).smallest_normal "
         "(about 1.18e-38), not a round number such as 1e-8"),
        (torch.clamp(amax / half, min=torch.finfo(torch.float32).eps),
         "The floor is torch.finfo(torch.float32).eps (torch's observers' floor); torchao's is "
         "torch.finfo(torch.float32).smallest_normal, so an all-zero group's scale differs"),
    ]


def _same(got, alt):
    return (alt.shape == got.shape and bool(torch.isfinite(got).all() == torch.isfinite(alt).all())
            and torch.allclose(got.double(), alt.double(), rtol=1e-6, atol=0, equal_nan=True))


def _scale_diagnosis(w, bits, group_size, got):
    """Which usual mistake reproduces ``got`` (up to float round-off)? A hint, or ''."""
    for alt, hint in _scale_candidates(w, bits, group_size):
        if _same(got, alt):
            return hint
    return ""


def _squeezed(shape):
    return tuple(s for s in shape if s != 1)


def check_group_scales(group_scales):
    """``group_scales(w, bits, group_size)`` → symmetric per-group scales, shape ``(out, in // group_size)``.

    Taught in 07_qat_transformers. Compared with
    :func:`qatlab.groupwise.choose_qparams_groupwise` (itself bit-exact with
    torchao's ``choose_qparams_affine``) on five weights; the values must agree
    to float32 round-off (relative 1e-6).
    """
    require_callable(group_scales, "group_scales")
    for w, bits, group_size in _scale_cases():
        want = _reference_scales(w, bits, group_size)
        what = f"group_scales(w of shape {tuple(w.shape)}, bits={bits}, group_size={group_size})"
        got = as_tensor_result(call(group_scales, what, w.clone(), bits, group_size), what)
        if got.is_complex() or got.dtype == torch.bool or not got.is_floating_point():
            raise ExerciseError(f"{what} returned dtype {got.dtype}; scales are floating-point numbers"
                                + (": integer division (//) or an integer dtype truncated them"
                                   if not got.is_floating_point() and got.dtype != torch.bool else ""))
        shape_note = ""
        if got.shape != want.shape:
            expected = f"{what} returned shape {tuple(got.shape)}, expected {tuple(want.shape)} " \
                       f"(out_features, in_features // group_size)."
            if got.numel() == want.numel() and _squeezed(got.shape) == _squeezed(want.shape):
                # the right numbers with a size-1 dimension too many or too few (keepdim=True, squeeze)
                extra = got.dim() > want.dim()
                shape_note = (expected + (" It has an extra dimension of size 1: reduce with amax(-1) "
                                          "without keepdim=True, or .squeeze(-1) the result."
                                          if extra else
                                          " A size-1 dimension is missing: keep one column per group "
                                          "even when a row has a single group (per-channel)."))
                got = got.reshape(want.shape)
            else:
                hint = _scale_diagnosis(w, bits, group_size, got)
                if not hint:
                    if got.numel() == w.shape[0]:
                        hint = ("That is one scale per row: split each row into groups of group_size "
                                "consecutive input columns, w.reshape(out, in // group_size, group_size)")
                    elif got.numel() == w.numel():
                        hint = "That is one value per weight: reduce each group to its largest magnitude"
                    elif got.shape == want.shape[::-1]:
                        hint = ("The groups run along the input dimension (dim 1): group j of row r is "
                                "w[r, j*group_size:(j+1)*group_size]")
                raise ExerciseError(f"{expected} {hint}".rstrip())
        if not torch.isfinite(got).all() or not (got > 0).all():
            bad = (~(torch.isfinite(got) & (got > 0))).nonzero()[0].tolist()
            raise ExerciseError(f"{shape_note} {what}: scale{bad} is {got[tuple(bad)].item()}; every scale "
                                f"must be positive and finite, even for an all-zero group. "
                                f"{_scale_diagnosis(w, bits, group_size, got)}".strip())
        close = torch.isclose(got.double(), want.double(), rtol=1e-6, atol=0)
        if not close.all():
            r, j = (~close).nonzero()[0].tolist()
            ratio = got[r, j].item() / want[r, j].item()
            hint = _scale_diagnosis(w, bits, group_size, got)
            raise ExerciseError(f"{shape_note} {what}: scale[{r}, {j}] (row {r}, columns {j * group_size}.."
                                f"{(j + 1) * group_size - 1}) is {got[r, j].item():.6g}, expected "
                                f"{want[r, j].item():.6g} (ratio {ratio:.4g}). {hint}".strip())
        if shape_note:
            raise ExerciseError(f"{shape_note} The values are right.")
    return passed("group-wise scales")


# ---------------------------------------------------------------------------
# exercise 2: bits per weight, scales included
# ---------------------------------------------------------------------------

_BITS_CASES = [  # (bits, group_size, in_features, scale_bits); no two mistakes give the same answers
    (4, 32, 64, 32),
    (4, None, 64, 32),
    (2, 16, 64, 16),
    (8, 64, 128, 32),
    (3, None, 24, 32),    # 32 / 24 is not a whole number
    (3, None, 48, 16),
]


def _bits_reference(bits, group_size, in_features, scale_bits):
    return bits + scale_bits / (in_features if group_size is None else group_size)


def _bits_candidates(bits, group_size, in_features, scale_bits):
    """``[(value, hint)]``: what each usual mistake returns on one case, with the hint for it."""
    g = in_features if group_size is None else group_size
    n_groups = in_features // g
    per_channel = group_size is None
    right = bits + scale_bits / g
    out = [
        (bits + scale_bits // g,
         f"scale_bits // group_size is integer (floor) division: {scale_bits} // {g} = {scale_bits // g}, "
         f"but {scale_bits} / {g} = {scale_bits / g:g}. Use true division, /"),
        (bits + 32 / g,
         "The answer ignores scale_bits and counts a 32-bit scale every time; with bf16 scales "
         "(scale_bits=16) each scale costs 16 bits. Use the scale_bits argument"),
        (bits + 16 / g,
         "The answer ignores scale_bits and counts a 16-bit scale every time. Use the scale_bits argument"),
        (bits, "The scales are missing: each group of weights also stores one scale"),
        (bits + scale_bits / 8 / g,
         "The scale's size was counted in bytes; scale_bits is already in bits (32 for fp32)"),
        (bits + scale_bits / n_groups,
         f"You divided by the number of groups per row ({n_groups}); one scale is shared by the "
         f"{g} weights of its group, so it adds scale_bits / group_size bits per weight"),
        (bits + scale_bits,
         "That is one scale per weight; a scale is shared by a whole group"),
        (bits + (scale_bits + 8) / g,
         "You counted an int8 zero-point per group: the scheme is symmetric, its zero-point is 0 "
         "everywhere, so no zero-point needs storing"),
        (bits + (scale_bits + 32) / g,
         "You counted a 32-bit zero-point per group: the scheme is symmetric, its zero-point is 0 "
         "everywhere, so no zero-point needs storing"),
        (right if per_channel else bits + scale_bits / in_features,
         "That is one scale per row (per-channel) even though a group size was given: with groups "
         "there is one scale per group of group_size weights"),
        (bits if per_channel else right,
         "Per-channel (group_size=None) still stores one scale per row, shared by the in_features "
         "weights of that row"),
    ]
    return out


def _bits_diagnosis(bits_per_weight, failing):
    """The hint for the mistake that reproduces the learner's answers on every case, or, failing
    that, the only mistake that reproduces the answer on the failing case; else ''."""
    answers = []
    for case in _BITS_CASES:
        try:
            answers.append(as_number(bits_per_weight(*case), ""))
        except Exception:  # noqa: BLE001 - a crash elsewhere only makes that case unusable
            answers.append(None)
    table = [_bits_candidates(*case) for case in _BITS_CASES]
    k = _BITS_CASES.index(failing)
    for m, (_, hint) in enumerate(table[k]):
        if all(a is None or math.isclose(a, table[i][m][0], rel_tol=1e-9) for i, a in enumerate(answers)):
            return hint
    here = {hint for value, hint in table[k] if answers[k] is not None
            and math.isclose(answers[k], value, rel_tol=1e-6)}
    return here.pop() if len(here) == 1 else ""


def check_bits_per_weight(bits_per_weight):
    """``bits_per_weight(bits, group_size, in_features, scale_bits=32)`` → storage per weight, in bits.

    Taught in 07_qat_transformers. The answer counts the weight's own bits plus
    its share of its group's scale (symmetric: no zero-point needs storing);
    ``group_size=None`` is per-channel (one scale per row of ``in_features``).
    A wrong answer is matched against the usual mistakes on all six cases at
    once, so two mistakes that agree on one case are still told apart.
    """
    require_callable(bits_per_weight, "bits_per_weight")
    for case in _BITS_CASES:
        bits, group_size, in_features, scale_bits = case
        what = (f"bits_per_weight(bits={bits}, group_size={group_size}, in_features={in_features}, "
                f"scale_bits={scale_bits})")

        def on_error(e, group_size=group_size):
            if isinstance(e, TypeError) and group_size is None:
                return "group_size=None means per-channel, one group per row of in_features weights"
            return None

        got = call(bits_per_weight, what, bits, group_size, in_features, scale_bits, on_error=on_error)
        got = as_number(got, f"{what} (bits per weight)")
        want = _bits_reference(*case)
        if not math.isclose(got, want, rel_tol=1e-6):
            hint = _bits_diagnosis(bits_per_weight, case)
            raise ExerciseError(f"{what} returned {got:g}, expected {want:g}. {hint}".rstrip())
    return passed("bits per weight")
