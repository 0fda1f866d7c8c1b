#!/usr/bin/env bash
# The main job, on one machine: a coordinator and two workers on 127.0.0.1
# train the `cnn` model on Fashion-MNIST with ZENITH for 2 epochs; zenithctl
# shows it live and prints the final test accuracy; then the daemons stop.
#   scripts/demo.sh [BIN_DIR]      (default build/bin)
# Logs and the coordinator's state go to $ZENITH_DEMO_DIR (default .demo/).
set -euo pipefail
bin=${1:-build/bin}
dir=${ZENITH_DEMO_DIR:-.demo}
workers=2
epochs=${ZENITH_DEMO_EPOCHS:-2}
seed=${ZENITH_DEMO_SEED:-2}
cores=$(nproc)
threads=$(( cores / workers > 0 ? cores / workers : 1 ))

rm -rf "$dir"
mkdir -p "$dir/logs"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

# Loopback only, so plain text is asked for (--insecure); see the README for TLS and tokens.
"$bin/zenithd" coordinator --listen 127.0.0.1:0 --port-file "$dir/port" --state "$dir/state" \
  --insecure 2>"$dir/logs/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do [[ -s "$dir/port" ]] && break; sleep 0.05; done
[[ -s "$dir/port" ]] || { echo "demo: the coordinator did not start:"; cat "$dir/logs/coordinator.log"; exit 1; }
export ZENITH_COORDINATOR="127.0.0.1:$(cat "$dir/port")"

for i in $(seq "$workers"); do
  "$bin/zenithd" worker --coordinator "$ZENITH_COORDINATOR" --name "worker-$i" \
    --threads "$threads" --insecure 2>"$dir/logs/worker-$i.log" &
  pids+=($!)
done
echo "demo: coordinator on $ZENITH_COORDINATOR, $workers workers with $threads thread(s) each;" \
     "logs in $dir/logs"

job=$("$bin/zenithctl" submit --name demo --model cnn --dataset fashion-mnist --workers "$workers" \
      --batch-size 128 --epochs "$epochs" --seed "$seed" --lr0 0.05 --window 100 --momentum 0.9 \
      --weight-decay 5e-4)
echo "demo: submitted job $job (cnn, $epochs epochs, global batch 128, ZENITH lr0 0.05 window 100)"
start=$(date +%s)
status=0
"$bin/zenithctl" watch "$job" || status=$?
end=$(date +%s)

acc=$("$bin/zenithctl" status "$job" --json | sed -n 's/^  "test_accuracy": \([0-9.]*\).*/\1/p')
if [[ $status -ne 0 ]]; then
  echo "demo: job $job did not succeed; see $dir/logs"
  exit 1
fi
awk -v a="$acc" -v s=$((end - start)) \
  'BEGIN { printf "demo: final test accuracy %.2f%% after %d s of training\n", 100 * a, s }'
