import subprocess
import sys

import pytest
import torch
from torch.ao.nn.intrinsic import ConvBnReLU2d, ConvReLU2d

import qatlab


def test_import_qatlab_has_no_side_effects_and_is_light():
    code = ("import sys, random; s = random.getstate(); import qatlab; "
            "assert random.getstate() == s; "
            "assert 'torch' not in sys.modules, 'import qatlab imported torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_small_cnn_shapes_and_example_inputs():
    m = qatlab.SmallCNN()
    (x,) = m.example_inputs(batch_size=3)
    assert m(x).shape == (3, 10)
    d = qatlab.SmallCNN(in_channels=1, input_size=8)
    assert d(*d.example_inputs()).shape == (1, 10)
    with pytest.raises(ValueError, match="widths"):
        qatlab.SmallCNN(widths=(16, 32))


def test_fuse_model_eval_is_exact_up_to_roundoff():
    qatlab.set_seed(0)
    m = qatlab.SmallCNN()
    m.train()
    m(torch.randn(16, 1, 28, 28))  # non-trivial running stats
    m.eval()
    x = torch.randn(4, 1, 28, 28)
    ref = m(x)
    m.fuse_model(is_qat=False)
    assert isinstance(m.features[0][0], ConvReLU2d)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


def test_fuse_model_qat_keeps_bn_and_checks_mode():
    m = qatlab.SmallCNN().train()
    m.fuse_model(is_qat=True)
    assert isinstance(m.features[0][0], ConvBnReLU2d)
    with pytest.raises(ValueError, match="eval mode"):
        qatlab.SmallCNN().train().fuse_model(is_qat=False)
    with pytest.raises(ValueError, match="train mode"):
        qatlab.SmallCNN().eval().fuse_model(is_qat=True)
    with pytest.raises(TypeError, match="'yes'"):
        qatlab.SmallCNN().fuse_model(is_qat="yes")


def test_train_learns_digits_and_returns_history():
    qatlab.set_seed(0)
    d = qatlab.load_dataset("digits")
    tr, te = d.loaders(batch_size=32, seed=0)
    m = qatlab.SmallCNN(input_size=8)
    h = qatlab.train(m, tr, epochs=2, lr=1e-2, schedule="onecycle", test_loader=te)
    assert h["epoch"] == [1, 2] and len(h["test_acc"]) == 2
    assert len(h["step_loss"]) == 2 * len(tr)
    assert h["test_acc"][-1] > 80  # 10 classes: chance is 10 %
    assert qatlab.evaluate(m, te) == pytest.approx(h["test_acc"][-1])


def test_train_rejects_bad_arguments():
    m = qatlab.SmallCNN()
    loader = [(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="-1"):
        qatlab.train(m, loader, epochs=-1)
    with pytest.raises(ValueError, match="0"):
        qatlab.train(m, loader, lr=0)
    with pytest.raises(ValueError, match="'cosine'"):
        qatlab.train(m, loader, schedule="cosine")
    with pytest.raises(TypeError, match="int"):
        qatlab.train(m, 5)


def test_set_seed_reproduces_and_validates():
    qatlab.set_seed(5)
    a = torch.randn(3)
    qatlab.set_seed(5)
    assert torch.equal(a, torch.randn(3))
    with pytest.raises(ValueError, match="-1"):
        qatlab.set_seed(-1)


def test_checkpoint_roundtrip_weights_only(tmp_path):
    m = qatlab.SmallCNN().eval()
    path = tmp_path / "ck.pt"
    qatlab.save_checkpoint(m, path, test_acc=12.5)
    loaded = qatlab.load_baseline(path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), m(x))
    assert loaded.baseline_meta == {"test_acc": 12.5}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left
    with pytest.raises(FileNotFoundError, match="notebook 00"):
        qatlab.load_baseline(tmp_path / "missing.pt", train_if_missing=False)


@pytest.mark.parametrize("name", ["smallcnn", "tinymobilenet", "tinyvit"])
def test_train_baseline_saves_a_loadable_checkpoint(tmp_path, name):
    path = tmp_path / f"{name}.pt"
    net, history = qatlab.train_baseline(epochs=0, path=path, model=name)
    assert history["epoch"] == [] and path.exists()
    loaded = qatlab.load_baseline(path, model=name)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), net.eval()(x))
    assert loaded.baseline_meta["model"] == name and loaded.baseline_meta["epochs"] == 0


