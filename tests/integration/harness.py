"""Shared machinery of the integration tests: real daemons on loopback.

A Cluster is one coordinator (port 0, its port read back from --port-file, a
state folder of its own) and any number of workers (--threads 1, so two of them
share this machine's cores fairly), each logging to a file in the cluster's
temporary folder. Tests drive it through zenithctl (Cluster.ctl) or through a
Python grpcio client built from proto/zenith.proto at test time (Cluster.stub),
so the public contract is exercised by a second, independent implementation.

Every wait has a bound. Timeouts are multiplied by ZENITH_TIME_SCALE, which the
CMake file sets above 1 for a sanitizer build. Daemons always go down at the
end: SIGTERM, then SIGKILL once a grace period has passed, also when a test
fails or the interpreter exits early. When a test fails, ClusterTestCase prints
the tail of every daemon log it started, so the failure can be read from the
CTest output alone.

The environment: ZENITH_BIN (the folder with zenithd and zenithctl) and
ZENITH_PROTO (the folder with zenith.proto).
"""

import atexit
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

BIN = os.environ.get("ZENITH_BIN", "")
PROTO = os.environ.get("ZENITH_PROTO", "")
TIME_SCALE = float(os.environ.get("ZENITH_TIME_SCALE", "1"))
KEEP_LOGS = os.environ.get("ZENITH_KEEP_LOGS", "") not in ("", "0")
FMNIST_DIR = os.environ.get("ZENITH_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
LOG_TAIL_LINES = 40

FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


def scaled(seconds):
    return seconds * TIME_SCALE


def wait_until(predicate, timeout, what, interval=0.05):
    """Polls predicate until it returns something true; fails naming `what` after timeout s."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (scaled(timeout), what))
        time.sleep(interval)


def read_port_file(path):
    """The port a daemon wrote to path (--port-file, --metrics-port-file), or None until the
    whole line is there."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None


# ---------------------------------------------------------------- gRPC stubs

_stubs_lock = threading.Lock()


def _generate_stubs(out_dir, name="zenith.proto"):
    proto = os.path.join(PROTO, name)
    try:
        import grpc_tools  # noqa: F401
        cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", PROTO, "--python_out=" + out_dir,
               "--grpc_python_out=" + out_dir, proto]
    except ImportError:
        plugin = shutil.which("grpc_python_plugin") or "/usr/bin/grpc_python_plugin"
        cmd = ["protoc", "-I", PROTO, "--python_out=" + out_dir, "--grpc_python_out=" + out_dir,
               "--plugin=protoc-gen-grpc_python=" + plugin, proto]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError("generating Python stubs failed: %s\n%s" % (" ".join(cmd), done.stderr))


_loaded_stubs = {}


def _load_stubs(name):
    """(NAME_pb2, NAME_pb2_grpc) of proto/NAME.proto, generated once per process into a
    temporary folder."""
    with _stubs_lock:
        if name not in _loaded_stubs:
            out_dir = tempfile.mkdtemp(prefix="zenith-stubs-")
            atexit.register(shutil.rmtree, out_dir, True)
            _generate_stubs(out_dir, name + ".proto")
            sys.path.insert(0, out_dir)
            _loaded_stubs[name] = (importlib.import_module(name + "_pb2"),
                                   importlib.import_module(name + "_pb2_grpc"))
        return _loaded_stubs[name]


def stubs():
    """(zenith_pb2, zenith_pb2_grpc)."""
    return _load_stubs("zenith")


def health_stubs():
    """(health_pb2, health_pb2_grpc): the standard gRPC health service."""
    return _load_stubs("health")


def state_name(state):
    pb2, _ = stubs()
    return pb2.JobState.Name(state)


def workers_stub(cluster):
    """A stub of the Workers service, for tests that act as a worker by hand."""
    _, pb2_grpc = stubs()
    return pb2_grpc.WorkersStub(cluster.channel)


def assert_rpc_error(test, call, codes, *words):
    """Runs call, which must fail with one of codes and a message containing every word."""
    import grpc
    if isinstance(codes, grpc.StatusCode):
        codes = (codes,)
    with test.assertRaises(grpc.RpcError) as ctx:
        call()
    err = ctx.exception
    test.assertIn(err.code(), codes, "details: %s" % err.details())
    for w in words:
        test.assertIn(w, err.details() or "", "status %s" % err.code())
    return err


# ---------------------------------------------------------------- daemons

_live = []  # every Daemon not yet stopped, for the atexit safety net


