"""A small byte-level language model: its corpus, a Llama-style decoder, bits per byte, greedy text.

Taught in 12_qat_language_model.

- :func:`load_corpus`: the ``.py`` sources of this Python's standard library, concatenated
  in sorted file order and cut at ``max_bytes``; every byte is a token (vocabulary 256). The
  text depends on the Python version, so the corpus carries its SHA-256 and version.
- :func:`make_llama`: transformers' ``LlamaForCausalLM`` from a tiny ``LlamaConfig`` (RMSNorm,
  rotary positions, SwiGLU MLP, grouped-query attention), the architecture people fine-tune
  and quantize at full size.
- :func:`bits_per_byte`: the cross-entropy of the next byte in bits,
  ``bpb = mean(-log2 p(x_t | x_<t))``; a perplexity per byte is ``2 ** bpb``.
- :func:`train_lm`: AdamW on random windows, with an optional distillation term
  ``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015).
- :func:`generate_greedy`: append ``argmax p(x_t | x_<t)`` one byte at a time.
- :func:`load_lm_baseline`: the pretrained fp32 model, cached in ``build/checkpoints/``.
"""

import hashlib
import math
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_path, build_dir, locked

VOCAB = 256  # one token per byte value
CORPUS_BYTES = 3_000_000
# the decoder taught in notebook 12: 4 layers, d = 128, 4 query heads sharing 2 key/value heads
LLAMA_SHAPE = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
# the pretraining recipe of the cached baseline (build/checkpoints/llama_bytes.pt)
PRETRAIN = {"steps": 600, "lr": 3e-3, "batch_size": 16, "context": 128, "seed": 0, "warmup": 30}
CHECKPOINT = "llama_bytes.pt"


@dataclass(frozen=True)
class Corpus:
    """Byte tokens of the training and validation text, and where they came from.

    ``train`` and ``val`` are 1-d ``uint8`` tensors; ``val`` is the last ``val_fraction``
    of the concatenated text (other files than most of ``train``). ``sha256`` is the
    hash of the whole text, ``python`` the version whose standard library it is.
    """

    train: torch.Tensor
    val: torch.Tensor
    sha256: str
    python: str
    files: int

    def __repr__(self):
        return (f"Corpus({self.files} files of Python {self.python}'s standard library, "
                f"{len(self.train):,} train + {len(self.val):,} val bytes, sha256 {self.sha256[:12]}…)")


def load_corpus(max_bytes=CORPUS_BYTES, val_fraction=0.05, root=None):
    """The standard library's top-level ``*.py`` files, sorted by name, joined and cut at ``max_bytes``.

    Taught in 12_qat_language_model. ``root`` defaults to this Python's ``stdlib``
    folder. Raises ``ValueError`` when the folder holds fewer bytes than asked.

    >>> c = load_corpus(max_bytes=20_000)
    >>> len(c.train) + len(c.val), c.train.dtype, len(c.sha256)
    (20000, torch.uint8, 64)
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1000:
        raise ValueError(f"max_bytes must be an int >= 1000, got {max_bytes!r}")
    if not isinstance(val_fraction, float) or not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be a float in (0, 0.5), got {val_fraction!r}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    parts, total = [], 0
    for f in files:
        parts.append(f.read_bytes())
        total += len(parts[-1])
        if total >= max_bytes:
            break
    text = b"".join(parts)[:max_bytes]
    if len(text) < max_bytes:
        raise ValueError(f"{root} holds only {len(text):,} bytes of *.py, asked for max_bytes={max_bytes:,}")
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    n_val = int(len(tokens) * val_fraction)
    py = ".".join(str(v) for v in __import__("sys").version_info[:3])
    return Corpus(train=tokens[:-n_val].clone(), val=tokens[-n_val:].clone(),
                  sha256=hashlib.sha256(text).hexdigest(), python=py, files=len(parts))


def make_llama(seed=0, **shape):
    """A fresh ``LlamaForCausalLM`` over bytes (vocabulary 256), untied embeddings, no special tokens.

    Taught in 12_qat_language_model. ``shape`` overrides :data:`LLAMA_SHAPE` (keys of
    ``LlamaConfig``). The default has about 0.8 M parameters.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    unknown = set(shape) - set(LLAMA_SHAPE)
    if unknown:
        raise ValueError(f"unknown shape keys {sorted(unknown)}; allowed: {sorted(LLAMA_SHAPE)}")
    cfg = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, attn_implementation="sdpa", **{**LLAMA_SHAPE, **shape})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class LogitsOnly(nn.Module):
    """``ids -> logits``: a causal LM without caches or output dataclasses, for ``torch.export``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def logits_of(model, ids):
    """Logits ``(batch, time, 256)`` of a transformers causal LM, a :class:`LogitsOnly` or a plain module."""
    out = model(ids) if isinstance(model, LogitsOnly) or not hasattr(model, "config") else \
        model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


def _check_tokens(data, name="data"):
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise TypeError(f"{name} must be a 1-d tensor of byte tokens, got {type(data).__name__}"
                        + (f" of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else ""))


def sample_batch(data, batch_size, context, generator):
    """``(inputs, targets)``, each ``(batch_size, context)`` long: random windows, targets shifted by one."""
    _check_tokens(data)
    if len(data) <= context + 1:
        raise ValueError(f"context {context} needs more than {context + 1} tokens, got {len(data)}")
    start = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
    rows = torch.stack([data[s:s + context + 1] for s in start.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def eval_windows(data, context=128, n_windows=64):
    """``n_windows`` windows of ``context + 1`` tokens, evenly spaced over ``data`` (fixed, no randomness)."""
    _check_tokens(data)
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int, got {n_windows!r}")
    last = len(data) - context - 1
    if last < 0:
        raise ValueError(f"context {context} needs at least {context + 1} tokens, got {len(data)}")
    starts = torch.linspace(0, last, n_windows).round().long().tolist()
    return torch.stack([data[s:s + context + 1] for s in starts]).long()


def bits_per_byte_from_logits(logits, targets):
    """Mean next-byte cross-entropy in bits: ``-mean(log_softmax(logits)[target]) / ln 2``.

    Taught in 12_qat_language_model (its exercise). ``logits`` is ``(..., 256)``,
    ``targets`` the matching integer tokens. Uniform logits give 8 bits:

    >>> round(bits_per_byte_from_logits(torch.zeros(3, 256), torch.tensor([1, 2, 3])).item(), 6)
    8.0
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1).long())
    return nll / math.log(2)


