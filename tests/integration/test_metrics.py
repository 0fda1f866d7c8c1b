"""The coordinator's Prometheus endpoint (--metrics-listen), read as Prometheus reads it.

One coordinator, started with --metrics-listen 127.0.0.1:0 and --metrics-port-file, and one
worker run three short mlp jobs: a plain one, one whose name holds a double quote, a backslash
and a newline, and one whose rate (lr0 1e30) makes every step after the first non-finite.
/metrics is fetched with urllib and parsed with prometheus_client's own parser; the values are
compared with the job as GetJob returns it, exactly (the endpoint writes the shortest decimal
that reads back as the same double). A long job is watched while it runs, then cancelled. The
last test restarts the coordinator and expects the finished jobs still there. A separate test
holds a port with a socket of its own and starts a coordinator on it: it must exit 1 with a
message naming --metrics-listen.
"""

import math
import os
import socket
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import harness  # noqa: E402
from harness import state_name  # noqa: E402

load_tests = harness.in_definition_order(globals())

STEPS = 30
LONG_STEPS = 100000
ODD_NAME = 'quote " backslash \\ newline \n end'
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Family name (as the parser gives it: a counter loses _total) -> type.
FAMILIES = {
    "zenith_workers": "gauge",
    "zenith_jobs": "gauge",
    "zenith_job_state": "gauge",
    "zenith_job_steps": "counter",
    "zenith_job_progress_ratio": "gauge",
    "zenith_job_epoch": "gauge",
    "zenith_job_loss": "gauge",
    "zenith_job_lr": "gauge",
    "zenith_job_grad_norm": "gauge",
    "zenith_job_window_mean": "gauge",
    "zenith_job_peak": "gauge",
    "zenith_job_images_per_second": "gauge",
    "zenith_job_skipped_steps": "counter",
    "zenith_job_restarts": "counter",
    "zenith_job_checkpoints": "counter",
    "zenith_job_test_accuracy": "gauge",
}

# Per-job sample name -> the field of GetJob's Job.last it must equal.
LAST_FIELDS = {
    "zenith_job_lr": "lr",
    "zenith_job_grad_norm": "grad_norm",
    "zenith_job_window_mean": "window_mean",
    "zenith_job_peak": "peak",
    "zenith_job_loss": "loss",
    "zenith_job_images_per_second": "images_per_sec",
}


