"""The expert-by-task accuracy matrix, computed resumably.

Every expert of a set is evaluated on every evaluation prompt; the matrix feeds
oracle selection (the best expert per prompt) and the per-expert figure.

Resumption: each finished cell is appended as one JSON line to `cells.jsonl`,
then flushed and fsynced, so a crash loses at most the cell in progress. On
restart the file is read back; a torn last line (a crash mid-write) is cut off,
and finished cells are not recomputed. Every cell records the settings it was
computed with (split, max_examples, scoring), and a restart with other settings
is rejected, so one file never mixes two evaluations.

Cost: experts change the encoder (adapters, LoRA, full fine-tuning), so the
encoder runs per (expert, example). The loop runs experts in the outer loop: each
expert's parameters are built once, the packed batches of each task are built
once and kept for all experts, and one jitted scorer serves every expert that
shares a model config.
"""

import dataclasses
import json
import os
from pathlib import Path
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np

from elm_jax.evaluation import aggregation
from elm_jax.evaluation import scorer as scorer_lib
from elm_jax.models import t5

CELLS_FILE = "cells.jsonl"

# Returns (model, params) for an expert name.
ModelProvider = Callable[[str], tuple[t5.T5, Any]]
# Returns the packed scoring batches of a task.
BatchProvider = Callable[[str], list[Mapping[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Cell:
  """Accuracy of one expert on one task."""
  expert: str
  task: str
  accuracy: float
  num_examples: int
  seconds: float
  settings: Mapping[str, Any]


class CellStore:
  """Append-only JSON-lines file of finished cells; see the module docstring."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = Path(path)

  def load(self) -> dict[tuple[str, str], Cell]:
    """Reads every complete cell, cutting off a torn last line first."""
    if not self.path.exists():
      return {}
    data = self.path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
      logging.warning("Cutting a torn last line (%d bytes) off %s; its cell is recomputed.",
                      len(data) - end, self.path)
      with open(self.path, "r+b") as f:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
      data = data[:end]
    cells = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        cell = Cell(**row)
      except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{self.path}, line {number}, is not a matrix cell ({e}). The file "
                         "is corrupt beyond a torn last line; move it away to recompute.") from e
      cells[(cell.expert, cell.task)] = cell
    return cells

  def append(self, cell: Cell) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dataclasses.asdict(cell) | {"settings": dict(cell.settings)},
                      sort_keys=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())


def _check_settings(cells: Mapping[tuple[str, str], Cell], settings: Mapping[str, Any],
                    path: Path) -> None:
  for cell in cells.values():
    if dict(cell.settings) != dict(settings):
      raise ValueError(
          f"{path} contains cells computed with settings {dict(cell.settings)} (expert "
          f"{cell.expert!r}, task {cell.task!r}) but this run uses {dict(settings)}. Use "
          "another output folder, or the same settings to resume.")


def compute_matrix(*, experts: Sequence[str], tasks: Sequence[str], output_dir: str | os.PathLike[str],
                   model_provider: ModelProvider, batch_provider: BatchProvider,
                   settings: Mapping[str, Any],
                   scoring: scorer_lib.ScoringConfig = scorer_lib.ScoringConfig(),
                   records_dir: str | os.PathLike[str] | None = None,
                   scorers: dict[Any, scorer_lib.ChoiceScorer] | None = None
                   ) -> dict[tuple[str, str], Cell]:
  """Evaluates every expert on every task, skipping cells already in the store.

  Args:
    experts: expert names, passed to `model_provider`.
    tasks: `_score_eval` Task names, passed to `batch_provider`.
    output_dir: the folder of `cells.jsonl`.
    model_provider: expert name -> (model, params).
    batch_provider: task -> packed scoring batches (called once per task).
    settings: what the cells depend on besides expert and task (split,
      max_examples, ...); stored with each cell and checked on resume.
    scoring: the score normalization.
    records_dir: when given, per-example records of each cell are written to
      `<records_dir>/<expert>/<task>.jsonl`.
    scorers: a cache of scorers by (model config, scoring), shared between calls so that
      several matrices in one process compile each bucket shape once.

  Returns:
    All cells, (expert, task) -> Cell.
  """
  for name in (*experts, *tasks):
    _check_path_component(name)
  settings = dict(settings) | {"normalization": scoring.normalization,
                               "length_penalty_alpha": scoring.length_penalty_alpha}
  store = CellStore(Path(output_dir) / CELLS_FILE)
  cells = store.load()
  _check_settings(cells, settings, store.path)
  todo = [(e, t) for e in experts for t in tasks if (e, t) not in cells]
  logging.info("Matrix of %d experts x %d tasks: %d cells done, %d to compute.",
               len(experts), len(tasks), len(experts) * len(tasks) - len(todo), len(todo))

  batches: dict[str, list] = {}
  scorers = {} if scorers is None else scorers
  for expert in experts:
    expert_tasks = [t for t in tasks if (expert, t) not in cells]
    if not expert_tasks:
      continue
    model, params = model_provider(expert)
    scorer = scorers.get((model.config, scoring))
    if scorer is None:
      scorer = scorers[(model.config, scoring)] = scorer_lib.ChoiceScorer(model, scoring=scoring)
    for task in expert_tasks:
      start = time.perf_counter()
      if task not in batches:
        batches[task] = list(batch_provider(task))
      records = scorer_lib.score_batches(batches[task], scorer=scorer, params=params,
                                         task_name=task)
      value, count = aggregation.accuracy(records)
      if records_dir is not None:
        from elm_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
        reports.write_jsonl(Path(records_dir) / expert / f"{task}.jsonl", records)
      cell = Cell(expert=expert, task=task, accuracy=value, num_examples=count,
                  seconds=time.perf_counter() - start, settings=settings)
      store.append(cell)
      cells[(expert, task)] = cell
      logging.info("Matrix cell %s x %s: accuracy %.2f on %d examples.", expert, task,
                   value, count)
  return cells


def _check_path_component(name: str) -> None:
  if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
    raise ValueError(f"{name!r} cannot name a matrix row or column: it must be a "
                     "non-empty name without path separators.")


def read_cells(output_dir: str | os.PathLike[str]) -> dict[tuple[str, str], Cell]:
  """Reads the finished cells of a matrix folder (or a `cells.jsonl` path)."""
  path = Path(output_dir)
  if path.is_dir():
    path = path / CELLS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; run the matrix first.")
  return CellStore(path).load()


def to_array(cells: Mapping[tuple[str, str], Cell], *, experts: Sequence[str] | None = None,
             tasks: Sequence[str] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
  """Returns (accuracy[expert, task] with NaN for missing cells, experts, tasks)."""
  experts = list(experts) if experts is not None else sorted({e for e, _ in cells})
  tasks = list(tasks) if tasks is not None else sorted({t for _, t in cells})
  accuracy = np.full((len(experts), len(tasks)), np.nan)
  for i, expert in enumerate(experts):
    for j, task in enumerate(tasks):
      cell = cells.get((expert, task))
      if cell is not None:
        accuracy[i, j] = cell.accuracy
  return accuracy, experts, tasks


def oracle(cells: Mapping[tuple[str, str], Cell]) -> dict[str, tuple[str, float]]:
  """Returns, per task, (best expert, its accuracy); ties go to the first expert name."""
  best: dict[str, tuple[str, float]] = {}
  for (expert, task), cell in sorted(cells.items()):
    if task not in best or cell.accuracy > best[task][1]:
      best[task] = (expert, cell.accuracy)
  return best


def expert_means(cells: Mapping[tuple[str, str], Cell], *,
                 dataset_resolver: aggregation.DatasetResolver = aggregation.dataset_of
                 ) -> dict[str, float]:
  """Per expert: the mean over datasets of the mean accuracy over their prompts."""
  by_expert: dict[str, list[aggregation.PromptResult]] = {}
  for (expert, task), cell in cells.items():
    by_expert.setdefault(expert, []).append(aggregation.PromptResult(
        task=task, dataset=dataset_resolver(task), num_examples=cell.num_examples,
        metrics={"accuracy": cell.accuracy}))
  return {expert: aggregation.summarize(results).overall["accuracy"]["mean_over_datasets"]
          for expert, results in sorted(by_expert.items())}


def expert_model_provider(checkpoint_path: str, expert_dirs: Mapping[str, str | os.PathLike[str]]
                          ) -> ModelProvider:
  """Returns a provider that applies the named expert folders onto one base checkpoint.

  The base is loaded and fingerprinted once; each call loads one expert.
  """
  from elm_jax.checkpoints import experts as experts_lib  # pylint: disable=g-import-not-at-top
  from elm_jax.evaluation import model_loading  # pylint: disable=g-import-not-at-top

  config, base_params, _ = model_loading.load_base(checkpoint_path)
  base_fingerprint = experts_lib.fingerprint(base_params)

  def provide(expert: str) -> tuple[t5.T5, Any]:
    if expert not in expert_dirs:
      raise KeyError(f"No expert folder is named {expert!r}; known: {sorted(expert_dirs)}.")
    expert_config, params, _ = model_loading.apply_expert_folder(
        config, base_params, os.fspath(expert_dirs[expert]), base_fingerprint=base_fingerprint)
    return t5.T5(dataclasses.replace(expert_config, dropout_rate=0.0)), params

  return provide


def task_batch_provider(*, split: str, batch_size: int, max_examples: int | None = None
                        ) -> BatchProvider:
  """Returns a provider of the packed scoring batches of a registered Task split."""

  def provide(task: str) -> list[Mapping[str, np.ndarray]]:
    examples = scorer_lib.task_examples(task, split=split, max_examples=max_examples)
    return list(scorer_lib.make_batches(examples, vocabulary=scorer_lib.task_vocabulary(task),
                                        batch_size=batch_size, task_name=task))

  return provide


def run_matrix(*, checkpoint_path: str, experts_root: str | os.PathLike[str],
               mixture_or_task_name: str, output_dir: str | os.PathLike[str],
               split: str = "validation", batch_size: int = 16,
               max_examples: int | None = None,
               scoring: scorer_lib.ScoringConfig = scorer_lib.ScoringConfig()
               ) -> dict[tuple[str, str], Cell]:
  """Evaluates every expert folder under `experts_root` on every Task of a Mixture.

  Expert names are their folder names. See `compute_matrix` for resumption.
  """
  expert_dirs = {path.name: path for path in iter_expert_dirs(experts_root)}
  if not expert_dirs:
    raise FileNotFoundError(f"{experts_root} contains no expert folders (folders with expert.json). "
                            "Pass the folder that contains the expert folders.")
  tasks = scorer_lib.resolve_task_names(mixture_or_task_name)
  settings = {"checkpoint": os.fspath(checkpoint_path), "split": split,
              "max_examples": max_examples}
  return compute_matrix(
      experts=sorted(expert_dirs), tasks=tasks, output_dir=output_dir,
      model_provider=expert_model_provider(checkpoint_path, expert_dirs),
      batch_provider=task_batch_provider(split=split, batch_size=batch_size,
                                         max_examples=max_examples),
      settings=settings, scoring=scoring)


def iter_expert_dirs(root: str | os.PathLike[str]) -> Iterator[Path]:
  """Yields the expert folders (those holding `expert.json`) directly under `root`."""
  for path in sorted(Path(root).iterdir()):
    if (path / "expert.json").is_file():
      yield path
