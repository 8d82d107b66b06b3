"""seqio Tasks and Mixtures of the T0 collection, read from P3 files.

P3 (the prompted T0 data, `bigscience/P3` on the Hugging Face Hub) has one folder
per prompt: `<p3_dir>/data/<task>/` with `<split>.tfrecord-00000-of-00001` and,
per split, `info.<split>.json` (feature shapes and dtypes) and `stats.<split>.json`
(`examples`, token counts). `<task>` is the prompt's P3 task name, for example
`super_glue_rte_GPT_3_style` (see `t0_prompts.p3_task_name`). Scoring variants,
`<task>_score_eval`, contain one record per (example, answer choice) with
`answer_choices`, `idx` ([example index, choice index]), `is_correct` and
`weight`. elm-jax does not download P3; users fetch it themselves.

P3's `inputs` and `targets` are token ids of T5's vocabulary. The Tasks here read
`inputs_pretokenized` and `targets_pretokenized` instead and tokenize them with
the configured vocabulary, so the offline vocabulary (which is not T5's) and T5's
own both work.

Importing this module registers the collection with `register()`'s defaults and
reads no files: the P3 folder is taken from $ELM_JAX_P3_DIR when a dataset is
first built, and the default vocabulary is checked when first used. Call
`register(p3_dir=..., vocabulary=...)` to register it again with other settings.
Registered names:
- one Task per training prompt (296), named by its P3 task name;
- one Mixture per training dataset (36), `t0_<key>` (for example `t0_cos_e`),
  for Dataset Experts;
- `t0_train`, all 296 prompts with T0's mixing rates;
- one `_score_eval` Task per evaluation prompt (113), named by its P3 name;
- `t0_eval_<key>_score_eval` per evaluation dataset (11) and
  `t0_eval_score_eval` with all of them.

In gin, `TASK_MODULES = ['elm_jax.tasks.t0']` imports (and so registers) the
collection; set $ELM_JAX_P3_DIR for the folder, or bind `t0.register.p3_dir` in a
run that calls `@t0.register()`.
"""

import dataclasses
import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

from elm_jax.tasks import promptsource
from elm_jax.tasks import t0_prompts
from elm_jax.tasks.t0_prompts import T0Dataset

P3_DIR_ENV = "ELM_JAX_P3_DIR"
P3_SPLITS = ("train", "validation", "test")
# T0's mixing rule: a dataset with more than this many examples counts as this
# many, shared equally by its prompts.
MAX_EXAMPLES_PER_DATASET = 500_000
TRAIN_MIXTURE = "t0_train"
EVAL_MIXTURE = "t0_eval_score_eval"

# Features of P3 records when a folder has no info.<split>.json.
_TRAIN_FEATURES = {
    "inputs": {"shape": [None], "dtype": "int32"},
    "inputs_pretokenized": {"shape": [], "dtype": "string"},
    "targets": {"shape": [None], "dtype": "int32"},
    "targets_pretokenized": {"shape": [], "dtype": "string"},
}
_SCORE_EVAL_FEATURES = {
    **_TRAIN_FEATURES,
    "answer_choices": {"shape": [None], "dtype": "string"},
    "idx": {"shape": [None], "dtype": "int32"},
    "is_correct": {"shape": [], "dtype": "bool"},
    "weight": {"shape": [], "dtype": "float32"},
}
_DOWNLOAD_HINT = (
    "elm-jax does not download P3: download the P3 release (bigscience/P3 on the "
    "Hugging Face Hub) yourself and pass the folder that contains `data/` to "
    f"elm_jax.tasks.t0.register(p3_dir=...) or set ${P3_DIR_ENV}.")


class P3DataError(FileNotFoundError):
  """A P3 folder, file or split is missing."""


# ----------------------------------------------------------------------------
# P3 files.
# ----------------------------------------------------------------------------


def resolve_p3_dir(p3_dir: str | os.PathLike[str] | None = None) -> Path:
  """Returns `p3_dir`, else $ELM_JAX_P3_DIR; raises P3DataError when neither is set."""
  value = os.fspath(p3_dir) if p3_dir is not None else os.environ.get(P3_DIR_ENV)
  if not value:
    raise P3DataError(f"No P3 folder is configured. {_DOWNLOAD_HINT}")
  return Path(value).expanduser()


def p3_task_dir(task_name: str, p3_dir: str | os.PathLike[str] | None = None) -> Path:
  """Returns `<p3_dir>/data/<task_name>` (not checked)."""
  if not re.fullmatch(r"[\w.]+", task_name) or set(task_name) == {"."}:
    raise ValueError(f"Invalid P3 task name {task_name!r}: expected letters, digits, `_`, `.`.")
  return resolve_p3_dir(p3_dir) / "data" / task_name


