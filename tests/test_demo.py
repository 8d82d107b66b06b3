"""End-to-end tests of `elm-jax demo` in real subprocesses."""

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest

from elm_jax.demo import pipeline

# The 13 BIG-bench evaluation tasks, written out so that a change of the default
# list in the code is caught here.
EVAL_TASKS = {
    "code_line_description", "conceptual_combinations",
    "formal_fallacies_syllogisms_negation", "hindu_knowledge", "known_unknowns",
    "language_identification", "logic_grid_puzzle", "logical_deduction", "misconceptions",
    "movie_dialog_same_or_different", "strategyqa", "vitaminc_fact_verification", "winowhy",
}

# A smaller run than --quick for the kill-and-resume test, which needs two runs.
TINY_BINDINGS = (
    "--gin.pipeline.DemoConfig.expert_tasks=['anachronisms', 'navigate']",
    "--gin.pipeline.DemoConfig.pretrain_steps=8",
    "--gin.pipeline.DemoConfig.expert_steps=60",
    "--gin.pipeline.DemoConfig.eval_max_examples=6",
    "--gin.pipeline.DemoConfig.held_in_max_examples=6",
    "--gin.pipeline.DemoConfig.library_samples=10",
    "--gin.pipeline.DemoConfig.num_queries=4",
    "--gin.pipeline.DemoConfig.checkpoint_period=25",
)


def _environment() -> dict[str, str]:
  env = dict(os.environ)
  # One CPU device, as on a user's machine; the test process forces eight.
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _demo_command(run_dir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "elm_jax.cli", "demo", "--run_dir", str(run_dir), *extra]


def _run_demo(run_dir: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
  result = subprocess.run(_demo_command(run_dir, *extra), env=_environment(),
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _read_results(run_dir: Path) -> dict:
  with open(run_dir / "results.json", encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, bigbench_dir, minilm_dir):
  del bigbench_dir, minilm_dir  # Fetched before the subprocess needs them.
  run_dir = tmp_path_factory.mktemp("demo") / "quick"
  result = _run_demo(run_dir, "--quick")
  return run_dir, result


def test_quick_demo_writes_report(quick_run):
  run_dir, result = quick_run
  for name in ("report.md", "results.json", "timings.json", "retrieval_heatmap.png",
               "leakage_audit.json", "figures/expert_means.png", "figures/expert_means.svg",
               "figures/per_task.png", "figures/expert_by_task.png"):
    assert (run_dir / name).is_file(), name
  report = (run_dir / "report.md").read_text(encoding="utf-8")
  assert "trains small T5 models from scratch" in report
  assert "| **mean** |" in report
  assert "retrieved expert" in result.stdout


def test_quick_demo_results_are_consistent(quick_run):
  run_dir, _ = quick_run
  results = _read_results(run_dir)
  assert set(results["eval_tasks"]) == EVAL_TASKS

  matrix = results["matrix"]
  experts = [pipeline.expert_id(t) for t in results["config"]["expert_tasks"]]
  assert len(experts) >= 2
  for task, row in results["eval_tasks"].items():
    for system in ("multitask", "retrieved", "oracle", "random", "merged"):
      assert 0.0 <= row[system] <= 1.0, (task, system)
    # Recompute the oracle and the retrieved expert's accuracy from the matrix.
    best = max(matrix[f"{e}|{task}"] for e in experts)
    assert row["oracle"] == pytest.approx(best)
    assert row["retrieved"] == pytest.approx(matrix[f"{row['retrieved_expert']}|{task}"])
    assert row["oracle"] >= row["retrieved"]
    assert row["multitask"] == pytest.approx(matrix[f"multitask|{task}"])
    assert row["retrieved_expert"] in experts
    assert sum(row["votes"].values()) > 0

  for system, mean in results["means"].items():
    recomputed = sum(r[system] for r in results["eval_tasks"].values()) / len(EVAL_TASKS)
    assert mean == pytest.approx(recomputed), system
  assert set(results["held_in"]) == set(results["config"]["expert_tasks"])


def test_quick_demo_rerun_skips_finished_stages(quick_run):
  run_dir, _ = quick_run
  before = (run_dir / "results.json").read_bytes()
  result = _run_demo(run_dir, "--quick", timeout=600)
  assert "already done, skipped" in result.stderr
  assert (run_dir / "results.json").read_bytes() == before


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    if process.poll() is not None:
      raise AssertionError(f"The demo exited ({process.returncode}) before {path} appeared.")
    if time.monotonic() > deadline:
      raise AssertionError(f"{path} did not appear within {timeout} s.")
    time.sleep(0.5)


def test_demo_killed_in_expert_training_resumes(tmp_path, bigbench_dir, minilm_dir):
  del bigbench_dir, minilm_dir
  reference_dir = tmp_path / "reference"
  _run_demo(reference_dir, "--quick", *TINY_BINDINGS)

  run_dir = tmp_path / "killed"
  process = subprocess.Popen(_demo_command(run_dir, "--quick", *TINY_BINDINGS),
                             env=_environment(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    # The first expert's first periodic checkpoint (step 25 of 60): the kill lands
    # in the middle of expert training.
    _wait_for(run_dir / "experts" / "anachronisms" / "checkpoints" / "25", process, 600)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert not (run_dir / "results.json").exists()

  _run_demo(run_dir, "--quick", *TINY_BINDINGS)
  assert _read_results(run_dir) == _read_results(reference_dir)
