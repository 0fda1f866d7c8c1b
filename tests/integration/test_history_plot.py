"""`zenithctl history` and `zenithctl plot`: a job's whole history as CSV or JSON, and as a
picture of eta_t over n_t, m_t and M_t.

One coordinator and one worker run a short mlp job (60 steps, a window of 8 so that the window
fills and rolls, an evaluation every 20 steps) to the end. Its exports must hold one row per step,
1..60 in order, with the values WatchJob gives a grpcio client printed to 15 significant digits;
and, as an independent check, the learning rates in the export must be what docs/optimizer.md
computes from the exported norms, lr0 and window. A longer cnn job checks that the history of a
running job comes back at once with the steps so far. The plot tests parse the SVG as XML and
decode the PNG's pixels with zlib, so what is checked is the file, not the program's word for it.
Bad input (an unknown job, an unknown -o extension or --format, a file that cannot be written)
fails with the exit code and a message that names what is wrong, and leaves no file behind.
"""

import csv
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import xml.etree.ElementTree as ET
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import metrics_of, state_name, stubs  # noqa: E402

STEPS = 60
WINDOW = 8
LR0 = 0.05
COLUMNS = ["step", "epoch", "loss", "grad_norm", "window_mean", "peak", "lr", "skipped",
           "skipped_steps", "spike_steps", "images_per_sec", "unix_ms"]
REALS = ["loss", "grad_norm", "window_mean", "peak", "lr", "images_per_sec"]
INTS = ["step", "epoch", "skipped_steps", "spike_steps", "unix_ms"]
PLOT_SIZE = (1000, 700)
# From ctl_plot.c: the colours of eta_t and m_t as 8-bit RGB, and the insides of the two panels
# as (x0, y0, x1, y1).
ETA_RGB = (217, 94, 3)
MEAN_RGB = (26, 92, 184)
UPPER_PANEL = (102, 92, 969, 279)
LOWER_PANEL = (102, 316, 969, 619)


def printed(v):
    """A double as zenithctl prints data: 15 significant digits (CTL_REAL_DIGITS)."""
    return "%.15g" % v


def zenith_rates(norms, skipped, lr0, window, lr_min=0.0):
    """m_t, M_t and eta_t from the norms, by the definition in docs/optimizer.md."""
    win, peak, out = [], 0.0, []
    for n, skip in zip(norms, skipped):
        if not skip:
            win.append(n)
            if len(win) > window:
                win.pop(0)
        mean = sum(win) / len(win) if win else 0.0
        peak = max(peak, mean)
        eta = lr0 * (mean / peak) if peak > 0 else lr0
        out.append((mean, peak, max(eta, lr_min)))
    return out


