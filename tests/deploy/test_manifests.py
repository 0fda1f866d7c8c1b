"""deploy/k8s renders and validates offline, and says what the docs promise.

Both overlays are rendered with `kubectl kustomize`; every object is validated against
the Kubernetes API schemas of the npm package kubernetes-models (validate.mjs, strict: no
unknown fields), with node and tests/deploy/node_modules (installed by `make deps`).
Then the rules of deploy/README.md are checked on the rendered objects.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NODE = os.environ.get("ZENITH_NODE") or shutil.which("node") or "node"

CHECKPOINTS = "/var/lib/zenith/checkpoints"


def validate(objects):
    """(exit code, output) of validate.mjs on the objects."""
    if not os.path.isdir(os.path.join(HERE, "node_modules", "kubernetes-models")):
        raise AssertionError("tests/deploy/node_modules is missing: run `make deps`")
    done = subprocess.run([NODE, os.path.join(HERE, "validate.mjs")],
                          input=json.dumps(objects), capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


class Manifests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rendered = {o: render.render(o) for o in render.OVERLAYS}

    def test_kinds(self):
        for overlay, objects in self.rendered.items():
            kinds = sorted("%s/%s" % (o["kind"], o["metadata"]["name"]) for o in objects)
            self.assertEqual(kinds, [
                "Deployment/zenith-coordinator", "Namespace/zenith",
                "NetworkPolicy/zenith-coordinator", "NetworkPolicy/zenith-worker",
                "PersistentVolumeClaim/zenith-checkpoints", "PersistentVolumeClaim/zenith-state",
                "Service/zenith-coordinator", "Service/zenith-worker",
                "StatefulSet/zenith-worker"], overlay)
            for o in objects:
                if o["kind"] != "Namespace":
                    self.assertEqual(o["metadata"].get("namespace"), "zenith", o["kind"])

    def test_schemas(self):
        for overlay, objects in self.rendered.items():
            code, out = validate(objects)
            self.assertEqual(code, 0, "%s overlay:\n%s" % (overlay, out))
            self.assertEqual(out.count("\nok ") + out.startswith("ok "), len(objects), out)

    def test_validator_rejects_bad_objects(self):
        """The validator is not a rubber stamp: a typo, a wrong type, a missing field."""
        objects = self.rendered["gpu"]
        for what, breaker in [
                ("unknown field", lambda c: c.__setitem__("livenesProbe", c.pop("livenessProbe"))),
                ("wrong type", lambda c: c["resources"]["limits"].__setitem__(
                    "nvidia.com/gpu", [1])),
                ("missing required field", lambda c: c["ports"][0].pop("containerPort"))]:
            broken = copy.deepcopy(objects)
            breaker(render.container(render.find(broken, "StatefulSet", "zenith-worker"),
                                     "worker"))
            code, out = validate(broken)
            self.assertEqual(code, 1, "%s was accepted:\n%s" % (what, out))
            self.assertIn("invalid StatefulSet/zenith-worker", out, what)

    def test_coordinator(self):
        for overlay, objects in self.rendered.items():
            d = render.find(objects, "Deployment", "zenith-coordinator")
            self.assertEqual(d["spec"]["replicas"], 1)
            self.assertEqual(d["spec"]["strategy"]["type"], "Recreate")
            c = render.container(d, "coordinator")
            self.assertEqual(c["args"][0], "coordinator")
            f = render.flags(c["args"])
            self.assertEqual(f["checkpoint-dir"], CHECKPOINTS)
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            self.assertIn(CHECKPOINTS, mounts)
            self.assertIn(f["state"], mounts)
            # Every secret file the args name is on a read-only secret mount.
            volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
            for flag in ("tls-cert", "tls-key", "tls-client-ca", "token-file"):
                m = mounts[os.path.dirname(f[flag])]
                self.assertTrue(m.get("readOnly"), flag)
                self.assertIn("secret", volumes[m["name"]], flag)
            claims = {volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
                      for m in c["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]}
            self.assertEqual(claims, {"zenith-state", "zenith-checkpoints"})
            # Probes on the health port, which is the --health-listen port.
            health = int(f["health-listen"].rsplit(":", 1)[1])
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                self.assertEqual(c[probe]["grpc"]["port"], health, probe)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            self.assertEqual(ports, {"grpc": int(f["listen"].rsplit(":", 1)[1]), "health": health,
                                     "metrics": int(f["metrics-listen"].rsplit(":", 1)[1])})
            self.assertIn("memory", c["resources"]["limits"])
            svc = render.find(objects, "Service", "zenith-coordinator")
            self.assertEqual({p["name"]: p["targetPort"] for p in svc["spec"]["ports"]},
                             {"grpc": "grpc", "health": "health", "metrics": "metrics"})
            pod = d["spec"]["template"]["spec"]
            self.assertEqual(pod["securityContext"]["runAsUser"], 10001)
            self.assertTrue(pod["securityContext"]["runAsNonRoot"])

    def test_pvcs(self):
        objects = self.rendered["cpu"]
        self.assertEqual(render.find(objects, "PersistentVolumeClaim", "zenith-state")
                         ["spec"]["accessModes"], ["ReadWriteOnce"])
        self.assertEqual(render.find(objects, "PersistentVolumeClaim", "zenith-checkpoints")
                         ["spec"]["accessModes"], ["ReadWriteMany"])

    def test_workers(self):
        for overlay, objects in self.rendered.items():
            s = render.find(objects, "StatefulSet", "zenith-worker")
            pod = s["spec"]["template"]["spec"]
            c = render.container(s, "worker")
            self.assertEqual(c["args"][0], "worker")
            f = render.flags(c["args"])
            env = {e["name"]: e for e in c["env"]}
            self.assertEqual(f["name"], "$(POD_NAME)")
            self.assertEqual(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
                             "metadata.name")
            self.assertEqual(f["host"], "$(POD_IP)")
            self.assertEqual(env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP")
            self.assertEqual(f["coordinator"], "zenith-coordinator:7070")
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            self.assertIn(CHECKPOINTS, mounts)
            for flag in ("tls-ca", "tls-cert", "tls-key"):
                self.assertIn(os.path.dirname(f[flag]), mounts, flag)
            health = int(f["health-listen"].rsplit(":", 1)[1])
            # Readiness is the gRPC status; liveness only the port (NOT_SERVING while the
            # coordinator is away must not restart a worker).
            self.assertEqual(c["readinessProbe"]["grpc"]["port"], health)
            for probe in ("livenessProbe", "startupProbe"):
                self.assertEqual(c[probe]["tcpSocket"]["port"], health, probe)
            self.assertEqual({p["name"]: p["containerPort"] for p in c["ports"]},
                             {"health": health})
            self.assertGreaterEqual(pod["terminationGracePeriodSeconds"], 30)
            anti = pod["affinity"]["podAntiAffinity"]
            terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
            self.assertEqual(terms[0]["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname")
            self.assertEqual(terms[0]["podAffinityTerm"]["labelSelector"]["matchLabels"],
                             s["spec"]["selector"]["matchLabels"])
            self.assertEqual(s["spec"]["serviceName"], "zenith-worker")
            limits = c["resources"]["limits"]
            if overlay == "gpu":
                self.assertEqual(env["ZENITH_DEVICE"]["value"], "cuda:0")
                self.assertEqual(limits["nvidia.com/gpu"], 1)
                self.assertEqual(env["NCCL_SOCKET_IFNAME"]["value"], "eth0")
                self.assertIn("zenith-cuda", c["image"])
            else:
                self.assertEqual(env["ZENITH_DEVICE"]["value"], "cpu")
                self.assertNotIn("nvidia.com/gpu", limits)
                self.assertIn("zenith-cpu", c["image"])

    def test_network_policies(self):
        objects = self.rendered["cpu"]
        worker_labels = render.find(objects, "StatefulSet", "zenith-worker")["spec"]["selector"][
            "matchLabels"]
        coord = render.find(objects, "NetworkPolicy", "zenith-coordinator")
        grpc_rules = [r for r in coord["spec"]["ingress"]
                      if {"protocol": "TCP", "port": 7070} in r.get("ports", [])]
        self.assertEqual(len(grpc_rules), 1)
        self.assertIn({"podSelector": {"matchLabels": worker_labels}}, grpc_rules[0]["from"])
        workers = render.find(objects, "NetworkPolicy", "zenith-worker")
        self.assertEqual(workers["spec"]["podSelector"]["matchLabels"], worker_labels)
        # The collectives' ports are picked at run time: worker to worker is every port.
        self.assertIn({"from": [{"podSelector": {"matchLabels": worker_labels}}]},
                      workers["spec"]["ingress"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
