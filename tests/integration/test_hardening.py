"""The daemons hold up against what a careless operator or a misbehaving client can do to them:
flags out of range, a worker name already taken, image files of the wrong size, Workers RPCs
from a worker that has no part in the job, a cancel while a rendezvous waits on a worker that
never comes, and the key-value store's edges.

Each refusal must name what was refused, and none may cost the cluster its ability to run the
next job, which is what every test here checks after the event it provokes. The daemon flag
tests start no cluster: zenithd must refuse the flags before it does anything.
"""

import gzip
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402

import harness  # noqa: E402
from harness import assert_rpc_error, metrics_of, state_name, stubs, workers_stub  # noqa: E402

load_tests = harness.in_definition_order(globals())

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def idx_images(count, side, seed):
    rng = random.Random(seed)
    return struct.pack(">IIII", IDX_IMAGES_MAGIC, count, side, side) + \
        rng.randbytes(count * side * side)


def idx_labels(count):
    return struct.pack(">II", IDX_LABELS_MAGIC, count) + bytes(i % 10 for i in range(count))


def write_idx_dir(path, train_side, test_side, gzipped):
    """A data folder of 300 training and 20 test images with valid labels."""
    os.makedirs(path)
    files = {"train-images-idx3-ubyte": idx_images(300, train_side, 1),
             "train-labels-idx1-ubyte": idx_labels(300),
             "t10k-images-idx3-ubyte": idx_images(20, test_side, 2),
             "t10k-labels-idx1-ubyte": idx_labels(20)}
    for name, data in files.items():
        if gzipped:
            name, data = name + ".gz", gzip.compress(data)
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return path


# ---------------------------------------------------------------- daemon flags

class DaemonFlags(harness.ClusterTestCase):

    def run_zenithd(self, *args):
        """Runs zenithd, which must exit by itself; returns the CompletedProcess."""
        cmd = [os.path.join(harness.BIN, "zenithd")] + list(args)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=harness.scaled(5),
                                  stdin=subprocess.DEVNULL, env=harness.daemon_env())
        except subprocess.TimeoutExpired as e:
            self.fail("zenithd %s was still running after %.1f s (killed); it must refuse the "
                      "flags and exit 2. Output so far:\n%s%s" % (
                          " ".join(args)[:120], harness.scaled(5), e.stdout or "", e.stderr or ""))

    def assert_usage_error(self, out, flag):
        self.assertEqual(out.returncode, 2, "stderr: %s" % out.stderr)
        self.assertIn(flag, out.stderr)

    def test_worker_with_empty_name_exits_2_naming_the_flag(self):
        # Port 1 refuses connections: a worker that wrongly starts only retries in vain.
        out = self.run_zenithd("worker", "--coordinator", "127.0.0.1:1", "--name", "")
        self.assert_usage_error(out, "--name")

    def test_worker_with_200_character_name_exits_2_naming_the_flag(self):
        out = self.run_zenithd("worker", "--coordinator", "127.0.0.1:1", "--name", "n" * 200)
        self.assert_usage_error(out, "--name")

    def test_worker_timeout_that_twice_the_heartbeat_overflows_is_refused(self):
        # 2 * 1500000000 does not fit an int; computed in one it wraps negative and the check
        # "timeout > 2 * heartbeat" passes.
        state = tempfile.mkdtemp(prefix="zenith-it-flags-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", state]))
        out = self.run_zenithd("coordinator", "--listen", "127.0.0.1:0", "--state", state,
                               "--heartbeat-ms", "1500000000",
                               "--worker-timeout-ms", "2147483647")
        self.assert_usage_error(out, "--worker-timeout-ms")


# ---------------------------------------------------------------- images of the wrong size

class WrongImageSize(harness.ClusterTestCase):
    """One worker, which must survive jobs on 56x56 images and take the next job."""

    @classmethod
    def setUpClass(cls):
        c = cls.c = cls.new_class_cluster()
        c.start_coordinator()
        c.add_worker("w0")
        cls.tmp = tempfile.mkdtemp(prefix="zenith-it-data-", dir=c.dir)

    def test_images_not_28x28_fail_the_job_naming_the_file_and_both_sizes(self):
        # The training images are wrong in plain files, the test images in gzipped ones, so the
        # check must cover both files and both ways of storing them. A gzipped file may be named
        # with or without its ".gz".
        cases = [("train images, plain", dict(train_side=56, test_side=28, gzipped=False),
                  "train-images-idx3-ubyte"),
                 ("test images, gzipped", dict(train_side=28, test_side=56, gzipped=True),
                  "t10k-images-idx3-ubyte")]
        for i, (what, sides, bad_file) in enumerate(cases):
            with self.subTest(what):
                d = write_idx_dir(os.path.join(self.tmp, "case%d" % i), **sides)
                job = self.c.submit(model="mlp", max_steps=10, data_dir=d, name=what)
                final = self.c.wait_final(job.id, timeout=30)
                self.assertEqual(state_name(final.state), "FAILED", final.error)
                self.assertIn(os.path.join(d, bad_file), final.error)
                self.assertIn("56x56", final.error)
                self.assertIn("28x28", final.error)

    def test_worker_that_failed_on_wrong_size_images_runs_the_next_job(self):
        w = self.c.workers["w0"]
        self.assertTrue(w.running(), "worker w0 exited (%s)" % w.proc.poll())
        job = self.c.submit(model="mlp", max_steps=10, name="after")
        final = self.c.wait_final(job.id, timeout=30)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(list(final.workers), ["w0"])
        self.assertEqual(final.step, 10)


