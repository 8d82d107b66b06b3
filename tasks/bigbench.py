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

A Mixture drops every feature except `inputs` and `targets` by default. Read a
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
import os
from pathlib import Path
from typing import Any

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

# The data source shuffles (see `_dataset_fn`); seqio requires a buffer size
# for shuffle=True, and a 1-example buffer leaves that order as it is.
_SHUFFLE_BUFFER_SIZE = 1


@dataclasses.dataclass(frozen=True)
class _Registration:
  cache: Path
  vocabulary: seqio.Vocabulary
  max_examples_per_task: int | None
  names: tuple[tuple[str, str], ...]  # (kind, name) in registration order


_registered: _Registration | None = None


class InMemoryTask(seqio.Task):
  """A Task whose source is an in-memory tensor dataset that reshuffles each epoch.

  seqio caches small sources in memory, which would replay the first epoch's
  order forever; the examples are in memory already, so the cache is skipped.
  """

  def get_dataset(self, *args, **kwargs) -> tf.data.Dataset:  # pytype: disable=signature-mismatch
    kwargs["try_in_mem_cache"] = False
    return super().get_dataset(*args, **kwargs)


def _dataset_fn(path: Path, cap: int | None, scoring: bool, splits_dir: Path):
  """Returns a seqio dataset_fn over one task file's records.

  The records become tensors (no Python generator runs inside tf.data, so
  hundreds of Tasks mix without contending for the GIL). With `shuffle_files`
  the source shuffles all records, afresh each epoch, before tokenization:
  a shuffle buffer after tokenization would tokenize the whole buffer of every
  Task of a Mixture before the first batch.
  """

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    records = bigbench.read_split(path, split, cap, cache_dir=splits_dir)
    columns: dict[str, Any] = {
        "inputs": tf.constant([r["inputs_pretokenized"] for r in records], tf.string),
        "targets": tf.constant([r["targets_pretokenized"] for r in records], tf.string),
        "idx": tf.constant([r["idx"] for r in records], tf.int32),
    }
    if scoring:
      lengths = tf.constant([len(r["answer_choices"]) for r in records], tf.int64)
      # [num_records, (num_choices)]
      columns["answer_choices"] = tf.RaggedTensor.from_row_lengths(
          tf.constant([c for r in records for c in r["answer_choices"]], tf.string), lengths)
      columns["is_correct"] = tf.RaggedTensor.from_row_lengths(
          tf.constant([c for r in records for c in r["is_correct"]], tf.bool), lengths)
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    if scoring:
      # Slices of a ragged column arrive as ragged specs of rank 1; make them dense.
      dataset = dataset.map(lambda ex: {k: tf.identity(v) for k, v in ex.items()})
    if shuffle_files and records:
      dataset = dataset.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    return dataset

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
      shuffle_buffer_size=_SHUFFLE_BUFFER_SIZE,
      task_cls=InMemoryTask)


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
