"""Sharded optimizer state (sharding "optimizer", ZeRO stage 1) with real workers, end to end.

The same job sharded and unsharded on 2 workers takes the same steps: eta_t agrees step by step
and the final weights and momentum agree. On 2 workers the reduced gradient is the same either
way (a sum of two floats does not depend on its order), so the only difference left is the
order in which the sum of squares is added up (per shard, then across shards); how close the
runs are is asserted below with the bounds the test states. A sharded job checkpointed on 2
workers continues on 3 and on 1 (sharded or not) from its checkpoint, with the eta_t sequence
going on from where it stopped. Each worker's log says which shard it keeps and how many bytes
of optimizer state it allocated, measured on the heap; the shards tile the parameter vector.
"""

import os
import re
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))
import harness  # noqa: E402
from harness import checkpoints, events, metrics_of, state_name, wait_checkpoint  # noqa: E402
from test_ckpt_python import load_numpy  # noqa: E402

# mlp (203,530 parameters) with a global batch of 120, which 1, 2 and 3 workers divide. 600
# steps at a few hundred a second: long enough to be stopped after its checkpoint at step 100.
JOB = dict(model="mlp", workers=2, batch_size=120, max_steps=600, seed=11, checkpoint_every=100,
           keep_checkpoints=10, name="sharding")
MLP_PARAMS = 203530

# eta_t is a double computed from the same norms up to the order of one sum in double: it may
# differ in its last bits, no more.
ETA_RTOL = 1e-12
# The weights and momentum after 600 steps, relative to each tensor's largest magnitude.
TENSOR_RTOL = 1e-6
# After a resume on another worker count the gradient is summed in another order (per-worker
# means over other slices of the same global batch): the first steps after the checkpoint agree
# to float precision, and the rest of the run stays close.
RESUMED_FIRST_STEPS = 10
RESUMED_FIRST_RTOL = 1e-6


def eta_by_step(c, job_id):
    """eta_t of each step as the job finally kept it (a resumed run's report of a step wins)."""
    out = {}
    for m in metrics_of(c.watch(job_id, 30)):
        out[m.step] = m.lr
    return out


def relative_gap(a, b):
    """max |a - b| over max |a| (0 for equal tensors)."""
    scale = float(np.max(np.abs(a))) or 1.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / scale


