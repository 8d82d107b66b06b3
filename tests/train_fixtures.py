"""Helpers for the trainer tests: a tiny model gin file, commands, checkpoint reads."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Odd sizes expose shape bugs; vocab_size is filled in from the task's vocabulary.
TINY_MODEL_GIN = """\
from __gin__ import dynamic_registration
from elm_jax.models import t5
MODEL_CONFIG = @t5.T5Config()
t5.T5Config:
  vocab_size = {vocab_size}
  d_model = 24
  d_kv = 5
  d_ff = 37
  num_heads = 3
  num_encoder_layers = 2
  num_decoder_layers = 1
  dropout_rate = {dropout_rate}
"""

TASK = "bigbench_emoji_movie"
LENGTHS = "{'inputs': 48, 'targets': 8}"


def vocab_size() -> int:
  import seqio  # pylint: disable=g-import-not-at-top
  import elm_jax.tasks.bigbench  # pylint: disable=g-import-not-at-top,unused-import
  return seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary.vocab_size


def write_tiny_model_gin(directory: Path, *, dropout_rate: float = 0.0) -> Path:
  path = Path(directory) / "tiny_model.gin"
  path.write_text(TINY_MODEL_GIN.format(vocab_size=vocab_size(), dropout_rate=dropout_rate))
  return path


def train_argv(model_gin: Path, model_dir: Path, *, experiment: str, steps: int | None,
               extra: Sequence[str] = ()) -> list[str]:
  """Flags of a tiny run of `experiment` (e.g. "experiments/dataset_expert.gin")."""
  argv = [
      f"--gin_file={model_gin}", f"--gin_file={experiment}",
      f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.INITIAL_CHECKPOINT_PATH=None", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
      "--gin.BATCH_SIZE=8", "--gin.trainer.EvalConfig.score_task=None",
      "--gin.metrics.LoggingConfig.log_every_secs=0",
  ]
  if steps is not None:
    argv += [f"--gin.TRAIN_STEPS={steps}", "--gin.trainer.train.epochs=None"]
  return argv + list(extra)


def subprocess_env(**extra: str) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.update(extra)
  return env


def start_train(argv: Sequence[str], log_path: Path, **env: str) -> subprocess.Popen:
  """Start `python -m elm_jax.train ARGV` with its output in `log_path`."""
  log = open(log_path, "ab")  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, "-m", "elm_jax.train", *argv], cwd=REPO,
                          stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(**env))


def checkpoint_steps(model_dir: Path) -> list[int]:
  """Committed checkpoint steps (orbax writes commit_success.txt last)."""
  directory = Path(model_dir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "commit_success.txt").exists())


def read_params(model_dir: Path, step: int) -> dict[str, np.ndarray]:
  """All parameters of a checkpoint step as flat `/`-joined names."""
  from elm_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top
  from elm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  _, params = checkpointing.load_trained_params(str(Path(model_dir) / "checkpoints" / str(step)))
  return {k: np.asarray(v) for k, v in loading.flatten_params(params).items()}


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def nan_loss_weights_at(batch_number: int):
  """A batch transform that puts NaN into the loss weights of one batch (1-based)."""
  def transform(number: int, batch: dict[str, Any]) -> dict[str, Any]:
    if number == batch_number:
      batch = dict(batch)
      weights = batch["decoder_loss_weights"].astype(np.float32).copy()
      weights[0, 0] = np.nan
      batch["decoder_loss_weights"] = weights
    return batch
  return transform


def run_in_process(argv: Sequence[str]):
  """Parse the flags like `elm-jax train` and return what the run function returns."""
  import gin  # pylint: disable=g-import-not-at-top
  from elm_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from elm_jax import train as train_script  # pylint: disable=g-import-not-at-top
  from elm_jax.training import trainer  # pylint: disable=g-import-not-at-top,unused-import
  gin.clear_config()
  try:
    gin_utils.parse_flags(argv, "test")
    return gin_utils.configured(train_script.run)(config_text=gin.config_str())
  finally:
    gin.clear_config()


def mean_loss(losses, part: slice) -> float:
  return float(np.mean([loss for _, loss in losses[part]]))


def slow_batches(seconds: float = 0.2):
  """A batch transform that sleeps, so a signal lands while steps are running."""
  import time  # pylint: disable=g-import-not-at-top

  def transform(number: int, batch: dict[str, Any]) -> dict[str, Any]:
    del number
    time.sleep(seconds)
    return batch
  return transform


SLOW_GIN = """\
from __gin__ import dynamic_registration
from elm_jax.training import trainer
from tests import train_fixtures
trainer.train.batch_transform = @train_fixtures.slow_batches()
train_fixtures.slow_batches.seconds = {seconds}
"""


def wait_for(predicate, process: subprocess.Popen, timeout: float, what: str) -> None:
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f"The training process exited ({process.returncode}) before {what}.")
    if time.time() > deadline:
      process.kill()
      raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
    time.sleep(0.05)
