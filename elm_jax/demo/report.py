"""The demo's outputs: `results.json`, `report.md` and the figures.

`results.json` holds only numbers that a rerun reproduces (no timings), so two
runs with the same config can be compared file to file. Timings go to
`timings.json` and into the report.
"""

import dataclasses
import json
import platform
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from elm_jax import file_io
from elm_jax.demo import pipeline

SYSTEMS = ("multitask", "retrieved", "oracle", "random", "merged")

CAVEAT = (
    "This run trains small T5 models from scratch on offline BIG-bench data: no "
    "pretrained T5 weights exist offline, so the base model is a briefly pretrained "
    "random initialization. Absolute accuracies are therefore low, often near chance. "
    "The run shows the pipeline and its comparisons (experts against a multitask "
    "model, retrieval against the oracle), not the published numbers, which come from "
    "T5-LM-adapted XL and P3.")


def _cell(matrix: Mapping[str, Any], expert: str, task: str) -> float:
  key = f"{expert}|{task}"
  if key not in matrix:
    raise KeyError(f"The evaluation matrix has no cell for expert {expert!r} on {task!r}.")
  return float(matrix[key]["accuracy"])


def build_results(config: pipeline.DemoConfig, summaries: Mapping[str, Any]) -> dict[str, Any]:
  """Collects the run's numbers from the stage summaries."""
  matrix = summaries["matrix"]
  decisions = summaries["retrieval"]["decisions"]
  merged_cells = summaries["merged"]["cells"]
  experts = [pipeline.expert_id(t) for t in config.expert_tasks]

  per_task: dict[str, dict[str, Any]] = {}
  for task in config.eval_tasks:
    accuracy = {e: _cell(matrix, e, task) for e in experts}
    # The oracle is the best expert on this task; ties go to the smallest id.
    oracle_expert = min(experts, key=lambda e: (-accuracy[e], e))
    retrieved = decisions[task]["expert"]
    random_choice = pipeline.random_expert(task, experts, config.seed)
    merged_sources = sorted(decisions[task]["ranking"][:config.merge_top_k])
    merged_name = "+".join(merged_sources)
    num_examples = int(matrix[f"{pipeline.MULTITASK}|{task}"]["num_examples"])
    per_task[task] = {
        "num_examples": num_examples,
        "multitask": _cell(matrix, pipeline.MULTITASK, task),
        "retrieved": accuracy[retrieved],
        "retrieved_expert": retrieved,
        "votes": decisions[task]["votes"],
        "vote_margin": decisions[task]["margin"],
        "vote_tie": decisions[task]["tie"],
        "oracle": accuracy[oracle_expert],
        "oracle_expert": oracle_expert,
        "random": accuracy[random_choice],
        "random_expert": random_choice,
        "merged": _cell(merged_cells, f"merged={merged_name}", task),
        "merged_experts": merged_sources,
    }

  means = {system: float(np.mean([per_task[t][system] for t in config.eval_tasks]))
           for system in SYSTEMS}
  expert_means = {e: float(np.mean([_cell(matrix, e, t) for t in config.eval_tasks]))
                  for e in experts}

  held_in = {}
  for name in config.expert_tasks:
    task = f"heldin={name}"
    held_in[name] = {
        "expert": _cell(summaries["held_in"], pipeline.expert_id(name), task),
        "multitask": _cell(summaries["held_in"], pipeline.MULTITASK, task),
        "num_examples": int(summaries["held_in"][f"{pipeline.MULTITASK}|{task}"]["num_examples"]),
    }

  audit = summaries["audit"]
  return {
      "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
      "eval_tasks": per_task,
      "means": means,
      "median_over_tasks": {system: float(statistics.median(
          per_task[t][system] for t in config.eval_tasks)) for system in SYSTEMS},
      "expert_means": expert_means,
      "held_in": held_in,
      "matrix": {k: v["accuracy"] for k, v in sorted(matrix.items())},
      "leakage_audit": _audit_counts(audit),
      "training": {
          "base": {k: v for k, v in summaries["pretrain"].items() if k != "base"},
          "multitask_steps": summaries["multitask"]["steps"],
          "expert_steps": config.expert_steps,
      },
  }


