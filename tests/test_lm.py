"""qatlab.lm: the corpus, the byte-level Llama, bits per byte, greedy generation, the cached baseline."""

import hashlib
import math
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from qatlab import lm

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def corpus():
    return lm.load_corpus(max_bytes=50_000)


def test_corpus_is_the_sorted_stdlib_sources_and_its_hash(corpus):
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = b"".join(f.read_bytes() for f in files[:corpus.files])[:50_000]
    assert hashlib.sha256(text).hexdigest() == corpus.sha256
    assert bytes(torch.cat([corpus.train, corpus.val]).tolist()) == text
    assert len(corpus.val) == int(50_000 * 0.05)
    assert lm.load_corpus(max_bytes=50_000).sha256 == corpus.sha256  # deterministic


@pytest.mark.parametrize("kw", [{"max_bytes": 10}, {"max_bytes": 2.5e6}, {"val_fraction": 0.7},
                                {"max_bytes": 10 ** 12}])
def test_corpus_rejects_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        lm.load_corpus(**kw)


def test_make_llama_is_a_gqa_llama_with_untied_embeddings():
    m = lm.make_llama()
    cfg = m.config
    assert type(m).__name__ == "LlamaForCausalLM"
    assert cfg.vocab_size == 256 and not cfg.tie_word_embeddings
    assert m.model.layers[0].self_attn.k_proj.out_features == cfg.hidden_size * cfg.num_key_value_heads // \
        cfg.num_attention_heads
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert 700_000 < sum(p.numel() for p in m.parameters()) < 1_000_000
    with pytest.raises(ValueError, match="hidden"):
        lm.make_llama(hiden_size=3)


def test_bits_per_byte_equals_transformers_loss_in_bits(corpus):
    m = lm.make_llama(seed=1, **TINY).eval()
    w = lm.eval_windows(corpus.val, context=32, n_windows=6)
    with torch.no_grad():
        hf = m(input_ids=w, labels=w).loss.double() / math.log(2)
        logits = lm.logits_of(m, w)
    per_window = lm.bits_per_byte(m, w, batch_size=4)
    assert per_window.shape == (6,)
    assert torch.allclose(per_window.mean(), hf, rtol=1e-6)
    assert torch.allclose(lm.bits_per_byte_from_logits(logits[:, :-1], w[:, 1:]), hf, rtol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        lm.bits_per_byte_from_logits(logits, w[:, 1:])


def test_eval_windows_are_fixed_and_cover_the_text(corpus):
    a, b = lm.eval_windows(corpus.val, 16, 5), lm.eval_windows(corpus.val, 16, 5)
    assert torch.equal(a, b) and a.shape == (5, 17)
    assert torch.equal(a[-1], corpus.val[-17:].long())
    with pytest.raises(TypeError):
        lm.eval_windows([1, 2, 3], 2, 1)
    with pytest.raises(ValueError, match="n_windows"):
        lm.eval_windows(corpus.val, 16, 0)


def test_greedy_generation_equals_transformers_generate_with_and_without_a_window():
    m = lm.make_llama(seed=2, **TINY).eval()
    prompt = lm.text_to_ids("import os\n")
    ours = lm.generate_greedy(m, prompt, 12)
    hf = m.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert ours == hf
    padded = lm.generate_greedy(lm.LogitsOnly(m), prompt, 12, window=prompt.shape[1] + 12)
    assert padded == ours
    assert lm.ids_to_text(lm.text_to_ids("héllo")) == "héllo"
    with pytest.raises(TypeError):
        lm.text_to_ids(b"bytes")


def test_train_lm_is_deterministic_per_seed_and_distills(corpus):
    runs = []
    for _ in range(2):
        m = lm.make_llama(seed=0, **TINY)
        runs.append(lm.train_lm(m, corpus.train, 3, batch_size=2, context=16, seed=5))
    assert runs[0] == runs[1] and all(math.isfinite(x) for x in runs[0])
    teacher = lm.make_llama(seed=0, **TINY).eval()
    student = lm.make_llama(seed=0, **TINY)
    # student == teacher: the KL term is 0 at the first step, so pure distillation starts at loss 0
    kd = lm.train_lm(student, corpus.train, 1, batch_size=2, context=16, seed=5, teacher=teacher, distill_weight=1.0)
    assert abs(kd[0]) < 1e-6
    with pytest.raises(ValueError, match="distill_weight"):
        lm.train_lm(student, corpus.train, 1, distill_weight=2.0)
    with pytest.raises(ValueError, match="steps"):
        lm.train_lm(student, corpus.train, -1)


def test_baseline_is_cached_and_retrained_when_corrupt_or_from_another_recipe(tmp_path, corpus):
    path = tmp_path / "llama.pt"
    with pytest.raises(FileNotFoundError, match="notebook 12"):
        lm.load_lm_baseline(corpus, path=path, train_if_missing=False)
    with pytest.warns(UserWarning, match="no checkpoint"):
        first = lm.load_lm_baseline(corpus, path=path, steps=2, batch_size=2, context=16, warmup=1)
    again = lm.load_lm_baseline(corpus, path=path, train_if_missing=False, steps=2, batch_size=2, context=16, warmup=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert again.baseline_meta["corpus_sha256"] == corpus.sha256 and not again.training
    with pytest.raises(ValueError, match="another recipe"):
        lm.load_lm_baseline(corpus, path=path, train_if_missing=False, steps=3, batch_size=2, context=16, warmup=1)
    other = lm.load_corpus(max_bytes=40_000)
    with pytest.raises(ValueError, match="another corpus"):
        lm.load_lm_baseline(other, path=path, train_if_missing=False, steps=2, batch_size=2, context=16, warmup=1)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        lm.load_lm_baseline(corpus, path=path, train_if_missing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.load_lm_baseline(corpus, path=path, steps=2, batch_size=2, context=16, warmup=1)
    assert any("corrupt" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="unknown recipe"):
        lm.load_lm_baseline(corpus, path=path, epochs=3)
