"""End-to-end training: a coordinator and two workers train the CNN on Fashion-MNIST.

The first test is the product's headline promise: 200 steps of the default
optimizer reach 80% test accuracy, and `zenithctl watch` reports it. The second
checks that data parallelism does not change the numbers: two workers that each
take half of a global batch of 128 must see the same loss and take the same
learning rates as one worker taking the whole batch. The metrics come from
WatchJob through grpcio, so the doubles are compared as sent, not as printed.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import metrics_of  # noqa: E402


def rel_diff(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


class TrainCnn(harness.ClusterTestCase):

    @classmethod
    def setUpClass(cls):
        cls.c = cls.new_class_cluster()
        cls.c.start_coordinator()
        cls.c.add_worker("w0")
        cls.c.add_worker("w1")

    def test_cnn_on_two_workers_reaches_80_percent_in_200_steps(self):
        c = self.c
        sub = c.ctl("submit", "--model", "cnn", "--workers", 2, "--batch-size", 128,
                    "--max-steps", 200, "--name", "accuracy")
        self.assertEqual(sub.returncode, 0, "submit failed: %s" % sub.stderr)
        job_id = sub.stdout.strip()

        watch = c.ctl("watch", job_id, timeout=120)
        self.assertEqual(watch.returncode, 0,
                         "watch exited %d\nstdout:\n%s\nstderr:\n%s"
                         % (watch.returncode, watch.stdout, watch.stderr))

        status = c.ctl("status", job_id, "--json")
        self.assertEqual(status.returncode, 0, status.stderr)
        job = json.loads(status.stdout)
        self.assertEqual(job["state"], "SUCCEEDED", job)
        self.assertEqual(job["step"], 200)
        self.assertEqual(job["workers"], ["w0", "w1"])
        acc = job["test_accuracy"]
        self.assertIsNotNone(acc, job)
        sys.stderr.write("cnn, 2 workers, 200 steps: test accuracy %.4f, test loss %.4f\n"
                         % (acc, job["test_loss"]))
        self.assertGreaterEqual(acc, 0.80, "test accuracy after 200 steps: %.4f" % acc)
        expected = "test accuracy %.2f%%" % (100 * acc)
        self.assertIn(expected, watch.stdout,
                      "watch output lacks %r:\n%s" % (expected, watch.stdout))

    def run_20_steps(self, workers):
        job = self.c.submit(model="cnn", workers=workers, batch_size=128, max_steps=20, seed=7,
                            name="parity-%d" % workers)
        items = self.c.watch(job.id, timeout=60)
        final = items[-1]
        self.assertEqual(final[0], "job")
        self.assertEqual(harness.state_name(final[1].state), "SUCCEEDED",
                         "%d-worker job: %s" % (workers, final[1].error))
        metrics = metrics_of(items)
        self.assertEqual([m.step for m in metrics], list(range(1, 21)))
        return metrics

    def test_two_workers_match_one_worker_in_loss_and_learning_rate(self):
        two = self.run_20_steps(2)
        one = self.run_20_steps(1)

        loss1, loss2 = one[19].loss, two[19].loss
        worst_lr = max(rel_diff(m1.lr, m2.lr) for m1, m2 in zip(one, two))
        sys.stderr.write("step 20 loss: 1 worker %.9g, 2 workers %.9g (rel diff %.2e); "
                         "largest lr rel diff over steps 1-20 %.2e\n"
                         % (loss1, loss2, rel_diff(loss1, loss2), worst_lr))
        self.assertLessEqual(rel_diff(loss1, loss2), 1e-4,
                             "loss at step 20: 1 worker %.9g, 2 workers %.9g" % (loss1, loss2))
        for m1, m2 in zip(one, two):
            self.assertLessEqual(rel_diff(m1.lr, m2.lr), 1e-6,
                                 "lr at step %d: 1 worker %.12g, 2 workers %.12g"
                                 % (m1.step, m1.lr, m2.lr))


if __name__ == "__main__":
    harness.main()