def _existing_task_dir(task_name: str, p3_dir: str | os.PathLike[str] | None) -> Path:
  folder = p3_task_dir(task_name, p3_dir)
  if not folder.is_dir():
    raise P3DataError(f"P3 task folder {folder} not found (Task {task_name!r}). {_DOWNLOAD_HINT}")
  return folder


def split_files(task_name: str, split: str,
                p3_dir: str | os.PathLike[str] | None = None) -> list[str]:
  """Returns the TFRecord shards of one split; raises P3DataError when there are none."""
  folder = _existing_task_dir(task_name, p3_dir)
  files = sorted(str(p) for p in folder.glob(f"{split}.tfrecord-*-of-*"))
  if not files:
    present = sorted({p.name.split(".tfrecord")[0] for p in folder.glob("*.tfrecord-*")})
    raise P3DataError(
        f"{folder} has no `{split}.tfrecord-*-of-*` files; splits present: "
        f"{', '.join(present) or 'none'}.")
  return files


def _read_json(path: Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from e
  if not isinstance(content, dict):
    raise ValueError(f"{path} must contain a JSON object.")
  return content


def split_features(task_name: str, split: str, *, score_eval: bool,
                   p3_dir: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
  """Returns the record features from info.<split>.json, or P3's defaults without it."""
  info_path = _existing_task_dir(task_name, p3_dir) / f"info.{split}.json"
  if not info_path.is_file():
    return dict(_SCORE_EVAL_FEATURES if score_eval else _TRAIN_FEATURES)
  features = _read_json(info_path).get("features")
  if not isinstance(features, dict):
    raise ValueError(f"{info_path} has no `features` mapping.")
  return features


def _parse_spec(feature: str, spec: dict[str, Any], source: str):
  try:
    shape, dtype = spec["shape"], spec["dtype"]
  except (KeyError, TypeError) as e:
    raise ValueError(f"{source}: feature {feature!r} needs `shape` and `dtype`.") from e
  # tf.train.Example stores int32 and bool as int64.
  stored = "int64" if dtype in ("int32", "bool") else dtype
  if shape and shape[0] is None:
    return tf.io.FixedLenSequenceFeature(shape[1:], tf.as_dtype(stored), allow_missing=True)
  return tf.io.FixedLenFeature(shape, tf.as_dtype(stored))


def read_records(task_name: str, split: str, *, score_eval: bool,
                 p3_dir: str | os.PathLike[str] | None = None,
                 keep: tuple[str, ...] | None = None, shuffle_files: bool = False,
                 seed: int | None = None) -> tf.data.Dataset:
  """Reads the records of one P3 split, cast to the dtypes of info.<split>.json.

  Args:
    task_name: the P3 task folder name.
    split: `train`, `validation` or `test`.
    score_eval: whether the folder has the score_eval features (used when
      info.<split>.json is absent).
    p3_dir: the P3 folder; None reads $ELM_JAX_P3_DIR.
    keep: parse only these features; None parses all.
    shuffle_files: shuffle the order of the shards.
    seed: the shard shuffling seed.
  """
  files = split_files(task_name, split, p3_dir)
  features = split_features(task_name, split, score_eval=score_eval, p3_dir=p3_dir)
  if keep is not None:
    missing = [name for name in keep if name not in features]
    if missing:
      raise ValueError(f"P3 {task_name} {split}: features {missing} are not in the split's "
                       f"info (it has {sorted(features)}).")
    features = {name: features[name] for name in keep}
  source = f"P3 {task_name} {split}"
  description = {name: _parse_spec(name, spec, source) for name, spec in features.items()}

  def parse(record):
    example = tf.io.parse_single_example(record, description)
    return {name: tf.cast(value, tf.as_dtype(features[name]["dtype"]))
            for name, value in example.items()}

  file_dataset = tf.data.Dataset.from_tensor_slices(files)
  if shuffle_files:
    file_dataset = file_dataset.shuffle(len(files), seed=seed)
  records = file_dataset.interleave(tf.data.TFRecordDataset, num_parallel_calls=tf.data.AUTOTUNE)
  return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


@functools.lru_cache(maxsize=None)
def _count_examples(folder: str, split: str) -> int:
  stats_path = Path(folder) / f"stats.{split}.json"
  if stats_path.is_file():
    count = _read_json(stats_path).get("examples")
    if not isinstance(count, int) or count < 0:
      raise ValueError(f"{stats_path}: `examples` must be a non-negative integer, got {count!r}.")
    return count
  files = sorted(str(p) for p in Path(folder).glob(f"{split}.tfrecord-*-of-*"))
  logging.info("%s has no stats.%s.json; counting the records of %d file(s).", folder, split,
               len(files))
  return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda count, _: count + 1))


