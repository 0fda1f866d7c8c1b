"""The `sharding` field of a job spec and the overrides of ResumeJob, on the coordinator and in
zenithctl; no training runs here.

A spec's sharding is "none" (every worker keeps the whole optimizer state) or "optimizer" (each
keeps the momentum of its own shard of the parameters). The coordinator stores "none" when a
spec leaves it unset, also for a job stored before the field existed, refuses any other value
and refuses "optimizer" for a cuda job, naming the field. ResumeJob can change a job's workers
and sharding for the attempts to come: checked as at submit, stored before the call returns
(so a coordinator killed right after keeps them), told in the "resumed" event, and a refused
resume leaves the job as it was. The workers are fake (fake_worker.FakeWorker), so a test
decides when a checkpoint is reported and sees the assignments the coordinator hands out.
"""

import json
import os
import signal
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402

import harness  # noqa: E402
from fake_worker import FakeWorker  # noqa: E402
from harness import assert_rpc_error, jobs_of, state_name, stubs  # noqa: E402

HEARTBEAT_MS = 100
WORKER_TIMEOUT_MS = int(1500 * harness.TIME_SCALE)
LONG = dict(model="mlp", max_steps=1000000)

UNKNOWN_SHARDING = "sharding: unknown sharding '%s'; choose none or optimizer"
CUDA_REFUSAL = ("sharding: 'optimizer' runs on cpu jobs only in this version; use --sharding none "
                "for cuda jobs")
SHARDED_LINE = "\nsharding:      optimizer (each worker keeps the momentum of its shard)\n"


class ShardingCase(harness.ClusterTestCase):
    """Helpers over a cluster with fast heartbeats."""

    def cluster(self):
        c = self.new_cluster(heartbeat_ms=HEARTBEAT_MS, worker_timeout_ms=WORKER_TIMEOUT_MS)
        c.start_coordinator()
        self.pb2, _ = stubs()
        return c

    def job_ids(self, c):
        return [j.id for j in c.stub.ListJobs(self.pb2.ListJobsRequest(),
                                              timeout=harness.scaled(10)).jobs]

    def first_watched_job(self, c, job_id):
        """The first message of WatchJob: the job as it is now."""
        req = self.pb2.WatchJobRequest(id=job_id, history_only=True)
        return jobs_of([(item.WhichOneof("item"), getattr(item, item.WhichOneof("item")))
                        for item in c.stub.WatchJob(req, timeout=harness.scaled(10))])[0]

    def events(self, c, job_id, kind):
        req = self.pb2.WatchJobRequest(id=job_id, history_only=True)
        return [item.event.message for item in c.stub.WatchJob(req, timeout=harness.scaled(10))
                if item.WhichOneof("item") == "event" and item.event.kind == kind]

    def ctl_ok(self, c, *args):
        out = c.ctl(*args)
        self.assertEqual(out.returncode, 0, "zenithctl %s: %s" % (" ".join(map(str, args)),
                                                                  out.stderr))
        return out.stdout

    def status_json(self, c, job_id):
        return json.loads(self.ctl_ok(c, "status", job_id, "--json"))

    def cancel(self, c, job_id):
        c.stub.CancelJob(self.pb2.CancelJobRequest(id=job_id), timeout=harness.scaled(10))

    def resume(self, c, job_id, **overrides):
        req = self.pb2.ResumeJobRequest(id=job_id, **overrides)
        return c.stub.ResumeJob(req, timeout=harness.scaled(10))

    def stopped_job(self, c, names, device="cpu", **spec):
        """A job run by fake workers `names` that reported a checkpoint at step 10 and was then
        cancelled; returns (job id, the workers, now idle)."""
        workers = [FakeWorker(c, n, device=device, stop_on_cancel=True) for n in names]
        for w in workers:
            self.addCleanup(w.close)
        fields = dict(LONG, workers=len(names), batch_size=64 * len(names), device=device)
        fields.update(spec)
        job_id = c.submit(**fields).id
        for w in workers:
            w.wait_assignment(job_id)
        c.wait_state(job_id, "RUNNING", timeout=10)
        rank0 = [w for w in workers if w.assignment.rank == 0][0]
        rank0.report_checkpoint(10)
        self.cancel(c, job_id)
        for w in workers:
            harness.wait_until(lambda: w.assignment is None, 10,
                               "%s to stop the cancelled job" % w.name)
        return job_id, workers


# ---------------------------------------------------------------- the spec field