def _audit_counts(audit: Mapping[str, Any]) -> dict[str, Any]:
  """The audit's counts, without example texts or paths (which differ between runs)."""
  counts: dict[str, Any] = {}
  for key, value in audit.items():
    if isinstance(value, Mapping):
      counts[key] = {k: v for k, v in value.items() if isinstance(v, (int, float, dict))}
    elif isinstance(value, (int, float)) and key != "generation":
      counts[key] = value
  return counts


def _audit_sentence(audit: Mapping[str, Any]) -> str:
  samples = audit.get("library_samples", {})
  return (
      f"{samples.get('checked', 0)} library samples were checked against "
      f"{audit.get('eval_instances', 0)} evaluation instances: "
      f"{samples.get('exact_duplicates', 0)} exact duplicates (after normalization) and "
      f"{samples.get('near_duplicates', 0)} near duplicates (MiniLM cosine similarity "
      f">= {audit.get('threshold', 0)}).")


def _fmt(value: float) -> str:
  return f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def summary_table(results: Mapping[str, Any]) -> str:
  """The per-task accuracy table (percent), with the mean as the last row."""
  rows = []
  for task, r in results["eval_tasks"].items():
    rows.append([task, r["num_examples"], _fmt(r["multitask"]),
                 f"{_fmt(r['retrieved'])} ({r['retrieved_expert']})",
                 f"{_fmt(r['oracle'])} ({r['oracle_expert']})",
                 f"{_fmt(r['random'])} ({r['random_expert']})", _fmt(r["merged"])])
  means = results["means"]
  rows.append(["**mean**", "", _fmt(means["multitask"]), _fmt(means["retrieved"]),
               _fmt(means["oracle"]), _fmt(means["random"]), _fmt(means["merged"])])
  return _table(["task", "examples", "multitask", "retrieved expert", "oracle expert",
                 "random expert", "merged top-k"], rows)


def write_outputs(config: pipeline.DemoConfig, summaries: Mapping[str, Any],
                  run_dir: Path, *, quick: bool) -> dict[str, Any]:
  """Writes results.json, timings.json, the figures and report.md; returns the results."""
  from elm_jax.evaluation import plots  # pylint: disable=g-import-not-at-top

  results = build_results(config, summaries)
  file_io.write_json_atomic(run_dir / "results.json", results, indent=1)
  timings = dict(summaries.get("_timings", {}))
  file_io.write_json_atomic(run_dir / "timings.json", timings, indent=1)

  figures = run_dir / "figures"
  figures.mkdir(exist_ok=True)
  # The figures show percentages, as their axis labels say.
  plots.expert_accuracy_figure({e: 100 * v for e, v in results["expert_means"].items()},
                               output_stem=figures / "expert_means",
                               baseline=100 * results["means"]["multitask"])
  plots.task_comparison_figure(
      {t: {"baseline": 100 * r["multitask"], "retrieved": 100 * r["retrieved"],
           "oracle": 100 * r["oracle"]} for t, r in results["eval_tasks"].items()},
      output_stem=figures / "per_task")
  experts = [pipeline.expert_id(t) for t in config.expert_tasks] + [pipeline.MULTITASK]
  accuracy = np.array([[100 * _cell(summaries["matrix"], e, t) for t in config.eval_tasks]
                       for e in experts])
  plots.matrix_heatmap(accuracy, experts=experts, tasks=list(config.eval_tasks),
                       output_stem=figures / "expert_by_task")

  _write_markdown(config, summaries, results, timings, run_dir, quick=quick)
  return results


