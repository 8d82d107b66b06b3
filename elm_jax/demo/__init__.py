"""`elm-jax demo`: the whole method end to end on offline BIG-bench data.

  elm-jax demo                 # the default run, into ./runs/demo
  elm-jax demo --quick         # fewer tasks and steps, the same stages
  elm-jax demo --fresh         # delete the run folder first
  elm-jax demo --gin.pipeline.DemoConfig.expert_steps=300

Settings come from gin/experiments/demo.gin, and any binding there can be
overridden with `--gin.KEY=VALUE` or another `--gin_file`. A rerun of the same
command skips every finished stage and part of a stage.
"""

import argparse
import os
from pathlib import Path
import shutil
import sys
from typing import Sequence

from absl import logging

from elm_jax import gin_utils
from elm_jax.demo import pipeline

DEFAULT_GIN_FILE = "experiments/demo.gin"
DEFAULT_RUN_DIR = os.path.join("runs", "demo")
_RUN_MARKER = ".elm_jax_demo_run"


def configure(config: pipeline.DemoConfig) -> pipeline.DemoConfig:
  """Returns the config that gin binds (`configure.config` in demo.gin)."""
  return config


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--run_dir", default=None,
                      help=f"output folder (default: {DEFAULT_RUN_DIR}, or "
                      f"{DEFAULT_RUN_DIR}_quick with --quick)")
  parser.add_argument("--quick", action="store_true",
                      help="fewer tasks, steps and examples; the same stages")
  parser.add_argument("--fresh", action="store_true",
                      help="delete the run folder and start over")


def _prepare_run_dir(run_dir: Path, fresh: bool) -> None:
  marker = run_dir / _RUN_MARKER
  if fresh and run_dir.exists():
    if not marker.is_file():
      raise SystemExit(f"elm-jax demo: refusing to delete {run_dir}: it is not a demo run "
                       f"folder (no {_RUN_MARKER} file). Delete it yourself or pick another "
                       "--run_dir.")
    logging.info("--fresh: deleting %s.", run_dir)
    shutil.rmtree(run_dir)
  if run_dir.exists() and any(run_dir.iterdir()) and not marker.is_file():
    raise SystemExit(f"elm-jax demo: {run_dir} exists and is not a demo run folder; pick "
                     "another --run_dir.")
  run_dir.mkdir(parents=True, exist_ok=True)
  marker.touch()


def _enable_compilation_cache(run_dir: Path) -> None:
  # Each expert's training compiles the same step functions; the persistent cache
  # lets later experts (and reruns) reuse the first compilation.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(run_dir / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _main(args: argparse.Namespace) -> int:
  from elm_jax.demo import report  # pylint: disable=g-import-not-at-top
  from elm_jax.demo import stages as stages_lib  # pylint: disable=g-import-not-at-top

  config = gin_utils.configured(configure)()
  if args.quick:
    config = pipeline.quick(config)
  run_dir = Path(args.run_dir or (DEFAULT_RUN_DIR + ("_quick" if args.quick else "")))
  _prepare_run_dir(run_dir, args.fresh)
  _enable_compilation_cache(run_dir)
  gin_utils.write_config(run_dir)
  logging.info("Demo run in %s with %d expert tasks and %d evaluation tasks.", run_dir,
               len(config.expert_tasks), len(config.eval_tasks))

  demo = pipeline.Demo(config, run_dir)
  stage_list = [
      stages_lib.Stage("data", "fetch BIG-bench and MiniLM, build the vocabulary",
                       demo.stage_data),
      stages_lib.Stage("pretrain", "span-corruption pretraining of the shared base",
                       demo.stage_pretrain),
      stages_lib.Stage("experts", "one adapter prompt expert per held-in task",
                       demo.stage_experts),
      stages_lib.Stage("multitask", "the multitask baseline on the same tasks",
                       demo.stage_multitask),
      stages_lib.Stage("library", "the Expert Library with MiniLM sample embeddings",
                       demo.stage_library),
      stages_lib.Stage("audit", "leakage audit of library samples against evaluation data",
                       demo.stage_audit),
      stages_lib.Stage("retrieval", "Retrieval of Experts for each evaluation task",
                       demo.stage_retrieval),
      stages_lib.Stage("matrix", "every expert and the multitask model on every task",
                       demo.stage_matrix),
      stages_lib.Stage("merged", "uniform merge of the top retrieved experts",
                       demo.stage_merged),
      stages_lib.Stage("held_in", "each expert against the multitask model on its own task",
                       demo.stage_held_in),
  ]
  summaries = stages_lib.run_stages(run_dir, stage_list)
  results = report.write_outputs(config, summaries, run_dir, quick=args.quick)
  print(report.summary_table(results))
  print(f"\nReport: {run_dir / 'report.md'}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  logging.set_verbosity(logging.INFO)
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a == "--gin_file" or a.startswith("--gin_file=") for a in argv):
    argv = [f"--gin_file={DEFAULT_GIN_FILE}", *argv]
  return gin_utils.run(_main, argv, __doc__.split("\n\n")[0], add_arguments=_add_arguments,
                       prog="elm-jax demo")


if __name__ == "__main__":
  sys.exit(main())
