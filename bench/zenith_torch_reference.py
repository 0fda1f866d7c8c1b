"""The main job in PyTorch: the same cnn, data order rules, initialisation
scheme and ZENITH definition (docs/optimizer.md) as Zenith, for comparing
final test accuracy on this machine.

    /usr/bin/python3 bench/zenith_torch_reference.py [--epochs 2] [--seed 1] [--threads 2]
"""
import argparse
import gzip
import os
import time

import numpy as np
import torch
import torch.nn as nn

MEAN, STD = 0.2860, 0.3530


def load_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(folder, prefix):
    def find(name):
        p = os.path.join(folder, name)
        return p if os.path.exists(p) else p + ".gz"
    x = load_idx(find(prefix + "-images-idx3-ubyte")).astype(np.float32) / 255.0
    y = load_idx(find(prefix + "-labels-idx1-ubyte")).astype(np.int64)
    x = (x - MEAN) / STD
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))


class Zenith:
    """ZENITH as docs/optimizer.md defines it (no spike guard, coupled decay)."""

    def __init__(self, params, lr0=0.05, window=100, momentum=0.9, weight_decay=5e-4):
        self.params = list(params)
        self.lr0, self.window, self.mu, self.wd = lr0, window, momentum, weight_decay
        self.norms, self.peak = [], 0.0
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.params)))
        if not np.isfinite(norm):
            return norm, None
        self.norms.append(norm)
        if len(self.norms) > self.window:
            self.norms.pop(0)
        mean = sum(self.norms) / len(self.norms)
        self.peak = max(self.peak, mean)
        lr = self.lr0 * (mean / self.peak) if self.peak > 0 else self.lr0
        for p, v in zip(self.params, self.v):
            d = p.grad + self.wd * p
            v.mul_(self.mu).add_(d)
            p.sub_(lr * v)
        return norm, lr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr = load(args.data_dir, "train")
    xte, yte = load(args.data_dir, "t10k")
    model = cnn()
    opt = Zenith(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = len(xtr) // args.batch
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr))
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch:(s + 1) * args.batch]
            model.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = sum(int((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum())
                      for i in range(0, len(xte), 1000))
    print("pytorch zenith cnn: epochs %d seed %d test_accuracy %.4f train_seconds %.1f"
          % (args.epochs, args.seed, correct / len(xte), time.time() - t0))


if __name__ == "__main__":
    main()
