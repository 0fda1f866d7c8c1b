"""`zenithctl watch` on a terminal draws live charts of eta_t and of n_t, m_t, M_t under its
progress bar, redrawn in place; into a pipe it keeps its plain lines.

zenithctl runs on a pseudo-terminal whose window size is set with TIOCSWINSZ, from before the
job has a worker (so the long "waiting for workers" line comes first) to the end of the job. The
output is read twice. Raw, with ANSI sequences removed and split at every carriage return and
newline: no piece may reach the terminal's width, or the terminal would wrap it and the cursor
arithmetic of the redraw would leave debris. And as a small terminal emulator shows it: the
screen at the end must hold the chart once (legends, braille rows, step axis) and the summary
after it. The number of frames is bounded by the redraw throttle.
"""

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

STEPS = 1500
REDRAWS_PER_SEC = 10  # ctl_watch.c
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
BRAILLE = re.compile("[\u2801-\u28ff]")
LEGENDS = ("eta_t", "n_t", "m_t", "M_t")


class Terminal:
    """zenithctl on a pseudo-terminal `cols` columns wide; finish() reads all it writes."""

    def __init__(self, args, cols, rows=24):
        self.cols = cols
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = harness.daemon_env()
        env.pop("NO_COLOR", None)
        env["TERM"] = "xterm"
        self.started = time.monotonic()
        self.proc = subprocess.Popen([os.path.join(harness.BIN, "zenithctl")] + args, stdin=slave,
                                     stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)

        self.data = b""

    def read(self, until, timeout, what):
        """Reads until until(data so far) is true or the terminal's other side closes."""
        deadline = time.monotonic() + harness.scaled(timeout)
        while not until(self.data):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out after %.0f s waiting for %s; output:\n%s"
                                     % (harness.scaled(timeout), what, self.data[-3000:]))
            if not select.select([self.master], [], [], left)[0]:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                chunk = b""
            if not chunk:
                return False
            self.data += chunk
        return True

    def finish(self, timeout):
        """(exit code, all output, seconds since the start) once zenithctl has exited."""
        try:
            self.read(lambda data: False, timeout, "zenithctl watch to end")
            code = self.proc.wait(timeout=harness.scaled(10))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)
        return code, self.data.decode("utf-8"), time.monotonic() - self.started


def raw_pieces(text):
    """The runs of text between carriage returns and newlines, ANSI sequences removed."""
    return re.split(r"[\r\n]", CSI.sub("", text))


def screen(text, cols):
    """What a terminal `cols` wide shows after `text`, scrollback included: printable text, CR,
    LF, cursor up (A), erase to end of line (K) and of screen (J); colours are ignored."""
    lines, row, col, i = [[]], 0, 0, 0
    while i < len(text):
        if text[i] == "\x1b":
            m = CSI.match(text, i)
            i = m.end()
            n = int(m.group(1)) if m.group(1).isdigit() else 1
            if m.group(2) == "A":
                row = max(0, row - n)
            elif m.group(2) in "KJ":
                del lines[row][col:]
                if m.group(2) == "J":
                    del lines[row + 1:]
            continue
        ch, i = text[i], i + 1
        if ch == "\r":
            col = 0
            continue
        if ch == "\n" or col >= cols:  # a newline, or the wrap at the right margin
            row += 1
            if row == len(lines):
                lines.append([])
            if ch == "\n":
                continue
            col = 0
        line = lines[row]
        line.extend(" " * (col - len(line)))
        line[col:col + 1] = [ch]
        col += 1
    return ["".join(line).rstrip() for line in lines]


