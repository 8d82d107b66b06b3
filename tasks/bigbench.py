"""seqio Tasks and Mixtures for the BIG-bench JSON multiple-choice tasks.

Importing this module registers, from the fetched `bigbench` artifact:

- `bigbench_<name>`: a training Task per multiple-choice task file, where
  `<name>` is `task` or `task_subtask` in [a-z0-9_]. Features: `inputs` (the
  zero-shot prompt) and `targets` (the first choice with the highest score).
- `bigbench_<name>_score_eval`: the scoring Task of the same file, with the
  features of the scoring contract: `inputs`, `targets`, `inputs_pretokenized`,
  `answer_choices`, `is_correct` (several may be true) and `idx`.
- For a task with subtasks, `bigbench_<task>` and `bigbench_<task>_score_eval`
  Mixtures over its subtasks.
- `bigbench_eval_score_eval`: the scoring Tasks of the 13 evaluation tasks of
  T0 (`EVAL_TASKS`). Their training Tasks are registered too, only so that
  scoring code can use either name; they must never be trained on.
- `bigbench_held_in`: every other multiple-choice task file, each capped at
  `max_examples_per_task` examples per split, with rates proportional to the
  capped train size.
- `bigbench_held_in_span_corruption`: T5 span corruption over the held-in
  training text (`elm_jax.data.span_corruption`).

A Mixture keeps only `inputs` and `targets` unless told otherwise: read a
scoring Mixture with `copy_pretokenized=True` and
`passthrough_features=SCORING_PASSTHROUGH`, or read its Tasks one by one.

Every Task has the splits `train`, `validation` (a fixed 80/20 hash split) and
`all`; prompts, choice order and splits are described in
`elm_jax.data.bigbench`. The 13 evaluation tasks are unseen, so score them on
`all`. Registration reads a cached index of the task files (built once, in
about 15 s) and loads examples only when a dataset is requested. The examples
of each (task file, split, cap) are parsed once and cached in the cache folder,
so only the first read of the held-in Mixture parses all 1.7 GB of task files
(about two minutes of CPU time).
"""

import dataclasses
import itertools
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from elm_jax.data import bigbench
from elm_jax.data import fetch
from elm_jax.data import span_corruption
from elm_jax.data import vocab as vocab_lib

EVAL_TASKS = bigbench.EVAL_TASKS
DEFAULT_MAX_EXAMPLES_PER_TASK = 2000
EVAL_MIXTURE = "bigbench_eval_score_eval"
HELD_IN_MIXTURE = "bigbench_held_in"
SPAN_CORRUPTION_TASK = "bigbench_held_in_span_corruption"
SCORING_PASSTHROUGH = ("answer_choices", "is_correct", "idx")

# Examples are shuffled by the data source; this buffer only mixes neighbours.
_SHUFFLE_BUFFER_SIZE = 64

_TRAIN_SIGNATURE = {
    "inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "idx": tf.TensorSpec([], tf.int32),
}
_SCORE_SIGNATURE = {
    **_TRAIN_SIGNATURE,
    "answer_choices": tf.TensorSpec([None], tf.string),
    "is_correct": tf.TensorSpec([None], tf.bool),
}


@dataclasses.dataclass(frozen=True)
class _Registration:
  cache: Path
  vocabulary: seqio.Vocabulary
  max_examples_per_task: int | None
  names: tuple[tuple[str, str], ...]  # (kind, name) in registration order


_registered: _Registration | None = None


def _dataset_fn(path: Path, cap: int | None, scoring: bool, splits_dir: Path):
  """Returns a seqio dataset_fn over one task file's records."""
  signature = _SCORE_SIGNATURE if scoring else _TRAIN_SIGNATURE

  def generate(split: str, order_seed: list[int] | None):
    records = bigbench.read_split(path, split, cap, cache_dir=splits_dir)
    order = range(len(records))
    if order_seed is not None:
      order = np.random.default_rng(order_seed).permutation(len(records))
    for i in order:
      record = records[i]
      row: dict[str, Any] = {
          "inputs": record["inputs_pretokenized"],
          "targets": record["targets_pretokenized"],
          "idx": record["idx"],
      }
      if scoring:
        row["answer_choices"] = record["answer_choices"]
        row["is_correct"] = record["is_correct"]
      yield row

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    # Shuffling here, a fresh permutation per epoch, replaces a large shuffle
    # buffer: a 1,000-example buffer per Task would tokenize 1,000 examples of
    # each of ~300 held-in Tasks before the Mixture's first batch.
    epochs = itertools.count()
    base = secrets.randbits(32) if seed is None else int(seed)

    def order_seed() -> list[int] | None:
      return [base, next(epochs)] if shuffle_files else None

    return tf.data.Dataset.from_generator(
        lambda: generate(split, order_seed()), output_signature=signature)

  return dataset_fn


def _output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