def png_pixels(data):
    """(width, height, rows of RGB tuples) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature: %r" % data[:8]
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR", "first chunk %r" % chunks[0][0]
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    assert chunks[-1][0] == b"IEND", "last chunk %r" % chunks[-1][0]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    bpp = 3 if color == 2 else 4
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(w)])
        prev = line
    return w, h, rows


class HistoryAndPlot(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        c = cls.c = cls.new_class_cluster()
        c.start_coordinator()
        c.add_worker("w0")
        cls.job = c.submit(model="mlp", max_steps=STEPS, eval_every=20, name="lr & norms",
                           optimizer=dict(lr0=LR0, window=WINDOW))
        final = c.wait_final(cls.job.id, 120)
        assert state_name(final.state) == "SUCCEEDED", final.error
        cls.stream = c.watch(cls.job.id, timeout=30)
        cls.tmp = tempfile.mkdtemp(prefix="zenith-history-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def ctl_ok(self, *args):
        done = self.c.ctl(*args)
        self.assertEqual(done.returncode, 0, "zenithctl %s: exit %d\n%s"
                         % (" ".join(map(str, args)), done.returncode, done.stderr))
        return done

    def history_json(self):
        return json.loads(self.ctl_ok("history", self.job.id, "--format", "json").stdout)

    # ---- history

    def test_csv_has_one_row_per_step_with_the_values_of_the_stream(self):
        out = self.ctl_ok("history", self.job.id, "--format", "csv").stdout
        self.assertEqual(out, self.ctl_ok("history", self.job.id).stdout, "csv is the default")
        rows = list(csv.reader(io.StringIO(out)))
        self.assertEqual(rows[0], COLUMNS)
        table = [dict(zip(COLUMNS, r)) for r in rows[1:]]
        self.assertEqual([int(r["step"]) for r in table], list(range(1, STEPS + 1)))
        for row, m in zip(table, metrics_of(self.stream)):
            for name in REALS:
                self.assertEqual(row[name], printed(getattr(m, name)),
                                 "%s at step %d" % (name, m.step))
            for name in INTS:
                self.assertEqual(int(row[name]), getattr(m, name), "%s at step %d" % (name, m.step))
            self.assertEqual(row["skipped"], "1" if m.skipped else "0")

    def test_json_has_the_job_steps_evals_and_events_of_the_stream(self):
        doc = self.history_json()
        self.assertEqual(list(doc), ["job", "steps", "evals", "events"])
        self.assertEqual(doc["job"]["id"], self.job.id)
        self.assertEqual(doc["job"]["state"], "SUCCEEDED")
        self.assertEqual(doc["job"]["spec"]["name"], "lr & norms")
        self.assertEqual([s["step"] for s in doc["steps"]], list(range(1, STEPS + 1)))
        for s, m in zip(doc["steps"], metrics_of(self.stream)):
            self.assertEqual(list(s), COLUMNS)
            for name in REALS:
                self.assertEqual(s[name], float(printed(getattr(m, name))),
                                 "%s at step %d" % (name, m.step))
            for name in INTS:
                self.assertEqual(s[name], getattr(m, name), "%s at step %d" % (name, m.step))
            self.assertIs(s["skipped"], m.skipped)
        evals = [e for kind, e in self.stream if kind == "eval"]
        self.assertEqual([e["step"] for e in doc["evals"]], [e.step for e in evals])
        self.assertEqual([20, 40, 60], [e["step"] for e in doc["evals"]])
        for got, e in zip(doc["evals"], evals):
            self.assertEqual(got["test_accuracy"], float(printed(e.test_accuracy)))
            self.assertEqual(got["test_loss"], float(printed(e.test_loss)))
        events = [e for kind, e in self.stream if kind == "event"]
        self.assertEqual([(e["kind"], e["message"]) for e in doc["events"]],
                         [(e.kind, e.message) for e in events])
        self.assertEqual(doc["events"][-1]["kind"], "succeeded")

    def test_csv_and_json_agree(self):
        rows = list(csv.DictReader(io.StringIO(self.ctl_ok("history", self.job.id).stdout)))
        for row, s in zip(rows, self.history_json()["steps"]):
            for name in REALS:
                self.assertEqual(float(row[name]), s[name], "%s at step %s" % (name, s["step"]))

    def test_exported_learning_rates_follow_the_zenith_rule_from_the_exported_norms(self):
        doc = self.history_json()
        opt = doc["job"]["spec"]["optimizer"]
        self.assertEqual((opt["lr0"], opt["window"]), (LR0, WINDOW))
        steps = doc["steps"]
        expected = zenith_rates([s["grad_norm"] for s in steps], [s["skipped"] for s in steps],
                                opt["lr0"], opt["window"], opt["lr_min"])
        for s, (mean, peak, eta) in zip(steps, expected):
            for name, want in (("window_mean", mean), ("peak", peak), ("lr", eta)):
                self.assertTrue(math.isclose(s[name], want, rel_tol=1e-12, abs_tol=1e-15),
                                "step %d: exported %s %r, the rule gives %r"
                                % (s["step"], name, s[name], want))
        rates = [s["lr"] for s in steps]
        self.assertEqual(rates[0], LR0, "the first step runs at lr0")
        self.assertLess(min(rates), 0.95 * LR0, "the rate never moved: the check proves nothing")

    def test_history_of_a_running_job_returns_the_steps_so_far(self):
        c = self.c
        job = c.submit(model="cnn", max_steps=5000, name="still running")
        try:
            harness.wait_until(lambda: c.get(job.id).step >= 5, 60, "%s to pass step 5" % job.id)
            done = c.ctl("history", job.id, "--format", "json", timeout=30)
            self.assertEqual(done.returncode, 0, done.stderr)
            doc = json.loads(done.stdout)
            self.assertEqual(doc["job"]["state"], "RUNNING")
            numbers = [s["step"] for s in doc["steps"]]
            self.assertGreaterEqual(len(numbers), 5)
            self.assertEqual(numbers, list(range(1, len(numbers) + 1)))
            self.assertLess(numbers[-1], 5000)

            # The contract underneath, through grpcio: the job, its history, and the end.
            pb2, _ = stubs()
            items = list(c.stub.WatchJob(pb2.WatchJobRequest(id=job.id, history_only=True),
                                         timeout=harness.scaled(30)))
            self.assertEqual(items[0].WhichOneof("item"), "job")
            self.assertEqual(state_name(items[0].job.state), "RUNNING")
            streamed = [i.metrics.step for i in items if i.WhichOneof("item") == "metrics"]
            self.assertEqual(streamed[:len(numbers)], numbers)
        finally:
            c.stub.CancelJob(stubs()[0].CancelJobRequest(id=job.id), timeout=harness.scaled(10))
            c.wait_final(job.id, 60)

    def test_history_of_a_restarted_job_is_the_run_that_continued(self):
        c = self.new_cluster()
        c.start_coordinator()
        c.add_worker("w0")
        job = c.submit(model="cnn", max_steps=40, name="restarted")
        harness.wait_until(lambda: c.get(job.id).step >= 8, 60, "%s to pass step 8" % job.id)
        c.stop_coordinator()
        c.start_coordinator(port=c.port)
        self.assertEqual(state_name(c.wait_final(job.id, 120).state), "SUCCEEDED")

        reported = metrics_of(c.watch(job.id, timeout=30))
        self.assertGreater(len(reported), 40, "no step was reported twice: the test proves nothing")
        last_report = {m.step: m for m in reported}
        done = c.ctl("history", job.id, "--format", "json")
        self.assertEqual(done.returncode, 0, done.stderr)
        steps = json.loads(done.stdout)["steps"]
        self.assertEqual([s["step"] for s in steps], list(range(1, 41)))
        for s in steps:
            m = last_report[s["step"]]
            self.assertEqual((s["lr"], s["grad_norm"], s["unix_ms"]),
                             (float(printed(m.lr)), float(printed(m.grad_norm)), m.unix_ms))

    def test_history_only_of_a_finished_job_is_the_whole_watch_stream(self):
        pb2, _ = stubs()
        items = list(self.c.stub.WatchJob(pb2.WatchJobRequest(id=self.job.id, history_only=True),
                                          timeout=harness.scaled(30)))
        self.assertEqual([(i.WhichOneof("item"), getattr(i, i.WhichOneof("item"))) for i in items],
                         self.stream)

    # ---- plot

    def plot(self, name):
        path = os.path.join(self.tmp, name)
        done = self.ctl_ok("plot", self.job.id, "-o", path)
        self.assertEqual(done.stdout, "")
        with open(path, "rb") as f:
            return f.read()

    def test_svg_is_well_formed_and_draws_both_panels(self):
        root = ET.fromstring(self.plot("plot.svg"))
        ns = "{http://www.w3.org/2000/svg}"
        self.assertEqual(root.tag, ns + "svg")
        self.assertEqual((root.get("width"), root.get("height")), ("1000px", "700px"))
        title = root.find(ns + "title").text
        self.assertIn(self.job.id, title)
        self.assertIn("lr & norms", title)
        desc = root.find(ns + "desc").text
        for label in ("eta_t", "n_t", "m_t", "M_t"):
            self.assertIn(label, desc)
        # A series is an open stroked path across the whole width of its panel; grid lines have
        # two points, frames are closed, glyphs are filled. Cairo merges collinear segments, so
        # only the noisy n_t and m_t are sure to keep a vertex per step.
        series = []
        for p in root.iter(ns + "path"):
            style, d = p.get("style", ""), p.get("d", "").split()
            if "stroke:none" in style or "fill:none" not in style or "Z" in d:
                continue
            numbers = [float(t) for t in d if t not in ("M", "L")]
            xs = numbers[0::2]
            x0, _, x1, _ = UPPER_PANEL
            if len(xs) >= 3 and min(xs) < x0 + 0.05 * (x1 - x0) and max(xs) > x1 - 5:
                series.append((style, len(xs)))
        self.assertGreaterEqual(len(series), 4, "series paths: %s" % series)
        self.assertGreaterEqual(sum(1 for _, n in series if n >= STEPS), 2,
                                "paths with a vertex per step: %s" % series)
        colours = {part for style, _ in series for part in style.split(";")
                   if part.startswith("stroke:rgb")}
        self.assertGreaterEqual(len(colours), 4, "colours of the series: %s" % colours)

    def test_png_is_a_png_of_the_plot_size_with_both_panels(self):
        w, h, rows = png_pixels(self.plot("plot.png"))
        self.assertEqual((w, h), PLOT_SIZE)

        def pixels_of(rgb, panel):
            x0, y0, x1, y1 = panel
            return sum(1 for row in rows[y0:y1] for px in row[x0:x1]
                       if all(abs(a - b) <= 3 for a, b in zip(px, rgb)))

        # eta_t is drawn in the upper panel only, m_t in the lower one only.
        self.assertGreater(pixels_of(ETA_RGB, UPPER_PANEL), STEPS)
        self.assertEqual(pixels_of(ETA_RGB, LOWER_PANEL), 0)
        self.assertGreater(pixels_of(MEAN_RGB, LOWER_PANEL), STEPS)
        self.assertEqual(pixels_of(MEAN_RGB, UPPER_PANEL), 0)

    def test_the_extension_is_read_without_regard_to_case(self):
        self.assertEqual(self.plot("PLOT.PNG")[:8], b"\x89PNG\r\n\x1a\n")
        ET.fromstring(self.plot("Plot.Svg"))

    # ---- bad input

    def assert_fails(self, args, code, *words):
        done = self.c.ctl(*args)
        self.assertEqual(done.returncode, code, "zenithctl %s: stdout %r stderr %r"
                         % (" ".join(map(str, args)), done.stdout, done.stderr))
        for w in words:
            self.assertIn(w, done.stderr)
        return done

    def test_unknown_job_fails_naming_it(self):
        self.assert_fails(["history", "j-404"], 1, "j-404")
        self.assert_fails(["plot", "j-404", "-o", os.path.join(self.tmp, "x.svg")], 1, "j-404")

    def test_unknown_plot_extension_is_a_usage_error_naming_o(self):
        self.assert_fails(["plot", self.job.id, "-o", os.path.join(self.tmp, "x.pdf")], 2, "-o",
                          "x.pdf", ".svg", ".png")
        self.assert_fails(["plot", self.job.id], 2, "-o")
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x.pdf")))

    def test_unknown_format_is_a_usage_error_naming_format(self):
        self.assert_fails(["history", self.job.id, "--format", "xml"], 2, "--format", "xml")

    def test_unwritable_output_fails_naming_the_file_and_leaves_nothing(self):
        d = tempfile.mkdtemp(dir=self.tmp)
        missing = os.path.join(d, "no-such-folder", "h.csv")
        self.assert_fails(["history", self.job.id, "-o", missing], 1, missing)
        under_a_file = os.path.join(d, "a-file")
        open(under_a_file, "w").close()
        self.assert_fails(["plot", self.job.id, "-o", under_a_file + "/p.png"], 1,
                          under_a_file + "/p.png")
        # A device that takes nothing: the write itself fails.
        self.assert_fails(["history", self.job.id, "-o", "/dev/full"], 1, "/dev/full")
        self.assertEqual(os.listdir(d), ["a-file"])

    def test_failed_export_leaves_no_file_and_keeps_an_old_one(self):
        d = tempfile.mkdtemp(dir=self.tmp)
        self.assert_fails(["history", "j-404", "-o", os.path.join(d, "new.csv")], 1, "j-404")
        self.assertEqual(os.listdir(d), [], "a failed export left files")
        old = os.path.join(d, "old.svg")
        with open(old, "w") as f:
            f.write("keep me")
        self.assert_fails(["plot", "j-404", "-o", old], 1, "j-404")
        self.assertEqual(os.listdir(d), ["old.svg"])
        with open(old) as f:
            self.assertEqual(f.read(), "keep me")

    def test_export_replaces_an_existing_file_whole(self):
        path = os.path.join(tempfile.mkdtemp(dir=self.tmp), "h.json")
        with open(path, "w") as f:
            f.write("x" * 10 ** 6)
        self.ctl_ok("history", self.job.id, "--format", "json", "-o", path)
        with open(path) as f:
            self.assertEqual(json.load(f), self.history_json())
        self.assertEqual(os.listdir(os.path.dirname(path)), ["h.json"])

    def test_export_through_a_symbolic_link_writes_its_target(self):
        d = tempfile.mkdtemp(dir=self.tmp)
        target, link = os.path.join(d, "target.csv"), os.path.join(d, "link.csv")
        open(target, "w").close()
        os.symlink(target, link)
        self.ctl_ok("history", self.job.id, "-o", link)
        self.assertTrue(os.path.islink(link), "the link was replaced by a file")
        with open(target) as f:
            self.assertEqual(f.read(), self.ctl_ok("history", self.job.id).stdout)
        self.assertEqual(sorted(os.listdir(d)), ["link.csv", "target.csv"])


if __name__ == "__main__":
    harness.main()
