import warnings

import numpy as np
import pytest
import torch

import qatlab
from qatlab import data as qdata


@pytest.fixture
def scratch_data(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_DATA", str(tmp_path))
    return tmp_path


def test_mnist5k_split_is_stratified_and_disjoint():
    d = qatlab.load_dataset("mnist5k")
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.y_train).eq(400).all() and torch.bincount(d.y_test).eq(100).all()
    # no test image also appears in train
    train = {row.tobytes() for row in d.x_train.flatten(1).numpy()}
    assert not any(row.tobytes() in train for row in d.x_test.flatten(1).numpy())
    assert abs(d.x_train.mean()) < 0.05 and abs(d.x_train.std() - 1) < 0.05


def test_digits_loads_and_is_stratified():
    d = qatlab.load_dataset("digits")
    assert d.input_shape == (1, 8, 8)
    assert torch.bincount(d.y_test).eq(36).all()
    assert len(d.y_train) + len(d.y_test) == 1797


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="'nope'.*mnist5k, digits, mnist, fashion_mnist, cifar10"):
        qatlab.load_dataset("nope")


def test_cache_is_built_then_reused(scratch_data):
    qatlab.load_dataset("digits")
    path = scratch_data / "digits.npz"
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache loads silently
        qatlab.load_dataset("digits")
    assert path.stat().st_mtime_ns == mtime


def test_tampered_cache_is_rebuilt_with_a_warning(scratch_data):
    ref = qatlab.load_dataset("digits")
    path = scratch_data / "digits.npz"
    with np.load(path) as f:
        arrays = {k: f[k].copy() for k in f.files}
    arrays["y_train"][0] = (arrays["y_train"][0] + 1) % 10  # one flipped label
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="SHA-256 does not match"):
        d = qatlab.load_dataset("digits")
    assert torch.equal(d.y_train, ref.y_train)  # the rebuilt data, not the tampered one


def test_truncated_cache_is_rebuilt_with_a_warning(scratch_data):
    qatlab.load_dataset("digits")
    path = scratch_data / "digits.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="cannot be read"):
        qatlab.load_dataset("digits")
    assert qdata._digest(*qdata._load_offline("digits")) == qdata.EXPECTED_SHA256["digits"]


def test_online_dataset_fails_offline_with_a_clear_message(scratch_data, monkeypatch):
    import torchvision.datasets as tvd

    def no_network(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "MNIST", no_network)
    with pytest.raises(qdata.DatasetUnavailableError, match="could not be downloaded.*mnist5k, digits"):
        qatlab.load_dataset("mnist")


def test_loaders_shuffle_reproducibly_and_reject_bad_batch_size():
    d = qatlab.load_dataset("digits")
    a = next(iter(d.loaders(batch_size=8, seed=3)[0]))[1]
    b = next(iter(d.loaders(batch_size=8, seed=3)[0]))[1]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch_size.*0"):
        d.loaders(batch_size=0)


def test_sample_grid_shows_every_class_although_the_split_is_sorted():
    data = qatlab.load_dataset("mnist5k")
    assert torch.equal(data.y_train[:30], torch.zeros(30, dtype=torch.long))  # why it matters
    idx = qdata.sample_indices(data.y_train, 30, seed=0)
    assert len(set(idx)) == 30
    assert torch.bincount(data.y_train[idx], minlength=10).tolist() == [3] * 10
    assert idx != qdata.sample_indices(data.y_train, 30, seed=1)  # random within each class


def test_plot_samples_titles_the_sample(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = qdata.plot_samples(qatlab.load_dataset("mnist5k"), n=20, split="test")
    assert ax.get_title() == "mnist5k: 20 random test images, 2 per class"
    assert sorted(t.get_text() for t in ax.texts) == sorted([str(c) for c in range(10)] * 2)
    plt.close("all")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        qdata.plot_samples(qatlab.load_dataset("mnist5k"), split="val")
