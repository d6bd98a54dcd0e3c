"""torch.fx's provenance records, shared instead of deep-copied: the same graphs, exported faster.

Every node that ``torch.export`` or a graph pass makes records where it came from:
``node.meta["from_node"]``, a list of :class:`torch.fx.traceback.NodeSource`, each of which
holds the ``from_node`` list of the node it was made from. torch 2.14 makes each new record
with a **deep copy** of that history. A node that has been through :math:`p` passes has a
history up to :math:`p` records deep, so a pipeline of :math:`P` passes copies up to
:math:`1 + 2 + \\dots + P = O(P^2)` records per node; ``prepare_qat_pt2e`` and
``convert_pt2e`` (tens of passes, plus about 140 pattern exports) and ExecuTorch's
``to_edge_transform_and_lower`` (each XNNPACK partition goes through its own passes) spend
about a fifth of their time in those copies on the capstone's ResNet-20 (notebook 10).

Within :func:`shared_provenance` a new record holds a new *list* of the same older records
instead of copies of them. torch never changes a record after making it (passes append to a
node's own ``from_node`` list, and that list is still a new one per record), so every history
reads the same, record for record. ``tests/test_provenance.py`` checks it: the records compare
equal (``NodeSource.__eq__`` compares the whole history), and a prepared, a converted and a
lowered model are the same bit for bit (the ``.pte`` bytes included) with and without the block.

Used by :mod:`qatlab.conversion`, :func:`qatlab.qat.allow_train_eval`,
:func:`qatlab.recipe.predict_fake_quant` and :func:`qatlab.deploy.export_executorch`.
"""

import contextlib


def record_source(source, node, pass_name="", action=None, *, original):
    """``NodeSource.__init__`` that keeps ``node``'s history as a new list of the same records.

    The fields are those of ``original`` (torch's ``__init__``): ``pass_name``, ``action``,
    ``node_info`` (name, target, ``id`` of the graph) and ``from_node``, which is
    ``list(node.meta["from_node"])`` here, where torch has ``copy.deepcopy`` of it.
    """
    original(source, None, pass_name, action)   # pass name, actions, the caches; no node yet
    if node:
        source.node_info = source.NodeInfo(name=node.name, target=str(node.target), graph_id=id(node.graph))
        source.from_node = list(node.meta.get("from_node", ()))


@contextlib.contextmanager
def shared_provenance():
    """Within the block, new provenance records share their history instead of deep-copying it.

    Patches ``torch.fx.traceback.NodeSource.__init__`` (see :func:`record_source`) and restores
    it on exit; blocks nest. Where the installed torch has no ``NodeSource`` or its ``__init__``
    has another signature, the block changes nothing.
    """
    import inspect

    try:
        from torch.fx.traceback import NodeSource
    except ImportError:
        yield
        return
    original = NodeSource.__init__
    params = list(inspect.signature(original).parameters)
    if getattr(original, "__wrapped__", None) is not None or params != ["self", "node", "pass_name", "action"]:
        yield   # already inside a block, or a torch whose records are made differently
        return

    def init(self, node, pass_name="", action=None):
        record_source(self, node, pass_name, action, original=original)

    init.__wrapped__ = original
    NodeSource.__init__ = init
    try:
        yield
    finally:
        NodeSource.__init__ = original