# ---------------------------------------------------------------- workers that do not belong

class Intruders(harness.ClusterTestCase):

    def test_second_worker_with_a_live_workers_name_is_refused(self):
        c = self.new_cluster(heartbeat_ms=200, worker_timeout_ms=2000)
        c.start_coordinator()
        first = c.add_worker("w1")
        second = c.start_daemon("worker w1 (second)", "worker",
                                ["--coordinator", c.addr, "--name", "w1", "--threads", "1",
                                 "--insecure"])
        self.addCleanup(second.stop, signal.SIGKILL)

        harness.wait_until(lambda: "in use" in second.log_text(), 10,
                           "the second w1 to log that its name is in use")
        time.sleep(harness.scaled(3))
        log = c.coordinator.log_text()
        self.assertNotIn("registered again", log)
        self.assertEqual(c.registrations("w1"), 1, "registrations of w1 in the coordinator log")
        self.assertTrue(first.running(), "the first w1 exited (%s)" % first.proc.poll())

        job = c.submit(model="mlp", max_steps=10, name="on the first w1")
        final = c.wait_final(job.id, timeout=30)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertIn("assigned job %s " % job.id, first.log_text(), "the first w1 must run it")
        self.assertNotIn("assigned job", second.log_text())

    def test_worker_rpcs_from_a_worker_not_in_the_job_are_refused(self):
        pb2, _ = stubs()
        c = self.new_cluster()  # default timeouts: the idle intruder is not lost during the test
        c.start_coordinator()
        c.add_worker("w0")
        c.add_worker("w1")
        steps = 1000
        job_id = c.submit(model="mlp", workers=2, max_steps=steps, seed=5, name="real").id
        running = harness.wait_until(lambda: (lambda j: j if j.step >= 5 else None)(c.get(job_id)),
                                     30, "job %s to pass step 5" % job_id, interval=0.1)
        workers = workers_stub(c)
        reg = workers.RegisterWorker(pb2.RegisterRequest(name="intruder", host="127.0.0.1",
                                                         device="cpu", pid=1),
                                     timeout=harness.scaled(10))
        refused = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)

        fake_step = 999999
        report = pb2.ReportMetricsRequest(
            worker_id=reg.worker_id, job_id=job_id, total_steps=fake_step,
            metrics=[pb2.StepMetrics(step=fake_step, epoch=99, loss=0.0, grad_norm=1.0)],
            evals=[pb2.EvalResult(step=fake_step, test_loss=0.0, test_accuracy=1.0)])
        assert_rpc_error(self, lambda: workers.ReportMetrics(report, timeout=harness.scaled(10)),
                         refused, job_id)
        after_report = c.get(job_id)
        self.assertNotEqual(after_report.step, fake_step)
        self.assertGreaterEqual(after_report.step, running.step)
        self.assertEqual(after_report.total_steps, steps)

        # Twice: two finishes are what a 2-worker job needs to end.
        finish = pb2.FinishJobRequest(worker_id=reg.worker_id, job_id=job_id, ok=True,
                                      has_test_result=True, test_loss=0.0, test_accuracy=1.0,
                                      steps=fake_step)
        for attempt in (1, 2):
            with self.subTest("FinishJob %d" % attempt):
                assert_rpc_error(self,
                                 lambda: workers.FinishJob(finish, timeout=harness.scaled(10)),
                                 refused, job_id)
        after_finish = c.get(job_id)
        self.assertEqual(state_name(after_finish.state), "RUNNING",
                         "at step %d of %d" % (after_finish.step, steps))
        self.assertFalse(after_finish.has_test_result)

        final = c.wait_final(job_id, timeout=60)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.step, steps)
        self.assertTrue(final.has_test_result)
        self.assertLess(final.test_accuracy, 1.0)
        self.assertGreater(final.test_accuracy, 0.5)
        history = metrics_of(c.watch(job_id, timeout=30))
        self.assertEqual([m.step for m in history], list(range(1, steps + 1)))


# ---------------------------------------------------------------- cancel during a rendezvous

