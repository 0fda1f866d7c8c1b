"""PyTorch side of the GPU training benchmark (tests/gpu/run.sh): the same model and batch as
bench_gpu_train, and the same kind of step: the batch gathered on the GPU from a device-resident
training set in a fixed random order, forward, backward, the global gradient norm
(clip_grad_norm_, which ZENITH's step also computes) and an SGD-with-momentum update. The loss
is read back one step late, as Zenith's worker does, so neither side waits for the host each
step. Prints `torch_gpu images_per_s=<x> ...`.

The training set is random data of Fashion-MNIST's shape: a step's cost does not depend on the
pixel values."""
import argparse
import time

import torch
import torch.nn as nn

from bench_train_torch import build  # the same models as the CPU benchmark


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()

    dev = torch.device("cuda")
    torch.manual_seed(0)
    # Full FP32, as Zenith computes: no TF32 in convolutions or matrix products.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    images = torch.rand(60000, 1, 28, 28, device=dev)
    labels = torch.randint(0, 10, (60000,), device=dev)
    order = torch.randperm(60000, device=dev)
    model = build(args.model).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = 60000 // args.batch

    def step(s):
        idx = order[(s % per_epoch) * args.batch:(s % per_epoch + 1) * args.batch]
        x, y = images.index_select(0, idx), labels.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
        return loss.detach()

    prev = None
    for s in range(args.warmup):
        step(s)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(args.steps):
        loss = step(s)
        if prev is not None:
            prev.item()  # one step late, like the worker's report
        prev = loss
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"torch_gpu images_per_s={args.batch * args.steps / dt:.1f} batch={args.batch} "
          f"steps={args.steps} model={args.model} torch={torch.__version__}")


if __name__ == "__main__":
    main()
