"""The public API from a second implementation: Python grpcio, stubs from proto/zenith.proto.

One small job (mlp, 30 steps, one worker) is followed by three watchers: one
that connects while the job is still queued (it sees everything live), one that
joins once the first has seen a step (its history is replayed, then it follows
live), and one that connects after the job has ended (all replay). Each must
see steps 1..30 exactly once and in order, and end with the job SUCCEEDED.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import jobs_of, metrics_of, state_name, stubs  # noqa: E402

STEPS = 30


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
        # Submitted before any worker exists, so the first watcher is in place before step 1.
        cls.submitted = c.submit(model="mlp", max_steps=STEPS, name="interop")
        cls.early = Watcher(c, cls.submitted.id)
        cls.early.start()
        cls.early.connected.wait(harness.scaled(10))
        c.add_worker("w0")
        cls.early.first_step.wait(harness.scaled(60))
        cls.joiner = Watcher(c, cls.submitted.id)
        cls.joiner.start()

    def check_stream(self, items, who):
        kinds = [k for k, _ in items]
        self.assertEqual(kinds[0], "job", "%s: first item %s" % (who, kinds[:3]))
        steps = [m.step for m in metrics_of(items)]
        self.assertEqual(steps, list(range(1, STEPS + 1)), "%s: step numbers" % who)
        lr0 = items[0][1].spec.optimizer.lr0
        self.assertEqual(lr0, 0.05, "%s: lr0 of the filled-in spec" % who)
        for m in metrics_of(items):
            self.assertGreater(m.lr, 0, "%s: lr at step %d" % (who, m.step))
            self.assertLessEqual(m.lr, lr0, "%s: lr at step %d" % (who, m.step))
        self.assertEqual(kinds[-1], "job", "%s: last items %s" % (who, kinds[-3:]))
        final = items[-1][1]
        self.assertEqual(state_name(final.state), "SUCCEEDED", "%s: %s" % (who, final.error))
        self.assertEqual(final.step, STEPS)
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
        sys.stderr.write("the second watcher joined with the job at step %d of %d\n"
                         % (items[0][1].step, STEPS))
        self.check_stream(items, "watcher joined after step 1")

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
