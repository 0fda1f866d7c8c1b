"""Bad input of every kind is refused with a status and a message that names what is wrong,
and none of it harms the coordinator or the jobs it already has.

The tests share one coordinator and two workers and run in the order written
(see load_tests): a job submitted first trains on one worker while the others
throw invalid specs, unknown ids, undecodable and oversized requests and broken
data folders at the coordinator; the last tests check that the coordinator is
still up, a valid job still succeeds and the first job finished unharmed.
"""

import os
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402

import harness  # noqa: E402
from harness import metrics_of, state_name, stubs  # noqa: E402

load_tests = harness.in_definition_order(globals())

BEFORE_STEPS = 400

# (what is wrong, spec fields, the field names the message must contain)
INVALID_SPECS = [
    ("unknown model", dict(model="resnet", max_steps=10), ["model"]),
    ("unknown dataset", dict(model="mlp", dataset="cifar-10", max_steps=10), ["dataset"]),
    ("batch not divisible by workers", dict(model="mlp", workers=3, batch_size=128, max_steps=10),
     ["batch_size", "workers"]),
    ("lr0 zero", dict(model="mlp", max_steps=10, optimizer=dict(lr0=0.0)), ["lr0"]),
    ("lr0 negative", dict(model="mlp", max_steps=10, optimizer=dict(lr0=-1.0)), ["lr0"]),
    ("window zero", dict(model="mlp", max_steps=10, optimizer=dict(window=0)), ["window"]),
    ("momentum one", dict(model="mlp", max_steps=10, optimizer=dict(momentum=1.0)), ["momentum"]),
    ("momentum negative", dict(model="mlp", max_steps=10, optimizer=dict(momentum=-0.1)),
     ["momentum"]),
    ("workers zero", dict(model="mlp", workers=0, max_steps=10), ["workers"]),
    ("epochs and max_steps zero", dict(model="mlp", epochs=0, max_steps=0),
     ["epochs", "max_steps"]),
    ("unknown sharding", dict(model="mlp", max_steps=10, sharding="zero3"),
     ["sharding: unknown sharding 'zero3'; choose none or optimizer"]),
    ("optimizer sharding on cuda",
     dict(model="mlp", max_steps=10, device="cuda", sharding="optimizer"),
     ["sharding: 'optimizer' runs on cpu jobs only"]),
]

# The same mistakes as zenithctl flags.
INVALID_FLAGS = [
    ("unknown model", ["--model", "resnet", "--max-steps", 10], ["model"]),
    ("unknown dataset", ["--model", "mlp", "--dataset", "cifar-10", "--max-steps", 10],
     ["dataset"]),
    ("batch not divisible by workers",
     ["--model", "mlp", "--workers", 3, "--batch-size", 128, "--max-steps", 10],
     ["batch_size", "workers"]),
    ("lr0 zero", ["--model", "mlp", "--max-steps", 10, "--lr0", 0], ["lr0"]),
    ("lr0 negative", ["--model", "mlp", "--max-steps", 10, "--lr0", -1], ["lr0"]),
    ("window zero", ["--model", "mlp", "--max-steps", 10, "--window", 0], ["window"]),
    ("momentum one", ["--model", "mlp", "--max-steps", 10, "--momentum", "1.0"], ["momentum"]),
    ("momentum negative", ["--model", "mlp", "--max-steps", 10, "--momentum", "-0.1"],
     ["momentum"]),
    ("workers zero", ["--model", "mlp", "--workers", 0, "--max-steps", 10], ["workers"]),
    ("epochs and max_steps zero", ["--model", "mlp", "--epochs", 0, "--max-steps", 0],
     ["epochs", "max_steps"]),
    ("optimizer sharding on cuda",
     ["--model", "mlp", "--max-steps", 10, "--device", "cuda", "--sharding", "optimizer"],
     ["sharding: 'optimizer' runs on cpu jobs only", "--sharding none"]),
]

# Flags zenithctl itself cannot parse: (flags, the flag the message must name)
UNPARSABLE_FLAGS = [
    (["--model", "mlp", "--workers", "abc"], "--workers"),
    (["--model", "mlp", "--max-steps", "1.5"], "--max-steps"),
    (["--model", "mlp", "--max-steps", 10, "--lr0", "fast"], "--lr0"),
    (["--model", "mlp", "--max-steps", 10, "--momentum", ""], "--momentum"),
    (["--model", "mlp", "--max-steps", 10, "--workers", "99999999999"], "--workers"),
    (["--model", "mlp", "--max-steps", 10, "--sharding", "zero3"], "--sharding"),
]


def data_dir_with(tmp, replace):
    """A folder with links to the real Fashion-MNIST files, where replace maps a file name to
    bytes to write instead (None: leave the file out)."""
    os.makedirs(tmp, exist_ok=True)
    for name in harness.FMNIST_FILES:
        if name in replace:
            if replace[name] is not None:
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(replace[name])
            continue
        os.symlink(os.path.join(harness.FMNIST_DIR, name + ".gz"),
                   os.path.join(tmp, name + ".gz"))
    return tmp


