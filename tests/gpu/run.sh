#!/usr/bin/env bash
# The GPU checks and benchmarks, in one run on a machine with an NVIDIA GPU. It needs nvcc, CMake
# and PyTorch (with CUDA) and nothing from the network; it finishes in a few minutes.
#
#   1. Build. With the daemons' libraries installed (`make deps`), the whole project with the
#      CUDA path on (build-gpu/); on a bare CUDA machine, the standalone GPU build
#      (tests/gpu/standalone: kernels, GPU model, GPU steps, checks and benchmark only).
#   2. Data: $ZENITH_DATA_DIR, else the dataset-fashion-mnist package's folder, else
#      data/fashion-mnist in the tree; where none has the IDX files, a synthetic data set of
#      Fashion-MNIST's shape is generated (tests/gpu/make_synthetic_data.py) and the output
#      says so.
#   3. The CUDA ZENITH step (zn_gpu_check): the worked example on the device; steps against the
#      CPU step on random data (norm and rate within 1e-12, weights within 1e-5 of max |w|);
#      its bandwidth on 100M parameters against a device-to-device copy.
#   4. The GPU model (zn_gpu_check_model): each model's loss, gradient and evaluation against
#      the CPU model on random data (bounds in check_model.c), and determinism.
#   5. PyTorch's clip_grad_norm_ + SGD momentum step on the same 100M parameters.
#   6. One epoch of `cnn` on the GPU against one on the CPU, same seed and hyper-parameters:
#      test accuracies within 1.5 points. With the full build both go through a coordinator and
#      a worker (`--device cuda:0`, then a CPU worker); with the standalone build the GPU epoch
#      runs in bench_gpu_train and the CPU one is PyTorch with the same ZENITH definition
#      (bench/zenith_torch_reference.py).
#   7. `cnn` training throughput, batch 128: Zenith with and without the CUDA graph, PyTorch.
# The table of results comes last. Exits non-zero if a correctness check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
jobs=$(nproc)
work=${GPU_WORK:-build-gpu-run}
mkdir -p "$work"
rows=()
section() { printf '\n== %s\n' "$*"; }
row() { rows+=("$(printf "| %s | %s | %s |" "$1" "$2" "$3")"); }
# The number after `key=` (the benchmarks) or `key ` (zenith_torch_reference.py) in $1.
value() { echo "$1" | sed -n "s/.*$2[= ]\([0-9.]*\).*/\1/p" | tail -1; }

section "build"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA in torch'" ||
  { echo "run.sh: PyTorch with CUDA is needed"; exit 1; }
if cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DZENITH_CUDA=ON >"$work/configure.log" 2>&1
then
  mode=full
  bin=build-gpu/bin
  cmake --build build-gpu -j"$jobs" --target zenithd zenithctl zn_gpu_check zn_gpu_check_model \
    bench_gpu_train >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
else
  mode=standalone
  bin=build-gpu-standalone/bin
  # cuDNN from the toolkit, or from the NVIDIA wheel PyTorch depends on.
  cudnn=$("$python" -c 'import nvidia.cudnn as c; print(list(c.__path__)[0])' 2>/dev/null || true)
  if [[ -n "$cudnn" ]]; then export LD_LIBRARY_PATH="$cudnn/lib:${LD_LIBRARY_PATH:-}"; fi
  cmake -S tests/gpu/standalone -B build-gpu-standalone -DZN_CUDNN_ROOT="$cudnn" \
    >"$work/configure-standalone.log" 2>&1 || { cat "$work/configure-standalone.log"; exit 1; }
  cmake --build build-gpu-standalone -j"$jobs" >"$work/build.log" 2>&1 ||
    { tail -40 "$work/build.log"; exit 1; }
fi
echo "built: $mode (the full build's configure log is $work/configure.log)"

section "data"
data=""
for d in "${ZENITH_DATA_DIR:-}" /usr/share/datasets/fashion-mnist data/fashion-mnist; do
  if [[ -n "$d" ]] && ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1; then data=$d; break; fi
done
if [[ -z "$data" ]]; then
  data="$work/synthetic"
  "$python" tests/gpu/make_synthetic_data.py "$data"
  data_kind="synthetic (generated: no Fashion-MNIST files here)"
else
  data_kind="Fashion-MNIST from $data"
fi
echo "data: $data_kind"

section "CUDA ZENITH step: correctness and bandwidth"
step_out=$("$bin/zn_gpu_check") || { echo "$step_out"; exit 1; }
echo "$step_out"
echo "$step_out" | grep -q "GPU checks passed"
ours_ms=$(echo "$step_out" | sed -n 's/^| fused step, [0-9]* parameters | \([0-9.]*\) ms.*/\1/p')
step_gbs=$(echo "$step_out" | sed -n 's/^| fused step, .* | \([0-9]*\) GB\/s |$/\1/p')
copy_gbs=$(echo "$step_out" | sed -n 's/^| device-to-device copy | .* | \([0-9]*\) GB\/s |$/\1/p')
row "fused ZENITH step, 100M parameters" "$ours_ms ms, $step_gbs GB/s" \
  "$(awk -v s="$step_gbs" -v c="$copy_gbs" 'BEGIN { printf "%.0f%% of copy (%s GB/s)", 100*s/c, c }')"

