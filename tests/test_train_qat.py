"""``python -m qatlab.train_qat``: arguments, checkpoints, and a torchrun job killed and resumed bit for bit.

Every test that starts processes checks in ``/proc`` that none of them is left afterwards.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from qatlab import distributed, train_qat
from qatlab.distributed import Job, tagged_processes, torchrun_command


@pytest.fixture(scope="module")
def build(notebook_build):
    """The session's scratch build folder, holding the fp32 baseline.

    Notebook 00's test trains it there first in a full run; otherwise a baseline already
    trained in the environment's build folder is copied, and only without one is it trained.
    """
    import shutil
    import warnings

    from qatlab.baseline import load_baseline
    from qatlab.files import build_dir

    target = notebook_build / "checkpoints" / "baseline.pt"
    source = build_dir() / "checkpoints" / "baseline.pt"
    if not target.exists() and source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    old = os.environ.get("QATLAB_BUILD")
    os.environ["QATLAB_BUILD"] = str(notebook_build)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no checkpoint: training it now"
            load_baseline()
        yield notebook_build
    finally:
        if old is None:
            os.environ.pop("QATLAB_BUILD")
        else:
            os.environ["QATLAB_BUILD"] = old


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _children():
    """Live (non-zombie) descendants of this test process."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = distributed._proc_info(int(name))
            if info and info["state"] != "Z":
                procs[int(name)] = info
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, i in procs.items() if i["ppid"] in frontier} - mine
        mine |= frontier
    return mine


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = _children()
    yield
    left = _children() - before
    assert not left, f"processes left behind: {sorted(left)}"


