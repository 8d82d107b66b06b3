"""Wall time of `elm-jax demo` and `elm-jax demo --quick`, with the stage breakdown.

  python benchmarks/demo_runtime.py [--quick_only] [--work_dir DIR]

Each run starts from an empty run folder (the offline data and vocabulary stay
cached, as after a user's first run) and prints a Markdown section for
docs/benchmarks.md. The budget is 30 minutes for the default run and 5 minutes for
--quick on a 2-core CPU machine.
"""

import argparse
import datetime
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import tempfile
import time


def _run(run_dir: Path, quick: bool) -> tuple[float, dict[str, float], dict]:
  command = [sys.executable, "-m", "elm_jax.cli", "demo", "--run_dir", str(run_dir)]
  if quick:
    command.append("--quick")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  start = time.perf_counter()
  subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  seconds = time.perf_counter() - start
  with open(run_dir / "timings.json", encoding="utf-8") as f:
    timings = json.load(f)
  with open(run_dir / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  return seconds, timings, results


def _section(name: str, command: str, seconds: float, timings: dict[str, float],
             results: dict, budget_minutes: int) -> str:
  lines = [f"### `{command}`", "",
           f"Total wall time {seconds / 60:.1f} min (budget {budget_minutes} min), "
           f"{len(results['config']['expert_tasks'])} experts, "
           f"{len(results['eval_tasks'])} evaluation tasks.", "",
           "| stage | seconds |", "|---|---|"]
  lines += [f"| {stage} | {value:.1f} |" for stage, value in timings.items()]
  means = results["means"]
  lines += ["", "Mean accuracy over the evaluation tasks (percent): " + ", ".join(
      f"{system} {100 * value:.1f}" for system, value in means.items()) + ".", ""]
  del name
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick_only", action="store_true", help="time only --quick")
  parser.add_argument("--work_dir", default=None, help="where the run folders go")
  args = parser.parse_args()
  work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="elm_demo_bench_"))

  header = [
      "## End-to-end demo",
      "",
      f"Command: `python benchmarks/demo_runtime.py{' --quick_only' if args.quick_only else ''}`"
      f" on {datetime.date.today().isoformat()}; machine: {os.cpu_count()} CPU cores, "
      f"{platform.machine()}, {platform.processor() or 'unknown processor'}, Python "
      f"{platform.python_version()}.",
      "",
  ]
  sections = []
  seconds, timings, results = _run(work_dir / "quick", quick=True)
  sections.append(_section("quick", "elm-jax demo --quick", seconds, timings, results, 5))
  if not args.quick_only:
    seconds, timings, results = _run(work_dir / "default", quick=False)
    sections.append(_section("default", "elm-jax demo", seconds, timings, results, 30))
  print("\n".join(header + sections))


if __name__ == "__main__":
  main()
