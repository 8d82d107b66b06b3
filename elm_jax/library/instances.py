"""Instances that the library embeds and that queries are built from.

An instance is the unlabeled part of an example: its input text and its answer
choices (empty for generative tasks). Library entries and queries are embedded in
one of three text formats; the library records which, and queries use the same.
"""

import dataclasses
import json
import os
import re
import string
from typing import Iterable, Sequence

import numpy as np
from absl import logging

# Library identifiers become file and folder names, so they are restricted to a
# safe alphabet; `..` and path separators can never appear.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}$")

TEXT_FORMATS = ("choices_and_instance", "instance", "choices")
DEFAULT_TEXT_FORMAT = "choices_and_instance"


class InvalidIdentifierError(ValueError):
  """An identifier that would not be a safe file name inside the library."""


def validate_id(identifier: str, what: str = "expert id") -> str:
  """Returns `identifier` if it is a safe single path component, else raises."""
  if not isinstance(identifier, str) or not ID_PATTERN.match(identifier) or ".." in identifier:
    raise InvalidIdentifierError(
        f"Invalid {what} {identifier!r}: use 1-128 characters from letters, digits and "
        "'._@+=-', starting with a letter or digit, with no '/' and no '..'. Pass a "
        "valid one with --id.")
  return identifier


@dataclasses.dataclass(frozen=True)
class Instance:
  """One unlabeled example: its input and its answer choices (possibly none)."""
  input: str
  answer_choices: tuple[str, ...] = ()

  def to_json(self) -> dict:
    return {"input": self.input, "answer_choices": list(self.answer_choices)}

  @classmethod
  def from_json(cls, record: dict, where: str = "record") -> "Instance":
    if not isinstance(record, dict) or not isinstance(record.get("input"), str):
      raise ValueError(f"{where}: expected an object with a string 'input', got "
                       f"{str(record)[:200]!r}.")
    choices = record.get("answer_choices") or ()
    if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
      raise ValueError(f"{where}: 'answer_choices' must be a list of strings, got "
                       f"{choices!r}.")
    return cls(record["input"], tuple(choices))


def format_text(instance: Instance, text_format: str = DEFAULT_TEXT_FORMAT) -> str:
  """Returns the text embedded for `instance` in one of TEXT_FORMATS."""
  choices = ", ".join(instance.answer_choices)
  if text_format == "choices_and_instance":
    return f"Answer Choices: {choices}, Instance: {instance.input}"
  if text_format == "instance":
    return instance.input
  if text_format == "choices":
    return f"Answer Choices: {choices}"
  raise ValueError(f"Unknown text format {text_format!r}; expected one of {TEXT_FORMATS}.")


def sample_indices(count: int, size: int, seed: int) -> np.ndarray:
  """Returns min(size, count) distinct indices in [0, count), sorted, drawn with `seed`."""
  if count <= size:
    return np.arange(count)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(count, size=size, replace=False))


def sample_instances(instances: Sequence[Instance], size: int, seed: int) -> list[Instance]:
  return [instances[i] for i in sample_indices(len(instances), size, seed)]


def read_jsonl(path: str | os.PathLike[str]) -> list[Instance]:
  """Reads instances from a JSON lines file with `input` and optional `answer_choices`."""
  instances = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}, line {line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e}).") from e
      instances.append(Instance.from_json(record, where))
  if not instances:
    raise ValueError(f"{path} contains no instances.")
  return instances


def _as_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _as_text(value.item())
  return str(value)


def task_instances(task_name: str, split: str, *, limit: int | None = None) -> list[Instance]:
  """Reads instances from a registered seqio Task's split, in dataset order.

  Examples must carry `inputs_pretokenized`; `answer_choices` is used when present.
  `limit` stops reading after that many examples.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import elm_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import
  try:
    import elm_jax.tasks.bigbench  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass

  try:
    task = seqio.get_mixture_or_task(task_name)
  except ValueError as e:
    import difflib  # pylint: disable=g-import-not-at-top
    names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(task_name, names, n=5)
    hint = f" Nearest registered names: {', '.join(close)}." if close else ""
    raise ValueError(f"No seqio Task or Mixture named {task_name!r}.{hint}") from e
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False)
  first = next(iter(dataset.take(1).as_numpy_iterator()), None)
  scoring_name = f"{task_name}_score_eval"
  if (first is not None and "answer_choices" not in first
      and scoring_name in seqio.TaskRegistry.names()):
    # Training Tasks often drop the choices; the scoring Task of the same data has them.
    logging.info("Task %s has no answer_choices; reading %s instead.", task_name,
                 scoring_name)
    return task_instances(scoring_name, split, limit=limit)
  instances = []
  for example in dataset.as_numpy_iterator():
    if "inputs_pretokenized" not in example:
      raise ValueError(f"Task {task_name!r} split {split!r}: examples have no "
                       f"'inputs_pretokenized' (features: {sorted(example)}).")
    choices = example.get("answer_choices", ())
    instances.append(Instance(_as_text(example["inputs_pretokenized"]),
                              tuple(_as_text(c) for c in choices)))
    if limit is not None and len(instances) >= limit:
      break
  if not instances:
    raise ValueError(f"Task {task_name!r} split {split!r} has no examples.")
  return instances


def load_instances(source: str, split: str, *, limit: int | None = None) -> list[Instance]:
  """Reads instances from a JSON lines file if `source` is one, else from a seqio Task."""
  if source.endswith((".jsonl", ".json")) or os.path.isfile(source):
    return read_jsonl(source)
  return task_instances(source, split, limit=limit)


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
  """Lowercases, strips ASCII punctuation and collapses whitespace."""
  return " ".join(text.lower().translate(_PUNCTUATION).split())


def write_jsonl(path: str | os.PathLike[str], instances: Iterable[Instance]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for instance in instances:
      f.write(json.dumps(instance.to_json(), ensure_ascii=False) + "\n")
