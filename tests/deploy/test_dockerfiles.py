"""deploy/docker: the Dockerfiles lint clean and keep the promises of deploy/README.md.

Lint: dockerfile-utils (npm, the linter of the Docker language server; installed into
tests/deploy/node_modules by `make deps`), any error or warning fails. Then, per
Dockerfile: the builder builds with the CI's script, the runtime stage runs as UID 10001
with zenithd as the entrypoint and zenithctl beside it, and a .dockerignore keeps build
trees out of the context. No image is built (no Docker engine is needed).
"""

import os
import re
import subprocess
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.environ.get("ZENITH_SOURCE") or os.path.abspath(os.path.join(HERE, "..", ".."))
DOCKER = os.path.join(SOURCE, "deploy", "docker")
LINT = os.path.join(HERE, "node_modules", ".bin", "dockerfile-utils")


def stages(text):
    """[(FROM line, [instructions])] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
    return out


class Dockerfiles(unittest.TestCase):
    def check(self, name, builder_from, runtime_from):
        path = os.path.join(DOCKER, name)
        self.assertTrue(os.access(LINT, os.X_OK), "%s is missing: run `make deps`" % LINT)
        done = subprocess.run([LINT, "lint", path], capture_output=True, text=True, timeout=60)
        self.assertEqual((done.returncode, done.stdout.strip()), (0, ""),
                         "dockerfile-utils lint %s:\n%s%s" % (name, done.stdout, done.stderr))
        with open(path) as f:
            parts = stages(f.read())
        self.assertEqual(len(parts), 2, [p[0] for p in parts])
        (bfrom, builder), (rfrom, runtime) = parts
        self.assertRegex(bfrom, builder_from)
        self.assertRegex(rfrom, runtime_from)
        self.assertTrue(any("install-deps.sh" in i or "make build" in i for i in builder),
                        "the builder does not use scripts/install-deps.sh or make build")
        self.assertIn("USER 10001:10001", runtime)
        self.assertIn('ENTRYPOINT ["/usr/local/bin/zenithd"]', runtime)
        copies = [i for i in runtime if i.startswith("COPY --from=builder")]
        self.assertTrue(any("zenithd" in c and "zenithctl" in c for c in copies), copies)
        self.assertTrue(any("useradd" in i and "--uid 10001" in i for i in runtime))
        ignore = os.path.join(DOCKER, name + ".dockerignore")
        with open(ignore) as f:
            lines = f.read().split()
        for entry in (".git", "build", "build-*", "**/node_modules"):
            self.assertIn(entry, lines, ignore)

    def test_cpu(self):
        self.check("Dockerfile.cpu", r"^FROM debian:bookworm AS builder$",
                   r"^FROM debian:bookworm-slim AS runtime$")

    def test_cuda(self):
        self.check("Dockerfile.cuda", r"^FROM nvidia/cuda:\$\{CUDA_IMAGE_TAG\}-devel-",
                   r"^FROM nvidia/cuda:\$\{CUDA_IMAGE_TAG\}-runtime-")
        with open(os.path.join(DOCKER, "Dockerfile.cuda")) as f:
            self.assertIn("-DZENITH_CUDA=ON", f.read())


if __name__ == "__main__":
    unittest.main(verbosity=2)
