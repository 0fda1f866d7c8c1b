#!/bin/sh
# Training throughput of Zenith's CPU model against PyTorch on this machine: the same model,
# batch and thread count, run one after the other so they do not share the cores.
#   bench/bench_train.sh [threads=2] [model=cnn] [batch=128] [steps=100]
# BUILD (default ./build) is the CMake build folder holding bin/bench_train; PYTHON (default
# /usr/bin/python3) is an interpreter with torch.
set -eu
threads=${1:-2}
model=${2:-cnn}
batch=${3:-128}
steps=${4:-100}
here=$(cd "$(dirname "$0")" && pwd)
build=${BUILD:-$here/../build}
python=${PYTHON:-/usr/bin/python3}

# OpenBLAS and PyTorch's OpenMP pool would otherwise size themselves from the environment.
export OPENBLAS_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads"

ours=$("$build/bin/bench_train" --model "$model" --batch "$batch" --threads "$threads" \
  --steps "$steps")
theirs=$("$python" "$here/bench_train_torch.py" --model "$model" --batch "$batch" \
  --threads "$threads" --steps "$steps")
echo "$ours"
echo "$theirs"

rate() { echo "$1" | sed -n 's/.*images_per_s=\([0-9.]*\).*/\1/p'; }
awk -v z="$(rate "$ours")" -v t="$(rate "$theirs")" \
  'BEGIN { printf "ratio zenith/pytorch = %.2f\n", z / t }'
