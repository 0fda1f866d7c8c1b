"""Sharded against unsharded optimizer state, on this machine, beside PyTorch.

For 1, 2 and 3 workers, runs the same job through a real coordinator and workers with sharding
"none" and "optimizer" and reports:
  - the step time: wall time between rank 0's reports of step 21 and of the last step, over the
    steps between them;
  - the optimizer state each worker allocated, as its log states it (measured on the heap by
    the worker when it allocates the momentum; not a formula);
then runs bench_sharding_torch.py (DDP with and without ZeroRedundancyOptimizer) with the same
model, global batch and worker counts, and prints both with the ratios.

  BUILD=build /usr/bin/python3 bench/bench_sharding.py [--model mlp] [--steps 300]
"""

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(HERE)
BUILD = os.path.abspath(os.environ.get("BUILD", os.path.join(SOURCE, "build")))
os.environ.setdefault("ZENITH_BIN", os.path.join(BUILD, "bin"))
os.environ.setdefault("ZENITH_PROTO", os.path.join(SOURCE, "proto"))
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
import harness  # noqa: E402
from harness import metrics_of, state_name  # noqa: E402

WARMUP_STEPS = 20
STATE_LINE = re.compile(r"job=(\S+) rank=(\d+) .*optimizer state (\d+) bytes")


def zenith_run(cluster, workers, sharding, args):
    job = cluster.submit(model=args.model, workers=workers, batch_size=args.batch,
                         max_steps=args.steps, seed=1, checkpoint_every=0, sharding=sharding,
                         name="bench-sharding")
    print("  zenith: %d worker(s), sharding %s ..." % (workers, sharding), flush=True)
    final = cluster.wait_final(job.id, timeout=1800)
    if state_name(final.state) != "SUCCEEDED":
        raise SystemExit("job %s %s: %s" % (job.id, state_name(final.state), final.error))
    steps = {m.step: m.unix_ms for m in metrics_of(cluster.watch(job.id, 60))}
    first, last = WARMUP_STEPS + 1, max(steps)
    step_ms = (steps[last] - steps[first]) / (last - first)
    state = {}
    for d in cluster.daemons:
        for m in STATE_LINE.finditer(d.log_text()):
            if m.group(1) == job.id:
                state[int(m.group(2))] = int(m.group(3))
    return step_ms, [state[r] for r in sorted(state)]


def torch_runs(args):
    cmd = [sys.executable, os.path.join(HERE, "bench_sharding_torch.py"), "--model", args.model,
           "--batch", str(args.batch), "--steps", str(args.steps - WARMUP_STEPS),
           "--warmup", str(WARMUP_STEPS), "--workers", args.workers]
    print("  pytorch: %s" % " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    runs = {}
    for line in out.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split()[1:])
        runs[(int(f["workers"]), f["sharding"])] = (
            float(f["step_ms"]), [int(b) for b in f["state_bytes"].split(",")])
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--batch", type=int, default=120, help="global batch (1, 2, 3 divide 120)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", default="1,2,3")
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    cluster = harness.Cluster(label="bench-sharding")
    ours = {}
    try:
        cluster.start_coordinator()
        for i in range(max(counts)):
            cluster.add_worker("bench-w%d" % i)
        for w in counts:
            for sharding in ("none", "optimizer"):
                ours[(w, sharding)] = zenith_run(cluster, w, sharding, args)
    finally:
        cluster.stop()
        cluster.remove()
    theirs = torch_runs(args)

    kb = lambda states: "/".join("%.0f" % (b / 1024) for b in states)  # noqa: E731
    print("\n%s, global batch %d, %d steps (first %d not timed), 1 thread per worker\n"
          % (args.model, args.batch, args.steps, WARMUP_STEPS))
    print("| workers | Zenith step ms none / sharded (ratio) | Zenith state KiB per worker, "
          "none / sharded | PyTorch step ms DDP / ZeRO (ratio) | PyTorch state KiB, DDP / ZeRO "
          "| Zenith sharded / PyTorch ZeRO |")
    print("|---|---|---|---|---|---|")
    for w in counts:
        (zn, zn_state), (zs, zs_state) = ours[(w, "none")], ours[(w, "optimizer")]
        (tn, tn_state), (ts, ts_state) = theirs[(w, "none")], theirs[(w, "optimizer")]
        print("| %d | %.2f / %.2f (%.2f) | %s / %s | %.2f / %.2f (%.2f) | %s / %s | %.2f |"
              % (w, zn, zs, zs / zn, kb(zn_state), kb(zs_state), tn, ts, ts / tn, kb(tn_state),
                 kb(ts_state), zs / ts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
