"""Tests of promptsource template loading, rendering, and prompted seqio Tasks.

Expected strings are written from reading the templates in promptsource 0.2.3's
templates.yaml: the YAML text, Jinja's rules, `|||` splitting and stripping.
"""

import json
import sys
from pathlib import Path

import pytest
import seqio
import tensorflow as tf
import yaml

from elm_jax.tasks import promptsource as ps

sys.path.insert(0, str(Path(__file__).parent))
import p3_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

RTE_EXAMPLE = {
    "premise": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer.",
    "hypothesis": "Christopher Reeve had an accident.",
    "idx": 3,
    "label": 1,
}
COPA_CAUSE = {
    "premise": "My body cast a shadow over the grass.",
    "choice1": "The sun was rising.",
    "choice2": "The grass was cut.",
    "question": "cause",
    "idx": 0,
    "label": 0,
}
COPA_EFFECT = {
    "premise": "The man turned on the faucet.",
    "choice1": "The toilet filled with water.",
    "choice2": "Water flowed from the spout.",
    "question": "effect",
    "idx": 1,
    "label": 1,
}
HELLASWAG_EXAMPLE = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY",
    "split": "val",
    "split_type": "indomain",
    "label": "3",
}


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  texts = p3_fixtures.all_fixture_text() + [
      RTE_EXAMPLE["premise"], RTE_EXAMPLE["hypothesis"],
      "Question: True or False? Using only the above description and what you know "
      "about the world, is definitely correct? Yes or no?"]
  return p3_fixtures.train_vocabulary(tmp_path_factory.mktemp("vocab"), texts)


def _template(promptsource_dir, dataset, subset, name):
  return ps.get_template(dataset, subset, name, templates_dir=promptsource_dir)


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def test_load_templates_builds_dataclasses(promptsource_dir):
  templates = ps.load_templates("super_glue", "rte", templates_dir=promptsource_dir)
  template = templates["GPT-3 style"]
  assert isinstance(template, ps.Template)
  assert template.answer_choices == "True ||| False"
  assert template.metadata.original_task is True
  assert template.metadata.metrics == ("Accuracy",)


def test_loader_rejects_python_tags(tmp_path):
  folder = tmp_path / "evil"
  folder.mkdir()
  (folder / "templates.yaml").write_text(
      "dataset: evil\ntemplates:\n  a: !!python/object/apply:os.system ['echo hi']\n")
  with pytest.raises(yaml.constructor.ConstructorError):
    ps.load_templates("evil", templates_dir=tmp_path)


def test_missing_dataset_lists_close_folders(promptsource_dir):
  with pytest.raises(FileNotFoundError, match="hellaswag"):
    ps.load_templates("helaswag", templates_dir=promptsource_dir)


def test_misspelled_template_lists_close_names(promptsource_dir):
  with pytest.raises(KeyError, match="GPT-3 style"):
    ps.get_template("super_glue", "rte", "GPT3 style", templates_dir=promptsource_dir)


def test_path_components_validated(promptsource_dir):
  with pytest.raises(ValueError, match="Invalid promptsource dataset"):
    ps.load_templates("..", templates_dir=promptsource_dir)


def test_parse_prompt_id():
  assert ps.parse_prompt_id("super_glue/rte@GPT-3 style") == ("super_glue", "rte", "GPT-3 style")
  assert ps.parse_prompt_id("hellaswag@how_ends") == ("hellaswag", None, "how_ends")
  with pytest.raises(ValueError, match="dataset"):
    ps.parse_prompt_id("hellaswag")


# ---------------------------------------------------------------------------
# Rendering real templates.
# ---------------------------------------------------------------------------


def test_rte_gpt3_style(promptsource_dir):
  template = _template(promptsource_dir, "super_glue", "rte", "GPT-3 style")
  rendered = ps.apply_template(template, RTE_EXAMPLE)
  assert rendered.inputs == (
      "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer.\n"
      "Question: Christopher Reeve had an accident. True or False?")
  assert rendered.targets == "False"
  assert rendered.answer_choices == ["True", "False"]


def test_rte_mnli_crowdsource(promptsource_dir):
  template = _template(promptsource_dir, "super_glue", "rte", "MNLI crowdsource")
  rendered = ps.apply_template(template, {**RTE_EXAMPLE, "label": 0})
  assert rendered.inputs == (
      "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer. "
      "Using only the above description and what you know about the world, is "
      "\"Christopher Reeve had an accident.\" definitely correct? Yes or no?")
  assert rendered.targets == "Yes"


def test_rte_unlabeled_example_skipped(promptsource_dir):
  # Test-split examples have label -1, so the target renders empty.
  template = _template(promptsource_dir, "super_glue", "rte", "does this imply")
  assert ps.apply_template(template, {**RTE_EXAMPLE, "label": -1}) is None