class Daemon:
    """One zenithd process whose stdout and stderr go to a log file."""

    def __init__(self, name, args, log_path, env=None):
        self.name = name
        self.args = args
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.returncode = None
        _live.append(self)

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc.poll() is None

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def send(self, sig):
        if self.running():
            self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, grace=10.0):
        """Sends sig, waits grace s (scaled), then SIGKILLs. Returns the exit code (negative for a
        signal, as Popen reports it)."""
        if self.returncode is not None:
            return self.returncode
        try:
            if self.running():
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=scaled(grace))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                self.log.write(b"[harness] did not exit within the grace period: SIGKILLed\n")
        finally:
            self.returncode = self.proc.returncode
            self.log.close()
            if self in _live:
                _live.remove(self)
        return self.returncode

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError("%s (pid %d) still running after %.1f s"
                                 % (self.name, self.pid, scaled(timeout)))
        return self.stop()

    def tail(self, lines=LOG_TAIL_LINES):
        """The last lines of the log, preceded by the head of a sanitizer report if there is one
        (its first lines name the fault and the stack; the last are the shadow-byte legend)."""
        try:
            text = self.log_text().splitlines()
        except OSError as e:
            return "(no log: %s)" % e
        parts = []
        for i, line in enumerate(text[:-lines]):
            if "ERROR: AddressSanitizer" in line or "ERROR: LeakSanitizer" in line \
                    or "runtime error:" in line:
                parts += text[i:i + 20] + ["    [...]"]
                break
        return "\n".join(parts + text[-lines:])


def _kill_leftovers():
    for d in list(_live):
        d.stop(grace=2)


atexit.register(_kill_leftovers)


def daemon_env():
    # LeakSanitizer stays on: the daemons are expected to exit clean, and the tests that stop
    # one on purpose check its exit code, which a leak report turns non-zero.
    env = dict(os.environ)
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    return env


# ---------------------------------------------------------------- cluster

