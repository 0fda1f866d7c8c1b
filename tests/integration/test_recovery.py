"""Checkpoints and recovery with real workers, end to end: a resumed job takes bit-identical
steps; a job whose worker is SIGKILLed, or whose coordinator is SIGKILLed, completes from its
latest checkpoint; damaged checkpoints are refused by name and the one before is used; a worker
leaving on SIGTERM hands the job over through a checkpoint; and a checkpoint opens in numpy and
PyTorch with the worker's own parameters (its test accuracy, recomputed by PyTorch from the
file, is the one the worker reported).

Heartbeats are fast (200 ms, a worker lost after 2 s), so recoveries take seconds.
"""

import gzip
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))
import harness  # noqa: E402
from harness import checkpoints, events, metrics_of, state_name, wait_checkpoint  # noqa: E402
from test_ckpt_python import load_numpy  # noqa: E402

HEARTBEAT_MS = 200
WORKER_TIMEOUT_MS = 2000
DATA_DIR = "/usr/share/datasets/fashion-mnist"
# mlp on 2 workers: a few hundred steps a second here, so checkpoints every 100 steps come fast
# and a job of 800 steps still runs long enough to be interrupted.
JOB = dict(model="mlp", workers=2, batch_size=128, max_steps=800, seed=5, checkpoint_every=100,
           keep_checkpoints=10, name="recovery")


def last_by_step(metrics):
    """A step's metrics as the job finally kept them: a restart runs steps after its checkpoint
    again, and the history keeps both runs, the later one last."""
    out = {}
    for m in metrics:
        out[m.step] = m
    return [out[s] for s in sorted(out)]


