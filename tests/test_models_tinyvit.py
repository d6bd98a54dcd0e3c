"""TinyViT (07_qat_transformers): shapes, written-out attention, export graph, what quantize_ swaps."""

import pytest
import torch
import torch.nn.functional as F

import qatlab
from qatlab.baseline import RECIPES, make_model
from qatlab.models import Block, TinyViT


def test_tinyvit_shapes_params_and_tokens():
    m = TinyViT()
    (x,) = m.example_inputs(batch_size=3)
    assert x.shape == (3, 1, 28, 28) and m(x).shape == (3, 10)
    assert sum(p.numel() for p in m.parameters()) == 71946
    assert m.patchify(x).shape == (3, 16, 49)  # 7x7 patches -> 16 tokens of 49 pixels
    assert TinyViT(patch=4).patchify(x).shape == (3, 49, 16)
    with pytest.raises(ValueError, match="divisible by patch"):
        TinyViT(patch=5)
    with pytest.raises(ValueError, match="divisible by heads"):
        Block(dim=10, heads=4)


def test_patchify_keeps_pixels_row_by_row():
    x = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28)
    p = TinyViT().patchify(x)
    assert torch.equal(p[0, 0], x[0, 0, :7, :7].reshape(-1))    # top-left patch
    assert torch.equal(p[0, 1], x[0, 0, :7, 7:14].reshape(-1))  # its right neighbour


def test_written_out_attention_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    blk = Block(dim=64, heads=4).eval()
    x = torch.randn(2, 16, 64)
    b, t, d = x.shape
    q, k, v = blk.qkv(blk.ln1(x)).reshape(b, t, 3, 4, 16).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
    h = x + blk.proj(a)
    ref = h + blk.fc2(blk.act(blk.fc1(blk.ln2(h))))
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-6)


def test_exported_graph_has_no_attention_masking_ops():
    m = TinyViT().eval()
    ops = {str(n.target) for n in torch.export.export(m, m.example_inputs()).graph.nodes
           if n.op == "call_function"}
    assert any("bmm" in o for o in ops) and any("softmax" in o for o in ops)
    assert not any(k in o for o in ops for k in ("scaled_dot_product", "logical_not", "where", "any."))


def test_quantize_swaps_every_linear_except_the_patch_embedding_at_group_32():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_
    from torchao.quantization.qat import QATConfig

    from qatlab.groupwise import make_group_filter

    m = TinyViT()
    f = make_group_filter(m, 32, on_mismatch="skip")
    assert list(f.skipped) == ["embed"]
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    quantize_(m, QATConfig(base, step="prepare"), filter_fn=f)
    swapped = sorted(n for n, mod in m.named_modules() if type(mod).__name__ == "FakeQuantizedLinear")
    assert len(swapped) == 9 and "head" in swapped and "embed" not in swapped
    assert m(*m.example_inputs(2)).shape == (2, 10)


def test_tinyvit_recipe_is_registered():
    r = RECIPES["tinyvit"]
    assert r["cls"] == "TinyViT" and r["notebook"] == "07_qat_transformers" and r["file"] == "tinyvit.pt"
    assert isinstance(make_model("tinyvit"), TinyViT)
    assert qatlab.TinyViT is TinyViT