@torch.no_grad()
def bits_per_byte(model, windows, batch_size=32):
    """Bits per byte of every window (a float64 tensor of ``len(windows)`` values), model in eval mode."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    out = []
    for chunk in windows.split(batch_size):
        logits = logits_of(model, chunk[:, :-1]).double()
        nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").mean(1)
        out.append(nll / math.log(2))
    if was_training:
        model.train()
    return torch.cat(out)


def _lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_lm(model, data, steps, lr=3e-3, batch_size=16, context=128, seed=0, warmup=0,
             teacher=None, distill_weight=1.0, temperature=1.0, params=None, progress=None):
    """Train ``model`` for ``steps`` AdamW steps on random windows of ``data``; return the losses.

    Taught in 12_qat_language_model. The learning rate warms up linearly over
    ``warmup`` steps, then follows a cosine to 0. With a ``teacher`` (a model in
    eval mode), the loss is
    ``(1 - w) * CE(student, data) + w * T**2 * KL(p_teacher,T || p_student,T)``
    with ``w = distill_weight`` and ``T = temperature`` (Hinton et al., *Distilling the
    Knowledge in a Neural Network*, 2015). ``params`` restricts what is trained
    (default: every parameter that requires a gradient). The window order depends on
    ``seed`` only, so two runs with one seed see the same data.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight!r}")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        x, y = sample_batch(data, batch_size, context, gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        logits = logits_of(model, x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        if teacher is not None and distill_weight > 0:
            with torch.no_grad():
                t_logits = logits_of(teacher, x)
            kl = F.kl_div(F.log_softmax(logits / temperature, -1).reshape(-1, VOCAB),
                          F.log_softmax(t_logits / temperature, -1).reshape(-1, VOCAB),
                          log_target=True, reduction="batchmean")
            loss = (1 - distill_weight) * loss + distill_weight * temperature ** 2 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
    model.eval()
    return losses


