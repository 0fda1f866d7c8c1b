"""The standard gRPC health service (grpc.health.v1.Health) on both daemons.

Clients are built from proto/health.proto with the same generator as the zenith stubs, so the
daemons are checked against grpcio's reading of the standard wire format. The coordinator serves
the service on its API listener and on the plain-text --health-listen; a worker only on its own
--health-listen. Check answers the status now (NOT_FOUND for a name the daemon does not know);
Watch sends it, then every change: a daemon stopped by SIGTERM must be seen to turn NOT_SERVING
through Watch before it is gone.
"""

import os
import signal
import threading
import time

import grpc

import harness
from harness import (ClusterTestCase, health_stubs, read_port_file, scaled, state_name,
                     wait_until)

# One worker, a job that runs until it is stopped: it is still running when the worker is told
# to drain, and its checkpoint keeps the worker alive for a while after SIGTERM.
LONG_JOB = dict(model="mlp", workers=1, batch_size=64, max_steps=1000000, seed=3,
                checkpoint_every=0, name="health")

def status_name(status):
    pb2, _ = health_stubs()
    return pb2.HealthCheckResponse.ServingStatus.Name(status)


class Prober:
    """A plain-text health client of one address."""

    def __init__(self, addr, channel=None):
        self.addr = addr
        self.channel = channel or grpc.insecure_channel(addr)
        pb2, pb2_grpc = health_stubs()
        self.stub = pb2_grpc.HealthStub(self.channel)

    def check(self, service=""):
        pb2, _ = health_stubs()
        resp = self.stub.Check(pb2.HealthCheckRequest(service=service), timeout=scaled(5))
        return status_name(resp.status)

    def watch(self, service=""):
        return Watch(self.stub, service)


class Watch:
    """A Watch stream read on a thread of its own: each status with the time it came, and how
    the stream ended."""

    def __init__(self, stub, service):
        pb2, _ = health_stubs()
        self.seen = []  # (status name, monotonic time)
        self.ended = None
        self.call = stub.Watch(pb2.HealthCheckRequest(service=service))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for resp in self.call:
                self.seen.append((status_name(resp.status), time.monotonic()))
            self.ended = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.ended = e.code()

    def statuses(self):
        return [s for s, _ in self.seen]

    def wait_for(self, status, timeout=10):
        return wait_until(lambda: next((t for s, t in self.seen if s == status), None), timeout,
                          "Watch to deliver %s (so far %s)" % (status, self.statuses()))

    def wait_end(self, timeout=10):
        self.thread.join(scaled(timeout))
        if self.thread.is_alive():
            raise AssertionError("the Watch stream did not end within %.1f s (statuses %s)"
                                 % (scaled(timeout), self.statuses()))
        return self.ended

    def close(self):
        self.call.cancel()


def exit_time(daemon, timeout=60):
    """Waits for the process to exit; returns (exit code, monotonic time it was seen gone)."""
    wait_until(lambda: not daemon.running(), timeout, "%s to exit" % daemon.name, interval=0.01)
    return daemon.stop(), time.monotonic()


