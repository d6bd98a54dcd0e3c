"""qatlab.threads: the thread count follows affinity, the cgroup quota and QATLAB_THREADS."""

import os

import pytest
import torch

from qatlab import threads


def _cgroup(tmp_path, v2=None, v1=None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(str(v1[1]))
    return tmp_path


def test_cgroup_quota_caps_the_affinity_mask(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert threads.available_cpus(_cgroup(tmp_path, v2="max 100000\n")) == affinity
    (tmp_path / "a").mkdir()
    assert threads.available_cpus(_cgroup(tmp_path / "a", v2="50000 100000\n")) == 1  # 0.5 CPU -> 1
    (tmp_path / "b").mkdir()
    assert threads.available_cpus(_cgroup(tmp_path / "b", v2="150000 100000")) == min(affinity, 2)
    (tmp_path / "c").mkdir()
    assert threads.available_cpus(_cgroup(tmp_path / "c", v1=(100000, 100000))) == 1
    (tmp_path / "d").mkdir()
    assert threads.available_cpus(_cgroup(tmp_path / "d", v1=(-1, 100000))) == affinity
    (tmp_path / "e").mkdir()
    assert threads.available_cpus(_cgroup(tmp_path / "e", v2="garbage")) == affinity


def test_affinity_mask_limits_the_choice(tmp_path):
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert threads.available_cpus(tmp_path) == 1
        assert threads.choose_threads({}, tmp_path) == 1
    finally:
        os.sched_setaffinity(0, before)


def test_environment_overrides_and_is_validated(tmp_path):
    assert threads.choose_threads({"QATLAB_THREADS": "3"}, tmp_path) == 3
    assert threads.choose_threads({"QATLAB_THREADS": ""}, tmp_path) == threads.available_cpus(tmp_path)
    for bad in ("0", "-2", "1.5", "all"):
        with pytest.raises(ValueError, match="QATLAB_THREADS must be a positive integer"):
            threads.choose_threads({"QATLAB_THREADS": bad}, tmp_path)


def test_set_threads_sets_torch(monkeypatch):
    old = torch.get_num_threads()
    try:
        monkeypatch.setenv("QATLAB_THREADS", "1")
        assert threads.set_threads() == 1 and torch.get_num_threads() == 1
        assert "QATLAB_THREADS=1" in threads.describe_threads()
        with pytest.raises(ValueError, match="positive int"):
            threads.set_threads(0)
    finally:
        torch.set_num_threads(old)