def test_corrupt_or_foreign_checkpoint_is_retrained_or_rejected(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        qatlab.load_baseline(path, train_if_missing=False)
    qatlab.save_checkpoint(qatlab.SmallCNN(), path)  # a SmallCNN is not a TinyViT
    with pytest.raises(ValueError, match="not a tinyvit"):
        qatlab.load_baseline(path, train_if_missing=False, model="tinyvit")
    calls = []
    monkeypatch.setattr(qatlab.baseline, "train_baseline",
                        lambda **kw: calls.append(kw) or (qatlab.TinyViT(), {}))
    with pytest.warns(UserWarning, match="training it again"):
        qatlab.load_baseline(path, model="tinyvit")
    assert calls == [{"path": path, "model": "tinyvit"}]
    with pytest.raises(ValueError, match="model must be one of"):
        qatlab.load_baseline(path, model="resnet")


# --- predict / evaluate on exported (PT2E) graphs: the mode lives in the graph's ops ---------------

def _conv_bn_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4))
    net.train()(torch.randn(32, 1, 6, 6) * 2 + 1)  # running statistics that differ from any batch's
    return net


def _bn_training_flags(graph_module):
    return [bool(n.args[5]) for n in graph_module.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.batch_norm.default]


def _loader():
    torch.manual_seed(1)
    return [(torch.randn(8, 1, 6, 6), torch.zeros(8, dtype=torch.long)) for _ in range(2)]


def _exported(net, mode="train"):
    getattr(net, mode)()
    batch = ({0: torch.export.Dim("batch")},)
    return torch.export.export(net, (torch.randn(2, 1, 6, 6),), dynamic_shapes=batch).module()


def test_predict_leaves_an_exported_graph_moved_to_eval_in_eval_form():
    """torchao's switch plus move_exported_model_to_eval: ``.training`` still reads True, the ops are in
    eval form; predict must not move BatchNorm back to training form afterwards."""
    from torchao.quantization.pt2e import (
        allow_exported_model_train_eval,
        move_exported_model_to_eval,
    )

    net, loader = _conv_bn_net(), _loader()
    g = allow_exported_model_train_eval(_exported(net))
    move_exported_model_to_eval(g)
    assert g.training and _bn_training_flags(g) == [False]  # the flag and the graph disagree
    logits, _ = qatlab.predict(g, loader)
    assert _bn_training_flags(g) == [False], "predict put BatchNorm back into training form"
    with torch.no_grad():
        torch.testing.assert_close(logits, net.eval()(torch.cat([x for x, _ in loader])), rtol=1e-5, atol=1e-5)
    assert qatlab.evaluate(g, loader) == qatlab.evaluate(g, loader)  # nothing drifts between calls


def test_predict_keeps_frozen_batchnorm_of_a_graph_in_training():
    """qatlab.qat.allow_train_eval: a QAT graph training with its BN frozen (.training True) keeps the freeze."""
    from qatlab.qat import allow_train_eval, freeze_pt2e_bn_stats

    g = allow_train_eval(_exported(_conv_bn_net())).train()
    freeze_pt2e_bn_stats(g)
    qatlab.predict(g, _loader())
    assert _bn_training_flags(g) == [False] and g.training  # still frozen, still in training


def test_predict_switches_a_training_graph_to_eval_and_back():
    """A graph in training form with a train/eval switch: evaluated in eval form, then put back."""
    from qatlab.qat import allow_train_eval

    net, loader = _conv_bn_net(), _loader()
    g = allow_train_eval(_exported(net)).train()
    stats = [b for name, b in g.named_buffers() if name.endswith(("running_mean", "running_var"))]
    before = [b.clone() for b in stats]
    logits, _ = qatlab.predict(g, loader)
    with torch.no_grad():
        torch.testing.assert_close(logits, net.eval()(torch.cat([x for x, _ in loader])), rtol=1e-5, atol=1e-5)
    assert len(stats) == 2 and all(torch.equal(a, b) for a, b in zip(before, stats))  # running statistics kept
    assert _bn_training_flags(g) == [True] and g.training


def test_predict_runs_a_plain_exported_graph_in_eval_form():
    """torch.export's .module() refuses .eval(); a graph already in eval form needs none."""
    net, loader = _conv_bn_net(), _loader()
    g = _exported(net, "eval")
    logits, _ = qatlab.predict(g, loader)
    with torch.no_grad():
        torch.testing.assert_close(logits, net(torch.cat([x for x, _ in loader])), rtol=1e-5, atol=1e-5)


def test_predict_refuses_graphs_it_cannot_put_in_eval_form_and_back():
    g = _exported(_conv_bn_net())  # training form, no switch
    with pytest.raises(ValueError, match="move_exported_model_to_eval"):
        qatlab.predict(g, _loader())
    assert _bn_training_flags(g) == [True]
    from qatlab.qat import allow_train_eval, freeze_pt2e_bn_stats

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Dropout(0.5),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4))
    mixed = allow_train_eval(_exported(net)).train()
    freeze_pt2e_bn_stats(mixed)  # BN frozen, dropout still in training form: .train() would unfreeze BN
    with pytest.raises(ValueError, match="unfreeze"):
        qatlab.predict(mixed, _loader())
    assert _bn_training_flags(mixed) == [False]


def test_predict_restores_an_eager_model_s_mode():
    net, loader = _conv_bn_net(), _loader()
    qatlab.predict(net.train(), loader)
    assert net.training and net[1].training
    qatlab.predict(net.eval(), loader)
    assert not net.training
