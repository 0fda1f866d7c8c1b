"""The coordinator's side of checkpoints: records, keep-last-N, checkpoints on request, automatic
restarts after a lost worker, preemption, ResumeJob, a coordinator restart, and the zenithctl
commands over them.

The workers here are fake (fake_worker.FakeWorker): they speak the Workers service by hand, so a
test decides when a rank reports a checkpoint, falls silent, or sends a message of an attempt
that is over. Checkpoint files are real files with a real SHA-256, written into the folder the
coordinator assigns. Heartbeats are fast (every 100 ms, a worker lost after 1.5 s, both longer
under a sanitizer) so that a lost worker is noticed within a couple of seconds.
"""

import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402

import harness  # noqa: E402
from fake_worker import FakeWorker  # noqa: E402
from harness import assert_rpc_error, state_name, stubs  # noqa: E402

HEARTBEAT_MS = 100
WORKER_TIMEOUT_MS = int(1500 * harness.TIME_SCALE)
LONG = dict(model="mlp", max_steps=1000000)


class CheckpointCase(harness.ClusterTestCase):
    """A fresh cluster per test with fast heartbeats, fake workers and the helpers to drive
    them."""

    def cluster(self, **kw):
        c = self.new_cluster(heartbeat_ms=HEARTBEAT_MS, worker_timeout_ms=WORKER_TIMEOUT_MS)
        c.start_coordinator(**kw)
        self.pb2, _ = stubs()
        return c

    def fake(self, c, name, **kw):
        w = FakeWorker(c, name, **kw)
        self.addCleanup(w.close)
        return w

    def running_job(self, c, workers, **spec):
        """Submits a job for len(workers) fake workers and waits until each has its assignment;
        returns (job id, workers by rank)."""
        fields = dict(LONG, workers=len(workers), batch_size=64 * len(workers))
        fields.update(spec)
        job_id = c.submit(**fields).id
        for w in workers:
            w.wait_assignment(job_id)
        c.wait_state(job_id, "RUNNING", timeout=10)
        return job_id, sorted(workers, key=lambda w: w.assignment.rank)

    def checkpoints(self, c, job_id):
        return list(c.stub.ListCheckpoints(self.pb2.ListCheckpointsRequest(id=job_id),
                                           timeout=harness.scaled(10)).checkpoints)

    def history(self, c, job_id):
        """The job's events so far, as (kind, message) pairs."""
        req = self.pb2.WatchJobRequest(id=job_id, history_only=True)
        return [(item.event.kind, item.event.message)
                for item in c.stub.WatchJob(req, timeout=harness.scaled(10))
                if item.WhichOneof("item") == "event"]

    def events(self, c, job_id, kind):
        return [m for k, m in self.history(c, job_id) if k == kind]

    def resume(self, c, job_id, checkpoint=""):
        req = self.pb2.ResumeJobRequest(id=job_id)
        if checkpoint:
            setattr(req, "from", checkpoint)
        return c.stub.ResumeJob(req, timeout=harness.scaled(10))

    def ctl_ok(self, c, *args):
        out = c.ctl(*args)
        self.assertEqual(out.returncode, 0, "zenithctl %s: %s" % (" ".join(map(str, args)),
                                                                  out.stderr))
        return out.stdout


# ---------------------------------------------------------------- records

