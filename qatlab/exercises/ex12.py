"""Check for the exercise of 12_qat_language_model: bits per byte from a language model's logits.

The learner writes ``bits_per_byte(logits, ids)``: ``logits`` ``(batch, time, 256)`` is what
the model returns for the bytes ``ids`` ``(batch, time)``; position ``t`` predicts byte
``t + 1``, so the answer is ``mean over t < time - 1 of -log2 softmax(logits[:, t])[ids[:, t + 1]]``.
A wrong answer is matched against the usual mistakes on every case at once (natural log,
no shift, shifted the wrong way, a sum, a perplexity, raw logits, the model's entropy), and
the hint names the one that reproduces it.
"""

import math

import torch
import torch.nn.functional as F

from ._common import ExerciseError, passed


def _cases():
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    sharp = torch.randn(2, 9, 256, generator=g) * 4
    sharp[0, 2, 7] += 20                       # one confident prediction
    noisy = torch.randn(3, 5, 256, generator=g)
    ids_b = torch.randint(0, 256, (3, 5), generator=g)
    return [("random logits", torch.randn(2, 9, 256, generator=g), ids),
            ("confident logits", sharp, ids),
            ("another batch", noisy, ids_b)]


def _nll_nats(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1))


def _reference(logits, ids):
    return _nll_nats(logits[:, :-1], ids[:, 1:]).item() / math.log(2)


def _candidates(logits, ids):
    """``[(value, hint)]``: what each usual mistake returns on one case."""
    right_nats = _nll_nats(logits[:, :-1], ids[:, 1:]).item()
    ln2 = math.log(2)
    logp = F.log_softmax(logits.double(), -1)
    n = ids[:, 1:].numel()
    return [
        (right_nats,
         "That is the cross-entropy in nats (natural log, what F.cross_entropy returns). Bits use "
         "log base 2: divide by ln 2"),
        (right_nats / math.log(10),
         "That is the cross-entropy in base-10 digits (log10). Bits use log base 2: divide nats by ln 2"),
        (_nll_nats(logits, ids).item() / ln2,
         "No shift: the logits at position t predict the NEXT byte, ids[:, t + 1]. Score "
         "logits[:, :-1] against ids[:, 1:]"),
        (_nll_nats(logits[:, 1:], ids[:, :-1]).item() / ln2,
         "Shifted the wrong way: logits[:, t] predict ids[:, t + 1], so pair logits[:, :-1] with ids[:, 1:], "
         "not logits[:, 1:] with ids[:, :-1]"),
        (right_nats * n / ln2,
         f"That is the sum over all {n} predicted bytes; bits per byte is the mean"),
        (2 ** (right_nats / ln2),
         "That is the perplexity per byte, 2 ** bpb (= exp of the nats). Bits per byte is the log2 of it"),
        (math.exp(right_nats),
         "That is the perplexity per byte, exp(cross-entropy in nats). Bits per byte is log2 of it"),
        (-logits[:, :-1].double().gather(-1, ids[:, 1:, None]).mean().item() / ln2,
         "The raw logit of the right byte is not a log-probability: normalise first with "
         "log_softmax (or use F.cross_entropy)"),
        (-(logp.exp() * logp)[:, :-1].sum(-1).mean().item() / ln2,
         "That is the entropy of the model's predictions, which ignores which byte came next. "
         "Score the probability the model gave to the actual next byte"),
    ]


def check_bits_per_byte(bits_per_byte):
    """``bits_per_byte(logits, ids)`` → the mean next-byte cross-entropy in bits (a float or 0-d tensor).

    Taught in 12_qat_language_model; the reference is
    :func:`qatlab.lm.bits_per_byte_from_logits` on ``logits[:, :-1]`` and ``ids[:, 1:]``.
    """
    if not callable(bits_per_byte):
        raise ExerciseError(f"pass the function itself, got {type(bits_per_byte).__name__}")
    cases = _cases()
    answers = []
    for name, logits, ids in cases:
        got = bits_per_byte(logits.clone(), ids.clone())
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                raise ExerciseError(f"on the {name} case the answer has shape {tuple(got.shape)}: return one "
                                    f"number, the mean over every predicted byte of every sequence")
            got = got.item()
        if not isinstance(got, int | float) or isinstance(got, bool):
            raise ExerciseError(f"should return a number, got {type(got).__name__}")
        answers.append(float(got))
    for k, (name, logits, ids) in enumerate(cases):
        want = _reference(logits, ids)
        if math.isclose(answers[k], want, rel_tol=1e-5, abs_tol=1e-6):
            continue
        table = [_candidates(lg, i) for _, lg, i in cases]
        hint = ""
        for m, (_, h) in enumerate(table[k]):
            if all(math.isclose(a, table[i][m][0], rel_tol=1e-5, abs_tol=1e-6) for i, a in enumerate(answers)):
                hint = h
                break
        raise ExerciseError(f"on the {name} case you returned {answers[k]:.4f} bits per byte, expected "
                            f"{want:.4f}. {hint}".rstrip())
    return passed("bits per byte")
