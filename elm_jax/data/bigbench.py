"""Reads BIG-bench JSON tasks: an index of the task files, prompts, splits.

This module is the reading side of the BIG-bench seqio Tasks in
`tasks/bigbench.py`. The vocabulary and span corruption read their training
text here too, so none of them imports the Task registrations.

Prompts follow the BIG-bench JSON task format, zero-shot:

  task_prefix + example_input_prefix + input
    [+ choice_prefix + choice_prefix.join(choices)]   if append_choices_to_input
    + example_output_prefix

with BIG-bench's defaults ("", "\\nQ: ", "\\n  choice: ", True, "\\nA: "). A
subtask file uses its own keys. The keys `prefix` and `input_prefix` found in a
few files are not part of the format and are ignored. Leading and trailing
whitespace of the prompt is removed; T5's SentencePiece normalization drops it
anyway.

Choice order: the choices of an example are shuffled with a seed derived from
the example text (BIG-bench shuffles them too, so the correct answer, often
listed first in the file, is not always first). The same order is used in the
prompt and in `answer_choices`.

Correct answers: `is_correct` marks every choice whose score equals the
maximum score, so several choices may be correct. The training target is the
first such choice in file order.

Splits: an example goes to `validation` when
`sha256(SPLIT_SALT, input, sorted choices) mod 100 < VALIDATION_PERCENT`,
else to `train`, so identical examples always share a split. `all` holds
every valid example. Within a split, examples keep their file order and `idx`
is the position in the split. A `max_examples` cap keeps the examples with the
smallest split hashes (a fixed pseudo-random sample), in file order.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from elm_jax import file_io
from elm_jax.data import fetch

# The 13 BIG-bench tasks of T0's zero-shot evaluation. They are never trained on
# and never used as vocabulary or pretraining text.
EVAL_TASKS: tuple[str, ...] = (
    "code_line_description",
    "conceptual_combinations",
    "formal_fallacies_syllogisms_negation",
    "hindu_knowledge",
    "known_unknowns",
    "language_identification",
    "logic_grid_puzzle",
    "logical_deduction",
    "misconceptions",
    "movie_dialog_same_or_different",
    "strategyqa",
    "vitaminc_fact_verification",
    "winowhy",
)

SPLITS = ("train", "validation", "all")
SPLIT_SALT = "elm-jax-bigbench-split-v1"
VALIDATION_PERCENT = 20
INDEX_VERSION = 2

_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}


@dataclasses.dataclass(frozen=True)
class TaskEntry:
  """One BIG-bench JSON task file with multiple-choice examples.

  Attributes:
    name: the sanitized name, `task` or `task_subtask`, in [a-z0-9_].
    task: the BIG-bench task folder.
    subtask: the subtask folder, or None.
    path: the task.json path relative to the bigbench artifact folder.
    num_examples: examples in the file, valid or not.
    num_train: valid examples in the train split.
    num_validation: valid examples in the validation split.
    skipped: reason -> number of examples skipped as malformed.
  """
  name: str
  task: str
  subtask: str | None
  path: str
  num_examples: int
  num_train: int
  num_validation: int
  skipped: dict[str, int]

  @property
  def is_eval(self) -> bool:
    return self.task in EVAL_TASKS

  def split_size(self, split: str, max_examples: int | None = None) -> int:
    if split == "train":
      size = self.num_train
    elif split == "validation":
      size = self.num_validation
    else:
      size = self.num_train + self.num_validation
    return size if max_examples is None else min(size, max_examples)


def sanitize_name(name: str) -> str:
  """Maps a task path like `bbq_lite_json/age_ambig` to `bbq_lite_json_age_ambig`."""
  clean = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
  return re.sub(r"_+", "_", clean)


def _example_key(example_input: str, choices: list[str]) -> bytes:
  text = "\x00".join([SPLIT_SALT, example_input, *sorted(choices)])
  return hashlib.sha256(text.encode("utf-8")).digest()


def _split_of(key: bytes) -> str:
  return "validation" if int.from_bytes(key[:8], "big") % 100 < VALIDATION_PERCENT else "train"


def _check_example(example: Any, shows_choices: bool) -> str | None:
  """Returns the reason an example is malformed, or None when it is valid.

  An empty input is valid when the prompt shows the choices: some tasks (for
  example cause_and_effect) put all the content into the choices.
  """
  if not isinstance(example, dict):
    return "example is not a JSON object"
  if not isinstance(example.get("input"), str):
    return "missing or non-string input"
  if not example["input"].strip() and not shows_choices:
    return "empty input and choices not in the prompt"
  scores = example.get("target_scores")
  if not isinstance(scores, dict):
    return "missing target_scores"
  if not scores:
    return "empty target_scores"
  for choice, score in scores.items():
    if not isinstance(choice, str) or not choice.strip():
      return "empty choice text"
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
      return "non-numeric score"
  if max(scores.values()) <= 0:
    return "no choice has a positive score"
  return None


def _shows_choices(task_json: dict[str, Any]) -> bool:
  return bool(task_json.get("append_choices_to_input", _DEFAULTS["append_choices_to_input"]))


def _load_json(path: Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"BIG-bench task file {path} is not valid JSON: {e}. Delete the "
                     "bigbench cache folder and run `elm-jax data fetch bigbench`.") from e
  if not isinstance(data, dict):
    raise ValueError(f"BIG-bench task file {path} does not contain a JSON object.")
  return data


def format_prompt(task_json: dict[str, Any], example_input: str, choices: list[str]) -> str:
  """Builds the zero-shot prompt of one example in the BIG-bench JSON format."""
  options = {key: task_json.get(key, default) for key, default in _DEFAULTS.items()}
  prompt = options["task_prefix"] + options["example_input_prefix"] + example_input
  if options["append_choices_to_input"]:
    prompt += options["choice_prefix"] + options["choice_prefix"].join(choices)
  prompt += options["example_output_prefix"]
  return prompt.strip()


def _records(task_json: dict[str, Any], path: Path, *, log: bool) -> Iterator[dict[str, Any]]:
  """Yields each valid example as a record with its split key; logs skip counts."""
  skipped: dict[str, int] = {}
  shows_choices = _shows_choices(task_json)
  for example in task_json.get("examples", []):
    reason = _check_example(example, shows_choices)
    if reason is not None:
      skipped[reason] = skipped.get(reason, 0) + 1
      continue
    scores = example["target_scores"]
    file_order = list(scores)
    best = max(scores.values())
    key = _example_key(example["input"], file_order)
    choices = list(file_order)
    random.Random(key).shuffle(choices)
    yield {
        "key": key,
        "inputs_pretokenized": format_prompt(task_json, example["input"], choices),
        "targets_pretokenized": next(c for c in file_order if scores[c] == best),
        "answer_choices": choices,
        "is_correct": [scores[c] == best for c in choices],
    }
  if log:
    for reason, count in sorted(skipped.items()):
      logging.warning("BIG-bench %s: skipped %d malformed examples (%s).", path, count, reason)


_logged_paths: set[Path] = set()


def _parse_split(path: Path, split: str, max_examples: int | None) -> list[dict[str, Any]]:
  log = path not in _logged_paths
  _logged_paths.add(path)
  records = [r for r in _records(_load_json(path), path, log=log)
             if split == "all" or _split_of(r["key"]) == split]
  if max_examples is not None and len(records) > max_examples:
    keep = {id(r) for r in sorted(records, key=lambda r: r["key"])[:max_examples]}
    records = [r for r in records if id(r) in keep]
  out = []
  for idx, record in enumerate(records):
    record = {k: v for k, v in record.items() if k != "key"}
    record["idx"] = idx
    out.append(record)
  return out


@functools.lru_cache(maxsize=64)
def read_split(path: Path, split: str, max_examples: int | None = None, *,
               cache_dir: Path | None = None) -> tuple[dict[str, Any], ...]:
  """Returns the records of one split of a task file, each with its `idx`.

  Records have `inputs_pretokenized`, `targets_pretokenized`, `answer_choices`,
  `is_correct` and `idx`. Results are cached in memory per (path, split, cap)
  and, when `cache_dir` is given, as a JSON file there, so a later process
  reads a capped split of a large task file without parsing the whole file.
  Use `split_cache_dir(cache)` as `cache_dir`: its name carries the artifact's
  sha256, so a changed artifact never meets stale split files.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown BIG-bench split {split!r}; expected one of {SPLITS}.")
  path = Path(path)
  if cache_dir is None:
    return tuple(_parse_split(path, split, max_examples))
  stem = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:16]
  cached = Path(cache_dir) / f"{path.parent.name}-{stem}.{split}.{max_examples}.json"
  if cached.is_file():
    with open(cached, encoding="utf-8") as f:
      return tuple(json.load(f))
  records = _parse_split(path, split, max_examples)
  file_io.write_text_atomic(cached, json.dumps(records, ensure_ascii=False))
  return tuple(records)


