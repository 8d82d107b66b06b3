"""Two processes on loopback train together with jax.distributed (CPU, gloo)."""

import re

import numpy as np

from tests import train_fixtures

STEPS = 6


def test_two_processes_one_checkpoint(tmp_path):
  model_gin = train_fixtures.write_tiny_model_gin(tmp_path)
  model_dir = tmp_path / "model"
  argv = train_fixtures.train_argv(
      model_gin, model_dir, experiment="experiments/dataset_expert.gin", steps=STEPS,
      extra=["--gin.MULTIPROCESS=True", "--gin.CHECKPOINT_PERIOD=3", "--gin.EVAL_PERIOD=-1",
             "--gin.LEARNING_RATE=0.01"])
  port = train_fixtures.free_port()
  processes, logs = [], []
  for process_id in range(2):
    log = tmp_path / f"process{process_id}.log"
    logs.append(log)
    processes.append(train_fixtures.start_train(
        argv, log, XLA_FLAGS="--xla_force_host_platform_device_count=2",
        ELM_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", ELM_JAX_NUM_PROCESSES="2",
        ELM_JAX_PROCESS_ID=str(process_id)))
  codes = [p.wait(timeout=900) for p in processes]
  assert codes == [0, 0], [log.read_text(errors="replace")[-3000:] for log in logs]

  texts = [log.read_text(errors="replace") for log in logs]
  for process_id, text in enumerate(texts):
    assert f"Process {process_id} of 2; 2 local and 4 global devices" in text
  # Both processes see the same global losses.
  losses = [re.search(r"losses=(\(\(.*?\)\)),", text).group(1) for text in texts]
  assert losses[0] == losses[1]

  assert train_fixtures.checkpoint_steps(model_dir) == [3, 6]
  params = train_fixtures.read_params(model_dir, STEPS)
  assert all(np.isfinite(v).all() for v in params.values())
  assert (model_dir / "expert" / "expert.json").is_file()
