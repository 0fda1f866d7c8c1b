"""The public API from a second implementation: Python grpcio, stubs from proto/zenith.proto.

A small job (mlp, 30 steps) is watched from before it starts (everything
arrives live) and again after it has ended (everything is replayed): both
watchers must see steps 1..30 exactly once and in order and end with the job
SUCCEEDED, and GetJob and ListJobs must agree with what they saw. A slower job
(cnn, 30 steps of a few reports each: an mlp step is so quick that 30 of them
fit in one report) gets a second watcher that joins once the first has seen a
step: it must get the history up to that point and then follow live, with no
step lost or repeated at the seam.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import jobs_of, metrics_of, state_name, stubs  # noqa: E402

STEPS = 30
LONG_STEPS = 30


class Watcher(threading.Thread):
    """Reads one WatchJob stream to its end on a thread; `connected` is set at the first item
    and `first_step` at the first metrics item."""

    def __init__(self, cluster, job_id):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.job_id = job_id
        self.items = []
        self.error = None
        self.connected = threading.Event()
        self.first_step = threading.Event()

    def run(self):
        pb2, _ = stubs()
        try:
            stream = self.cluster.stub.WatchJob(pb2.WatchJobRequest(id=self.job_id),
                                                timeout=harness.scaled(120))
            for item in stream:
                kind = item.WhichOneof("item")
                self.items.append((kind, getattr(item, kind)))
                self.connected.set()
                if kind == "metrics":
                    self.first_step.set()
        except Exception as e:  # reported by the test that reads it
            self.error = e
        finally:
            self.connected.set()
            self.first_step.set()

    def result(self, test):
        self.join(harness.scaled(150))
        test.assertFalse(self.is_alive(), "the watcher of %s did not finish" % self.job_id)
        test.assertIsNone(self.error, "the watch stream failed: %r" % self.error)
        return self.items


class GrpcInterop(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        c = cls.c = cls.new_class_cluster()
        c.start_coordinator()
        # Submitted before any worker exists, so the first watchers are in place before step 1.
        cls.submitted = c.submit(model="mlp", max_steps=STEPS, name="interop")
        cls.long = c.submit(model="cnn", max_steps=LONG_STEPS, name="seam")
        cls.early = Watcher(c, cls.submitted.id)
        cls.early_long = Watcher(c, cls.long.id)
        for w in (cls.early, cls.early_long):
            w.start()
            w.connected.wait(harness.scaled(10))
        c.add_worker("w0")
        c.add_worker("w1")
        cls.early_long.first_step.wait(harness.scaled(60))
        cls.joiner = Watcher(c, cls.long.id)
        cls.joiner.start()

    def check_stream(self, items, who, steps=STEPS):
        kinds = [k for k, _ in items]
        self.assertEqual(kinds[0], "job", "%s: first item %s" % (who, kinds[:3]))
        numbers = [m.step for m in metrics_of(items)]
        self.assertEqual(numbers, list(range(1, steps + 1)), "%s: step numbers" % who)
        lr0 = items[0][1].spec.optimizer.lr0
        self.assertEqual(lr0, 0.05, "%s: lr0 of the filled-in spec" % who)
        for m in metrics_of(items):
            self.assertGreater(m.lr, 0, "%s: lr at step %d" % (who, m.step))
            self.assertLessEqual(m.lr, lr0, "%s: lr at step %d" % (who, m.step))
        self.assertEqual(kinds[-1], "job", "%s: last items %s" % (who, kinds[-3:]))
        final = items[-1][1]
        self.assertEqual(state_name(final.state), "SUCCEEDED", "%s: %s" % (who, final.error))
        self.assertEqual(final.step, steps)
        self.assertTrue(final.has_test_result)
        return final

    def test_submit_returns_the_queued_job_with_defaults_filled_in(self):
        job = self.submitted
        self.assertTrue(job.id)
        self.assertEqual(state_name(job.state), "QUEUED")
        self.assertEqual(job.spec.model, "mlp")
        self.assertEqual(job.spec.dataset, "fashion-mnist")
        self.assertEqual(job.spec.workers, 1)
        self.assertEqual(job.spec.batch_size, 128)
        self.assertEqual(job.spec.max_steps, STEPS)
        self.assertEqual(job.spec.optimizer.window, 100)
        self.assertEqual(job.spec.optimizer.momentum, 0.9)

    def test_watch_from_queued_sees_every_step_in_order_and_ends_succeeded(self):
        items = self.early.result(self)
        self.check_stream(items, "watcher connected while queued")
        states = [state_name(j.state) for j in jobs_of(items)]
        self.assertEqual(states[0], "QUEUED")
        self.assertIn("RUNNING", states)
        evals = [e for k, e in items if k == "eval"]
        self.assertEqual([e.step for e in evals], [STEPS])
        self.assertEqual(evals[0].test_accuracy, items[-1][1].test_accuracy)

    def test_watch_joined_mid_job_gets_history_then_live_without_gaps(self):
        items = self.joiner.result(self)
        joined_at = items[0][1].step
        sys.stderr.write("the second watcher joined with the job at step %d of %d\n"
                         % (joined_at, LONG_STEPS))
        self.assertGreater(joined_at, 0, "the watcher must join after the first report")
        self.assertLess(joined_at, LONG_STEPS, "the watcher must join before the end")
        self.check_stream(items, "watcher joined at step %d" % joined_at, LONG_STEPS)
        live = self.early_long.result(self)
        self.check_stream(live, "watcher of the long job connected while queued", LONG_STEPS)
        self.assertEqual(metrics_of(items), metrics_of(live))
        self.assertEqual([e for k, e in items if k == "eval"], [e for k, e in live if k == "eval"])

    def test_list_and_get_agree_with_the_final_watched_job(self):
        final = self.early.result(self)[-1][1]
        pb2, _ = stubs()
        listed = self.c.stub.ListJobs(pb2.ListJobsRequest(), timeout=10).jobs
        ids = [j.id for j in listed]
        self.assertIn(final.id, ids)
        from_list = listed[ids.index(final.id)]
        got = self.c.get(final.id)
        self.assertEqual(got, final, "GetJob:\n%s\nwatched:\n%s" % (got, final))
        self.assertEqual(from_list, final, "ListJobs:\n%s\nwatched:\n%s" % (from_list, final))

    def test_late_watcher_gets_the_whole_history_and_the_final_state(self):
        live = self.early.result(self)
        late = self.c.watch(self.submitted.id, timeout=30)
        final = self.check_stream(late, "watcher connected after the end")
        self.assertEqual(metrics_of(late), metrics_of(live))
        self.assertEqual([e for k, e in late if k == "eval"], [e for k, e in live if k == "eval"])
        self.assertEqual([e.kind for k, e in late if k == "event"],
                         [e.kind for k, e in live if k == "event"])
        self.assertEqual(final, live[-1][1])


if __name__ == "__main__":
    harness.main()