def test_copa_choices_first(promptsource_dir):
  template = _template(promptsource_dir, "super_glue", "copa",
                       "C1 or C2? premise, so/because\u2026")
  cause = ps.apply_template(template, COPA_CAUSE)
  assert cause.inputs == ('"The sun was rising." or "The grass was cut."? '
                          "My body cast a shadow over the grass.  because")
  assert cause.targets == "The sun was rising."
  effect = ps.apply_template(template, COPA_EFFECT)
  assert effect.inputs == ('"The toilet filled with water." or "Water flowed from the spout."? '
                           "The man turned on the faucet.  so")
  assert effect.targets == "Water flowed from the spout."


def test_copa_best_option(promptsource_dir):
  template = _template(promptsource_dir, "super_glue", "copa", "best_option")
  rendered = ps.apply_template(template, COPA_CAUSE)
  assert rendered.inputs == (
      "My body cast a shadow over the grass. \n\nWhat's the best option?\n"
      "- The sun was rising.\n- The grass was cut.\n\nWe are looking for  a cause")
  assert rendered.answer_choices == ["The sun was rising.", "The grass was cut."]


def test_hellaswag_how_ends(promptsource_dir):
  template = _template(promptsource_dir, "hellaswag", None, "how_ends")
  rendered = ps.apply_template(template, HELLASWAG_EXAMPLE)
  assert rendered.inputs == (
      "A man is sitting on a roof. he...\nHow does the description likely end?\n\n"
      "Ending 1: is using wrap to wrap a pair of skis.\n\n"
      "Ending 2: is ripping level tiles off.\n\n"
      "Ending 3: is holding a rubik's cube.\n\n"
      "Ending 4: starts pulling up roofing on a roof.")
  assert rendered.targets == "Ending 4"
  assert rendered.answer_choices == ["Ending 1", "Ending 2", "Ending 3", "Ending 4"]


def test_hellaswag_complete_first_then(promptsource_dir):
  template = _template(promptsource_dir, "hellaswag", None, "complete_first_then")
  rendered = ps.apply_template(template, HELLASWAG_EXAMPLE)
  assert rendered.inputs.startswith(
      "Complete the description with an appropriate ending:\n"
      "First, a man is sitting on a roof. Then, he ...\n\n"
      "(a) is using wrap to wrap a pair of skis.")
  assert rendered.targets == "starts pulling up roofing on a roof."
  assert rendered.answer_choices == HELLASWAG_EXAMPLE["endings"]


def test_hellaswag_randomized_prompt_seeded(promptsource_dir):
  template = _template(promptsource_dir, "hellaswag", None, "Randomized prompts template")
  first = ps.apply_template(template, HELLASWAG_EXAMPLE, rng=ps.example_rng(7, 0))
  again = ps.apply_template(template, HELLASWAG_EXAMPLE, rng=ps.example_rng(7, 0))
  assert first == again
  openings = {ps.apply_template(template, HELLASWAG_EXAMPLE, rng=ps.example_rng(7, i))
              .inputs.split("\n")[0] for i in range(40)}
  assert len(openings) == 4


# ---------------------------------------------------------------------------
# Rules and filters.
# ---------------------------------------------------------------------------


def test_most_frequent_filter():
  assert ps.most_frequent(["b", "a", "b", "a", "c"]) == ["b", "a"]
  assert ps.most_frequent(["x", "y", "y"]) == ["y"]
  assert ps.most_frequent([]) is None


def test_most_frequent_then_choice_in_template():
  template = ps.Template(name="answers",
                         jinja="Q: {{ q }} ||| {{ answers | most_frequent | choice }}")
  example = {"q": "Capital?", "answers": ["Paris", "Lyon", "Paris"]}
  assert ps.apply_template(template, example).targets == "Paris"


def test_highlight_filter():
  template = ps.Template(name="h", jinja="{{ word | highlight }} ||| x")
  assert ps.apply_template(template, {"word": "cat"}).inputs == (
      "<span style='color: #F08080'>cat</span>")


def test_choice_filter_deterministic_per_example():
  template = ps.Template(name="c", jinja="{{ ['red', 'green', 'blue'] | choice }} ||| t")
  picks = [ps.apply_template(template, {}, rng=ps.example_rng(3, i)).inputs for i in range(30)]
  repeat = [ps.apply_template(template, {}, rng=ps.example_rng(3, i)).inputs for i in range(30)]
  assert picks == repeat
  assert set(picks) == {"red", "green", "blue"}


