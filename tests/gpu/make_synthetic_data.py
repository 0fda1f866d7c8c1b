"""Writes a Fashion-MNIST-shaped data set (IDX files, gzipped: 60000 training and 10000 test
images of 28x28 bytes, labels 0..9) for machines that have neither the dataset-fashion-mnist
package nor a copy of the files, such as a GPU machine without network. Each class is a fixed
random blurred pattern mixed into a pattern all classes share; an image is its class's
pattern, shifted by up to three pixels, plus strong noise, and one label in twenty is drawn at
random, so that one epoch of the cnn reaches roughly Fashion-MNIST's accuracy rather than 100%.
Deterministic for a given seed.

    python3 tests/gpu/make_synthetic_data.py OUT_DIR [--seed 7]
"""
import argparse
import gzip
import os
import struct

import torch


def patterns(gen):
    base = torch.rand(10, 1, 28, 28, generator=gen)
    kernel = torch.ones(1, 1, 5, 5) / 25.0
    smooth = torch.nn.functional.conv2d(base, kernel, padding=2)
    smooth = (smooth - smooth.amin(dim=(2, 3), keepdim=True))
    smooth = smooth / smooth.amax(dim=(2, 3), keepdim=True)
    return 0.3 * smooth.mean(dim=0, keepdim=True) + 0.7 * smooth


def images_for(labels, templates, gen):
    n = labels.numel()
    x = templates[labels]
    shifts = torch.randint(-3, 4, (n, 2), generator=gen)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            pick = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            x[pick] = torch.roll(x[pick], shifts=(dy, dx), dims=(2, 3))
    x = x * 180 + torch.randn(n, 1, 28, 28, generator=gen) * 80
    return x.clamp(0, 255).to(torch.uint8)


def write_idx(path, data, dims):
    with gzip.open(path, "wb") as f:
        magic = 0x0800 | len(dims)
        f.write(struct.pack(">I", magic))
        for d in dims:
            f.write(struct.pack(">I", d))
        f.write(data.contiguous().numpy().tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    templates = patterns(gen)
    os.makedirs(args.out, exist_ok=True)
    for prefix, n in (("train", 60000), ("t10k", 10000)):
        labels = torch.randint(0, 10, (n,), generator=gen)
        imgs = images_for(labels, templates, gen)
        relabel = torch.rand(n, generator=gen) < 0.05
        labels[relabel] = torch.randint(0, 10, (int(relabel.sum()),), generator=gen)
        write_idx(os.path.join(args.out, f"{prefix}-images-idx3-ubyte.gz"), imgs, (n, 28, 28))
        write_idx(os.path.join(args.out, f"{prefix}-labels-idx1-ubyte.gz"),
                  labels.to(torch.uint8), (n,))
    print(f"synthetic Fashion-MNIST-shaped data in {args.out}")


if __name__ == "__main__":
    main()