def count_examples(task_name: str, split: str = "train", *,
                   p3_dir: str | os.PathLike[str] | None = None) -> int:
  """Returns the record count of a split: `examples` of stats.<split>.json, else counted.

  Counts are cached per folder and split for the life of the process.
  """
  split_files(task_name, split, p3_dir)  # Raises when the split is missing.
  return _count_examples(str(_existing_task_dir(task_name, p3_dir)), split)


def _feature_values(example: tf.train.Example, name: str, source: str) -> list[Any]:
  feature = example.features.feature.get(name)
  if feature is None:
    raise ValueError(f"{source}: a record has no feature {name!r}.")
  kind = feature.WhichOneof("kind")
  return list(getattr(feature, kind).value) if kind else []


def read_score_eval_examples(task_name: str, split: str, *,
                             p3_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
  """Reads a `_score_eval` split and groups its per-choice records by example.

  Each P3 record is one (example, choice) pair with `idx` = [example index, choice
  index]. The result has one dict per example, in `idx` order, with `inputs`,
  `answer_choices`, `is_correct` (per choice), `targets` (the first correct
  choice) and `idx`. Examples without a correct choice are dropped and counted
  in a warning. The records are parsed in Python, which suits evaluation splits
  (tens of thousands of records).
  """
  source = f"P3 {task_name} {split}"
  examples: dict[int, dict[str, Any]] = {}
  files = split_files(task_name, split, p3_dir)
  for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator():
    record = tf.train.Example.FromString(serialized)
    idx = _feature_values(record, "idx", source)
    choices = [c.decode("utf-8") for c in _feature_values(record, "answer_choices", source)]
    inputs = _feature_values(record, "inputs_pretokenized", source)[0].decode("utf-8")
    example = examples.setdefault(int(idx[0]), {
        "inputs": inputs, "answer_choices": choices, "is_correct": [False] * len(choices)})
    if len(idx) > 1:
      position = int(idx[1])
    else:
      target = _feature_values(record, "targets_pretokenized", source)[0].decode("utf-8")
      position = choices.index(target.strip()) if target.strip() in choices else -1
    if 0 <= position < len(choices) and any(_feature_values(record, "is_correct", source)):
      example["is_correct"][position] = True

  grouped, unscorable = [], 0
  for index in sorted(examples):
    example = examples[index]
    if not any(example["is_correct"]):
      unscorable += 1
      continue
    first = example["is_correct"].index(True)
    grouped.append({**example, "targets": example["answer_choices"][first], "idx": index})
  if unscorable:
    logging.warning("%s: dropped %d of %d examples with no correct choice.", source, unscorable,
                    len(examples))
  return grouped


_SCORE_EVAL_SIGNATURE = {
    "inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "answer_choices": tf.TensorSpec([None], tf.string),
    "is_correct": tf.TensorSpec([None], tf.bool),
    "idx": tf.TensorSpec([], tf.int32),
}


class P3DataSource(seqio.DataSource):
  """Reads one P3 task folder; the folder is resolved and read only in `get_dataset`.

  Training records become `{"inputs", "targets"}` strings (the `_pretokenized`
  text). A score_eval source groups the per-choice records of each example into
  one example with `answer_choices`, `is_correct` (per choice), `idx` and
  `targets` (the first correct choice), in `idx` order. `num_input_examples`
  counts records, so for a score_eval source it counts (example, choice) pairs.
  """

  def __init__(self, task_name: str, *, p3_dir: str | os.PathLike[str] | None = None,
               score_eval: bool = False, splits: tuple[str, ...] = P3_SPLITS):
    self._task_name = task_name
    self._p3_dir = os.fspath(p3_dir) if p3_dir is not None else None
    self._score_eval = score_eval
    super().__init__(splits=splits)

  @property
  def task_name(self) -> str:
    return self._task_name

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def __repr__(self) -> str:
    return (f"P3DataSource({self._task_name!r}, p3_dir={self._p3_dir!r}, "
            f"score_eval={self._score_eval})")

  def list_shards(self, split: str) -> list[str]:
    return split_files(self._task_name, split, self._p3_dir)

  def num_input_examples(self, split: str) -> int:
    return count_examples(self._task_name, split, p3_dir=self._p3_dir)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # Handled by the Task.
    if self._score_eval:
      grouped = read_score_eval_examples(self._task_name, split, p3_dir=self._p3_dir)
      dataset = tf.data.Dataset.from_generator(lambda: iter(grouped),
                                               output_signature=_SCORE_EVAL_SIGNATURE)
    else:
      records = read_records(self._task_name, split, score_eval=False, p3_dir=self._p3_dir,
                             keep=("inputs_pretokenized", "targets_pretokenized"),
                             shuffle_files=shuffle, seed=seed)
      # seqio's tokenize() encodes `inputs` and `targets` and copies the text back
      # to the `_pretokenized` features.
      dataset = records.map(
          lambda r: {"inputs": r["inputs_pretokenized"], "targets": r["targets_pretokenized"]},
          num_parallel_calls=tf.data.AUTOTUNE)
    if shard_info is not None and shard_info.num_shards > 1:
      dataset = dataset.shard(shard_info.num_shards, shard_info.index)
    return dataset


# ----------------------------------------------------------------------------
# Mixing rates.
# ----------------------------------------------------------------------------


def t0_mixing_rate(prompt_examples: int, *, dataset_examples: int, num_prompts: int,
                   max_examples: int = MAX_EXAMPLES_PER_DATASET) -> float:
  """T0's examples-proportional rate of one prompt.

  A prompt's rate is its number of examples, unless its dataset has more than
  `max_examples`: then each of the dataset's `num_prompts` prompts gets
  `max_examples / num_prompts`.
  """
  if dataset_examples > max_examples:
    return max_examples / num_prompts
  return float(prompt_examples)


@dataclasses.dataclass(frozen=True)
class DatasetRate:
  """The mixing-rate function of the prompts of one dataset, read lazily from P3.

  A dataset's example count is the largest count among its prompts, because each
  prompt's file contains one record per dataset example that the template renders.
  """
  dataset: T0Dataset
  p3_dir: str | None = None

  def counts(self) -> dict[str, int]:
    return {name: count_examples(name, self.dataset.p3_split, p3_dir=self.p3_dir)
            for name in self.dataset.p3_task_names()}

  def __call__(self, task: seqio.Task) -> float:
    counts = self.counts()
    if task.name not in counts:
      raise KeyError(f"Task {task.name!r} is not a prompt of T0 dataset {self.dataset.key!r}.")
    return t0_mixing_rate(counts[task.name], dataset_examples=max(counts.values()),
                          num_prompts=len(counts))


# ----------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------


def dataset_mixture_name(dataset: T0Dataset) -> str:
  """`t0_<key>` for a training dataset, `t0_eval_<key>_score_eval` for an evaluation one."""
  if dataset in t0_prompts.EVAL_DATASETS:
    return f"t0_eval_{dataset.key}{promptsource.SCORE_EVAL_SUFFIX}"
  return f"t0_{dataset.key}"


@dataclasses.dataclass(frozen=True)
class T0Names:
  """The names `register()` adds to the seqio registries."""
  train_tasks: tuple[str, ...]
  dataset_mixtures: tuple[str, ...]
  train_mixture: str
  eval_tasks: tuple[str, ...]
  eval_mixtures: tuple[str, ...]
  eval_mixture: str

  def all(self) -> tuple[str, ...]:
    return (*self.train_tasks, *self.dataset_mixtures, self.train_mixture, *self.eval_tasks,
            *self.eval_mixtures, self.eval_mixture)


def names() -> T0Names:
  """Returns the names `register()` registers, without registering anything."""
  return T0Names(
      train_tasks=tuple(n for d in t0_prompts.TRAIN_DATASETS for n in d.p3_task_names()),
      dataset_mixtures=tuple(dataset_mixture_name(d) for d in t0_prompts.TRAIN_DATASETS),
      train_mixture=TRAIN_MIXTURE,
      eval_tasks=tuple(n for d in t0_prompts.EVAL_DATASETS
                       for n in d.p3_task_names(score_eval=True)),
      eval_mixtures=tuple(dataset_mixture_name(d) for d in t0_prompts.EVAL_DATASETS),
      eval_mixture=EVAL_MIXTURE)


def prompt_of_task(task_name: str) -> tuple[T0Dataset, str] | None:
  """Returns the dataset and template name of a T0 Task name, or None for other names."""
  for dataset in (*t0_prompts.TRAIN_DATASETS, *t0_prompts.EVAL_DATASETS):
    for template in dataset.prompts:
      if task_name in (dataset.p3_task_name(template),
                       dataset.p3_task_name(template, score_eval=True)):
        return dataset, template
  return None


def _add_task(name: str, source: P3DataSource, preprocessors: list[Any],
              features: dict[str, seqio.Feature]) -> None:
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=features)