class Cluster:
    """A coordinator plus workers in one temporary folder."""

    def __init__(self, label="cluster", heartbeat_ms=None, worker_timeout_ms=None):
        if not BIN or not PROTO:
            raise RuntimeError("set ZENITH_BIN and ZENITH_PROTO (CTest does)")
        for tool in ("zenithd", "zenithctl"):
            if not os.access(os.path.join(BIN, tool), os.X_OK):
                raise RuntimeError("%s/%s is missing: build the zenithd and zenithctl targets "
                                   "before running these tests" % (BIN, tool))
        self.label = label
        self.dir = tempfile.mkdtemp(prefix="zenith-it-%s-" % label)
        self.state_dir = os.path.join(self.dir, "state")
        self.heartbeat_ms = heartbeat_ms
        self.worker_timeout_ms = worker_timeout_ms
        self.coordinator = None
        self.port = None
        self.workers = {}
        self.daemons = []  # all ever started, for the logs
        self._channel = None
        self._stub = None
        self._coordinator_starts = 0
        self.keep = KEEP_LOGS
        # Loopback plain text, asked for explicitly as zenithd requires; the security tests
        # put TLS flags here instead.
        self.coordinator_security = ["--insecure"]
        self.worker_security = ["--insecure"]
        self.grpc_credentials = None  # grpc.ChannelCredentials for Cluster.channel; None: plain

    # ---- processes

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def start_coordinator(self, port=0, extra_args=()):
        """Starts (or restarts) the coordinator on the cluster's state folder; extra_args go on
        its command line."""
        self._coordinator_starts += 1
        n = self._coordinator_starts
        port_file = os.path.join(self.dir, "port-%d" % n)
        args = [os.path.join(BIN, "zenithd"), "coordinator", "--listen", "127.0.0.1:%d" % port,
                "--state", self.state_dir, "--port-file", port_file]
        args += list(self.coordinator_security) + list(extra_args)
        if self.heartbeat_ms is not None:
            args += ["--heartbeat-ms", str(self.heartbeat_ms)]
        if self.worker_timeout_ms is not None:
            args += ["--worker-timeout-ms", str(self.worker_timeout_ms)]
        log = os.path.join(self.dir, "coordinator-%d.log" % n)
        self.coordinator = Daemon("coordinator#%d" % n, args, log, daemon_env())
        self.daemons.append(self.coordinator)

        def port_written():
            if not self.coordinator.running():
                raise AssertionError("the coordinator exited (%s) before it listened:\n%s"
                                     % (self.coordinator.proc.returncode, self.coordinator.tail()))
            return read_port_file(port_file)

        self.port = wait_until(port_written, 30, "the coordinator's port file")
        self._close_channel()
        return self.addr

    def stop_coordinator(self, sig=signal.SIGTERM):
        code = self.coordinator.stop(sig)
        self._close_channel()
        return code

    def add_worker(self, name, wait=True, device=None, extra_args=()):
        """Starts a worker; extra_args go on its command line."""
        args = [os.path.join(BIN, "zenithd"), "worker", "--coordinator", self.addr,
                "--name", name, "--threads", "1"]
        if device is not None:
            args += ["--device", device]
        args += list(self.worker_security) + list(extra_args)
        log = os.path.join(self.dir, "worker-%s-%d.log" % (name, len(self.daemons)))
        w = Daemon("worker " + name, args, log, daemon_env())
        self.workers[name] = w
        self.daemons.append(w)
        if wait:
            self.wait_registered(name)
        return w

    def start_daemon(self, name, role, args):
        """Starts `zenithd ROLE ARGS` beside the cluster's coordinator and workers: a daemon that
        a test expects to refuse, or to be refused. It logs to the cluster's folder and is
        stopped with the cluster."""
        log = os.path.join(self.dir, re.sub(r"[^\w.-]+", "-", name).strip("-") + ".log")
        d = Daemon(name, [os.path.join(BIN, "zenithd"), role] + list(args), log, daemon_env())
        self.daemons.append(d)
        return d

    def registrations(self, name):
        """How often the current coordinator has logged `name` registering."""
        pattern = re.compile(r"worker %s registered as w-\d+" % re.escape(name))
        return len(pattern.findall(self.coordinator.log_text()))

    def wait_registered(self, name, count=1, timeout=30):
        wait_until(lambda: self.registrations(name) >= count, timeout,
                   "worker %s to register with the coordinator" % name)

    def stop(self):
        """Stops every daemon still running; workers first, so none sees the coordinator go."""
        self._close_channel()
        for d in reversed([d for d in self.daemons if d.name.startswith("worker ")]):
            d.stop()
        for d in self.daemons:
            d.stop()

    def remove(self):
        """Deletes the cluster's folder, unless a test failed on it or ZENITH_KEEP_LOGS is set."""
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tails(self):
        parts = []
        for d in self.daemons:
            parts.append("---- %s (pid %d, exit %s): %s\n%s" % (
                d.name, d.pid, d.proc.poll(), d.log_path, d.tail()))
        return "\n".join(parts)

    # ---- zenithctl

    def ctl(self, *args, timeout=60):
        """Runs zenithctl against this coordinator; returns the CompletedProcess."""
        cmd = [os.path.join(BIN, "zenithctl"), "--coordinator", self.addr] + [str(a) for a in args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(timeout),
                                  env=daemon_env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError("zenithctl %s did not finish within %.1f s; output so far:\n%s"
                                 % (" ".join(map(str, args)), scaled(timeout), e.stdout))

    # ---- gRPC

    def _close_channel(self):
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    @property
    def channel(self):
        if self._channel is None:
            import grpc
            if self.grpc_credentials is None:
                self._channel = grpc.insecure_channel(self.addr)
            else:
                self._channel = grpc.secure_channel(self.addr, self.grpc_credentials)
        return self._channel

    @property
    def stub(self):
        if self._stub is None:
            _, pb2_grpc = stubs()
            self._stub = pb2_grpc.ZenithStub(self.channel)
        return self._stub

    def spec(self, **fields):
        """A JobSpec; optimizer fields go in `optimizer` as a dict."""
        pb2, _ = stubs()
        opt = fields.pop("optimizer", None)
        s = pb2.JobSpec(**fields)
        if opt is not None:
            s.optimizer.CopyFrom(pb2.ZenithParams(**opt))
        return s

    def submit(self, **fields):
        """Submits through gRPC; returns the Job of the response."""
        pb2, _ = stubs()
        req = pb2.SubmitJobRequest(spec=self.spec(**fields))
        return self.stub.SubmitJob(req, timeout=scaled(10)).job

    def get(self, job_id):
        pb2, _ = stubs()
        return self.stub.GetJob(pb2.GetJobRequest(id=job_id), timeout=scaled(10))

    def wait_state(self, job_id, states, timeout):
        """Waits until the job is in one of `states` (names); returns the Job."""
        if isinstance(states, str):
            states = (states,)
        last = [None]

        def reached():
            job = self.get(job_id)
            last[0] = job
            return job if state_name(job.state) in states else None

        try:
            return wait_until(reached, timeout, "job %s to reach %s" % (job_id, "/".join(states)),
                              interval=0.1)
        except AssertionError as e:
            job = last[0]
            raise AssertionError("%s; it is %s (step %d, error %r, reason %r)" % (
                e, state_name(job.state), job.step, job.error, job.reason)) from None

    def wait_final(self, job_id, timeout):
        return self.wait_state(job_id, FINAL_STATES, timeout)

    def watch(self, job_id, timeout):
        """The whole WatchJob stream of a job as a list of (kind, message) pairs."""
        pb2, _ = stubs()
        items = []
        for item in self.stub.WatchJob(pb2.WatchJobRequest(id=job_id), timeout=scaled(timeout)):
            kind = item.WhichOneof("item")
            items.append((kind, getattr(item, kind)))
        return items

    def watch_until_now(self, job_id, timeout=30):
        """A job's history so far (WatchJob with history_only), for a job still running too."""
        pb2, _ = stubs()
        req = pb2.WatchJobRequest(id=job_id, history_only=True)
        return [(item.WhichOneof("item"), getattr(item, item.WhichOneof("item")))
                for item in self.stub.WatchJob(req, timeout=scaled(timeout))]


def checkpoints(c, job_id):
    """The job's checkpoints as the coordinator lists them, oldest first."""
    pb2, _ = stubs()
    return list(c.stub.ListCheckpoints(pb2.ListCheckpointsRequest(id=job_id),
                                       timeout=scaled(10)).checkpoints)


def wait_checkpoint(c, job_id, min_step, timeout=60):
    """The first checkpoint of the job at min_step or later, once there is one."""
    def found():
        cks = [k for k in checkpoints(c, job_id) if k.step >= min_step]
        return cks[0] if cks else None
    return wait_until(found, timeout, "a checkpoint of %s at step >= %d" % (job_id, min_step))


def events(c, job_id):
    """The job's events, from its whole WatchJob history."""
    return [e for kind, e in c.watch(job_id, 30) if kind == "event"]


def metrics_of(items):
    return [m for kind, m in items if kind == "metrics"]


def jobs_of(items):
    return [j for kind, j in items if kind == "job"]


# ---------------------------------------------------------------- test cases

class ClusterTestCase(unittest.TestCase):
    """A TestCase whose clusters are torn down after each test (or after the class, for
    clusters made in setUpClass), and whose failures print the daemons' log tails."""

    class_clusters = ()

    def new_cluster(self, **kw):
        c = Cluster(label=self._testMethodName[5:25], **kw)
        self._clusters.append(c)
        self.addCleanup(c.stop)
        return c

    @classmethod
    def new_class_cluster(cls, **kw):
        c = Cluster(label=cls.__name__[:20], **kw)
        cls.class_clusters = list(cls.class_clusters) + [c]
        return c

    @classmethod
    def tearDownClass(cls):
        for c in cls.class_clusters:
            c.stop()
            c.remove()
        cls.class_clusters = ()

    def run(self, result=None):
        self._clusters = []
        bad_before = self._bad_count(result)
        started = time.monotonic()
        try:
            return super().run(result)
        finally:
            took = time.monotonic() - started
            sys.stderr.write("[%s] %.1f s\n" % (self.id(), took))
            if self._bad_count(result) > bad_before:
                for c in list(self.class_clusters) + self._clusters:
                    c.keep = True
                    sys.stderr.write("==== daemon logs of %s, kept in %s\n%s\n"
                                     % (c.label, c.dir, c.log_tails()))
            for c in self._clusters:
                c.stop()
                c.remove()

    @staticmethod
    def _bad_count(result):
        if result is None:
            return 0
        return len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)


def in_definition_order(module_globals):
    """A load_tests hook that runs each class's tests in the order they are written, for the
    modules whose last test checks what the earlier ones must not have broken."""

    def load_tests(loader, standard_tests, pattern):
        suite = unittest.TestSuite()
        for obj in list(module_globals.values()):
            if isinstance(obj, type) and issubclass(obj, unittest.TestCase) \
                    and obj.__module__ == module_globals["__name__"]:
                names = [n for n in obj.__dict__ if n.startswith("test")]
                suite.addTests(obj(n) for n in names)
        return suite

    return load_tests


def main():
    unittest.main(verbosity=2)