class CancelDuringRendezvous(harness.ClusterTestCase):

    def test_cancel_while_a_rendezvous_waits_frees_the_live_workers_within_5s(self):
        # The stopped worker stays registered until its heartbeats have been missing for the
        # worker timeout, which is long enough for the cancel to come first: the job ends by
        # the cancel, not by a lost worker. Until the coordinator gives the stopped worker up
        # it counts as idle once the job is cancelled and may be chosen for the next job, so
        # that job is submitted only after it is lost.
        timeout_ms = int(4000 * harness.TIME_SCALE)
        c = self.new_cluster(heartbeat_ms=200, worker_timeout_ms=timeout_ms)
        c.start_coordinator()
        for name in ("w0", "w1", "w2"):
            c.add_worker(name)
        stopped = c.workers["w2"]
        stopped.send(signal.SIGSTOP)
        self.addCleanup(stopped.send, signal.SIGCONT)

        job = c.submit(model="mlp", workers=3, batch_size=96, max_steps=10, name="never meets")
        c.wait_state(job.id, "RUNNING", timeout=5)
        live = [c.workers[name] for name in ("w0", "w1")]
        for w in live:
            # Logged when the data is loaded, just before the worker waits for its peers' keys.
            harness.wait_until(lambda: "job started: rank" in w.log_text(), 10,
                               "%s to start job %s and wait for its peers" % (w.name, job.id))
        time.sleep(0.2)

        pb2, _ = stubs()
        cancelled = c.stub.CancelJob(pb2.CancelJobRequest(id=job.id), timeout=harness.scaled(10))
        cancelled_at = time.monotonic()
        self.assertEqual(state_name(cancelled.state), "CANCELLED")
        for w in live:
            harness.wait_until(lambda: "job stopped at step 0" in w.log_text(), 5,
                               "%s to give up the rendezvous of the cancelled job" % w.name)
        sys.stderr.write("live workers stopped %.2f s after the cancel\n"
                         % (time.monotonic() - cancelled_at))

        lost = re.compile(r"worker w2 \(w-\d+\) lost: no heartbeat")
        harness.wait_until(lambda: lost.search(c.coordinator.log_text()),
                           timeout_ms / 1000.0 + 5, "the coordinator to give the stopped w2 up")
        nxt = c.submit(model="mlp", workers=2, max_steps=10, name="after")
        submitted_at = time.monotonic()
        harness.wait_until(lambda: c.get(nxt.id).step >= 1, 5,
                           "the next 2-worker job %s to take a step" % nxt.id, interval=0.05)
        sys.stderr.write("next job took its first step %.2f s after its submit\n"
                         % (time.monotonic() - submitted_at))
        final = c.wait_final(nxt.id, timeout=30)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(sorted(final.workers), ["w0", "w1"])
        self.assertEqual(state_name(c.get(job.id).state), "CANCELLED")


# ---------------------------------------------------------------- key-value edges

class KvEdges(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        cls.c = cls.new_class_cluster()
        cls.c.start_coordinator()

    def test_kv_set_without_value_stores_an_empty_value(self):
        pb2, _ = stubs()
        kv = workers_stub(self.c)
        kv.KvSet(pb2.KvSetRequest(key="hardening/empty"), timeout=harness.scaled(10))
        got = kv.KvGet(pb2.KvGetRequest(key="hardening/empty"), timeout=harness.scaled(10))
        self.assertTrue(got.found)
        self.assertEqual(got.value, b"")

    def test_kv_wait_on_missing_key_is_deadline_exceeded_naming_it(self):
        pb2, _ = stubs()
        kv = workers_stub(self.c)
        key = "hardening/never-set"
        req = pb2.KvWaitRequest(keys=[key], timeout_ms=300)
        started = time.monotonic()
        # The client's own deadline is far longer: a DEADLINE_EXCEEDED from it would come late
        # and without the key in its message.
        assert_rpc_error(self, lambda: kv.KvWait(req, timeout=harness.scaled(10)),
                         grpc.StatusCode.DEADLINE_EXCEEDED, key)
        took = time.monotonic() - started
        self.assertLess(took, harness.scaled(2), "seconds until KvWait's 300 ms deadline answered")


class KvCapacity(harness.ClusterTestCase):
    """The rendezvous store is bounded (64 MiB of values): past that, KvSet is
    refused with RESOURCE_EXHAUSTED, and what was stored stays readable."""

    def test_kv_store_refuses_values_past_its_capacity(self):
        c = self.new_cluster()
        c.start_coordinator()
        pb2, _ = stubs()
        kv = workers_stub(c)
        value = b"x" * (64 << 10)
        stored = 0
        refused = None
        for i in range(1100):  # 1024 values of 64 KiB fill 64 MiB
            try:
                kv.KvSet(pb2.KvSetRequest(key="fill/%d" % i, value=value),
                         timeout=harness.scaled(10))
                stored += 1
            except grpc.RpcError as e:
                refused = e
                break
        self.assertIsNotNone(refused, "no KvSet was refused after %d values of 64 KiB" % stored)
        self.assertEqual(refused.code(), grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details())
        self.assertIn("full", refused.details())
        self.assertEqual(stored, 1024, "values stored before the refusal")
        got = kv.KvGet(pb2.KvGetRequest(key="fill/0"), timeout=harness.scaled(10))
        self.assertTrue(got.found)
        self.assertEqual(len(got.value), len(value))


if __name__ == "__main__":
    harness.main()