def test_separator_inside_example_text_kept():
  template = ps.Template(name="p", jinja="{{ text }} ||| {{ answer_choices[label] }}",
                         answer_choices="{{ options | join(' ||| ') }}")
  example = {"text": "a ||| b", "options": ["x|||y", "z"], "label": 0}
  rendered = ps.apply_template(template, example)
  assert rendered.inputs == "a ||| b"
  assert rendered.targets == "x|||y"
  assert rendered.answer_choices == ["x|||y", "z"]


def test_hyphenated_field_names():
  template = ps.Template(name="h", jinja="{{ sentence_1 }} ||| {{ sentence_2 }}")
  rendered = ps.apply_template(template, {"sentence-1": "One.", "sentence-2": "Two."})
  assert (rendered.inputs, rendered.targets) == ("One.", "Two.")


def test_values_truncated():
  template = ps.Template(name="t", jinja="{{ text }} ||| ok")
  rendered = ps.apply_template(template, {"text": "word " * 1000})
  assert len(rendered.inputs) <= ps.TEXT_VALUE_MAX_CHARS
  assert rendered.inputs.endswith("...")


def test_answer_choices_field_rejected():
  template = ps.Template(name="t", jinja="{{ text }} ||| ok")
  with pytest.raises(ValueError, match="answer_choices"):
    ps.apply_template(template, {"text": "a", "answer_choices": ["x"]})


def test_sandbox_blocks_private_attributes():
  template = ps.Template(name="s", jinja="{{ text.__class__.__mro__ }} ||| x")
  with pytest.raises(ps.TemplateRenderError) as error:
    ps.render(template, {"text": "a"})
  assert error.value.reason == "SecurityError"


def test_failing_template_skipped_and_counted(promptsource_dir):
  # This COPA template renders only for `effect` questions: a `cause` example
  # renders no `|||` at all.
  template = _template(promptsource_dir, "super_glue", "copa",
                       "\u2026What could happen next, C1 or C2?")
  counts = ps.RenderCounts()
  examples = [COPA_CAUSE, COPA_EFFECT, {**COPA_CAUSE, "idx": 2}]
  rendered = list(ps.render_examples(template, examples, counts=counts))
  assert [r["idx"] for r in rendered] == [1]
  assert counts.rendered == 1
  assert counts.skipped == {"separator_count": 2}
  assert rendered[0]["inputs"] == (
      'The man turned on the faucet. What could happen next, "The toilet filled with '
      'water." or "Water flowed from the spout."?')


def test_missing_field_skipped_and_counted(promptsource_dir):
  template = _template(promptsource_dir, "hellaswag", None, "complete_first_then")
  # `{{ ctx_a.lower() }}` calls a method of an undefined value.
  without_ctx_a = {k: v for k, v in HELLASWAG_EXAMPLE.items() if k != "ctx_a"}
  counts = ps.RenderCounts()
  rendered = list(ps.render_examples(template, [without_ctx_a, HELLASWAG_EXAMPLE],
                                     counts=counts))
  assert [r["idx"] for r in rendered] == [1]
  assert counts.total_skipped == 1
  assert set(counts.skipped) == {"UndefinedError"}


# ---------------------------------------------------------------------------
# seqio preprocessors and Tasks.
# ---------------------------------------------------------------------------


def test_rank_classification_features():
  dataset = tf.data.Dataset.from_generator(
      lambda: iter([
          {"inputs": "Is it? ", "targets": " No", "answer_choices": ["Yes", "No"], "idx": 0},
          {"inputs": "Odd", "targets": "Maybe", "answer_choices": ["Yes", "No"], "idx": 1},
          {"inputs": "Both", "targets": "Yes", "answer_choices": ["Yes", "Yes", "No"], "idx": 2},
      ]),
      output_signature={"inputs": tf.TensorSpec([], tf.string),
                        "targets": tf.TensorSpec([], tf.string),
                        "answer_choices": tf.TensorSpec([None], tf.string),
                        "idx": tf.TensorSpec([], tf.int32)})
  seqio.test_utils.assert_dataset(ps.rank_classification_features(dataset), [
      {"inputs": "Is it? ", "targets": "No", "answer_choices": ["Yes", "No"], "idx": 0,
       "is_correct": [False, True]},
      {"inputs": "Both", "targets": "Yes", "answer_choices": ["Yes", "Yes", "No"], "idx": 2,
       "is_correct": [True, True, False]},
  ])


def _write_jsonl(path, examples):
  path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
  return path