def _write_markdown(config, summaries, results, timings, run_dir: Path, *, quick: bool):
  held_rows = [[name, r["num_examples"], _fmt(r["expert"]), _fmt(r["multitask"]),
                f"{100 * (r['expert'] - r['multitask']):+.1f}"]
               for name, r in results["held_in"].items()]
  retrieval_rows = []
  for task, r in results["eval_tasks"].items():
    votes = ", ".join(f"{e}: {v:g}" for e, v in list(r["votes"].items())[:4])
    retrieval_rows.append([task, r["retrieved_expert"], votes, f"{r['vote_margin']:.2f}",
                           "yes" if r["vote_tie"] else "no"])
  timing_rows = [[name, f"{seconds:.1f}"] for name, seconds in timings.items()]
  timing_rows.append(["**total**", f"{sum(timings.values()):.1f}"])
  audit = results["leakage_audit"]
  mc = config.model_config
  lines = [
      f"# elm-jax demo report{' (--quick)' if quick else ''}",
      "",
      CAVEAT,
      "",
      "## What was run",
      "",
      f"- Base: T5 v1.1-style encoder-decoder, d_model {mc.d_model}, {mc.num_encoder_layers}"
      f" + {mc.num_decoder_layers} layers, {mc.num_heads} heads x d_kv {mc.d_kv}, d_ff "
      f"{mc.d_ff}, vocabulary {mc.vocab_size}; "
      + (f"loaded from {config.initial_checkpoint_path}." if config.initial_checkpoint_path
         else f"{config.pretrain_steps} span-corruption steps on held-in BIG-bench text."),
      f"- Prompt experts: {len(config.expert_tasks)} adapter experts (reduction factor "
      f"{config.adapter_reduction_factor}, layer norms trained), {config.expert_steps} AdamW "
      f"steps each, batch {config.batch_size}, lengths {config.inputs_length}/"
      f"{config.targets_length}: {', '.join(config.expert_tasks)}.",
      f"- Multitask baseline: full fine-tuning with Adafactor on the same tasks "
      f"(examples-proportional mixture) for {results['training']['multitask_steps']} steps, "
      "the experts' total budget.",
      f"- Expert Library: S = {config.library_samples} training instances per expert, "
      "embedded by all-MiniLM-L6-v2 as `Answer Choices: ..., Instance: ...`.",
      f"- Retrieval: Q = {config.num_queries} unlabeled instances per evaluation task, "
      "each votes for the expert of its nearest library entry.",
      f"- Evaluation: rank classification (sum of choice token log-probabilities) on at most "
      f"{config.eval_max_examples} examples of each of the {len(config.eval_tasks)} "
      "BIG-bench evaluation tasks; none of them entered any training text.",
      f"- Seed {config.seed} for every random choice. Host: {platform.machine()}, "
      f"Python {platform.python_version()}.",
      "",
      "## Accuracy on unseen BIG-bench tasks (percent)",
      "",
      "retrieved: the expert chosen by Retrieval of Experts; oracle: the best expert on the "
      "task; random: a seeded random expert; merged: the uniform mean of the top "
      f"{config.merge_top_k} retrieved experts' adapters.",
      "",
      summary_table(results),
      "",
      "## Retrieval choices",
      "",
      _table(["task", "chosen expert", "votes (top 4)", "margin", "tie"], retrieval_rows),
      "",
      "## Held-in check: each expert against the multitask model on its own task",
      "",
      _table(["task", "examples", "expert", "multitask", "difference"], held_rows),
      "",
      "## Leakage audit",
      "",
      _audit_sentence(audit),
      "",
      "## Timings (seconds, this machine)",
      "",
      _table(["stage", "seconds"], timing_rows),
      "",
      "## Files",
      "",
      "- `results.json`: every number above; `timings.json`: stage timings.",
      "- `figures/expert_means.{png,svg}`: mean accuracy of each expert on the unseen tasks, "
      "with the multitask model as a line; `figures/per_task.{png,svg}`; "
      "`figures/expert_by_task.{png,svg}`; `retrieval_heatmap.png`: vote share of each "
      "expert per evaluation task.",
      "- `leakage_audit.json`, `library/`, `experts/`, `multitask/`, `base/`, `matrix/`.",
      "",
  ]
  text = "\n".join(lines)
  file_io.write_text_atomic(run_dir / "report.md", text)