class ShardingSpec(ShardingCase):

    def test_unset_sharding_is_stored_as_none_and_shown(self):
        c = self.cluster()
        submitted = c.submit(**LONG)
        self.assertEqual(submitted.spec.sharding, "none")
        self.assertTrue(submitted.spec.HasField("sharding"))
        self.assertEqual(c.get(submitted.id).spec.sharding, "none")
        self.assertEqual(self.status_json(c, submitted.id)["spec"]["sharding"], "none")
        self.assertIn("\nsharding:      none\n", self.ctl_ok(c, "status", submitted.id))
        self.assertEqual(self.events(c, submitted.id, "submitted"),
                         ["job submitted: model mlp, 1 cpu worker(s), batch 128"])

    def test_optimizer_sharding_is_stored_and_shown_by_every_view(self):
        c = self.cluster()
        job_id = c.submit(**dict(LONG, workers=2, sharding="optimizer")).id
        self.assertEqual(c.get(job_id).spec.sharding, "optimizer")
        listed = [j for j in c.stub.ListJobs(self.pb2.ListJobsRequest(),
                                             timeout=harness.scaled(10)).jobs if j.id == job_id]
        self.assertEqual([j.spec.sharding for j in listed], ["optimizer"])
        self.assertEqual(self.first_watched_job(c, job_id).spec.sharding, "optimizer")
        self.assertEqual(self.status_json(c, job_id)["spec"]["sharding"], "optimizer")
        self.assertIn(SHARDED_LINE, self.ctl_ok(c, "status", job_id))
        self.assertEqual(self.events(c, job_id, "submitted"), [
            "job submitted: model mlp, 2 cpu worker(s), batch 128, sharding optimizer"])

        from_flag = self.ctl_ok(c, "submit", "--model", "mlp", "--max-steps", 5, "--sharding",
                                "optimizer").strip()
        self.assertEqual(c.get(from_flag).spec.sharding, "optimizer")
        none_flag = self.ctl_ok(c, "submit", "--model", "mlp", "--max-steps", 5, "--sharding",
                                "none").strip()
        self.assertEqual(c.get(none_flag).spec.sharding, "none")

    def test_unknown_sharding_is_invalid_argument_naming_the_choices(self):
        c = self.cluster()
        for value in ("zero3", "Optimizer", "none "):
            with self.subTest(value=value):
                req = self.pb2.SubmitJobRequest(spec=c.spec(**dict(LONG, sharding=value)))
                err = assert_rpc_error(self, lambda: c.stub.SubmitJob(req, timeout=10),
                                       grpc.StatusCode.INVALID_ARGUMENT)
                self.assertEqual(err.details(), "invalid job spec: " + UNKNOWN_SHARDING % value)
        self.assertEqual(self.job_ids(c), [])

    def test_optimizer_sharding_of_a_cuda_job_is_refused(self):
        c = self.cluster()
        req = self.pb2.SubmitJobRequest(spec=c.spec(**dict(LONG, device="cuda",
                                                           sharding="optimizer")))
        err = assert_rpc_error(self, lambda: c.stub.SubmitJob(req, timeout=10),
                               grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(err.details(), "invalid job spec: " + CUDA_REFUSAL)
        out = c.ctl("submit", "--model", "mlp", "--max-steps", 5, "--device", "cuda",
                    "--sharding", "optimizer")
        self.assertEqual((out.returncode, out.stdout), (1, ""), out.stderr)
        self.assertIn("INVALID_ARGUMENT: invalid job spec: " + CUDA_REFUSAL, out.stderr)
        self.assertEqual(self.job_ids(c), [])
        cuda_unsharded = c.submit(**dict(LONG, device="cuda", sharding="none"))
        self.assertEqual((cuda_unsharded.spec.device, cuda_unsharded.spec.sharding),
                         ("cuda", "none"))

    def test_zenithctl_submit_with_a_bad_sharding_flag_submits_nothing(self):
        c = self.cluster()
        for value in ("bogus", ""):
            with self.subTest(value=value):
                out = c.ctl("submit", "--model", "mlp", "--max-steps", 5, "--sharding", value)
                self.assertEqual((out.returncode, out.stdout), (2, ""), out.stderr)
                self.assertEqual(out.stderr, "zenithctl submit: --sharding expects none or "
                                             "optimizer, got '%s'\n" % value)
        self.assertEqual(self.job_ids(c), [])
        self.assertNotIn("QUEUED", c.coordinator.log_text())

    def test_watch_header_says_when_a_job_is_sharded(self):
        c = self.cluster()
        sharded = c.submit(**dict(LONG, sharding="optimizer")).id
        plain = c.submit(**LONG).id
        for job_id in (sharded, plain):
            self.cancel(c, job_id)
        lines = c.ctl("watch", sharded).stdout.splitlines()
        self.assertEqual(lines[0], "%s CANCELLED, sharding optimizer: cancelled by a user"
                         % sharded)
        lines = c.ctl("watch", plain).stdout.splitlines()
        self.assertEqual(lines[0], "%s CANCELLED: cancelled by a user" % plain)
        self.assertEqual(len([line for line in lines if "CANCELLED" in line]), 1,
                         "the end of an ended job is said once")

    def test_job_stored_before_the_field_reads_back_as_none(self):
        c = self.cluster()
        queued = c.submit(**LONG).id
        cancelled = c.submit(**LONG).id
        self.cancel(c, cancelled)
        c.stop_coordinator()

        # Rewrite both rows as a coordinator that predates the field would have stored them.
        db = sqlite3.connect(os.path.join(c.state_dir, "zenith.db"))
        with db:
            for job_id, blob in db.execute("SELECT id, job FROM jobs").fetchall():
                job = self.pb2.Job.FromString(blob)
                job.spec.ClearField("sharding")
                db.execute("UPDATE jobs SET job = ? WHERE id = ?",
                           (job.SerializeToString(), job_id))
        stored = [self.pb2.Job.FromString(b) for (b,) in db.execute("SELECT job FROM jobs")]
        db.close()
        self.assertEqual([j.spec.HasField("sharding") for j in stored], [False, False])

        c.start_coordinator()
        listed = {j.id: j.spec for j in c.stub.ListJobs(self.pb2.ListJobsRequest(),
                                                        timeout=harness.scaled(10)).jobs}
        for job_id in (queued, cancelled):
            with self.subTest(job=job_id):
                self.assertEqual(c.get(job_id).spec.sharding, "none")
                self.assertTrue(c.get(job_id).spec.HasField("sharding"))
                self.assertEqual(listed[job_id].sharding, "none")
                self.assertEqual(self.first_watched_job(c, job_id).spec.sharding, "none")
                self.assertEqual(self.status_json(c, job_id)["spec"]["sharding"], "none")
        self.assertEqual(state_name(c.get(queued).state), "QUEUED")


# ---------------------------------------------------------------- ResumeJob overrides

class ResumeOverrides(ShardingCase):

    def test_resume_on_workers_that_do_not_divide_the_batch_is_refused_and_changes_nothing(self):
        c = self.cluster()
        job_id, _ = self.stopped_job(c, ["f0", "f1"])
        before = c.get(job_id)
        self.assertEqual((before.spec.workers, before.spec.batch_size), (2, 128))

        err = assert_rpc_error(self, lambda: self.resume(c, job_id, workers=3),
                               grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(err.details(),
                         "cannot resume job %s: workers: 3 does not divide batch_size 128; each "
                         "worker takes an equal slice, so choose one of 1, 2, 4, 8, 16, 32, 64, "
                         "128; the job is unchanged" % job_id)
        out = c.ctl("resume", job_id, "--workers", 3)
        self.assertEqual((out.returncode, out.stdout), (1, ""), out.stderr)
        self.assertIn("INVALID_ARGUMENT: cannot resume job %s: workers: 3 does not divide "
                      "batch_size 128" % job_id, out.stderr)
        self.assertEqual(c.get(job_id), before)
        self.assertEqual(self.events(c, job_id, "resumed"), [])

    def test_other_bad_overrides_are_refused_naming_the_field(self):
        c = self.cluster()
        job_id, _ = self.stopped_job(c, ["f0", "f1"])
        before = c.get(job_id)
        cases = [
            (dict(workers=-1), "workers: must be between 1 and 256, or 0 to keep the job's 2 "
                               "(got -1)"),
            (dict(workers=257), "workers: must be between 1 and 256, or 0 to keep the job's 2 "
                                "(got 257)"),
            (dict(sharding="zero3"), UNKNOWN_SHARDING % "zero3"),
            (dict(workers=1, sharding="zero3"), UNKNOWN_SHARDING % "zero3"),
        ]
        for overrides, message in cases:
            with self.subTest(**overrides):
                err = assert_rpc_error(self, lambda: self.resume(c, job_id, **overrides),
                                       grpc.StatusCode.INVALID_ARGUMENT)
                self.assertEqual(err.details(), "cannot resume job %s: %s; the job is unchanged"
                                 % (job_id, message))
        usage = [(("--workers", "0"), "--workers expects a whole number of at least 1, got '0'"),
                 (("--workers", "two"), "--workers expects a whole number"),
                 (("--sharding", "bogus"), "--sharding expects none or optimizer, got 'bogus'"),
                 (("--sharding",), "--sharding needs a value")]
        for flags, words in usage:
            with self.subTest(flags=flags):
                out = c.ctl("resume", job_id, *flags)
                self.assertEqual((out.returncode, out.stdout), (2, ""), out.stderr)
                self.assertIn("zenithctl resume: " + words, out.stderr)
        self.assertEqual(c.get(job_id), before)
        self.assertEqual(self.events(c, job_id, "resumed"), [])

    def test_resume_of_a_cuda_job_with_optimizer_sharding_is_refused(self):
        c = self.cluster()
        job_id, _ = self.stopped_job(c, ["g0"], device="cuda")
        before = c.get(job_id)
        err = assert_rpc_error(self, lambda: self.resume(c, job_id, sharding="optimizer"),
                               grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(err.details(), "cannot resume job %s: %s; the job is unchanged"
                         % (job_id, CUDA_REFUSAL))
        self.assertEqual(c.get(job_id), before)

    def test_resume_on_other_workers_and_sharding_is_stored_and_survives_a_restart(self):
        c = self.cluster()
        job_id, (f0, f1) = self.stopped_job(c, ["f0", "f1"])
        out = self.ctl_ok(c, "resume", job_id, "--workers", 4, "--sharding", "optimizer")
        change = "on 4 workers (was 2), sharding optimizer (was none)"
        self.assertEqual(out, "%s QUEUED - resuming from checkpoint %s.1 (step 10); %s\n"
                         % (job_id, job_id, change))

        def check(job, what):
            self.assertEqual((job.spec.workers, job.spec.sharding, job.spec.batch_size),
                             (4, "optimizer", 128), what)
            self.assertEqual(self.events(c, job_id, "resumed"), [
                "resumed by a user from checkpoint %s.1 at step 10; %s" % (job_id, change)], what)

        waiting = "; %s; waiting for 4 cpu workers: 2 idle cpu workers" % change

        def says_what_it_waits_for():
            job = c.get(job_id)
            return job if waiting in job.reason else None

        job = harness.wait_until(says_what_it_waits_for, 10, "the resumed job's reason")
        self.assertEqual(state_name(job.state), "QUEUED")
        check(job, "after the resume")
        status = self.status_json(c, job_id)
        self.assertEqual((status["spec"]["workers"], status["spec"]["sharding"]), (4, "optimizer"))
        self.assertIn(SHARDED_LINE, self.ctl_ok(c, "status", job_id))

        port = c.port
        c.stop_coordinator(signal.SIGKILL)
        c.start_coordinator(port=port)
        job = c.get(job_id)
        self.assertEqual(state_name(job.state), "QUEUED")
        check(job, "after a SIGKILL of the coordinator and a new start")

        # The next attempt runs on 4 workers and tells them the new spec.
        more = [FakeWorker(c, n) for n in ("f2", "f3")]
        for w in more:
            self.addCleanup(w.close)
        assignments = [w.wait_assignment(job_id, timeout=20) for w in [f0, f1] + more]
        self.assertEqual(sorted(a.rank for a in assignments), [0, 1, 2, 3])
        for a in assignments:
            self.assertEqual((a.world_size, a.spec.workers, a.spec.sharding), (4, 4, "optimizer"))
        self.assertEqual(len(c.wait_state(job_id, "RUNNING", timeout=10).workers), 4)

    def test_resume_with_the_values_the_job_has_changes_nothing_in_its_spec(self):
        c = self.cluster()
        job_id, _ = self.stopped_job(c, ["f0", "f1"])
        before = c.get(job_id).spec
        resumed = self.resume(c, job_id, workers=2, sharding="none")
        self.assertEqual(resumed.spec, before)
        self.assertEqual(resumed.reason, "resuming from checkpoint %s.1 (step 10)" % job_id)
        self.assertEqual(self.events(c, job_id, "resumed"),
                         ["resumed by a user from checkpoint %s.1 at step 10" % job_id])


if __name__ == "__main__":
    harness.main()
