"""From per-example records to per-prompt, per-dataset and overall scores.

A prompt is one Task (for example one promptsource template applied to one
dataset). T0 (Sanh et al., 2021) and the Expert Language Models paper (Jang et
al., ICML 2023) report, per dataset, the mean and the median of the per-prompt
accuracies. The overall figure is the mean over datasets of the dataset means. Which dataset a prompt belongs to comes from a
`DatasetResolver`, by default `dataset_of`.
"""

import dataclasses
import functools
import importlib
import re
import statistics
from typing import Callable, Iterable, Mapping, Sequence

from absl import logging

# Maps a Task name to the name of its dataset.
DatasetResolver = Callable[[str], str]

_SCORE_EVAL_SUFFIX = "_score_eval"

# Prefixes of P3 Task names of the held-out T0 datasets, longest first, with the
# dataset name reported for them. P3 names of the ANLI rounds end in `_r1`, `_r2`
# or `_r3`.
_T0_PREFIXES = (
    ("winogrande_winogrande_xl_", "winogrande"),
    ("story_cloze_2016_", "story_cloze"),
    ("super_glue_wsc.fixed_", "wsc"),
    ("super_glue_copa_", "copa"),
    ("super_glue_rte_", "rte"),
    ("super_glue_wic_", "wic"),
    ("super_glue_cb_", "cb"),
    ("hellaswag_", "hellaswag"),
)
_ANLI_ROUND = re.compile(r"^anli_.*_(r[123])$")


@dataclasses.dataclass(frozen=True)
class PromptResult:
  """Scores of one prompt (one Task).

  Attributes:
    task: the Task name.
    dataset: the dataset the prompt belongs to.
    num_examples: how many examples were scored.
    metrics: metric name to value, for example {"accuracy": 61.2} (percent).
  """
  task: str
  dataset: str
  num_examples: int
  metrics: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class DatasetResult:
  """Mean and median over the prompts of one dataset, per metric."""
  dataset: str
  prompts: tuple[str, ...]
  mean: Mapping[str, float]
  median: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Summary:
  """All levels of aggregation for one evaluation run.

  Attributes:
    prompts: per-prompt results, sorted by dataset then Task name.
    datasets: per-dataset results, sorted by dataset name.
    overall: per metric, `mean_over_datasets` (the figure the Expert Language
      Models paper reports) and `mean_over_prompts`.
  """
  prompts: tuple[PromptResult, ...]
  datasets: tuple[DatasetResult, ...]
  overall: Mapping[str, Mapping[str, float]]

  def to_json(self) -> dict:
    return {
        "prompts": [dataclasses.asdict(p) | {"metrics": dict(p.metrics)}
                    for p in self.prompts],
        "datasets": [{"dataset": d.dataset, "prompts": list(d.prompts),
                      "mean": dict(d.mean), "median": dict(d.median)}
                     for d in self.datasets],
        "overall": {k: dict(v) for k, v in self.overall.items()},
    }


@functools.cache
def _t0_prompt_table() -> Mapping[str, str]:
  """Maps the P3 Task names of every T0 prompt (plain and `_score_eval`) to its dataset key."""
  try:
    t0_prompts = importlib.import_module("elm_jax.tasks.t0_prompts")
  except ImportError:
    return {}
  table = {}
  for dataset in (*t0_prompts.TRAIN_DATASETS, *t0_prompts.EVAL_DATASETS):
    for score_eval in (False, True):
      for name in dataset.p3_task_names(score_eval=score_eval):
        table[name] = dataset.key
  return table


@functools.cache
def _bigbench_parent_table() -> Mapping[str, str]:
  """Maps sanitized BIG-bench subtask names to their task, from the cached index."""
  try:
    from elm_jax.data import bigbench  # pylint: disable=g-import-not-at-top
    if not bigbench.index_path().is_file():
      return {}  # Building the index scans every file; names alone must do.
    return {name: bigbench.sanitize_name(entry.task)
            for name, entry in bigbench.load_index().items()}
  except (ImportError, OSError, ValueError) as e:
    logging.info("No BIG-bench index for dataset names (%s); using Task names.", e)
    return {}


