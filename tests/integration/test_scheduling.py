"""Queued jobs run one after another on a worker that keeps finishing them.

The hand-over is the delicate moment: the coordinator frees a worker when its
FinishJob arrives and may hand it the next job on the very next heartbeat,
while the worker is still tearing down the job it has just reported. With
heartbeats every 10 ms and a queue of one-step jobs, every hand-over falls into
that moment often enough that an assignment the worker drops shows up as a job
stuck in RUNNING at step 0.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import state_name  # noqa: E402

QUEUED_JOBS = 16


class Scheduling(harness.ClusterTestCase):

    def test_queued_jobs_run_back_to_back_on_one_worker(self):
        c = self.new_cluster(heartbeat_ms=10, worker_timeout_ms=1000)
        c.start_coordinator()
        c.add_worker("w0")
        ids = [c.submit(model="mlp", max_steps=1, name="queued %d" % i).id
               for i in range(QUEUED_JOBS)]
        for n, job_id in enumerate(ids):
            stuck = None
            try:
                job = c.wait_final(job_id, timeout=10)
            except AssertionError as e:
                stuck = str(e)
            if stuck:
                received = "assigned job %s " % job_id in c.workers["w0"].log_text()
                self.fail("%s (job %d of %d); the worker %s logged receiving it"
                          % (stuck, n + 1, QUEUED_JOBS, "has" if received else "has NOT"))
            self.assertEqual(state_name(job.state), "SUCCEEDED", job.error)


if __name__ == "__main__":
    harness.main()