def test_register_prompted_task_from_jsonl(tmp_path, promptsource_dir, vocabulary):
  unlabeled = {**RTE_EXAMPLE, "idx": 4, "label": -1}
  source = _write_jsonl(tmp_path / "rte.jsonl", [RTE_EXAMPLE, unlabeled, {**RTE_EXAMPLE,
                                                                          "label": 0}])
  names = ps.register_prompted_task(
      "test_ps_rte_gpt3", dataset="super_glue", subset="rte", template_name="GPT-3 style",
      source_jsonl={"validation": source}, vocabulary=vocabulary,
      templates_dir=promptsource_dir)
  assert names == ("test_ps_rte_gpt3", "test_ps_rte_gpt3_score_eval")

  inputs = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer.\n"
            "Question: Christopher Reeve had an accident. True or False?")
  eos = [vocabulary.eos_id]
  train = seqio.get_mixture_or_task("test_ps_rte_gpt3").get_dataset(
      None, split="validation", shuffle=False)
  seqio.test_utils.assert_dataset(train, [
      {"inputs": vocabulary.encode(inputs) + eos, "targets": vocabulary.encode("False") + eos,
       "inputs_pretokenized": inputs, "targets_pretokenized": "False",
       "answer_choices": ["True", "False"], "idx": 0},
      {"inputs": vocabulary.encode(inputs) + eos, "targets": vocabulary.encode("True") + eos,
       "inputs_pretokenized": inputs, "targets_pretokenized": "True",
       "answer_choices": ["True", "False"], "idx": 2},
  ])

  scoring = seqio.get_mixture_or_task("test_ps_rte_gpt3_score_eval").get_dataset(
      None, split="validation", shuffle=False)
  seqio.test_utils.assert_dataset(scoring, [
      {"inputs": vocabulary.encode(inputs) + eos, "targets": vocabulary.encode("False") + eos,
       "inputs_pretokenized": inputs, "targets_pretokenized": "False",
       "answer_choices": ["True", "False"], "is_correct": [False, True], "idx": 0},
      {"inputs": vocabulary.encode(inputs) + eos, "targets": vocabulary.encode("True") + eos,
       "inputs_pretokenized": inputs, "targets_pretokenized": "True",
       "answer_choices": ["True", "False"], "is_correct": [True, False], "idx": 2},
  ])


def test_register_prompted_task_trims_with_eos(tmp_path, promptsource_dir, vocabulary):
  source = _write_jsonl(tmp_path / "copa.jsonl", [COPA_CAUSE])
  ps.register_prompted_task(
      "test_ps_copa_choose", dataset="super_glue", subset="copa", template_name="choose",
      source_jsonl=source, vocabulary=vocabulary, templates_dir=promptsource_dir,
      score_eval=False)
  example = next(seqio.get_mixture_or_task("test_ps_copa_choose").get_dataset(
      {"inputs": 7, "targets": 5}, split="train", shuffle=False).as_numpy_iterator())
  assert len(example["inputs"]) == 7
  assert example["inputs"][-1] == vocabulary.eos_id


def test_register_rejects_score_eval_without_choices(tmp_path, promptsource_dir, vocabulary):
  source = _write_jsonl(tmp_path / "h.jsonl", [HELLASWAG_EXAMPLE])
  with pytest.raises(ValueError, match="score_eval=False"):
    ps.register_prompted_task(
        "test_ps_hellaswag_topic", dataset="hellaswag", template_name="Topic of the context",
        source_jsonl=source, vocabulary=vocabulary, templates_dir=promptsource_dir)


def test_register_needs_exactly_one_source(promptsource_dir, vocabulary):
  with pytest.raises(ValueError, match="exactly one"):
    ps.register_prompted_task("test_ps_none", dataset="super_glue", subset="rte",
                              template_name="GPT-3 style", vocabulary=vocabulary,
                              templates_dir=promptsource_dir)


def test_invalid_jsonl_names_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"a": 1}\n\n[1, 2]\n', encoding="utf-8")
  with pytest.raises(ValueError, match="line 3"):
    list(ps.read_jsonl(path))


def test_register_prompted_task_from_tfds(promptsource_dir, vocabulary):
  tfds = pytest.importorskip("tensorflow_datasets")
  ps.register_prompted_task(
      "test_ps_rte_tfds", dataset="super_glue", subset="rte", template_name="GPT-3 style",
      tfds_name="super_glue/rte", vocabulary=vocabulary, templates_dir=promptsource_dir)
  # mock_data generates random examples from the builder's features, offline.
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    examples = list(seqio.get_mixture_or_task("test_ps_rte_tfds_score_eval").get_dataset(
        None, split="validation", shuffle=False).as_numpy_iterator())
  assert len(examples) == 3
  for example in examples:
    assert example["inputs_pretokenized"].decode().endswith("True or False?")
    assert example["targets_pretokenized"].decode() in ("True", "False")
    assert example["is_correct"].sum() == 1
