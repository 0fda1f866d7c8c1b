"""The rendered manifests and the daemons agree.

Reads the container args and env of the coordinator Deployment and the worker StatefulSet
as `kubectl kustomize deploy/k8s/overlays/cpu` renders them, replaces only what is
cluster-specific (ports on 0.0.0.0 by free loopback ports, the Service name and the pod IP
by 127.0.0.1, the pod name by zenith-worker-N, the PVC and Secret mount paths by
temporary folders holding what deploy/scripts/make-certs.sh makes), starts zenithd with
exactly those args, probes the health ports with grpc.health.v1 as the kubelet does,
and trains a short mlp job to SUCCEEDED through zenithctl with ZENITH_COORDINATOR,
ZENITH_TOKEN and ZENITH_CA (and ZENITH_CERT/ZENITH_KEY, the user's client certificate for
mutual TLS), after checking that a call without the token is refused; the job writes
its checkpoints to the shared checkpoint folder.

A flag the manifests use that zenithd does not know fails the test, naming the flag:
the pods would crash-loop on it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness  # noqa: E402
import render  # noqa: E402

WORKERS = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitute(args, env, mapping):
    """args with $(VAR) expanded from env (as the kubelet does) and then every
    cluster-specific value replaced by mapping: {old prefix or value: new}."""
    out = []
    for a in args:
        for name, value in env.items():
            a = a.replace("$(%s)" % name, value)
        if a.startswith("--"):
            flag, eq, value = a.partition("=")
            for old, new in mapping.items():
                if value == old or (old.endswith("/") and value.startswith(old)):
                    value = new + value[len(old):] if old.endswith("/") else new
                    break
            a = flag + eq + value
        out.append(a)
    return out


def unknown_flags(zenithd, role, args):
    """The flags of args that `zenithd ROLE` rejects as unrecognized."""
    missing = []
    for a in args[1:]:
        done = subprocess.run([zenithd, role, a, "--help"], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        if done.returncode != 0 and ("unrecognized option" in done.stderr
                                     or "not a flag of" in done.stderr):
            missing.append(a.partition("=")[0])
    return missing


def health_status(port, timeout=5):
    """The grpc.health.v1 status name served on 127.0.0.1:port, plain text (as the kubelet)."""
    import grpc
    pb2, pb2_grpc = harness.health_stubs()
    with grpc.insecure_channel("127.0.0.1:%d" % port) as channel:
        reply = pb2_grpc.HealthStub(channel).Check(pb2.HealthCheckRequest(service=""),
                                                   timeout=timeout)
    return pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class Layout:
    """The manifests' args and env for this machine: free loopback ports, folders under
    root, certificates from make-certs.sh (made by make())."""

    def __init__(self, root):
        objects = render.render("cpu")
        coord_c = render.container(
            render.find(objects, "Deployment", "zenith-coordinator"), "coordinator")
        worker_c = render.container(render.find(objects, "StatefulSet", "zenith-worker"),
                                    "worker")
        self.root = root
        self.state = os.path.join(root, "state")
        self.checkpoints = os.path.join(root, "checkpoints")
        self.grpc_port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()
        paths = {"/var/lib/zenith/state": self.state,
                 "/var/lib/zenith/checkpoints": self.checkpoints,
                 "/etc/zenith/ca/": os.path.join(root, "ca") + "/",
                 "/etc/zenith/token/": os.path.join(root, "token") + "/"}
        coord_map = dict(paths, **{
            "/etc/zenith/tls/": os.path.join(root, "coordinator-tls") + "/",
            "0.0.0.0:7070": "127.0.0.1:%d" % self.grpc_port,
            "0.0.0.0:7071": "127.0.0.1:%d" % self.health_port,
            "0.0.0.0:9464": "127.0.0.1:%d" % self.metrics_port})
        self.coord_args = substitute(coord_c["args"], {}, coord_map)
        self.worker_args, self.worker_envs, self.worker_health = [], [], []
        for i in range(WORKERS):
            env = {e["name"]: e["value"] for e in worker_c["env"] if "value" in e}
            env.update(POD_NAME="zenith-worker-%d" % i, POD_IP="127.0.0.1")
            self.worker_health.append(free_port())
            wmap = dict(paths, **{
                "/etc/zenith/tls/": os.path.join(root, "worker-tls") + "/",
                "zenith-coordinator:7070": "127.0.0.1:%d" % self.grpc_port,
                "0.0.0.0:7071": "127.0.0.1:%d" % self.worker_health[-1]})
            self.worker_args.append(substitute(worker_c["args"], env, wmap))
            self.worker_envs.append(env)

    def missing_flags(self):
        zenithd = os.path.join(harness.BIN, "zenithd")
        return (["coordinator " + f for f in unknown_flags(zenithd, "coordinator",
                                                          self.coord_args)]
                + ["worker " + f for f in unknown_flags(zenithd, "worker", self.worker_args[0])])

    def make(self):
        """The Secrets' and volumes' folders, laid out as the pods see them."""
        certs = os.path.join(self.root, "certs")
        done = subprocess.run([os.path.join(render.SOURCE, "deploy", "scripts", "make-certs.sh"),
                               certs], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise AssertionError("make-certs.sh failed:\n" + done.stderr)
        for sub, files in {"coordinator-tls": {"tls.crt": "coordinator.crt",
                                               "tls.key": "coordinator.key"},
                           "worker-tls": {"tls.crt": "worker.crt", "tls.key": "worker.key"},
                           "ca": {"ca.crt": "ca.crt"}, "token": {"token": "token"}}.items():
            os.makedirs(os.path.join(self.root, sub))
            for dst, src in files.items():
                os.symlink(os.path.join(certs, src), os.path.join(self.root, sub, dst))
        os.makedirs(self.state)
        os.makedirs(self.checkpoints)


class ManifestsRun(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zenith-deploy-")
        self.daemons = []
        self.passed = False
        self.addCleanup(self.stop_all)

    def stop_all(self):
        for d in reversed(self.daemons):
            d.stop()
        if not self.passed or harness.KEEP_LOGS:
            for d in self.daemons:
                sys.stderr.write("---- %s: %s\n%s\n" % (d.name, d.log_path, d.tail()))
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, name, args, env):
        log = os.path.join(self.dir, name + ".log")
        full_env = dict(harness.daemon_env(), **env)
        d = harness.Daemon(name, [os.path.join(harness.BIN, "zenithd")] + args, log, full_env)
        self.daemons.append(d)
        return d

    def test_manifest_args_train_a_job(self):
        lay = Layout(self.dir)
        self.assertEqual(lay.missing_flags(), [],
                         "the manifests pass flags zenithd does not know")
        lay.make()

        coord = self.start("coordinator", lay.coord_args, {})
        harness.wait_until(lambda: self.serving(coord, lay.health_port), 30,
                           "the coordinator's health service to report SERVING")
        workers = [self.start("worker-%d" % i, lay.worker_args[i], lay.worker_envs[i])
                   for i in range(WORKERS)]
        for i, w in enumerate(workers):
            harness.wait_until(lambda: self.serving(w, lay.worker_health[i]), 30,
                               "worker %d's health service to report SERVING" % i)
            harness.wait_until(lambda: "zenith-worker-%d registered" % i in coord.log_text(), 30,
                               "zenith-worker-%d to register over TLS" % i)

        with open(os.path.join(self.dir, "token", "token")) as f:
            token = f.read().strip()
        ctl_env = dict(harness.daemon_env(), ZENITH_COORDINATOR="127.0.0.1:%d" % lay.grpc_port,
                       ZENITH_TOKEN=token, ZENITH_CA=os.path.join(self.dir, "ca", "ca.crt"),
                       # --tls-client-ca: the coordinator wants a client certificate from
                       # every client (deploy/README.md, the `user` certificate).
                       ZENITH_CERT=os.path.join(self.dir, "certs", "user.crt"),
                       ZENITH_KEY=os.path.join(self.dir, "certs", "user.key"))
        ctl = os.path.join(harness.BIN, "zenithctl")

        def run_ctl(*args, env=ctl_env, timeout=120):
            return subprocess.run([ctl] + list(args), capture_output=True, text=True,
                                  timeout=harness.scaled(timeout), env=env,
                                  stdin=subprocess.DEVNULL)

        # Without the token the API refuses.
        no_token = dict(ctl_env)
        del no_token["ZENITH_TOKEN"]
        refused = run_ctl("list", env=no_token, timeout=30)
        self.assertNotEqual(refused.returncode, 0, "list without a token was served")

        sub = run_ctl("submit", "--model", "mlp", "--workers", str(WORKERS), "--batch-size", "64",
                      "--max-steps", "20", "--threads", "1", "--checkpoint-every", "10",
                      "--seed", "3")
        self.assertEqual(sub.returncode, 0, sub.stderr)
        job = sub.stdout.split()[0]
        watched = run_ctl("watch", job, timeout=240)
        self.assertEqual(watched.returncode, 0, watched.stdout[-2000:] + watched.stderr)
        status = json.loads(run_ctl("status", job, "--json").stdout)
        self.assertEqual(status["state"], "SUCCEEDED", status)
        self.assertEqual(status["step"], 20, status)
        written = os.listdir(os.path.join(lay.checkpoints, job))
        self.assertTrue(any(n.endswith(".safetensors") for n in written), written)
        for d in workers + [coord]:
            self.assertEqual(d.stop(), 0, d.name)
        self.passed = True

    def serving(self, daemon, port):
        if not daemon.running():
            raise AssertionError("%s exited (%s):\n%s" % (daemon.name, daemon.proc.returncode,
                                                          daemon.tail()))
        try:
            return health_status(port, timeout=2) == "SERVING"
        except Exception:  # not listening yet
            time.sleep(0.1)
            return False


def main():
    unittest.main(verbosity=2)


if __name__ == "__main__":
    main()
