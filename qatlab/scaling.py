"""Scaling efficiency of a DDP run: one process against all of them, timed on a shared machine.

Taught in 08_qat_at_scale; used by ``python -m qatlab.train_qat --scaling-rounds N``.
"""

import copy
import time

from .distributed import capture_rng, restore_rng, wrap_ddp


def measure_scaling(model, train_set, cfg, d, loss_fn):
    """Time one process against all of them, in ``cfg.scaling_rounds`` interleaved rounds.

    Every round runs two modes, each with one untimed SGD step and then ``cfg.scaling_steps``
    timed ones, on copies of ``model`` (its state is left as it is, and the RNGs are restored):

    - *single*: rank 0 trains a plain copy (no DDP) on the whole global batch, the work of a
      one-process run; the other ranks wait at a barrier (their CPU time is recorded too);
    - *ddp*: every rank trains a DDP copy on its share of the global batch.

    Alternating the two modes exposes both to the same background load on a shared machine.
    Returns this rank's wall and CPU seconds per round: ``{"single_seconds",
    "single_cpu_seconds", "ddp_seconds", "ddp_cpu_seconds"}`` (``single_*`` of ranks > 0:
    their wait). :func:`combine_scaling` turns every rank's into throughputs.
    Taught in 08_qat_at_scale.
    """
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    rng = capture_rng()
    cuda = d.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def trainer(net, replicas, rank, batch):
        sampler = DistributedSampler(train_set, num_replicas=replicas, rank=rank, shuffle=True, seed=cfg.seed)
        optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)

        def batches():
            while True:
                yield from DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                                      generator=torch.Generator())

        data = batches()

        def steps(n):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                x, y, _ = next(data)
                loss = loss_fn(net(x.to(d.device)), y.to(d.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            sync()
            return time.perf_counter() - wall, time.process_time() - cpu

        return steps

    single = trainer(copy.deepcopy(model), 1, 0, cfg.global_batch_size) if d.rank == 0 else None
    ddp = trainer(wrap_ddp(copy.deepcopy(model), cfg, d), d.world_size, d.rank,
                  cfg.per_rank_batch(d.world_size))
    out = {"single_seconds": [], "single_cpu_seconds": [], "ddp_seconds": [], "ddp_cpu_seconds": []}
    for _ in range(cfg.scaling_rounds):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        if d.rank == 0:
            single(1)
            w, c = single(cfg.scaling_steps)
        dist.barrier()
        if d.rank != 0:
            w, c = time.perf_counter() - wall, time.process_time() - cpu
        out["single_seconds"].append(w)
        out["single_cpu_seconds"].append(c)
        ddp(1)
        w, c = ddp(cfg.scaling_steps)
        out["ddp_seconds"].append(w)
        out["ddp_cpu_seconds"].append(c)
    restore_rng(rng)
    return out


def combine_scaling(per_rank, images):
    """Throughputs from every rank's :func:`measure_scaling`; ``images`` per timed run (all ranks).

    Per round: *single* = ``images / rank 0's seconds``; *ddp* = ``images / slowest rank's
    seconds``; ``speedup = ddp / single``; each mode's share of a core = CPU seconds / wall
    seconds (rank 0 alone; the mean over ranks with DDP; ``waiting_cpu_share``: the other
    ranks' largest while rank 0 trains alone). Taught in 08_qat_at_scale.

    >>> r0 = {"single_seconds": [2.0], "single_cpu_seconds": [1.8], "ddp_seconds": [1.0], "ddp_cpu_seconds": [0.9]}
    >>> r1 = {"single_seconds": [2.0], "single_cpu_seconds": [0.0], "ddp_seconds": [1.25], "ddp_cpu_seconds": [1.0]}
    >>> s = combine_scaling([r0, r1], images=100)
    >>> s["single_images_per_second"], s["ddp_images_per_second"], s["speedup"], s["single_cpu_share"]
    ([50.0], [80.0], [1.6], [0.9])
    """
    r0 = per_rank[0]
    rounds = range(len(r0["ddp_seconds"]))
    single = [images / r0["single_seconds"][i] for i in rounds]
    ddp = [images / max(r["ddp_seconds"][i] for r in per_rank) for i in rounds]
    return {
        "rounds": len(rounds), "world_size": len(per_rank),
        "single_images_per_second": single, "ddp_images_per_second": ddp,
        "speedup": [b / a for a, b in zip(single, ddp)],
        "single_cpu_share": [r0["single_cpu_seconds"][i] / r0["single_seconds"][i] for i in rounds],
        "ddp_cpu_share": [sum(r["ddp_cpu_seconds"][i] / r["ddp_seconds"][i] for r in per_rank) / len(per_rank)
                          for i in rounds],
        "waiting_cpu_share": [max((r["single_cpu_seconds"][i] / r["single_seconds"][i] for r in per_rank[1:]),
                                  default=0.0) for i in rounds],
    }