section "GPU model against the CPU model"
"$bin/zn_gpu_check_model"

section "PyTorch step on the same 100M parameters"
torch_step=$("$python" bench/gpu_step_torch.py 100000000)
echo "$torch_step"
torch_ms=$(echo "$torch_step" | sed -n 's/^torch_step_ms \([0-9.]*\).*/\1/p')
row "PyTorch clip_grad_norm_ + SGD step" "$torch_ms ms" \
  "$(awk -v z="$ours_ms" -v t="$torch_ms" 'BEGIN { printf "Zenith %.2fx faster", t / z }')"

# One epoch of cnn through a coordinator and one worker on $1 (cuda:0 or cpu); prints the
# test accuracy.
daemon_epoch() {
  local dev=$1 dir="$work/daemons-${1/:/}" job acc
  rm -rf "$dir"; mkdir -p "$dir"
  "$bin/zenithd" coordinator --listen 127.0.0.1:0 --port-file "$dir/port" --state "$dir/state" \
    --insecure 2>"$dir/coordinator.log" &
  local coord=$!
  for _ in $(seq 100); do [[ -s "$dir/port" ]] && break; sleep 0.1; done
  local addr="127.0.0.1:$(cat "$dir/port")"
  "$bin/zenithd" worker --coordinator "$addr" --name "w-${dev/:/}" --device "$dev" \
    --threads "$jobs" --insecure 2>"$dir/worker.log" &
  local worker=$!
  job=$("$bin/zenithctl" --coordinator "$addr" submit --model cnn --device "${dev%%:*}" \
    --epochs 1 --seed 1 --data-dir "$data")
  "$bin/zenithctl" --coordinator "$addr" watch "$job" >"$dir/watch.log" || true
  acc=$("$bin/zenithctl" --coordinator "$addr" status "$job" --json |
    sed -n 's/^  "test_accuracy": \([0-9.]*\).*/\1/p')
  kill -TERM "$worker" "$coord" 2>/dev/null || true
  wait "$worker" "$coord" 2>/dev/null || true
  [[ -n "$acc" ]] || { echo "run.sh: the $dev epoch failed; logs in $dir" >&2; return 1; }
  echo "$acc"
}

section "one epoch of cnn: GPU against CPU (seed 1)"
if [[ $mode == full ]]; then
  gpu_acc=$(daemon_epoch cuda:0)
  cpu_acc=$(daemon_epoch cpu)
  cpu_what="Zenith's CPU worker"
else
  # Each run on its own line: a failure nested inside value's argument would not stop the script.
  gpu_line=$("$bin/bench_gpu_train" --data-dir "$data" --epochs 1 --seed 1)
  cpu_line=$("$python" bench/zenith_torch_reference.py --epochs 1 --seed 1 --threads "$jobs" \
    --data-dir "$data")
  echo "$gpu_line"
  echo "$cpu_line"
  gpu_acc=$(value "$gpu_line" test_accuracy)
  cpu_acc=$(value "$cpu_line" test_accuracy)
  cpu_what="PyTorch on the CPU, same ZENITH"
fi
echo "GPU: $gpu_acc   CPU ($cpu_what): $cpu_acc"
# awk reads a missing accuracy as 0, and two of them would pass the comparison.
[[ -n "$gpu_acc" && -n "$cpu_acc" ]] ||
  { echo "run.sh: FAIL: an epoch reported no test accuracy"; exit 1; }
row "cnn, 1 epoch, test accuracy ($data_kind)" "GPU $gpu_acc" "CPU $cpu_acc ($cpu_what)"
awk -v g="$gpu_acc" -v c="$cpu_acc" \
  'BEGIN { d = g - c; if (d < 0) d = -d; if (d > 0.015) { print "FAIL: accuracies differ by " \
  d; exit 1 } print "within 1.5 points: ok" }'

section "cnn training throughput, batch 128"
with_graph=$("$bin/bench_gpu_train" --data-dir "$data" --graph 1)
without_graph=$("$bin/bench_gpu_train" --data-dir "$data" --graph 0)
torch_train=$("$python" bench/bench_gpu_train_torch.py)
printf '%s\n%s\n%s\n' "$with_graph" "$without_graph" "$torch_train"
t=$(value "$torch_train" images_per_s)
for line in "$with_graph" "$without_graph"; do
  r=$(value "$line" images_per_s)
  row "cnn training, CUDA graph $(value "$line" graph | sed 's/1/on/; s/0/off/')" \
    "$r images/s" "$(awk -v z="$r" -v t="$t" 'BEGIN { printf "%.2fx PyTorch (%.0f images/s)", z/t, t }')"
done

section "results ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
echo "| what | Zenith | against |"
echo "| --- | --- | --- |"
printf '%s\n' "${rows[@]}"
