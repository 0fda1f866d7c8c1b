"""Jobs run on workers of their device, cpu or cuda, and every way of naming a device is checked.

A job asks for a device (JobSpec.device, `zenithctl submit --device`); a worker
offers one (`zenithd worker --device cpu|cuda:N`, RegisterRequest.device). The
scheduler gives a job only to idle workers of its device, and a job that waits
says why, with the counts a user needs to act on. This machine has no GPU, so a
cuda worker is either a real worker whose GPU probe fails (it must warn and run
as a cpu worker) or a fake one that registers through the Workers service and
answers heartbeats by hand.
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402

import harness  # noqa: E402
from harness import assert_rpc_error, state_name, stubs, workers_stub  # noqa: E402

STEPS = 5

CUDA_JOB_REASON = ("waiting for 2 cuda workers: 0 idle cuda workers (2 cpu workers registered; "
                   "start workers with --device cuda:N)")
WIDE_CPU_JOB_REASON = ("waiting for 3 cpu workers: 2 idle cpu workers (2 cpu workers registered; "
                       "start workers with --device cpu)")

# Values of `zenithd worker --device` that must be refused before the worker starts.
BAD_WORKER_DEVICES = ["bogus", "cuda", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "cuda:1x",
                      "cuda:99999999999", "gpu:0", "CPU", ""]

# Values of `zenithctl submit --device`: a job names a kind of device, never a GPU index.
BAD_SUBMIT_DEVICES = ["bogus", "tpu", "cuda:0", "CUDA", ""]


class CudaJobWithCpuWorkers(harness.ClusterTestCase):
    """Two cpu workers; a 2-worker cuda job is submitted first, a 2-worker cpu job after it."""

    @classmethod
    def setUpClass(cls):
        c = cls.c = cls.new_class_cluster()
        c.start_coordinator()
        c.add_worker("w0")
        c.add_worker("w1")
        out = c.ctl("submit", "--model", "mlp", "--workers", 2, "--max-steps", STEPS,
                    "--device", "cuda", "--name", "on gpus")
        if out.returncode != 0:
            raise AssertionError("zenithctl submit --device cuda failed: %s" % out.stderr)
        cls.cuda_id = out.stdout.strip()
        cls.cpu_id = c.submit(model="mlp", workers=2, max_steps=STEPS, name="on cpus").id

    def test_cuda_job_waits_with_a_reason_naming_cuda_and_the_worker_counts(self):
        self.c.wait_final(self.cpu_id, timeout=60)
        job = self.c.get(self.cuda_id)
        self.assertEqual(state_name(job.state), "QUEUED")
        self.assertEqual(job.reason, CUDA_JOB_REASON)
        self.assertEqual(job.spec.device, "cuda")
        self.assertEqual(list(job.workers), [])

    def test_cpu_job_submitted_behind_it_runs_on_the_cpu_workers(self):
        final = self.c.wait_final(self.cpu_id, timeout=60)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(final.step, STEPS)
        self.assertEqual(sorted(final.workers), ["w0", "w1"])
        self.assertEqual(final.spec.device, "cpu", "the default device, filled in")

    def test_cpu_job_wider_than_the_cpu_workers_says_how_to_get_more(self):
        self.c.wait_final(self.cpu_id, timeout=60)
        job_id = self.c.submit(model="mlp", workers=3, batch_size=96, max_steps=STEPS).id
        self.addCleanup(self.c.ctl, "cancel", job_id)
        # Both workers must be idle to be counted: they may still be reporting the last job.
        try:
            harness.wait_until(lambda: self.c.get(job_id).reason == WIDE_CPU_JOB_REASON, 10,
                               "the reason of job %s" % job_id)
        except AssertionError:
            self.assertEqual(self.c.get(job_id).reason, WIDE_CPU_JOB_REASON)
            raise

    def test_status_shows_the_device_in_text_and_json(self):
        text = self.c.ctl("status", self.cuda_id)
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn("\ndevice:        cuda\n", text.stdout)
        for job_id, device in ((self.cuda_id, "cuda"), (self.cpu_id, "cpu")):
            out = self.c.ctl("status", job_id, "--json")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(json.loads(out.stdout)["spec"]["device"], device, job_id)

    def test_list_shows_the_device_column(self):
        out = self.c.ctl("list")
        self.assertEqual(out.returncode, 0, out.stderr)
        rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()}
        self.assertEqual(rows["ID"][:4], ["ID", "STATE", "MODEL", "DEVICE"])
        self.assertEqual(rows[self.cuda_id][1:4], ["QUEUED", "mlp", "cuda"])
        self.assertEqual(rows[self.cpu_id][2:4], ["mlp", "cpu"])

    def test_spec_with_device_tpu_is_invalid_argument_naming_the_field(self):
        pb2, _ = stubs()
        req = pb2.SubmitJobRequest(spec=self.c.spec(model="mlp", max_steps=STEPS, device="tpu"))
        assert_rpc_error(self, lambda: self.c.stub.SubmitJob(req, timeout=harness.scaled(10)),
                         grpc.StatusCode.INVALID_ARGUMENT, "device", "'tpu'", "cpu or cuda")

    def test_zenithctl_submit_with_a_bad_device_is_a_usage_error_naming_the_flag(self):
        pb2, _ = stubs()
        jobs_before = len(self.c.stub.ListJobs(pb2.ListJobsRequest(), timeout=10).jobs)
        for device in BAD_SUBMIT_DEVICES:
            with self.subTest(device=device):
                out = self.c.ctl("submit", "--model", "mlp", "--max-steps", STEPS,
                                 "--device", device)
                self.assertEqual(out.returncode, 2, "stderr: %s" % out.stderr)
                self.assertIn("--device", out.stderr)
                self.assertIn("cpu or cuda", out.stderr)
                self.assertEqual(out.stdout, "", "no job id may be printed")
        jobs_after = len(self.c.stub.ListJobs(pb2.ListJobsRequest(), timeout=10).jobs)
        self.assertEqual(jobs_after, jobs_before)


class RegisteredDevice(harness.ClusterTestCase):
    """The device a worker registers with, through the Workers service."""

    def test_worker_registering_with_device_tpu_is_invalid_argument_naming_the_field(self):
        pb2, _ = stubs()
        c = self.new_cluster()
        c.start_coordinator()
        req = pb2.RegisterRequest(name="tpu0", host="127.0.0.1", device="tpu", pid=1)
        assert_rpc_error(self,
                         lambda: workers_stub(c).RegisterWorker(req, timeout=harness.scaled(10)),
                         grpc.StatusCode.INVALID_ARGUMENT, "device", "'tpu'", "cpu or cuda")
        self.assertEqual(c.registrations("tpu0"), 0, "the refused worker must not be recorded")

    def test_jobs_go_only_to_idle_workers_of_their_device(self):
        pb2, _ = stubs()
        c = self.new_cluster()
        c.start_coordinator()
        workers = workers_stub(c)
        # Registered before w0, so a scheduler blind to devices would pick it first.
        gpu = workers.RegisterWorker(pb2.RegisterRequest(name="gpu0", host="127.0.0.1",
                                                         device="cuda", pid=1),
                                     timeout=harness.scaled(10))
        c.add_worker("w0")

        def heartbeat():
            return workers.Heartbeat(pb2.HeartbeatRequest(worker_id=gpu.worker_id),
                                     timeout=harness.scaled(10))

        heartbeat()  # fresh: an idle worker that answered recently is eligible
        cpu_job = c.submit(model="mlp", max_steps=STEPS, name="cpu")
        self.assertEqual(state_name(cpu_job.state), "RUNNING", cpu_job.reason)
        self.assertEqual(list(cpu_job.workers), ["w0"])
        self.assertFalse(heartbeat().HasField("assignment"), "the cuda worker got the cpu job")

        cuda_job = c.submit(model="mlp", max_steps=STEPS, device="cuda", name="cuda")
        self.assertEqual(state_name(cuda_job.state), "RUNNING", cuda_job.reason)
        self.assertEqual(list(cuda_job.workers), ["gpu0"])
        asg = heartbeat().assignment
        self.assertEqual((asg.job_id, asg.rank, asg.world_size), (cuda_job.id, 0, 1))
        self.assertEqual(asg.spec.device, "cuda")
        c.stub.CancelJob(pb2.CancelJobRequest(id=cuda_job.id), timeout=harness.scaled(10))

        final = c.wait_final(cpu_job.id, timeout=60)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertNotIn("assigned job %s " % cuda_job.id, c.workers["w0"].log_text())


class WorkerDeviceFlag(harness.ClusterTestCase):
    """`zenithd worker --device`: parsed strictly; a GPU that cannot be used means the CPU."""

    def test_worker_with_a_bad_device_exits_2_naming_the_flag(self):
        for device in BAD_WORKER_DEVICES:
            with self.subTest(device=device):
                # Port 1 refuses connections: a worker that wrongly starts only retries in vain.
                cmd = [os.path.join(harness.BIN, "zenithd"), "worker", "--coordinator",
                       "127.0.0.1:1", "--device", device]
                out = subprocess.run(cmd, capture_output=True, text=True,
                                     timeout=harness.scaled(5), stdin=subprocess.DEVNULL,
                                     env=harness.daemon_env())
                self.assertEqual(out.returncode, 2, "stderr: %s" % out.stderr)
                self.assertIn("--device", out.stderr)
                self.assertIn("cpu or cuda:N", out.stderr)

    def run_fallback(self, device):
        """Starts a worker with --device `device` that cannot get its GPU and checks that it
        warns, registers as a cpu worker and trains a cpu job."""
        c = self.new_cluster()
        c.start_coordinator()
        name = "asked-" + device.replace(":", "")
        w = c.add_worker(name, device=device)
        log = w.log_text()
        if re.search(r"starting as %s: .* device cuda:" % name, log):
            self.skipTest("this machine has a usable GPU %s" % device)
        warning = re.search(r" WARN +worker --device %s cannot be used \((.+)\); this worker runs "
                            r"on the CPU\n" % device, log)
        self.assertIsNotNone(warning, "the fallback warning in the worker log:\n%s" % log)
        self.assertIn("starting as %s: " % name, log)
        self.assertRegex(log, r"starting as %s: .* device cpu, " % name)
        self.assertRegex(c.coordinator.log_text(),
                         r"worker %s registered as w-\d+ .*device cpu," % name)

        job = c.submit(model="mlp", max_steps=STEPS, name="on the fallback worker")
        final = c.wait_final(job.id, timeout=60)
        self.assertEqual(state_name(final.state), "SUCCEEDED", final.error)
        self.assertEqual(list(final.workers), [name])
        return warning.group(1)

    def test_worker_asked_for_cuda_0_without_a_usable_gpu_warns_and_runs_cpu_jobs(self):
        self.run_fallback("cuda:0")

    def test_worker_asked_for_a_gpu_index_past_the_last_warns_and_runs_cpu_jobs(self):
        why = self.run_fallback("cuda:99")
        self.assertTrue(why.startswith(("there is no CUDA device 99", "cudaGetDeviceCount",
                                        "this build has no CUDA support",
                                        "this build has no GPU training")), why)


if __name__ == "__main__":
    harness.main()