def _bigbench_dataset(name: str) -> str:
  """Returns the BIG-bench task of a sanitized task or subtask name."""
  from elm_jax.data import bigbench  # pylint: disable=g-import-not-at-top
  for task in sorted(bigbench.EVAL_TASKS, key=len, reverse=True):
    if name == task or name.startswith(task + "_"):
      return task
  return _bigbench_parent_table().get(name, name)


def dataset_of(task_name: str) -> str:
  """Returns the dataset of a prompt Task, from its name.

  - `bigbench_<name>[_score_eval]`: each BIG-bench task is its own dataset, and
    the subtasks of a task (`bigbench_<task>_<subtask>`) belong to it.
  - T0 Tasks: the dataset key of `elm_jax.tasks.t0_prompts` (`rte`, `anli_r1`,
    `cos_e`, ...) for P3 Task names, else the P3 naming of the held-out datasets
    (`super_glue_rte_<template>`, `anli_<template>_r1`, ...).
  - Anything else is its own dataset (the name without `_score_eval`).
  """
  base = task_name.removesuffix(_SCORE_EVAL_SUFFIX)
  if base.startswith("bigbench_"):
    return _bigbench_dataset(base.removeprefix("bigbench_"))
  table = _t0_prompt_table()
  if task_name in table:
    return table[task_name]
  match = _ANLI_ROUND.match(base)
  if match:
    return f"anli_{match.group(1)}"
  for prefix, dataset in _T0_PREFIXES:
    if base.startswith(prefix):
      return dataset
  return base


def accuracy(records: Iterable[Mapping]) -> tuple[float, int]:
  """Returns (percent of records with `is_correct`, number of records)."""
  total = hits = 0
  for record in records:
    total += 1
    hits += bool(record["is_correct"])
  if total == 0:
    return 0.0, 0
  return 100.0 * hits / total, total


def summarize(prompt_results: Sequence[PromptResult]) -> Summary:
  """Aggregates per-prompt metrics into per-dataset mean/median and overall means."""
  if not prompt_results:
    raise ValueError("nothing to summarize: no prompt results were given.")
  names = [p.task for p in prompt_results]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Tasks listed more than once: {duplicates}.")

  prompts = tuple(sorted(prompt_results, key=lambda p: (p.dataset, p.task)))
  by_dataset: dict[str, list[PromptResult]] = {}
  for prompt in prompts:
    by_dataset.setdefault(prompt.dataset, []).append(prompt)

  datasets = []
  for dataset in sorted(by_dataset):
    members = by_dataset[dataset]
    metric_names = sorted({m for p in members for m in p.metrics})
    mean = {}
    median = {}
    for metric in metric_names:
      values = [p.metrics[metric] for p in members if metric in p.metrics]
      mean[metric] = statistics.fmean(values)
      median[metric] = statistics.median(values)
    datasets.append(DatasetResult(dataset=dataset, prompts=tuple(p.task for p in members),
                                  mean=mean, median=median))

  overall: dict[str, dict[str, float]] = {}
  for metric in sorted({m for p in prompts for m in p.metrics}):
    dataset_means = [d.mean[metric] for d in datasets if metric in d.mean]
    prompt_values = [p.metrics[metric] for p in prompts if metric in p.metrics]
    overall[metric] = {
        "mean_over_datasets": statistics.fmean(dataset_means),
        "mean_over_prompts": statistics.fmean(prompt_values),
    }
  return Summary(prompts=prompts, datasets=tuple(datasets), overall=overall)


def summarize_records(records_by_task: Mapping[str, Sequence[Mapping]], *,
                      dataset_resolver: DatasetResolver = dataset_of) -> Summary:
  """Builds a `Summary` of rank-classification accuracy from per-example records."""
  results = []
  for task, records in records_by_task.items():
    value, count = accuracy(records)
    results.append(PromptResult(task=task, dataset=dataset_resolver(task),
                                num_examples=count, metrics={"accuracy": value}))
  return summarize(results)