def _add_mixture(name: str, tasks: list[tuple[str, Any]]) -> None:
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, tasks)


def register_p3_task(name: str, *, p3_dir: str | os.PathLike[str] | None = None,
                     task_name: str | None = None, vocabulary: seqio.Vocabulary | None = None,
                     splits: tuple[str, ...] = P3_SPLITS) -> str:
  """Registers one P3-format folder, `<p3_dir>/data/<task_name>`, as the Task `name`.

  A `task_name` ending in `_score_eval` is read as a scoring folder, with one
  record per (example, choice), and the Task yields the scoring features. Registering a name again
  replaces the Task. Nothing is read until a dataset is built.

  Args:
    name: the Task name.
    p3_dir: the folder that contains `data/`; None reads $ELM_JAX_P3_DIR.
    task_name: the folder name under `data/`; defaults to `name`.
    vocabulary: the vocabulary; None uses the default vocabulary.
    splits: the splits the folder has.

  Returns:
    `name`.
  """
  task_name = task_name or name
  score_eval = task_name.endswith(promptsource.SCORE_EVAL_SUFFIX)
  source = P3DataSource(task_name, p3_dir=p3_dir, score_eval=score_eval, splits=splits)
  features = promptsource.output_features(promptsource.resolve_vocabulary(vocabulary))
  _add_task(name, source, _tokenize_preprocessors(), features)
  return name