def _index_file(root: Path, relative: str) -> TaskEntry | None:
  path = root / relative
  task_json = _load_json(path)
  examples = task_json.get("examples")
  if not isinstance(examples, list) or not any(
      isinstance(e, dict) and "target_scores" in e for e in examples):
    return None
  parts = Path(relative).parts[:-1]
  counts = {"train": 0, "validation": 0}
  skipped: dict[str, int] = {}
  shows_choices = _shows_choices(task_json)
  for example in examples:
    reason = _check_example(example, shows_choices)
    if reason is not None:
      skipped[reason] = skipped.get(reason, 0) + 1
      continue
    counts[_split_of(_example_key(example["input"], list(example["target_scores"])))] += 1
  return TaskEntry(
      name=sanitize_name("_".join(parts)), task=parts[0],
      subtask=parts[1] if len(parts) > 1 else None, path=relative,
      num_examples=len(examples), num_train=counts["train"],
      num_validation=counts["validation"], skipped=skipped)


def index_path(cache: str | os.PathLike[str] | None = None) -> Path:
  """Returns where the index of the fetched bigbench artifact is cached.

  The file name carries the sha256 of the artifact's MANIFEST.json, so a
  refetched or changed artifact gets a new index.
  """
  folder = fetch.artifact_dir("bigbench", cache)
  manifest_sha = fetch.sha256_file(folder / fetch.MANIFEST)
  return (fetch.cache_root(cache) / "derived" /
          f"bigbench_index-v{INDEX_VERSION}-{manifest_sha[:16]}.json")


