"""Tests of the BIG-bench reader (elm_jax.data.bigbench) and its seqio Tasks."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import seqio

from data_fixtures import linked_cache, small_vocab  # pylint: disable=unused-import
from elm_jax.data import bigbench
from elm_jax.data import fetch
from elm_jax.data import feature_converters
from elm_jax.tasks import bigbench as bigbench_tasks


def _write_artifact(root: Path, tasks: dict[str, object]) -> Path:
  """Writes a fake bigbench artifact: {relative task folder: task.json content}."""
  folder = root / "bigbench"
  files = {}
  for relative, content in tasks.items():
    path = folder / relative / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    files[f"{relative}/task.json"] = fetch.sha256_file(path)
  (folder / fetch.MANIFEST).write_text(json.dumps({"artifact": "bigbench", "files": files}))
  return root


def _mc(n: int, **keys) -> dict:
  examples = [{"input": f"question {i}", "target_scores": {f"no {i}": 0, f"yes {i}": 1}}
              for i in range(n)]
  return {"name": "x", "examples": examples, **keys}


@pytest.fixture(name="fake_cache")
def fixture_fake_cache(tmp_path):
  return _write_artifact(tmp_path, {
      "prefixed": {"name": "prefixed", "task_prefix": "Decide.\n",
                   "example_input_prefix": "\nIn: ", "choice_prefix": "\n - ",
                   "example_output_prefix": "\nOut: ",
                   "examples": [{"input": "Is 2 even?", "target_scores": {"yes": 1, "no": 0}}]},
      "plain": _mc(200),
      "hidden": _mc(3, append_choices_to_input=False),
      "ties": {"name": "ties", "examples": [
          {"input": "pick", "target_scores": {"a": 0.5, "b": 1, "c": 0, "d": 1}}]},
      "bad": {"name": "bad", "examples": [
          {"input": "ok", "target_scores": {"x": 1, "y": 0}},
          {"target_scores": {"x": 1}},
          {"input": 3, "target_scores": {"x": 1}},
          {"input": "e", "target_scores": {}},
          {"input": "n", "target_scores": {"x": "high"}},
          {"input": "z", "target_scores": {"x": 0, "y": 0}},
          {"input": "s", "target_scores": {"": 1, "y": 0}}]},
      "generative": {"name": "generative", "examples": [{"input": "a", "target": "b"}]},
      "multi/one": _mc(4),
      "multi/two": _mc(5),
      "strategyqa": _mc(10),
  })


@pytest.fixture(name="restore_registration", scope="module", autouse=True)
def fixture_restore_registration():
  yield
  bigbench_tasks.register()  # The import-time registration other tests expect.


def _read(cache, name, split="all", cap=None):
  entry = bigbench.load_index(cache)[name]
  return bigbench.read_split(fetch.artifact_dir("bigbench", cache) / entry.path, split, cap)


def test_prompt_uses_task_prefixes(fake_cache):
  (record,) = _read(fake_cache, "prefixed")
  choices = record["answer_choices"]
  expected = "Decide.\n\nIn: Is 2 even?\n - " + "\n - ".join(choices) + "\nOut:"
  assert record["inputs_pretokenized"] == expected


def test_prompt_defaults(fake_cache):
  record = _read(fake_cache, "plain")[0]
  assert record["inputs_pretokenized"].startswith("Q: question 0\n  choice: ")
  assert record["inputs_pretokenized"].endswith("\nA:")


def test_choices_hidden_when_not_appended(fake_cache):
  record = _read(fake_cache, "hidden")[0]
  assert record["inputs_pretokenized"] == "Q: question 0\nA:"


def test_several_correct_choices(fake_cache):
  (record,) = _read(fake_cache, "ties")
  correct = {c for c, ok in zip(record["answer_choices"], record["is_correct"]) if ok}
  assert correct == {"b", "d"}
  assert record["targets_pretokenized"] == "b"


def test_choice_order_is_shuffled_but_stable(fake_cache):
  records = _read(fake_cache, "plain")
  firsts = [r["answer_choices"][0].split()[0] for r in records]
  assert {"yes", "no"} == set(firsts)
  bigbench.read_split.cache_clear()
  assert [r["answer_choices"] for r in _read(fake_cache, "plain")] == [
      r["answer_choices"] for r in records]


def test_malformed_examples_skipped_once(fake_cache, caplog):
  bigbench.read_split.cache_clear()
  bigbench._logged_paths.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    records = _read(fake_cache, "bad")
    _read(fake_cache, "bad", "train")
  assert [r["targets_pretokenized"] for r in records] == ["x"]
  lines = [r.getMessage() for r in caplog.records if "bad/task.json" in r.getMessage()]
  assert len(lines) == 5  # One line per reason, though two splits were read.
  assert any("skipped 2 malformed examples (missing or non-string input)" in line
             for line in lines)
  assert bigbench.load_index(fake_cache)["bad"].skipped["missing or non-string input"] == 2


def test_invalid_json_names_file(tmp_path):
  cache = _write_artifact(tmp_path, {"broken": "{not json"})
  with pytest.raises(ValueError, match="broken/task.json is not valid JSON"):
    bigbench.load_index(cache)


def test_index_lists_only_multiple_choice(fake_cache):
  names = set(bigbench.load_index(fake_cache))
  assert "generative" not in names
  assert {"multi_one", "multi_two", "plain", "strategyqa"} <= names


def test_index_is_cached(fake_cache):
  first = bigbench.load_index(fake_cache)
  assert bigbench.index_path(fake_cache).is_file()
  assert bigbench.load_index(fake_cache) == first


def test_split_partitions_examples(fake_cache):
  train = _read(fake_cache, "plain", "train")
  validation = _read(fake_cache, "plain", "validation")
  every = _read(fake_cache, "plain", "all")
  train_inputs = {r["inputs_pretokenized"] for r in train}
  validation_inputs = {r["inputs_pretokenized"] for r in validation}
  assert not train_inputs & validation_inputs
  assert train_inputs | validation_inputs == {r["inputs_pretokenized"] for r in every}
  assert 20 <= len(validation) <= 60  # About 20% of 200.


def test_idx_counts_within_split(fake_cache):
  assert [r["idx"] for r in _read(fake_cache, "plain", "validation")] == list(
      range(len(_read(fake_cache, "plain", "validation"))))


def test_cap_takes_subset_of_split(fake_cache):
  train = {r["inputs_pretokenized"] for r in _read(fake_cache, "plain", "train")}
  capped = _read(fake_cache, "plain", "train", 25)
  assert len(capped) == 25
  assert {r["inputs_pretokenized"] for r in capped} <= train


def test_register_missing_data_names_fetch(tmp_path):
  with pytest.raises(fetch.MissingDataError, match="elm-jax data fetch bigbench"):
    bigbench_tasks.register(tmp_path)


def test_register_fake_tasks(fake_cache, small_vocab):
  names = bigbench_tasks.register(fake_cache, vocabulary=small_vocab, max_examples_per_task=30)
  assert "bigbench_plain" in names
  assert "bigbench_multi_score_eval" in names
  eval_mixture = seqio.get_mixture_or_task(bigbench_tasks.EVAL_MIXTURE)
  assert [t.name for t in eval_mixture.tasks] == ["bigbench_strategyqa_score_eval"]
  held_in = seqio.get_mixture_or_task(bigbench_tasks.HELD_IN_MIXTURE)
  rates = {t.name: held_in.get_rate(t) for t in held_in.tasks}
  assert "bigbench_strategyqa" not in rates
  assert rates["bigbench_plain"] == 30.0


def test_fake_held_in_mixture_yields_packed_batch(fake_cache, small_vocab):
  bigbench_tasks.register(fake_cache, vocabulary=small_vocab)
  batch = next(feature_converters.training_dataset(
      bigbench_tasks.HELD_IN_MIXTURE, task_feature_lengths={"inputs": 32, "targets": 8},
      batch_size=3, seed=5).as_numpy_iterator())
  assert batch["decoder_target_tokens"].shape == (3, 8)
  assert batch["encoder_segment_ids"].max() >= 1


def test_split_files_cached(fake_cache):
  entry = bigbench.load_index(fake_cache)["plain"]
  path = fetch.artifact_dir("bigbench", fake_cache) / entry.path
  splits_dir = bigbench.split_cache_dir(fake_cache)
  first = bigbench.read_split(path, "train", 9, cache_dir=splits_dir)
  assert len(list(splits_dir.glob("*.train.9.json"))) == 1
  bigbench.read_split.cache_clear()
  assert bigbench.read_split(path, "train", 9, cache_dir=splits_dir) == first


def test_register_is_idempotent(fake_cache, small_vocab):
  first = bigbench_tasks.register(fake_cache, vocabulary=small_vocab)
  assert bigbench_tasks.register(fake_cache, vocabulary=small_vocab) == first
  assert bigbench_tasks.register(fake_cache, vocabulary=small_vocab,
                                 max_examples_per_task=7) == first


def test_training_task_features(fake_cache, small_vocab):
  bigbench_tasks.register(fake_cache, vocabulary=small_vocab)
  task = seqio.get_mixture_or_task("bigbench_ties")
  (example,) = list(task.get_dataset({"inputs": 64, "targets": 8}, split="all",
                                     shuffle=False).as_numpy_iterator())
  assert example["targets_pretokenized"] == b"b"
  assert list(example["targets"]) == small_vocab.encode("b") + [1]
  assert example["inputs"][-1] == 1


def test_scoring_task_features(fake_cache, small_vocab):
  bigbench_tasks.register(fake_cache, vocabulary=small_vocab)
  task = seqio.get_mixture_or_task("bigbench_ties_score_eval")
  (example,) = list(task.get_dataset({"inputs": 64, "targets": 8}, split="all",
                                     shuffle=False).as_numpy_iterator())
  choices = [c.decode() for c in example["answer_choices"]]
  assert sorted(choices) == ["a", "b", "c", "d"]
  assert [c for c, ok in zip(choices, example["is_correct"]) if ok] in (["b", "d"], ["d", "b"])
  assert example["idx"] == 0
  assert example["inputs_pretokenized"].decode().startswith("Q: pick")


# Real BIG-bench data.

HELD_IN_SAMPLE = ("bigbench_anachronisms", "bigbench_arithmetic_1_digit_addition",
                  "bigbench_bbq_lite_json_religion_ambig", "bigbench_causal_judgment")


@pytest.fixture(name="real_tasks", scope="module")
def fixture_real_tasks(linked_cache, small_vocab):
  return bigbench_tasks.register(linked_cache, vocabulary=small_vocab)


def test_thirteen_eval_tasks_registered(real_tasks, linked_cache):
  names = bigbench_tasks.eval_task_names(linked_cache)
  assert {n for n in names} <= set(real_tasks)
  assert len(names) == 20  # 10 tasks + 6 conceptual_combinations + 3 logical_deduction + 1.
  tasks = {bigbench.load_index(linked_cache)[n[len("bigbench_"):-len("_score_eval")]].task
           for n in names}
  assert tasks == set(bigbench_tasks.EVAL_TASKS)


def test_held_in_excludes_eval_tasks(real_tasks, linked_cache):
  held_in = bigbench_tasks.held_in_task_names(linked_cache)
  assert len(held_in) > 250
  for name in held_in:
    assert not any(name == f"bigbench_{t}" or name.startswith(f"bigbench_{t}_")
                   for t in bigbench_tasks.EVAL_TASKS if t != "misconceptions"), name
  assert "bigbench_misconceptions" not in held_in


@pytest.mark.parametrize("name", sorted(
    f"bigbench_{n}_score_eval" for n in (
        "code_line_description", "conceptual_combinations_homonyms",
        "formal_fallacies_syllogisms_negation", "hindu_knowledge", "known_unknowns",
        "language_identification", "logic_grid_puzzle", "logical_deduction_five_objects",
        "misconceptions", "movie_dialog_same_or_different", "strategyqa",
        "vitaminc_fact_verification", "winowhy")))
def test_eval_task_yields_scoring_batch(real_tasks, small_vocab, name):
  task = seqio.get_mixture_or_task(name)
  examples = task.get_dataset({"inputs": 512, "targets": 64}, split="all",
                              shuffle=False).take(3).as_numpy_iterator()
  batch = next(feature_converters.make_scoring_batches(examples, small_vocab, 4, task_name=name))
  assert list(batch["example_index"]) == [0, 1, 2, -1]
  assert batch["is_correct"][:3].any(axis=1).all()


@pytest.mark.parametrize("name", HELD_IN_SAMPLE + ("bigbench_logical_deduction",))
def test_training_task_yields_packed_batch(real_tasks, name):
  batch = next(feature_converters.training_dataset(
      name, task_feature_lengths={"inputs": 128, "targets": 16}, batch_size=2,
      shuffle=False).as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (2, 128)
  assert batch["decoder_segment_ids"].max() >= 1


@pytest.mark.parametrize("name", [bigbench_tasks.EVAL_MIXTURE, "bigbench_logical_deduction_score_eval"])
def test_eval_mixture_yields_examples(real_tasks, name):
  mixture = seqio.get_mixture_or_task(name)
  example = next(mixture.get_dataset(
      {"inputs": 256, "targets": 32}, split="all", shuffle=True, seed=3, num_epochs=1,
      copy_pretokenized=True,
      passthrough_features=bigbench_tasks.SCORING_PASSTHROUGH).as_numpy_iterator())
  assert example["inputs_pretokenized"]
  assert example["answer_choices"].size == example["is_correct"].size


@pytest.mark.slow  # The first read parses all 1.7 GB of task files.
def test_held_in_mixture_yields_packed_batch(real_tasks):
  batch = next(feature_converters.training_dataset(
      bigbench_tasks.HELD_IN_MIXTURE, task_feature_lengths={"inputs": 128, "targets": 16},
      batch_size=3, seed=5).as_numpy_iterator())
  assert batch["decoder_target_tokens"].shape == (3, 16)
