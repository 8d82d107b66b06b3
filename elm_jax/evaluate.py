"""`elm-jax eval`: evaluate a model, an expert or a merged expert on a Task or Mixture.

  elm-jax eval --gin_file=runs/eval.gin \
      --gin.MIXTURE_OR_TASK_NAME=bigbench_eval_score_eval \
      --gin.CHECKPOINT_PATH=/path/to/base [--gin.EXPERT_PATH=/path/to/expert] \
      [--gin.EVAL_OUTPUT_DIR=/path/to/results]

The model comes from `CHECKPOINT_PATH` through `elm_jax.checkpoints.loading`
(a Hugging Face directory, a T5X checkpoint or an elm-jax model directory). With
`EXPERT_PATH`, the expert folder (prompt, dataset, multitask or merged expert)
is checked against that base by fingerprint and applied onto it. An elm-jax model
directory of an adapter or LoRA run loads as its base only: evaluate such a run
through its exported expert folder.

Rank classification (the default mode) scores `_score_eval` Tasks; "generative"
mode decodes and computes text metrics. Outputs, in `EVAL_OUTPUT_DIR` (default
`<EXPERT_PATH or CHECKPOINT_PATH>/eval/<MIXTURE_OR_TASK_NAME>`), are listed in
`elm_jax.evaluation.reports`.
"""

import dataclasses
from pathlib import Path
import time
from typing import Any, Sequence

from absl import logging
import gin

from elm_jax import gin_utils
from elm_jax.checkpoints import loading
from elm_jax.evaluation import aggregation
from elm_jax.evaluation import generative
from elm_jax.evaluation import model_loading
from elm_jax.evaluation import reports
from elm_jax.evaluation import scorer as scorer_lib
from elm_jax.models import t5

MODES = ("rank_classification", "generative")


def _default_output_dir(checkpoint_path: str, expert_path: str | None, name: str) -> Path:
  root = Path(expert_path if expert_path is not None else checkpoint_path)
  return root / "eval" / name


def evaluate(*, mixture_or_task_name: str, checkpoint_path: str,
             expert_path: str | None = None, output_dir: str | None = None,
             split: str = "validation", batch_size: int = 16,
             max_examples: int | None = None, mode: str = "rank_classification",
             scoring: scorer_lib.ScoringConfig = scorer_lib.ScoringConfig(),
             decoding_config: generative.DecodingConfig = generative.DecodingConfig(),
             metric_names: Sequence[str] = ("exact_match", "rouge", "bleu"),
             task_modules: Sequence[str] = scorer_lib.DEFAULT_TASK_MODULES,
             dataset_resolver: aggregation.DatasetResolver = aggregation.dataset_of
             ) -> aggregation.Summary:
  """Evaluates one model on every Task of a Task or Mixture and writes the report.

  Args:
    mixture_or_task_name: a registered seqio Task or Mixture.
    checkpoint_path: the base model (any format `loading.load_model` reads).
    expert_path: an expert folder to apply onto the base, or None.
    output_dir: where the report goes; see the module docstring for the default.
    split: the split of every Task (BIG-bench evaluation tasks: use "all").
    batch_size: examples per batch.
    max_examples: examples per Task at most (the first ones), or None for all.
    mode: "rank_classification" or "generative".
    scoring: the rank-classification score normalization.
    decoding_config: search settings of generative mode.
    metric_names: metrics of generative mode (`elm_jax.evaluation.metrics.METRICS`).
    task_modules: modules that register Tasks, imported before the lookup.
    dataset_resolver: maps a Task name to its dataset for aggregation.

  Returns:
    The summary that was written.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

  # Tasks.
  task_names = scorer_lib.resolve_task_names(mixture_or_task_name, task_modules=task_modules)
  logging.info("Evaluating %d Tasks of %s (%s, split %s).", len(task_names),
               mixture_or_task_name, mode, split)

  # Model.
  config, params, description = model_loading.load_model_and_params(
      checkpoint_path, expert_path)
  config = dataclasses.replace(config, dropout_rate=0.0)
  model = t5.T5(config)
  scorer = scorer_lib.ChoiceScorer(model, scoring=scoring)

  # Evaluation, one Task at a time.
  predictions: list[dict[str, Any]] = []
  results: list[aggregation.PromptResult] = []
  checked_vocab_sizes = set()
  start = time.perf_counter()
  for task_name in task_names:
    vocabulary = scorer_lib.task_vocabulary(task_name)
    if vocabulary.vocab_size not in checked_vocab_sizes:
      loading.check_compatible(config, params, vocabulary.vocab_size,
                               source=str(checkpoint_path))
      checked_vocab_sizes.add(vocabulary.vocab_size)
    if mode == "rank_classification":
      records = scorer_lib.evaluate_task(
          task_name, model=model, params=params, vocabulary=vocabulary,
          batch_size=batch_size, split=split, max_examples=max_examples, scorer=scorer)
      value, count = aggregation.accuracy(records)
      task_metrics = {"accuracy": value}
    else:
      records, task_metrics = generative.evaluate_generative_task(
          task_name, config=config, params=params, vocabulary=vocabulary,
          batch_size=batch_size, split=split, max_examples=max_examples,
          decoding_config=decoding_config, metric_names=metric_names)
      count = len(records)
    if count == 0:
      logging.warning("Task %s has no examples in split %s; it is left out.", task_name,
                      split)
      continue
    predictions.extend(records)
    results.append(aggregation.PromptResult(task=task_name,
                                            dataset=dataset_resolver(task_name),
                                            num_examples=count, metrics=task_metrics))
    logging.info("eval/%s: %s on %d examples.", task_name,
                 ", ".join(f"{k} {v:.2f}" for k, v in task_metrics.items()), count)

  if not results:
    raise ValueError(f"No examples were evaluated: every Task of {mixture_or_task_name} "
                     f"is empty in split {split!r}. Pick another split.")

  # Report.
  summary = aggregation.summarize(results)
  out = Path(output_dir) if output_dir else _default_output_dir(
      checkpoint_path, expert_path, mixture_or_task_name)
  metadata = description | {
      "mixture_or_task_name": mixture_or_task_name, "split": split, "mode": mode,
      "max_examples": max_examples, "normalization": scoring.normalization,
      "eval_seconds": round(time.perf_counter() - start, 3)}
  reports.write_report(out, summary=summary, predictions=predictions, metadata=metadata)
  _plot_datasets(summary, out)
  for metric, values in summary.overall.items():
    logging.info("eval/overall/%s: %.2f (mean over datasets)", metric,
                 values["mean_over_datasets"])
  logging.info("Wrote evaluation results to %s.", out)
  return summary


def _plot_datasets(summary: aggregation.Summary, out: Path) -> None:
  """Draws the mean of each dataset's first metric (accuracy in rank classification)."""
  from elm_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  if not summary.datasets:
    return
  metric = next(iter(summary.overall))
  per_dataset = {d.dataset: {metric: d.mean[metric]} for d in summary.datasets}
  plots.task_comparison_figure(per_dataset, output_stem=out / "per_dataset",
                               systems=(metric,), title=f"{metric} per dataset")