def tiling(workers, n=MLP_PARAMS, align=16):
    """The shards [lo, hi) of n parameters on `workers` ranks: equal blocks of a whole number
    of 16 floats, the last shard shorter."""
    block = -(-(-(-n // workers)) // align) * align
    return [(min(r * block, n), min((r + 1) * block, n)) for r in range(workers)]


SHARD_LINE = re.compile(r"job=(\S+) .*sharding optimizer: this rank keeps the momentum of "
                        r"parameters \[(\d+), (\d+)\) of (\d+) \((\d+)\); optimizer state "
                        r"(\d+) bytes \(heap measured\)")


class Sharding(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        cls.c = cls.new_class_cluster()
        cls.c.start_coordinator()
        for name in ("w0", "w1", "w2"):
            cls.c.add_worker(name)

    def run_to_end(self, **overrides):
        final = self.c.wait_final(self.c.submit(**dict(JOB, **overrides)).id, timeout=240)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        return final

    def final_tensors(self, job):
        ck = checkpoints(self.c, job.id)[-1]
        self.assertEqual(ck.step, job.step, "the last checkpoint is the final one")
        tensors, meta = load_numpy(ck.path)
        return tensors, meta

    def shard_lines(self, job_id):
        found = []
        for d in self.c.daemons:
            if d.name.startswith("worker "):
                for m in SHARD_LINE.finditer(d.log_text()):
                    if m.group(1) == job_id:
                        found.append(tuple(int(x) for x in m.groups()[1:]))
        return found

    def test_sharded_and_unsharded_runs_take_the_same_steps(self):
        plain = self.run_to_end(sharding="none")
        sharded = self.run_to_end(sharding="optimizer")
        self.assertEqual(self.c.get(sharded.id).spec.sharding, "optimizer")

        eta_plain, eta_sharded = eta_by_step(self.c, plain.id), eta_by_step(self.c, sharded.id)
        self.assertEqual(sorted(eta_sharded), list(range(1, JOB["max_steps"] + 1)))
        self.assertEqual(sorted(eta_plain), sorted(eta_sharded))
        gaps = [abs(eta_plain[s] - eta_sharded[s]) / eta_plain[s] for s in sorted(eta_plain)]
        self.assertLessEqual(max(gaps), ETA_RTOL, "eta_t, sharded against unsharded")

        (a, meta_a), (b, meta_b) = self.final_tensors(plain), self.final_tensors(sharded)
        self.assertEqual(meta_a["zenith.sharding"], "none")
        self.assertEqual(meta_b["zenith.sharding"], "optimizer")
        self.assertEqual(sorted(a), sorted(b))
        self.assertIn("momentum.1.weight", b, "the gathered momentum is in the checkpoint")
        for name in a:
            self.assertEqual(a[name].shape, b[name].shape, name)
            self.assertLessEqual(relative_gap(a[name], b[name]), TENSOR_RTOL, name)
        self.assertAlmostEqual(plain.test_accuracy, sharded.test_accuracy, delta=0.002)

        # Two ranks, each with its shard; together they cover the vector once, and each one's
        # measured optimizer state is its shard's momentum (a page or so of allocator rounding).
        shards = sorted(self.shard_lines(sharded.id))
        self.assertEqual([(lo, hi) for lo, hi, _, _, _ in shards], tiling(2))
        for lo, hi, n, length, measured in shards:
            self.assertEqual((n, length), (MLP_PARAMS, hi - lo))
            self.assertGreaterEqual(measured, 4 * length)
            self.assertLess(measured, 4 * length + 8192)

    def resumed_on(self, workers, sharding):
        """A sharded 2-worker job stopped after its checkpoint at step 100 and resumed on
        `workers` workers with `sharding`; returns (the job, its checkpoint, eta by step)."""
        job = self.c.submit(**dict(JOB, sharding="optimizer"))
        mid = wait_checkpoint(self.c, job.id, 100)
        out = self.c.ctl("cancel", job.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        out = self.c.ctl("resume", job.id, "--from", mid.id, "--workers", workers,
                         "--sharding", sharding)
        self.assertEqual(out.returncode, 0, out.stderr)
        final = self.c.wait_final(job.id, timeout=240)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual((final.spec.workers, final.spec.sharding), (workers, sharding))
        self.assertEqual(len(final.workers), workers)
        return final, mid, eta_by_step(self.c, job.id)

    def check_continues(self, resumed, mid, eta):
        straight = eta_by_step(self.c, self.straight_sharded().id)
        after = [s for s in sorted(eta) if s > mid.step]
        self.assertEqual(after, list(range(mid.step + 1, JOB["max_steps"] + 1)),
                         "the resumed run reports every step after its checkpoint")
        first = [abs(eta[s] - straight[s]) / straight[s] for s in after[:RESUMED_FIRST_STEPS]]
        self.assertLessEqual(max(first), RESUMED_FIRST_RTOL,
                             "eta_t just after the checkpoint, against the run never stopped")
        self.assertAlmostEqual(resumed.test_accuracy, self.straight_sharded().test_accuracy,
                               delta=0.01)

    _straight = None

    def straight_sharded(self):
        if Sharding._straight is None:
            Sharding._straight = self.run_to_end(sharding="optimizer")
        return Sharding._straight

    def test_sharded_checkpoint_resumes_on_three_workers(self):
        resumed, mid, eta = self.resumed_on(3, "optimizer")
        self.check_continues(resumed, mid, eta)
        # The 2 shards of the first run, then 3 of the resumed one, each set tiling the vector
        # in blocks of whole 64-byte lines.
        shards = sorted((lo, hi) for lo, hi, _, _, _ in self.shard_lines(resumed.id))
        self.assertEqual(shards, sorted(tiling(2) + tiling(3)))

    def test_sharded_checkpoint_resumes_on_one_worker_unsharded(self):
        resumed, mid, eta = self.resumed_on(1, "none")
        self.check_continues(resumed, mid, eta)

    def test_sharded_checkpoint_resumes_on_one_worker_sharded(self):
        resumed, mid, eta = self.resumed_on(1, "optimizer")
        self.check_continues(resumed, mid, eta)

    def test_on_demand_checkpoint_holds_every_shards_momentum(self):
        job = self.c.submit(**dict(JOB, sharding="optimizer", max_steps=100000,
                                   checkpoint_every=0))
        harness.wait_until(lambda: self.c.get(job.id).step >= 5, 60, "step 5")
        out = self.c.ctl("checkpoint", job.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.c.ctl("cancel", job.id)
        cks = checkpoints(self.c, job.id)
        self.assertEqual(len(cks), 1)
        tensors, meta = load_numpy(cks[0].path)
        self.assertEqual((meta["zenith.sharding"], meta["zenith.workers"]), ("optimizer", "2"))
        # Rank 0 keeps momentum [0, 101776), which ends inside 1.weight; rank 1 the rest. Both
        # halves are in the file that rank 0 wrote (weights of dead ReLU units stay at 0).
        flat = np.concatenate([tensors["momentum." + name].ravel()
                               for name in ("1.weight", "1.bias", "3.weight", "3.bias")])
        self.assertEqual(flat.size, MLP_PARAMS)
        cut = tiling(2)[0][1]
        for part in (flat[:cut], flat[cut:]):
            self.assertGreater(np.count_nonzero(part) / part.size, 0.5)

    def test_sigterm_of_rank_one_hands_a_sharded_job_over(self):
        """Last (tests run in the order written): it stops one of the cluster's workers."""
        job = self.c.submit(**dict(JOB, sharding="optimizer", max_steps=1500,
                                   keep_checkpoints=100))
        wait_checkpoint(self.c, job.id, 100)
        leaving = self.c.get(job.id).workers[1]
        self.c.workers[leaving].stop(signal.SIGTERM)
        final = self.c.wait_final(job.id, timeout=240)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.restarts, 0, "a preemption is not a failure")
        self.assertNotIn(leaving, final.workers)
        log = self.c.workers[leaving].log_text()
        self.assertIn("checkpoint written", log, "rank 1 wrote the gathered state")
        written = [k for k in checkpoints(self.c, job.id) if k.path.endswith("-r1.safetensors")]
        self.assertEqual(len(written), 1)
        tensors, _ = load_numpy(written[0].path)
        self.assertGreater(np.count_nonzero(tensors["momentum.1.weight"].ravel()[:1000]), 0,
                           "rank 0's shard of the momentum is in rank 1's file")
        self.c.add_worker(leaving, wait=False)
        self.c.wait_registered(leaving, count=2)


class ShardedRecovery(harness.ClusterTestCase):
    """Losing workers of sharded jobs: each test has a cluster of its own with fast heartbeats
    (a worker silent for 2 s is lost), as the tests kill or stop its workers."""

    def cluster(self, names):
        c = self.new_cluster(heartbeat_ms=200, worker_timeout_ms=2000)
        c.start_coordinator()
        for name in names:
            c.add_worker(name)
        return c

    def test_sigkill_of_one_of_three_workers_restarts_from_the_checkpoint(self):
        # Both survivors see the broken collective; the job is restarted once, not failed.
        c = self.cluster(("w0", "w1", "w2", "w3"))
        job = c.submit(**dict(JOB, workers=3, sharding="optimizer", max_steps=1500))
        ck = wait_checkpoint(c, job.id, 100)
        victim = c.get(job.id).workers[1]
        c.workers[victim].send(signal.SIGKILL)
        final = c.wait_final(job.id, timeout=240)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.restarts, 1)
        self.assertNotIn(victim, final.workers)
        evs = events(c, job.id)
        lost = [e for e in evs if e.kind == "worker_lost"]
        self.assertEqual(len(lost), 1)
        self.assertIn(victim, lost[0].message)
        restarted = [e for e in evs if e.kind == "restarted"]
        self.assertEqual(len(restarted), 1)
        self.assertGreaterEqual(int(re.search(r"step (\d+)", restarted[0].message).group(1)),
                                ck.step)

    def test_sigterm_of_both_workers_at_once_costs_no_restart(self):
        # A node drain: both ranks write the gathered state and leave; the job goes on with the
        # two other workers, and neither leaver is given the job again.
        c = self.cluster(("w0", "w1", "w2", "w3"))
        job = c.submit(**dict(JOB, sharding="optimizer", max_steps=1500, max_restarts=0))
        wait_checkpoint(c, job.id, 100)
        leaving = list(c.get(job.id).workers)
        for name in leaving:
            c.workers[name].send(signal.SIGTERM)
        final = c.wait_final(job.id, timeout=240)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.restarts, 0, "a preemption is not a failure")
        self.assertEqual(set(final.workers) & set(leaving), set())
        evs = events(c, job.id)
        self.assertEqual([e for e in evs if e.kind == "worker_lost"], [])
        self.assertGreaterEqual(len([e for e in evs if e.kind == "preempted"]), 1)


load_tests = harness.in_definition_order(globals())

if __name__ == "__main__":
    harness.main()
