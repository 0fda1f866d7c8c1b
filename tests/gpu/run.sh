#!/usr/bin/env bash
# The GPU checks, in one run on a machine with an NVIDIA GPU:
#   1. build with the CUDA path on (build-gpu/);
#   2. the CUDA ZENITH step: the worked example on the device, several steps
#      against the CPU step on random data (bounds in check_step.c), and its
#      bandwidth on a 100M-parameter flat model against a device-to-device
#      copy measured in the same run;
#   3. the same step in PyTorch (clip_grad_norm_ + SGD momentum), if torch
#      with CUDA is installed, and the ratio of the two.
# It needs nvcc, CMake, the project's libraries and, for 3, PyTorch; no
# network. Exits non-zero if a correctness check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${BUILD_GPU:-build-gpu}
python=${PYTHON:-python3}

echo "== build ($build, ZENITH_CUDA=ON)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DZENITH_CUDA=ON >/dev/null
cmake --build "$build" -j"$(nproc)" --target zn_gpu_check >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== CUDA step: correctness and bandwidth"
out=$("$build/bin/zn_gpu_check")
echo "$out"

echo "== PyTorch step on the same 100M parameters"
ours=$(echo "$out" | sed -n 's/^| fused step, [0-9]* parameters | \([0-9.]*\) ms.*/\1/p')
if "$python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  theirs=$("$python" bench/gpu_step_torch.py 100000000)
  echo "$theirs"
  t=$(echo "$theirs" | sed -n 's/^torch_step_ms \([0-9.]*\).*/\1/p')
  awk -v z="$ours" -v t="$t" \
    'BEGIN { printf "| PyTorch clip + SGD step | %.3f ms | zenith is %.2fx faster |\n", t, t / z }'
else
  echo "PyTorch with CUDA is not available here: step comparison skipped"
fi
echo "$out" | grep -q "GPU checks passed"