def evaluate_experts(*, experts_root: str, mixture_or_task_name: str, checkpoint_path: str,
                     output_dir: str | None = None, split: str = "validation",
                     batch_size: int = 16, max_examples: int | None = None,
                     scoring: scorer_lib.ScoringConfig = scorer_lib.ScoringConfig(),
                     baseline_expert: str | None = None) -> Path:
  """Evaluates every expert under `experts_root` on every Task: the expert-by-task matrix.

  Finished cells are kept in `<output_dir>/cells.jsonl`, so a rerun after a crash
  computes only the missing ones. Writes the per-expert accuracy figure (with the
  expert named `baseline_expert`, for example the multitask model, as a line) and
  the heatmap; returns the output folder.
  """
  from elm_jax.evaluation import matrix  # pylint: disable=g-import-not-at-top
  from elm_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  out = Path(output_dir) if output_dir else Path(experts_root) / "matrix" / (
      mixture_or_task_name)
  cells = matrix.run_matrix(checkpoint_path=checkpoint_path, experts_root=experts_root,
                            mixture_or_task_name=mixture_or_task_name, output_dir=out,
                            split=split, batch_size=batch_size, max_examples=max_examples,
                            scoring=scoring)
  baseline = None
  if baseline_expert is not None:
    means = matrix.expert_means(cells)
    if baseline_expert not in means:
      raise ValueError(f"baseline_expert {baseline_expert!r} is not one of the experts "
                       f"under {experts_root}: {sorted(means)}.")
    baseline = means[baseline_expert]
  plots.matrix_figures(out, output_dir=out, baseline=baseline)
  logging.info("Wrote the expert-by-task matrix and its figures to %s.", out)
  return out


def run(*, experts_root: str | None = None) -> aggregation.Summary | Path:
  """Runs `evaluate`, or `evaluate_experts` when `experts_root` is set (gin binds both)."""
  if experts_root is not None:
    return gin_utils.configured(evaluate_experts)(experts_root=experts_root)
  return gin_utils.configured(evaluate)()


def _run(args) -> int:
  del args  # Everything comes from gin.
  result = gin_utils.configured(run)()
  if isinstance(result, Path):
    print(f"Expert-by-task matrix and figures: {result}")
    return 0
  summary = result
  for metric, values in summary.overall.items():
    print(f"{metric}: {values['mean_over_datasets']:.2f} (mean over datasets), "
          f"{values['mean_over_prompts']:.2f} (mean over prompts)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `elm-jax eval` and `python -m elm_jax.evaluate`.

  The gin config comes from `argv` alone: an earlier config in this process (for
  example an earlier call, or another entry point's) is cleared first.
  """
  gin.clear_config()
  return gin_utils.run(_run, argv, __doc__.split("\n\n")[0], prog="elm-jax eval")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(main())
