"""A worker daemon played by a test through the Workers service, for protocols that the real
worker cannot be made to exercise on cue: a worker that falls silent at a chosen moment, a rank
that reports a checkpoint of a given step, a late message of an attempt that is over.

A FakeWorker registers, then sends a heartbeat every `every` seconds from a thread of its own,
carrying the job and attempt it runs, like zenithd worker does. It takes the assignment a reply
carries when it is idle, and records every reply: cancels, checkpoint requests, re-registrations.
What a real trainer would do (report metrics, write and report checkpoints, finish) the test
does by calling the methods below. A checkpoint is a real file in the assignment's
checkpoint_dir, so the coordinator's deletion of old files can be checked.
"""

import hashlib
import os
import threading
import time

import grpc

import harness
from harness import stubs


class FakeWorker:

    def __init__(self, cluster, name, device="cpu", every=0.1, send_attempt=True,
                 stop_on_cancel=False):
        """send_attempt=False plays a worker that predates the attempt fields; stop_on_cancel
        makes a cancel end the job at once (FinishJob cancelled, then idle)."""
        self.pb2, pb2_grpc = stubs()
        self.cluster = cluster
        self.name = name
        self.device = device
        self.every = every
        self.send_attempt = send_attempt
        self.stop_on_cancel = stop_on_cancel
        # A subchannel of its own: one shared with the test's channel would carry a connection
        # to a killed coordinator over to the channel of its successor.
        self.channel = grpc.insecure_channel(cluster.addr,
                                             options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb2_grpc.WorkersStub(self.channel)
        self.lock = threading.Lock()
        self.assignment = None  # the job it runs now, None when idle
        self.assignments = []  # every assignment taken
        self.cancels = 0  # heartbeat replies with cancel
        self.requests = []  # checkpoint_request values seen, in order
        self.errors = []  # heartbeats that failed
        self.beating = True
        self.closed = False
        self.id = None
        self.register()
        self.thread = threading.Thread(target=self._loop, name="fake " + name, daemon=True)
        self.thread.start()

    # ---- control loop

    def register(self):
        reply = self.stub.RegisterWorker(self.pb2.RegisterRequest(
            name=self.name, host="127.0.0.1", device=self.device, pid=os.getpid()),
            timeout=harness.scaled(10))
        self.id = reply.worker_id

    def _loop(self):
        while not self.closed:
            if self.beating:
                try:
                    self.heartbeat()
                except grpc.RpcError as e:
                    with self.lock:
                        self.errors.append(e)
            time.sleep(self.every)

    def heartbeat(self):
        with self.lock:
            req = self.pb2.HeartbeatRequest(worker_id=self.id)
            if self.assignment is not None:
                req.job_id = self.assignment.job_id
                if self.send_attempt:
                    req.attempt = self.assignment.attempt
        reply = self.stub.Heartbeat(req, timeout=harness.scaled(5))
        with self.lock:
            if reply.checkpoint_request:
                self.requests.append(reply.checkpoint_request)
            if reply.cancel:
                self.cancels += 1
        if reply.reregister:
            with self.lock:
                self.assignment = None
            self.register()
        elif reply.cancel and self.stop_on_cancel:
            self.finish(cancelled=True, error="the job was cancelled or ended by the coordinator")
        elif reply.HasField("assignment"):
            with self.lock:
                if self.assignment is None:
                    self.assignment = reply.assignment
                    self.assignments.append(reply.assignment)
        return reply

    def pause(self):
        """Stops the heartbeats: the coordinator loses this worker after its timeout."""
        self.beating = False

    def close(self):
        self.closed = True
        self.thread.join(timeout=10)
        self.channel.close()

    # ---- waits

    def wait_assignment(self, job_id, attempt=None, timeout=10):
        def taken():
            with self.lock:
                a = self.assignment
            if a is not None and a.job_id == job_id and (attempt is None or a.attempt == attempt):
                return a
            return None

        return harness.wait_until(taken, timeout, "fake worker %s to take job %s%s" % (
            self.name, job_id, "" if attempt is None else " attempt %d" % attempt))

    def wait_cancels(self, more_than, timeout=10):
        return harness.wait_until(lambda: self.cancels > more_than, timeout,
                                  "fake worker %s to be told to cancel" % self.name)

    def wait_request(self, timeout=10):
        return harness.wait_until(lambda: self.requests[-1] if self.requests else None, timeout,
                                  "fake worker %s to see a checkpoint_request" % self.name)

    # ---- what a trainer would send

    def _job_fields(self, job_id=None, attempt=None):
        a = self.assignment
        fields = dict(worker_id=self.id, job_id=job_id or (a.job_id if a else ""))
        if attempt is not None:
            fields["attempt"] = attempt
        elif self.send_attempt and a is not None:
            fields["attempt"] = a.attempt
        return fields

    def write_checkpoint(self, step, size=1000):
        """A file of `size` random bytes in the assignment's checkpoint folder; (path, digest)."""
        a = self.assignment
        os.makedirs(a.checkpoint_dir, exist_ok=True)
        path = os.path.join(a.checkpoint_dir, "step-%06d-a%d-r%d.safetensors"
                            % (step, a.attempt, a.rank))
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        return path, hashlib.sha256(data).hexdigest()

    def report_checkpoint(self, at_step, request=0, size=1000, **overrides):
        """Writes a checkpoint file of step at_step and reports it, with any field of the request
        overridden; returns the request sent."""
        path, digest = self.write_checkpoint(at_step, size)
        fields = self._job_fields(overrides.pop("job_id", None), overrides.pop("attempt", None))
        fields.update(step=at_step, path=path, digest=digest, bytes=size, request=request)
        fields.update(overrides)
        req = self.pb2.ReportCheckpointRequest(**fields)
        self.stub.ReportCheckpoint(req, timeout=harness.scaled(10))
        return req

    def report_metrics(self, step, attempt=None, **fields):
        m = self.pb2.StepMetrics(step=step, epoch=1, loss=1.0, grad_norm=1.0, lr=0.05,
                                 unix_ms=int(time.time() * 1000))
        req = self.pb2.ReportMetricsRequest(metrics=[m], **self._job_fields(attempt=attempt),
                                            **fields)
        return self.stub.ReportMetrics(req, timeout=harness.scaled(10))

    def finish(self, attempt=None, idle=True, **fields):
        """FinishJob for the job it runs (or the attempt given); then idle unless idle=False."""
        req = self.pb2.FinishJobRequest(**self._job_fields(attempt=attempt), **fields)
        self.stub.FinishJob(req, timeout=harness.scaled(10))
        if idle:
            with self.lock:
                self.assignment = None
