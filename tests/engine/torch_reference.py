"""PyTorch reference for test_model_torch: reads the weights and batch a zn_model used, runs the
same nn.Sequential forward and backward in float32, and writes the mean loss, the number of
correct predictions and every parameter gradient back for the C test to compare.

Input file: one text line "<model> <n> <name>:<d0>x<d1>... ..." listing the C model's tensors in
order, then float32 params (flat, in that order), float32 images [n,1,28,28], uint8 labels [n].
Output file: float64 loss, int32 correct, then float32 gradients in the same flat layout.
The tensor list is checked against the PyTorch model's state_dict, key by key and shape by
shape, so a layout disagreement fails loudly instead of comparing the wrong numbers."""
import struct
import sys

import numpy as np
import torch
import torch.nn as nn


def build(name):
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))
    sys.exit(f"torch_reference: unknown model {name!r}")


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        header = f.readline().decode().split()
        body = f.read()
    name, n, tensors = header[0], int(header[1]), header[2:]
    model = build(name)
    state = model.state_dict()

    theirs = [f"{k}:{'x'.join(str(d) for d in v.shape)}" for k, v in state.items()]
    if theirs != tensors:
        sys.exit(f"torch_reference: tensor layout differs\n  C:     {tensors}\n  torch: {theirs}")

    total = sum(v.numel() for v in state.values())
    flat = np.frombuffer(body, dtype=np.float32, count=total)
    x = np.frombuffer(body, dtype=np.float32, count=n * 784, offset=4 * total)
    y = np.frombuffer(body, dtype=np.uint8, count=n, offset=4 * (total + n * 784))

    at = 0
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            v.copy_(torch.from_numpy(flat[at:at + v.numel()].copy()).view_as(v))
            at += v.numel()

    inp = torch.from_numpy(x.copy()).view(n, 1, 28, 28)
    labels = torch.from_numpy(y.astype(np.int64))
    logits = model(inp)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    correct = int((logits.argmax(dim=1) == labels).sum())

    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    with open(dst, "wb") as f:
        f.write(struct.pack("<di", float(loss), correct))
        f.write(grads.astype(np.float32).tobytes())


if __name__ == "__main__":
    main()