class CheckpointRecords(CheckpointCase):

    def test_reported_checkpoints_are_listed_with_every_field(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0], keep_checkpoints=5)
        asg = f0.assignment
        self.assertEqual(asg.checkpoint_dir,
                         os.path.join(os.path.realpath(c.state_dir), "checkpoints", job_id))
        self.assertEqual(list(asg.resume_from), [], "a new job starts from step 0")
        self.assertEqual(asg.attempt, 1)

        before = int(time.time() * 1000)
        sent = [f0.report_checkpoint(10, size=1000), f0.report_checkpoint(20, size=2500000)]
        after = int(time.time() * 1000)
        records = self.checkpoints(c, job_id)
        self.assertEqual([r.id for r in records], [job_id + ".1", job_id + ".2"])
        for r, s in zip(records, sent):
            self.assertEqual((r.job_id, r.step, r.path, r.digest, r.bytes),
                             (job_id, s.step, s.path, s.digest, s.bytes))
            self.assertTrue(before <= r.unix_ms <= after, (before, r.unix_ms, after))

        listed = json.loads(self.ctl_ok(c, "checkpoints", job_id, "--json"))
        self.assertEqual(listed, [dict(id=r.id, job=r.job_id, step=r.step, path=r.path,
                                       digest=r.digest, bytes=r.bytes, unix_ms=r.unix_ms)
                                  for r in records])
        table = self.ctl_ok(c, "checkpoints", job_id).splitlines()
        self.assertEqual(table[0].split(), ["ID", "STEP", "SIZE", "WRITTEN", "PATH"])
        self.assertEqual(table[2].split()[:4], [job_id + ".2", "20", "2.5", "MB"])
        self.assertEqual(table[2].split()[-1], records[1].path)

        job = c.get(job_id)
        self.assertEqual((job.checkpoints, job.restarts), (2, 0))
        self.assertEqual(job.latest_checkpoint, records[1])
        status = json.loads(self.ctl_ok(c, "status", job_id, "--json"))
        self.assertEqual((status["checkpoints"], status["restarts"]), (2, 0))
        self.assertEqual(status["latest_checkpoint"]["id"], job_id + ".2")
        self.assertEqual(status["spec"]["keep_checkpoints"], 5)
        listed_jobs = json.loads(self.ctl_ok(c, "list", "--json"))
        self.assertEqual(listed_jobs[0]["latest_checkpoint"]["path"], records[1].path)
        text = self.ctl_ok(c, "status", job_id)
        self.assertIn("\nrestarts:      0 of 3\n", text)
        self.assertIn("\ncheckpoints:   2 written; latest %s.2 at step 20, 2.5 MB\n" % job_id, text)

        self.assertEqual(self.events(c, job_id, "checkpoint"),
                         ["checkpoint %s at step %d: %d bytes in %s" % (r.id, r.step, r.bytes,
                                                                       r.path) for r in records])
        self.assertRegex(c.coordinator.log_text(),
                         r" INFO .*job %s checkpoint %s\.2 at step 20: 2500000 bytes"
                         % (job_id, job_id))

    def test_keep_checkpoints_2_removes_the_oldest_record_and_its_file(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0], keep_checkpoints=2)
        paths = [f0.report_checkpoint(step).path for step in (10, 20)]
        self.assertEqual(len(self.checkpoints(c, job_id)), 2)
        self.assertTrue(all(os.path.exists(p) for p in paths))

        paths.append(f0.report_checkpoint(30).path)
        records = self.checkpoints(c, job_id)
        self.assertEqual([(r.id, r.step) for r in records], [(job_id + ".2", 20),
                                                            (job_id + ".3", 30)])
        self.assertFalse(os.path.exists(paths[0]), "the oldest checkpoint's file is deleted")
        self.assertTrue(os.path.exists(paths[1]) and os.path.exists(paths[2]))
        self.assertEqual(c.get(job_id).checkpoints, 3, "checkpoints counts every one written")

    def test_missing_file_of_a_removed_checkpoint_is_a_warning(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0], keep_checkpoints=1)
        os.remove(f0.report_checkpoint(10).path)
        f0.report_checkpoint(20)
        self.assertEqual([r.step for r in self.checkpoints(c, job_id)], [20])
        self.assertRegex(c.coordinator.log_text(),
                         r" WARN .*job %s: file .*step-000010.* of removed checkpoint %s\.1 could "
                         r"not be deleted: No such file" % (job_id, job_id))
        self.assertEqual(state_name(c.get(job_id).state), "RUNNING")

    def test_bad_reports_are_invalid_argument_naming_the_field(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        cases = [("path", dict(path="/etc/passwd")),
                 ("path", dict(path=os.path.join(f0.assignment.checkpoint_dir, "..", "x"))),
                 ("digest", dict(digest="not hex")),
                 ("bytes", dict(bytes=0)),
                 ("step", dict(step=-1))]
        for field, bad in cases:
            with self.subTest(field=field, value=bad):
                assert_rpc_error(self, lambda: f0.report_checkpoint(10, **bad),
                                 grpc.StatusCode.INVALID_ARGUMENT, job_id, field + ":")
        self.assertEqual(self.checkpoints(c, job_id), [])
        self.assertTrue(os.path.exists("/etc/passwd"))

    def test_requests_without_attempt_count_as_the_workers_attempt(self):
        c = self.cluster()
        old = self.fake(c, "old", send_attempt=False)
        job_id, _ = self.running_job(c, [old])
        self.assertFalse(old.report_metrics(7).cancel)
        self.assertEqual(c.get(job_id).step, 7)
        old.report_checkpoint(7)
        self.assertEqual([r.step for r in self.checkpoints(c, job_id)], [7])
        time.sleep(0.5)
        self.assertEqual(old.cancels, 0, "heartbeats without an attempt must not be cancelled")


# ---------------------------------------------------------------- CheckpointJob

class CheckpointOnRequest(CheckpointCase):

    def test_checkpoint_job_waits_for_the_worker_and_returns_its_record(self):
        c = self.cluster()
        f0, f1 = self.fake(c, "f0"), self.fake(c, "f1")
        job_id, (rank0, rank1) = self.running_job(c, [f0, f1])
        pending = c.stub.CheckpointJob.future(self.pb2.CheckpointRequest(id=job_id),
                                              timeout=harness.scaled(30))
        request = rank0.wait_request()
        self.assertGreater(request, 0)
        self.assertEqual(rank0.report_metrics(5).checkpoint_request, request)
        self.assertEqual(rank1.requests, [], "only rank 0 is asked")

        rank0.report_checkpoint(5)  # a periodic one (request 0) does not answer it
        time.sleep(0.3)
        self.assertFalse(pending.done(), "CheckpointJob returned before its checkpoint")
        sent = rank0.report_checkpoint(6, request=request)
        record = pending.result()
        self.assertEqual((record.id, record.step, record.path, record.digest),
                         (job_id + ".2", 6, sent.path, sent.digest))
        self.assertEqual(record, self.checkpoints(c, job_id)[-1])

        seen = len(rank0.requests)
        time.sleep(0.5)
        self.assertEqual(len(rank0.requests), seen, "an answered request is not asked again")
        self.assertFalse(rank0.report_metrics(7).HasField("checkpoint_request"))

    def test_zenithctl_checkpoint_prints_the_record(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        cmd = [os.path.join(harness.BIN, "zenithctl"), "--coordinator", c.addr, "checkpoint",
               job_id]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        sent = f0.report_checkpoint(42, request=f0.wait_request(), size=3000)
        out, err = proc.communicate(timeout=harness.scaled(20))
        self.assertEqual(proc.returncode, 0, err)
        self.assertIn("checkpoint:    %s.1\n" % job_id, out)
        self.assertIn("step:          42\n", out)
        self.assertIn("path:          %s\n" % sent.path, out)
        self.assertIn("digest:        sha256 %s\n" % sent.digest, out)
        self.assertIn("size:          3.0 kB (3000 bytes)\n", out)

    def test_checkpoint_job_on_a_queued_job_is_failed_precondition(self):
        c = self.cluster()
        job_id = c.submit(**LONG).id  # no workers: it stays queued
        req = self.pb2.CheckpointRequest(id=job_id)
        assert_rpc_error(self, lambda: c.stub.CheckpointJob(req, timeout=harness.scaled(10)),
                         grpc.StatusCode.FAILED_PRECONDITION, job_id, "QUEUED",
                         "only a running job")
        out = c.ctl("checkpoint", job_id)
        self.assertEqual(out.returncode, 1)
        self.assertIn("FAILED_PRECONDITION: job %s is QUEUED" % job_id, out.stderr)

    def waiting_call(self):
        """A running 1-worker job and a CheckpointJob call for it that its worker has been asked
        to answer; returns (cluster, worker, job id, the call's future)."""
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        pending = c.stub.CheckpointJob.future(self.pb2.CheckpointRequest(id=job_id),
                                              timeout=harness.scaled(30))
        f0.wait_request()
        return c, f0, job_id, pending

    def test_waiting_checkpoint_job_fails_when_the_job_is_cancelled(self):
        c, _, job_id, pending = self.waiting_call()
        c.stub.CancelJob(self.pb2.CancelJobRequest(id=job_id), timeout=harness.scaled(10))
        assert_rpc_error(self, pending.result, grpc.StatusCode.FAILED_PRECONDITION,
                         "job %s ended (CANCELLED) before the checkpoint was written" % job_id)

    def test_checkpoint_job_whose_client_left_is_no_longer_asked_for(self):
        _, f0, _, pending = self.waiting_call()
        pending.cancel()
        harness.wait_until(lambda: not f0.heartbeat().checkpoint_request, 5,
                           "heartbeats without the request of the client that left")


# ---------------------------------------------------------------- restarts

class Restarts(CheckpointCase):

    def test_lost_worker_restarts_the_job_from_its_latest_checkpoint(self):
        c = self.cluster()
        f0, f1 = self.fake(c, "f0"), self.fake(c, "f1")
        job_id, (survivor, victim) = self.running_job(c, [f0, f1], max_restarts=2)
        workers = harness.workers_stub(c)
        workers.KvSet(self.pb2.KvSetRequest(key="%s/1/0" % job_id, value=b"addr"),
                      timeout=harness.scaled(10))
        paths = [survivor.report_checkpoint(step).path for step in (10, 20)]
        survivor.report_metrics(25)

        victim.pause()
        lost_at = time.monotonic()
        queued = c.wait_state(job_id, "QUEUED", timeout=10)
        sys.stderr.write("requeued %.2f s after the last heartbeat\n"
                         % (time.monotonic() - lost_at))
        self.assertEqual(queued.restarts, 1)
        self.assertTrue(queued.reason.startswith(
            "restart 1 of 2, from checkpoint %s.2 at step 20; waiting for 2 cpu workers"
            % job_id), queued.reason)
        lost = self.events(c, job_id, "worker_lost")
        self.assertEqual(len(lost), 1)
        self.assertRegex(lost[0], r"^worker %s \(rank 1\) lost: no heartbeat for [\d.]+ s$"
                         % victim.name)
        self.assertEqual(self.events(c, job_id, "restarted"), [
            "restart 1 of 2 after: %s; continuing from checkpoint %s.2 at step 20"
            % (lost[0], job_id)])
        self.assertEqual(self.events(c, job_id, "failed"), [])
        kv = workers.KvGet(self.pb2.KvGetRequest(key="%s/1/0" % job_id),
                           timeout=harness.scaled(10))
        self.assertFalse(kv.found, "the old attempt's rendezvous keys are dropped")
        cancels = survivor.wait_cancels(0)

        f2, f3 = self.fake(c, "f2"), self.fake(c, "f3")
        new = [f2.wait_assignment(job_id), f3.wait_assignment(job_id)]
        job = c.wait_state(job_id, "RUNNING", timeout=10)
        self.assertEqual(sorted(job.workers), ["f2", "f3"])
        for asg in new:
            self.assertEqual(asg.attempt, 2)
            self.assertEqual(list(asg.resume_from), [paths[1], paths[0]])
            self.assertEqual(asg.kv_prefix, "%s/2" % job_id)
        self.assertEqual(len(victim.assignments), 1)

        # The survivor still runs attempt 1: cancelled, and nothing it sends counts.
        survivor.wait_cancels(cancels)
        self.assertTrue(survivor.report_metrics(99).cancel)
        assert_rpc_error(self, lambda: survivor.report_checkpoint(99),
                         grpc.StatusCode.FAILED_PRECONDITION, "attempt 1 of job %s is over"
                         % job_id)
        survivor.finish(ok=True, steps=99, has_test_result=True, test_accuracy=1.0)
        job = c.get(job_id)
        self.assertEqual((state_name(job.state), job.step, job.has_test_result),
                         ("RUNNING", 25, False))
        self.assertEqual(len(self.checkpoints(c, job_id)), 2)

    def test_job_fails_once_its_restarts_are_used(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0], max_restarts=1)
        f0.pause()
        c.wait_state(job_id, "QUEUED", timeout=10)
        self.assertEqual(self.events(c, job_id, "restarted"), [
            "restart 1 of 1 after: %s; starting again from step 0: no checkpoint yet"
            % self.events(c, job_id, "worker_lost")[0]])

        f1 = self.fake(c, "f1")
        self.assertEqual(list(f1.wait_assignment(job_id, attempt=2).resume_from), [])
        f1.pause()
        failed = c.wait_final(job_id, timeout=10)
        self.assertEqual(state_name(failed.state), "FAILED")
        self.assertRegex(failed.error, r"^worker f1 \(rank 0\) lost: no heartbeat for [\d.]+ s; "
                                       r"restarts exhausted \(1 of max_restarts 1 used\)$")
        self.assertEqual(failed.restarts, 1)
        kinds = [k for k, _ in self.history(c, job_id)]
        self.assertEqual(kinds, ["submitted", "started", "worker_lost", "restarted", "started",
                                 "worker_lost", "failed"])

    def test_preempted_finish_requeues_without_counting_a_restart(self):
        c = self.cluster()
        f0 = self.fake(c, "f0", stop_on_cancel=True)
        f1 = self.fake(c, "f1", stop_on_cancel=True)
        job_id, (rank0, rank1) = self.running_job(c, [f0, f1], max_restarts=0)
        path = rank1.report_checkpoint(30).path  # a rank leaving on SIGTERM writes one first
        leaving_id = rank1.id
        rank1.finish(ok=False, preempted=True, steps=30, error="worker %s stopped by SIGTERM"
                     % rank1.name)
        rank1.pause()  # its daemon exits

        queued = c.wait_state(job_id, ("QUEUED", "RUNNING"), timeout=10)
        self.assertEqual(queued.restarts, 0, "a preemption is not a restart")
        self.assertEqual(self.events(c, job_id, "preempted"), [
            "worker %s (rank 1) left on SIGTERM after a checkpoint at step 30; the job continues "
            "on other workers" % rank1.name])
        self.assertEqual(self.events(c, job_id, "restarted"), [])
        rank0.wait_cancels(0)
        self.assertIn("worker %s (%s) left on SIGTERM" % (rank1.name, leaving_id),
                      c.coordinator.log_text())

        # The survivor stops on its cancel and is idle again; the leaving worker is given up at
        # once, so attempt 2 waits for a new worker rather than for its heartbeats to time out.
        f2 = self.fake(c, "f2")
        for w in (rank0, f2):
            asg = w.wait_assignment(job_id, attempt=2)
            self.assertEqual(list(asg.resume_from), [path])
        job = c.wait_state(job_id, "RUNNING", timeout=10)
        self.assertEqual(sorted(job.workers), sorted([rank0.name, "f2"]))
        self.assertEqual((job.restarts, job.error), (0, ""))
        self.assertEqual(len(rank1.assignments), 1)

    def test_collective_failure_with_every_worker_alive_restarts_the_job(self):
        c = self.cluster()
        f0, f1 = self.fake(c, "f0"), self.fake(c, "f1")
        job_id, (rank0, _) = self.running_job(c, [f0, f1])
        rank0.finish(ok=False, collective_failed=True, error="allreduce: Connection reset by peer",
                     steps=3)
        job = c.wait_state(job_id, "QUEUED", timeout=10)
        self.assertEqual(job.restarts, 1)
        self.assertEqual(self.events(c, job_id, "restarted"), [
            "restart 1 of 3 after: rank 0 (worker %s): allreduce: Connection reset by peer; "
            "starting again from step 0: no checkpoint yet" % rank0.name])

    def test_ordinary_failure_fails_the_job_without_a_restart(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        f0.finish(ok=False, error="/data/train-images-idx3-ubyte: missing")
        job = c.wait_final(job_id, timeout=10)
        self.assertEqual((state_name(job.state), job.restarts), ("FAILED", 0))
        self.assertEqual(job.error, "rank 0 (worker f0): /data/train-images-idx3-ubyte: missing")


# ---------------------------------------------------------------- ResumeJob

class Resume(CheckpointCase):

    def test_resume_is_refused_with_the_right_status(self):
        c = self.cluster()
        f0 = self.fake(c, "f0", stop_on_cancel=True)
        cancelled, _ = self.running_job(c, [f0])
        f0.report_checkpoint(10)
        queued = c.submit(**dict(LONG, workers=2, batch_size=128)).id  # one worker: it waits
        c.stub.CancelJob(self.pb2.CancelJobRequest(id=cancelled), timeout=harness.scaled(10))
        no_ckpt, _ = self.running_job(c, [f0])  # started once f0 has stopped the cancelled one
        cases = [
            ("unknown", lambda: self.resume(c, "j-99"), grpc.StatusCode.NOT_FOUND, ["j-99"]),
            ("queued", lambda: self.resume(c, queued), grpc.StatusCode.FAILED_PRECONDITION,
             [queued, "still active", "QUEUED"]),
            ("running", lambda: self.resume(c, no_ckpt), grpc.StatusCode.FAILED_PRECONDITION,
             [no_ckpt, "still active", "RUNNING"]),
            ("bad from", lambda: self.resume(c, cancelled, "j-1.7"), grpc.StatusCode.NOT_FOUND,
             [cancelled, "'j-1.7'", "zenithctl checkpoints %s" % cancelled]),
        ]
        for what, call, code, words in cases:
            with self.subTest(what):
                assert_rpc_error(self, call, code, *words)

        c.stub.CancelJob(self.pb2.CancelJobRequest(id=no_ckpt), timeout=harness.scaled(10))
        with self.subTest("no checkpoint"):
            assert_rpc_error(self, lambda: self.resume(c, no_ckpt),
                             grpc.StatusCode.FAILED_PRECONDITION, no_ckpt,
                             "no checkpoint to resume from", "submit it again")
        c.stub.CancelJob(self.pb2.CancelJobRequest(id=queued), timeout=harness.scaled(10))
        succeeded, _ = self.running_job(c, [f0], max_steps=5)
        f0.finish(ok=True, steps=5, has_test_result=True, test_accuracy=0.5, test_loss=1.0)
        c.wait_final(succeeded, timeout=10)
        with self.subTest("succeeded"):
            assert_rpc_error(self, lambda: self.resume(c, succeeded),
                             grpc.StatusCode.FAILED_PRECONDITION, succeeded, "SUCCEEDED")
        self.assertEqual(state_name(c.get(cancelled).state), "CANCELLED",
                         "a refused resume changes nothing")

    def test_resume_of_a_cancelled_job_from_an_older_checkpoint(self):
        c = self.cluster()
        f0 = self.fake(c, "f0", stop_on_cancel=True)
        job_id, _ = self.running_job(c, [f0], keep_checkpoints=3)
        paths = [f0.report_checkpoint(step).path for step in (10, 20, 30)]
        c.stub.CancelJob(self.pb2.CancelJobRequest(id=job_id), timeout=harness.scaled(10))
        harness.wait_until(lambda: f0.assignment is None, 10, "f0 to stop the cancelled job")

        out = self.ctl_ok(c, "resume", job_id, "--from", job_id + ".2")
        self.assertEqual(out, "%s QUEUED - resuming from checkpoint %s.2 (step 20)\n"
                         % (job_id, job_id))
        job = c.get(job_id)
        self.assertEqual((job.error, job.latest_checkpoint.id), ("", job_id + ".2"))
        self.assertEqual(self.events(c, job_id, "resumed"), [
            "resumed by a user from checkpoint %s.2 at step 20" % job_id])

        asg = f0.wait_assignment(job_id)
        self.assertEqual(asg.attempt, 2)
        self.assertEqual(list(asg.resume_from), [paths[1], paths[0]],
                         "the checkpoint asked for first, then the older ones")
        self.assertEqual(state_name(c.wait_state(job_id, "RUNNING", timeout=10).state), "RUNNING")

    def test_resume_of_a_failed_job_continues_from_its_latest_checkpoint(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        paths = [f0.report_checkpoint(step).path for step in (10, 20)]
        f0.finish(ok=False, error="out of memory")
        self.assertEqual(state_name(c.wait_final(job_id, timeout=10).state), "FAILED")
        resumed = self.resume(c, job_id)
        self.assertEqual(resumed.reason, "resuming from checkpoint %s.2 (step 20)" % job_id)
        self.assertEqual(resumed.error, "")
        self.assertEqual(list(f0.wait_assignment(job_id).resume_from), paths[::-1])


# ---------------------------------------------------------------- coordinator restart

class CoordinatorRestart(CheckpointCase):

    def test_killed_coordinator_keeps_checkpoints_and_requeues_the_running_job(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        paths = [f0.report_checkpoint(step).path for step in (10, 20)]
        before = self.checkpoints(c, job_id)

        f0.pause()
        port = c.port
        c.stop_coordinator(signal.SIGKILL)
        c.start_coordinator(port=port)
        self.assertEqual(self.checkpoints(c, job_id), before)
        job = c.get(job_id)
        self.assertEqual(state_name(job.state), "QUEUED")
        self.assertEqual((job.checkpoints, job.latest_checkpoint), (2, before[-1]))
        self.assertEqual(self.events(c, job_id, "requeued"), [
            "the coordinator restarted while the job ran; it continues from checkpoint %s.2 at "
            "step 20" % job_id])

        f0.beating = True  # told to register again, then given the job
        asg = f0.wait_assignment(job_id, attempt=2)
        self.assertEqual(list(asg.resume_from), paths[::-1])
        c.wait_state(job_id, "RUNNING", timeout=10)
        f0.report_checkpoint(30)
        self.assertEqual(self.checkpoints(c, job_id)[-1].id, job_id + ".3")


# ---------------------------------------------------------------- specs, flags, zenithctl

class SpecsFlagsAndErrors(CheckpointCase):

    def test_bad_checkpoint_spec_values_are_refused_naming_the_field(self):
        c = self.cluster()
        cases = [("checkpoint_every", -1), ("keep_checkpoints", 0), ("keep_checkpoints", 1001),
                 ("max_restarts", -1), ("max_restarts", 101)]
        for field, value in cases:
            with self.subTest(field=field, value=value):
                req = self.pb2.SubmitJobRequest(spec=c.spec(**dict(LONG, **{field: value})))
                assert_rpc_error(self, lambda: c.stub.SubmitJob(req, timeout=harness.scaled(10)),
                                 grpc.StatusCode.INVALID_ARGUMENT, field + ":",
                                 "(got %d)" % value)
        out = c.ctl("submit", "--model", "mlp", "--max-steps", 5, "--keep-checkpoints", 0)
        self.assertEqual(out.returncode, 1)
        self.assertIn("keep_checkpoints: must be between 1 and 1000 (got 0)", out.stderr)

        job = c.submit(**LONG)
        self.assertEqual((job.spec.checkpoint_every, job.spec.keep_checkpoints,
                          job.spec.max_restarts), (500, 3, 3))
        out = self.ctl_ok(c, "submit", "--model", "mlp", "--max-steps", 5, "--checkpoint-every",
                          0, "--keep-checkpoints", 7, "--max-restarts", 0)
        spec = c.get(out.strip()).spec
        self.assertEqual((spec.checkpoint_every, spec.keep_checkpoints, spec.max_restarts),
                         (0, 7, 0))

    def test_checkpoint_dir_flag_is_created_and_given_to_workers(self):
        c = self.new_cluster(heartbeat_ms=HEARTBEAT_MS, worker_timeout_ms=WORKER_TIMEOUT_MS)
        wanted = os.path.join(c.dir, "shared", "ckpts")
        c.start_coordinator(extra_args=["--checkpoint-dir", wanted])
        self.pb2, _ = stubs()
        self.assertTrue(os.path.isdir(wanted))
        self.assertIn("checkpoints in %s" % os.path.realpath(wanted), c.coordinator.log_text())
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        self.assertEqual(f0.assignment.checkpoint_dir,
                         os.path.join(os.path.realpath(wanted), job_id))

    def test_checkpoint_dir_that_is_a_file_stops_the_start_naming_the_flag(self):
        c = self.new_cluster()
        not_a_folder = os.path.join(c.dir, "file")
        os.makedirs(c.dir, exist_ok=True)
        with open(not_a_folder, "w") as f:
            f.write("x")
        cmd = [os.path.join(harness.BIN, "zenithd"), "coordinator", "--listen", "127.0.0.1:0",
               "--state", c.state_dir, "--checkpoint-dir", not_a_folder, "--insecure"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=harness.scaled(20),
                             stdin=subprocess.DEVNULL, env=harness.daemon_env())
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("--checkpoint-dir %s: not a folder" % not_a_folder, out.stderr)

    def test_zenithctl_errors_name_what_to_fix(self):
        c = self.cluster()
        f0 = self.fake(c, "f0")
        job_id, _ = self.running_job(c, [f0])
        f0.report_checkpoint(10)
        c.stub.CancelJob(self.pb2.CancelJobRequest(id=job_id), timeout=harness.scaled(10))
        cases = [
            (("checkpoints", "j-99"), 1, ["NOT_FOUND", "no job with id 'j-99'"]),
            (("checkpoint", "j-99"), 1, ["NOT_FOUND", "no job with id 'j-99'"]),
            (("checkpoint", job_id), 1, ["FAILED_PRECONDITION", job_id, "CANCELLED"]),
            (("resume", "j-99"), 1, ["NOT_FOUND", "'j-99'"]),
            (("resume", job_id, "--from", "nope"), 1,
             ["NOT_FOUND", "job %s has no checkpoint 'nope'" % job_id,
              "`zenithctl checkpoints %s`" % job_id]),
            (("resume",), 2, ["give the job id"]),
            (("resume", job_id, "--from"), 2, ["--from needs a value"]),
            (("checkpoints", job_id, "--csv"), 2, ["unexpected argument '--csv'"]),
            (("checkpoint", job_id, "--timeout", "0"), 2, ["--timeout expects seconds"]),
        ]
        for args, code, words in cases:
            with self.subTest(args=args):
                out = c.ctl(*args)
                self.assertEqual(out.returncode, code, out.stderr)
                self.assertEqual(out.stdout, "")
                for w in words:
                    self.assertIn(w, out.stderr)
        self.assertEqual(self.ctl_ok(c, "checkpoints", job_id).splitlines()[1].split()[0],
                         job_id + ".1")


if __name__ == "__main__":
    harness.main()
