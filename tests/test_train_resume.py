"""Exact resume after SIGKILL, and a checkpoint on SIGTERM, with real subprocesses."""

import random
import re
import signal

import numpy as np

from tests import train_fixtures

STEPS = 24
PERIOD = 4


def _last_logged_step(log_path) -> int:
  steps = re.findall(r"step (\d+)/%d" % STEPS, log_path.read_text(errors="replace"))
  return int(steps[-1]) if steps else 0


def test_kill_resume_matches_uninterrupted(tmp_path):
  model_gin = train_fixtures.write_tiny_model_gin(tmp_path, dropout_rate=0.1)
  slow_gin = tmp_path / "slow.gin"
  slow_gin.write_text(train_fixtures.SLOW_GIN.format(seconds=0.3))

  def argv(model_dir):
    return train_fixtures.train_argv(
        model_gin, model_dir, experiment="experiments/dataset_expert.gin", steps=STEPS,
        extra=[f"--gin_file={slow_gin}", f"--gin.CHECKPOINT_PERIOD={PERIOD}",
               "--gin.LEARNING_RATE=0.01", "--gin.SEED=7"])

  reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
  reference = train_fixtures.start_train(argv(reference_dir), tmp_path / "reference.log")

  # 1. SIGKILL at a random step after the first checkpoint.
  log1 = tmp_path / "run1.log"
  kill_at = random.Random().randint(PERIOD + 1, STEPS - 2 * PERIOD)
  run1 = train_fixtures.start_train(argv(resumed_dir), log1)
  train_fixtures.wait_for(lambda: _last_logged_step(log1) >= kill_at, run1, 600,
                          f"step {kill_at}")
  run1.send_signal(signal.SIGKILL)
  run1.wait()
  killed_steps = train_fixtures.checkpoint_steps(resumed_dir)
  assert killed_steps and max(killed_steps) < STEPS

  # 2. Resume, then SIGTERM: a checkpoint at the step reached.
  log2 = tmp_path / "run2.log"
  run2 = train_fixtures.start_train(argv(resumed_dir), log2)
  first_step = max(killed_steps)
  train_fixtures.wait_for(lambda: _last_logged_step(log2) >= first_step + 2, run2, 600,
                          "the resumed run's steps")
  run2.send_signal(signal.SIGTERM)
  assert run2.wait(timeout=300) == 0
  saved = re.findall(r"Preemption signal: saved step (\d+)", log2.read_text())
  assert saved, "no preemption checkpoint was logged"
  assert max(train_fixtures.checkpoint_steps(resumed_dir)) == int(saved[0])

  # 3. Resume to the end.
  run3 = train_fixtures.start_train(argv(resumed_dir), tmp_path / "run3.log")
  assert run3.wait(timeout=600) == 0
  assert reference.wait(timeout=600) == 0

  final = train_fixtures.read_params(resumed_dir, STEPS)
  expected = train_fixtures.read_params(reference_dir, STEPS)
  assert set(final) == set(expected)
  for name in sorted(expected):
    np.testing.assert_array_equal(final[name], expected[name], err_msg=name)
