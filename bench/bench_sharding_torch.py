"""PyTorch's side of bench_sharding.py: DistributedDataParallel over Gloo with SGD + momentum
after clip_grad_norm_ (the step ZENITH replaces), and the same with the optimizer state sharded
by torch.distributed.optim.ZeroRedundancyOptimizer. One process per rank on this machine, one
thread each, the global batch split as Zenith splits it.

Prints one line per rank count and mode:
  torch workers=2 sharding=optimizer step_ms=3.21 state_bytes=407104,407040
state_bytes: the momentum buffers each rank actually holds after the steps, read from the
optimizer's state (a measurement of the tensors, not a formula)."""

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from bench_train_torch import build  # the same models as the CPU benchmark


def state_bytes(opt):
    if isinstance(opt, ZeroRedundancyOptimizer):
        opt = opt.optim  # the rank's local optimizer over its partition
    return sum(s["momentum_buffer"].numel() * s["momentum_buffer"].element_size()
               for s in opt.state.values() if "momentum_buffer" in s)


def rank_main(rank, world, port, args, sharded, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(build(args.model))
    kwargs = dict(lr=0.05, momentum=0.9)
    opt = (ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, **kwargs)
           if sharded else torch.optim.SGD(model.parameters(), **kwargs))
    local = args.batch // world
    gen = torch.Generator().manual_seed(args.seed + rank)
    x = torch.rand(local, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (local,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    ms = (time.perf_counter() - t0) * 1000 / args.steps
    out[rank] = (ms, state_bytes(opt))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch", type=int, default=120)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", default="1,2,3")
    args = p.parse_args()
    for world in [int(w) for w in args.workers.split(",")]:
        for sharded in (False, True):
            with mp.Manager() as manager:
                out = manager.dict()
                mp.spawn(rank_main, args=(world, free_port(), args, sharded, out), nprocs=world)
                ms = max(out[r][0] for r in range(world))
                states = ",".join(str(out[r][1]) for r in range(world))
            print("torch workers=%d sharding=%s step_ms=%.3f state_bytes=%s"
                  % (world, "optimizer" if sharded else "none", ms, states), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
