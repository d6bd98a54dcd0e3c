"""Checks for 11_strongest_ptq's exercise: AdaRound's rectified sigmoid and its rounding regularizer."""

import torch

from ._common import ExerciseError, as_number, as_tensor_result, call, passed, require_callable

ZETA, GAMMA = 1.1, -0.1
_V = torch.tensor([-8.0, -3.0, -1.0, -0.25, 0.0, 0.4, 1.0, 2.5, 3.0, 8.0])
_H = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])


def _reference_h(v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _reference_reg(h, beta):
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def check_rectified_sigmoid(rectified_sigmoid):
    """``rectified_sigmoid(v)`` → ``clamp(sigmoid(v) · (ζ - γ) + γ, 0, 1)`` with ζ = 1.1, γ = -0.1.

    Taught in 11_strongest_ptq.
    """
    require_callable(rectified_sigmoid, "rectified_sigmoid")
    got = as_tensor_result(call(rectified_sigmoid, "rectified_sigmoid(v)", _V.clone()), "rectified_sigmoid(v)")
    want = _reference_h(_V)
    if got.shape != want.shape:
        raise ExerciseError(f"rectified_sigmoid(v) should keep v's shape {tuple(want.shape)}, got {tuple(got.shape)}")
    if torch.allclose(got, want, atol=1e-6):
        return passed("rectified_sigmoid")
    where = f"for v = {_V.tolist()}: expected {[round(x, 4) for x in want.tolist()]}, got " \
            f"{[round(x, 4) for x in got.tolist()]}"
    if torch.allclose(got, torch.sigmoid(_V), atol=1e-6):
        hint = ("that is the plain sigmoid: it reaches 0 and 1 only at v = ±inf, so no weight ever settles "
                "exactly on its floor or ceiling. Stretch it to (γ, ζ) = (-0.1, 1.1), then clip to [0, 1]")
    elif torch.allclose(got, torch.sigmoid(_V) * (ZETA - GAMMA) + GAMMA, atol=1e-6):
        hint = "the stretch is right, but values outside [0, 1] are not clipped: clamp the result to [0, 1]"
    elif torch.allclose(got, torch.clamp(torch.sigmoid(_V) * (GAMMA - ZETA) + ZETA, 0, 1), atol=1e-6):
        hint = "ζ and γ are swapped: h must grow with v, sigmoid(v) · (ζ - γ) + γ"
    elif torch.allclose(got, torch.clamp(torch.sigmoid(_V) * ZETA + GAMMA, 0, 1), atol=1e-6):
        hint = "the stretch factor is ζ - γ = 1.2, not ζ: h(0) must be exactly 0.5"
    elif bool(((got == 0) | (got == 1)).all()):
        hint = "that rounds h to 0 or 1: the rectified sigmoid is continuous, the hard decision comes at the end"
    else:
        hint = "compute clamp(sigmoid(v) * (1.1 - (-0.1)) + (-0.1), 0, 1)"
    raise ExerciseError(f"{where}: {hint}")


def check_rounding_regularizer(rounding_regularizer):
    """``rounding_regularizer(h, beta)`` → ``Σ (1 - |2h - 1|^β)`` (one number).

    Taught in 11_strongest_ptq.
    """
    require_callable(rounding_regularizer, "rounding_regularizer")
    for beta in (20.0, 2.0):
        got = as_number(call(rounding_regularizer, f"rounding_regularizer(h, beta={beta:g})", _H.clone(), beta),
                        f"rounding_regularizer(h, beta={beta:g})")
        want = float(_reference_reg(_H, beta))
        if abs(got - want) <= 1e-5 * max(1.0, abs(want)):
            continue
        h = _H
        where = f"for h = {h.tolist()} and beta = {beta:g}: expected {want:.5f}, got {got:.5f}"
        if abs(got - float((2 * h - 1).abs().pow(beta).sum())) < 1e-5:
            hint = ("that is Σ |2h - 1|^β, largest when every h is 0 or 1: minimizing it would push h to 1/2. "
                    "The regularizer is Σ (1 - |2h - 1|^β), zero exactly when every h is 0 or 1")
        elif abs(got - float((1 - (2 * h - 1).abs().pow(beta)).mean())) < 1e-5:
            hint = "that is the mean: AdaRound sums the penalty over every weight of the layer"
        elif abs(got - float((1 - (h - 0.5).abs().pow(beta)).sum())) < 1e-5:
            hint = "|h - 1/2| ranges over [0, 1/2]: scale it to [0, 1] with |2h - 1|"
        elif abs(got - float((1 - (2 * h - 1).abs() ** (1 / beta)).sum())) < 1e-5:
            hint = "the exponent is β, not 1/β"
        else:
            hint = "compute (1 - (2h - 1).abs() ** beta).sum()"
        raise ExerciseError(f"{where}: {hint}")
    return passed("rounding_regularizer")
