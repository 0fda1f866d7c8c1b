"""Jobs that end before their time: cancelled by a user, or losing a worker to SIGKILL or
SIGTERM; and a coordinator restart, which must keep what the coordinator has recorded.

The long job here allows no automatic restart (max_restarts 0), so a lost worker fails it as
it would once its restarts are used up; restarts themselves are tested in test_checkpoints.py
(fake workers) and test_recovery.py (real ones). A worker stopped by SIGTERM leaves after a
checkpoint, and its job goes back to the queue (a preemption, which no max_restarts limits).

Heartbeats are fast here (every 200 ms, a worker lost after 2 s of silence), so a
lost worker is noticed within a few seconds. After each failure the test checks
that the workers left standing are free: a new job is scheduled on them and
finishes, which is what an operator needs after such an event.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import metrics_of, state_name, stubs  # noqa: E402

HEARTBEAT_MS = 200
WORKER_TIMEOUT_MS = 2000
LONG_JOB = dict(model="mlp", workers=2, max_steps=1000000, max_restarts=0, name="long")


class CancelAndLost(harness.ClusterTestCase):

    def two_worker_cluster(self):
        c = self.new_cluster(heartbeat_ms=HEARTBEAT_MS, worker_timeout_ms=WORKER_TIMEOUT_MS)
        c.start_coordinator()
        c.add_worker("w0")
        c.add_worker("w1")
        return c

    def start_long_job(self, c):
        """A 2-worker job that is running and past step 5; returns the Job."""
        job_id = c.submit(**LONG_JOB).id

        def past_step_5():
            job = c.get(job_id)
            return job if job.step >= 5 else None

        return harness.wait_until(past_step_5, 60, "job %s to pass step 5" % job_id, interval=0.1)

    def assert_small_job_succeeds(self, c, workers, on=None):
        job = c.submit(model="mlp", workers=workers, max_steps=10, name="after")
        final = c.wait_final(job.id, timeout=60)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        if on is not None:
            self.assertEqual(list(final.workers), on)
        return final

    def test_cancel_of_running_job_ends_it_and_frees_both_workers(self):
        c = self.two_worker_cluster()
        job = self.start_long_job(c)

        out = c.ctl("cancel", job.id)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "%s CANCELLED" % job.id)
        cancelled = c.get(job.id)
        self.assertEqual(state_name(cancelled.state), "CANCELLED")
        for name in ("w0", "w1"):
            harness.wait_until(lambda: "job stopped at step" in c.workers[name].log_text(), 20,
                               "worker %s to stop the cancelled job" % name)
        self.assert_small_job_succeeds(c, 2)
        self.assertEqual(state_name(c.get(job.id).state), "CANCELLED",
                         "a cancelled job must stay cancelled")

    def kill_rank_1(self, c, sig):
        """Starts a long 2-worker job and sends sig to its rank 1; returns (job, victim,
        survivor)."""
        job = self.start_long_job(c)
        victim, survivor = job.workers[1], job.workers[0]
        c.workers[victim].send(sig)
        return job, victim, survivor

    # The surviving rank sees its allreduce fail the moment the peer's socket closes, and
    # reports that first; the coordinator ends the job with the survivor's error (rank 0,
    # "Connection reset by peer") before its heartbeat check finds the lost worker. An
    # operator is then pointed at the wrong worker.
    def test_sigkill_of_worker_fails_job_within_10s_naming_it_and_its_rank(self):
        c = self.two_worker_cluster()
        job, victim, _ = self.kill_rank_1(c, signal.SIGKILL)
        killed_at = time.monotonic()
        failed = c.wait_final(job.id, timeout=10)
        took = time.monotonic() - killed_at
        sys.stderr.write("job failed %.2f s after the SIGKILL: %s\n" % (took, failed.error))
        self.assertEqual(state_name(failed.state), "FAILED")
        self.assertIn("worker %s" % victim, failed.error, "the error must name the lost worker")
        self.assertIn("rank 1", failed.error, "the error must name the lost worker's rank")

    def test_worker_surviving_a_sigkilled_peer_takes_the_next_job(self):
        c = self.two_worker_cluster()
        job, _, survivor = self.kill_rank_1(c, signal.SIGKILL)
        self.assertEqual(state_name(c.wait_final(job.id, timeout=10).state), "FAILED")
        self.assert_small_job_succeeds(c, 1, on=[survivor])

    def test_sigterm_of_worker_requeues_job_naming_it_and_frees_the_other(self):
        c = self.two_worker_cluster()
        job, victim, other = self.kill_rank_1(c, signal.SIGTERM)
        self.assertEqual(c.workers[victim].wait_exit(10), 0, "exit code of the SIGTERMed worker")
        queued = c.wait_state(job.id, "QUEUED", timeout=10)
        self.assertEqual(queued.restarts, 0, "a preemption is not a restart")
        pb2, _ = stubs()
        history = c.stub.WatchJob(pb2.WatchJobRequest(id=job.id, history_only=True),
                                  timeout=harness.scaled(10))
        preempted = [i.event.message for i in history
                     if i.WhichOneof("item") == "event" and i.event.kind == "preempted"]
        self.assertEqual(len(preempted), 1)
        self.assertIn("worker %s (rank 1) left on SIGTERM after a checkpoint" % victim,
                      preempted[0])

        # The job waits for a second worker; the one left takes a smaller job meanwhile.
        self.assert_small_job_succeeds(c, 1, on=[other])
        self.assertEqual(state_name(c.get(job.id).state), "QUEUED")

    def test_coordinator_restart_keeps_job_list_and_history(self):
        c = self.new_cluster(heartbeat_ms=HEARTBEAT_MS, worker_timeout_ms=WORKER_TIMEOUT_MS)
        c.start_coordinator()
        c.add_worker("w0")
        done = c.submit(model="mlp", max_steps=25, name="done")
        self.assertEqual(state_name(c.wait_final(done.id, timeout=60).state), "SUCCEEDED")
        waiting = c.submit(model="mlp", workers=2, max_steps=10, name="waits for 2 workers")
        pb2, _ = stubs()
        jobs_before = c.stub.ListJobs(pb2.ListJobsRequest(), timeout=10).jobs
        history_before = c.watch(done.id, timeout=30)
        self.assertEqual(len(metrics_of(history_before)), 25)

        port = c.port
        self.assertEqual(c.stop_coordinator(), 0, "exit code of the coordinator on SIGTERM")
        c.start_coordinator(port=port)

        jobs_after = c.stub.ListJobs(pb2.ListJobsRequest(), timeout=10).jobs
        self.assertEqual([j.id for j in jobs_after], [done.id, waiting.id])
        self.assertEqual(jobs_after[0], jobs_before[0])
        self.assertEqual(state_name(jobs_after[1].state), "QUEUED")
        history_after = c.watch(done.id, timeout=30)
        self.assertEqual(len(metrics_of(history_after)), len(metrics_of(history_before)))
        self.assertEqual(metrics_of(history_after), metrics_of(history_before))
        self.assertEqual(history_after[-1][1], history_before[-1][1])


if __name__ == "__main__":
    harness.main()