def _tokenize_preprocessors() -> list[Any]:
  return [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim]


def register(p3_dir: str | os.PathLike[str] | None = None, *,
             vocabulary: seqio.Vocabulary | None = None, include_eval: bool = True) -> T0Names:
  """Registers the T0 Tasks and Mixtures over a P3 folder; reads no files.

  Calling it again replaces the registrations, for example to point them at
  another folder.

  Args:
    p3_dir: the folder that contains P3's `data/`. None reads $ELM_JAX_P3_DIR
      when a dataset is first built.
    vocabulary: the vocabulary of `inputs` and `targets`; None uses
      `elm_jax.data.vocab.get_vocabulary()`.
    include_eval: also register the `_score_eval` Tasks and Mixtures.

  Returns:
    The registered names.
  """
  p3_dir = os.fspath(p3_dir) if p3_dir is not None else None
  features = promptsource.output_features(promptsource.resolve_vocabulary(vocabulary))
  tokenize = _tokenize_preprocessors()

  all_prompts: list[tuple[str, DatasetRate]] = []
  for dataset in t0_prompts.TRAIN_DATASETS:
    rate = DatasetRate(dataset, p3_dir)
    prompts = []
    for task_name in dataset.p3_task_names():
      _add_task(task_name, P3DataSource(task_name, p3_dir=p3_dir), tokenize, features)
      prompts.append((task_name, rate))
    _add_mixture(dataset_mixture_name(dataset), prompts)
    all_prompts.extend(prompts)
  _add_mixture(TRAIN_MIXTURE, all_prompts)

  if include_eval:
    all_eval: list[tuple[str, float]] = []
    for dataset in t0_prompts.EVAL_DATASETS:
      tasks = []
      for task_name in dataset.p3_task_names(score_eval=True):
        source = P3DataSource(task_name, p3_dir=p3_dir, score_eval=True)
        _add_task(task_name, source, tokenize, features)
        tasks.append((task_name, 1.0))
      _add_mixture(dataset_mixture_name(dataset), tasks)
      all_eval.extend(tasks)
    _add_mixture(EVAL_MIXTURE, all_eval)

  registered = names()
  if not include_eval:
    registered = dataclasses.replace(registered, eval_tasks=(), eval_mixtures=())
  logging.info("Registered %d T0 Tasks and %d Mixtures over P3 folder %s.",
               len(registered.train_tasks) + len(registered.eval_tasks),
               len(registered.dataset_mixtures) + len(registered.eval_mixtures) + 2,
               p3_dir or f"${P3_DIR_ENV}")
  return registered


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  """Looks up a seqio Task or Mixture; a miss lists the nearest registered names."""
  registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if name in registered:
    return seqio.get_mixture_or_task(name)
  near = difflib.get_close_matches(name, sorted(registered), n=8, cutoff=0.5)
  raise ValueError(
      f"No seqio Task or Mixture named {name!r}. Closest registered names: "
      f"{', '.join(near) if near else 'none'}. The module that registers it must be "
      "imported first (for example with --gin.TASK_MODULES).")


register()