def text_to_ids(text):
    """The bytes of ``text`` (UTF-8) as a ``(1, n)`` long tensor."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.tensor([list(text.encode())], dtype=torch.long)


def ids_to_text(ids):
    """Bytes back to text (invalid UTF-8 replaced)."""
    return bytes(int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()).decode("utf-8", "replace")


@torch.no_grad()
def generate_greedy(step_fn, prompt_ids, new_tokens, window=None):
    """Append ``new_tokens`` greedy bytes to ``prompt_ids`` (``(1, n)``); return the new ones as a list.

    Taught in 12_qat_language_model. ``step_fn(ids) -> logits`` is a model or a
    loaded program. With ``window=W`` every call gets exactly ``W`` tokens, as a
    program with a fixed input shape needs: the sequence is right-padded with 0s
    and the logits are read at the last real position. A causal model's logits at
    position ``t`` depend on tokens ``<= t`` only, so the padding changes nothing;
    a sequence longer than ``W`` keeps its last ``W`` tokens.
    """
    ids = torch.as_tensor(prompt_ids).long().reshape(1, -1)
    out = []
    for _ in range(new_tokens):
        ctx = ids if window is None else ids[:, -window:]
        n = ctx.shape[1]
        if window is not None and n < window:
            ctx = torch.cat([ctx, ctx.new_zeros(1, window - n)], dim=1)
        logits = step_fn(ctx)
        logits = logits.logits if hasattr(logits, "logits") else logits
        nxt = int(torch.as_tensor(logits)[0, n - 1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out


def _pretrain_recipe(overrides):
    """:data:`PRETRAIN` with ``overrides``; an unknown key is a ``ValueError`` naming it."""
    unknown = set(overrides) - set(PRETRAIN)
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)}; allowed: {sorted(PRETRAIN)}")
    return {**PRETRAIN, **overrides}


def checkpoint_path(**recipe):
    """``build/checkpoints/llama_bytes.pt`` for :data:`PRETRAIN`; another file for another recipe.

    A recipe that overrides :data:`PRETRAIN` (a cheaper pretraining for tests) gets a file of
    its own, ``llama_bytes-<8 hex digits of its hash>.pt``, so it never replaces the cached
    baseline of the default recipe.

    >>> checkpoint_path().name, checkpoint_path(**PRETRAIN).name
    ('llama_bytes.pt', 'llama_bytes.pt')
    >>> checkpoint_path(steps=20).name != CHECKPOINT
    True
    """
    want = _pretrain_recipe(recipe)
    name = CHECKPOINT
    if want != PRETRAIN:
        digest = hashlib.sha256(repr(sorted(want.items())).encode()).hexdigest()[:8]
        name = f"{Path(CHECKPOINT).stem}-{digest}.pt"
    return build_dir() / "checkpoints" / name


def train_lm_baseline(corpus=None, path=None, progress=None, **recipe):
    """Pretrain :func:`make_llama` with :data:`PRETRAIN` (overridden by ``recipe``), save it atomically."""
    rec = _pretrain_recipe(recipe)
    corpus = corpus or load_corpus()
    model = make_llama(seed=rec["seed"])
    losses = train_lm(model, corpus.train, rec["steps"], lr=rec["lr"], batch_size=rec["batch_size"],
                      context=rec["context"], seed=rec["seed"], warmup=rec["warmup"], progress=progress)
    bpb = bits_per_byte(model, eval_windows(corpus.val, rec["context"])).mean().item()
    meta = {**rec, "corpus_sha256": corpus.sha256, "python": corpus.python, "val_bpb": bpb,
            "final_loss": losses[-1] if losses else float("nan")}
    path = Path(path or checkpoint_path(**recipe))
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    model.baseline_meta = meta
    return model


def load_lm_baseline(corpus=None, path=None, train_if_missing=True, progress=None, **recipe):
    """The pretrained fp32 byte-level Llama in eval mode, from :func:`checkpoint_path` ``(**recipe)``.

    Taught in 12_qat_language_model. Loaded with ``weights_only=True``. ``recipe``
    overrides :data:`PRETRAIN` (a cheaper pretraining for tests). A missing file, a
    corrupt one, one trained with another recipe, or one trained on another corpus (its
    SHA-256 differs: another Python version) is retrained with a warning, or raises
    ``FileNotFoundError`` / ``ValueError`` when ``train_if_missing=False``.
    """
    want = _pretrain_recipe(recipe)
    corpus = corpus or load_corpus()
    path = Path(path or checkpoint_path(**recipe))
    why = None
    if not path.exists():
        why = f"no checkpoint at {path}"
        if not train_if_missing:
            raise FileNotFoundError(f"{why}; run notebook 12_qat_language_model first")
    else:
        try:
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
            meta = ckpt["meta"]
            if meta.get("corpus_sha256") != corpus.sha256:
                why = (f"checkpoint {path} was trained on another corpus (sha256 "
                       f"{str(meta.get('corpus_sha256'))[:12]}…, this one {corpus.sha256[:12]}…)")
            elif any(meta.get(k) != v for k, v in want.items()):
                why = (f"checkpoint {path} was trained with another recipe "
                       f"({ {k: meta.get(k) for k in want} }, asked for {want})")
            else:
                model = make_llama(seed=meta.get("seed", 0))
                model.load_state_dict(ckpt["state_dict"])
                model.baseline_meta = meta
                return model.eval()
        except Exception as e:  # truncated file, foreign pickle, another shape: all mean "retrain"
            why = f"checkpoint {path} is corrupt or not this model ({type(e).__name__}: {e})"
        if not train_if_missing:
            raise ValueError(why)
    with locked(path):  # another process pretraining the same recipe: wait for it, then load its file
        made_meanwhile = why.startswith("no checkpoint") and path.exists()
        if not made_meanwhile:
            warnings.warn(f"{why}: pretraining the byte-level Llama now", stacklevel=2)
            return train_lm_baseline(corpus, path=path, progress=progress, **recipe).eval()
    return load_lm_baseline(corpus, path=path, train_if_missing=train_if_missing, progress=progress, **recipe)
