"""Tests of the T0 Tasks and Mixtures over P3-format files written by p3_fixtures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import seqio

from elm_jax.tasks import t0
from elm_jax.tasks import t0_prompts

sys.path.insert(0, str(Path(__file__).parent))
import p3_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

SEQUENCE_LENGTH = {"inputs": 96, "targets": 24}
# amazon_polarity claims more than 500,000 examples, so its 9 prompts share the cap.
OVERSIZED_KEY = "amazon_polarity"
OVERSIZED_CLAIM = 3_600_000


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  return p3_fixtures.train_vocabulary(tmp_path_factory.mktemp("vocab"),
                                      p3_fixtures.all_fixture_text())


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
  return p3_fixtures.write_t0_collection(tmp_path_factory.mktemp("p3"),
                                         claimed_examples={OVERSIZED_KEY: OVERSIZED_CLAIM})


@pytest.fixture(scope="module")
def registered(collection, vocabulary):
  return t0.register(collection.p3_dir, vocabulary=vocabulary)


@pytest.fixture
def reregistered(registered, collection, vocabulary):
  """For tests that register T0 elsewhere: points it back at the fixture afterwards."""
  yield
  t0.register(collection.p3_dir, vocabulary=vocabulary)


def _first(name, split):
  dataset = seqio.get_mixture_or_task(name).get_dataset(SEQUENCE_LENGTH, split=split,
                                                        shuffle=False)
  return next(dataset.as_numpy_iterator())


def _decode(vocabulary, ids):
  return vocabulary.decode([int(i) for i in ids if i not in (0, vocabulary.eos_id)])


# ---------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------


def test_registered_counts(registered):
  assert len(registered.train_tasks) == 296
  assert len(registered.dataset_mixtures) == 36
  assert len(registered.eval_tasks) == 113
  assert len(registered.eval_mixtures) == 11


def test_all_names_in_registries(registered):
  tasks = set(seqio.TaskRegistry.names())
  mixtures = set(seqio.MixtureRegistry.names())
  assert set(registered.train_tasks) <= tasks
  assert set(registered.eval_tasks) <= tasks
  assert set(registered.dataset_mixtures) | set(registered.eval_mixtures) <= mixtures
  assert {t0.TRAIN_MIXTURE, t0.EVAL_MIXTURE} <= mixtures


def test_names_match_p3_folders(registered):
  assert "super_glue_rte_GPT_3_style_score_eval" in registered.eval_tasks
  assert "anli_GPT_3_style_r3_score_eval" in registered.eval_tasks
  assert "cos_e_v1.11_i_think" in registered.train_tasks
  assert "t0_cos_e" in registered.dataset_mixtures
  assert "t0_eval_anli_r2_score_eval" in registered.eval_mixtures


def test_every_task_reads_its_own_files(registered, collection):
  for name in registered.train_tasks:
    source = seqio.get_mixture_or_task(name).source
    expected = collection.p3_dir / "data" / name / "train.tfrecord-00000-of-00001"
    assert source.list_shards("train") == [str(expected)], name
  for name in registered.eval_tasks:
    source = seqio.get_mixture_or_task(name).source
    expected = collection.p3_dir / "data" / name / "validation.tfrecord-00000-of-00001"
    assert source.list_shards("validation") == [str(expected)], name


def test_every_task_counts_its_examples(registered, collection):
  for name in registered.train_tasks:
    claimed = OVERSIZED_CLAIM if name.startswith(OVERSIZED_KEY) else len(collection.train[name])
    assert seqio.get_mixture_or_task(name).num_input_examples("train") == claimed, name


def test_prompt_of_task():
  dataset, template = t0.prompt_of_task("super_glue_copa_C1_or_C2_premise_so_because__score_eval")
  assert dataset.key == "copa"
  assert template == "C1 or C2? premise, so/because\u2026"
  assert t0.prompt_of_task("not_a_t0_task") is None


# ---------------------------------------------------------------------------
# Examples through the full seqio pipeline: one prompt per dataset.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", t0_prompts.TRAIN_DATASETS, ids=lambda d: d.key)
def test_train_task_yields_retokenized_example(dataset, registered, collection, vocabulary):
  name = dataset.p3_task_names()[-1]
  inputs, targets = collection.train[name][0]
  example = _first(name, "train")
  assert example["inputs_pretokenized"].decode() == inputs
  assert example["targets_pretokenized"].decode() == targets
  expected_inputs = vocabulary.encode(inputs)[:SEQUENCE_LENGTH["inputs"] - 1]
  assert list(example["inputs"]) == expected_inputs + [vocabulary.eos_id]
  expected_targets = vocabulary.encode(targets)[:SEQUENCE_LENGTH["targets"] - 1]
  assert list(example["targets"]) == expected_targets + [vocabulary.eos_id]


@pytest.mark.parametrize("dataset", t0_prompts.EVAL_DATASETS, ids=lambda d: d.key)
def test_score_eval_task_groups_choices(dataset, registered, collection, vocabulary):
  name = dataset.p3_task_names(score_eval=True)[-1]
  inputs, choices, correct = collection.eval[name][0]
  example = _first(name, "validation")
  assert example["inputs_pretokenized"].decode() == inputs
  assert [c.decode() for c in example["answer_choices"]] == list(choices)
  assert list(example["is_correct"]) == [i == correct for i in range(len(choices))]
  assert int(example["idx"]) == 0
  assert _decode(vocabulary, example["targets"]) == choices[correct]
  assert example["targets"][-1] == vocabulary.eos_id


def test_score_eval_reads_all_examples_in_order(registered, collection):
  name = t0_prompts.eval_dataset("hellaswag").p3_task_names(score_eval=True)[0]
  examples = t0.read_score_eval_examples(name, "validation", p3_dir=collection.p3_dir)
  assert [e["idx"] for e in examples] == [0, 1]
  assert [e["inputs"] for e in examples] == [x[0] for x in collection.eval[name]]


# ---------------------------------------------------------------------------
# Mixtures.
# ---------------------------------------------------------------------------


def test_dataset_mixtures_hold_their_prompts(registered):
  for dataset in t0_prompts.TRAIN_DATASETS:
    mixture = seqio.get_mixture_or_task(t0.dataset_mixture_name(dataset))
    assert sorted(t.name for t in mixture.tasks) == sorted(dataset.p3_task_names()), dataset.key
  for dataset in t0_prompts.EVAL_DATASETS:
    mixture = seqio.get_mixture_or_task(t0.dataset_mixture_name(dataset))
    assert (sorted(t.name for t in mixture.tasks)
            == sorted(dataset.p3_task_names(score_eval=True))), dataset.key


def test_train_mixture_rates_follow_t0_rule(registered, collection):
  mixture = seqio.get_mixture_or_task(t0.TRAIN_MIXTURE)
  assert len(mixture.tasks) == 296
  oversized = t0_prompts.train_dataset(OVERSIZED_KEY)
  for task in mixture.tasks:
    if task.name in oversized.p3_task_names():
      assert mixture.get_rate(task) == pytest.approx(500_000 / 9), task.name
    else:
      assert mixture.get_rate(task) == len(collection.train[task.name]), task.name


def test_eval_mixture_holds_all_eval_tasks(registered):
  mixture = seqio.get_mixture_or_task(t0.EVAL_MIXTURE)
  assert sorted(t.name for t in mixture.tasks) == sorted(registered.eval_tasks)


@pytest.mark.parametrize("mixture_name,key", [("t0_wiki_bio", "wiki_bio"),
                                              ("t0_app_reviews", "app_reviews"),
                                              ("t0_glue_mrpc", "glue_mrpc")])
def test_dataset_mixture_samples_its_examples(mixture_name, key, registered, vocabulary):
  mixture = seqio.get_mixture_or_task(mixture_name)
  dataset = mixture.get_dataset(SEQUENCE_LENGTH, split="train", shuffle=True, seed=5)
  allowed = {inputs for inputs, _ in p3_fixtures.TRAIN_TEXT[key]}
  for example in dataset.take(6).as_numpy_iterator():
    assert _decode(vocabulary, example["inputs"]) in allowed


def test_eval_mixture_samples_its_examples(registered, vocabulary):
  mixture = seqio.get_mixture_or_task("t0_eval_copa_score_eval")
  dataset = mixture.get_dataset(SEQUENCE_LENGTH, split="validation", shuffle=False)
  allowed = {x[0] for x in p3_fixtures.EVAL_TEXT["copa"]}
  examples = list(dataset.take(4).as_numpy_iterator())
  assert len(examples) == 4
  for example in examples:
    assert _decode(vocabulary, example["inputs"]) in allowed


def test_rate_counts_records_without_stats(tmp_path):
  dataset = t0_prompts.train_dataset("dream")
  for j, name in enumerate(dataset.p3_task_names()):
    examples = p3_fixtures.TRAIN_TEXT["dream"] * (j + 1)
    p3_fixtures.write_train_task(tmp_path, name, examples, write_stats=False,
                                 write_info=False)
  rate = t0.DatasetRate(dataset, str(tmp_path))
  assert rate.counts() == {name: 2 * (j + 1) for j, name in enumerate(dataset.p3_task_names())}


def test_rate_of_oversized_dataset_uses_cap():
  assert t0.t0_mixing_rate(600_000, dataset_examples=600_001, num_prompts=6) == 500_000 / 6
  assert t0.t0_mixing_rate(400_000, dataset_examples=500_000, num_prompts=6) == 400_000


# ---------------------------------------------------------------------------
# Missing data and lookups.
# ---------------------------------------------------------------------------


def test_register_without_p3_dir_reads_nothing(tmp_path, vocabulary, reregistered):
  missing = tmp_path / "nowhere"
  names = t0.register(missing, vocabulary=vocabulary, include_eval=False)
  assert len(names.train_tasks) == 296
  assert not missing.exists()
  task = seqio.get_mixture_or_task(names.train_tasks[0])
  with pytest.raises(t0.P3DataError, match="download"):
    task.get_dataset(SEQUENCE_LENGTH, split="train")
  with pytest.raises(t0.P3DataError, match=str(missing / "data" / names.train_tasks[0])):
    task.get_dataset(SEQUENCE_LENGTH, split="train")


def test_missing_split_names_folder(registered, collection):
  name = registered.train_tasks[0]
  with pytest.raises(t0.P3DataError, match="splits present: train"):
    seqio.get_mixture_or_task(name).source.list_shards("validation")


def test_p3_dir_from_environment(monkeypatch, collection, vocabulary, reregistered):
  monkeypatch.setenv(t0.P3_DIR_ENV, str(collection.p3_dir))
  names = t0.register(vocabulary=vocabulary)
  example = _first(names.train_tasks[0], "train")
  assert example["inputs_pretokenized"].decode() == collection.train[names.train_tasks[0]][0][0]


def test_no_p3_dir_configured(monkeypatch):
  monkeypatch.delenv(t0.P3_DIR_ENV, raising=False)
  with pytest.raises(t0.P3DataError, match=t0.P3_DIR_ENV):
    t0.resolve_p3_dir(None)


def test_invalid_task_name_rejected(collection):
  with pytest.raises(ValueError, match="Invalid P3 task name"):
    t0.p3_task_dir("../etc", collection.p3_dir)


def test_lookup_suggests_nearest_names(registered):
  with pytest.raises(ValueError, match="super_glue_rte_GPT_3_style_score_eval"):
    t0.get_task_or_mixture("super_glue_rte_GPT3_style_score_eval")


def test_lookup_finds_mixture(registered):
  assert t0.get_task_or_mixture("t0_train").name == "t0_train"


# ---------------------------------------------------------------------------
# Exhaustive checks, several minutes on 2 cores.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_every_task_yields_example(registered, collection):
  for name in registered.train_tasks:
    example = _first(name, "train")
    assert example["inputs_pretokenized"].decode() == collection.train[name][0][0], name
  for name in registered.eval_tasks:
    example = _first(name, "validation")
    assert example["inputs_pretokenized"].decode() == collection.eval[name][0][0], name


@pytest.mark.slow
def test_train_mixture_yields_batch(registered):
  mixture = seqio.get_mixture_or_task(t0.TRAIN_MIXTURE)
  dataset = mixture.get_dataset(SEQUENCE_LENGTH, split="train", shuffle=True, seed=1)
  converted = seqio.EncDecFeatureConverter(pack=True)(dataset, SEQUENCE_LENGTH)
  batch = next(converted.batch(4).as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (4, SEQUENCE_LENGTH["inputs"])
  assert batch["decoder_target_tokens"].shape == (4, SEQUENCE_LENGTH["targets"])


# ---------------------------------------------------------------------------
# Single P3-format folders and import-time registration.
# ---------------------------------------------------------------------------


def test_register_p3_task_train_folder(tmp_path, vocabulary):
  examples = p3_fixtures.TRAIN_TEXT["samsum"]
  p3_fixtures.write_train_task(tmp_path, "my_dialogue_summary", examples, split="validation")
  assert t0.register_p3_task("my_summary", p3_dir=tmp_path, task_name="my_dialogue_summary",
                             vocabulary=vocabulary) == "my_summary"
  examples_read = list(seqio.get_mixture_or_task("my_summary").get_dataset(
      SEQUENCE_LENGTH, split="validation", shuffle=False).as_numpy_iterator())
  assert [e["targets_pretokenized"].decode() for e in examples_read] == [t for _, t in examples]


def test_register_p3_task_score_eval_folder(tmp_path, vocabulary):
  examples = p3_fixtures.EVAL_TEXT["wic"]
  p3_fixtures.write_score_eval_task(tmp_path, "my_wic_score_eval", examples)
  t0.register_p3_task("my_wic_score_eval", p3_dir=tmp_path, vocabulary=vocabulary)
  examples_read = list(seqio.get_mixture_or_task("my_wic_score_eval").get_dataset(
      SEQUENCE_LENGTH, split="validation", shuffle=False).as_numpy_iterator())
  assert [e["is_correct"].tolist() for e in examples_read] == [[True, False], [False, True]]


def test_import_registers_without_reading_files(tmp_path):
  # A fresh process with an empty cache and a P3 folder that does not exist.
  code = (
      "import seqio\n"
      "from elm_jax.tasks import t0\n"
      "names = t0.names()\n"
      "registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())\n"
      "print('missing', len(set(names.all()) - registered))\n"
      "task = seqio.get_mixture_or_task(names.train_tasks[0])\n"
      "try:\n"
      "  task.source.list_shards('train')\n"
      "except t0.P3DataError as e:\n"
      "  print('error', e)\n")
  env = {**os.environ, t0.P3_DIR_ENV: str(tmp_path / "p3"),
         "ELM_JAX_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "missing 0" in result.stdout
  assert f"error P3 task folder {tmp_path / 'p3' / 'data'}" in result.stdout
  assert not (tmp_path / "cache").exists()