class BadInput(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        c = cls.c = cls.new_class_cluster()
        c.start_coordinator()
        c.add_worker("w0")
        c.add_worker("w1")
        cls.before = c.submit(model="mlp", max_steps=BEFORE_STEPS, seed=3, name="before")
        cls.tmp = tempfile.mkdtemp(prefix="zenith-it-data-", dir=c.dir)

    def assert_rpc_error(self, call, code, *words):
        return harness.assert_rpc_error(self, call, code, *words)

    # ---- invalid specs

    def test_submit_of_invalid_spec_is_invalid_argument_naming_the_field(self):
        pb2, _ = stubs()
        for what, fields, names in INVALID_SPECS:
            with self.subTest(what):
                req = pb2.SubmitJobRequest(spec=self.c.spec(**fields))
                self.assert_rpc_error(lambda: self.c.stub.SubmitJob(req, timeout=10),
                                      grpc.StatusCode.INVALID_ARGUMENT, *names)

    def test_submit_without_spec_is_invalid_argument(self):
        pb2, _ = stubs()
        self.assert_rpc_error(lambda: self.c.stub.SubmitJob(pb2.SubmitJobRequest(), timeout=10),
                              grpc.StatusCode.INVALID_ARGUMENT, "spec")

    def test_zenithctl_submit_of_invalid_spec_fails_naming_the_field(self):
        for what, flags, names in INVALID_FLAGS:
            with self.subTest(what):
                out = self.c.ctl("submit", *flags)
                self.assertNotEqual(out.returncode, 0, "stdout: %s" % out.stdout)
                self.assertEqual(out.stdout, "", "no job id may be printed")
                self.assertIn("INVALID_ARGUMENT", out.stderr)
                for n in names:
                    self.assertIn(n, out.stderr)

    def test_zenithctl_flag_that_does_not_parse_is_a_usage_error_naming_it(self):
        for flags, flag in UNPARSABLE_FLAGS:
            with self.subTest(" ".join(map(str, flags))):
                out = self.c.ctl("submit", *flags)
                self.assertEqual(out.returncode, 2, "stderr: %s" % out.stderr)
                self.assertIn(flag, out.stderr)
                self.assertEqual(out.stdout, "")

    def test_submit_of_overlong_name_or_data_dir_is_invalid_argument_naming_the_field(self):
        pb2, _ = stubs()
        for field, value in (("name", "n" * 257), ("data_dir", "/" + "d" * 4096)):
            with self.subTest(field):
                req = pb2.SubmitJobRequest(spec=self.c.spec(model="mlp", max_steps=10,
                                                            **{field: value}))
                err = self.assert_rpc_error(lambda: self.c.stub.SubmitJob(req, timeout=10),
                                            grpc.StatusCode.INVALID_ARGUMENT)
                # The field must stand as a word: "name" inside "filename" does not name it.
                self.assertRegex(err.details() or "", r"(?<![A-Za-z_])%s(?![A-Za-z_])" % field)

    def test_invalid_submissions_leave_no_job_behind(self):
        pb2, _ = stubs()
        jobs = self.c.stub.ListJobs(pb2.ListJobsRequest(), timeout=10).jobs
        self.assertEqual([j.id for j in jobs], [self.before.id])

    # ---- unknown and finished jobs

    def test_get_of_unknown_job_is_not_found(self):
        pb2, _ = stubs()
        self.assert_rpc_error(lambda: self.c.stub.GetJob(pb2.GetJobRequest(id="j-999"), timeout=10),
                              grpc.StatusCode.NOT_FOUND, "j-999")

    def test_cancel_of_unknown_job_is_not_found(self):
        pb2, _ = stubs()
        self.assert_rpc_error(
            lambda: self.c.stub.CancelJob(pb2.CancelJobRequest(id="j-999"), timeout=10),
            grpc.StatusCode.NOT_FOUND, "j-999")

    def test_watch_of_unknown_job_is_not_found(self):
        self.assert_rpc_error(lambda: self.c.watch("nope", timeout=10),
                              grpc.StatusCode.NOT_FOUND, "nope")

    def test_zenithctl_status_and_cancel_of_unknown_job_fail_naming_it(self):
        for command in ("status", "cancel", "watch"):
            with self.subTest(command):
                out = self.c.ctl(command, "j-999")
                self.assertEqual(out.returncode, 1, out.stderr)
                self.assertIn("NOT_FOUND", out.stderr)
                self.assertIn("j-999", out.stderr)

    # ---- requests that are not what they claim

    def test_undecodable_request_is_invalid_argument(self):
        raw = self.c.channel.unary_unary("/zenith.v1.Zenith/SubmitJob",
                                         request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
        # Field 1, length-delimited, claiming 16 bytes where 3 follow; then a wire type (7)
        # that does not exist.
        for garbage in (b"\x0a\x10abc", b"\xff\xff\xff\xff\x0f"):
            with self.subTest(garbage.hex()):
                self.assert_rpc_error(lambda: raw(garbage, timeout=10),
                                      grpc.StatusCode.INVALID_ARGUMENT, "SubmitJob")

    def test_call_of_unregistered_method_is_unimplemented_at_once(self):
        # (grpc.health.v1.Health is served now: test_health.py covers it.)
        for path in ("/no.such.v1.Service/Check", "/zenith.v1.Zenith/Nope"):
            with self.subTest(path):
                raw = self.c.channel.unary_unary(path, request_serializer=lambda b: b,
                                                 response_deserializer=lambda b: b)
                started = time.monotonic()
                self.assert_rpc_error(lambda: raw(b"", timeout=harness.scaled(5)),
                                      grpc.StatusCode.UNIMPLEMENTED)
                took = time.monotonic() - started
                self.assertLess(took, harness.scaled(1), "seconds until the call was answered")

    def test_oversized_request_is_resource_exhausted(self):
        pb2, _ = stubs()
        req = pb2.SubmitJobRequest(spec=self.c.spec(model="mlp", max_steps=10,
                                                    name="x" * (5 << 20)))
        self.assert_rpc_error(lambda: self.c.stub.SubmitJob(req, timeout=30),
                              grpc.StatusCode.RESOURCE_EXHAUSTED)

    # ---- broken data folders

    def run_on_data(self, data_dir):
        job = self.c.submit(model="mlp", max_steps=10, data_dir=data_dir)
        return self.c.wait_final(job.id, timeout=60)

    def test_missing_idx_file_fails_the_job_naming_the_file(self):
        d = data_dir_with(os.path.join(self.tmp, "missing"), {"train-labels-idx1-ubyte": None})
        job = self.run_on_data(d)
        self.assertEqual(state_name(job.state), "FAILED")
        self.assertIn("train-labels-idx1-ubyte", job.error)
        self.assertIn("missing", job.error)

    def test_idx_file_with_bad_magic_fails_the_job_naming_the_file(self):
        bad = struct.pack(">IIII", 0x00000903, 60000, 28, 28) + bytes(64)
        d = data_dir_with(os.path.join(self.tmp, "magic"), {"train-images-idx3-ubyte": bad})
        job = self.run_on_data(d)
        self.assertEqual(state_name(job.state), "FAILED")
        self.assertIn(os.path.join(d, "train-images-idx3-ubyte"), job.error)
        self.assertIn("magic", job.error)

    def test_truncated_idx_file_fails_the_job_naming_the_file(self):
        short = struct.pack(">IIII", 0x00000803, 60000, 28, 28) + bytes(1000)
        d = data_dir_with(os.path.join(self.tmp, "short"), {"train-images-idx3-ubyte": short})
        job = self.run_on_data(d)
        self.assertEqual(state_name(job.state), "FAILED")
        self.assertIn(os.path.join(d, "train-images-idx3-ubyte"), job.error)
        self.assertIn("truncated", job.error)

    def test_cancel_of_finished_job_is_failed_precondition(self):
        d = data_dir_with(os.path.join(self.tmp, "cancel"), {"t10k-labels-idx1-ubyte": None})
        job = self.run_on_data(d)
        pb2, _ = stubs()
        self.assert_rpc_error(
            lambda: self.c.stub.CancelJob(pb2.CancelJobRequest(id=job.id), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION, job.id)
        self.assertEqual(self.c.get(job.id), job, "a refused cancel must not change the job")

    # ---- afterwards

    def test_coordinator_still_runs_and_a_valid_job_succeeds(self):
        self.assertTrue(self.c.coordinator.running())
        job = self.c.submit(model="mlp", max_steps=10, name="after")
        final = self.c.wait_final(job.id, timeout=60)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        pb2, _ = stubs()
        self.assert_rpc_error(
            lambda: self.c.stub.CancelJob(pb2.CancelJobRequest(id=job.id), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION, "SUCCEEDED")

    def test_job_submitted_before_the_bad_input_is_untouched(self):
        final = self.c.wait_final(self.before.id, timeout=120)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.spec, self.before.spec)
        self.assertEqual(final.step, BEFORE_STEPS)
        items = self.c.watch(self.before.id, timeout=30)
        self.assertEqual([m.step for m in metrics_of(items)], list(range(1, BEFORE_STEPS + 1)))
        events = [e.kind for k, e in items if k == "event"]
        # One checkpoint: with checkpoint_every at its default (500), the one at the end.
        self.assertEqual(events, ["submitted", "started", "checkpoint", "succeeded"])


if __name__ == "__main__":
    harness.main()
