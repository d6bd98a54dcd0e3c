"""qatlab.provenance: shared provenance records change no history, no model and no .pte byte."""

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.fx.traceback import NodeSource

from qatlab import conversion, patterns, provenance

SHAPE = (3, 8, 8)


class SmallResidualNet(nn.Module):
    """conv-BN-ReLU, a residual conv-BN, average pooling, a linear head: what a residual network lowers to."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.branch(x))
        return self.fc(x.mean((2, 3)))


def history(node):
    """A node's provenance as plain data, without graph ids (``id()`` of graphs differs between runs)."""
    def strip(d):
        return {k: [strip(f) for f in v] if k == "from_node" else v for k, v in d.items() if k != "graph_id"}

    return [strip(s.to_dict()) for s in node.meta.get("from_node", [])]


def quantize_and_lower(net, shared):
    """export -> prepare_qat_pt2e -> a forward -> convert_pt2e -> XNNPACK lowering, in the block or not."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    block = provenance.shared_provenance if shared else contextlib.nullcontext
    torch.manual_seed(0)
    x = torch.randn(8, *SHAPE)
    with warnings.catch_warnings(), patterns.pattern_cache(), block():
        warnings.simplefilter("ignore")
        exported = torch.export.export(copy.deepcopy(net).train(), (torch.zeros(2, *SHAPE),),
                                       dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        prepared = prepare_qat_pt2e(exported, conversion.xnnpack_quantizer(True, 2))
        prepared(x)   # one training-mode forward: the observers see data
        move_exported_model_to_eval(prepared)
        converted = convert_pt2e(prepared)
        with torch.no_grad():
            out = converted(x)
        program = torch.export.export(converted, (x,))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        lowered = edge.exported_program().graph_module
        pte = edge.to_executorch().buffer
    return prepared, converted, out, lowered, pte


def test_the_block_changes_no_history_model_or_pte_byte(one_thread):
    net = SmallResidualNet()
    plain = quantize_and_lower(net, shared=False)
    fast = quantize_and_lower(net, shared=True)
    for a, b in zip(plain[:2], fast[:2]):   # prepared, converted: the same code, weights and histories
        assert a.code == b.code
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert [history(n) for n in a.graph.nodes] == [history(n) for n in b.graph.nodes]
    assert torch.equal(plain[2], fast[2])
    depth = max(len(str(history(n))) for n in plain[3].graph.nodes)
    assert depth > 1000, "the lowered graph should carry a long history, or the test checks little"
    assert [history(n) for n in plain[3].graph.nodes] == [history(n) for n in fast[3].graph.nodes]
    assert plain[4] == fast[4]   # the .pte, byte for byte


def test_a_record_shares_its_history_inside_the_block_and_copies_it_outside():
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    older = NodeSource(None, "earlier_pass")
    node.meta["from_node"] = [older]
    outside = NodeSource(node, "a_pass")
    with provenance.shared_provenance():
        inside = NodeSource(node, "a_pass")
    assert outside.from_node[0] is not older and inside.from_node[0] is older   # copied vs shared
    assert inside.from_node is not node.meta["from_node"]   # a new list: appending to the node's changes nothing
    assert inside == outside and inside.to_dict() == outside.to_dict()
    node.meta["from_node"].append(NodeSource(None, "later_pass"))
    assert len(inside.from_node) == 1


def test_the_block_restores_torch_on_exit_and_nests():
    original = NodeSource.__init__
    with provenance.shared_provenance():
        patched = NodeSource.__init__
        assert patched is not original and patched.__wrapped__ is original
        with provenance.shared_provenance():
            assert NodeSource.__init__ is patched
        assert NodeSource.__init__ is patched
    assert NodeSource.__init__ is original
    with pytest.raises(RuntimeError, match="inside"):
        with provenance.shared_provenance():
            raise RuntimeError("inside")
    assert NodeSource.__init__ is original


def test_a_torch_with_another_signature_is_left_alone(monkeypatch):
    def other_init(self, node, pass_name="", action=None, extra=None):
        pass

    monkeypatch.setattr(NodeSource, "__init__", other_init)
    with provenance.shared_provenance():
        assert NodeSource.__init__ is other_init