class WatchCharts(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        c = cls.c = cls.new_class_cluster()
        c.start_coordinator()
        cls.job = c.submit(model="mlp", max_steps=STEPS, eval_every=500, name="charts")
        term = Terminal(["--coordinator", c.addr, "watch", cls.job.id], cols=80)
        term.read(lambda data: b"QUEUED" in data, 30, "the watch to show the job queued")
        c.add_worker("w0")
        cls.code, cls.out, cls.seconds = term.finish(timeout=120)

    def test_watch_on_a_terminal_exits_0_when_the_job_succeeds(self):
        self.assertEqual(self.code, 0, self.out[-2000:])

    def test_no_line_reaches_the_width_of_an_80_column_terminal(self):
        widest = max(raw_pieces(self.out), key=len)
        self.assertLess(len(widest), 80, "a line of %d columns: %r" % (len(widest), widest))
        for line in screen(self.out, 80):
            self.assertLess(len(line), 80, line)

    def test_charts_have_legends_braille_and_value_labels(self):
        text = CSI.sub("", self.out)
        for name in LEGENDS:
            self.assertIn("━━ " + name, text)
        self.assertRegex(text, BRAILLE)
        self.assertIn("\x1b[33m━━\x1b[0m eta_t", self.out, "the legend's colours")

    def test_the_last_frame_stays_on_the_screen_once_above_the_summary(self):
        shown = [line for line in screen(self.out, 80) if line.strip()]
        report = "\n".join(shown)
        self.assertTrue(shown[-1].startswith(self.job.id + " SUCCEEDED: %d steps" % STEPS), report)
        eta_legends = [i for i, line in enumerate(shown) if "━━ eta_t" in line]
        norm_legends = [i for i, line in enumerate(shown) if "━━ n_t" in line]
        self.assertEqual(len(eta_legends), 1, "redrawing left old frames:\n" + report)
        self.assertEqual(len(norm_legends), 1, "redrawing left old frames:\n" + report)
        status = shown[eta_legends[0] - 1]
        self.assertIn("%d/%d" % (STEPS, STEPS), status, report)
        self.assertRegex(status, r"^\[#+\] ")
        # Each chart: a row labelled with its largest value, braille rows, a row labelled 0.
        axis = next(i for i, line in enumerate(shown) if "└" in line)
        for top, bottom in ((eta_legends[0] + 1, norm_legends[0] - 1),
                            (norm_legends[0] + 1, axis - 1)):
            self.assertRegex(shown[top], r"^ *[0-9.e+-]+┤", report)
            self.assertRegex(shown[bottom], r"^ +0┤", report)
            for line in shown[top + 1:bottom]:
                self.assertRegex(line, r"^ +│", report)
            self.assertRegex("".join(shown[top:bottom + 1]), BRAILLE)
        self.assertRegex(shown[axis + 1], r"^ +1 +step +%d$" % STEPS, report)
        self.assertEqual(axis + 2, len(shown) - 1, report)

    def test_events_above_the_charts_are_wrapped_to_the_width(self):
        shown = screen(self.out, 80)
        text = "\n".join(shown)
        self.assertIn("eval at step 500", text)
        reason = next(i for i, line in enumerate(shown) if "QUEUED: waiting for" in line)
        self.assertFalse(shown[reason + 1].startswith(self.job.id), "not wrapped:\n" + text)

    def test_redraws_are_throttled(self):
        frames = self.out.count("━━\x1b[0m eta_t")
        shown = [line for line in screen(self.out, 80) if line.strip()]
        printed_above = next(i for i, line in enumerate(shown) if "━━ eta_t" in line) - 1
        bound = REDRAWS_PER_SEC * self.seconds + printed_above + 2
        sys.stderr.write("%d frames in %.1f s\n" % (frames, self.seconds))
        self.assertGreater(frames, 1, "the charts were not drawn live")
        self.assertLessEqual(frames, bound)

    def test_a_narrow_terminal_gets_narrower_charts(self):
        code, out, _ = Terminal(["--coordinator", self.c.addr, "watch", self.job.id],
                                cols=50).finish(timeout=60)
        self.assertEqual(code, 0, out[-2000:])
        widest = max(raw_pieces(out), key=len)
        self.assertLess(len(widest), 50, "a line of %d columns: %r" % (len(widest), widest))
        self.assertRegex(out, BRAILLE)
        for name in LEGENDS:
            self.assertIn(name, CSI.sub("", out))

    def test_into_a_pipe_watch_prints_plain_lines(self):
        done = self.c.ctl("watch", self.job.id)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("\x1b", done.stdout)
        self.assertNotRegex(done.stdout, BRAILLE)
        lines = done.stdout.splitlines()
        steps = [line for line in lines if re.match(r"%s step \d+/%d epoch \d+ loss [0-9.]+ lr "
                                                    % (self.job.id, STEPS), line)]
        self.assertGreaterEqual(len(steps), 20, done.stdout)
        self.assertIn("%s step %d/%d" % (self.job.id, STEPS, STEPS), steps[-1])
        self.assertTrue(lines[-1].startswith(self.job.id + " SUCCEEDED"), lines[-1])


if __name__ == "__main__":
    harness.main()
