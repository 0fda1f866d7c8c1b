"""Secured connections: TLS on the coordinator's listener, client certificates for workers
(mutual TLS), the bearer token of the user-facing API, and zenithctl's settings.

Each run makes a throwaway CA, a server certificate for 127.0.0.1 and localhost, and a client
certificate, with the openssl command-line tool. The secured cluster is shared by the class:
a coordinator with --tls-cert, --tls-key, --tls-client-ca and --token-file, and one worker
with its client certificate; the last test greps every log it wrote for the token.
"""

import os
import subprocess
import tempfile
import unittest

import harness
from harness import scaled

TOKEN = "zn-test-token-7f3c9a41d2b84e65a0c1"
EXTENSIONS = """[server]
subjectAltName = IP:127.0.0.1, DNS:localhost
basicConstraints = CA:FALSE
extendedKeyUsage = serverAuth
[client]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
"""


def openssl(folder, *args):
    subprocess.run(["openssl"] + list(args), cwd=folder, check=True, capture_output=True,
                   timeout=scaled(30))


def make_pki(folder):
    """ca.pem, server.pem/.key and client.pem/.key in folder; returns their paths by name."""
    with open(os.path.join(folder, "ext.cnf"), "w") as f:
        f.write(EXTENSIONS)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(folder, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=zenith test CA")
    for name in ("server", "client"):
        openssl(folder, "req", *ec, "-keyout", name + ".key", "-out", name + ".csr",
                "-subj", "/CN=zenith test " + name)
        openssl(folder, "x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "2", "-extfile", "ext.cnf",
                "-extensions", name)
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    return {n: os.path.join(folder, n) for n in names}


def run(args, env=None, timeout=20):
    return subprocess.run(args, capture_output=True, text=True, timeout=scaled(timeout),
                          stdin=subprocess.DEVNULL, env=env or harness.daemon_env())


def zenithctl(*args, env=None):
    return run([os.path.join(harness.BIN, "zenithctl")] + [str(a) for a in args], env=env)


def zenithd(*args):
    return run([os.path.join(harness.BIN, "zenithd")] + [str(a) for a in args])


class SecuredCluster(harness.ClusterTestCase):
    """TLS, mutual TLS and the token between real daemons."""

    @classmethod
    def setUpClass(cls):
        import grpc
        cls.pki_dir = tempfile.mkdtemp(prefix="zenith-it-pki-")
        cls.pki = make_pki(cls.pki_dir)
        cls.token_file = os.path.join(cls.pki_dir, "token")
        with open(cls.token_file, "w") as f:
            f.write(TOKEN + "\n\n")
        c = cls.c = cls.new_class_cluster()
        c.coordinator_security = ["--tls-cert", cls.pki["server.pem"],
                                  "--tls-key", cls.pki["server.key"],
                                  "--tls-client-ca", cls.pki["ca.pem"],
                                  "--token-file", cls.token_file, "--log-level", "debug"]
        c.worker_security = ["--tls-ca", cls.pki["ca.pem"], "--tls-cert", cls.pki["client.pem"],
                             "--tls-key", cls.pki["client.key"], "--log-level", "debug"]
        with open(cls.pki["ca.pem"], "rb") as f:
            cls.ca_pem = f.read()
        c.grpc_credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=cls.ca_pem),
            grpc.access_token_call_credentials(TOKEN))
        c.start_coordinator()
        c.add_worker("w0")
        cls.outputs = []  # zenithctl -v output, searched for the token at the end

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        subprocess.run(["rm", "-rf", cls.pki_dir])

    def secure_stub(self, token=None):
        import grpc
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        if token is not None:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token))
        channel = grpc.secure_channel(self.c.addr, creds)
        self.addCleanup(channel.close)
        _, pb2_grpc = harness.stubs()
        return pb2_grpc.ZenithStub(channel)

    def list_jobs(self, stub):
        pb2, _ = harness.stubs()
        return lambda: stub.ListJobs(pb2.ListJobsRequest(), timeout=scaled(10))

    def test_mlp_job_trains_to_succeeded_over_mutual_tls_with_the_token(self):
        sub = self.c.ctl("-v", "--ca", self.pki["ca.pem"], "--token", TOKEN, "submit",
                         "--model", "mlp", "--max-steps", 20, "--name", "secured", "--watch",
                         timeout=120)
        self.outputs.append(sub.stdout + sub.stderr)
        self.assertEqual(sub.returncode, 0, "stdout:\n%s\nstderr:\n%s" % (sub.stdout, sub.stderr))
        self.assertIn("SUCCEEDED", sub.stdout)
        self.assertIn("token from --token (%d characters)" % len(TOKEN), sub.stderr)
        self.assertIn("transport TLS, verified against ca", sub.stderr)

    def test_call_without_a_token_is_unauthenticated(self):
        import grpc
        harness.assert_rpc_error(self, self.list_jobs(self.secure_stub()),
                                 grpc.StatusCode.UNAUTHENTICATED,
                                 "this coordinator requires a token")
        out = zenithctl("--coordinator", self.c.addr, "--ca", self.pki["ca.pem"], "list")
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("UNAUTHENTICATED: this coordinator requires a token: give zenithctl "
                      "--token, ZENITH_TOKEN or a config file", out.stderr)

    def test_call_with_a_wrong_token_is_permission_denied(self):
        import grpc
        for wrong in ("x", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
            with self.subTest(wrong=wrong):
                harness.assert_rpc_error(self, self.list_jobs(self.secure_stub(wrong)),
                                         grpc.StatusCode.PERMISSION_DENIED,
                                         "the token is not valid for this coordinator")

    def test_plain_text_client_fails_against_the_tls_listener(self):
        import grpc
        channel = grpc.insecure_channel(self.c.addr)
        self.addCleanup(channel.close)
        _, pb2_grpc = harness.stubs()
        stub = pb2_grpc.ZenithStub(channel)
        pb2, _ = harness.stubs()
        call = lambda: stub.ListJobs(pb2.ListJobsRequest(), timeout=scaled(10),  # noqa: E731
                                     metadata=[("authorization", "Bearer " + TOKEN)])
        harness.assert_rpc_error(self, call, grpc.StatusCode.UNAVAILABLE)
        out = zenithctl("--coordinator", self.c.addr, "--insecure", "--token", TOKEN, "list")
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("cannot reach the coordinator", out.stderr)

    def test_worker_without_a_client_certificate_is_refused_and_runs_nothing(self):
        c = self.c
        # A two-worker job waits for a second worker; nocert would be the one.
        job = c.submit(model="mlp", max_steps=5, workers=2, name="waits-for-a-second-worker")
        d = c.start_daemon("worker nocert", "worker",
                           ["--coordinator", c.addr, "--name", "nocert", "--threads", "1",
                            "--tls-ca", self.pki["ca.pem"]])
        code = d.wait_exit(30)
        log = d.log_text()
        self.assertEqual(code, 1, log)
        self.assertIn("the coordinator refused this worker", log)
        self.assertIn("needs a client certificate signed by the coordinator's --tls-client-ca",
                      log)
        self.assertEqual(c.registrations("nocert"), 0)
        self.assertEqual(harness.state_name(c.get(job.id).state), "QUEUED")

        # A second worker with its certificate completes the pair.
        c.add_worker("w1")
        self.assertEqual(harness.state_name(c.wait_final(job.id, 60).state), "SUCCEEDED")

    def test_the_token_appears_in_no_log_and_no_verbose_output(self):
        # Last of the class (definition order): every daemon has logged by now.
        out = zenithctl("-v", "--coordinator", self.c.addr, "--ca", self.pki["ca.pem"], "list",
                        env=dict(harness.daemon_env(), ZENITH_TOKEN=TOKEN))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("token from ZENITH_TOKEN (%d characters)" % len(TOKEN), out.stderr)
        self.outputs.append(out.stdout + out.stderr)
        for text in self.outputs:
            self.assertNotIn(TOKEN, text)
        for d in self.c.daemons:
            self.assertNotIn(TOKEN, d.log_text(), d.log_path)
        self.assertTrue(any("DEBUG" in d.log_text() for d in self.c.daemons),
                        "the daemons ran at debug level, the most talkative")


class StartupChecks(unittest.TestCase):
    """What zenithd and zenithctl refuse before they serve or call anything."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zenith-it-startup-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir]))
        self.state = os.path.join(self.dir, "state")

    def test_coordinator_without_tls_or_insecure_refuses_to_start(self):
        out = zenithd("coordinator", "--listen", "127.0.0.1:0", "--state", self.state)
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("give --tls-cert and --tls-key, or --insecure", out.stderr)

    def test_worker_without_tls_ca_or_insecure_refuses_to_start(self):
        out = zenithd("worker", "--coordinator", "127.0.0.1:1", "--name", "w")
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("give --tls-ca FILE to verify the coordinator over TLS, or --insecure",
                      out.stderr)

    def test_unreadable_or_invalid_files_stop_the_start_naming_flag_and_file(self):
        missing = os.path.join(self.dir, "missing.pem")
        not_pem = os.path.join(self.dir, "not.pem")
        empty = os.path.join(self.dir, "empty-token")
        with open(not_pem, "w") as f:
            f.write("hello\n")
        with open(empty, "w") as f:
            f.write(" \n\t\n")
        cases = [
            (["--tls-cert", missing, "--tls-key", not_pem],
             "--tls-cert %s: cannot read it" % missing),
            (["--tls-cert", not_pem, "--tls-key", not_pem],
             "--tls-cert %s: not a PEM certificate" % not_pem),
            (["--insecure", "--token-file", empty], "--token-file %s: the file is empty" % empty),
            (["--insecure", "--token-file", missing], "--token-file %s: cannot read it" % missing),
        ]
        for flags, message in cases:
            with self.subTest(flags=flags):
                out = zenithd("coordinator", "--listen", "127.0.0.1:0", "--state", self.state,
                              *flags)
                self.assertEqual(out.returncode, 1, out.stderr)
                self.assertIn(message, out.stderr)

    def test_insecure_on_a_non_loopback_address_warns_once(self):
        port_file = os.path.join(self.dir, "port")
        args = [os.path.join(harness.BIN, "zenithd"), "coordinator", "--listen", "0.0.0.0:0",
                "--state", self.state, "--port-file", port_file, "--insecure"]
        d = harness.Daemon("coordinator", args, os.path.join(self.dir, "coordinator.log"),
                           harness.daemon_env())
        self.addCleanup(d.stop)
        harness.wait_until(lambda: harness.read_port_file(port_file), 30, "the port file")
        self.assertEqual(d.stop(), 0)
        warnings = [l for l in d.log_text().splitlines() if "WARN" in l and "--insecure" in l]
        self.assertEqual(len(warnings), 1, d.log_text())

    def write_config(self, text):
        path = os.path.join(self.dir, "config")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_zenithctl_flag_beats_environment_beats_config_file(self):
        config = self.write_config("# a comment\ncoordinator = 127.0.0.3:1\ntoken = from-file\n"
                                   "insecure = true\n")
        env = dict(harness.daemon_env(), ZENITH_CONFIG=config)
        env.pop("ZENITH_COORDINATOR", None)
        env.pop("ZENITH_TOKEN", None)
        out = zenithctl("-v", "list", env=env)
        self.assertIn("coordinator 127.0.0.3:1 (from config file %s)" % config, out.stderr)
        self.assertIn("token from config file %s (9 characters)" % config, out.stderr)
        self.assertIn("plain text (insecure from config file", out.stderr)

        env.update(ZENITH_COORDINATOR="127.0.0.2:1", ZENITH_TOKEN="from-environment")
        out = zenithctl("-v", "list", env=env)
        self.assertIn("coordinator 127.0.0.2:1 (from ZENITH_COORDINATOR)", out.stderr)
        self.assertIn("token from ZENITH_TOKEN (16 characters)", out.stderr)

        out = zenithctl("-v", "--coordinator", "127.0.0.1:1", "--token", "flag", "list", env=env)
        self.assertIn("coordinator 127.0.0.1:1 (from --coordinator)", out.stderr)
        self.assertIn("token from --token (4 characters)", out.stderr)
        for secret in ("from-file", "from-environment"):
            self.assertNotIn(secret, out.stderr)

    def test_zenithctl_default_is_plain_text_for_loopback_and_tls_elsewhere(self):
        env = dict(harness.daemon_env(), ZENITH_CONFIG=self.write_config(""))
        for name in ("ZENITH_COORDINATOR", "ZENITH_TOKEN", "ZENITH_CA", "ZENITH_INSECURE"):
            env.pop(name, None)
        out = zenithctl("-v", "list", env=env)
        self.assertIn("coordinator 127.0.0.1:7070 (from default)", out.stderr)
        self.assertIn("plain text (a loopback coordinator, no ca given)", out.stderr)
        self.assertIn("no token", out.stderr)
        out = zenithctl("-v", "--coordinator", "192.0.2.1:1", "list", env=env)
        self.assertIn("TLS, verified against the system's roots", out.stderr)

    def test_zenithctl_bad_config_line_names_file_and_line(self):
        for text, message in (("coordinator = 127.0.0.1:1\nthis is not a setting\n",
                               ":2: expected `key = value`"),
                              ("\n\ncolour = blue\n", ":3: unknown key 'colour'")):
            with self.subTest(text=text):
                config = self.write_config(text)
                out = zenithctl("list", env=dict(harness.daemon_env(), ZENITH_CONFIG=config))
                self.assertEqual(out.returncode, 2, out.stderr)
                self.assertIn("zenithctl: " + config + message, out.stderr)


load_tests = harness.in_definition_order(globals())

if __name__ == "__main__":
    harness.main()