def split_cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
  """Returns the folder of cached split files (see `read_split`) for this artifact."""
  return index_path(cache).with_suffix("").with_name(
      index_path(cache).stem.replace("bigbench_index", "bigbench_splits"))


def load_index(cache: str | os.PathLike[str] | None = None) -> dict[str, TaskEntry]:
  """Returns name -> TaskEntry of every multiple-choice task file, sorted by name.

  The first call scans every task.json (15 s on an idle 2-core machine, several
  times that on a busy one) and caches the result. Later calls read the cache.

  Raises:
    MissingDataError: bigbench was never fetched into this cache.
    ValueError: a task file is not valid JSON, or two files map to one name.
  """
  root = fetch.artifact_dir("bigbench", cache)
  target = index_path(cache)
  if target.is_file():
    with open(target, encoding="utf-8") as f:
      rows = json.load(f)["tasks"]
    return {row["name"]: TaskEntry(**row) for row in rows}

  logging.info("Indexing the BIG-bench task files in %s (once per fetched artifact).", root)
  with open(root / fetch.MANIFEST, encoding="utf-8") as f:
    relatives = sorted(p for p in json.load(f)["files"] if p.endswith("task.json"))
  entries: dict[str, TaskEntry] = {}
  for relative in relatives:
    entry = _index_file(root, relative)
    if entry is None:
      continue
    if entry.name in entries:
      raise ValueError(f"BIG-bench files {entries[entry.name].path} and {relative} both "
                       f"map to the task name {entry.name!r}.")
    entries[entry.name] = entry
  file_io.write_text_atomic(target, json.dumps(
      {"version": INDEX_VERSION, "split_salt": SPLIT_SALT,
       "tasks": [dataclasses.asdict(e) for e in entries.values()]}, indent=0))
  logging.info("Indexed %d multiple-choice BIG-bench task files into %s.", len(entries), target)
  return entries


def held_in_entries(index: dict[str, TaskEntry]) -> list[TaskEntry]:
  """Returns the multiple-choice task files outside the 13 evaluation tasks."""
  return [e for e in index.values() if not e.is_eval]


def held_in_text(*, cache: str | os.PathLike[str] | None = None,
                 examples_per_task: int = 200, max_chars: int = 2000,
                 task_names: Sequence[str] | None = None) -> Iterator[str]:
  """Yields training text of the held-in tasks: prompt, then target, per example.

  Only the train split of held-in tasks is read, `examples_per_task` examples
  per task file (the capped sample described in the module docstring), in
  sorted task order. Each text is cut to `max_chars` characters.

  Args:
    cache: the cache root holding the fetched bigbench artifact.
    examples_per_task: examples read per task file.
    max_chars: the maximum length of one text.
    task_names: sanitized task file names to read (default: every held-in
      file); an evaluation task among them raises ValueError.
  """
  root = fetch.artifact_dir("bigbench", cache)
  index = load_index(cache)
  splits_dir = split_cache_dir(cache)
  entries = held_in_entries(index)
  if task_names is not None:
    unknown = sorted(set(task_names) - set(index))
    if unknown:
      raise ValueError(f"Unknown BIG-bench task names {unknown}; see `elm-jax data info`.")
    evaluation = sorted(n for n in task_names if index[n].is_eval)
    if evaluation:
      raise ValueError(f"{evaluation} are evaluation tasks and must not be used as "
                       "training text.")
    entries = [e for e in entries if e.name in set(task_names)]
  for entry in entries:
    for record in read_split(root / entry.path, "train", examples_per_task,
                             cache_dir=splits_dir):
      yield (record["inputs_pretokenized"] + "\n" + record["targets_pretokenized"])[:max_chars]