class HealthTest(ClusterTestCase):

    def coordinator(self, c):
        """Starts the coordinator with a plain-text health listener; returns a Prober of it."""
        port_file = os.path.join(c.dir, "health-port")
        c.start_coordinator(extra_args=["--health-listen", "127.0.0.1:0",
                                        "--health-port-file", port_file])
        port = wait_until(lambda: read_port_file(port_file), 10, "the health port file")
        return Prober("127.0.0.1:%d" % port)

    def worker(self, c, name):
        """Starts a worker with --health-listen on port 0; returns a Prober of it."""
        port_file = os.path.join(c.dir, "health-port-%s" % name)
        c.add_worker(name, wait=False, extra_args=["--health-listen", "127.0.0.1:0",
                                                   "--health-port-file", port_file])
        port = wait_until(lambda: read_port_file(port_file), 10,
                          "worker %s's health port file" % name)
        return Prober("127.0.0.1:%d" % port)

    def test_coordinator_is_serving_on_both_listeners(self):
        c = self.new_cluster()
        plain = self.coordinator(c)
        main = Prober(c.addr, c.channel)
        for prober in (plain, main):
            for service in ("", "zenith.v1.Zenith", "zenith.v1.Workers"):
                self.assertEqual(prober.check(service), "SERVING",
                                 "Check(%r) on %s" % (service, prober.addr))

    def test_unknown_service_is_not_found_and_watched_as_service_unknown(self):
        c = self.new_cluster()
        plain = self.coordinator(c)
        for prober in (plain, Prober(c.addr, c.channel)):
            harness.assert_rpc_error(self, lambda: prober.check("no.such.Service"),
                                     grpc.StatusCode.NOT_FOUND, "no.such.Service")
        w = plain.watch("no.such.Service")
        w.wait_for("SERVICE_UNKNOWN")
        w.close()

    def test_worker_turns_serving_once_registered(self):
        c = self.new_cluster()
        self.coordinator(c)
        prober = self.worker(c, "hw")
        c.wait_registered("hw")
        wait_until(lambda: prober.check() == "SERVING", 10, "worker hw's Check to say SERVING")
        self.assertIn("health service (plain text) on 127.0.0.1:%s" % prober.addr.split(":")[1],
                      c.workers["hw"].log_text())

    def test_worker_not_serving_while_the_coordinator_is_unreachable(self):
        c = self.new_cluster()
        self.coordinator(c)
        prober = self.worker(c, "hw")
        wait_until(lambda: prober.check() == "SERVING", 30, "worker hw to say SERVING")
        self.assertEqual(c.stop_coordinator(), 0)
        # A heartbeat that cannot reach the coordinator fails within its 5 s deadline.
        wait_until(lambda: prober.check() == "NOT_SERVING", 20,
                   "worker hw to say NOT_SERVING without its coordinator")

    def test_worker_sigterm_turns_not_serving_on_watch_before_it_exits(self):
        c = self.new_cluster()
        self.coordinator(c)
        prober = self.worker(c, "hw")
        c.wait_registered("hw")
        job = c.submit(**LONG_JOB)
        c.wait_state(job.id, "RUNNING", 30)
        wait_until(lambda: c.get(job.id).step >= 5, 60, "the job to take 5 steps")

        w = prober.watch()
        w.wait_for("SERVING")
        c.workers["hw"].send(signal.SIGTERM)
        not_serving_at = w.wait_for("NOT_SERVING", 10)
        code, gone_at = exit_time(c.workers["hw"])
        self.assertEqual(code, 0, "exit code of the SIGTERMed worker")
        self.assertLess(not_serving_at, gone_at, "NOT_SERVING must come before the exit")
        self.assertEqual(w.statuses()[:2], ["SERVING", "NOT_SERVING"])
        self.assertNotEqual(w.wait_end(), grpc.StatusCode.OK,
                            "the stream ends when the worker goes, not before")
        final = c.wait_state(job.id, ("QUEUED", "RUNNING") + harness.FINAL_STATES, 30)
        self.assertNotEqual(state_name(final.state), "FAILED", final.error)

    def test_coordinator_sigterm_turns_not_serving_on_watch_before_the_stream_ends(self):
        c = self.new_cluster()
        plain = self.coordinator(c)
        watches = [plain.watch(), Prober(c.addr, c.channel).watch()]
        for w in watches:
            w.wait_for("SERVING")
        c.coordinator.send(signal.SIGTERM)
        for w in watches:
            w.wait_for("NOT_SERVING")
            w.wait_end()
            self.assertEqual(w.statuses(), ["SERVING", "NOT_SERVING"])
        # Not a second SIGTERM: the first one's handler is reset, so another would kill it.
        self.assertEqual(c.coordinator.wait_exit(10), 0, "exit code of the coordinator on SIGTERM")

    def test_bad_health_listen_address_stops_the_coordinator(self):
        c = self.new_cluster()
        with self.assertRaises(AssertionError):
            c.start_coordinator(extra_args=["--health-listen", "127.0.0.1:notaport"])
        self.assertEqual(c.coordinator.stop(), 1)
        self.assertIn("--health-listen", c.coordinator.log_text())

    def test_bad_health_listen_address_stops_the_worker(self):
        c = self.new_cluster()
        c.start_coordinator()
        w = c.add_worker("hw", wait=False, extra_args=["--health-listen", "127.0.0.1:notaport"])
        self.assertEqual(w.wait_exit(10), 1)
        self.assertIn("--health-listen", w.log_text())
        self.assertEqual(c.registrations("hw"), 0, "a worker that cannot serve health registers")


if __name__ == "__main__":
    harness.main()