def _add_task(name: str, path: Path, entry: bigbench.TaskEntry, cap: int | None,
              vocabulary: seqio.Vocabulary, scoring: bool, splits_dir: Path) -> None:
  sizes = {split: entry.split_size(split, cap) for split in bigbench.SPLITS}
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          _dataset_fn(path, cap, scoring, splits_dir), splits=bigbench.SPLITS,
          num_input_examples=sizes),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=_output_features(vocabulary),
      metric_fns=[],
      shuffle_buffer_size=_SHUFFLE_BUFFER_SIZE)


def _vocabulary_key(vocabulary: seqio.Vocabulary) -> tuple[Any, ...]:
  # Comparing vocabularies with == would load (and check) their model files.
  return (type(vocabulary), getattr(vocabulary, "sentencepiece_model_file", id(vocabulary)),
          vocabulary.extra_ids)


def _remove(names: tuple[tuple[str, str], ...]) -> None:
  for kind, name in reversed(names):
    registry = seqio.MixtureRegistry if kind == "mixture" else seqio.TaskRegistry
    if name in registry.names():
      registry.remove(name)


def register(cache: str | os.PathLike[str] | None = None, *,
             vocabulary: seqio.Vocabulary | None = None,
             max_examples_per_task: int | None = DEFAULT_MAX_EXAMPLES_PER_TASK) -> list[str]:
  """Registers every BIG-bench Task and Mixture; returns the registered names.

  Calling it again with the same arguments does nothing; other arguments
  replace the earlier registrations.

  Args:
    cache: the cache root holding the fetched bigbench artifact.
    vocabulary: the vocabulary of every Task; defaults to
      `elm_jax.data.vocab.get_vocabulary(cache=cache)`, checked at first use.
    max_examples_per_task: the cap on each split of each held-in task file
      (None: no cap). The evaluation tasks are never capped.

  Raises:
    MissingDataError: bigbench was never fetched; the message names the command.
  """
  global _registered
  root = fetch.artifact_dir("bigbench", cache)
  if vocabulary is None:
    vocabulary = vocab_lib.get_vocabulary(cache=cache, check_exists=False)
  if (_registered is not None and _registered.cache == root
      and _vocabulary_key(_registered.vocabulary) == _vocabulary_key(vocabulary)
      and _registered.max_examples_per_task == max_examples_per_task):
    return [name for _, name in _registered.names]
  if _registered is not None:
    _remove(_registered.names)
    _registered = None

  index = bigbench.load_index(cache)
  splits_dir = bigbench.split_cache_dir(cache)
  names: list[tuple[str, str]] = []
  held_in_rates: list[tuple[str, float]] = []
  eval_tasks: list[str] = []
  by_task: dict[str, list[str]] = {}
  try:
    for entry in index.values():
      cap = None if entry.is_eval else max_examples_per_task
      name = f"bigbench_{entry.name}"
      for task_name, scoring in ((name, False), (f"{name}_score_eval", True)):
        _add_task(task_name, root / entry.path, entry, cap, vocabulary, scoring, splits_dir)
        names.append(("task", task_name))
      if entry.subtask is not None:
        by_task.setdefault(bigbench.sanitize_name(entry.task), []).append(name)
      if entry.is_eval:
        eval_tasks.append(f"{name}_score_eval")
      elif entry.split_size("train", cap) > 0:
        held_in_rates.append((name, float(entry.split_size("train", cap))))

    for task, members in sorted(by_task.items()):
      for suffix in ("", "_score_eval"):
        mixture = f"bigbench_{task}{suffix}"
        seqio.MixtureRegistry.add(mixture, [m + suffix for m in members], default_rate=1.0)
        names.append(("mixture", mixture))
    seqio.MixtureRegistry.add(EVAL_MIXTURE, eval_tasks, default_rate=1.0)
    names.append(("mixture", EVAL_MIXTURE))
    seqio.MixtureRegistry.add(HELD_IN_MIXTURE, held_in_rates)
    names.append(("mixture", HELD_IN_MIXTURE))
    span_corruption.register_pretrain_task(
        SPAN_CORRUPTION_TASK, vocabulary=vocabulary, cache=cache)
    names.append(("task", SPAN_CORRUPTION_TASK))
  except BaseException:
    _remove(tuple(names))
    raise

  _registered = _Registration(root, vocabulary, max_examples_per_task, tuple(names))
  return [name for _, name in names]


def held_in_task_names(cache: str | os.PathLike[str] | None = None) -> list[str]:
  """Returns the training Task names of the held-in pool, sorted."""
  index = bigbench.load_index(cache)
  return [f"bigbench_{e.name}" for e in bigbench.held_in_entries(index)
          if e.num_train > 0]


def eval_task_names(cache: str | os.PathLike[str] | None = None) -> list[str]:
  """Returns the scoring Task names of the 13 evaluation tasks and their subtasks."""
  index = bigbench.load_index(cache)
  return [f"bigbench_{e.name}_score_eval" for e in index.values() if e.is_eval]


register()
