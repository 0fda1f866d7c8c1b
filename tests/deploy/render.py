"""Renders deploy/k8s overlays with `kubectl kustomize`, offline, for the deploy tests.

ZENITH_SOURCE: the repository root (CTest sets it). ZENITH_KUBECTL: the kubectl to use,
else the first on PATH (Debian's kubernetes-client 1.20 has kustomize 2.0.3 built in;
newer ones kustomize 5; the overlays are written for both).
"""

import os
import shutil
import subprocess

import yaml

SOURCE = os.environ.get("ZENITH_SOURCE") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
OVERLAYS = ("cpu", "gpu")


def kubectl():
    path = os.environ.get("ZENITH_KUBECTL") or shutil.which("kubectl")
    if not path:
        raise RuntimeError("kubectl is missing: `make deps` installs Debian's kubernetes-client")
    return path


def render(overlay):
    """The objects of an overlay, as kubectl kustomize prints them."""
    path = os.path.join(SOURCE, "deploy", "k8s", "overlays", overlay)
    # No cluster is needed: kustomize only reads files. An empty KUBECONFIG keeps kubectl
    # from looking for one.
    env = dict(os.environ, KUBECONFIG=os.devnull)
    done = subprocess.run([kubectl(), "kustomize", path], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError("kubectl kustomize %s failed (%d):\n%s"
                             % (path, done.returncode, done.stderr))
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def find(objects, kind, name):
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError("no %s %s in the rendered manifests" % (kind, name))


def container(workload, name):
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError("no container %s in %s" % (name, workload["metadata"]["name"]))


def flags(args):
    """--name=value arguments as a dict (every flag in the manifests is written that way)."""
    out = {}
    for a in args:
        if a.startswith("--"):
            k, _, v = a[2:].partition("=")
            out[k] = v
    return out