def http(url, data=None):
    """(status, headers, body) of one request; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, data=data, timeout=harness.scaled(10)) as r:
            return r.status, r.headers, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode("utf-8")


class Scrape:
    """One parsed /metrics page."""

    def __init__(self, text):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name, **labels):
        """Samples called name whose labels include the given ones."""
        out = []
        for f in self.families.values():
            for s in f.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out.append(s)
        return out

    def value(self, name, **labels):
        found = self.samples(name, **labels)
        if len(found) != 1:
            raise AssertionError("%d samples of %s%s, expected 1; the page:\n%s"
                                 % (len(found), name, labels, self.text))
        return found[0].value


class Metrics(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        c = cls.c = cls.new_class_cluster()
        cls.start(c)
        c.add_worker("w0")
        cls.plain = c.submit(model="mlp", max_steps=STEPS, name="plain")
        cls.odd = c.submit(model="mlp", max_steps=STEPS, name=ODD_NAME)
        cls.diverged = c.submit(model="mlp", max_steps=STEPS, name="diverged",
                                optimizer=dict(lr0=1e30))
        for job in (cls.plain, cls.odd, cls.diverged):
            c.wait_final(job.id, 120)

    @classmethod
    def start(cls, c):
        """Starts (or restarts) the coordinator with the endpoint on a free port."""
        port_file = os.path.join(c.dir, "metrics-port")
        if os.path.exists(port_file):
            os.remove(port_file)  # the last start's, with the last start's port
        c.start_coordinator(extra_args=["--metrics-listen", "127.0.0.1:0",
                                        "--metrics-port-file", port_file])
        port = harness.wait_until(lambda: harness.read_port_file(port_file), 10,
                                  "the metrics port file")
        cls.url = "http://127.0.0.1:%d" % port

    def scrape(self):
        status, headers, body = http(self.url + "/metrics")
        self.assertEqual(status, 200, body)
        return Scrape(body)

    def scrape_until(self, what, predicate, timeout=10):
        """Scrapes until predicate(scrape) holds (the page follows the coordinator's 100 ms
        tick); returns that scrape."""
        last = [None]

        def attempt():
            last[0] = self.scrape()
            return last[0] if predicate(last[0]) else None

        try:
            return harness.wait_until(attempt, timeout, what, interval=0.1)
        except AssertionError as e:
            raise AssertionError("%s; the last page:\n%s" % (e, last[0].text)) from None

    def finished_scrape(self, job):
        return self.scrape_until("%s to show as succeeded" % job.id, lambda s: s.samples(
            "zenith_job_state", job=job.id, state="succeeded"))

    # ---- the page

    def test_jobs_succeeded(self):
        for job in (self.plain, self.odd, self.diverged):
            got = self.c.get(job.id)
            self.assertEqual(state_name(got.state), "SUCCEEDED", "%s: %s" % (job.id, got.error))

    def test_metrics_is_text_format_0_0_4(self):
        status, headers, body = http(self.url + "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("Content-Type"), CONTENT_TYPE)

    def test_every_family_is_there_with_its_type(self):
        s = self.finished_scrape(self.plain)
        for name, kind in FAMILIES.items():
            with self.subTest(name):
                self.assertIn(name, s.families, "families: %s" % sorted(s.families))
                self.assertEqual(s.families[name].type, kind)
                self.assertIn("# HELP %s" % (name + ("_total" if kind == "counter" else "")),
                              s.text)

    def test_job_values_equal_its_last_step_metrics(self):
        job = self.c.get(self.plain.id)
        s = self.finished_scrape(job)
        for name, field in LAST_FIELDS.items():
            with self.subTest(name):
                self.assertEqual(s.value(name, job=job.id), getattr(job.last, field))
        self.assertEqual(s.value("zenith_job_epoch", job=job.id), job.epoch)
        self.assertEqual(s.value("zenith_job_test_accuracy", job=job.id), job.test_accuracy)
        self.assertEqual(s.value("zenith_job_progress_ratio", job=job.id), 1.0)

    def test_steps_total_equals_the_job_step_count(self):
        job = self.c.get(self.plain.id)
        s = self.finished_scrape(job)
        self.assertEqual(job.step, STEPS)
        self.assertEqual(s.value("zenith_job_steps_total", job=job.id), job.step)

    def test_counters_equal_the_job_counters(self):
        job = self.c.get(self.plain.id)
        s = self.finished_scrape(job)
        skipped = "zenith_job_skipped_steps_total"
        self.assertEqual(s.value(skipped, job=job.id, reason="non_finite"), job.last.skipped_steps)
        self.assertEqual(s.value(skipped, job=job.id, reason="spike"), job.last.spike_steps)
        self.assertEqual(s.value("zenith_job_restarts_total", job=job.id), job.restarts)
        self.assertEqual(s.value("zenith_job_checkpoints_total", job=job.id), job.checkpoints)

    def test_finished_job_has_one_state_series_succeeded(self):
        s = self.finished_scrape(self.plain)
        states = s.samples("zenith_job_state", job=self.plain.id)
        self.assertEqual([(x.labels["state"], x.value) for x in states], [("succeeded", 1.0)])

    def test_job_series_carry_the_job_name(self):
        s = self.finished_scrape(self.plain)
        names = {x.labels.get("name") for x in s.samples("zenith_job_lr", job=self.plain.id)}
        self.assertEqual(names, {"plain"})

    def test_name_with_quote_backslash_and_newline_reads_back_exactly(self):
        s = self.finished_scrape(self.odd)
        self.assertIn('name="quote \\" backslash \\\\ newline \\n end"', s.text)
        for family in s.families.values():
            for x in family.samples:
                if x.labels.get("job") == self.odd.id:
                    self.assertEqual(x.labels["name"], ODD_NAME, x.name)

    def test_non_finite_values_are_nan_and_their_steps_counted(self):
        job = self.c.get(self.diverged.id)
        s = self.finished_scrape(job)
        self.assertTrue(math.isnan(job.last.grad_norm), "the job did not diverge: %s" % job.last)
        self.assertTrue(math.isnan(s.value("zenith_job_grad_norm", job=job.id)))
        self.assertTrue(math.isnan(s.value("zenith_job_loss", job=job.id)))
        skipped = s.value("zenith_job_skipped_steps_total", job=job.id, reason="non_finite")
        self.assertEqual(skipped, job.last.skipped_steps)
        self.assertGreater(skipped, 0)

    def test_jobs_and_workers_are_counted_by_state(self):
        s = self.scrape_until("the jobs counted as succeeded and the worker idle", lambda s: (
            s.value("zenith_jobs", state="succeeded") == 3
            and s.value("zenith_workers", state="idle", device="cpu") == 1))
        for state in ("queued", "running", "failed", "cancelled"):
            self.assertEqual(s.value("zenith_jobs", state=state), 0, state)
        self.assertEqual(s.value("zenith_workers", state="busy", device="cpu"), 0)
        self.assertEqual(s.value("zenith_workers", state="idle", device="cuda"), 0)

    # ---- other requests

    def test_other_path_is_404(self):
        status, _, _ = http(self.url + "/other")
        self.assertEqual(status, 404)

    def test_post_is_405(self):
        status, headers, _ = http(self.url + "/metrics", data=b"x=1")
        self.assertEqual(status, 405)
        self.assertIn("GET", headers.get("Allow", ""))

    # ---- a job while it runs; these change what the tests above see, so they come last

    def test_running_job_is_live_with_a_busy_worker(self):
        job = self.c.submit(model="mlp", max_steps=LONG_STEPS, name="long")
        try:
            s = self.scrape_until("the long job running past step 20", lambda s: (
                s.samples("zenith_job_state", job=job.id, state="running")
                and s.samples("zenith_job_steps_total", job=job.id)
                and s.value("zenith_job_steps_total", job=job.id) > 20), timeout=60)
            self.assertEqual(s.value("zenith_workers", state="busy", device="cpu"), 1)
            self.assertEqual(s.value("zenith_jobs", state="running"), 1)
            self.assertLess(s.value("zenith_job_progress_ratio", job=job.id), 1.0)
        finally:
            self.c.ctl("cancel", job.id)
        s = self.scrape_until("the long job cancelled", lambda s: s.samples(
            "zenith_job_state", job=job.id, state="cancelled"))
        self.assertEqual(len(s.samples("zenith_job_state", job=job.id)), 1)
        self.assertEqual(s.value("zenith_jobs", state="cancelled"), 1)

    def test_finished_jobs_are_still_there_after_a_coordinator_restart(self):
        before = self.finished_scrape(self.plain)
        code = self.c.stop_coordinator()
        self.assertEqual(code, 0, "the coordinator's exit (a sanitizer report makes it non-zero)")
        self.start(self.c)
        after = self.finished_scrape(self.plain)
        for name in ("zenith_job_lr", "zenith_job_steps_total", "zenith_job_test_accuracy"):
            self.assertEqual(after.value(name, job=self.plain.id),
                             before.value(name, job=self.plain.id), name)
        self.assertEqual(after.value("zenith_jobs", state="succeeded"), 3)


class MetricsListenErrors(harness.ClusterTestCase):

    def test_address_in_use_exits_1_naming_the_flag(self):
        c = self.new_cluster()
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = "127.0.0.1:%d" % holder.getsockname()[1]
        d = c.start_daemon("coordinator", "coordinator",
                           ["--listen", "127.0.0.1:0", "--state", c.state_dir,
                            "--metrics-listen", taken, "--insecure"])
        code = d.wait_exit(30)
        log = d.log_text()
        self.assertEqual(code, 1, log)
        self.assertIn("--metrics-listen", log)
        self.assertIn(taken, log)


if __name__ == "__main__":
    harness.main()
