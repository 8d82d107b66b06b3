"""`elm-jax train` (also `python -m elm_jax.train`): gin-configured training or inference.

  elm-jax train --gin_file=models/t5_1_1/small.gin \\
      --gin_file=experiments/prompt_expert.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'bigbench_emoji_movie'" \\
      --gin.MODEL_DIR="'/tmp/pe'" --gin.INITIAL_CHECKPOINT_PATH=None \\
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 128}"

The run file (gin/runs/finetune.gin, pretrain.gin, infer.gin) binds
`run.function` to `trainer.train` or `inference.infer`; `main` parses the gin
files, imports the `TASK_MODULES`, starts `jax.distributed` when `MULTIPROCESS`
is true, and calls `run`.
"""

import importlib
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import logging
import gin
import jax

from elm_jax import gin_utils

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Environment variables read when the gin config leaves a distributed setting unset.
ENV_COORDINATOR = "ELM_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ELM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ELM_JAX_PROCESS_ID"


def import_task_modules(modules: Sequence[str]) -> None:
  """Import the modules that register seqio Tasks and Mixtures (e.g. user modules)."""
  for name in modules:
    if not _MODULE_NAME.match(name):
      raise ValueError(f"TASK_MODULES entry {name!r} is not a Python module name.")
    logging.info("Importing task module %s.", name)
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"TASK_MODULES lists {name!r}, which cannot be imported: {e}. "
                        "Install it or add its folder to PYTHONPATH.") from e


def initialize_distributed(*, enabled: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           cpu_collectives: str | None = "gloo") -> None:
  """Start `jax.distributed` for a multi-process run; a no-op unless `enabled`.

  Unset values come from $ELM_JAX_COORDINATOR_ADDRESS, $ELM_JAX_NUM_PROCESSES and
  $ELM_JAX_PROCESS_ID, and otherwise from JAX's cluster auto-detection (TPU pods,
  SLURM). `cpu_collectives` selects the CPU collectives implementation, which
  multi-process CPU runs need.
  """
  if not enabled:
    return
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and ENV_NUM_PROCESSES in os.environ:
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and ENV_PROCESS_ID in os.environ:
    process_id = int(os.environ[ENV_PROCESS_ID])
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  logging.info("Starting jax.distributed: coordinator %s, %s processes, process id %s.",
               coordinator_address or "auto", num_processes or "auto",
               "auto" if process_id is None else process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def run(*, function: Callable[..., Any], task_modules: Sequence[str] = (),
        config_text: str | None = None) -> Any:
  """Import the task modules, then call the run file's `function`."""
  import_task_modules(task_modules)
  return function(config_text=config_text)


def _main(args: Any) -> int:
  del args
  from elm_jax.training import metrics  # pylint: disable=g-import-not-at-top
  gin_utils.configured(initialize_distributed)()
  try:
    result = gin_utils.configured(run)(config_text=gin.config_str())
  except metrics.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"elm-jax train: {e}", file=sys.stderr)
    return 3
  logging.info("Done: %s", result)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Parse `--gin_file`/`--gin.KEY=VALUE` flags and run; return the exit status."""
  logging.set_verbosity(logging.INFO)
  # Expose the run files' registrations to gin before parsing.
  from elm_jax.training import inference  # pylint: disable=g-import-not-at-top,unused-import
  from elm_jax.training import trainer  # pylint: disable=g-import-not-at-top,unused-import
  return gin_utils.run(_main, argv, __doc__.split("\n\n")[0], prog="elm-jax train")


if __name__ == "__main__":
  # Run the imported module, not __main__: gin registers `elm_jax.train.run`.
  from elm_jax import train as _train_module  # pylint: disable=g-import-not-at-top,import-self
  sys.exit(_train_module.main())