# --- arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, world, message", [
    (["--global-batch-size", "63"], 2, "--global-batch-size 63 is not divisible by the 2 processes"),
    (["--steps", "0"], 1, "--steps must be a positive int, got 0"),
    (["--model", "tinyvit"], 1, "--model tinyvit has no conv-BN blocks"),
    (["--dataset", "imagenet"], 1, "--dataset must be one of"),
    (["--lr", "-0.5"], 1, "--lr must be a positive number, got -0.5"),
    (["--momentum", "1.5"], 1, "--momentum must be in [0, 1), got 1.5"),
    (["--weight-bits", "9"], 1, "--weight-bits must be an int in 2..8, got 9"),
    (["--freeze-bn-at", "-3"], 1, "expected a non-negative step, got -3"),
    (["--freeze-observers-at", "soon"], 1, "expected a step number or 'never', got 'soon'"),
    (["--sync-bn"], 1, "--sync-bn needs more than one process"),
    (["--backend", "mpi"], 1, "invalid choice: 'mpi'"),
    (["--checkpoint-every", "-1"], 1, "--checkpoint-every must be a non-negative int, got -1"),
    (["--scaling-rounds", "3"], 1, "--scaling-rounds needs more than one process"),
    (["--scaling-rounds", "3", "--scaling-steps", "0"], 2, "--scaling-steps must be a positive int, got 0"),
    (["--dataset", "cifar10"], 1, "--dataset cifar10 has 3x32x32 images, but the smallcnn baseline was trained "
                                  "on 1x28x28 mnist5k images; to train on cifar10, bring your model and data: "
                                  "--model MODULE:CALLABLE --data MODULE:CALLABLE"),
    (["--dataset", "digits", "--model", "tinymobilenet"], 1, "--dataset digits has 1x8x8 images"),
    (["--model", "resnet"], 1, "--model must be one of smallcnn, tinymobilenet, tinyvit or MODULE:CALLABLE "
                               "(your model), got 'resnet'"),
    (["--model", "m.py:net"], 1, "--model m.py:net (your model) needs --data MODULE:CALLABLE"),
    (["--model", "m.py:net", "--data", "cifar10"], 1, "--data must be MODULE:CALLABLE, got 'cifar10'"),
    (["--init", "fp32.pt"], 1, "--data and --init go with your own --model MODULE:CALLABLE"),
    (["--bn-freeze-lr-factor", "0"], 1, "--bn-freeze-lr-factor must be in (0, 1] (1 = no drop), got 0.0"),
    (["--calib-batches", "0"], 1, "--calib-batches must be a positive int, got 0"),
    (["--device", "tpu"], 1, "invalid choice: 'tpu'"),
])
def test_bad_arguments_are_usage_errors_naming_the_value(argv, world, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_qat.parse_args(argv, world_size=world)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_and_freeze_schedule():
    cfg = train_qat.parse_args(["--steps", "40"], world_size=2)
    assert (cfg.freeze_bn_at, cfg.freeze_observers_at, cfg.per_rank_batch(2)) == (20, 30, 32)
    cfg = train_qat.parse_args(["--freeze-bn-at", "never", "--freeze-observers-at", "7"], world_size=1)
    assert (cfg.freeze_bn_at, cfg.freeze_observers_at) == (None, 7)
    with pytest.raises(ValueError, match="--threads must be a positive int, got 0"):
        train_qat.Config(threads=0)
    # DDP's flag is forward_sync_buffers since torch 2.13; the old name still parses
    for flag in ("--no-forward-sync-buffers", "--no-broadcast-buffers"):
        assert train_qat.parse_args([flag], world_size=2).forward_sync_buffers is False


def test_help_runs_as_a_module_without_importing_torch():
    code = ("import sys, runpy; sys.argv = ['train_qat', '--help']\n"
            "try:\n    runpy.run_module('qatlab.train_qat', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--checkpoint-every" in out.stdout and "torchrun" in out.stdout
    assert "torch imported: False" in out.stdout


def test_torchrun_command_is_loopback_only():
    cmd = torchrun_command(["--steps", 3], nproc=2, max_restarts=1, python="python")
    assert "--rdzv-endpoint=127.0.0.1:0" in cmd and "--max-restarts=1" in cmd
    assert cmd[-4:] == ["-m", "qatlab.train_qat", "--steps", "3"]
    with pytest.raises(ValueError, match="nproc must be a positive int or None, got 0"):
        torchrun_command([], nproc=0)


# --- state helpers -------------------------------------------------------------------------

def test_rng_capture_restore_covers_torch_numpy_python():
    import random

    import numpy as np

    state = distributed.capture_rng()
    a = (torch.rand(2), np.random.rand(2), random.random())
    distributed.restore_rng(state)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_state_digest_sees_int8_qparams():
    x = torch.tensor([0.5, 1.0, -0.25])
    q1 = torch.quantize_per_tensor(x, 0.25, 0, torch.qint8)
    q2 = torch.quantize_per_tensor(x, 0.125, 0, torch.qint8)
    assert distributed.state_digest({"w": q1}) == distributed.state_digest({"w": q1.clone()})
    assert distributed.state_digest({"w": q1}) != distributed.state_digest({"w": q2})


def test_cpu_state_dict_keeps_module_versions():
    """``state_dict()._metadata`` must travel with the tensors: without it, an observer takes the
    state for version 1 and resets its ``eps`` (PT2E's XNNPACK config sets 2**-12)."""
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver

    saved = MovingAverageMinMaxObserver(eps=2.0 ** -12)
    plain = {k: v.clone() for k, v in saved.state_dict().items()}
    kept = train_qat.cpu_state_dict(saved)
    a, b = MovingAverageMinMaxObserver(eps=2.0 ** -12), MovingAverageMinMaxObserver(eps=2.0 ** -12)
    a.load_state_dict(plain)
    b.load_state_dict(kept)
    assert float(a.eps) == torch.finfo(torch.float32).eps  # the trap
    assert float(b.eps) == 2.0 ** -12


def test_pt2e_arguments():
    # the recipe's schedule on both APIs: PT2E freezes BN by editing the graph (qatlab.recipe)
    cfg = train_qat.parse_args(["--api", "pt2e", "--steps", "8"], world_size=2)
    assert (cfg.api, cfg.freeze_bn_at, cfg.freeze_observers_at) == ("pt2e", 4, 6)
    assert cfg.qat_recipe().plan(4) == (False, True, 0.01 * 0.1)
    # PT2E: weights of 2..8 bits (an int8 restricted to 2^b levels), activations only 8
    assert train_qat.Config(api="pt2e", weight_bits=2).weight_bits == 2
    with pytest.raises(ValueError, match="--api pt2e quantizes activations to 8 bits .*got --activation-bits 4"):
        train_qat.Config(api="pt2e", weight_bits=4, activation_bits=4)
    with pytest.raises(ValueError, match="--weight-bits must be an int in 2..8, got 1"):
        train_qat.Config(api="pt2e", weight_bits=1)
    with pytest.raises(ValueError, match="--api must be auto, eager or pt2e, got 'fx'"):
        train_qat.Config(api="fx")
    # auto: eager for a built-in baseline (as notebook 08 runs it), pt2e for your model
    assert train_qat.Config().api == "eager"
    assert train_qat.Config(model="my_model.py:net", data="my_model.py:data").api == "pt2e"


def test_freeze_bn_is_not_in_the_state_dict_so_it_is_restored_explicitly(build):
    import warnings

    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    cfg = train_qat.Config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = train_qat.build_qat_model(cfg), train_qat.build_qat_model(cfg)
    a(torch.zeros(2, 1, 28, 28))
    a.apply(freeze_bn_stats)
    b.load_state_dict(a.state_dict())
    assert train_qat.freeze_state(a)["bn_frozen"] and not train_qat.freeze_state(b)["bn_frozen"]
    train_qat.restore_freeze_state(b, train_qat.freeze_state(a))
    assert train_qat.freeze_state(b) == train_qat.freeze_state(a)
    assert not b.features[0][0].bn.training


def test_pt2e_state_survives_a_checkpoint_bit_for_bit(build, keep_threads):
    """PT2E (exported graph, torchao FakeQuantize): two steps, a weights-only checkpoint of the
    state, a freshly prepared model loads it, and one more step gives the same bits as the
    original. (A full ``--api pt2e`` run also pays ``convert_pt2e``, seconds per call, so the
    test suite checks the state round trip that resuming depends on.) The fresh model is a copy
    of ``a`` taken right after preparing, before any step: the same graph and untouched
    observers that a second export and prepare would give, for the price of one export."""
    import copy
    import io
    import warnings

    torch.set_num_threads(1)
    cfg = train_qat.parse_args(["--api", "pt2e"], world_size=1)
    data = qatlab_data()
    x, y = data.x_train[:32], data.y_train[:32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = train_qat.build_qat_model(cfg, input_shape=data.input_shape)
        b = copy.deepcopy(a)
        assert distributed.state_digest(b.state_dict()) == distributed.state_digest(a.state_dict())
        opt_a = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9)

        def step(model, opt):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(2):
            step(a, opt_a)
        train_qat.restore_freeze_state(a, {"observers_frozen": True, "bn_frozen": False})
        buffer = io.BytesIO()
        torch.save({"model": train_qat.cpu_state_dict(a), "opt": opt_a.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        assert distributed.state_digest(b.state_dict()) != distributed.state_digest(a.state_dict())
        b.load_state_dict(saved["model"])
        opt_b = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9)
        opt_b.load_state_dict(saved["opt"])
        assert distributed.state_digest(b.state_dict()) == distributed.state_digest(a.state_dict())
        assert train_qat.freeze_state(b)["observers_frozen"]
        step(a, opt_a)
        step(b, opt_b)
    assert distributed.state_digest(b.state_dict()) == distributed.state_digest(a.state_dict())


def qatlab_data():
    from qatlab.data import load_dataset

    return load_dataset("mnist5k")


# --- in one process: resume, and checkpoints of another run ------------------------------

def test_resume_in_one_process_is_bit_exact_and_checks_the_run(build, tmp_path, keep_threads, capsys):
    common = ["--threads", "1", "--no-progress", "--freeze-bn-at", "2", "--freeze-observers-at", "4",
              "--augment-shift", "2", "--seed", "3"]
    whole = train_qat.run(train_qat.parse_args([*common, "--steps", "6", "--out", str(tmp_path / "a")]))
    train_qat.run(train_qat.parse_args([*common, "--steps", "3", "--out", str(tmp_path / "b")]))
    resumed = train_qat.run(train_qat.parse_args([*common, "--steps", "6", "--resume", "--out", str(tmp_path / "b")]))
    assert resumed["resumed_from_step"] == 3
    compared, differing = train_qat.checkpoint_differences(tmp_path / "a" / "checkpoint.pt",
                                                           tmp_path / "b" / "checkpoint.pt")
    assert compared > 80 and differing == []
    assert resumed["loss"] == whole["loss"] and resumed["shipped_digest_per_rank"] == whole["shipped_digest_per_rank"]
    assert resumed["rng_digest_per_rank"] == whole["rng_digest_per_rank"]
    # the shipped file is the model the run evaluated
    int8 = train_qat.load_int8_model(tmp_path / "a" / "model_int8.pt")
    assert distributed.state_digest(int8.state_dict()) == whole["shipped_digest_per_rank"][0]
    # a checkpoint of another run is refused, naming what differs
    with pytest.raises(ValueError, match=r"another run \(lr: checkpoint 0.01 vs now 0.02\)"):
        train_qat.run(train_qat.parse_args([*common, "--steps", "6", "--resume", "--lr", "0.02",
                                            "--out", str(tmp_path / "b")]))
    capsys.readouterr()


# --- jobs: finding and killing every process -------------------------------------------------

def test_job_kills_processes_in_other_sessions(tmp_path):
    """The case torchrun creates: a child in a session of its own survives a kill of the parent's group."""
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
              "print('started', flush=True)\n"
              "time.sleep(120)\n")
    with Job([sys.executable, "-c", script], log=tmp_path / "job.log") as job:
        assert next(job.lines()) == "started"
        procs = job.processes()
        assert len(procs) == 2 and len({i["sid"] for i in procs.values()}) == 2
        os.killpg(job.proc.pid, signal.SIGKILL)  # the launcher's group only
        job.proc.wait()
        survivors = tagged_processes(job.tag)
        assert len(survivors) == 1  # the child in its own session is still alive
        assert sorted(job.kill()) == sorted(survivors)
        assert job.leftovers() == [] and tagged_processes(job.tag) == {}


def test_job_timeout_kills_everything(tmp_path):
    with Job([sys.executable, "-c", "import time; time.sleep(120)"], log=tmp_path / "j.log", timeout=1.0) as job:
        code = job.wait()
        assert job.timed_out and code != 0
        with pytest.raises(RuntimeError, match="killed after its timeout"):
            job.check(code)
    assert job.leftovers() == []


# --- torchrun: kill the whole job mid-way, resume, compare bit for bit --------------------------

def test_killed_torchrun_job_resumes_bit_exact(build, tmp_path):
    """2 processes, gloo, loopback rendezvous. SIGKILL to the launcher's process group first:
    torchrun started each worker in a session of its own, so they survive it as orphans; then
    SIGKILL to every worker's group. The resumed run must equal an uninterrupted one bit for bit
    on CPU (fixed threads): per-rank weights, observers, BN statistics, optimizer, RNG (random
    shifts make the RNG matter), the shipped int8 model and every step's loss."""
    env = {"QATLAB_BUILD": str(build)}
    common = ["--steps", "16", "--threads", "1", "--no-progress", "--augment-shift", "2", "--seed", "5"]
    # the reference also times 1 vs 2 processes after training: on copies, with the RNGs restored,
    # so its training state, RNG digests and shipped model must still equal the resumed run's
    ref = _run_job([*common, "--scaling-rounds", "2", "--scaling-steps", "2", "--out", tmp_path / "ref"], env)
    scaling = ref["scaling"]
    assert scaling["rounds"] == 2 and scaling["world_size"] == 2
    for key in ("single_images_per_second", "ddp_images_per_second", "speedup"):
        assert len(scaling[key]) == 2 and all(v > 0 for v in scaling[key]), key
    assert all(0 < v <= 1.5 for v in scaling["single_cpu_share"] + scaling["ddp_cpu_share"])
    assert max(scaling["waiting_cpu_share"]) < 0.2, "a rank waiting at the barrier must not spin"

    crash_out = tmp_path / "crash"
    cmd = torchrun_command([*common, "--checkpoint-every", "4", "--resume", "--out", crash_out], nproc=2)
    with Job(cmd, log=tmp_path / "crash.log", env=env, timeout=600) as job:
        for line in job.lines():
            if line.startswith("train_qat: checkpoint step 4 "):
                break
        else:
            pytest.fail(f"no checkpoint line; output: {job.output}")
        procs = job.processes()
        workers = {pid for pid, i in procs.items() if "RANK" in i["env"]}
        assert len(workers) == 2
        assert all(procs[w]["sid"] != procs[job.proc.pid]["sid"] for w in workers)
        os.killpg(job.proc.pid, signal.SIGKILL)  # torchrun's own process group
        job.proc.wait()
        orphans = set(tagged_processes(job.tag))
        assert orphans == workers, "workers in their own sessions survive a kill of torchrun's group"
        job.kill()  # SIGKILL to each worker's process group
        assert job.leftovers() == [] and tagged_processes(job.tag) == {}
    step = torch.load(crash_out / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= step < 16, f"the job was not killed mid-way (checkpoint at step {step})"
    assert not (crash_out / "metrics.json").exists()

    resumed = _run_job([*common, "--checkpoint-every", "4", "--resume", "--out", crash_out], env)
    assert resumed["resumed_from_step"] == step
    compared, differing = train_qat.checkpoint_differences(tmp_path / "ref" / "checkpoint.pt",
                                                           crash_out / "checkpoint.pt")
    assert compared > 160 and differing == []
    assert resumed["loss_per_rank"] == ref["loss_per_rank"]
    assert resumed["shipped_digest_per_rank"] == ref["shipped_digest_per_rank"]
    assert resumed["rng_digest_per_rank"] == ref["rng_digest_per_rank"]
    # the two ranks drew different random shifts (seed + rank), and both were restored
    assert len(set(ref["rng_digest_per_rank"])) == 2
    # and what the run measured about its ranks holds
    assert ref["shipped_model_rank_independent"] == 1 and len(set(ref["param_digest_per_rank"])) == 1
    assert ref["data_order_sha256"] == resumed["data_order_sha256"]


def _run_job(args, env):
    out = args[args.index("--out") + 1]
    with Job(torchrun_command(args, nproc=2), log=f"{out}.log", env=env, timeout=600) as job:
        job.check(job.wait())
    assert job.leftovers() == []
    return json.loads((out / "metrics.json").read_text())


_RESTART_WORKER = """
import os, sys, time
import torch.distributed as dist
from qatlab.distributed import init_distributed

def say(line):  # one write per line: two ranks share the log, and print() may write twice
    os.write(1, (line + "\\n").encode())


restart, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if restart == 1:
    if rank == 0:  # the failed round's rank-1 gloo address is still in torchrun's store
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        say(f"stale rank-1 address: {store.check(['default_pg/0//cpu//0/1'])}")
    else:  # rank 0 joins first: a plain init_process_group would read that stale address
        time.sleep(1.5)
d = init_distributed("gloo", timeout=60)
dist.barrier()
say(f"restart {restart} rank {rank} joined, keys under {d.store_prefix}")
dist.destroy_process_group()
if restart == 0 and rank == 1:
    os._exit(9)  # a crash: torchrun restarts both workers
sys.exit(3 if restart == 1 else 0)  # and the last round fails: no restarts left
"""


def test_restarted_workers_join_despite_the_failed_rounds_keys_and_a_failed_job_leaves_nothing(tmp_path):
    """torchrun --max-restarts=1 keeps its store across the restart, with the failed round's keys
    (pytorch/pytorch#135712). Rank 1 crashes in round 0; in round 1 rank 0 finds rank 1's old
    gloo address still in the store and joins first. init_distributed puts round 1's keys under
    their own prefix, so both ranks join. Round 1 then fails on purpose: torchrun, out of
    restarts, exits non-zero and leaves no process behind."""
    script = tmp_path / "worker.py"
    script.write_text(_RESTART_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-id=restart-test", "--max-restarts=1",
           "--monitor-interval=0.1", str(script)]
    with Job(cmd, log=tmp_path / "restart.log", timeout=300) as job:
        code = job.wait()
    assert code != 0 and job.leftovers() == [] and tagged_processes(job.tag) == {}
    assert "stale rank-1 address: True" in job.output, job.output
    for rank in (0, 1):
        assert f"restart 0 rank {rank} joined, keys under None" in job.output, job.output
        assert f"restart 1 rank {rank} joined, keys under qatlab/restart_1/" in job.output, job.output