class Recovery(harness.ClusterTestCase):

    def cluster(self, workers=("w0", "w1")):
        c = self.new_cluster(heartbeat_ms=HEARTBEAT_MS, worker_timeout_ms=WORKER_TIMEOUT_MS)
        c.start_coordinator()
        for w in workers:
            c.add_worker(w)
        return c

    def run_to_end(self, c, **overrides):
        spec = dict(JOB, **overrides)
        job = c.submit(**spec)
        final = c.wait_final(job.id, timeout=180)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        return final

    def final_tensors(self, c, job):
        ck = checkpoints(c, job.id)[-1]
        self.assertEqual(ck.step, job.step, "the last checkpoint is the final one")
        return load_numpy(ck.path)[0]

    def test_resume_from_a_midway_checkpoint_takes_bit_identical_steps(self):
        c = self.cluster()
        straight = self.run_to_end(c)

        job = c.submit(**JOB)
        mid = wait_checkpoint(c, job.id, 100)
        out = c.ctl("cancel", job.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        out = c.ctl("resume", job.id, "--from", mid.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        resumed = c.wait_final(job.id, timeout=180)
        self.assertEqual(state_name(resumed.state), "SUCCEEDED", resumed.error)

        a, b = self.final_tensors(c, straight), self.final_tensors(c, resumed)
        self.assertEqual(sorted(a), sorted(b))
        for name in a:
            self.assertTrue(np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)),
                            "tensor %s differs after the resume" % name)
        lr_a = {m.step: m.lr for m in last_by_step(metrics_of(c.watch(straight.id, 30)))}
        lr_b = {m.step: m.lr for m in last_by_step(metrics_of(c.watch(job.id, 30)))}
        self.assertEqual(sorted(lr_a), list(range(1, JOB["max_steps"] + 1)))
        # Every step after the checkpoint was reported by the resumed run. (Steps just before
        # the cancel that were not yet reported when it came are not in the history: the
        # cancelled run's late reports are refused. The checkpoint holds their effect.)
        self.assertTrue(set(range(mid.step + 1, JOB["max_steps"] + 1)) <= set(lr_b))
        diff = [(s, lr_a[s], lr_b[s]) for s in sorted(lr_b) if lr_a[s] != lr_b[s]]
        self.assertEqual(diff[:3], [], "eta_t, step by step: (step, straight, resumed)")
        self.assertEqual(resumed.test_accuracy, straight.test_accuracy)

    def test_sigkill_of_a_worker_restarts_the_job_from_its_latest_checkpoint(self):
        c = self.cluster(("w0", "w1", "w2"))
        straight = self.run_to_end(c)

        job = c.submit(**JOB)
        ck = wait_checkpoint(c, job.id, 200)
        victim_name = c.get(job.id).workers[1]
        killed_at = time.time()
        c.workers[victim_name].send(signal.SIGKILL)
        final = c.wait_final(job.id, timeout=180)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.restarts, 1)

        evs = events(c, job.id)
        lost = [e for e in evs if e.kind == "worker_lost"]
        self.assertEqual(len(lost), 1)
        self.assertIn(victim_name, lost[0].message)
        self.assertIn("rank 1", lost[0].message)
        self.assertLess(lost[0].unix_ms / 1000.0 - killed_at, 10.0, "lost worker named within 10 s")
        restarted = [e for e in evs if e.kind == "restarted"]
        self.assertEqual(len(restarted), 1)
        self.assertIn("step %d" % ck.step, restarted[0].message)
        self.assertNotIn(victim_name, final.workers)

        # The first step after the restart continues from a checkpoint at or after ck.
        items = c.watch(job.id, 30)
        after = False
        first_new = None
        for kind, item in items:
            if kind == "event" and item.kind == "restarted":
                after = True
            elif kind == "metrics" and after:
                first_new = item
                break
        self.assertIsNotNone(first_new)
        self.assertGreater(first_new.step, ck.step)
        print("recovery: %.2f s from SIGKILL to the first new step (step %d)"
              % (first_new.unix_ms / 1000.0 - killed_at, first_new.step), file=sys.stderr)
        # Resumed with the same worker count: the same run, so the same accuracy.
        self.assertLessEqual(abs(final.test_accuracy - straight.test_accuracy), 0.01)

    def test_sigkill_of_the_coordinator_keeps_jobs_histories_and_checkpoints(self):
        c = self.cluster()
        job = c.submit(**JOB)
        wait_checkpoint(c, job.id, 200)
        before_ck = [(k.id, k.step, k.digest) for k in checkpoints(c, job.id)]
        before = [(m.step, m.lr, m.grad_norm) for m in metrics_of(c.watch_until_now(job.id))]
        port = c.port
        c.stop_coordinator(signal.SIGKILL)
        c.start_coordinator(port=port)  # where the workers look for it

        after_ck = [(k.id, k.step, k.digest) for k in checkpoints(c, job.id)]
        self.assertEqual(after_ck[:len(before_ck)], before_ck)
        after = [(m.step, m.lr, m.grad_norm) for m in metrics_of(c.watch_until_now(job.id))]
        self.assertEqual(after[:len(before)], before, "the history recorded before the kill")
        listed = c.ctl("list", "--json")
        self.assertIn(job.id, listed.stdout)
        final = c.wait_final(job.id, timeout=180)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        evs = [e for e in events(c, job.id) if e.kind == "requeued"]
        self.assertEqual(len(evs), 1)
        self.assertIn("checkpoint", evs[0].message)
        # Steps after the checkpoint it continued from are all recorded, up to the last. (Steps
        # the workers ran while no coordinator listened were never recorded; the checkpoint
        # holds their effect.)
        steps = [m.step for m in last_by_step(metrics_of(c.watch(job.id, 30)))]
        self.assertEqual(steps[-1], JOB["max_steps"])
        resumed_from = max(k[1] for k in after_ck if k[1] <= steps[-1] and k[1] <= before[-1][0]
                           + 200)
        self.assertTrue(set(range(resumed_from + 1, JOB["max_steps"] + 1)) <= set(steps))

    def test_damaged_checkpoints_are_refused_by_name_and_the_previous_one_used(self):
        c = self.cluster()
        job = c.submit(**JOB)
        wait_checkpoint(c, job.id, 300)
        c.ctl("cancel", job.id)
        cks = checkpoints(c, job.id)
        newest, second, third = cks[-1], cks[-2], cks[-3]
        with open(newest.path, "r+b") as f:  # one flipped byte in the tensor data
            f.seek(os.path.getsize(newest.path) - 100)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))
        with open(second.path, "r+b") as f:  # cut short
            f.truncate(os.path.getsize(second.path) // 2)

        out = c.ctl("resume", job.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        final = c.wait_final(job.id, timeout=180)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        evs = events(c, job.id)
        refused = " ".join(e.message for e in evs if e.kind == "checkpoint_refused")
        self.assertIn(newest.path, refused)
        self.assertIn("digest mismatch", refused)
        self.assertIn(second.path, refused)
        self.assertIn("truncated", refused)
        used = [e.message for e in evs if e.kind == "checkpoint_used"]
        self.assertEqual(len(used), 1, used)
        self.assertIn("checkpoint %s at step %d" % (third.id, third.step), used[0])
        items = c.watch(job.id, 30)
        resumed_at = [i for i, (k, e) in enumerate(items) if k == "event" and e.kind == "resumed"]
        first = next(m for k, m in items[resumed_at[-1]:] if k == "metrics")
        self.assertEqual(first.step, third.step + 1)

    def test_no_readable_checkpoint_says_the_job_starts_again_from_step_0(self):
        c = self.cluster()
        job = c.submit(**JOB)
        wait_checkpoint(c, job.id, 200)
        c.ctl("cancel", job.id)
        for ck in checkpoints(c, job.id):
            with open(ck.path, "r+b") as f:
                f.truncate(100)
        out = c.ctl("resume", job.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        final = c.wait_final(job.id, timeout=180)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        used = [e.message for e in events(c, job.id) if e.kind == "checkpoint_used"]
        self.assertEqual(used, ["none of the job's checkpoints could be read; it starts again "
                                "from step 0"])
        items = c.watch(job.id, 30)
        resumed_at = [i for i, (k, e) in enumerate(items) if k == "event" and e.kind == "resumed"]
        first = next(m for k, m in items[resumed_at[-1]:] if k == "metrics")
        self.assertEqual(first.step, 1)

    def test_sigterm_of_a_worker_hands_the_job_over_through_a_checkpoint(self):
        c = self.cluster(("w0", "w1", "w2"))
        job = c.submit(**JOB)
        wait_checkpoint(c, job.id, 100)
        leaving = c.get(job.id).workers[0]
        c.workers[leaving].stop(signal.SIGTERM)
        final = c.wait_final(job.id, timeout=180)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.restarts, 0, "a preemption is not a failure")
        evs = events(c, job.id)
        pre = [e for e in evs if e.kind == "preempted"]
        self.assertEqual(len(pre), 1)
        self.assertIn(leaving, pre[0].message)
        self.assertNotIn(leaving, final.workers)
        log = c.workers[leaving].log_text()
        self.assertIn("checkpoint written", log)

    def test_on_demand_checkpoint_is_durable_when_the_command_returns(self):
        c = self.cluster()
        job = c.submit(**dict(JOB, max_steps=100000, checkpoint_every=0))
        c.wait_state(job.id, "RUNNING", 30)
        harness.wait_until(lambda: c.get(job.id).step >= 5, 30, "step 5")
        out = c.ctl("checkpoint", job.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        cks = checkpoints(c, job.id)
        self.assertEqual(len(cks), 1)
        self.assertIn(cks[0].path, out.stdout)
        tensors, meta = load_numpy(cks[0].path)
        self.assertEqual(int(meta["zenith.step"]), cks[0].step)
        self.assertEqual(tensors["1.weight"].shape, (256, 784))
        c.ctl("cancel", job.id)

    def test_checkpoint_opens_in_numpy_and_torch_with_the_workers_parameters(self):
        c = self.cluster()
        final = self.run_to_end(c, max_steps=300)
        tensors = self.final_tensors(c, final)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
        expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        params = {k: v for k, v in tensors.items() if not k.startswith(("momentum.", "zenith."))}
        self.assertEqual({k: v.shape for k, v in params.items()}, expect)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})

        x, y = load_test_set()
        with torch.no_grad():
            correct = int((model(x).argmax(1) == y).sum())
        self.assertAlmostEqual(correct / len(y), final.test_accuracy, delta=1.5e-4)


def load_test_set():
    def idx(name):
        with gzip.open(os.path.join(DATA_DIR, name + ".gz"), "rb") as f:
            data = f.read()
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    x = (idx("t10k-images-idx3-ubyte").astype(np.float32) / 255.0 - 0.2860) / 0.3530
    y = idx("t10k-labels-idx1-ubyte").astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


if __name__ == "__main__":
    harness.main()
